-- Reserve one request's worst case on every window of every part given, or on none.
--
-- A part is one budget value's windows (the user's, a tenant's, the org's...): one hash
-- slot. On a single Redis one call takes every part; on a Redis Cluster the guard runs the
-- parts one by one, from the most specific to the org, and gives the earlier ones back if
-- a later one denies.
--
-- KEYS[1] request state   KEYS[2] this attempt's void marker (see settle.lua)
-- then per part: its lease set, its runtime state (budgetguard.runtime), then its windows'
-- counters (in the order of the windows below);
-- then, when a part is the org's, the org's open "blocked" alerts (field: period, value: suffix)
local now = tonumber(ARGV[1])
local deadline = ARGV[2]          -- lease deadline ms
local state_ttl = ARGV[3]         -- request-state ttl ms
local grace = tonumber(ARGV[4])   -- a window's counters outlive its end by this much (ms)
local rid = ARGV[5]
local attempt = ARGV[6]           -- this attempt's id (a check whose caller gave up can be voided by it)
local probe = ARGV[7] == '1'      -- only report the blocking windows and claim their first-denial alerts
local routed = tonumber(ARGV[8])  -- route bits of the parts an earlier call found past their thresholds
local n_cand, n_parts = tonumber(ARGV[9]), tonumber(ARGV[10])
-- ARGV[11..] the candidates, 3 fields each: amount, tokens, route bits (amount -1: not offered
--            to these parts); then the parts, 5 each: prefix, number of windows, route bit,
--            org (1/0), runtime version assumed; then the windows, 6 each: suffix, kind, cap,
--            trigger, end ms, alert (1/0). Kind "m" money (nano-USD), "q" requests, "k"
--            tokens, "c" calls in flight; cap/trigger -1: none; end 0: never ends (a balance)
--
-- Returns {1, chosen, blockers, triggered, spent..., reserved..., notice...} when reserved,
--         {0, 0, blockers of the cheapest candidate, triggered, spent..., reserved..., notice...}
--         when denied, {2, state} when the request id holds a live reservation (a retry); the
--         state is "L|<candidate>|<amount>|<reserved at ms>|<deadline ms>|<attempt>|<held>",
--         <held> each part's "<prefix>><lease member>" joined by ';',
--         {3} when this attempt was voided before it ran (its caller had given up on it),
--         {4, part, n, fields...} when a part's runtime state is not the version assumed
--         (see stale() in common.lua): nothing was reserved; plan again on that state.
-- Blockers and triggered are window numbers (1-based, in the order given) joined by ','.
-- Notices: "b|<window>" the window's first denial, "r|<window>|<suffix>" an org window
-- blocked earlier whose successor has now opened.

