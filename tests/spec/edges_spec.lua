-- The edges an adversarial review found: handles in flight, reports of
-- errors retrieved elsewhere, os.exit under pcall and in tasks, cleanup after
-- a cancel, unwrapping in every mode, stopping from inside, signals while
-- closing. Each `it` names the behaviour the guide promises. Scripts that
-- could hang or end the process run in a child `corral` (with a hard time
-- limit), the others in-process.
local corral = require "corral"
local h = require "helper"
local run, signal_script, wait_until, exists = h.run, h.signal_script, h.wait_until, h.exists

-- ========================================================================= --
describe("handles and references", function()
  it("a worker handle sent to another worker keeps its worker running after the sender drops it", function()
    local A = corral.worker { ping = function() return "pong" end }
    local B = corral.worker {
      gate = function(_, v) return v end,
      use = function(_, a) return a:ping():result(5) end,
    }
    local b = B:init()
    local gate = corral.future()
    b:gate(gate) -- holds up the calls behind it: `use` stays queued, undecoded
    local function send()
      local a = A:options { name = "sent" }:init()
      return b:use(a) -- the handle travels; the sender's own goes out of scope
    end
    local f = send()
    -- the sender's handle is collected: only the payload holds A now...
    wait_until(function() collectgarbage(); return h.handles("sent") == 1 end)
    corral.sleep(0) -- ...through a turn of the home, whose drain stops orphans
    gate:set_result(true)
    local ok, e = pcall(f.result, f, 5)
    b:stop()
    assert.is_true(ok, tostring(e))
    assert.are.equal("pong", e)
  end)

  it("a call to a worker whose handle was collected finishes before the process ends", function()
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker { job = function() os.execute("sleep 2"); print("job finished") end }
      local function fire() W:options { name = "fire" }:init():job() end
      fire()
      -- its handle collected, a turn of the home stops it as an orphan
      local function handles()
        for _, r in ipairs(corral.stats()) do if r.name == "fire" then return r.handles end end
      end
      local t0 = corral.now()
      while handles() ~= 0 and corral.now() - t0 < 10 do collectgarbage(); corral.sleep(0.001) end
      corral.sleep(0)
      print(handles())
    ]])
    -- the guide: the process ends when no call is pending; the issue: a
    -- collected handle stops its instances once their calls are done
    assert.are.equal("0\njob finished\n", out, err)
    assert.are.equal(0, code, err)
  end)
end)

-- ========================================================================= --
describe("unretrieved errors are reported once, and only when unretrieved", function()
  it("a method that waited, then failed, is not reported when its caller retrieved the error", function()
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker { nap_fail = function() corral.sleep(0.01); error("boom") end }
      local w = W:init()
      local f = w:nap_fail()
      print(corral.is_error(f:exception(), "WorkerError"))
      w:stop()
    ]])
    assert.are.equal("true\n", out)
    assert.are.equal(0, code)
    assert.are.equal("", err)
  end)

  it("a call that waited for a failing input is not reported when its caller retrieved the error", function()
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker { id = function(_, v) return v end,
        fail = function() corral.sleep(0.02); error("upstream") end }
      local a, b = W:init(), W:init()
      local f = b:id(a:fail())
      print(f:exception().kind)
      a:stop(); b:stop()
    ]])
    assert.are.equal("DependencyError\n", out)
    assert.are.equal(0, code)
    assert.are.equal("", err)
  end)

  it("an input that had failed before the call hands its error on to the call", function()
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker { id = function(_, v) return v end }
      local w = W:init()
      local bad = corral.future()
      bad:set_exception("nope")
      print(w:id(bad):exception().kind) -- the call's error, retrieved
      w:stop()
    ]])
    assert.are.equal("DependencyError\n", out)
    assert.are.equal(0, code)
    assert.are.equal("", err)
  end)
end)

-- ========================================================================= --
describe("os.exit in a thread worker", function()
  it("code after os.exit never runs, even under pcall", function()
    local path = h.tmpname()
    os.remove(path)
    local W = corral.worker {
      bye = function(_, p)
        pcall(os.exit, 3)
        local f = io.open(p, "w")
        f:write("ran after os.exit")
        f:close()
        return "returned"
      end,
    }
    local w = W:init()
    local e = w:bye(path):exception()
    w:stop()
    local ran = exists(path)
    os.remove(path)
    assert.is_true(corral.is_error(e, "WorkerCrashed"))
    assert.is_false(ran, "the method went on after os.exit")
  end)

  it("os.exit in a task the worker spawned ends the worker then; no later call runs", function()
    local path = h.tmpname()
    os.remove(path)
    local W = corral.worker {
      bg = function() corral.spawn(function() os.exit(5) end) return "spawned" end,
      hi = function(_, p) io.open(p, "w"):close() return "hi" end,
    }
    local w = W:options { name = "bgexit" }:init()
    assert.are.equal("spawned", w:bg():result(5))
    local e = w:hi(path):exception(5)
    w:stop { timeout = 5 }
    local ran = exists(path)
    os.remove(path)
    assert.is_true(corral.is_error(e, "WorkerCrashed"), tostring(e))
    assert.are.equal(5, e.code)
    assert.is_false(ran, "a call ran after the worker's os.exit")
    assert.are_not.equal("hi", e.method)
  end)
end)

