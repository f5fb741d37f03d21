-- ARGV: prefix, member, capacity (0: not taking part), lease ms, held count, then (instance,
-- generation) per held lease, then every instance the member knows. Refreshes the member and
-- the instances it knows, drops expired members, renews the held leases still ours, and
-- answers (renewed flags, live members, capacities, lease holders, per instance whether every
-- live member knows it, whether the member just (re)joined).
local me, lease, held = ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5])
local first = 6 + 2 * held
local joined = 0
if ARGV[3] == '0' then
  redis.call('ZREM', p .. 'members', me)
  redis.call('HDEL', p .. 'capacity', me)
  redis.call('DEL', p .. 'knows:' .. me)
else
  -- Not a live member before: new, or an entry that outlived its lease (Redis came back from
  -- an outage with its data, or the worker was paused).
  local before = redis.call('ZSCORE', p .. 'members', me)
  if not before or tonumber(before) <= now then joined = 1 end
  redis.call('ZADD', p .. 'members', now + lease, me)
  redis.call('HSET', p .. 'capacity', me, ARGV[3])
  local knows = p .. 'knows:' .. me
  if joined == 1 or redis.call('SCARD', knows) ~= #ARGV - first + 1 then
    redis.call('DEL', knows)
    for i = first, #ARGV, 1000 do
      redis.call('SADD', knows, unpack(ARGV, i, math.min(i + 999, #ARGV)))
    end
  end
  redis.call('PEXPIRE', knows, lease)
end
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', p .. 'members', '-inf', now)) do
  redis.call('ZREM', p .. 'members', gone)
  redis.call('HDEL', p .. 'capacity', gone)
  redis.call('DEL', p .. 'knows:' .. gone)
end
local renewed = {}
for i = 1, held do
  local instance, generation = ARGV[4 + 2 * i], ARGV[5 + 2 * i]
  local key = p .. 'lease:' .. instance
  if redis.call('GET', key) == me .. '|' .. generation then
    redis.call('PEXPIRE', key, lease)
    redis.call('SET', p .. 'seen:' .. instance, now .. '|expired', 'PX', 86400000)
    renewed[i] = 1
  else
    renewed[i] = 0
  end
end
local members = redis.call('ZRANGE', p .. 'members', 0, -1)
local capacities = {}
if #members > 0 then capacities = redis.call('HMGET', p .. 'capacity', unpack(members)) end
-- What every live member knows (a member of an earlier version, without its list, is taken
-- to know everything).
local lists = {}
for _, member in ipairs(members) do
  local knows = p .. 'knows:' .. member
  if redis.call('EXISTS', knows) == 1 then lists[#lists + 1] = knows end
end
local shared = nil
if #lists > 0 then
  shared = {}
  for _, instance in ipairs(redis.call('SINTER', unpack(lists))) do shared[instance] = true end
end
local holders, everyone = {}, {}
for i = first, #ARGV do
  holders[#holders + 1] = redis.call('GET', p .. 'lease:' .. ARGV[i]) or ''
  everyone[#everyone + 1] = (shared == nil or shared[ARGV[i]]) and 1 or 0
end
return {renewed, members, capacities, holders, everyone, joined}
