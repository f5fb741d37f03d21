-- ARGV: prefix, member, instance, generation. Deletes the lease if it is still ours.
local key = p .. 'lease:' .. ARGV[3]
if redis.call('GET', key) == ARGV[2] .. '|' .. ARGV[4] then
  redis.call('DEL', key)
  redis.call('SET', p .. 'seen:' .. ARGV[3], now .. '|released', 'PX', 86400000)
  return 1
end
return 0
