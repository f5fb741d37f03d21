-- KEYS[1]: the token's key, KEYS[2]: its slots given back out of order; ARGV: ms between
-- slots, the slot (the arrival time its reservation moved the schedule to). The latest slot
-- moves the schedule back by one interval, and so does each slot given back before it that
-- is the latest now; an earlier slot waits in KEYS[2] until it is.
local interval, slot = tonumber(ARGV[1]), ARGV[2]
local tat = redis.call('GET', KEYS[1])
if tat ~= slot then
  redis.call('ZADD', KEYS[2], tonumber(slot), slot)
  redis.call('PEXPIRE', KEYS[2], 120000)
  return 0
end
local back = 0
while tat do
  local earlier = string.format('%.3f', tonumber(tat) - interval)
  redis.call('SET', KEYS[1], earlier, 'KEEPTTL')
  back = back + 1
  if redis.call('ZREM', KEYS[2], earlier) == 0 then break end
  tat = earlier
end
return back
