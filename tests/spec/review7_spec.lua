-- Review 7: the shared serving of calls (worker_serve) for async, sync and
-- thread workers. Each `it` was one defect an adversarial review found: it
-- asserts the behaviour the guide promises (all fixed but the one pending).
local corral = require "corral"
local h = require "helper"

-- Run `code` with the corral binary (killed after `limit` s); stdout, stderr
-- and status.
local function run(code, limit)
  return h.run(code, limit or 30)
end

local function count(s, pat)
  local n = 0
  for _ in s:gmatch(pat) do n = n + 1 end
  return n
end

describe("review7: errors are never lost", function()
  it("async: a failed input is reported when the call taking it was cancelled before it ran", function()
    -- a fails; b takes a as its input and is cancelled while queued. By the
    -- time b's runner reaches it, a has failed: the runner reads a's error
    -- (retrieving it) and fails a b that is already cancelled, so a's
    -- failure is seen by nobody and reported nowhere.
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker { boom = function() error("input-boom", 0) end,
        use = function(_, x) return x end }
      local w = W:options { mode = "async" }:init()
      local a = w:boom()
      local b = w:use(a)
      print("cancelled", b:cancel())
      print("stopped", w:stop { timeout = 5 })
      a, b = nil, nil
      collectgarbage(); collectgarbage()
    ]])
    assert.are.equal(0, code, err)
    assert.matches("cancelled\ttrue", out)
    assert.are.equal(1, count(err, "unretrieved error"), err)
    assert.matches("input%-boom", err)
  end)

  it("thread: a failed input is reported when the call taking it was cancelled before it ran", function()
    -- (the same for thread workers: the input's failure is silenced once it
    -- is an input, and the input's taker is cancelled, so nobody reports it)
    local out, err, code = run([[
      local corral = require "corral"
      -- (boom fails only once b is cancelled: had it failed first, b would
      -- have failed with it, and cancel would rightly say false)
      local W = corral.worker { boom = function(_, go) go:wait(); error("input-boom", 0) end,
        use = function(_, x) return x end }
      local w = W:options { mode = "thread" }:init()
      local go = corral.event()
      local a = w:boom(go)
      local b = w:use(a)
      print("cancelled", b:cancel())
      go:set()
      print("stopped", w:stop { timeout = 5 })
      a, b = nil, nil
      collectgarbage(); collectgarbage()
    ]])
    assert.are.equal(0, code, err)
    assert.matches("cancelled\ttrue", out)
    assert.are.equal(1, count(err, "unretrieved error"), err)
    assert.matches("input%-boom", err)
  end)

  it("async: an init that fails with no call made is reported on stderr", function()
    -- before this change the failed init task was reported as unretrieved;
    -- now the instance's watcher retrieves it and only calls carry it
    local _, err, code = run([[
      local corral = require "corral"
      local W = corral.worker { init = function() error("init-broke", 0) end,
        hi = function() return 1 end }
      local w = W:options { mode = "async" }:init()
      -- init's task was spawned first: once this one has run, init has failed
      corral.spawn(function() end):result()
      w:stop { timeout = 5 }
    ]])
    assert.are.equal(0, code, err)
    assert.matches("init%-broke", err)
  end)

  it("thread and sync: an init that fails with no call made is reported on stderr", function()
    for _, mode in ipairs { "thread", "sync" } do
      local _, err, code = run(([[
        local corral = require "corral"
        local W = corral.worker { init = function() error("init-broke", 0) end,
          hi = function() return 1 end }
        -- (init never waits: a thread worker runs it to its end before it
        -- reads a stop; a sync one runs it inline)
        local w = W:options { mode = %q }:init()
        w:stop { timeout = 5 }
      ]]):format(mode))
      assert.are.equal(0, code, err)
      assert.matches("init%-broke", err, mode)
    end
  end)
end)

