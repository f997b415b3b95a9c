-- Review 7b: an adversarial review of the fixes of review 7 (the shared
-- call path: sync turns, task lineage, cancel passed on, unwrap at any
-- depth, init reporting). Each `it` was one defect: it asserts the
-- behaviour the guide promises (all fixed; the sync turns were dropped for
-- inline sync calls, and their specs now hold that design).
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

describe("review7b: sync calls run inline", function()
  -- (review 7 had sync callers wait for turns under max_concurrency; the
  -- turns had defects of their own, and a sync call is by design inline:
  -- each caller runs its call at once. These specs hold that design.)
  it("each caller runs its call at once: max_concurrency does not apply to sync", function()
    local W = corral.worker {
      work = function(self, box)
        self.n = (self.n or 0) + 1
        self.max = math.max(self.max or 0, self.n)
        box.gate:result()
        self.n = self.n - 1
      end,
      max = function(self) return self.max end,
    }
    local w = W:options { mode = "sync", max_concurrency = 1 }:init()
    local box = setmetatable({ gate = corral.future() }, {})
    local ts = {}
    for i = 1, 3 do ts[i] = corral.spawn(function() return w:work(box) end) end
    settle_round() -- every caller is in its call, at the gate
    box.gate:set_result()
    corral.wait(ts, { timeout = 5 })
    assert.are.equal(3, w:max():result(5))
  end)

  it("A -> B -> A through sync handles does not deadlock: the task is inside one of A's calls", function()
    -- (found when sync calls waited for turns: a task inside A's call,
    -- through B, waited for a turn it held itself. Sync calls are inline
    -- now; this holds that calling back through sync handles completes.)
    local out, err = run([[
      local corral = require "corral"
      local A = corral.worker {
        go = function(_, box) corral.sleep(0); return box.b:via(box):result() end,
        back = function() return "back" end,
      }
      local B = corral.worker { via = function(_, box) return box.a:back():result() end }
      local box = setmetatable({}, {})
      box.a = A:options { mode = "sync" }:init()
      box.b = B:options { mode = "sync" }:init()
      local t = corral.spawn(function() return box.a:go(box):result() end)
      print("result", pcall(t.result, t, 5))
      os.exit(0)
    ]], 30)
    assert.matches("result\ttrue\tback", out, err)
  end)

  it("an argument unwrap cannot read fails its call; the instance's turn is not lost", function()
    -- a table whose metatable is locked with __metatable = false makes
    -- future.is_future raise inside unwrap.inputs, outside any pcall: the
    -- error leaves sync_call with `running` never decremented, so the next
    -- call waits for a turn nobody will pass on.
    local out, err = run([[
      local corral = require "corral"
      local W = corral.worker { id = function(_, x) return type(x) end }
      local w = W:options { mode = "sync" }:init()
      local locked = setmetatable({}, { __metatable = false })
      -- (the bad call from a task of its own: the error also leaves that
      -- task's `_inst` set to the instance, which would let the main task
      -- in as "re-entrant")
      corral.spawn(function() return w:id({ locked }) end):exception(5)
      local t = corral.spawn(function() return w:id(1):result() end)
      print("next", pcall(t.result, t, 3))
      os.exit(0)
    ]], 30)
    assert.matches("next\ttrue\tnumber", out, err)
  end)
end)

describe("review7b: async runners", function()
  it("an argument unwrap cannot read does not kill the runner (no call hangs)", function()
    -- the same error kills an async runner task: its `runners` count is
    -- never decremented, the call never settles and no later call runs
    -- (the build before the shared call path served the next call)
    local out, err = run([[
      local corral = require "corral"
      local W = corral.worker { id = function(_, x) return type(x) end }
      local w = W:options { mode = "async" }:init()
      local locked = setmetatable({}, { __metatable = false })
      local f = w:id({ locked })
      print("call settled", (pcall(f.result, f, 3)) or f:done())
      local g = w:id(1)
      print("next", pcall(g.result, g, 3))
      os.exit(0)
    ]], 30)
    assert.matches("call settled\ttrue", out, err)
    assert.matches("next\ttrue\tnumber", out, err)
  end)

  it("a done callback the caller put on an async call is not the instance's own code for stop", function()
    -- the call's future is settled on the runner task, so the callback task
    -- is spawned from it and inherits `_inst`: stop from it returns false
    -- without waiting, as if a method had called it
    local W = corral.worker { m = function() return 1 end }
    local w = W:options { mode = "async" }:init()
    local res = corral.future()
    local f = w:m()
    f:add_done_callback(function() res:set_result(w:stop { timeout = 5 }) end)
    assert.is_true(res:result(5))
  end)
end)