-- ========================================================================= --
describe("cancel", function()
  it("a cancelled method may still wait in its cleanup, as a cancelled task may", function()
    local W = corral.worker {
      nap = function(self)
        pcall(corral.sleep, 30)
        local ok, e = pcall(corral.sleep, 0.01) -- cleanup that waits
        self.cleanup = ok and "waited" or tostring(e)
        return "x"
      end,
      cleanup = function(self) return self.cleanup end,
    }
    local w = W:init()
    local f = w:nap()
    wait_until(function() return f:running() end)
    wait_until(function() return f:cancel() end) -- true once it is suspended in its sleep
    local got = w:cleanup():result(5)
    w:stop()
    -- a task may: spawn(function() pcall(sleep, 30); sleep(0.01) end) cleans up fine
    local t = corral.spawn(function()
      pcall(corral.sleep, 30)
      local ok, e = pcall(corral.sleep, 0.01)
      return ok and "waited" or tostring(e)
    end)
    wait_until(function() return t:running() end) -- at its sleep(30)
    assert.is_true(t:cancel())
    assert.are.equal("waited", t:result(5))
    assert.are.equal("waited", got, got)
  end)

  it("cancel on a task that yielded with coroutine.yield takes effect, or returns false", function()
    local t = corral.spawn(function()
      coroutine.yield()
      return "done anyway"
    end)
    local said
    corral.spawn(function() said = t:cancel() end)
    pcall(t.result, t, 5)
    assert.is_true(t:done())
    -- cancel() is "true when it took effect": then the task ends cancelled
    assert.are.equal(said, t:cancelled())
  end)
end)

-- ========================================================================= --
describe("async and sync workers unwrap like thread workers", function()
  for _, mode in ipairs { "async", "sync" } do
    it(mode .. ": a future input that settled with nil arrives as nil inside a table", function()
      local W = corral.worker { show = function(_, t) return corral.is_future(t.v), t.v == nil end }
      local w = W:options { mode = mode }:init()
      local fut = corral.future()
      fut:set_result(nil)
      local is_f, is_nil = w:show({ v = fut }):result(5)
      w:stop()
      assert.is_false(is_f)
      assert.is_true(is_nil)
    end)

    it(mode .. ": a DependencyError names the input that failed", function()
      local W = corral.worker { two = function(_, a, b) return a, b end }
      local w = W:options { mode = mode }:init()
      local ok, bad = corral.future(), corral.future()
      ok:set_result(1)
      bad:set_exception("nope")
      local e = w:two(ok, bad):exception(5)
      bad:exception()
      w:stop()
      assert.is_true(corral.is_error(e, "DependencyError"))
      assert.are.equal(2, e.input) -- a thread worker says 2
      assert.matches("input 2 failed", e.message)
    end)
  end
end)

-- ========================================================================= --
describe("stop", function()
  it("stop called from inside the worker's own method does not deadlock", function()
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker { selfstop = function(_, me) return me:stop() end }
      local w = W:options { name = "selfish" }:init()
      local f = w:selfstop(w)
      local ok, e = pcall(f.exception, f, 3) -- settles: a UsageError, or done
      print(ok and "settled" or tostring(e))
    ]], 20)
    assert.are.equal("settled\n", out, err)
    assert.are.equal(0, code, err)
  end)
end)