describe("review7: init", function()
  it("async: init raising CancelledError by itself crashes the instance; later calls do not hang", function()
    -- nobody stopped the worker: init waited on a future someone cancelled.
    -- The instance takes that for "stopped while init ran": the queued call
    -- is cancelled, srv.started stays false and inst.crash nil, so a call
    -- made afterwards sits in the queue for ever (and so does stop).
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker {
        init = function() local f = corral.future(); f:cancel(); f:result() end,
        hi = function() return "hi" end }
      local w = W:options { mode = "async" }:init()
      local early = w:hi()
      local e1 = early:exception(5)
      print("early", e1 and e1.kind)
      local late = w:hi()
      local ok, e2 = pcall(late.exception, late, 3)
      print("late", ok, ok and e2 and e2.kind or tostring(e2))
      print("stopped", w:stop { timeout = 3 })
    ]])
    assert.are.equal(0, code, err)
    assert.matches("early\tWorkerCrashed", out)
    assert.matches("late\ttrue\tWorkerCrashed", out)
    assert.matches("stopped\ttrue", out)
  end)

  it("thread: an init that raises CancelledError by itself crashes the worker (not 'stopped')", function()
    -- the thread worker breaks its loop as if stopped: the call it had is
    -- cancelled and later calls fail with ClosedError 'is stopped', though
    -- nobody stopped it; the guide says WorkerCrashed for a raising init
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker {
        init = function() local f = corral.future(); f:cancel(); f:result() end,
        hi = function() return "hi" end }
      local w = W:options { mode = "thread" }:init()
      local early = w:hi()
      local e1 = early:exception(5)
      print("early", e1 and e1.kind)
      local e2 = w:hi():exception(5)
      print("late", e2 and e2.kind)
      w:stop { timeout = 3 }
    ]])
    assert.are.equal(0, code, err)
    assert.matches("early\tWorkerCrashed", out)
    assert.matches("late\tWorkerCrashed", out)
  end)
end)

describe("review7: stop from the worker's own code", function()
  it("async: stop from a task that a method spawned does not wait for that instance", function()
    -- thread: core.wis_self is true for any code of the worker, stop says
    -- false at once. async: srv:runs() knows only the runner task, so stop
    -- waits for the instance to be idle, which waits for the method, which
    -- waits for this task: a deadlock
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker { halt = function(_, box)
        return corral.spawn(function() return box.w:stop() end):result()
      end }
      for _, mode in ipairs { "thread", "async" } do
        local box = setmetatable({}, {})
        local w = W:options { mode = mode }:init()
        box.w = w
        local f = w:halt(box)
        local ok, r = pcall(f.result, f, 3)
        print(mode, ok, tostring(r))
      end
    ]], 20)
    assert.matches("thread\ttrue\tfalse", out)
    assert.matches("async\ttrue\tfalse", out, err)
    assert.are.equal(0, code, err)
  end)

  it("async: stop called from init returns false and does not cancel or block init", function()
    -- with nothing queued, stop cancels the running init, which is the
    -- caller: stop raises CancelledError inside init. With a call queued it
    -- waits for idle, which waits for init: a deadlock (timeout here).
    local out, err, code = run([[
      local corral = require "corral"
      local got = {}
      local W = corral.worker {
        init = function(_, box, tag)
          local ok, r = pcall(box.w.stop, box.w, { timeout = 1 })
          got[tag] = ("%s %s"):format(tostring(ok), tostring(r))
        end,
        hi = function() return 1 end }
      local b1 = setmetatable({}, {})
      local w1 = W:options { mode = "async" }:init(b1, "idle")
      b1.w = w1
      local b2 = setmetatable({}, {})
      local w2 = W:options { mode = "async" }:init(b2, "queued")
      b2.w = w2
      local f = w2:hi()
      local t0 = corral.now()
      f:exception(5) -- (w1's init, spawned before w2's, has ended by now)
      print("idle", got.idle)
      print("queued", got.queued, corral.now() - t0 < 0.5)
    ]], 20)
    assert.are.equal(0, code, err)
    assert.matches("idle\ttrue false", out)
    assert.matches("queued\ttrue false\ttrue", out)
  end)
end)

