-- Settle a reservation: give the lease back and, for a record, charge what the call used,
-- report the alert thresholds this spend crossed, and log the usage event, all in one
-- atomic step so that spend, alerts and the event log never disagree.
-- Applies once per reservation id; a retry (or a second record/release) changes nothing.
-- Like reserve.lua it takes every part or, on a Redis Cluster, one part per call; the org's
-- spend history, rankings and the usage event go with the org's part.
--
-- KEYS[1] request state   KEYS[2] the void marker of the decision's attempt
-- then per part: its lease set, then the counters of its windows to charge; then, with the
-- org part: KEYS[+1] org spend history of the UTC day (field: hour)
-- KEYS[+2] org spend by user, this hour   KEYS[+3] org spend by user, today
-- KEYS[+4] org spend by user, this month   KEYS[+5] org spend by feature, this hour
-- KEYS[+6] usage event stream
local now = tonumber(ARGV[1])
local state_ttl = ARGV[2]
local grace = tonumber(ARGV[3])
local cost = ARGV[4]                 -- the cost in nano-USD, or '' for a release
local settled = ARGV[5]              -- the state to store, "S|<candidate>|<cost or released>|<nonce>"
local history_field, history_ttl = ARGV[6], tonumber(ARGV[7])  -- the UTC hour "HH"
local spender, feature = ARGV[8], ARGV[9]                      -- feature '' none
local anomaly = ARGV[10]             -- the anomaly threshold of this org hour in nano-USD ('' none)
local event_head = ARGV[11]          -- the usage event's JSON up to its outcome ('' no event)
local outcome, lapsed_outcome, maxlen = ARGV[12], ARGV[13], ARGV[14]
-- ARGV[15] '' or, to void an attempt whose reserve may not have run yet (the caller gave up
--          waiting for it), the void marker's ttl ms: the marker makes that reserve, should it
--          run later, reserve nothing; a live reservation of this attempt is settled as usual
local void_ttl, attempt = ARGV[15], ARGV[16]
local org_day_end, org_month_end = tonumber(ARGV[17]), tonumber(ARGV[18])  -- the org's rankings' lifetimes
local n_parts, n_thresholds = tonumber(ARGV[19]), tonumber(ARGV[20])
-- ARGV[21..] the alert thresholds, 3 fields each: window, level, nano-USD; then the parts, 4
--            each: prefix, number of windows, org (1/0), its lease member (as reserve.lua wrote
--            it); then the windows, 3 each: suffix, end ms (0: never ends), charge ('-': none,
--            as for calls in flight)
--
-- Returns {1, lease_was_live, crossing...} when applied, {0, state} when already settled;
-- the state is ARGV[5] .. "|<lease_was_live>|<crossings joined by ';'>".
-- A crossing is "t|<window>|<level>|<spent>" (a threshold) or "a|<hour>|<spent>" (an anomaly);
-- each is claimed by a marker field so that it is reported once, whoever crosses it.

local parts, wins, k = layout(21 + 3 * n_thresholds, n_parts, 4, 3, 3, false)
local with_org = false
for _, p in ipairs(parts) do
  -- A lease past its deadline is swept first: its settle then reports it lapsed.
  sweep(p.leases, p.prefix, now)
  if p.f[3] == '1' then with_org = true end
end

local prior = redis.call('GET', KEYS[1])
if void_ttl ~= '' then
  redis.call('SET', KEYS[2], '1', 'PX', void_ttl)
  -- A live reservation of another attempt of this request id is not this decision's.
  if prior and string.sub(prior, 1, 1) == 'L' and split(prior, '|')[6] ~= attempt then return {0, prior} end
end
if prior and string.sub(prior, 1, 1) == 'S' then return {0, prior} end

-- What the reservation holds, as its reserve wrote it into the request state: it is the
-- lease (the decision's own guess differs when the reserve ran but its reply was lost and it
-- chose another model); the caller's member otherwise.
local members = {}
if prior and string.sub(prior, 1, 1) == 'L' then
  local tail = string.match(prior, '^L|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|(.+)$')
  for entry in string.gmatch(tail or '', '[^;]+') do
    local prefix, member = string.match(entry, '^(.-)>(.+)$')
    if prefix then members[prefix] = member end
  end
