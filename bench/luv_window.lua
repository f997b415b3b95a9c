-- The peer of window.lua: luv's uv.queue_work with at most K jobs in flight
-- (run by stock luajit with lua-luv, UV_THREADPOOL_SIZE=2 for a fair pool).
local uv = require "luv"
local K = tonumber(arg[1]) or 64
local N = tonumber(arg[2]) or 100000
local queued, done = 0, 0
local work
work = uv.new_work(function(x) return x + 1 end, function()
  done = done + 1
  if queued < N then
    queued = queued + 1
    work:queue(queued)
  end
end)
local t0 = uv.hrtime()
for _ = 1, math.min(K, N) do
  queued = queued + 1
  work:queue(queued)
end
uv.run()
assert(done == N)
print(("jobs_per_s %.0f"):format(N / ((uv.hrtime() - t0) / 1e9)))
