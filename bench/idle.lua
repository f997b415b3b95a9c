-- CPU time used while waiting 1 s on N pending futures. Prints ms of CPU.
local corral = require "corral"
local N = tonumber(arg[1]) or 10000
local fs = {}
for i = 1, N do fs[i] = corral.future() end
local t0 = os.clock()
local _, not_done = corral.wait(fs, { timeout = 1 })
local cpu = os.clock() - t0
assert(#not_done == N)
print(("idle_wait_cpu_ms %.2f"):format(cpu * 1000))
