-- Open-loop load at a fixed rate for Debian's wrk 4 (LuaJIT): wrk2's method, coordinated omission
-- corrected. `bench/latency.py --client lua` runs it (its default client is bench/openloop.py, which
-- costs less CPU per request); by hand:
--
--   wrk -t64 -c64 -d10s -s bench/openloop.lua http://127.0.0.1:8000/ -- RATE 64
--
-- RATE is the total rate in requests per second; the second argument must equal -t and -c: one
-- connection per thread. Why: wrk's Lua callbacks are not told which connection they serve, and its
-- delay() has whole milliseconds on a gettimeofday millisecond grid (src/ae.c), too coarse for
-- sub-millisecond latencies. With one connection per thread, request() can sleep until the intended
-- send time itself (clock_nanosleep, absolute, timer slack 1 ns), and response() always answers the
-- thread's one outstanding request.
--
-- Connection i sends at start + (i - 1) / N * interval + k * interval, interval = N / RATE: a fixed
-- schedule. A request sent late (its connection still waited for the previous answer) counts from its
-- intended time, so a stall shows in the latencies as the queue a real client would see. done()
-- prints one line, "openloop {json}", with the percentiles in microseconds.

local ffi = require("ffi")
ffi.cdef [[
struct openloop_timespec { long tv_sec; long tv_nsec; };
int clock_gettime(int clk, struct openloop_timespec *tp);
int clock_nanosleep(int clk, int flags, const struct openloop_timespec *req, struct openloop_timespec *rem);
int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5);
]]
local C = ffi.C
local CLOCK_MONOTONIC, TIMER_ABSTIME, PR_SET_TIMERSLACK, EINTR = 1, 1, 29, 4
local ts = ffi.new("struct openloop_timespec")

local function now_us()
  C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
end

local function sleep_until(us)
  local sec = math.floor(us / 1e6)
  ts.tv_sec = sec
  ts.tv_nsec = math.floor((us - sec * 1e6) * 1e3)
  while C.clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, ts, nil) == EINTR do end
end

-- Log-linear histogram: 1 us buckets below 1 ms, then buckets 1% wide (index -> count).
local LOG_STEP = math.log(1.01)
local function bucket(us)
  if us < 1000 then
    return math.floor(us)
  end
  return 1000 + math.floor(math.log(us / 1000) / LOG_STEP)
end
local function bucket_value(i) -- the bucket's upper edge in us (conservative)
  if i < 1000 then
    return i + 1
  end
  return 1000 * math.exp((i - 999) * LOG_STEP)
end
local function add(h, us)
  local i = bucket(us)
  h[i] = (h[i] or 0) + 1
end

-- setup() runs in the main Lua state, once per thread: number them.
local threads, created = {}, 0
function setup(thread)
  created = created + 1
  thread:set("id", created)
  threads[created] = thread
end

-- Per thread (one connection each).
hist, service, late = {}, {}, {}
count, statuses, first_us, last_us, worst_late_us = 0, 0, 0, 0, 0
local request_str, interval, start, k, intended, sent
local verify_skipped = false

function init(args)
  if args[1] == "closed" then -- plain wrk (closed loop), only done() added: its p99.9 for comparison
    mode, request, response = "closed", nil, nil
    return
  end
  local rate = tonumber(args[1])
  local n = tonumber(args[2])
  assert(rate and rate > 0 and n and n > 0, "usage: -s openloop.lua URL -- RATE CONNECTIONS")
  interval = 1e6 * n / rate
  start = ((id or 1) - 1) / n * interval -- offset until the first request, made absolute then
  request_str = wrk.format()
end

function request()
  -- wrk calls thread 1's request() once before any thread runs, to count pipelined requests
  if id == 1 and not verify_skipped then
    verify_skipped = true
    return request_str
  end
  if k == nil then -- first real request, in this thread's own OS thread
    C.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    k = 0
    start = now_us() + start
    first_us = start
  else
    k = k + 1
  end
  intended = start + k * interval
  if now_us() < intended then
    sleep_until(intended)
  end
  sent = now_us()
  local behind = sent - intended
  if behind > worst_late_us then
    worst_late_us = behind
  end
  if k > 0 then -- the first request of a fresh connection is a warm-up, not recorded
    add(late, behind)
  end
  return request_str
