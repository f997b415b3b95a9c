-- luv's uv.queue_work rate (run by stock luajit with lua-luv installed).
local uv = require "luv"
local N = tonumber(arg[1]) or 200000
local done = 0
local work = uv.new_work(function(x) return x + 1 end, function() done = done + 1 end)
local t0 = uv.hrtime()
for i = 1, N do work:queue(i) end
uv.run()
assert(done == N)
print(("jobs_per_s %.0f"):format(N / ((uv.hrtime() - t0) / 1e9)))
