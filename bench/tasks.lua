-- Spawn and finish N trivial tasks, then gather them. Prints tasks/s.
local corral = require "corral"
local N = tonumber(arg[1]) or 1000000
local function nop(i) return i end
local t0 = corral.now()
local fs = {}
for i = 1, N do fs[i] = corral.spawn(nop, i) end
local r = corral.gather(fs)
local dt = corral.now() - t0
assert(r[N] == N)
print(("tasks_per_s %.0f"):format(N / dt))
