-- The orchestration toolkit: commands (`true`, 8 at a time), a pipeline of
-- three trivial stages, and file reads from 64 tasks. Prints one figure.
--   exec N: commands/s; pipeline N: items/s; fs N: reads/s
local corral = require "corral"
local mode = arg[1] or "exec"
local N = tonumber(arg[2]) or 200

if mode == "exec" then
  local slots = corral.limiter { concurrency = 8 }
  local t0 = corral.now()
  local jobs = {}
  for i = 1, N do
    jobs[i] = corral.spawn(function()
      return slots:with(1, function() return corral.exec({ "true" }):result() end)
    end)
  end
  for _, r in ipairs(corral.gather(jobs)) do assert(r.code == 0) end
  print(("commands_per_s %.1f"):format(N / (corral.now() - t0)))
elseif mode == "pipeline" then
  local p = corral.pipeline {
    { function(x) return x + 1 end },
    { function(x) return x * 2 end },
    { function(x) return x - 1 end },
    buffer = 64,
  }
  local t0 = corral.now()
  local n = 0
  for _ in p:run(function() n = n + 1; if n <= N then return n end end) do end
  print(("items_per_s %.1f"):format(N / (corral.now() - t0)))
elseif mode == "fs" then
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(("x"):rep(4096))
  f:close()
  local per = math.ceil(N / 64)
  local t0 = corral.now()
  local tasks = {}
  for i = 1, 64 do
    tasks[i] = corral.spawn(function()
      for _ = 1, per do assert(#corral.fs.read(path) == 4096) end
    end)
  end
  corral.gather(tasks)
  print(("reads_per_s %.1f"):format(64 * per / (corral.now() - t0)))
  os.remove(path)
end
