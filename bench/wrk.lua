-- One wrk script for every scenario of bench/run.py, driven by environment variables:
--   BENCH_MODE     static | list | cycle | chain | sso
--   BENCH_METHOD   GET or POST (static, list)
--   BENCH_PATH     request path (static, list)
--   BENCH_BODY     request body (static)
--   BENCH_CTYPE    Content-Type of the body
--   BENCH_AUTH     value of the Authorization header (optional)
--   BENCH_COOKIE   value of the Cookie header (sso)
--   BENCH_LIST     (list) file prefix: thread i reads "<prefix>.<i>", one body per line;
--                  every line is used once (codes and refresh tokens are single use) and
--                  the thread stops when its lines run out
--   (cycle) like list, but lines are "Authorization<TAB>body" used round robin
--   (chain) like list, one refresh token per line: each is sent once as
--                  BENCH_CHAIN_BODY with "{TOKEN}" replaced by it (URL-encoded), and the
--                  refresh_token of the 200 answer joins the back of the thread's queue
--                  (rotation, RFC 9700 4.14.2): the same grants are refreshed over and over,
--                  nothing is minted during the run. done() writes each thread's queue back
--                  to its file, so the next run (--repeat, --soak) goes on with live tokens;
--                  a token in flight when wrk stops is lost (its grant drops out)
--   BENCH_AUTHZ    (sso) the authorization path with query, "{N}" replaced by a unique value
--   BENCH_TOKEN    (sso) token path; BENCH_TOKEN_BODY with "{CODE}" replaced by the code
--   BENCH_EXPECT   (static, list, cycle; optional) text a 2xx answer's body must contain
--                  to count as a success (introspection answers 200 {"active":false} too)
--   BENCH_THREAD_RATE  (optional) requests/s each wrk thread sends at most, paced on a fixed
--                  schedule (an open load: the latency at a given rate, not at saturation);
--                  a thread that falls behind sends at once until it is on schedule again
-- done() prints one line "BENCH {json}" that run.py reads.
local counter = 0
local threads = {}

function setup(thread)
  thread:set("tid", counter)
  table.insert(threads, thread)
  counter = counter + 1
end

local mode = os.getenv("BENCH_MODE") or "static"
local method = os.getenv("BENCH_METHOD") or "GET"
local path = os.getenv("BENCH_PATH") or "/"
local headers = {}
if os.getenv("BENCH_CTYPE") then headers["Content-Type"] = os.getenv("BENCH_CTYPE") end
if os.getenv("BENCH_AUTH") then headers["Authorization"] = os.getenv("BENCH_AUTH") end
if os.getenv("BENCH_COOKIE") then headers["Cookie"] = os.getenv("BENCH_COOKIE") end

local lines, pos = {}, 0
chain, head, tail = {}, 1, 0  -- (chain) the thread's queue: chain[head..tail]
start_ns, end_ns = 0, 0

local function now_ns()  -- wall clock; wrk's Lua has none, so ask date(1) (twice per thread)
  local f = io.popen("date +%s%N")
  local v = tonumber(f:read("*l"))
  f:close()
  return v
end
local codes, serial = {}, 0
ok, logins = 0, 0

function init(args)
  if mode == "list" or mode == "cycle" or mode == "chain" then
    local f = io.open(os.getenv("BENCH_LIST") .. "." .. tid, "r")
    if f then
      for line in f:lines() do table.insert(lines, line) end
      f:close()
    end
  end
  if mode == "chain" then  -- the queue: every token of the file
    for _, line in ipairs(lines) do
      if line ~= "" then tail = tail + 1; chain[tail] = line end
    end
  end
  math.randomseed(os.time() + tid * 7919)
  start_ns = now_ns()
end

local static_req = nil

local chain_template = os.getenv("BENCH_CHAIN_BODY") or "{TOKEN}"
function chain_body(token)
  local encoded = string.gsub(token, "[^%w%-%._~]", function(c)
    return string.format("%%%02X", string.byte(c)) end)
  return (string.gsub(chain_template, "{TOKEN}", function() return encoded end))
end

-- pacing: wrk calls delay() before each request and waits that many milliseconds
local thread_rate = tonumber(os.getenv("BENCH_THREAD_RATE") or "0")
if thread_rate > 0 then
  local ffi = require("ffi")
  ffi.cdef[[
    struct civitas_timespec { long tv_sec; long tv_nsec; };
    int clock_gettime(int clk_id, struct civitas_timespec *tp);
  ]]
  local ts = ffi.new("struct civitas_timespec")
  local function now_ms()
    ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  end
  local interval, next_at = 1000 / thread_rate, nil
  function delay()
    local now = now_ms()
    if next_at == nil or next_at < now - 1000 then next_at = now end  -- start, or a stall
    local slot = next_at
    next_at = next_at + interval
    return math.max(0, math.floor(slot - now))
  end
