-- fanout.lua: fan work out over tasks, with a progress bar, a timeout, and
-- errors kept apart from results. Run it with `make demo` or
-- `bin/corral examples/fanout.lua [N]`.
local corral = require "corral"

local n = tonumber(arg[1]) or 40

-- A pretend fetch: waits a while, and now and then fails.
local function fetch(i)
  corral.sleep(0.02 + (i * 7919 % 13) / 100)
  if i % 11 == 0 then error(("item %d: upstream said no"):format(i), 0) end
  return ("item %d"):format(i), i * i
end

local jobs = {}
for i = 1, n do jobs[i] = corral.spawn(fetch, i) end

local t0 = corral.now()
local results = corral.gather(jobs, {
  return_exceptions = true,
  progress = { desc = "fetching" },
  timeout = 30,
})

local ok, failed = 0, {}
for i, r in ipairs(results) do
  if jobs[i]:exception() then failed[#failed + 1] = r else ok = ok + 1 end
end
print(("%d fetched, %d failed, in %.2f s (one at a time would take %.1f s)"):format(
  ok, #failed, corral.now() - t0, n * 0.08))
for _, e in ipairs(failed) do print("  failed: " .. e.message) end -- (tostring(e) adds the traceback)

-- The first of several to answer wins; the rest are cancelled.
local racers = {}
for i = 1, 3 do
  racers[i] = corral.spawn(function()
    corral.sleep(0.05 * i)
    return "racer " .. i
  end)
end
local done, pending = corral.wait(racers, { return_when = "FIRST_COMPLETED" })
for _, f in ipairs(pending) do f:cancel() end
print("fastest: " .. done[1]:result())

-- CPU work goes to a pool of thread workers; a result flows from one worker
-- to the next without the script waiting for it.
local Hasher = corral.worker {
  digest = function(_, s)
    local h = 0
    for i = 1, #s do h = (h * 31 + s:byte(i)) % 4294967296 end
    return h
  end,
  label = function(_, h) return ("%08x"):format(h) end,
}
local pool = Hasher:options { workers = 2, name = "hasher" }:init()
local labels = {}
for i = 1, 8 do labels[i] = pool:label(pool:digest(("payload %d"):format(i):rep(1000))) end
print("labels: " .. table.concat(corral.gather(labels), " "))
pool:stop()