end

-- Each part's lease back (what it held per window), if it was still live. The lease counts
-- as live if the last part (the one that carries the event) still held it.
local live = 0
local held = {}  -- per window: what the lease held there, for windows charged below
for i, p in ipairs(parts) do
  live = 0
  local member = members[p.prefix] or p.f[4]
  if redis.call('ZREM', p.leases, member) == 1 then
    live = 1
    local f = split(member, '|')
    local rest = {f[1], f[2]}
    for j = 3, #f do
      local suffix, amount = f[j], f[2]
      local eq = string.find(suffix, '=', 1, true)
      if eq then suffix, amount = string.sub(suffix, 1, eq - 1), string.sub(suffix, eq + 1) end
      local w = nil
      for x = p.first, p.last do if wins[x].f[1] == suffix then w = x end end
      if w then held[w] = amount else rest[#rest + 1] = f[j] end
    end
    -- Windows the lease was taken on but this settle does not charge (their keys expired).
    if #rest > 2 then unreserve(p.prefix, table.concat(rest, '|')) end
  end
end

local reply = {1, live}
local spent = {}
for w, win in ipairs(wins) do
  local charge = cost ~= '' and win.f[3] ~= '-' and win.f[3] or nil
  local amount = held[w]
  if amount or charge then
    -- A window's key exists until a grace period after it ends: what is held there is given
    -- back only while it does, and a charge to a key gone (evicted) starts it afresh.
    local exists = redis.call('EXISTS', win.key) == 1
    if exists and amount and amount ~= '0' then redis.call('HINCRBY', win.key, 'r', '-' .. amount) end
    if charge then
      spent[w] = redis.call('HINCRBY', win.key, 's', charge)
      local ends = tonumber(win.f[2])
      if not exists and ends > 0 then
        -- A minute's counters need only outlive their minute's leases; the rest, a grace period.
        local kind = string.sub(win.f[1], 1, 2)
        local after = (kind == 'q:' or kind == 'k:') and 60000 or grace
        redis.call('PEXPIRE', win.key, math.max(1000, ends + after - now))
      end
    end
  end
end
if cost ~= '' then
  for i = 21, 20 + 3 * n_thresholds, 3 do
    local w, level = tonumber(ARGV[i]), ARGV[i + 1]
    if spent[w] and spent[w] >= tonumber(ARGV[i + 2])
        and redis.call('HSETNX', wins[w].key, 'a:' .. level, now) == 1 then
      reply[#reply + 1] = 't|' .. w .. '|' .. level .. '|' .. string.format('%d', spent[w])
    end
  end
  if with_org and cost ~= '0' then
    local hist = KEYS[k]
    local hour = redis.call('HINCRBY', hist, history_field, cost)
    if hour == tonumber(cost) then redis.call('PEXPIRE', hist, history_ttl) end
    if anomaly ~= '' and hour >= tonumber(anomaly)
        and redis.call('HSETNX', hist, 'a:' .. history_field, now) == 1 then
      reply[#reply + 1] = 'a|' .. history_field .. '|' .. string.format('%d', hour)
    end
    -- An hour's rankings only name who spent in an anomalous hour: two days is plenty.
    local hour_ttl = 2 * 86400000
    rank(cost, {{KEYS[k + 1], spender, hour_ttl}, {KEYS[k + 2], spender, org_day_end + grace - now},
                {KEYS[k + 3], spender, org_month_end + grace - now}, {KEYS[k + 4], feature, hour_ttl}})
  end
end
if with_org and event_head ~= '' then
  if live == 0 then outcome = lapsed_outcome end
  redis.call('XADD', KEYS[k + 5], 'MAXLEN', '~', maxlen, '*', 'e', event_head .. outcome .. '"}')
end
-- The state keeps what this settle reported, so that its own resend (a lost reply) can
-- report the same crossings: their markers are claimed now and never again.
local crossed = {}
for i = 3, #reply do crossed[#crossed + 1] = reply[i] end
redis.call('SET', KEYS[1], settled .. '|' .. live .. '|' .. table.concat(crossed, ';'), 'PX', state_ttl)
return reply
