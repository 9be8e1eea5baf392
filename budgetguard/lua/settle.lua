-- Settle a reservation: give the lease back and, for a record, charge the actual cost.
-- Applies once per reservation id; a retry (or a second record/release) changes nothing.
--
-- KEYS[1] request state   KEYS[2] user leases   KEYS[3] org leases
-- KEYS[4..8] window counters to charge: user hour, day, month; org day, month
-- ARGV[1] now ms   ARGV[2] request-state ttl ms   ARGV[3] key grace ms
-- ARGV[4] user prefix   ARGV[5] org prefix   ARGV[6] user lease member   ARGV[7] org lease member
-- ARGV[8] cost in nano-USD, or '' for a release
-- ARGV[9] end ms of each charged window, joined by ','
-- ARGV[10] the settled state to store, "S|<candidate>|<cost or released>|<nonce>"
--
-- Returns {1, lease_was_live} when applied, {0, state} when it was already settled.

local now = tonumber(ARGV[1])
sweep(KEYS[2], ARGV[4], now)
sweep(KEYS[3], ARGV[5], now)

local prior = redis.call('GET', KEYS[1])
if prior and string.sub(prior, 1, 1) == 'S' then return {0, prior} end

local live = redis.call('ZREM', KEYS[2], ARGV[6])
if live == 1 then unreserve(ARGV[4], ARGV[6]) end
if redis.call('ZREM', KEYS[3], ARGV[7]) == 1 then unreserve(ARGV[5], ARGV[7]) end

local cost = ARGV[8]
if cost ~= '' then
  local ends = split(ARGV[9], ',')
  local grace = tonumber(ARGV[3])
  for w = 1, 5 do
    redis.call('HINCRBY', KEYS[3 + w], 's', cost)
    redis.call('PEXPIRE', KEYS[3 + w], math.max(1000, tonumber(ends[w]) + grace - now))
  end
end
redis.call('SET', KEYS[1], ARGV[10], 'PX', ARGV[2])
return {1, live}