end

function response(status)
  if intended == nil then
    return
  end
  local now = now_us()
  last_us = now
  count = count + 1
  if (status < 200 or status > 399) then
    statuses = statuses + 1
  end
  if k > 0 then
    add(hist, now - intended)
    add(service, now - sent)
  end
end

local function percentiles(h)
  local keys, total = {}, 0
  for i, c in pairs(h) do
    keys[#keys + 1] = i
    total = total + c
  end
  table.sort(keys)
  local out = { n = total }
  local wanted = { { "p50", 50 }, { "p90", 90 }, { "p99", 99 }, { "p999", 99.9 }, { "p9999", 99.99 } }
  local seen, w = 0, 1
  for _, i in ipairs(keys) do
    seen = seen + h[i]
    while w <= #wanted and seen >= wanted[w][2] / 100 * total do
      out[wanted[w][1]] = bucket_value(i)
      w = w + 1
    end
  end
  out.max = #keys > 0 and bucket_value(keys[#keys]) or 0
  return out
end

local function merge(into, h)
  for i, c in pairs(h) do
    into[i] = (into[i] or 0) + c
  end
end

local function json(v)
  if type(v) == "table" then
    local parts = {}
    for key, val in pairs(v) do
      parts[#parts + 1] = string.format("%q:%s", key, json(val))
    end
    table.sort(parts)
    return "{" .. table.concat(parts, ",") .. "}"
  elseif type(v) == "number" then
    return string.format("%.3f", v)
  end
  return string.format("%q", tostring(v))
end

local function closed_done(summary, latency)
  local e = summary.errors
  local lat = { n = summary.requests, max = latency.max }
  for _, p in ipairs({ { "p50", 50 }, { "p90", 90 }, { "p99", 99 }, { "p999", 99.9 }, { "p9999", 99.99 } }) do
    lat[p[1]] = latency:percentile(p[2])
  end
  io.write("openloop ", json({
    mode = "closed",
    latency_us = lat, -- wrk's own figures (after its stats_correct, src/wrk.c)
    responses = summary.requests,
    seconds = summary.duration / 1e6,
    rate = summary.requests / (summary.duration / 1e6),
    errors = e.connect + e.read + e.write + e.timeout + e.status,
    threads = #threads,
  }), "\n")
end

function done(summary, latency)
  if threads[1] and threads[1]:get("mode") == "closed" then
    return closed_done(summary, latency)
  end
  local h, s, l = {}, {}, {}
  local total, bad, rate, span, worst = 0, 0, 0, 0, 0
  for _, thread in ipairs(threads) do
    merge(h, thread:get("hist"))
    merge(s, thread:get("service"))
    merge(l, thread:get("late"))
    local n = thread:get("count")
    total = total + n
    bad = bad + thread:get("statuses")
    -- each connection's rate: its responses after the first over the time from its first intended
    -- send to its last response (threads start a little apart, so no common clock span)
    local first, last = thread:get("first_us"), thread:get("last_us")
    if n > 1 and last > first then
      rate = rate + (n - 1) / ((last - first) / 1e6)
      span = math.max(span, (last - first) / 1e6)
    end
    worst = math.max(worst, thread:get("worst_late_us"))
  end
  local e = summary.errors
  local out = {
    mode = "open",
    latency_us = percentiles(h),   -- from the intended send time: coordinated omission corrected
    service_us = percentiles(s),   -- from the actual send time: what a closed-loop client sees
    send_late_us = percentiles(l), -- actual send - intended send: the client's own lag
    worst_late_us = worst,
    responses = total,
    seconds = span,
    rate = rate,
    errors = e.connect + e.read + e.write + e.timeout + bad,
    threads = #threads,
  }
  io.write("openloop ", json(out), "\n")
end