describe("review7b: cancel of a call whose method waits inside a nested sync call", function()
  local function script(mode)
    return ([[
      local corral = require "corral"
      local A = corral.worker {
        init = function(self)
          local B = corral.worker { nap = function(_, g) return g.f:result() end }
          self.b = B:options { mode = "sync" }:init()
          self.g = setmetatable({ f = corral.future() }, {})
          self.started = corral.future()
        end,
        go = function(self) return self.b:nap(self.g):result() end,
        running = function(self) return true end,
      }
      local a = A:options { mode = %q, max_concurrency = 2 }:init()
      local f = a:go()
      -- (the method is at its wait once a second call has run after it)
      a:running():result(5)
      corral.spawn(function() end):result()
      print("cancel", f:cancel())
      print("result", pcall(f.result, f, 3))
      a:stop { drain = false, timeout = 3 }
      os.exit(0)
    ]]):format(mode)
  end

  -- the method of a call runs a sync call that waits: the task's `_call` is
  -- the sync call then, so block suspends that one and the outer call never
  -- says it is suspended: CallFuture:cancel / the C cancel say false
  it("async: cancel of a call suspended in a nested sync call says true and cancels it", function()
    local out, err = run(script("async"), 30)
    assert.matches("cancel\ttrue", out, err)
    assert.matches("result\tfalse\tCancelledError", out, err)
  end)

  it("thread: cancel of a call suspended in a nested sync call says true", function()
    local out, err = run(script("thread"), 30)
    assert.matches("cancel\ttrue", out, err)
    assert.matches("result\tfalse\tCancelledError", out, err)
  end)
end)

describe("review7b: stop from the instance's own code", function()
  it("async: stop called from a sync method one of its methods called does not wait for itself", function()
    -- the runner's `_inst` is the sync instance's while that call runs, so
    -- stop does not see its own code and waits for a call on this very task
    local out, err = run([[
      local corral = require "corral"
      local A = corral.worker { go = function(_, box) corral.sleep(0); return box.b:halt(box):result() end }
      local B = corral.worker { halt = function(_, box) return box.a:stop() end }
      local box = setmetatable({}, {})
      box.a = A:options { mode = "async" }:init()
      box.b = B:options { mode = "sync" }:init()
      local f = box.a:go(box)
      print("result", pcall(f.result, f, 5))
      os.exit(0)
    ]], 30)
    assert.matches("result\ttrue\tfalse", out, err)
  end)

  it("sync call outside any task: stop from a task its method spawned does not wait for it", function()
    -- (busted runs this file outside any task.) A task spawned by the
    -- method of a sync call made outside any task gets no `_inst`, so its
    -- stop waits for the call that waits for it (here until the timeout).
    assert.is_nil(require("corral.sched").current())
    local W = corral.worker {
      selfstop = function(_, box)
        local t = corral.spawn(function() return box.w:stop { timeout = 3 } end)
        corral.spawn(function() end):result()
        corral.spawn(function() end):result()
        box.returned_at_once = t:done()
        return t:result()
      end,
    }
    local w = W:options { mode = "sync" }:init()
    local box = setmetatable({}, {})
    box.w = w
    w:selfstop(box)
    assert.is_true(box.returned_at_once, "stop from the method's own task waited for the instance")
  end)

  it("sync call outside any task: stop{drain=false} cannot reach it and says so", function()
    -- (the guide: a sync call made outside any task cannot be cancelled by
    -- stop; it runs to its end, and a stop with a timeout returns false)
    assert.is_nil(require("corral.sched").current())
    local W = corral.worker { nap = function(_, g) return g.f:result() end }
    local w = W:options { mode = "sync" }:init()
    local g = setmetatable({ f = corral.future() }, {})
    local stopper = corral.spawn(function()
      local r = w:stop { drain = false, timeout = 0.2 }
      g.f:set_result("released")
      return r
    end)
    local f = w:nap(g)
    assert.are.equal("released", f:result())
    assert.is_false(stopper:result(5))
  end)
end)

