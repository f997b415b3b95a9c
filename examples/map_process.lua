-- map_process.lua: a map over a big list on process workers (one per CPU),
-- with a progress bar: CPU-bound work in separate processes, results in
-- input order. Run it with `bin/corral examples/map_process.lua [N]`.
local corral = require "corral"

local n = tonumber(arg[1]) or 2000

-- How many primes are below x (deliberately slow: trial division).
local function primes_below(x)
  local count = 0
  for k = 2, x - 1 do
    local prime = true
    for d = 2, math.floor(math.sqrt(k)) do
      if k % d == 0 then prime = false; break end
    end
    if prime then count = count + 1 end
  end
  return count
end

local items = {}
for i = 1, n do items[i] = 5000 + i * 5 end

local t0 = corral.now()
local counts = corral.map(primes_below, items,
  { mode = "process", workers = corral.config().pool_size, progress = { desc = "primes" } })
local took = corral.now() - t0

local total = 0
for i = 1, n do total = total + counts[i] end
print(("%d items on %d process workers in %.2f s; primes below %d: %d; sum of counts: %d")
  :format(n, corral.config().pool_size, took, items[n], counts[n], total))
