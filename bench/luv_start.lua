-- The peer of start.lua: a luv thread (a new Lua state on a new OS thread)
-- that answers through an async handle, N times; the median, in us.
local uv = require "luv"
local N = tonumber(arg[1]) or 50
local d = {}
for i = 1, N do
  local t0 = uv.hrtime()
  local async
  async = uv.new_async(function()
    d[i] = (uv.hrtime() - t0) / 1e3
    async:close()
  end)
  local th = uv.new_thread(function(a) a:send() end, async)
  uv.run()
  th:join()
end
table.sort(d)
print(("start_us %.0f"):format(d[math.floor(N / 2) + 1]))
