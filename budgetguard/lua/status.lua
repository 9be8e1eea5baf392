-- Read windows after sweeping expired leases: every part given, or one.
--
-- KEYS: per part, its lease set, its runtime state, then its windows' counters (as in reserve.lua)
-- ARGV[1] now ms   ARGV[2] the number of parts
-- ARGV[3..] the parts, 3 fields each: prefix, number of windows, runtime version assumed;
--           then each window's key suffix
-- Returns {1, spent..., reserved...} as strings, for the windows given, or, when a part's
-- runtime state is not the version assumed, {4, ...} as reserve.lua.

local now = tonumber(ARGV[1])
local parts, wins = layout(3, tonumber(ARGV[2]), 3, 1, 1, true)
local changed = stale(parts, 3)
if changed then return changed end
for _, p in ipairs(parts) do sweep(p.leases, p.prefix, now) end
local spent, reserved = {1}, {}
for _, win in ipairs(wins) do
  local v = redis.call('HMGET', win.key, 's', 'r')
  spent[#spent + 1] = v[1] or '0'
  reserved[#reserved + 1] = v[2] or '0'
end
for _, r in ipairs(reserved) do spent[#spent + 1] = r end
return spent