describe("review7: sync workers", function()
  local Gate = corral.worker {
    nap = function(_, box) return box.gate:result() end,
    halt = function(_, box) return box.w:stop() end,
  }

  it("stop{drain=false} cancels a running sync call that waits, and waits for it to end", function()
    local w = Gate:options { mode = "sync" }:init()
    -- (a box with a metatable: a future in a plain table would be an input)
    local box = setmetatable({ gate = corral.future() }, {})
    local res
    local t = corral.spawn(function() res = w:nap(box) end)
    h.wait_until(function() return t:running() end, 5)
    corral.spawn(function() end):result(5) -- t is at its wait
    local stopped = w:stop { drain = false, timeout = 5 }
    local ended = t:done()
    if not box.gate:done() then box.gate:set_result("late") end
    t:result(5)
    assert.is_true(stopped)
    assert.is_true(ended, "stop returned while the sync call still ran")
    assert.is_true(res:cancelled(), "the running sync call was not cancelled: " .. tostring(res))
  end)

  it("stop{timeout=...} does not say the instance ended while a sync call still runs", function()
    local w = Gate:options { mode = "sync" }:init()
    local box = setmetatable({ gate = corral.future() }, {})
    local t = corral.spawn(function() return w:nap(box) end)
    h.wait_until(function() return t:running() end, 5)
    corral.spawn(function() end):result(5)
    local stopped = w:stop { timeout = 0.2 }
    box.gate:set_result("x")
    t:result(5)
    assert.is_false(stopped, "stop said the instance ended while its call was running")
  end)

  it("stop from one of a sync worker's own methods returns false, as for the other modes", function()
    local w = Gate:options { mode = "sync" }:init()
    local box = setmetatable({}, {})
    box.w = w
    assert.is_false(w:halt(box):result(5))
  end)

  it("a task cancelled while its sync call waits ends cancelled (the cancel is not swallowed)", function()
    local S = corral.worker { nap = function(_, s) corral.sleep(s) end }
    local w = S:options { mode = "sync" }:init()
    local t = corral.spawn(function()
      w:nap(30)
      corral.sleep(30) -- the task must not go on as if nothing happened
      return "kept going"
    end)
    h.wait_until(function() return t:running() end, 5)
    corral.spawn(function() end):result(5)
    assert.is_true(t:cancel())
    local ok, e = pcall(t.exception, t, 2)
    if not (ok and t:done()) then
      -- still sleeping its 30 s: the cancel was used up by the sync call
      t:cancel()
    end
    assert.is_true(ok, tostring(e))
    assert.is_true(t:cancelled())
  end)
end)

describe("review7: async inputs inside tables", function()
  local U = corral.worker {
    cyc = function(_, t) return t.self == t, t.self.f end,
    deep = function(_, t)
      local d = t
      for _ = 1, 120 do d = d.next end
      return d.v
    end,
  }

  it("a table with a future and a cycle arrives with its cycle (as a thread worker gets it)", function()
    local w = U:options { mode = "async" }:init()
    local fut = corral.future()
    local t = { f = fut }
    t.self = t
    local r = w:cyc(t)
    fut:set_result(42)
    local same, inner = r:result(5)
    -- the copy's `self` is the caller's original table, which still holds
    -- the future, not the copy holding 42
    assert.is_true(same)
    assert.are.equal(42, inner)
    assert.is_true(w:stop { timeout = 5 })
  end)

  it("a future deeper than 100 tables is waited for, not silently replaced by nil", function()
    local w = U:options { mode = "async" }:init()
    local bottom = corral.future()
    local top = { shallow = corral.future() } -- a shallow input: the args are rebuilt
    local d = top
    for _ = 1, 120 do
      d.next = {}
      d = d.next
    end
    d.v = bottom
    local r = w:deep(top)
    top.shallow:set_result(1)
    corral.spawn(function() end):result(5)
    bottom:set_result("deep value")
    assert.are.equal("deep value", r:result(5))
    assert.is_true(w:stop { timeout = 5 })
  end)
end)

describe("review7: async pools", function()
  it("least_active does not send every call to an instance whose init failed", function()
    -- a crashed async instance never counts a call (async_call returns before
    -- active is raised), so it always looked least active; thread pools
    -- route around a crashed instance. (The init's failure, which no call
    -- carries then, is reported once.)
    local out, err, code = run([[
      local corral = require "corral"
      local n = 0
      local W = corral.worker {
        init = function()
          n = n + 1
          if n == 1 then error("first instance broken", 0) end
        end,
        hi = function() return "hi" end,
      }
      local w = W:options { mode = "async", workers = 2, balance = "least_active" }:init()
      corral.wait({ corral.spawn(function() end) })
      local ok = 0
      for _ = 1, 10 do
        if w:hi():exception(5) == nil then ok = ok + 1 end
      end
      print("ok", ok, n)
      print("stopped", w:stop { timeout = 5 })
    ]])
    assert.are.equal(0, code, err)
    assert.matches("ok\t10\t2", out)
    assert.matches("stopped\ttrue", out)
    assert.are.equal(1, count(err, "unretrieved error"), err)
    assert.matches("first instance broken", err)
  end)
end)
