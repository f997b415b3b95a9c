-- The runtime tried as a careless user and as an attacker would: wrong
-- values, failures in every place, cancels and stops at the worst time.
-- Each block is a promise of the guide; the codec's own attacks are in
-- codec_attack_spec.lua.
local corral = require "corral"
local h = require "helper"
local signal_script = h.signal_script

local function elapsed(fn, ...)
  local t0 = corral.now()
  local a, b, c = fn(...)
  return corral.now() - t0, a, b, c
end

local Tools = corral.worker {
  echo = function(_, ...) return ... end,
  boom = function(_, v) error(v, 0) end,
  spin = function(_, s) local t = os.clock() while os.clock() - t < s do end return s end,
  nap = function(self, s)
    local ok, e = pcall(corral.sleep, s)
    self.cleaned = not ok and corral.is_error(e, "CancelledError")
    if not ok then error(e, 0) end
    return "slept"
  end,
  cleaned = function(self) return self.cleaned end,
}

-- ========================================================================= --
describe("failures are error objects", function()
  it("a task that raised 'bad' and one that returned 'bad' can be told apart", function()
    local raised = corral.spawn(function() error("bad", 0) end)
    local returned = corral.spawn(function() return "bad" end)
    local r = corral.gather({ raised, returned }, { return_exceptions = true })
    assert.is_true(corral.is_error(r[1], "TaskError"))
    assert.are.equal("bad", r[1].value)
    assert.are.equal("bad", r[2])
    assert.is_false(corral.is_error(r[2]))
  end)

  it("keep a raised table reachable as err.value, the same object everywhere", function()
    local t = corral.spawn(function() error({ code = 42 }) end)
    local ok, e = pcall(t.result, t)
    assert.is_false(ok)
    assert.are.equal(42, e.value.code)
    assert.are.equal(e, t:exception())
    assert.are.equal(e, corral.gather({ t }, { return_exceptions = true })[1])
  end)

  it("print a TaskError like Lua's error followed by the traceback of the raise", function()
    local function inner() error("disk full") end
    local t = corral.spawn(function() inner() end)
    local e = t:exception()
    local s = tostring(e)
    assert.matches("^[^\n]*adversarial_spec.lua:%d+: disk full\nstack traceback:", s)
    assert.matches("in function 'inner'", s)
  end)

  it("carry the worker's traceback for a plain value a method raised", function()
    local w = Tools:init()
    local e = w:boom({ code = 7 }):exception()
    assert.is_true(corral.is_error(e, "WorkerError"))
    assert.are.equal(7, e.value.code)
    assert.is_true(corral.is_error(e.cause, "TaskError"))
    assert.matches("adversarial_spec.lua", e.cause.traceback)
    w:stop()
  end)

  it("build each kind's message the same way in every mode", function()
    local msgs = {}
    for _, mode in ipairs { "thread", "async", "sync" } do
      local w = Tools:options { mode = mode, name = "m" }:init()
      local failed = corral.spawn(function() error("up", 0) end)
      local dep = w:echo(failed):exception()
      w:stop()
      local closed = w:echo(1):exception()
      assert.is_true(corral.is_error(dep, "DependencyError"), mode .. ": " .. tostring(dep))
      assert.is_true(corral.is_error(closed, "ClosedError"), mode)
      msgs[#msgs + 1] = dep.message .. "|" .. closed.message
    end
    assert.are.equal(msgs[1], msgs[2])
    assert.are.equal(msgs[1], msgs[3])
  end)
end)

-- ========================================================================= --
describe("settles are never lost", function()
  it("a future a worker made, returned and the caller settled is seen by the worker", function()
    local W = corral.worker {
      make = function(self) self.f = corral.future(); return self.f end,
      await = function(self) return self.f:result(10) end,
    }
    local w = W:init()
    local f = w:make():result()
    local g = w:await()
    f:set_result(42)
    assert.are.equal(42, g:result(10))
    w:stop()
  end)

  it("a future a worker returned fails with ClosedError once the worker stops", function()
    local W = corral.worker {
      later = function() return corral.spawn(function() corral.sleep(60) end) end,
      dropped = function() return corral.future() end,
    }
    local w = W:options { name = "keeper" }:init()
    local t = w:later():result()
    local d = w:dropped():result()
    assert.is_true(w:stop { drain = false, timeout = 10 })
    local e = t:exception(10)
    assert.is_true(corral.is_error(e, "ClosedError"), tostring(e))
    assert.matches("keeper", e.message)
    assert.is_not_nil(d:exception(10))
  end)
end)

-- ========================================================================= --
describe("bad input is refused with a clear error", function()
  local function usage(fn, ...)
    local ok, e = pcall(fn, ...)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "UsageError"), tostring(e))
    return e.message
  end

  it("out-of-range worker options", function()
    usage(Tools.options, Tools, { max_queued = 2 ^ 31 })
    usage(Tools.options, Tools, { max_queued = math.huge })
    usage(Tools.options, Tools, { workers = math.huge })
    usage(Tools.options, Tools, { workers = 0.5 })
    usage(corral.config, { pool_size = 1e400 })
  end)

  it("a bad CORRAL_WORKERS, naming the variable", function()
    for _, v in ipairs { "1e400", "abc", "0" } do
      local _, err, code = h.corral("require('corral').submit(print, 1):result()", "",
        "CORRAL_WORKERS=" .. v .. " ")
      assert.are.equal(1, code)
      assert.matches("CORRAL_WORKERS", err)
      assert.matches(v, err, 1, true)
    end
  end)

  it("exit codes that a process cannot have", function()
    usage(corral.exit, 256)
    usage(corral.exit, 0 / 0)
    usage(corral.exit, math.huge)
    usage(corral.exit, -1)
    local _, _, code = h.corral("require('corral').exit(3)")
    assert.are.equal(3, code)
  end)

  it("unknown options to wait, gather, as_completed, map and stop", function()
    local f = corral.spawn(function() return 1 end)
    assert.matches("unknown option 'tiemout'", usage(corral.wait, { f }, { tiemout = 1 }))
    usage(corral.gather, { f }, { tiemout = 1 })
    usage(corral.as_completed, { f }, { tiemout = 1 })
    usage(corral.map, function(x) return x end, { 1 }, { wokers = 2 })
    local w = Tools:options { mode = "sync" }:init()
    usage(w.stop, w, { drian = false })
  end)

  it("method names that belong to the handle", function()
    assert.matches("stop", usage(corral.worker, { stop = function() end }))
    usage(corral.worker, { _x = function() end })
    usage(corral.worker, { ["a\0b"] = function() end })
  end)

  it("a name with NUL does not reach another method", function()
    local W = corral.worker { x = function() return "x ran" end }
    local w = W:init()
    local e = w["x\0y"](w):exception()
    assert.is_true(corral.is_error(e, "WorkerError"))
    assert.matches("no method", e.message)
    w:stop()
  end)

  it("as_completed yields every key of a future given twice", function()
    local f = corral.spawn(function() return 1 end)
    local keys = {}
    for k in corral.as_completed({ a = f, b = f }) do keys[#keys + 1] = k end
    table.sort(keys)
    assert.are.same({ "a", "b" }, keys)
  end)

  it("waiting in a coroutine corral does not run names the misuse", function()
    local t = corral.spawn(function()
      local co = coroutine.wrap(function() return corral.sleep(0) end)
      return co()
    end)
    local e = t:exception()
    assert.is_true(corral.is_error(e, "UsageError"), tostring(e))
    assert.matches("coroutine", e.message)
  end)

  it("a done callback may wait", function()
    local f = corral.future()
    local got = corral.future()
    f:add_done_callback(function(x)
      local g = corral.spawn(function() corral.sleep(0.001); return x:result() * 2 end)
      got:set_result(g:result())
    end)
    f:set_result(21)
    assert.are.equal(42, got:result(10))
  end)
end)

