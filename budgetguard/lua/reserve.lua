-- Reserve one request's worst-case cost on every window of the parts given, or on none.
--
-- A part is a hash slot's worth of windows: the user's (hour, day, month) or the org's
-- (day, month). On a single Redis one call takes both parts; on a Redis Cluster the guard
-- runs the user part, then the org part, and gives the first back if the second denies.
--
-- KEYS[1] request state   KEYS[2] this attempt's void marker (see settle.lua)
-- then the lease set of each part given (user, org); then the
-- window counters of those parts, in order (user hour, day, month; org day, month); then,
-- with the org part, the org's open "blocked" alerts (field: window, value: its key suffix)
-- ARGV[1] now ms   ARGV[2] lease deadline ms   ARGV[3] request-state ttl ms   ARGV[4] key grace ms
-- ARGV[5] user key prefix   ARGV[6] org key prefix
-- ARGV[7] user window suffixes "|h:..|d:..|m:.."   ARGV[8] org window suffixes "|d:..|m:.."
-- ARGV[9] reservation id
-- ARGV[10] per window "cap,threshold,end_ms" x5 joined by ',' (cap/threshold -1: none)
-- ARGV[11] candidates "amount,route" joined by ',' (route 0 requested, 1 user, 2 org, 3 both;
--          amount -1: not offered to this part)
-- ARGV[12] mask of the windows whose first denial is an alert
-- ARGV[13] the parts: "uo", "u" or "o"
-- ARGV[14] "1" when an earlier part (the user's) reached its routing threshold, else "0"
-- ARGV[15] "1": only probe (after the user part denied): report the blocking windows and
--          claim their first-denial alerts, but reserve nothing
-- ARGV[16] this attempt's id (a check whose caller gave up on it can be voided by it)
--
-- Returns {1, chosen, requested_blockers, triggered, spent..., reserved...} when reserved,
--         {0, 0, blockers of the cheapest candidate, triggered, spent..., reserved...} when denied,
--         {2, state} when the request id holds a live reservation (a retry); the state is
--         "L|<candidate>|<amount>|<reserved at ms>|<deadline ms>|<attempt>",
--         {3} when this attempt was voided before it ran (its caller had given up on it).
-- Spent and reserved are given for the windows of the parts called, in the order above.
-- Bit w-1 of a blockers / triggered mask stands for window w (1-5, as above).
-- Reserved and denied replies end with alerts: "b|<window>" the window's first denial,
-- "r|<window>|<suffix>" an org window blocked earlier whose successor has now opened.

local now = tonumber(ARGV[1])
local p = part_keys(ARGV[13], 3)
local with_user, with_org, user_leases, org_leases = p.user, p.org, p.user_leases, p.org_leases
local present, key = p.windows, p.key
local blocked = KEYS[p.next]

if with_user then sweep(user_leases, ARGV[5], now) end
if with_org then sweep(org_leases, ARGV[6], now) end

-- The caller gave up on this attempt (Redis answered too late) and voided it: reserving now
-- would hold budget nobody will settle.
if redis.call('EXISTS', KEYS[2]) == 1 then return {3} end

-- Only a live reservation is a repeat: a settled or lapsed request id reserves afresh.
local prior = redis.call('GET', KEYS[1])
if prior and string.sub(prior, 1, 1) == 'L' and tonumber(split(prior, '|')[5]) > now then
  -- The repeat takes the live reservation over: voiding the attempt that took it (its
  -- caller gave up on the reply) must not give it back from under this one.
  local f = split(prior, '|')
  if ARGV[15] ~= '1' and f[6] ~= ARGV[16] then
    f[6] = ARGV[16]
    prior = table.concat(f, '|')
    redis.call('SET', KEYS[1], prior, 'KEEPTTL')
  end
  return {2, prior}
end

local spec = split(ARGV[10], ',')
local cap, used, ends, fresh, raw_spent, raw_reserved = {}, {}, {}, {}, {}, {}
local triggered, trig_user, trig_org = 0, ARGV[14] == '1', false
for _, w in ipairs(present) do
  local v = redis.call('HMGET', key[w], 's', 'r')
  fresh[w] = not v[1] and not v[2]
  raw_spent[w] = v[1] or '0'
  raw_reserved[w] = v[2] or '0'
  used[w] = tonumber(raw_spent[w]) + tonumber(raw_reserved[w])
  cap[w] = tonumber(spec[3 * w - 2])
  local at = tonumber(spec[3 * w - 1])
  ends[w] = tonumber(spec[3 * w])
  if at >= 0 and used[w] >= at then
    triggered = triggered + 2 ^ (w - 1)
    if w <= 3 then trig_user = true else trig_org = true end
  end
end

local function blockers(amount)
  local mask = 0
  for _, w in ipairs(present) do
    if cap[w] >= 0 and used[w] + amount > cap[w] then mask = mask + 2 ^ (w - 1) end
  end
  return mask
end

local cand = split(ARGV[11], ',')
local n = #cand / 2
local function amount_of(i) return cand[2 * i - 1] end
local function route_of(i) return tonumber(cand[2 * i]) end
local function offered(i) return amount_of(i) ~= '-1' end
local function routed_by_trigger(i)
  local r = route_of(i)
  return ((r == 1 or r == 3) and trig_user) or ((r == 2 or r == 3) and trig_org)
end

-- Try order: routes whose threshold was reached, the requested model, other routes.
local order = {}
for i = 1, n do if offered(i) and routed_by_trigger(i) then order[#order + 1] = i end end
for i = 1, n do if offered(i) and route_of(i) == 0 then order[#order + 1] = i end end
for i = 1, n do if offered(i) and route_of(i) ~= 0 and not routed_by_trigger(i) then order[#order + 1] = i end end

local chosen, requested_mask = 0, 0
local cheapest, cheapest_mask = nil, 0
for _, i in ipairs(order) do
  local amount = tonumber(amount_of(i))
  local mask = blockers(amount)
  if route_of(i) == 0 then requested_mask = mask end
  if mask == 0 then chosen = i break end
  if cheapest == nil or amount < cheapest then cheapest, cheapest_mask = amount, mask end
end

local reply = {chosen > 0 and 1 or 0, chosen, chosen > 0 and requested_mask or cheapest_mask, triggered}
for _, w in ipairs(present) do reply[#reply + 1] = raw_spent[w] end
for _, w in ipairs(present) do reply[#reply + 1] = raw_reserved[w] end
local grace = tonumber(ARGV[4])
local org_suffix = split(ARGV[8], '|')
if chosen == 0 then
  -- The first denial by each blocking window is an alert; the marker lives with the window.
  local wanted = tonumber(ARGV[12])
  for _, w in ipairs(present) do
    local bit = 2 ^ (w - 1)
    if cheapest_mask % (2 * bit) >= bit and wanted % (2 * bit) >= bit
        and redis.call('HSETNX', key[w], 'b', now) == 1 then
      if fresh[w] then redis.call('PEXPIRE', key[w], ends[w] + grace - now) end
      if w > 3 then
        redis.call('HSET', blocked, w, org_suffix[w - 3])
        -- Kept until the next month's window can resolve it.
        redis.call('PEXPIRE', blocked, ends[5] + grace + 32 * 86400000 - now)
      end
      reply[#reply + 1] = 'b|' .. w
    end
  end
  return reply
end

if ARGV[15] == '1' then
  reply[1], reply[2], reply[3] = 0, 0, 0
  return reply
end

local amount = amount_of(chosen)
for _, w in ipairs(present) do
  redis.call('HINCRBY', key[w], 'r', amount)
  -- Counters live until a grace period after their window ends; set once, at creation.
  if fresh[w] then
    redis.call('PEXPIRE', key[w], ends[w] + grace - now)
    if w > 3 then
      -- A new org window: a "blocked" alert of its predecessor can be resolved.
      local open = redis.call('HGET', blocked, w)
      if open and open ~= org_suffix[w - 3] then
        redis.call('HDEL', blocked, w)
        reply[#reply + 1] = 'r|' .. w .. '|' .. open
      end
    end
  end
end
local deadline = ARGV[2]
-- A lease set lives as long as the longest window its leases count against, so that
-- no abandoned lease outlives the set that would sweep it.
if with_user then
  redis.call('ZADD', user_leases, deadline, ARGV[9] .. '|' .. amount .. ARGV[7])
  redis.call('PEXPIRE', user_leases, ends[3] + grace - now)
end
if with_org then
  redis.call('ZADD', org_leases, deadline, ARGV[9] .. '|' .. amount .. ARGV[8])
  redis.call('PEXPIRE', org_leases, ends[5] + grace - now)
end
redis.call('SET', KEYS[1], 'L|' .. chosen .. '|' .. amount .. '|' .. ARGV[1] .. '|' .. deadline .. '|' .. ARGV[16],
           'PX', ARGV[3])
return reply
