-- Shared by every budgetguard script (prepended when the scripts load).
-- Money values stay strings on their way to HINCRBY: Lua numbers are doubles and
-- tostring() would print large ones in exponent form, which Redis rejects.

local function split(s, sep)
  local out = {}
  for part in string.gmatch(s, '[^' .. sep .. ']+') do out[#out + 1] = part end
  return out
end

-- A lease member is "rid|amount|<window suffix>|...": give its amount back to each
-- window it was taken on (windows whose key already expired are skipped).
local function unreserve(prefix, member)
  local f = split(member, '|')
  if f[2] == '0' then return end
  for i = 3, #f do
    local key = prefix .. f[i]
    if redis.call('EXISTS', key) == 1 then
      redis.call('HINCRBY', key, 'r', '-' .. f[2])
    end
  end
end

-- Lazy expiry: leases whose deadline passed stop counting. Bounded per call so that
-- one script never runs long; the next call continues.
local function sweep(leases, prefix, now)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 128)
  if #expired == 0 then return end
  for _, member in ipairs(expired) do unreserve(prefix, member) end
  redis.call('ZREM', leases, unpack(expired))
end
