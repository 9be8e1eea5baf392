-- Change one budget value's runtime state (see budgetguard.runtime) in one atomic step.
--
-- KEYS[1] the value's runtime state   KEYS[2] (reset) the counters of the window to reset
local now = tonumber(ARGV[1])
local op = ARGV[2]  -- "assign" | "override" | "grant" | "topup" | "reset" | "show"
local version = ARGV[3]  -- this change's id, the state's version after it
-- ARGV[4..] the operation's arguments:
--   assign <plan, '' to remove the assignment>
--   override <field> <value, '' to remove the override> ...
--   grant <id> <"field|amount|until ms"> <the most live grants a value may hold>
--   topup <nano-USD>
--   reset, show: none
-- Every change but a reset sets the state's version to its id, so that each process's next
-- check of the value finds its assumption stale and plans again (see stale() in common.lua);
-- a random id, not a counter, so that a state Redis lost and rebuilt never repeats an old
-- version. A resend of a change (its reply was lost) finds its own id and changes nothing.
-- Grants that have ended are dropped on every change.
--
-- Returns {n, the state's fields before (n of them)..., its fields after...},
-- or {-1} when a grant would exceed the most live grants allowed.

local cfg = KEYS[1]
local before = redis.call('HGETALL', cfg)
if op == 'show' or (op ~= 'reset' and redis.call('HGET', cfg, 'v') == version) then
  local out = {#before}
  for _, x in ipairs(before) do out[#out + 1] = x end
  for _, x in ipairs(before) do out[#out + 1] = x end
  return out
end

local live = 0
for i = 1, #before, 2 do
  if string.sub(before[i], 1, 2) == 'g:' then
    if tonumber(split(before[i + 1], '|')[3]) <= now then
      redis.call('HDEL', cfg, before[i])
    else
      live = live + 1
    end
  end
end

local bump = true
if op == 'assign' then
  if ARGV[4] == '' then redis.call('HDEL', cfg, 'plan') else redis.call('HSET', cfg, 'plan', ARGV[4]) end
elseif op == 'override' then
  for i = 4, #ARGV, 2 do
    if ARGV[i + 1] == '' then
      redis.call('HDEL', cfg, 'o:' .. ARGV[i])
    else
      redis.call('HSET', cfg, 'o:' .. ARGV[i], ARGV[i + 1])
    end
  end
elseif op == 'grant' then
  if live >= tonumber(ARGV[6]) then return {-1} end
  redis.call('HSET', cfg, 'g:' .. ARGV[4], ARGV[5])
elseif op == 'topup' then
  redis.call('HINCRBY', cfg, 'topup', ARGV[4])
elseif op == 'reset' then
  -- Spend and alert markers go; what calls in flight hold stays held.
  local fields = {'s', 'b'}
  for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do
    if string.sub(f, 1, 2) == 'a:' then fields[#fields + 1] = f end
  end
  redis.call('HDEL', KEYS[2], unpack(fields))
  bump = false
end
if bump then redis.call('HSET', cfg, 'v', version) end

local after = redis.call('HGETALL', cfg)
local out = {#before}
for _, x in ipairs(before) do out[#out + 1] = x end
for _, x in ipairs(after) do out[#out + 1] = x end
return out
