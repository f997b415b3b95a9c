-- Random mixes of calls, cancels, stops and crashes (a fixed seed, so a
-- failure can be replayed), across the three worker modes: every future
-- settles, and each one tells the truth about how.
local corral = require "corral"

local W = corral.worker {
  echo = function(_, x) return x end,
  nap = function(_, s, x) corral.sleep(s); return x end,
  spin = function(_, n, x) local a = 0 for i = 1, n do a = a + i end return x end,
  boom = function(_, x) error({ x = x }) end,
  quit = function() os.exit(7) end,
  plus = function(_, a, b) return a + b end,
}

local function run(seed, ops)
  math.randomseed(seed)
  local rnd = math.random
  local modes = { "thread", "thread", "async", "sync" }
  local ws, fs, expect = {}, {}, {}
  local cancelled_ok = {} -- futures whose cancel() returned true
  local function worker()
    if #ws == 0 or rnd() < 0.08 then
      local mode = modes[rnd(#modes)]
      ws[#ws + 1] = W:options { mode = mode, workers = rnd(2),
        max_concurrency = rnd(3), max_queued = rnd(8) }:init()
    end
    return ws[rnd(#ws)]
  end
  for i = 1, ops do
    local r = rnd()
    local w = worker()
    local f
    if r < 0.3 then
      f = w:echo(i)
      expect[f] = i
    elseif r < 0.5 then
      f = w:nap(rnd() * 0.01, i)
      expect[f] = i
    elseif r < 0.6 then
      f = w:spin(rnd(20000), i)
      expect[f] = i
    elseif r < 0.7 then
      f = w:boom(i)
    elseif r < 0.72 and w._mode == "thread" then
      f = w:quit()
    elseif r < 0.85 and #fs > 0 then
      -- a call whose input is an earlier call (perhaps failed or cancelled)
      local input = fs[rnd(#fs)]
      f = w:plus(input, 1)
    elseif r < 0.95 and #fs > 0 then
      local victim = fs[rnd(#fs)]
      if victim:cancel() then cancelled_ok[victim] = true end
    else
      local ok = w:stop { drain = rnd() < 0.5, timeout = rnd() < 0.5 and 0.01 or nil }
      assert.is_boolean(ok)
    end
    if f then fs[#fs + 1] = f end
    if rnd() < 0.05 then corral.sleep(0.001) end
  end
  -- every future settles: drain what is left, then stop every worker
  local _, not_done = corral.wait(fs, { timeout = 30 })
  assert.are.equal(0, #not_done, "futures left pending")
  for _, w in ipairs(ws) do
    assert.is_true(w:stop { drain = false, timeout = 10 }, tostring(w) .. " did not stop")
  end
  local counts = { done = 0, failed = 0, cancelled = 0 }
  for _, f in ipairs(fs) do
    assert.is_true(f:done())
    if cancelled_ok[f] then assert.is_true(f:cancelled(), "cancel() said true") end
    if f:cancelled() then
      counts.cancelled = counts.cancelled + 1
    elseif f:exception() then
      counts.failed = counts.failed + 1
      local e = f:exception()
      assert.is_true(corral.is_error(e), tostring(e))
      assert.is_true(e.kind == "WorkerError" or e.kind == "ClosedError" or e.kind == "WorkerCrashed"
        or e.kind == "DependencyError", e.kind)
    else
      counts.done = counts.done + 1
      if expect[f] ~= nil then assert.are.equal(expect[f], f:result()) end
    end
  end
  return counts
end

describe("random mixes of calls, cancels, stops and crashes", function()
  for _, seed in ipairs { 1, 2, 3, 42, 1234 } do
    it("settle every future, truthfully (seed " .. seed .. ")", function()
      local c = run(seed, 250)
      assert.is_true(c.done > 0 and c.failed > 0, "done " .. c.done .. ", failed " .. c.failed)
    end)
  end
end)
