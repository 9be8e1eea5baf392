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

local parts, wins, after = layout(11 + 3 * n_cand, n_parts, 5, 6, 3, true)
local blocked = KEYS[after]
local changed = stale(parts, 5)
if changed then return changed end

local state = redis.call('MGET', KEYS[1], KEYS[2])
-- The caller gave up on this attempt (Redis answered too late) and voided it: reserving now
-- would hold budget nobody will settle.
if state[2] then return {3} end

-- Only a live reservation is a repeat: a settled or lapsed request id reserves afresh.
local prior = state[1]
if prior and string.sub(prior, 1, 1) == 'L' and tonumber(split(prior, '|')[5]) > now then
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

local cand = {}
for i = 1, n_cand do
  local a = 8 + 3 * i
  cand[i] = {amount = ARGV[a], tokens = ARGV[a + 1], routes = tonumber(ARGV[a + 2])}
end

-- What a candidate takes from a window: its cost, one request, its tokens, one call.
local function need(w, c)
  local kind = wins[w].f[2]
  if kind == 'm' then return c.amount end
  if kind == 'k' then return c.tokens end
  return '1'
end

local function offered(c) return c.amount ~= '-1' end

local cap, used, ends, fresh, raw_spent, raw_reserved = {}, {}, {}, {}, {}, {}
local triggered, routed, chosen, requested_blockers, cheapest, cheapest_blockers

