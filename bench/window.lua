-- Tiny calls to a pool of 2 thread workers with at most K in flight, the
-- results taken in order (a ring of K futures), from the main chunk or from
-- a task. Prints calls/s. Usage: window.lua K [N] [main|task]
local corral = require "corral"
local K = tonumber(arg[1]) or 64
local N = tonumber(arg[2]) or 100000
local where = arg[3] or "main"
local W = corral.worker { inc = function(_, x) return x + 1 end }
local pool = W:options { workers = 2, max_queued = 1024 }:init()
pool:inc(0):result() -- started

local function run()
  local ring = {}
  local t0 = corral.now()
  for i = 1, N do
    local slot = (i - 1) % K + 1
    local f = ring[slot]
    if f then assert(f:result() == i - K + 1) end
    ring[slot] = pool:inc(i)
  end
  for i = N + 1, N + K do
    local f = ring[(i - 1) % K + 1]
    if f then f:result() end
  end
  return N / (corral.now() - t0)
end

local rate
if where == "task" then rate = corral.spawn(run):result() else rate = run() end
print(("calls_per_s %.0f"):format(rate))
pool:stop()
