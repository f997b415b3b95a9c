-- Process workers (mode = "process"): tiny calls to a pool of 2 submitted at
-- once (calls/s), one call's round trip (median, us), or a worker's start
-- until its first answer (median, ms), or a 64 MiB buffer to a worker and
-- back (median, ms). Usage: process.lua throughput|latency|start|big [N]
local corral = require "corral"
local mode = arg[1] or "throughput"
local N = tonumber(arg[2])
local W = corral.worker { inc = function(_, x) return x + 1 end, echo = function(_, b) return b end }

if mode == "big" then
  N = N or 20
  local w = W:options { mode = "process" }:init()
  local buf = corral.buffer(64 * 1024 * 1024)
  local p = buf:wptr()
  for i = 0, #buf - 1, 4096 do p[i] = i % 256 end
  w:echo(buf):result()
  local d = {}
  for i = 1, N do
    local t0 = corral.now()
    local back = w:echo(buf):result()
    d[i] = corral.now() - t0
    assert(#back == #buf)
  end
  table.sort(d)
  print(("big_ms %.3f"):format(d[math.floor(N / 2) + 1] * 1e3))
  w:stop()
  return
end

if mode == "start" then
  N = N or 20
  local d = {}
  for i = 1, N do
    local t0 = corral.now()
    local w = W:options { mode = "process" }:init()
    assert(w:inc(1):result() == 2)
    d[i] = corral.now() - t0
    w:stop()
  end
  table.sort(d)
  print(("start_ms %.2f"):format(d[math.floor(N / 2) + 1] * 1e3))
  return
end

local pool = W:options { mode = "process", workers = 2, max_queued = 1024 }:init()
corral.gather { pool:inc(1), pool:inc(2) } -- both started
if mode == "throughput" then
  N = N or 20000
  local t0 = corral.now()
  local fs = {}
  for i = 1, N do fs[i] = pool:inc(i) end
  local r = corral.gather(fs)
  assert(r[N] == N + 1)
  print(("calls_per_s %.0f"):format(N / (corral.now() - t0)))
else
  N = N or 2000
  local d = {}
  for i = 1, N do
    local t0 = corral.now()
    pool:inc(i):result()
    d[i] = corral.now() - t0
  end
  table.sort(d)
  print(("round_trip_us %.1f"):format(d[math.floor(N / 2)] * 1e6))
end
pool:stop()
