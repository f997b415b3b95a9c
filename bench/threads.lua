-- Tiny calls to a pool of W thread workers (more threads than cores): N
-- calls submitted at once, then gathered. Prints calls/s.
-- Usage: threads.lua W [N]
local corral = require "corral"
local W = tonumber(arg[1]) or 2
local N = tonumber(arg[2]) or 100000
local C = corral.worker { inc = function(_, x) return x + 1 end }
local pool = C:options { workers = W, max_queued = 1024 }:init()
corral.gather((function()
  local fs = {}
  for i = 1, W do fs[i] = pool:inc(i) end
  return fs
end)()) -- every instance started
local t0 = corral.now()
local fs = {}
for i = 1, N do fs[i] = pool:inc(i) end
local r = corral.gather(fs)
assert(r[N] == N + 1)
print(("calls_per_s %.0f"):format(N / (corral.now() - t0)))
pool:stop()
