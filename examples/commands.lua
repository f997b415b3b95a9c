-- commands.lua: run 100 shell commands, at most 8 at a time, with a
-- progress bar; a command that fails or runs too long is reported, not
-- fatal. Run it with `make demo` or `bin/corral examples/commands.lua [N]`.
local corral = require "corral"

local n = tonumber(arg[1]) or 100
local slots = corral.limiter { concurrency = 8 } -- at most 8 commands at once
local running, most = 0, 0

-- One command: a short sleep, a line of output; job 42 fails, job 77 hangs.
local function job(i)
  local script = ("sleep 0.%02d; echo job %d done"):format(5 + i * 7 % 20, i)
  if i == 42 then script = "echo job 42 cannot >&2; exit 3" end
  if i == 77 then script = "sleep 60" end
  return slots:with(1, function()
    running = running + 1
    if running > most then most = running end
    local ok, r = pcall(function()
      return corral.exec({ "sh", "-c", script }, { timeout = 2 }):result()
    end)
    running = running - 1
    if not ok then error(r, 0) end
    if not r.ok then error(("job %d exited with %s: %s"):format(i, r.code, r.stderr:gsub("%s+$", "")), 0) end
    return r.stdout
  end)
end

local jobs = {}
for i = 1, n do jobs[i] = corral.spawn(job, i) end

local t0 = corral.now()
local results = corral.gather(jobs, { return_exceptions = true, progress = { desc = "commands" } })

local ok, failed = 0, {}
for i, r in ipairs(results) do
  if jobs[i]:exception() then failed[#failed + 1] = r else ok = ok + 1 end
end
print(("%d commands ran, %d failed, at most %d at once, in %.1f s"):format(ok, #failed, most,
  corral.now() - t0))
for _, e in ipairs(failed) do print("  " .. e.kind .. ": " .. e.message) end
