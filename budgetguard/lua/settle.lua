-- Settle a reservation: give the lease back and, for a record, charge the actual cost,
-- report the alert thresholds this spend crossed, and log the usage event, all in one
-- atomic step so that spend, alerts and the event log never disagree.
-- Applies once per reservation id; a retry (or a second record/release) changes nothing.
-- Like reserve.lua it takes the user's part, the org's part, or both (one per hash slot);
-- the spend history, rankings and usage event go with the org's part.
--
-- KEYS[1] request state   KEYS[2] the void marker of the decision's attempt (see ARGV[22])
-- then the lease set of each part given (user, org); then the window
-- counters to charge of those parts, in order (user hour, day, month; org day, month); then,
-- with the org part: KEYS[+1] org spend history of the UTC day (field: hour)
-- KEYS[+2] org spend by user, this hour   KEYS[+3] org spend by user, today
-- KEYS[+4] org spend by user, this month   KEYS[+5] org spend by feature, this hour
-- KEYS[+6] usage event stream
-- ARGV[1] now ms   ARGV[2] request-state ttl ms   ARGV[3] key grace ms
-- ARGV[4] user prefix   ARGV[5] org prefix   ARGV[6] user lease member   ARGV[7] org lease member
-- ARGV[8] cost in nano-USD, or '' for a release
-- ARGV[9] end ms of each of the 5 windows charged, joined by ','
-- ARGV[10] the settled state to store, "S|<candidate>|<cost or released>|<nonce>"
-- ARGV[11] alert thresholds "window,level,nano" joined by ',' ('' none)
-- ARGV[12] history field (UTC hour "HH")   ARGV[13] history ttl ms
-- ARGV[14] spender (user id)   ARGV[15] feature tag ('' none)
-- ARGV[16] anomaly threshold of this org hour in nano-USD ('' none)
-- ARGV[17] usage event JSON up to its closing outcome ('' no event)
-- ARGV[18] outcome   ARGV[19] outcome when the lease had lapsed   ARGV[20] stream max length
-- ARGV[21] the parts: "uo", "u" or "o"
-- ARGV[22] '' or, to void an attempt whose reserve may not have run yet (the caller gave up
--          waiting for it), the void marker's ttl ms: the marker makes that reserve, should it
--          run later, reserve nothing; a live reservation of this attempt is settled as usual
-- ARGV[23] the decision's attempt id (with ARGV[22])
--
-- Returns {1, lease_was_live, crossing...} when applied, {0, state} when already settled;
-- the state is ARGV[10] .. "|<lease_was_live>|<crossings joined by ';'>".
-- A crossing is "t|<window>|<level>|<spent>" (a threshold) or "a|<hour>|<spent>" (an anomaly);
-- each is claimed by a marker field so that it is reported once, whoever crosses it.

local now = tonumber(ARGV[1])
local p = part_keys(ARGV[21], 3)
local with_user, with_org, user_leases, org_leases = p.user, p.org, p.user_leases, p.org_leases
local present, key, k = p.windows, p.key, p.next

if with_user then sweep(user_leases, ARGV[4], now) end
if with_org then sweep(org_leases, ARGV[5], now) end

local prior = redis.call('GET', KEYS[1])
if ARGV[22] ~= '' then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[22])
  -- A live reservation of another attempt of this request id is not this decision's.
  if prior and string.sub(prior, 1, 1) == 'L' and split(prior, '|')[6] ~= ARGV[23] then return {0, prior} end
end
if prior and string.sub(prior, 1, 1) == 'S' then return {0, prior} end

-- The lease counts as live if the part that carries the event still held it.
local live = 0
if with_user and redis.call('ZREM', user_leases, ARGV[6]) == 1 then
  unreserve(ARGV[4], ARGV[6])
  live = 1
end
if with_org then
  live = 0
  if redis.call('ZREM', org_leases, ARGV[7]) == 1 then
    unreserve(ARGV[5], ARGV[7])
    live = 1
  end
end

local reply = {1, live}
local cost = ARGV[8]
if cost ~= '' then
  local ends = split(ARGV[9], ',')
  local grace = tonumber(ARGV[3])
  local spent = {}
  for _, w in ipairs(present) do
    spent[w] = redis.call('HINCRBY', key[w], 's', cost)
    redis.call('PEXPIRE', key[w], math.max(1000, tonumber(ends[w]) + grace - now))
  end
  local t = split(ARGV[11], ',')
  for i = 1, #t, 3 do
    local w = tonumber(t[i])
    if key[w] and spent[w] >= tonumber(t[i + 2])
        and redis.call('HSETNX', key[w], 'a:' .. t[i + 1], now) == 1 then
      reply[#reply + 1] = 't|' .. w .. '|' .. t[i + 1] .. '|' .. string.format('%d', spent[w])
    end
  end
  if with_org and cost ~= '0' then
    local hist = KEYS[k]
    local hist_ttl = tonumber(ARGV[13])
    local hour = redis.call('HINCRBY', hist, ARGV[12], cost)
    if hour == tonumber(cost) then redis.call('PEXPIRE', hist, hist_ttl) end
    if ARGV[16] ~= '' and hour >= tonumber(ARGV[16])
        and redis.call('HSETNX', hist, 'a:' .. ARGV[12], now) == 1 then
      reply[#reply + 1] = 'a|' .. ARGV[12] .. '|' .. string.format('%d', hour)
    end
    -- An hour's rankings only name who spent in an anomalous hour: two days is plenty.
    local hour_ttl = 2 * 86400000
    rank(cost, {{KEYS[k + 1], ARGV[14], hour_ttl}, {KEYS[k + 2], ARGV[14], tonumber(ends[4]) + grace - now},
                {KEYS[k + 3], ARGV[14], tonumber(ends[5]) + grace - now}, {KEYS[k + 4], ARGV[15], hour_ttl}})
  end
end
if with_org and ARGV[17] ~= '' then
  local outcome = ARGV[18]
  if live == 0 then outcome = ARGV[19] end
  redis.call('XADD', KEYS[k + 5], 'MAXLEN', '~', ARGV[20], '*', 'e', ARGV[17] .. outcome .. '"}')
end
-- The state keeps what this settle reported, so that its own resend (a lost reply) can
-- report the same crossings: their markers are claimed now and never again.
local crossed = {}
for i = 3, #reply do crossed[#crossed + 1] = reply[i] end
redis.call('SET', KEYS[1], ARGV[10] .. '|' .. live .. '|' .. table.concat(crossed, ';'), 'PX', ARGV[2])
return reply
