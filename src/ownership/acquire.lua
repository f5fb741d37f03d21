-- ARGV: prefix, member, lease ms, then instances. Takes each free lease with the next
-- generation; answers (generation or 0, ms since the previous holder last renewed or -1,
-- 1 if it released the lease, 0 if the lease expired) per instance.
local me, lease = ARGV[2], tonumber(ARGV[3])
local out = {}
for i = 4, #ARGV do
  local instance = ARGV[i]
  local key = p .. 'lease:' .. instance
  if redis.call('EXISTS', key) == 1 then
    out[#out + 1] = 0; out[#out + 1] = -1; out[#out + 1] = 0
  else
    local generation = redis.call('INCR', p .. 'generation:' .. instance)
    redis.call('SET', key, me .. '|' .. generation, 'PX', lease)
    local seen = redis.call('GET', p .. 'seen:' .. instance)
    redis.call('SET', p .. 'seen:' .. instance, now .. '|expired', 'PX', 86400000)
    local gap, released = -1, 0
    if seen then
      local at, how = string.match(seen, '^(%d+)|(%a+)$')
      gap = now - tonumber(at)
      if how == 'released' then released = 1 end
    end
    out[#out + 1] = generation; out[#out + 1] = gap; out[#out + 1] = released
  end
end
return out
