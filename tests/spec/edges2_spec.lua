-- More edges: handle counting across contexts, os.exit in any worker code,
-- cancel after delivery, a draining stop and callers waiting for room, and
-- closing. Each `it` names the behaviour the guide promises. Scripts that could
-- hang or end the process run in a child `corral` (with a hard time limit),
-- the others in-process.
local corral = require "corral"
local core = require "corral.core"
local h = require "helper"
local run, wait_until, exists, alive = h.run, h.wait_until, h.exists, h.alive

-- ========================================================================= --
describe("os.exit in a thread worker ends the worker, not the process", function()
  it("os.exit held in an upvalue of a method ends only the worker", function()
    -- `local exit = os.exit` is a common idiom; the method's upvalue travels
    -- as the C function's name and is rebuilt when the worker boots
    local out, err, code = run([[
      local corral = require "corral"
      local exit = os.exit
      local W = corral.worker { bye = function() exit(3) end }
      local w = W:options { name = "upexit" }:init()
      local e = w:bye():exception(5)
      print("still here", e and e.kind)
    ]])
    assert.are.equal("still here\tWorkerCrashed\n", out, err)
    assert.are.equal(0, code, err)
  end)

  it("code after os.exit never runs, even when called in a C call or in a coroutine of the method", function()
    local W = corral.worker {
      sort = function(_, p)
        pcall(table.sort, { 3, 2, 1 }, function() os.exit(7) end)
        io.open(p, "w"):close()
      end,
      gsub = function(_, p)
        pcall(string.gsub, "a", "a", function() os.exit(7) end)
        io.open(p, "w"):close()
      end,
      co = function(_, p)
        coroutine.resume(coroutine.create(function() os.exit(7) end))
        io.open(p, "w"):close()
      end,
    }
    local ran = {}
    for _, m in ipairs { "sort", "gsub", "co" } do
      local p = h.tmpname()
      os.remove(p)
      local w = W:init()
      local e = w[m](w, p):exception(5)
      w:stop { timeout = 5 }
      assert.is_true(corral.is_error(e, "WorkerCrashed"), m .. ": " .. tostring(e))
      if exists(p) then ran[#ran + 1] = m end
      os.remove(p)
    end
    assert.are.same({}, ran, "the method went on after os.exit in: " .. table.concat(ran, ", "))
  end)
end)

-- ========================================================================= --
describe("handle counting", function()
  it("a worker started inside another worker is not stopped as an orphan before its handle exists", function()
    -- the home stops workers with no handle at its drains; a worker that
    -- another thread is starting has none until worker_start returns
    local out, err, code = run([[
      local corral = require "corral"
      local Maker = corral.worker {
        make = function(_, n)
          local bad = {}
          for _ = 1, n do
            local l = corral.worker { hi = function() return "hi" end }:init()
            local ok, e = pcall(function() return l:hi():result(5) end)
            if not ok then bad[#bad + 1] = tostring(e) end
            l:stop()
          end
          return bad
        end,
      }
      local Leaf = corral.worker { hi = function() return "hi" end }
      local m = Maker:init()
      local f = m:make(600)
      local t0 = corral.now()
      while not f:done() and corral.now() - t0 < 50 do
        -- drop handles here, so that the home looks for orphans at its drains
        local function drop() Leaf:init() end
        drop()
        collectgarbage()
        corral.sleep(0.001)
      end
      local bad = f:result()
      print(#bad .. " failed", bad[1])
      m:stop()
    ]], 60)
    assert.are.equal("0 failed\tnil\n", out, err)
    assert.are.equal(0, code, err)
  end)

  it("a crashed worker whose handles are all gone is joined and leaves corral.stats()", function()
    local W = corral.worker { init = function() error("bad init") end, hi = function() return 1 end }
    local function start_and_drop(i)
      local w = W:options { name = "crashdrop" .. i }:init()
      assert.is_true(corral.is_error(w:hi():exception(5), "WorkerCrashed"))
    end
    for i = 1, 5 do start_and_drop(i) end
    -- an orphan stopped meanwhile would reap them: none here
    local deadline = corral.now() + 3
    local left
    repeat
      collectgarbage()
      collectgarbage()
      corral.sleep(0.01)
      left = 0
      for i = 1, 5 do
        if alive("crashdrop" .. i) then left = left + 1 end
      end
    until left == 0 or corral.now() > deadline
    assert.are.equal(0, left, left .. " crashed workers with no handle left are never joined")
  end)

  it("a worker handed to another worker's init stops when its last handle is gone", function()
    local A = corral.worker { ping = function() return "pong" end }
    local B = corral.worker {
      init = function(self, a) self.got = a:ping():result(5) end, -- uses it, does not keep it
      gc = function() collectgarbage() collectgarbage() return true end,
    }
    local b
    local function go()
      local a = A:options { name = "handed_to_init" }:init()
      b = B:options { name = "init_taker" }:init(a)
    end
    go()
    assert.is_true(b:gc():result(5))
    local deadline = corral.now() + 3
    while alive("handed_to_init") and corral.now() < deadline do
      collectgarbage()
      collectgarbage()
      b:gc():result(5)
      corral.sleep(0.01)
    end
    local still = alive("handed_to_init")
    b:stop()
    assert.is_false(still, "the worker is kept running by the other worker's boot payload")
  end)
end)

-- ========================================================================= --
describe("a draining stop and callers waiting for room", function()
  it("a draining stop ends when a caller that waited for room is cancelled after the drain", function()
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker { nap = function(_, s, mark)
        corral.sleep(s)
        if mark then io.open(mark, "w"):close() end
        return s
      end }
      local w = W:options { max_queued = 1, name = "drainer" }:init()
      local mark = os.tmpname(); os.remove(mark)
      local fs = { w:nap(0.1), w:nap(0, mark) } -- one running, one queued: full
      -- P runs on the next turn and, within that run, is left waiting for
      -- room; S asks for the stop within its first run too
      local waiting, asked = false, false
      local P = corral.spawn(function() waiting = true; fs[3] = w:nap(0) end)
      local S = corral.spawn(function() asked = true; return w:stop { timeout = 3 } end)
      local t1 = corral.now()
      while not (waiting and asked) and corral.now() - t1 < 5 do corral.sleep(0) end
      -- this task runs code (the loop does not turn) while the worker
      -- drains its two calls and parks: P's room came, P has not run yet
      local t0 = corral.now()
      while not io.open(mark) and corral.now() - t0 < 5 do end
      local function parked() -- nothing in its inbox, nothing running (or ended)
        for _, r in ipairs(corral.stats()) do
          if r.name == "drainer" then return r.queued == 0 and r.running == nil end
        end
        return true
      end
      t0 = corral.now()
      while not parked() and corral.now() - t0 < 5 do end
      os.remove(mark)
      P:cancel() -- P gives up: its call never goes
      print("stopped", S:result(5))
    ]])
    assert.are.equal("stopped\ttrue\n", out, err)
    assert.are.equal(0, code, err)
  end)

  it("a draining stop ends when a caller waiting for room was in a worker that died", function()
    -- (the same with a plain luajit host that closes while a task of it
    -- waits for room: the worker is left behind as "code that never waits")
    local out, err, code = run([[
      local corral = require "corral"
      local T = corral.worker { nap = function(_, s) corral.sleep(s) return s end }
      local C = corral.worker {
        fill = function(_, t)
          -- runs once this task waits: for room, as the target is full
          corral.spawn(function() os.exit(1) end)
          return t:nap(0):result()
        end,
      }
      local t = T:options { max_queued = 1, name = "target" }:init()
      local gate = corral.future() -- holds the target's first call until the caller died
      local f1, f2 = t:nap(gate), t:nap(0)
      local c = C:options { name = "caller" }:init()
      print(c:fill(t):exception(5).kind)
      gate:set_result(0.3)
      print("stopped", t:stop { timeout = 3 })
      print(f1:result(), f2:result())
    ]])
    assert.are.equal("WorkerCrashed\nstopped\ttrue\n0.3\t0\n", out, err)
    assert.are.equal(0, code, err)
  end)

  it("stop{drain=false} cancels a call whose caller was waiting for inbox room", function()
    -- the guide: "taken by a draining stop (and cancelled by drain = false)"
    local W = corral.worker { nap = function(_, s) corral.sleep(s) return s end }
    local w = W:options { max_queued = 1 }:init()
    local fs = {}
    local prod = corral.spawn(function() for i = 1, 3 do fs[i] = w:nap(0.2) end end)
    wait_until(function() return fs[2] ~= nil end) -- the third call now waits for room
    assert.is_nil(fs[3])
    assert.is_true(w:stop { drain = false, timeout = 5 })
    prod:result(5)
    local e = fs[3]:exception(5)
    assert.is_true(fs[3]:cancelled(), tostring(e))
  end)
end)