-- Read every window, then choose: routes whose threshold was reached, the requested
-- model, other routes; the first candidate every window fits.
local function decide()
  triggered, routed = {}, tonumber(ARGV[8])
  for w, win in ipairs(wins) do
    local f = win.f
    local v = redis.call('HMGET', win.key, 's', 'r')
    fresh[w] = not v[1] and not v[2]
    raw_spent[w] = v[1] or '0'
    raw_reserved[w] = v[2] or '0'
    used[w] = tonumber(raw_spent[w]) + tonumber(raw_reserved[w])
    cap[w] = tonumber(f[3])
    ends[w] = tonumber(f[5])
    local at = tonumber(f[4])
    if at >= 0 and used[w] >= at then
      triggered[#triggered + 1] = w
      local route_bit = tonumber(win.part.f[3])  -- one bit per part
      if not shares_bit(routed, route_bit) then routed = routed + route_bit end
    end
  end
  local function blockers(c)
    local out = {}
    for w = 1, #wins do
      if cap[w] >= 0 and used[w] + tonumber(need(w, c)) > cap[w] then out[#out + 1] = w end
    end
    return out
  end
  local function routed_by_trigger(c) return shares_bit(c.routes, routed) end
  local order = {}
  for i, c in ipairs(cand) do if offered(c) and c.routes ~= 0 and routed_by_trigger(c) then order[#order + 1] = i end end
  for i, c in ipairs(cand) do if offered(c) and c.routes == 0 then order[#order + 1] = i end end
  for i, c in ipairs(cand) do
    if offered(c) and c.routes ~= 0 and not routed_by_trigger(c) then order[#order + 1] = i end
  end
  chosen, requested_blockers, cheapest, cheapest_blockers = 0, {}, nil, {}
  for _, i in ipairs(order) do
    local c = cand[i]
    local found = blockers(c)
    if c.routes == 0 then requested_blockers = found end
    if #found == 0 then chosen = i break end
    if cheapest == nil or tonumber(c.amount) < tonumber(cand[cheapest].amount) then
      cheapest, cheapest_blockers = i, found
    end
  end
end

decide()
-- Leases that lapsed still count until swept. A clean pass (the requested model fits, no
-- threshold reached) cannot change by sweeping them; anything else is decided again on
-- the swept counters, so expired leases never deny, route or alert.
if chosen == 0 or #requested_blockers > 0 or #triggered > 0 then
  local swept = 0
  for _, p in ipairs(parts) do swept = swept + sweep(p.leases, p.prefix, now) end
  if swept > 0 then decide() end
end

local reply = {chosen > 0 and 1 or 0, chosen,
               table.concat(chosen > 0 and requested_blockers or cheapest_blockers, ','),
               table.concat(triggered, ',')}
for w = 1, #wins do reply[#reply + 1] = raw_spent[w] end
for w = 1, #wins do reply[#reply + 1] = raw_reserved[w] end

-- A fresh window's counters live until a grace period after it ends (set once, at
-- creation); a balance never ends; the calls-in-flight counter outlives every live lease.
local function expire(w, always)
  local kind = wins[w].f[2]
  if kind == 'c' then
    redis.call('PEXPIRE', wins[w].key, tonumber(deadline) + grace - now)
  elseif (fresh[w] or always) and ends[w] > 0 then
    -- A minute's counters need only outlive the leases taken in it (a minute past their
    -- deadline); the calendar windows' stay for reports a grace period after they end.
    local after = (kind == 'q' or kind == 'k') and (tonumber(deadline) - now + 60000) or grace
    redis.call('PEXPIRE', wins[w].key, ends[w] + after - now)
  end
end

local function is_org_calendar(w)
  local period = string.sub(wins[w].f[1], 1, 1)
  return wins[w].part.f[4] == '1' and (period == 'h' or period == 'd' or period == 'w' or period == 'm'), period
end

if chosen == 0 then
  -- The first denial by each blocking window is an alert; the marker lives with the window.
  for _, w in ipairs(cheapest_blockers) do
    if wins[w].f[6] == '1' and redis.call('HSETNX', wins[w].key, 'b', now) == 1 then
      expire(w, false)
      local org, period = is_org_calendar(w)
      if org then
        redis.call('HSET', blocked, period, wins[w].f[1])
        -- Kept until the next window can resolve it.
        redis.call('PEXPIRE', blocked, ends[w] + grace + 32 * 86400000 - now)
      end
      reply[#reply + 1] = 'b|' .. w
    end
  end
  return reply
end

if probe then
  reply[1], reply[2], reply[3] = 0, 0, ''
  return reply
end

local c = cand[chosen]
for w = 1, #wins do
  local n = need(w, c)
  if n ~= '0' then redis.call('HINCRBY', wins[w].key, 'r', n) end
  if fresh[w] then
    local org, period = is_org_calendar(w)
    if org then
      -- A new org window: a "blocked" alert of its predecessor can be resolved.
      local open = redis.call('HGET', blocked, period)
      if open and open ~= wins[w].f[1] then
        redis.call('HDEL', blocked, period)
        reply[#reply + 1] = 'r|' .. w .. '|' .. open
      end
    end
  end
  expire(w, false)
end
-- One lease per part; its set lives as long as the longest window it counts against, so
-- that no abandoned lease outlives the set that would sweep it. That lifetime changes only
-- when a window opens (or, for a part without a calendar window, with each deadline), and a
-- set can only be new where nothing was reserved: otherwise it has the right one already.
local held = {}  -- per part "<prefix>><lease member>", kept in the request state
for _, p in ipairs(parts) do
  local member = {rid, c.amount}
  local longest, refresh, balance = tonumber(deadline), true, false
  for w = p.first, p.last do
    local kind = wins[w].f[2]
    member[#member + 1] = kind == 'm' and wins[w].f[1] or (wins[w].f[1] .. '=' .. need(w, c))
    if ends[w] > longest then longest = ends[w] end
    if ends[w] > 0 then refresh = false end
    -- A balance never expires, so neither may the leases that hold some of it: an
    -- abandoned one is given back by the next sweep, however late (a set empties itself).
    if wins[w].f[1] == 't' then balance = true end
  end
  for w = p.first, p.last do
    if fresh[w] or raw_reserved[w] == '0' then refresh = true end
  end
  member = table.concat(member, '|')
  redis.call('ZADD', p.leases, deadline, member)
  if balance then
    redis.call('PERSIST', p.leases)
  elseif refresh then
    redis.call('PEXPIRE', p.leases, longest + grace - now)
  end
  held[#held + 1] = p.prefix .. '>' .. member
end
redis.call('SET', KEYS[1], 'L|' .. chosen .. '|' .. c.amount .. '|' .. ARGV[1] .. '|' .. deadline .. '|' .. attempt
           .. '|' .. table.concat(held, ';'), 'PX', state_ttl)
return reply
