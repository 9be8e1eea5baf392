-- Read a user's and the org's windows after sweeping expired leases.
--
-- KEYS[1] user leases   KEYS[2] org leases   KEYS[3..7] window counters (as in reserve.lua)
-- ARGV[1] now ms   ARGV[2] user prefix   ARGV[3] org prefix
-- Returns {spent..., reserved...} as strings.

local now = tonumber(ARGV[1])
sweep(KEYS[1], ARGV[2], now)
sweep(KEYS[2], ARGV[3], now)
local spent, reserved = {}, {}
for w = 1, 5 do
  local v = redis.call('HMGET', KEYS[2 + w], 's', 'r')
  spent[w] = v[1] or '0'
  reserved[w] = v[2] or '0'
end
for w = 1, 5 do spent[#spent + 1] = reserved[w] end
return spent