-- ========================================================================= --
describe("stop from inside", function()
  it("stop called from inside an async worker's own method does not deadlock", function()
    -- the guide: called from one of the worker's own methods, stop does not
    -- wait for that instance and returns false
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker { selfstop = function(_, me) return me:stop() end }
      local w = W:options { mode = "async", name = "selfish" }:init()
      local f = w:selfstop(w)
      print(pcall(f.result, f, 3))
    ]])
    assert.are.equal("true\tfalse\n", out, err)
    assert.are.equal(0, code, err)
  end)
end)

-- ========================================================================= --
describe("cancel", function()
  it("a task whose cancel() returned true while its timeout was firing ends cancelled", function()
    local t_waits, c_waits = false, false
    local t = corral.spawn(function()
      local f = corral.future()
      t_waits = true
      local ok, e = pcall(f.result, f, 0.06) -- times out, or is cancelled
      if not ok and corral.is_error(e, "CancelledError") then error(e, 0) end
      return "went on"
    end)
    local said
    local c = corral.spawn(function()
      c_waits = true
      corral.sleep(0.05)
      said = t:cancel() -- t was woken by its timeout in this same turn
    end)
    -- a task runs from its flag to its wait without yielding: both wait now
    h.wait_until(function() return t_waits and c_waits end, 5)
    local t0 = corral.now()
    while corral.now() - t0 < 0.2 do end -- both deadlines pass meanwhile
    c:result(5)
    pcall(t.result, t, 5)
    assert.is_true(said)
    -- cancel() is true only when the work will not go on as if nothing happened
    assert.is_true(t:cancelled(), "cancel() said true, the task ended " .. tostring(t))
  end)

  it("a cancelled method's cleanup may wait, also when cancelled while woken but not resumed", function()
    local W = corral.worker {
      nap = function(self, marker)
        local f = corral.future()
        corral.spawn(function()
          -- (spawned: runs once the method waits on f)
          corral.spawn(function()
            coroutine.yield()            -- runs first on the next turn...
            io.open(marker, "w"):close() -- ...while the caller cancels
            local t0 = corral.now()
            while not io.open(marker .. ".cancelled") and corral.now() - t0 < 10 do end
            os.remove(marker .. ".cancelled")
          end)
          corral.spawn(function() f:set_result(true) end) -- the method resumes after it
        end)
        local ok = pcall(f.result, f) -- gets the cancel here
        local ok2, e2 = pcall(corral.sleep, 0.05) -- cleanup that waits
        self.cleanup = tostring(ok) .. " " .. (ok2 and "waited" or tostring(e2))
      end,
      cleanup = function(self) return self.cleanup end,
    }
    local w = W:init()
    local marker = h.tmpname()
    os.remove(marker)
    local f = w:nap(marker)
    wait_until(function() return exists(marker) end)
    os.remove(marker)
    assert.is_true(f:cancel())
    io.open(marker .. ".cancelled", "w"):close()
    local got = w:cleanup():result(5)
    w:stop()
    assert.are.equal("false waited", got)
  end)
end)

