-- gather over N futures settled in random order: the CPU time gather adds
-- per future, beyond creating and settling them. Prints ns per future.
local corral = require "corral"
local N = tonumber(arg[1]) or 100000
math.randomseed(42)
local order = {}
for i = 1, N do order[i] = i end
for i = N, 2, -1 do
  local j = math.random(i)
  order[i], order[j] = order[j], order[i]
end

local function run(with_gather)
  local fs = {}
  for i = 1, N do fs[i] = corral.future() end
  collectgarbage()
  local t0 = os.clock()
  local setter = corral.spawn(function()
    for i = 1, N do fs[order[i]]:set_result(order[i]) end
  end)
  if with_gather then
    local r = corral.gather(fs)
    assert(r[N] == N)
  end
  setter:result()
  return os.clock() - t0
end

local d = {}
for i = 1, 7 do
  local base = run(false)
  local with = run(true)
  d[i] = (with - base) / N
end
table.sort(d)
print(("gather_ns_per_future %.0f"):format(math.max(d[4], 0) * 1e9))