-- Flat arrays, not a table per window: this script runs on every check, and building
-- tables is most of what it costs beyond its Redis commands.
local pa = 11 + 3 * n_cand   -- the first part's fields
local wa = pa + 5 * n_parts  -- the first window's fields
local n_win = (#ARGV - wa + 1) / 6
local p_prefix, p_leases, p_cfg, p_version, p_bit, p_org, p_first, p_last = {}, {}, {}, {}, {}, {}, {}, {}
local w_key, w_part, w_suffix, w_kind, w_cap, w_trigger, w_end, w_alert = {}, {}, {}, {}, {}, {}, {}, {}
local k, w = 3, 0
for i = 1, n_parts do
  local a = pa + 5 * (i - 1)
  p_prefix[i], p_bit[i], p_org[i], p_version[i] = ARGV[a], tonumber(ARGV[a + 2]), ARGV[a + 3] == '1', ARGV[a + 4]
  p_leases[i], p_cfg[i] = KEYS[k], KEYS[k + 1]
  k = k + 2
  p_first[i] = w + 1
  for x = w + 1, w + tonumber(ARGV[a + 1]) do
    local f = wa + 6 * (x - 1)
    w_key[x], w_part[x] = KEYS[k], i
    w_suffix[x], w_kind[x], w_cap[x] = ARGV[f], ARGV[f + 1], tonumber(ARGV[f + 2])
    w_trigger[x], w_end[x], w_alert[x] = tonumber(ARGV[f + 3]), tonumber(ARGV[f + 4]), ARGV[f + 5] == '1'
    k = k + 1
    w = x
  end
  p_last[i] = w
end
local blocked = KEYS[k]

local changed = stale_of(p_cfg, p_version)
if changed then return changed end

local state = redis.call('MGET', KEYS[1], KEYS[2])
-- The caller gave up on this attempt (Redis answered too late) and voided it: reserving now
-- would hold budget nobody will settle.
if state[2] then return {3} end

-- Only a live reservation is a repeat: a settled or lapsed request id reserves afresh.
local prior = state[1]
local lapsed = prior and string.sub(prior, 1, 1) == 'L' and tonumber(split(prior, '|')[5]) <= now
if prior and string.sub(prior, 1, 1) == 'L' and not lapsed then
  -- The repeat takes the live reservation over: voiding the attempt that took it (its
  -- caller gave up on the reply) must not give it back from under this one.
  local f = split(prior, '|')
  if not probe and f[6] ~= attempt then
    f[6] = attempt
    prior = table.concat(f, '|')
    redis.call('SET', KEYS[1], prior, 'KEEPTTL')
  end
  return {2, prior}
end

local c_amount, c_cost, c_tokens, c_routes = {}, {}, {}, {}
for i = 1, n_cand do
  local a = 8 + 3 * i
  c_amount[i], c_tokens[i], c_routes[i] = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  c_cost[i] = tonumber(ARGV[a])
end

-- What a candidate takes from a window: its cost, one request, its tokens, one call.
local function need(x, i)
  local kind = w_kind[x]
  if kind == 'm' then return c_cost[i] end
  if kind == 'k' then return c_tokens[i] end
  return 1
end

local raw_spent, raw_reserved, used, fresh = {}, {}, {}, {}
local triggered, routed, chosen, requested_blockers, cheapest, cheapest_blockers
local passed_over  -- a candidate tried before the chosen one was blocked

-- Read every window, then choose: routes whose threshold was reached, the requested
-- model, other routes; the first candidate every window fits.
local function decide()
  triggered, routed = {}, tonumber(ARGV[8])
  for x = 1, n_win do
    local v = redis.call('HMGET', w_key[x], 's', 'r')
    fresh[x] = not v[1] and not v[2]
    raw_spent[x], raw_reserved[x] = v[1] or '0', v[2] or '0'
    local u = tonumber(raw_spent[x]) + tonumber(raw_reserved[x])
    used[x] = u
    if w_trigger[x] >= 0 and u >= w_trigger[x] then
      triggered[#triggered + 1] = x
      local bit = p_bit[w_part[x]]  -- one bit per part
      if not shares_bit(routed, bit) then routed = routed + bit end
    end
  end
  chosen, requested_blockers, cheapest, cheapest_blockers, passed_over = 0, nil, nil, nil, false
  for pass = 1, 3 do
    for i = 1, n_cand do
      local routes = c_routes[i]
      local wanted = c_amount[i] ~= '-1' and (
        (pass == 1 and routes ~= 0 and shares_bit(routes, routed)) or (pass == 2 and routes == 0)
        or (pass == 3 and routes ~= 0 and not shares_bit(routes, routed)))
      if wanted then
        local found = nil
        for x = 1, n_win do
          if w_cap[x] >= 0 and used[x] + need(x, i) > w_cap[x] then
            found = found or {}
            found[#found + 1] = x
          end
        end
        if routes == 0 then requested_blockers = found end
        if not found then
          chosen = i
          return
        end
        passed_over = true
        if cheapest == nil or c_cost[i] < c_cost[cheapest] then cheapest, cheapest_blockers = i, found end
      end
    end
  end
end

if lapsed then
  -- This request id's own lapsed lease may still be in its set, and the new one would be
  -- the same member: give the old one back first, or the two would become one lease.
  for i = 1, n_parts do sweep(p_leases[i], p_prefix[i], now) end
end
decide()
-- Leases that lapsed still count until swept. A clean pass (the first candidate tried fits,
-- no threshold reached) cannot change by sweeping them; anything else is decided again on
-- the swept counters, so expired leases never deny, route or alert.
if chosen == 0 or passed_over or #triggered > 0 then
  local swept = 0
  for i = 1, n_parts do swept = swept + sweep(p_leases[i], p_prefix[i], now) end
  if swept > 0 then decide() end
end

local reply = {chosen > 0 and 1 or 0, chosen,
               table.concat((chosen > 0 and requested_blockers or cheapest_blockers) or {}, ','),
               table.concat(triggered, ',')}
for x = 1, n_win do
  reply[4 + x] = raw_spent[x]
  reply[4 + n_win + x] = raw_reserved[x]
end

-- A fresh window's counters live until a grace period after it ends (set once, at
-- creation); a balance never ends; the calls-in-flight counter outlives every live lease.
local function expire(x)
  local kind = w_kind[x]
  if kind == 'c' then
    return  -- with its part's lease set, below
  elseif fresh[x] and w_end[x] > 0 then
    -- A minute's counters need only outlive the leases taken in it (a minute past their
    -- deadline); the calendar windows' stay for reports a grace period after they end.
    local after = (kind == 'q' or kind == 'k') and (tonumber(deadline) - now + 60000) or grace
    redis.call('PEXPIRE', w_key[x], w_end[x] + after - now)
  end
end

-- An org window of the calendar: its first denial is kept open until the next one opens.
local function org_calendar(x)
  local period = string.sub(w_suffix[x], 1, 1)
  return p_org[w_part[x]] and (period == 'h' or period == 'd' or period == 'w' or period == 'm'), period
end

if chosen == 0 then
  -- The first denial by each blocking window is an alert; the marker lives with the window.
  for _, x in ipairs(cheapest_blockers or {}) do
    if w_alert[x] and redis.call('HSETNX', w_key[x], 'b', now) == 1 then
      expire(x)
      local org, period = org_calendar(x)
      if org then
        redis.call('HSET', blocked, period, w_suffix[x])
        -- Kept until the next window can resolve it.
        redis.call('PEXPIRE', blocked, w_end[x] + grace + 32 * 86400000 - now)
      end
      reply[#reply + 1] = 'b|' .. x
    end
  end
  return reply
end

if probe then
  reply[1], reply[2], reply[3] = 0, 0, ''
  return reply
end

local amount = c_amount[chosen]
for x = 1, n_win do
  redis.call('HINCRBY', w_key[x], 'r', need(x, chosen))
  if fresh[x] then
    local org, period = org_calendar(x)
    if org then
      -- A new org window: a "blocked" alert of its predecessor can be resolved.
      local open = redis.call('HGET', blocked, period)
      if open and open ~= w_suffix[x] then
        redis.call('HDEL', blocked, period)
        reply[#reply + 1] = 'r|' .. x .. '|' .. open
      end
    end
  end
  expire(x)
end
-- One lease per part; its set lives as long as the longest window it counts against, so
-- that no abandoned lease outlives the set that would sweep it. That lifetime changes only
-- when a window opens (or, for a part without a calendar window, with each deadline), and a
-- set can only be new where nothing was reserved: otherwise it has the right one already.
local held = {}  -- per part "<prefix>><lease member>", kept in the request state
for i = 1, n_parts do
  local member = {rid, amount}
  local longest, refresh, balance = tonumber(deadline), true, false
  for x = p_first[i], p_last[i] do
    member[#member + 1] = w_kind[x] == 'm' and w_suffix[x] or (w_suffix[x] .. '=' .. need(x, chosen))
    if w_end[x] > longest then longest = w_end[x] end
    if w_end[x] > 0 then refresh = false end
    -- A balance never expires, so neither may the leases that hold some of it: an
    -- abandoned one is given back by the next sweep, however late (a set empties itself).
    if w_suffix[x] == 't' then balance = true end
  end
  local in_flight = nil  -- the part's calls-in-flight counter
  for x = p_first[i], p_last[i] do
    if fresh[x] or raw_reserved[x] == '0' then refresh = true end
    if w_kind[x] == 'c' then in_flight = w_key[x] end
  end
  member = table.concat(member, '|')
  redis.call('ZADD', p_leases[i], deadline, member)
  if balance then
    redis.call('PERSIST', p_leases[i])
    if in_flight then redis.call('PERSIST', in_flight) end
  else
    if refresh then redis.call('PEXPIRE', p_leases[i], longest + grace - now) end
    -- The counter of calls in flight lives at least as long as the leases it counts (a
    -- lapsed one is given back by a sweep, which must find it), so it follows the latest.
    if in_flight then redis.call('PEXPIRE', in_flight, longest + grace - now) end
  end
  held[i] = p_prefix[i] .. '>' .. member
end
redis.call('SET', KEYS[1], 'L|' .. chosen .. '|' .. amount .. '|' .. ARGV[1] .. '|' .. deadline .. '|' .. attempt
           .. '|' .. table.concat(held, ';'), 'PX', state_ttl)
return reply
