-- Renew a live reservation's lease: an answer still in flight keeps what it reserved.
--
-- A lease that lapsed mid-answer would hand its headroom to new requests while the answer
-- goes on spending it. Renewing moves the lease's deadline (and the request state's) on;
-- a reservation already settled, given back or lapsed is left alone.
-- Like reserve.lua it takes every part or one (one per hash slot).
--
-- KEYS[1] request state; then the lease set of each part given
local now, deadline, state_ttl = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local members = split(ARGV[4], ';')  -- each part's lease member
--
-- Returns 1 when renewed, 0 when there was no live reservation to renew.

local state = redis.call('GET', KEYS[1])
if not state or string.sub(state, 1, 1) ~= 'L' then return 0 end
local f = split(state, '|')
if tonumber(f[5]) <= now then return 0 end  -- lapsed: its headroom may be someone else's by now

local renewed = 0
for i, member in ipairs(members) do
  local leases = KEYS[i + 1]
  local score = redis.call('ZSCORE', leases, member)
  if score and tonumber(score) > now then
    redis.call('ZADD', leases, 'XX', deadline, member)
    renewed = 1
  end
end
if renewed == 1 then
  f[5] = deadline
  redis.call('SET', KEYS[1], table.concat(f, '|'), 'PX', state_ttl)
end
return renewed