end

function request()
  if mode == "static" then
    if not static_req then
      static_req = wrk.format(method, path, headers, os.getenv("BENCH_BODY"))
    end
    return static_req
  elseif mode == "list" then
    pos = pos + 1
    if pos > #lines then
      if end_ns == 0 then end_ns = now_ns() end
      wrk.thread:stop()
      pos = #lines
      return wrk.format(method, path, headers, lines[#lines] or "")
    end
    return wrk.format(method, path, headers, lines[pos])
  elseif mode == "cycle" then  -- lines "Authorization<TAB>body", used round robin
    pos = pos % #lines + 1
    local auth, body = string.match(lines[pos], "^([^\t]*)\t(.*)$")
    local h = {["Content-Type"] = headers["Content-Type"], ["Authorization"] = auth}
    return wrk.format(method, path, h, body)
  elseif mode == "chain" then
    if head > tail then  -- every grant is in flight or lost: stop (an unknown token is harmless)
      if end_ns == 0 then end_ns = now_ns() end
      wrk.thread:stop()
      return wrk.format(method, path, headers, chain_body("unknown"))
    end
    local token = chain[head]
    chain[head] = nil
    head = head + 1
    return wrk.format(method, path, headers, chain_body(token))
  else -- sso: exchange a code we got back, else ask for a new one
    if #codes > 0 then
      local code = table.remove(codes)
      local body = string.gsub(os.getenv("BENCH_TOKEN_BODY"), "{CODE}", code)
      local h = {["Content-Type"] = "application/x-www-form-urlencoded",
                 ["Authorization"] = os.getenv("BENCH_TOKEN_AUTH")}
      return wrk.format("POST", os.getenv("BENCH_TOKEN"), h, body)
    end
    serial = serial + 1
    local n = string.format("%d-%d-%d", tid, serial, math.random(1, 1000000000))
    local p = string.gsub(os.getenv("BENCH_AUTHZ"), "{N}", n)
    return wrk.format("GET", p, {["Cookie"] = os.getenv("BENCH_COOKIE")}, nil)
  end
end

if mode == "sso" then
  function response(status, hdrs, body)
    local location = hdrs["Location"] or hdrs["location"]
    if location then
      local code = string.match(location, "[?&]code=([^&]+)")
      if code then table.insert(codes, code) end
    elseif status == 200 and string.find(body or "", '"access_token"', 1, true) then
      logins = logins + 1  -- the token response of a login (not a page of /authorize)
    end
  end
elseif mode == "chain" then
  function response(status, hdrs, body)
    local token = status == 200 and string.match(body or "", '"refresh_token"%s*:%s*"([^"]+)"')
    if token then
      ok = ok + 1
      tail = tail + 1
      chain[tail] = token
    elseif first_error == nil then
      first_error = status .. " " .. string.sub(body or "", 1, 160)
    end
  end
else
  local expect = os.getenv("BENCH_EXPECT")
  function response(status, hdrs, body)
    if status < 300 and (expect == nil or string.find(body or "", expect, 1, true)) then
      ok = ok + 1
    elseif first_error == nil then first_error = status .. " " .. string.sub(body or "", 1, 160) end
  end
end

function done(summary, latency, requests)
  if mode == "chain" then  -- the live tokens, for the next run
    for _, t in ipairs(threads) do
      local q, h, tl = t:get("chain"), t:get("head"), t:get("tail")
      local f = io.open(os.getenv("BENCH_LIST") .. "." .. t:get("tid"), "w")
      for i = h, tl do f:write(q[i], "\n") end
      f:close()
    end
  end
  for _, t in ipairs(threads) do
    local e = t:get("first_error")
    if e then io.write("FIRST_ERROR " .. e .. "\n") break end
  end
  local good, completed = 0, 0
  local first, last, all_ended = nil, 0, true
  for _, t in ipairs(threads) do
    local s, e = t:get("start_ns") or 0, t:get("end_ns") or 0
    if first == nil or s < first then first = s end
    if e == 0 then all_ended = false elseif e > last then last = e end
    if mode == "sso" then good = good + (t:get("logins") or 0)
    else good = good + (t:get("ok") or 0) end
  end
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"p999_us": %d, "max_us": %d, ' ..
    '"mean_us": %.1f, "non2xx": %d, "socket_errors": %d, "good": %d, ' ..
    '"exhausted_after_us": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max,
    latency.mean, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    good, (all_ended and (mode == "list" or mode == "chain"))
      and math.floor((last - first) / 1000) or 0))
end
