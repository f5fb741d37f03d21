-- The record operations, applied in order in one call: KEYS[1] is the expiry index, KEYS[i+1]
-- the record of the i-th operation, and ARGV holds nine values per operation: its name, the
-- fingerprint, the claim, two operation-specific values, the id, the generation of the
-- claim's instance lease, when the id was first seen, and what a delete did (a mark's). Each
-- operation answers with a list of strings.
local index = KEYS[1]

-- A fresh record of this request, claimed by `claim` under generation `gen` of its
-- instance's lease, where there is none (or only an expired one, which the caller deletes
-- first). `seen` is when the id was first seen: now for a new id, the claim's own for a
-- record written again.
local function create(key, fp, claim, lease_ms, keep_ms, id, gen, seen)
  if tonumber(seen or '0') == 0 then seen = now end
  redis.call('HSET', key, 'fp', fp, 'lease_owner', claim, 'lease_until', now + lease_ms,
    'chat_deleted', '0', 'expires', now + keep_ms, 'gen', gen, 'seen', seen)
  redis.call('ZADD', index, now + keep_ms, id)
  return seen
end

-- A claim taken under an older generation of the instance's lease (the fingerprint names the
-- instance) was its previous owner's, whose every effect its fence refuses now. Generation 0
-- is no ownership: such a claim ends only with its own lease.
local function outlived(held, gen)
  held = tonumber(held or '0')
  return held > 0 and held < tonumber(gen)
end

local op = {}

function op.begin(key, fp, claim, lease_ms, keep_ms, id, gen)
  lease_ms, keep_ms = tonumber(lease_ms), tonumber(keep_ms)
  local r = redis.call('HMGET', key, 'fp', 'result', 'lease_owner', 'lease_until', 'chat_deleted',
    'expires', 'gen', 'seen', 'deletion')
  if not r[1] or (r[6] and tonumber(r[6]) <= now) then
    if r[1] then redis.call('DEL', key) end
    local seen = create(key, fp, claim, lease_ms, keep_ms, id, gen, '0')
    return {'claimed', '0', tostring(seen), ''}
  end
  if r[1] ~= fp then return {'conflict'} end
  if r[2] then return {'replay', r[2]} end
  -- A live claim of another asker waits; the asker's own (its earlier answer was lost) is its.
  if r[3] and r[3] ~= claim and tonumber(r[4]) > now and not outlived(r[7], gen) then
    return {'busy'}
  end
  local seen = r[8]
  if not seen then
    seen = tostring(now)
    redis.call('HSET', key, 'seen', seen)
  end
  redis.call('HSET', key, 'lease_owner', claim, 'lease_until', now + lease_ms, 'gen', gen)
  if not r[6] then
    -- A record of an earlier version, kept alive by a TTL: give it an expiry of ours.
    redis.call('HSET', key, 'expires', now + keep_ms)
    redis.call('ZADD', index, now + keep_ms, id)
    redis.call('PERSIST', key)
  end
  return {'claimed', r[5] or '0', seen, r[9] or ''}
end

-- '1' when the claim is (again) ours.
function op.renew(key, fp, claim, lease_ms, keep_ms, id, gen, seen)
  lease_ms, keep_ms = tonumber(lease_ms), tonumber(keep_ms)
  local r = redis.call('HMGET', key, 'fp', 'lease_owner', 'result')
  if not r[1] then
    -- The record vanished (lost, or an earlier version's TTL ran out): nobody else holds it.
    create(key, fp, claim, lease_ms, keep_ms, id, gen, seen)
    return {'1'}
  end
  if r[1] ~= fp or r[3] or r[2] ~= claim then return {'0'} end
  redis.call('HSET', key, 'lease_until', now + lease_ms)
  local ttl = redis.call('PTTL', key)
  if ttl >= 0 and ttl < lease_ms then redis.call('PEXPIRE', key, lease_ms) end
  return {'1'}
end

function op.mark(key, fp, claim, lease_ms, keep_ms, id, gen, seen, deletion)
  local current = redis.call('HGET', key, 'fp')
  if current and current ~= fp then return {'superseded'} end
  if not current then
    create(key, fp, claim, tonumber(lease_ms), tonumber(keep_ms), id, gen, seen)
  end
  redis.call('HSET', key, 'chat_deleted', '1', 'deletion', deletion)
  return {'ok'}
end

-- The lease fields stay: once there is a result nothing reads them. The record is kept for the
-- keep time from its claim; only an answer that came later than a hundredth of it moves the
-- expiry (and its place in the index), so a quick answer costs no index update.
function op.remember(key, fp, claim, result, keep_ms, id)
  keep_ms = tonumber(keep_ms)
  local r = redis.call('HMGET', key, 'fp', 'result', 'expires')
  if r[1] and r[1] ~= fp then return {'superseded'} end
  if r[2] then return {'kept', r[2]} end
  local expires = tonumber(r[3])
  if not expires or now + keep_ms - expires > keep_ms / 100 then
    expires = now + keep_ms
    redis.call('ZADD', index, expires, id)
  end
  redis.call('HSET', key, 'fp', fp, 'result', result, 'expires', expires)
  -- A record of an earlier version, kept alive by a TTL, is ours to time now.
  if r[1] and not r[3] then redis.call('PERSIST', key) end
  return {'stored'}
end

function op.release(key, fp, claim)
  if redis.call('HGET', key, 'lease_owner') == claim then
    redis.call('HDEL', key, 'lease_owner', 'lease_until')
  end
  return {'ok'}
end

-- Each operation fails alone (a full Redis refusing its write), so no operation is told
-- another's error after its own effect happened.
local answers = {}
for i = 2, #KEYS do
  local a = (i - 2) * 9
  local ok, answer = pcall(op[ARGV[a + 1]], KEYS[i], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
    ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], ARGV[a + 8], ARGV[a + 9])
  if not ok then
    if type(answer) == 'table' then answer = answer.err end
    answer = {'error', tostring(answer)}
  end
  answers[i - 1] = answer
end
return answers