describe("review7b: cancels passed on", function()
  it("a task that cancelled itself before a sync call ends cancelled", function()
    -- Task:cancel counted the cancel before sync_call read `_ncancel`, so
    -- the CancelledError the method got at its wait is not passed on: the
    -- call is cancelled and the task goes on as if nothing happened
    local S = corral.worker { nap = function(_, s) corral.sleep(s) end }
    local w = S:options { mode = "sync" }:init()
    local t
    t = corral.spawn(function()
      assert(t:cancel()) -- CancelledError at its next wait, which is in the call
      w:nap(30)
      corral.sleep(0.2)
      return "kept going"
    end)
    pcall(t.result, t, 5)
    assert.is_true(t:cancelled(), "the task went on: " .. tostring(t))
  end)

  it("a task cancelled while creating a sync worker whose init waits ends cancelled", function()
    -- the sync init runs on the caller's task under xpcall: the cancel of
    -- the task is taken by init (the instance crashes with CancelledError,
    -- reported as unretrieved) and never reaches the task, which goes on
    local out, err = run([[
      local corral = require "corral"
      local S = corral.worker { init = function() corral.sleep(30) end, hi = function() return 1 end }
      local t = corral.spawn(function()
        local w = S:options { mode = "sync" }:init()
        corral.sleep(0.2)
        return "kept going"
      end)
      corral.spawn(function() end):result()
      print("cancel", t:cancel())
      pcall(t.result, t, 5)
      print("cancelled", t:cancelled())
      os.exit(0)
    ]], 30)
    assert.matches("cancel\ttrue", out, err)
    assert.matches("cancelled\ttrue", out, err)
  end)
end)

describe("review7b: init", function()
  it("async: init raising CancelledError by itself while a draining stop waits is a crash", function()
    -- a draining stop with a call queued does not cancel init; init then
    -- raises CancelledError by itself (a future it waits for is cancelled).
    -- `inst.stopping` alone decides "stopped while init ran": the queued
    -- call is quietly cancelled instead of failing with WorkerCrashed, and
    -- the failure is reported nowhere
    local gate = corral.future()
    local W = corral.worker {
      init = function(_, g) g.f:result() end,
      hi = function() return "hi" end,
    }
    local w = W:options { mode = "async" }:init(setmetatable({ f = gate }, {}))
    local f = w:hi()
    local stopper = corral.spawn(function() return w:stop { timeout = 5 } end)
    settle_round()
    gate:cancel()
    stopper:result(5)
    local ok, e = pcall(f.result, f, 5)
    assert.is_false(ok)
    assert.matches("WorkerCrashed", tostring(e))
  end)
end)

describe("review7b: unwrap", function()
  it("a future deep inside plain tables is replaced at any depth (no stack overflow in the copy)", function()
    -- inputs() finds it with an explicit stack, but values() copies with a
    -- recursive replace: 20000 tables deep fails the call with
    -- "WorkerError: stack overflow"
    local W = corral.worker {
      deep = function(_, t)
        local d, n = t, 0
        while d.next do d, n = d.next, n + 1 end
        return n, d.v
      end,
    }
    for _, mode in ipairs { "sync", "async" } do
      local w = W:options { mode = mode }:init()
      local fut = corral.future()
      fut:set_result("bottom")
      local root = {}
      local d = root
      for _ = 1, 20000 do
        d.next = {}
        d = d.next
      end
      d.v = fut
      local f = w:deep(root)
      local ok, n, v = pcall(f.result, f, 10)
      assert.is_true(ok, mode .. ": " .. tostring(n))
      assert.are.equal(20000, n)
      assert.are.equal("bottom", v)
    end
  end)
end)
