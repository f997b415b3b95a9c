-- Channels: ping-pong between two tasks of one context, ping-pong between
-- two thread workers (unbuffered channels: each round trip is two
-- rendezvous), and the throughput of small values from a producer task to
-- a consumer task. Prints one figure.
local corral = require "corral"
local mode = arg[1] or "local"
local N = tonumber(arg[2]) or 100000

if mode == "local" then
  local a, b = corral.channel(0), corral.channel(0)
  local echo = corral.spawn(function()
    for _ = 1, N do b:put(a:get()) end
  end)
  local t0 = corral.now()
  local main = corral.spawn(function()
    for i = 1, N do
      a:put(i)
      assert(b:get() == i)
    end
  end)
  main:result()
  echo:result()
  print(("round_trip_us %.3f"):format((corral.now() - t0) / N * 1e6))
elseif mode == "threads" then
  local P = corral.worker { run = function(_, me, other, n, first)
    if first then
      for i = 1, n do
        other:put(i)
        assert(me:get() == i)
      end
    else
      for _ = 1, n do other:put(me:get()) end
    end
    return true
  end }
  local a, b = P:init(), P:init()
  local ca, cb = corral.channel(0), corral.channel(0)
  a:run(ca, cb, 1000, true); b:run(cb, ca, 1000, false):result() -- warm
  local t0 = corral.now()
  local fa, fb = a:run(ca, cb, N, true), b:run(cb, ca, N, false)
  fa:result(); fb:result()
  print(("round_trip_us %.3f"):format((corral.now() - t0) / N * 1e6))
  a:stop(); b:stop()
else -- throughput
  local ch = corral.channel(1024)
  local t0 = corral.now()
  corral.spawn(function()
    for i = 1, N do ch:put(i) end
    ch:close()
  end)
  local n = 0
  for _ in ch:iter() do n = n + 1 end
  assert(n == N)
  print(("values_per_s %.0f"):format(N / (corral.now() - t0)))
end
