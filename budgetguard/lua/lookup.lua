-- Background reads and writes of the alert dispatcher (never on a request's path).
--
-- ARGV[1] the operation:
--   "top"    KEYS: rankings (zsets)     -> per key, its 5 highest members and scores
--   "hours"  KEYS: day spend histories  ARGV[2] hour field -> per key {exists, spend or false}
--   "days"   KEYS: day spend histories  -> per key, its hour fields and spend (HGETALL)
--   "claim"  KEYS[1] a window counter   ARGV[2] marker field -> 1 if this call claimed it
--   "spike"  KEYS[1] a day spend history  ARGV[2] hour field, ARGV[3] threshold
--            -> the hour's spend if it reached the threshold and this call claimed its anomaly, else 0
--   "log"    KEYS[1] the event stream   ARGV[2] max length, ARGV[3..] events -> count

local op = ARGV[1]
local out = {}
if op == 'top' then
  for i, key in ipairs(KEYS) do out[i] = redis.call('ZREVRANGE', key, 0, 4, 'WITHSCORES') end
elseif op == 'hours' then
  for i, key in ipairs(KEYS) do out[i] = {redis.call('EXISTS', key), redis.call('HGET', key, ARGV[2])} end
elseif op == 'days' then
  for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
elseif op == 'claim' then
  if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
  return redis.call('HSETNX', KEYS[1], ARGV[2], '1')
elseif op == 'spike' then
  local spent = tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0')
  if spent >= tonumber(ARGV[3]) and redis.call('HSETNX', KEYS[1], 'a:' .. ARGV[2], '1') == 1 then
    return redis.call('HGET', KEYS[1], ARGV[2])
  end
  return 0
elseif op == 'log' then
  for i = 3, #ARGV do redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[i]) end
  return #ARGV - 2
end
return out
