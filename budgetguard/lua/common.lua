-- Shared by every budgetguard script (prepended when the scripts load).
-- Money values stay strings on their way to HINCRBY: Lua numbers are doubles and
-- tostring() would print large ones in exponent form, which Redis rejects.

local function split(s, sep)
  local out = {}
  for part in string.gmatch(s, '[^' .. sep .. ']+') do out[#out + 1] = part end
  return out
end

-- A lease member is "rid|amount|<window suffix>|...": give its amount back to each window
-- it was taken on (windows whose key already expired are skipped). A count window's
-- suffix carries its own amount: "q:202612020301=1", "k:202612020301=4608", "c=1".
local function unreserve(prefix, member)
  local f = split(member, '|')
  for i = 3, #f do
    local suffix, amount = f[i], f[2]
    local eq = string.find(suffix, '=', 1, true)
    if eq then suffix, amount = string.sub(suffix, 1, eq - 1), string.sub(suffix, eq + 1) end
    if amount ~= '0' then
      local key = prefix .. suffix
      if redis.call('EXISTS', key) == 1 then redis.call('HINCRBY', key, 'r', '-' .. amount) end
    end
  end
end

-- Lazy expiry: leases whose deadline passed stop counting. Bounded per call so that
-- one script never runs long; the next call continues. Returns how many it gave back.
local function sweep(leases, prefix, now)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 128)
  if #expired == 0 then return 0 end
  for _, member in ipairs(expired) do unreserve(prefix, member) end
  redis.call('ZREM', leases, unpack(expired))
  return #expired
end

-- The parts a script was called with, and their windows. From ARGV[at]: `n` parts of `pf`
-- fields each (prefix, number of windows, ...), then their windows, `wf` fields each (the
-- first the window's key suffix). From KEYS[first]: per part its lease set, its runtime state
-- (with `with_cfg`, see budgetguard.runtime), then its windows' counters. Flat arguments, not
-- packed strings: a script reads them by index instead of splitting text on every call.
-- Returns the parts ({prefix, leases, cfg, first, last, f = fields}), the windows ({key,
-- part, f = fields}), the index of the first key and of the first argument after them.
local function layout(at, n, pf, wf, first, with_cfg)
  local ps, ws = {}, {}
  local k, w = first, 0
  local wa = at + n * pf
  for i = 1, n do
    local a = at + (i - 1) * pf
    local f = {}
    for j = 1, pf do f[j] = ARGV[a + j - 1] end
    local p = {prefix = f[1], f = f, leases = KEYS[k], first = w + 1, last = w + tonumber(f[2])}
    k = k + 1
    if with_cfg then p.cfg = KEYS[k]; k = k + 1 end
    for x = p.first, p.last do
      local g = {}
      for j = 1, wf do g[j] = ARGV[wa + j - 1] end
      wa = wa + wf
      ws[x] = {f = g, key = KEYS[k], part = p}
      k = k + 1
    end
    w = p.last
    ps[i] = p
  end
  return ps, ws, k, wa
end

-- The parts whose runtime state (budgetguard.runtime, at cfg_keys[i]) is not the version the
-- caller assumed (versions[i]): {4, part, field count, fields..., part, ...}, or nil when
-- every part is as assumed. The caller plans again on the state returned. stale() takes the
-- parts of layout(), each with its version at field `version`.
local function stale_of(cfg_keys, versions)
  local out = nil
  for i, cfg in ipairs(cfg_keys) do
    local v = redis.call('HGET', cfg, 'v') or '0'
    if v ~= versions[i] then
      out = out or {4}
      local state = redis.call('HGETALL', cfg)
      out[#out + 1] = i
      out[#out + 1] = #state
      for _, x in ipairs(state) do out[#out + 1] = x end
    end
  end
  return out
end

local function stale(parts, version)
  local keys, versions = {}, {}
  for i, p in ipairs(parts) do keys[i], versions[i] = p.cfg, p.f[version] end
  return stale_of(keys, versions)
end

-- Whether two bit masks (small non-negative integers) share a bit. Plain arithmetic: not
-- every Lua a script runs on (fakeredis' for one) has the bit library.
local function shares_bit(a, b)
  while a > 0 and b > 0 do
    if a % 2 == 1 and b % 2 == 1 then return true end
    a, b = math.floor(a / 2), math.floor(b / 2)
  end
  return false
end

-- Add a settled cost to the org's spend rankings: each entry {zset, member ('' none), ttl ms}.
local function rank(cost, entries)
  for _, e in ipairs(entries) do
    if e[2] ~= '' and tonumber(redis.call('ZINCRBY', e[1], cost, e[2])) == tonumber(cost) then
      redis.call('PEXPIRE', e[1], math.max(1000, e[3]))
    end
  end
end
