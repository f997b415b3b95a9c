-- The script of examples/host/host.c: two CPU-bound thread workers crunch
-- numbers while the host draws its frames. Tasks keep two calls in flight
-- on each worker; every result comes back through corral_step, in the
-- host's frame loop, and goes into `stats` (which the host reads).
-- luacheck: globals stats running, read globals host_frame
local corral = require "corral"

-- Count the primes below n, the slow way: about 20 ms of CPU a call (more than a frame).
local Cruncher = corral.worker {
  crunch = function(_, n)
    local count = 0
    for i = 2, n - 1 do
      local prime = true
      for d = 2, math.floor(math.sqrt(i)) do
        if i % d == 0 then prime = false; break end
      end
      if prime then count = count + 1 end
    end
    return count
  end,
}

local workers = Cruncher:options { mode = "thread", workers = 2, name = "cruncher" }:init()

stats = { calls = 0, primes = 0, frame = 0 } -- (the host reads it)
running = true -- (the host sets it to false to end)

for _ = 1, 4 do
  corral.spawn(function()
    while running do
      stats.primes = workers:crunch(300000):result()
      stats.calls = stats.calls + 1
      stats.frame = host_frame() -- a host function (corral_register)
    end
  end)
end
