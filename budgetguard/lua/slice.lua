-- Renew one process's slice of the org's budget and hand in the spend made from it.
--
-- With org.slice_usd set, a process reserves a slice of the org's windows here and serves
-- the org's part of its checks from it in memory; its settled spend and usage events come
-- back in batches through this script. A slice is an ordinary lease of the org's lease set,
-- so a process that dies stops holding it when the lease lapses.
--
-- KEYS[1] this refill's state   KEYS[2] org leases   KEYS[3] org day   KEYS[4] org month
-- KEYS[5] org spend history of the UTC day   KEYS[6] org spend by user, this hour
-- KEYS[7] by user, today   KEYS[8] by user, this month   KEYS[9] by feature, this hour
-- KEYS[10] usage event stream   KEYS[11] the org's open "blocked" alerts (as in reserve.lua)
-- ARGV[1] now ms   ARGV[2] key grace ms   ARGV[3] state ttl ms   ARGV[4] org prefix
-- ARGV[5] org window suffixes "|d:..|m:.."   ARGV[6] slices to give back, joined by ','
-- ARGV[7] the new slice's id   ARGV[8] its deadline ms
-- ARGV[9] the slice wanted   ARGV[10] the least it may be (what the process holds)
-- ARGV[11] "end_d,end_m" ms   ARGV[12] "cap_d,cap_m" (-1: none)
-- ARGV[13] alert thresholds "window,level,nano" joined by ',' (window 1: the day, 2: the month)   ARGV[14] history field (UTC hour)
-- ARGV[15] history ttl ms   ARGV[16] anomaly threshold of this hour ('' none)
-- ARGV[17] stream max length ('0': no stream)
-- ARGV[18..] the spend handed in, 4 per request: cost, spender, feature ('' none), event JSON
--
-- Returns {granted, given back, spent_d, spent_m, reserved_d, reserved_m, crossing...}
-- (crossings as in settle.lua; window 1 the org's day, 2 its month); a resend of the same refill returns its first reply.

local prior = redis.call('GET', KEYS[1])
if prior then return split(prior, ';') end

local now = tonumber(ARGV[1])
local grace = tonumber(ARGV[2])
sweep(KEYS[2], ARGV[4], now)

local given_back = 0
for _, member in ipairs(split(ARGV[6], ',')) do
  if redis.call('ZREM', KEYS[2], member) == 1 then
    unreserve(ARGV[4], member)
    given_back = given_back + tonumber(split(member, '|')[2])
  end
end

local ends = split(ARGV[11], ',')
local caps = split(ARGV[12], ',')
local total = 0
local hour_ttl = 2 * 86400000
for i = 18, #ARGV, 4 do
  local cost = ARGV[i]
  total = total + tonumber(cost)
  if cost ~= '0' then
    rank(cost, {{KEYS[6], ARGV[i + 1], hour_ttl}, {KEYS[7], ARGV[i + 1], tonumber(ends[1]) + grace - now},
                {KEYS[8], ARGV[i + 1], tonumber(ends[2]) + grace - now}, {KEYS[9], ARGV[i + 2], hour_ttl}})
  end
  if ARGV[17] ~= '0' then
    redis.call('XADD', KEYS[10], 'MAXLEN', '~', ARGV[17], '*', 'e', ARGV[i + 3])
  end
end

local reply = {}
local spent = {}
-- Totals stay below 2^53 (caps are under $9M), so '%d' prints them exactly.
local charged = string.format('%d', total)
local suffix = split(ARGV[5], '|')
local crossings = {}
for w = 1, 2 do
  if redis.call('EXISTS', KEYS[2 + w]) == 0 then
    -- A new org window: a "blocked" alert of its predecessor can be resolved.
    local period = string.sub(suffix[w], 1, 1)
    local open = redis.call('HGET', KEYS[11], period)
    if open and open ~= suffix[w] then
      redis.call('HDEL', KEYS[11], period)
      crossings[#crossings + 1] = 'r|' .. w .. '|' .. open
    end
  end
  spent[w] = redis.call('HINCRBY', KEYS[2 + w], 's', charged)
  redis.call('PEXPIRE', KEYS[2 + w], math.max(1000, tonumber(ends[w]) + grace - now))
end
if total > 0 then
  local t = split(ARGV[13], ',')
  for i = 1, #t, 3 do
    local w = tonumber(t[i])
    if spent[w] >= tonumber(t[i + 2]) and redis.call('HSETNX', KEYS[2 + w], 'a:' .. t[i + 1], now) == 1 then
      crossings[#crossings + 1] = 't|' .. w .. '|' .. t[i + 1] .. '|' .. string.format('%d', spent[w])
    end
  end
  local hour = redis.call('HINCRBY', KEYS[5], ARGV[14], charged)
  if hour == total then redis.call('PEXPIRE', KEYS[5], ARGV[15]) end
  if ARGV[16] ~= '' and hour >= tonumber(ARGV[16])
      and redis.call('HSETNX', KEYS[5], 'a:' .. ARGV[14], now) == 1 then
    crossings[#crossings + 1] = 'a|' .. ARGV[14] .. '|' .. string.format('%d', hour)
  end
end

-- The new slice: what is wanted, as far as the caps allow, but never less than the
-- process already holds for calls in flight (those were admitted against its old slice).
local grant = tonumber(ARGV[9])
local reserved = {}
for w = 1, 2 do
  reserved[w] = tonumber(redis.call('HGET', KEYS[2 + w], 'r') or '0')
  local cap = tonumber(caps[w])
  if cap >= 0 then grant = math.min(grant, cap - spent[w] - reserved[w]) end
end
grant = math.max(grant, tonumber(ARGV[10]), 0)
if grant > 0 then
  local amount = string.format('%d', grant)
  for w = 1, 2 do
    reserved[w] = redis.call('HINCRBY', KEYS[2 + w], 'r', amount)
  end
  redis.call('ZADD', KEYS[2], ARGV[8], ARGV[7] .. '|' .. amount .. ARGV[5])
  redis.call('PEXPIRE', KEYS[2], math.max(1000, tonumber(ends[2]) + grace - now))
end

reply = {string.format('%d', grant), string.format('%d', given_back), string.format('%d', spent[1]),
         string.format('%d', spent[2]),
         string.format('%d', reserved[1]), string.format('%d', reserved[2])}
for _, c in ipairs(crossings) do reply[#reply + 1] = c end
redis.call('SET', KEYS[1], table.concat(reply, ';'), 'PX', ARGV[3])
return reply
