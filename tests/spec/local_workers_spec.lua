-- Async and sync workers are served by the same code as thread workers
-- (corral.worker_serve): the same order, bounds, cancel, stop and crash
-- rules, with the caller's own values (nothing is copied).
local corral = require "corral"
local h = require "helper"

local Tools = corral.worker {
  echo = function(_, ...) return ... end,
  same = function(_, a, b) return rawequal(a, b) end,
  mark = function(_, t) t.seen = true; return t end,
  nap = function(self, s, tag)
    self.started = (self.started or 0) + 1
    local ok, e = pcall(corral.sleep, s)
    if not ok then
      self.cleaned = (self.cleaned or 0) + 1
      error(e, 0)
    end
    return tag or "slept"
  end,
  counts = function(self) return self.started or 0, self.cleaned or 0 end,
  wait_for = function(_, f) return f:result() end,
  self_cancel = function(_, box) return box.f:cancel() end,
  log = function(self, x)
    self.log = self.log or {}
    self.log[#self.log + 1] = x
    return x
  end,
  get_log = function(self) return self.log end,
}

describe("async workers on the shared call path", function()
  it("take the caller's own values: a table arrives as the same table", function()
    for _, mode in ipairs { "async", "sync" } do
      local w = Tools:options { mode = mode }:init()
      local t = {}
      assert.is_true(w:same(t, t):result(5), mode)
      local back = w:mark(t):result(5)
      assert.are.equal(t, back, mode)
      assert.is_true(t.seen, mode)
      -- a value no codec could carry is fine in the caller's context
      local co = coroutine.create(function() end)
      assert.are.equal(co, w:echo(co):result(5), mode)
      w:stop()
    end
  end)

  it("run calls in the order they were made, max_concurrency at a time", function()
    local w = Tools:options { mode = "async", max_concurrency = 3 }:init()
    local fs = {}
    for i = 1, 50 do fs[i] = w:log(i) end
    corral.wait(fs)
    local log = w:get_log():result(5)
    for i = 1, 50 do assert.are.equal(i, log[i]) end
    -- at most 3 run at once: 6 naps of 0.05 s need at least two rounds
    local t0 = corral.now()
    local naps = {}
    for i = 1, 6 do naps[i] = w:nap(0.05, i) end
    assert.are.same({ 1, 2, 3, 4, 5, 6 }, corral.gather(naps))
    local dt = corral.now() - t0
    assert.is_true(dt >= 0.09, "took " .. dt)
    assert.is_true(w:stop { timeout = 5 })
  end)

  it("bound the calls a producer gets ahead by max_queued, as a thread worker's inbox does", function()
    local W = corral.worker {
      work = function(_, state)
        state.started = state.started + 1
        corral.sleep(0.001)
      end,
    }
    local w = W:options { mode = "async", max_queued = 4 }:init()
    local state, gap = { started = 0 }, 0
    for i = 1, 60 do
      w:work(state)
      -- calls made and not started: a batch of 4 taken by the runner, 4 in
      -- the queue, and this one
      gap = math.max(gap, i - state.started)
    end
    assert.is_true(gap <= 9, "the producer got " .. gap .. " calls ahead")
    assert.is_true(gap >= 4, "no call was ever queued (" .. gap .. ")")
    assert.is_true(w:stop { timeout = 5 })
    assert.are.equal(60, state.started)
  end)

  it("a caller cancelled while waiting for room: its call never runs", function()
    local w = Tools:options { mode = "async", max_queued = 1 }:init()
    local first = w:nap(30, "first")
    h.wait_until(function() return first:running() end, 5)
    local queued = w:nap(0, "queued") -- fills the queue
    local mine
    local caller = corral.spawn(function()
      mine = "waiting"
      w:nap(0, "overflow")
      mine = "returned"
    end)
    -- the caller runs from its flag to its wait for room without yielding
    h.wait_until(function() return mine == "waiting" end, 5)
    assert.is_true(caller:cancel())
    assert.is_true(corral.is_error(caller:exception(5), "CancelledError"))
    assert.is_true(first:cancel())
    assert.are.equal("queued", queued:result(5))
    assert.are.same({ 2, 1 }, { w:counts():result(5) }) -- first and queued; overflow never
    assert.is_true(w:stop { timeout = 5 })
  end)

  it("stop{drain=false} lets a caller waiting for room go with its call cancelled", function()
    local w = Tools:options { mode = "async", max_queued = 1 }:init()
    local first = w:nap(30)
    h.wait_until(function() return first:running() end, 5)
    local queued = w:nap(0)
    local got
    local caller = corral.spawn(function() got = w:nap(0, "late") end)
    h.wait_until(function() return caller:running() end, 5)
    assert.is_true(w:stop { drain = false, timeout = 5 })
    caller:result(5)
    assert.is_true(got:cancelled())
    assert.is_true(queued:cancelled())
    assert.is_true(first:cancelled())
  end)
end)

describe("async cancel is honest", function()
  it("a call waiting for its input is cancelled there and never runs", function()
    local w = Tools:options { mode = "async" }:init()
    local input = corral.future()
    local f = w:log(input)
    -- the call's runner was spawned before this task: once it has run, the
    -- runner waits for the input
    corral.spawn(function() end):result(5)
    assert.is_false(f:done())
    assert.is_true(f:cancel())
    assert.is_true(f:cancelled())
    input:set_result("x")
    assert.are.equal("after", w:log("after"):result(5))
    assert.are.same({ "after" }, w:get_log():result(5))
    assert.is_true(w:stop { timeout = 5 })
  end)

  it("a method cancelling its own running call is refused: cancel says false", function()
    local w = Tools:options { mode = "async" }:init()
    -- (a box with a metatable: a future in a plain table would be an input)
    local box = setmetatable({}, {})
    box.f = w:self_cancel(box)
    assert.is_false(box.f:result(5))
    assert.is_false(box.f:cancelled())
    assert.is_true(w:stop { timeout = 5 })
  end)

  it("a call cancelled at its wait ends cancelled; the runner serves the next call", function()
    local w = Tools:options { mode = "async" }:init()
    local f = w:nap(30)
    h.wait_until(function() return f:running() end, 5)
    local nxt = w:nap(0, "next")
    assert.is_true(f:cancel())
    assert.is_false(f:cancel())
    assert.are.equal("next", nxt:result(5))
    assert.are.same({ 2, 1 }, { w:counts():result(5) })
    assert.is_true(w:stop { timeout = 5 })
  end)

  it("a sync call inside an async method does not take the async call's cancel", function()
    local inner = Tools:options { mode = "sync" }:init()
    local W = corral.worker {
      outer = function()
        inner:echo(1) -- runs inline, on this call's runner
        corral.sleep(30)
      end,
    }
    local w = W:options { mode = "async" }:init()
    local f = w:outer()
    -- (it runs from its start to its sleep without yielding)
    h.wait_until(function() return f:running() end, 5)
    assert.is_true(f:cancel())
    assert.is_true(f:cancelled())
    assert.is_true(w:stop { timeout = 5 })
  end)
end)

describe("async init", function()
  it("a failing init fails the calls queued behind it and every later one with WorkerCrashed", function()
    local W = corral.worker {
      init = function() corral.sleep(0.01); error("no config", 0) end,
      hi = function() return "hi" end,
    }
    local w = W:options { mode = "async", name = "cfg" }:init()
    local early = w:hi()
    local e = early:exception(5)
    assert.is_true(corral.is_error(e, "WorkerCrashed"), tostring(e))
    assert.matches("cfg", e.message)
    assert.matches("no config", e.message)
    local late = w:hi():exception(5)
    assert.is_true(corral.is_error(late, "WorkerCrashed"), tostring(late))
    assert.is_true(w:stop { timeout = 5 })
  end)

  it("stop waits for an init still running, and calls made before it run after it", function()
    local W = corral.worker {
      init = function(self) corral.sleep(0.02); self.ready = true end,
      ready = function(self) return self.ready end,
    }
    local w = W:options { mode = "async" }:init()
    local f = w:ready()
    assert.is_true(w:stop { timeout = 5 })
    assert.is_true(f:result())
  end)
end)

describe("call futures", function()
  it("cannot be settled by the caller, in any mode", function()
    local W = corral.worker { nap = function() corral.sleep(30) end }
    for _, mode in ipairs { "thread", "async" } do
      local w = W:options { mode = mode }:init()
      local f = w:nap()
      local ok, e = pcall(f.set_result, f, 1)
      assert.is_false(ok)
      assert.is_true(corral.is_error(e, "UsageError"), tostring(e))
      ok, e = pcall(f.set_exception, f, "x")
      assert.is_false(ok)
      assert.is_true(corral.is_error(e, "UsageError"), tostring(e))
      assert.is_false(f:done())
      h.wait_until(function() return f:running() end, 5)
      assert.is_true(f:cancel(), mode) -- (at its wait)
      assert.is_true(w:stop { timeout = 5 })
    end
  end)
end)