-- ========================================================================= --
describe("cancel and stop tell the truth", function()
  it("a call that runs code is not cancelled: cancel returns false and it finishes", function()
    local w = Tools:init()
    local f = w:spin(0.3)
    local started = w:echo("after") -- queued behind it
    h.wait_until(function() return f:running() end, 10)
    assert.is_false(f:cancel())
    assert.are.equal(0.3, f:result(10))
    assert.are.equal("after", started:result(10))
    w:stop()
  end)

  it("a call that waits is cancelled at its wait: true, its cleanup runs, the worker goes on", function()
    local w = Tools:init()
    local f = w:nap(30)
    h.wait_until(function() return f:running() end, 10)
    assert.is_true(f:cancel())
    assert.is_true(f:cancelled())
    assert.is_true(w:cleaned():result(10))
    assert.are.equal(1, w:echo(1):result(10))
    w:stop()
  end)

  it("calls a worker has taken but not started stay cancellable", function()
    local w = Tools:init()
    local first = w:spin(0.2)
    local queued = {}
    for i = 1, 8 do queued[i] = w:echo(i) end
    h.wait_until(function() return first:running() end, 10)
    for i = 1, 8 do assert.is_true(queued[i]:cancel(), "call " .. i) end
    assert.are.equal(0.2, first:result(10))
    for i = 1, 8 do assert.is_true(queued[i]:cancelled()) end
    w:stop()
  end)

  it("stop{drain = false} runs none of the calls it cancels", function()
    local W = corral.worker {
      work = function(self, i) self.ran = (self.ran or 0) + 1; local t = os.clock()
        while os.clock() - t < 0.05 do end; return i end,
    }
    local w = W:init()
    local fs = {}
    for i = 1, 8 do fs[i] = w:work(i) end
    h.wait_until(function() return fs[1]:running() end, 10)
    assert.is_true(w:stop { drain = false, timeout = 10 })
    local ran = 0
    for i = 1, 8 do if not fs[i]:cancelled() then ran = ran + 1 end end
    assert.is_true(ran <= 1, ran .. " calls ran")
    assert.is_true(fs[8]:cancelled())
  end)

  it("a thread stop{timeout} that gives up returns false after about the timeout", function()
    local w = Tools:init()
    local f = w:spin(1.5)
    h.wait_until(function() return f:running() end, 10)
    local dt, ok = elapsed(w.stop, w, { timeout = 0.1 })
    assert.is_false(ok)
    assert.is_true(dt < 1.0, "took " .. dt)
    assert.is_true(w:stop { timeout = 10 })
  end)

  it("async: cancelling a running call cancels it and the instance goes on", function()
    local w = Tools:options { mode = "async" }:init()
    local f = w:nap(30)
    h.wait_until(function() return f:running() end, 10)
    assert.is_true(f:cancel())
    assert.is_true(f:cancelled())
    assert.is_true(w:cleaned():result(10))
    assert.are.equal("slept", w:nap(0.001):result(10))
    assert.is_true(w:stop { timeout = 1 })
  end)

  it("async: stop{timeout} gives up, and drain = false cancels the running call", function()
    local w = Tools:options { mode = "async" }:init()
    local f = w:nap(30)
    h.wait_until(function() return f:running() end, 10)
    local dt, ok = elapsed(w.stop, w, { timeout = 0.05 })
    assert.is_false(ok)
    assert.is_true(dt < 1, "took " .. dt)
    assert.is_true(w:stop { drain = false, timeout = 1 })
    assert.is_true(f:cancelled())
  end)
end)

