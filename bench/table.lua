-- A table of 100,000 small numbers to a thread worker and back (echo):
-- the median of 20 round trips, in ms.
local corral = require "corral"
local N = tonumber(arg[1]) or 100000
local W = corral.worker { echo = function(_, t) return t end }
local w = W:init()
local t = {}
for i = 1, N do t[i] = i % 1000 end
w:echo(1):result() -- started
local d = {}
for i = 1, 20 do
  local t0 = corral.now()
  local r = w:echo(t):result()
  d[i] = corral.now() - t0
  assert(#r == N)
end
table.sort(d)
print(("table_round_trip_ms %.2f"):format(d[10] * 1e3))
w:stop()
