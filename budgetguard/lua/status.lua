-- Read windows after sweeping expired leases: every part given, or one.
--
-- KEYS: per part, its lease set, its runtime state, then its windows' counters (as in reserve.lua)
-- ARGV[1] now ms   ARGV[2] parts "prefix,windows,runtime version assumed" joined by ';'
-- ARGV[3] one ';'-joined entry per window
-- Returns {1, spent..., reserved...} as strings, for the windows given, or, when a part's
-- runtime state is not the version assumed, {4, ...} as reserve.lua.

local now = tonumber(ARGV[1])
local parts, wins = layout(ARGV[2], ARGV[3], 1, true)
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