-- ========================================================================= --
describe("workers that die say so", function()
  it("os.exit in a method ends the worker, not the process", function()
    local W = corral.worker { bye = function() os.exit(3) end, hi = function() return "hi" end }
    local w = W:options { name = "quitter" }:init()
    local f = w:bye()
    local later = w:hi()
    local e = f:exception(10)
    assert.is_true(corral.is_error(e, "WorkerCrashed"), tostring(e))
    assert.are.equal(3, e.code)
    assert.matches("os.exit%(3%) in bye", e.message)
    assert.is_true(corral.is_error(later:exception(10), "WorkerCrashed"))
    assert.is_true(corral.is_error(w:hi():exception(10), "WorkerCrashed"))
    w:stop()
  end)

  it("corral.exit in a worker ends that worker too", function()
    local W = corral.worker { bye = function() corral.exit(4) end }
    local w = W:init()
    local e = w:bye():exception(10)
    assert.is_true(corral.is_error(e, "WorkerCrashed"), tostring(e))
    assert.are.equal(4, e.code)
    w:stop()
  end)

  it("a thread that cannot start raises WorkerCrashed saying why, and stops its pool", function()
    local core = require "corral.core"
    local W = corral.worker { x = function() return 1 end }
    local base = #corral.stats()
    core.inject_fault("thread", 1)
    local ok, e = pcall(W.init, W)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "WorkerCrashed"), tostring(e))
    assert.matches("cannot start a thread for worker .*: resource temporarily unavailable", e.message)
    -- the second thread of a pool fails: the first is stopped, not left behind
    local P = W:options { workers = 3 }
    local started = corral.stats()
    core.inject_fault("thread", 0)
    assert.are.equal(base, #started)
    local calls = 0
    local real = core.worker_start
    core.worker_start = function(...)
      calls = calls + 1
      if calls == 2 then core.inject_fault("thread", 1) end
      return real(...)
    end
    ok, e = pcall(P.init, P)
    core.worker_start = real
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "WorkerCrashed"))
    assert.are.equal(base, #corral.stats())
  end)

  it("a worker whose Lua state cannot be made fails its calls with WorkerCrashed", function()
    local core = require "corral.core"
    local W = corral.worker { x = function() return 1 end }
    core.inject_fault("state", 1)
    local w = W:init()
    local e = w:x():exception(10)
    assert.is_true(corral.is_error(e, "WorkerCrashed"), tostring(e))
    assert.matches("no memory for its Lua state", e.message)
    assert.is_true(w:stop { timeout = 10 })
  end)

  it("a worker that runs out of memory anywhere in its start or its call fails cleanly", function()
    -- the worker's Lua state refuses to grow after n allocations, for n
    -- through its whole start and a first call (about 2,000 allocations):
    -- every call ends (done, or WorkerCrashed saying why), every stop
    -- returns, and nothing crashes
    local core = require "corral.core"
    local W = corral.worker { x = function(_, v) return { v = v, s = ("x"):rep(v % 50) } end }
    local kinds = {}
    for n = 1, 2600, 3 do
      core.inject_fault("alloc", n)
      local w = W:init()
      local f = w:x(n)
      local e = f:exception(10)
      local k = e and e.kind or "done"
      kinds[k] = (kinds[k] or 0) + 1
      if e then
        assert.are.equal("WorkerCrashed", e.kind, n .. ": " .. tostring(e))
        assert.matches("not enough memory", e.message)
      else
        assert.are.equal(n, f:result().v)
      end
      assert.is_true(w:stop { timeout = 10 })
    end
    assert.is_true(kinds.WorkerCrashed > 0 and kinds.done > 0)
  end)

  it("a crash in C code names the worker and the method", function()
    local _, err, code = h.corral([[
      local corral = require "corral"
      local W = corral.worker { poke = function() local ffi = require "ffi"
        return ffi.cast("int *", 0)[0] end }
      W:options { name = "poker" }:init():poke():result()
    ]])
    assert.are_not.equal(0, code)
    assert.matches("worker poker died of signal SIGSEGV while running method poke", err)
  end)
