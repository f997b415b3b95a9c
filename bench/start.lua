-- Worker start-up: start a thread worker and make its first call (until it
-- answers), N times one after another; prints the median, in us. With
-- "cold" as the second argument, without the runtime's spare.
local corral = require "corral"
local N = tonumber(arg[1]) or 50
if arg[2] == "cold" then corral.config { spare_worker = false } end
local W = corral.worker { ping = function() return true end }
local d = {}
for i = 1, N do
  local t0 = corral.now()
  local w = W:init()
  assert(w:ping():result())
  d[i] = corral.now() - t0
  w:stop()
end
table.sort(d)
print(("start_us %.0f"):format(d[math.floor(N / 2) + 1] * 1e6))