-- ========================================================================= --
describe("closing and dying", function()
  it("closing does not leave behind, as code that never waits, a worker whose init is waiting", function()
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker {
        init = function() corral.sleep(1.5) end,
        hi = function() return 1 end,
      }
      local w = W:options { name = "slowinit" }:init()
      print("main returns")
    ]])
    assert.are.equal("main returns\n", out)
    assert.are.equal(0, code, err)
    assert.not_matches("leaving it behind", err)
  end)

  it("a worker that runs out of memory after it started is not said to have failed to start", function()
    local W = corral.worker {
      x = function(_, v)
        -- (interpreted: LuaJIT 2.1 can crash when its allocator fails inside
        -- a compiled trace; a step-1 scan of this range finds such n, with
        -- or without corral's code around it)
        jit.off(true, true)
        local t = {}
        for i = 1, v do t[i] = { i, tostring(i) } end
        return #t
      end,
    }
    local wrong, after_start = nil, 0
    for n = 2400, 3400, 4 do
      core.inject_fault("alloc", n)
      local w = W:init()
      local served = false
      for _ = 1, 4 do
        local e = w:x(300):exception(10)
        if e == nil then
          served = true
        elseif served then
          after_start = after_start + 1
          if tostring(e.message):find("could not start", 1, true) then
            wrong = wrong or (n .. ": " .. e.message)
          end
        end
      end
      assert.is_true(w:stop { timeout = 10 })
    end
    assert.is_true(after_start > 0, "no worker ran out of memory after a call: the sweep found nothing")
    assert.is_nil(wrong, wrong)
  end)
end)
