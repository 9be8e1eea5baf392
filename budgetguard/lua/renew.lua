-- Renew a live reservation's lease: an answer still in flight keeps what it reserved.
--
-- A lease that lapsed mid-answer would hand its headroom to new requests while the answer
-- goes on spending it. Renewing moves the lease's deadline (and the request state's) on;
-- a reservation already settled, given back or lapsed is left alone.
-- Like reserve.lua it takes the user's part, the org's part, or both (one per hash slot).
--
-- KEYS[1] request state; then the lease set of each part given (user, org)
-- ARGV[1] now ms   ARGV[2] the new deadline ms   ARGV[3] request-state ttl ms
-- ARGV[4] user lease member   ARGV[5] org lease member   ARGV[6] the parts: "uo", "u" or "o"
--
-- Returns 1 when renewed, 0 when there was no live reservation to renew.

local now, deadline, state_ttl = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local user_member, org_member, parts = ARGV[4], ARGV[5], ARGV[6]
local with_user = string.find(parts, 'u', 1, true) ~= nil
local with_org = string.find(parts, 'o', 1, true) ~= nil

local state = redis.call('GET', KEYS[1])
if not state or string.sub(state, 1, 1) ~= 'L' then return 0 end
local f = split(state, '|')
if tonumber(f[5]) <= now then return 0 end  -- lapsed: its headroom may be someone else's by now

-- Moves one part's lease on if it is still live there; whether it did.
local function renew(leases, member)
  local score = redis.call('ZSCORE', leases, member)
  if not score or tonumber(score) <= now then return false end
  redis.call('ZADD', leases, 'XX', deadline, member)
  return true
end

local k = 2
local renewed = 0
if with_user then
  if renew(KEYS[k], user_member) then renewed = 1 end
  k = k + 1
end
if with_org and renew(KEYS[k], org_member) then renewed = 1 end
if renewed == 1 then
  f[5] = deadline
  redis.call('SET', KEYS[1], table.concat(f, '|'), 'PX', state_ttl)
end
return renewed