end)

-- ========================================================================= --
describe("nothing hangs", function()
  it("Ctrl-C ends the process within a second whatever the workers hold", function()
    local _, err, code, ms = signal_script([[
      local corral = require "corral"
      local W = corral.worker { nap = function(_, s) corral.sleep(s) end,
        spin = function(_, s) local t = os.clock() while os.clock() - t < s do end end }
      local naps, spins = W:options { workers = 2 }:init(), W:options { workers = 2 }:init()
      local fs = {}
      for i = 1, 8 do fs[i] = naps:nap(60); spins:spin(30) end
      local t0 = corral.now()
      while not fs[2]:running() and corral.now() - t0 < 10 do corral.sleep(0.001) end
      io.open(arg[1] .. 1, "w"):close()
      corral.sleep(60)
    ]], "INT", 1)
    assert.are.equal(130, code, err)
    -- the naps are cancelled at their waits; the spins cannot be: after a
    -- second they are named and left behind
    assert.matches("is still running method spin", err)
    assert.is_true(ms < 5000, ms .. " ms")
  end)

  it("SIGTERM is Ctrl-C: cleanup runs, unretrieved errors are reported, status 143", function()
    local out, err, code = signal_script([[
      local corral = require "corral"
      local lost = corral.spawn(function() error("nobody looked at me") end)
      io.open(arg[1] .. 1, "w"):close()
      local ok, e = pcall(corral.sleep, 60)
      print("cleanup", corral.is_error(e, "CancelledError"))
      error(e, 0)
    ]], "TERM", 1)
    assert.are.equal(143, code)
    assert.are.equal("cleanup\ttrue\n", out)
    assert.matches("terminated", err)
    assert.matches("nobody looked at me", err)
  end)

  it("a top-level error ends the process within a second whatever the workers hold", function()
    local dt, _, err, code = elapsed(h.corral, [[
      local corral = require "corral"
      local W = corral.worker { nap = function(_, s) corral.sleep(s) end }
      local w = W:options { workers = 2 }:init()
      local fs = {}
      for i = 1, 8 do fs[i] = w:nap(60) end
      local t0 = corral.now()
      while not fs[1]:running() and corral.now() - t0 < 10 do corral.sleep(0.001) end
      error("top")
    ]])
    assert.are.equal(1, code)
    assert.matches("top", err)
    assert.is_true(dt < 3, "took " .. dt)
  end)

  it("a method that never waits: stop gives up, and the process says what is stuck and ends", function()
    local dt, out, err, code = elapsed(h.corral, [[
      local corral = require "corral"
      local W = corral.worker { forever = function() while true do end end }
      local w = W:options { name = "looper" }:init()
      local f = w:forever()
      local t0 = corral.now()
      while not f:running() and corral.now() - t0 < 10 do corral.sleep(0.001) end
      t0 = corral.now()
      print(w:stop { timeout = 0.1 }, corral.now() - t0 < 1)
    ]])
    assert.are.equal("false\ttrue\n", out)
    assert.matches("worker looper is still running method forever", err)
    assert.is_true(dt < 5, "took " .. dt)
    assert.is_true(code == 0 or code == 1)
  end)

  it("a worker running a task of its own that never waits does not hold the exit", function()
    local dt, out, err, code = elapsed(h.corral, [[
      local corral = require "corral"
      local W = corral.worker {
        -- the task starts once hi has returned: its result is on its way
        hi = function() corral.spawn(function() while true do end end); return "hi" end,
      }
      local w = W:options { name = "bg" }:init()
      print(w:hi():result())
    ]])
    assert.are.equal(0, code, err)
    assert.are.equal("hi\n", out)
    assert.matches("worker bg is still running code of its own that never waits", err)
    assert.is_true(dt < 5, "took " .. dt)
  end)

  it("a call waiting on an input nothing can settle: stop says so and the process exits", function()
    local out, err, code = h.corral([[
      local corral = require "corral"
      local W = corral.worker { x = function(_, v) return v end }
      local w = W:options { name = "waiter" }:init()
      NEVER = corral.future()
      local f = w:x(NEVER)
      print("stopping")
      w:stop()
      print("not reached")
    ]])
    assert.are.equal("stopping\n", out)
    assert.are.equal(1, code)
    assert.matches("blocked on futures that nothing can settle", err)
    assert.matches("worker waiter", err)
  end)

  it("remaining work that can never finish after the main chunk returns is reported", function()
    local _, err, code = h.corral([[
      local corral = require "corral"
      local W = corral.worker { x = function(_, v) return v end }
      local w = W:options { name = "orphan" }:init()
      NEVER = corral.future()
      w:x(NEVER)
    ]])
    assert.are.equal(1, code)
    assert.matches("main chunk has returned", err)
    assert.matches("worker orphan", err)
  end)

  it("a failed chain whose last error was retrieved reports nothing", function()
    local out, err, code = h.corral([[
      local corral = require "corral"
      local W = corral.worker { boom = function() error("first") end, id = function(_, x) return x end }
      local w = W:init()
      local e = w:id(w:id(w:boom())):exception()
      print(e.kind, e.cause.kind, e.cause.cause.kind)
      w:stop()
      collectgarbage()
    ]])
    assert.are.equal(0, code, err)
    assert.are.equal("DependencyError\tDependencyError\tWorkerError\n", out)
    assert.are.equal("", err)
  end)

  it("a host that exits without corral.run() reports a failed call every time", function()
    local script = h.tmpname() .. ".lua"
    local f = assert(io.open(script, "w"))
    f:write([[
      local corral = require "corral"
      local W = corral.worker { boom = function() error("lost call") end }
      W:init():boom()
    ]])
    f:close()
    for _ = 1, 5 do
      local _, err, code = h.sh(h.luajit() .. " " .. script)
      assert.are.equal(0, code, err)
      assert.matches("lost call", err)
    end
    os.remove(script)
  end)
end)

