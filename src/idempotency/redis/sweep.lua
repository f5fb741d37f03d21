-- KEYS[1]: the index; ARGV: key prefix, most records to look at. Deletes expired records.
local index, prefix, limit = KEYS[1], ARGV[1], tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(due) do
  local key = prefix .. id
  local expires = redis.call('HGET', key, 'expires')
  if not expires or tonumber(expires) <= now then redis.call('DEL', key) end
  redis.call('ZREM', index, id)
end
return #due