-- ========================================================================= --
describe("misuse and failures are named", function()
  it("corral.run() in a coroutine made inside a task raises a UsageError naming the misuse", function()
    local out, err, code = run([[
      local corral = require "corral"
      local t = corral.spawn(function()
        local co = coroutine.wrap(function() corral.run() return "ran" end)
        return co()
      end)
      local ok, e = pcall(t.result, t, 2)
      print(ok, corral.is_error(e, "UsageError"))
    ]])
    assert.are.equal("false\ttrue\n", out, err)
    assert.are.equal(0, code)
    assert.not_matches("attempt to call a nil value", err)
  end)

  it("an init error that cannot travel still fails the calls naming the worker and its init", function()
    local W = corral.worker {
      init = function() error({ msg = "init broke", co = coroutine.create(print) }) end,
      hi = function() return 1 end,
    }
    local w = W:options { name = "badinit" }:init()
    local e = w:hi():exception(5)
    w:stop()
    assert.is_true(corral.is_error(e, "WorkerCrashed"))
    assert.matches("badinit", e.message)
    assert.matches("init", e.message)
  end)
end)

-- ========================================================================= --
describe("backpressure and stop", function()
  it("stop() drains a call whose caller was waiting for inbox room when stop was called", function()
    -- "Nothing is dropped": the call was made before stop; a drain lets
    -- what was made before it finish
    local W = corral.worker { nap = function(_, s) corral.sleep(s) return s end }
    local w = W:options { max_queued = 1 }:init()
    local fs = {}
    local prod = corral.spawn(function() for i = 1, 3 do fs[i] = w:nap(0.5) end end)
    wait_until(function() return fs[2] ~= nil end) -- the third call now waits for room
    assert.is_nil(fs[3])
    assert.is_true(w:stop { timeout = 5 })
    prod:result(5)
    local e = fs[3]:exception(5)
    assert.is_nil(e, tostring(e))
  end)
end)

-- ========================================================================= --
describe("signals and the end of the process", function()
  it("SIGTERM while closing (workers still draining) ends the process at once with 143", function()
    local _, err, code, ms = signal_script([[
      local corral = require "corral"
      local W = corral.worker {
        init = function(_, started)
          corral.spawn(function()
            io.open(started, "w"):close()
            os.execute("sleep 6")
          end)
        end,
      }
      local started = arg[1] .. "started"
      local w = W:options { name = "drainer" }:init(started)
      local t0 = corral.now()
      while not io.open(started) and corral.now() - t0 < 5 do corral.sleep(0.01) end
      os.remove(started)
      -- finalised as the state closes, when the runtime drains its workers
      local marker = arg[1] .. 1
      CLOSING = newproxy(true)
      getmetatable(CLOSING).__gc = function() io.open(marker, "w"):close() end
    ]], "TERM", 1)
    assert.are.equal(143, code, err)
    assert.is_true(ms < 3000, ms .. " ms")
  end)

  it("a worker task that never waits does not keep the process alive for ever once main returns", function()
    local t0 = corral.now()
    local _, err, code = run([[
      local corral = require "corral"
      local W = corral.worker {
        init = function() corral.spawn(function() corral.sleep(0.01) while true do end end) end,
        hi = function() return "hi" end,
      }
      local w = W:options { name = "spinner" }:init()
      w:hi():result()
      corral.sleep(0.2)
    ]], 15)
    local dt = corral.now() - t0
    assert.is_true(dt < 10, "hung (killed after " .. dt .. " s)")
    assert.are_not.equal(137, code)
    assert.matches("spinner", err) -- says what is stuck
  end)

  it("output printed before a second Ctrl-C is not lost", function()
    -- the second SIGINT comes once the first was taken ("interrupted" is
    -- said), while the runtime gives the stuck worker its second
    local path = h.tmpname() .. ".lua"
    local f = assert(io.open(path, "w"))
    f:write([[
      local corral = require "corral"
      local W = corral.worker { forever = function() while true do end end }
      local w = W:init()
      print("printed before the signals")
      local f = w:forever()
      local t0 = corral.now()
      while not f:running() and corral.now() - t0 < 10 do corral.sleep(0.001) end
      io.open(arg[1], "w"):close()
      f:result()
    ]])
    f:close()
    local marker, errf = h.tmpname(), h.tmpname()
    os.remove(marker)
    local out, _, code = h.sh(h.quote(h.bin) .. " " .. path .. " " .. marker
      .. " 2>" .. errf .. " & pid=$!; i=0; "
      .. "while [ ! -e " .. marker .. " ] && [ $i -lt 400 ]; do sleep 0.02; i=$((i+1)); done; "
      .. "kill -INT $pid; i=0; "
      .. "while ! grep -q interrupted " .. errf .. " && [ $i -lt 400 ]; do sleep 0.01; i=$((i+1)); done; "
      .. "kill -INT $pid; wait $pid")
    -- (a watchdog is not needed: the second SIGINT, or the runtime's second, ends it)
    os.remove(path); os.remove(marker); os.remove(errf)
    assert.are.equal(130, code)
    assert.are.equal("printed before the signals\n", out)
  end)
end)
