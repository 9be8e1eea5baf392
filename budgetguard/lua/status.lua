-- Read windows after sweeping expired leases: the user's part, the org's, or both.
--
-- KEYS: the lease set of each part given (user, org), then the window counters of those
-- parts in order (user hour, day, month; org day, month), as in reserve.lua
-- ARGV[1] now ms   ARGV[2] user prefix   ARGV[3] org prefix   ARGV[4] parts: "uo", "u" or "o"
-- Returns {spent..., reserved...} as strings, for the windows given.

local now = tonumber(ARGV[1])
local with_user = string.find(ARGV[4], 'u', 1, true) ~= nil
local with_org = string.find(ARGV[4], 'o', 1, true) ~= nil
local k = 1
if with_user then sweep(KEYS[k], ARGV[2], now); k = k + 1 end
if with_org then sweep(KEYS[k], ARGV[3], now); k = k + 1 end
local spent, reserved = {}, {}
for i = k, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 's', 'r')
  spent[#spent + 1] = v[1] or '0'
  reserved[#reserved + 1] = v[2] or '0'
end
for _, r in ipairs(reserved) do spent[#spent + 1] = r end
return spent
