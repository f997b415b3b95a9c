-- Review 7c: an adversarial review of the final shared call path (inline
-- sync calls, `_inst` chains, cancel_taken, map/submit over the modes).
-- Each `it` was one defect: it asserts the behaviour the guide promises
-- (all fixed).
local corral = require "corral"
local h = require "helper"

-- Run `code` with the corral binary (killed after `limit` s); stdout, stderr
-- and status. (The binary runs the main chunk as a task.)
local function run(code, limit)
  return h.run(code, limit or 30)
end

-- Let every task queued so far run to its wait.
local function settle_round()
  corral.spawn(function() end):result(5)
end

describe("review7c: stop{drain=false} on sync calls", function()
  it("cancels a sync call whose task was woken and has not resumed yet (as async does)", function()
    -- M.stop cancels only the inline calls whose task is `_blocked`; a task
    -- woken from the method's wait but not resumed yet (`_in_block`) is
    -- skipped, so the method goes on to its next wait and the stop waits
    -- for it (an async instance cancels it through Task:cancel's
    -- `_cancel_req`: CancelledError at the wait it was woken from).
    local W = corral.worker {
      nap = function(_, g)
        g.first:result()
        g.second:result() -- the stop should have cancelled the call before this
        return "ran on"
      end,
    }
    local results = {}
    for _, mode in ipairs { "async", "sync" } do
      local w = W:options { mode = mode }:init()
      local g = setmetatable({ first = corral.future(), second = corral.future() }, {})
      local caller = corral.spawn(function() return w:nap(g):result() end)
      settle_round()
      settle_round()
      local stopper = corral.spawn(function()
        g.first:set_result() -- the method's task is woken, and runs only later
        return w:stop { drain = false, timeout = 5 }
      end)
      local stopped = stopper:result(10)
      g.second:set_result() -- (lets a call the stop missed end)
      local ok, e = pcall(caller.result, caller, 10)
      results[mode] = ("stop %s, call %s"):format(tostring(stopped),
        ok and "ran on" or tostring(corral.is_error(e, "CancelledError") and "cancelled" or e))
    end
    assert.are.equal("stop true, call cancelled", results.async)
    assert.are.equal(results.async, results.sync)
  end)

  it("from a sync method, cancels the calling method at its next wait, as thread and async do", function()
    -- the guide: the three modes serve calls the same way (cancel, stop).
    -- stop{drain=false} from a thread or async method cancels that method
    -- at its next wait; from a sync method it does not (M.stop only cancels
    -- inline calls whose task is blocked, and the caller's is running).
    local out, err = run([[
      local corral = require "corral"
      local W = corral.worker { go = function(self, box)
        box.w:stop { drain = false }
        local ok = pcall(corral.sleep, 0.05)
        return ok and "went on" or "cancelled at its next wait"
      end }
      for _, mode in ipairs { "thread", "async", "sync" } do
        local w = W:options { mode = mode }:init()
        local box = { w = w }
        if mode ~= "thread" then box = setmetatable(box, {}) end
        local f = w:go(box)
        local ok, r = pcall(f.result, f, 5)
        print(mode, ok and r or ("the call failed: " .. tostring(r)))
      end
    ]], 30)
    assert.matches("thread\tcancelled at its next wait", out, err)
    assert.matches("async\tcancelled at its next wait", out, err)
    assert.matches("\nsync\tcancelled at its next wait", out, err) -- (not async's line)
  end)
end)

describe("review7c: stop from the worker's own code", function()
  it("a sync method run in a coroutine of a task that stops its own instance returns false", function()
    -- the guide: stop called from the worker's own code does not wait for
    -- that instance and returns false. A sync call made in a coroutine of
    -- the task's own (coroutine.wrap: an iterator) runs "outside any task"
    -- for worker_local (its caller() is nil, the link goes to
    -- task.outside), but M.stop tests `me == nil`, and `me` is the task: it
    -- is not seen as the instance's own code, waits, and raises UsageError
    -- (a wait in a coroutine corral does not run).
    local W = corral.worker { halt = function(_, box) return box.w:stop() end }
    local w = W:options { mode = "sync" }:init()
    local box = setmetatable({ w = w }, {})
    local t = corral.spawn(function()
      local f = coroutine.wrap(function() return w:halt(box) end)()
      return f:result()
    end)
    local ok, r = pcall(t.result, t, 5)
    assert.is_true(ok, tostring(r))
    assert.is_false(r)
  end)
end)

describe("review7c: lineage", function()
  it("a self-rescheduling sync worker does not grow its tasks' _inst chain (memory)", function()
    -- link_on adds a link on top of the caller's chain on each sync call,
    -- even when the instance is in it already, and a task spawned inside
    -- inherits it: a method that spawns a task that calls it again (a
    -- periodic tick) grows the chain by one link per generation, held for
    -- as long as the newest task lives (about 110 bytes each; Server:runs
    -- walks all of it).
    local box = setmetatable({ n = 0, done = corral.future() }, {})
    local N = 40000
    local W = corral.worker {
      tick = function(_, b)
        b.n = b.n + 1
        if b.n == 2000 then
          collectgarbage(); collectgarbage()
          b.kb_early = collectgarbage("count")
        elseif b.n == N then
          collectgarbage(); collectgarbage()
          b.kb_late = collectgarbage("count")
          b.done:set_result()
          return
        end
        corral.spawn(function() b.w:tick(b) end)
      end,
    }
    box.w = W:options { mode = "sync" }:init()
    corral.spawn(function() box.w:tick(box) end)
    box.done:result(60)
    local grown = box.kb_late - box.kb_early
    assert.is_true(grown < 1024, ("the heap grew by %d KB over %d generations"):format(grown, N - 2000))
  end)
end)

describe("review7c: submit and map", function()
  it("corral.config{blocking=true} leaves submit returning a future and map working", function()
    -- the pools of submit and map take the process-wide `blocking` from
    -- corral.config: submit then returns the value (the guide: "returns its
    -- future") and map indexes a number ("attempt to index local 'f'")
    local out, err = run([[
      local corral = require "corral"
      corral.config { blocking = true }
      local f = corral.submit(function() return 42 end)
      print("submit", corral.is_future(f) and f:result() or ("not a future: " .. tostring(f)))
      for _, mode in ipairs { "thread", "async", "sync" } do
        local ok, r = pcall(corral.map, function(x) return x * 2 end, { 1, 2, 3 },
          { mode = mode, workers = 2 })
        print(mode, ok and table.concat(r, ",") or tostring(r))
      end
    ]], 60)
    assert.matches("submit\t42", out, err)
    assert.matches("thread\t2,4,6", out, err)
    assert.matches("async\t2,4,6", out, err)
    assert.matches("\nsync\t2,4,6", out, err)
  end)

  it("corral.map stops the pool it started when there are no items, or when it raises", function()
    -- map stops its own pool only when the last result is taken: with no
    -- items, or when a result raises, its threads run on until the handle
    -- is collected (60 failed maps with workers=4 left 100+ threads)
    local out, err = run([[
      local corral = require "corral"
      local function maps()
        local n = 0
        for _, row in ipairs(corral.stats()) do
          if tostring(row.name):match("^map") then n = n + 1 end
        end
        return n
      end
      corral.map(function(x) return x end, {}, { workers = 2 })
      print("after an empty map", maps())
      pcall(corral.map, function(x) if x == 1 then error("bad") end return x end, { 1, 2, 3, 4 },
        { workers = 2 })
      print("after a failed map", maps())
    ]], 60)
    assert.matches("after an empty map\t0", out, err)
    assert.matches("after a failed map\t0", out, err)
  end)
end)
