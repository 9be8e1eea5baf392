-- Settle a reservation: give the lease back and, for a record, charge the actual cost.
-- Applies once per reservation id; a retry (or a second record/release) changes nothing.
--
-- KEYS[1] request state   KEYS[2] user leases   KEYS[3] org leases
-- KEYS[4..8] window counters to charge: user hour, day, month; org day, month
-- ARGV[1] now ms   ARGV[2] request-state ttl ms   ARGV[3] user prefix   ARGV[4] org prefix
-- ARGV[5] user lease member   ARGV[6] org lease member
-- ARGV[7] cost in nano-USD, or '' for a release   ARGV[8..12] key ttl ms per window
-- ARGV[13] the settled state to store, "S|<candidate>|<cost or released>"
--
-- Returns {1, lease_was_live} when applied, {0, state} when it was already settled.

local now = tonumber(ARGV[1])
sweep(KEYS[2], ARGV[3], now)
sweep(KEYS[3], ARGV[4], now)

local prior = redis.call('GET', KEYS[1])
if prior and string.sub(prior, 1, 1) == 'S' then return {0, prior} end

local live = redis.call('ZREM', KEYS[2], ARGV[5])
if live == 1 then unreserve(ARGV[3], ARGV[5]) end
if redis.call('ZREM', KEYS[3], ARGV[6]) == 1 then unreserve(ARGV[4], ARGV[6]) end

local cost = ARGV[7]
if cost ~= '' then
  for w = 1, 5 do
    redis.call('HINCRBY', KEYS[3 + w], 's', cost)
    redis.call('PEXPIRE', KEYS[3 + w], ARGV[7 + w])
  end
end
redis.call('SET', KEYS[1], ARGV[13], 'PX', ARGV[2])
return {1, live}
