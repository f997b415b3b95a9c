-- Tiny calls (return x + 1) to a pool of 2 thread workers: throughput, and
-- the round trip of one call at a time. Prints both.
local corral = require "corral"
local mode = arg[1] or "throughput"
local N = tonumber(arg[2]) or 200000
local W = corral.worker { inc = function(_, x) return x + 1 end }
local pool = W:options { workers = 2, max_queued = 1024 }:init()
pool:inc(0):result() -- started

if mode == "throughput" then
  local t0 = corral.now()
  local fs = {}
  for i = 1, N do fs[i] = pool:inc(i) end
  local r = corral.gather(fs)
  local dt = corral.now() - t0
  assert(r[N] == N + 1)
  print(("calls_per_s %.0f"):format(N / dt))
else
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