-- ========================================================================= --
describe("resources come back", function()
  it("dropped worker handles stop their threads once their calls are done", function()
    local W = corral.worker { x = function(_, i) return i end }
    local base = #corral.stats()
    local function use_and_drop() -- no handle left in this frame's registers
      local fs = {}
      for i = 1, 50 do fs[i] = W:init():x(i) end
      for i = 1, 50 do assert.are.equal(i, fs[i]:result(10)) end
    end
    use_and_drop() -- (the collector may have reclaimed some of them already)
    collectgarbage()
    collectgarbage()
    corral.run() -- the dropped workers are pending work until they end
    assert.are.equal(base, #corral.stats())
  end)

  it("workers see corral.config, and a nested submit uses the one default pool", function()
    local before = corral.config()
    corral.config { max_queued = 7 }
    local W = corral.worker {
      cfg = function() return corral.config().max_queued end,
      nested = function() return corral.submit(function(x) return x + 1 end, 1):result() end,
    }
    local a, b = W:init(), W:init()
    assert.are.equal(7, a:cfg():result())
    assert.are.equal(2, a:nested():result())
    local rows = #corral.stats()
    assert.are.equal(2, b:nested():result())
    assert.are.equal(2, corral.submit(function(x) return x + 1 end, 1):result())
    assert.are.equal(rows, #corral.stats())
    corral.config { max_queued = before.max_queued }
    a:stop()
    b:stop()
  end)

  it("changing pool_size once the pool runs is refused", function()
    corral.submit(function() end):result()
    local ok, e = pcall(corral.config, { pool_size = corral.config().pool_size + 1 })
    assert.is_false(ok)
    assert.matches("already runs", e.message)
  end)
end)

-- ========================================================================= --
describe("large values", function()
  it("a round trip holds at most two copies besides the caller's own", function()
    if h.preload and h.preload:find("tsan") then
      pending("ThreadSanitizer's shadow memory counts in the resident size")
      return
    end
    -- the peak resident size while a 128 MiB string goes to a worker and
    -- back, beyond what the caller's string already took
    local out, err, code = h.corral([[
      local corral = require "corral"
      local ffi = require "ffi"
      ffi.cdef [=[
        struct corral_rusage { long t[4]; long maxrss; long rest[13]; };
        int getrusage(int who, struct corral_rusage *u);
      ]=]
      local function peak_mib()
        local u = ffi.new("struct corral_rusage")
        ffi.C.getrusage(0, u)
        return tonumber(u.maxrss) / 1024
      end
      local W = corral.worker { echo = function(_, s) return s end }
      local w = W:init()
      local s = string.rep("x", 128 * 2 ^ 20)
      collectgarbage()
      local base = peak_mib()
      local f = w:echo(s)
      corral.wait { f }
      assert(w:echo(1):result() == 1) -- the worker is done with the first call
      local r = f:result()
      assert(#r == #s)
      print(string.format("%.2f", (peak_mib() - base) / 128))
    ]], "", 'ASAN_OPTIONS="${ASAN_OPTIONS:-}:quarantine_size_mb=0:thread_local_quarantine_size_kb=0" ')
    assert.are.equal(0, code, err)
    local copies = tonumber(out)
    assert.is_true(copies ~= nil and copies < 2.05, "peak grew by " .. tostring(copies) .. " copies")
  end)
end)

-- ========================================================================= --
describe("output", function()
  it("lines printed by several workers at once never mix", function()
    local out, err, code = h.corral([[
      local corral = require "corral"
      local W = corral.worker { say = function(_, tag)
        for i = 1, 2000 do print(tag, i, ("x"):rep(50), tag) end end }
      local a, b = W:init(), W:init()
      corral.gather { a:say("A"), b:say("B") }
    ]], "| cat")
    assert.are.equal(0, code, err)
    local n = 0
    for line in out:gmatch("[^\n]*\n") do
      n = n + 1
      assert.matches("^([AB])\t%d+\t" .. ("x"):rep(50) .. "\t%1\n$", line)
    end
    assert.are.equal(4000, n)
  end)
end)
