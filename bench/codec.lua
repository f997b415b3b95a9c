-- The codec alone: encode and decode of a 100k-number table and of a tiny
-- argument list, through corral.core. Prints nanoseconds per operation.
require "corral"
local core = require "corral.core"
local what = arg[1] or "all"

local function time(label, n, fn)
  local t0 = os.clock()
  for _ = 1, n do fn() end
  print(("%-14s %10.0f ns/op"):format(label, (os.clock() - t0) / n * 1e9))
end

local big = {}
for i = 1, 100000 do big[i] = i * 1.5 end
local sbig = assert(core.encode(big))
local stiny = assert(core.encode(42, "x"))

if what == "all" or what == "big" then
  time("encode 100k", 50, function() core.encode(big) end)
  time("decode 100k", 50, function() core.decode(sbig) end)
end
if what == "all" or what == "tiny" then
  time("encode tiny", 1000000, function() core.encode(42, "x") end)
  time("decode tiny", 1000000, function() core.decode(stiny) end)
end
