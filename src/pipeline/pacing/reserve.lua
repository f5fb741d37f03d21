-- KEYS[1]: the token's key; ARGV: ms between slots, the tolerance (ms of slots a quiet token
-- may use at once). Reserves the next slot and returns how many ms until it is due, and the
-- arrival time it moved the schedule to (which names the slot when it is given back).
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now)
local due = tat + interval - burst
local wait = math.max(0, due - now)
local after = tat + interval
redis.call('SET', KEYS[1], string.format('%.3f', after), 'PX', math.ceil(after - now) + 1000)
return {math.ceil(wait), string.format('%.3f', after)}
