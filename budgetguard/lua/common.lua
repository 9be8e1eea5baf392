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

-- The keys of the parts a script was called with ("uo", "u" or "o"), from KEYS[first]:
-- the lease set of each part, then the window counters of those parts in order (user
-- hour, day, month; org day, month). Returns a table: user/org (whether present), their
-- lease sets, windows (their numbers 1-5), key (per window number) and next (index of the
-- first key after them).
local function part_keys(parts, first)
  local p = {user = string.find(parts, 'u', 1, true) ~= nil, org = string.find(parts, 'o', 1, true) ~= nil,
             windows = {}, key = {}}
  local k = first
  if p.user then p.user_leases = KEYS[k]; k = k + 1 end
  if p.org then p.org_leases = KEYS[k]; k = k + 1 end
  if p.user then for w = 1, 3 do p.windows[#p.windows + 1] = w end end
  if p.org then for w = 4, 5 do p.windows[#p.windows + 1] = w end end
  for _, w in ipairs(p.windows) do p.key[w] = KEYS[k]; k = k + 1 end
  p.next = k
  return p
end

-- Add a settled cost to the org's spend rankings: each entry {zset, member ('' none), ttl ms}.
local function rank(cost, entries)
  for _, e in ipairs(entries) do
    if e[2] ~= '' and tonumber(redis.call('ZINCRBY', e[1], cost, e[2])) == tonumber(cost) then
      redis.call('PEXPIRE', e[1], math.max(1000, e[3]))
    end
  end
end
