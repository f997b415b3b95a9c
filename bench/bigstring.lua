-- A 16 MiB string to a worker and back: prints the round trip in MB/s.
local corral = require "corral"
local W = corral.worker { echo = function(_, s) return s end }
local w = W:init()
local s = string.rep("0123456789abcdef", 1024 * 1024)
w:echo("warm"):result()
local times = {}
for i = 1, 7 do
  local t0 = corral.now()
  local r = w:echo(s):result()
  times[i] = corral.now() - t0
  assert(#r == #s)
end
table.sort(times)
local best = times[4]
print(("round_trip_MB_per_s %.0f"):format(#s / best / 1e6))
w:stop()
