-- Per-call time limits (the worker option `timeout`, every mode) and hard
-- cancellation of process workers (`cancel_grace`).
local corral = require "corral"
local h = require "helper"

local now = corral.now

local W = corral.worker {
  nap = function(_, s) require("corral").sleep(s); return "slept" end,
  sq = function(_, x) return x * x end,
  napt = function(_, path, s)
    local f = assert(io.open(path, "w")); f:close()
    require("corral").sleep(s)
  end,
  touch = function(_, path) local f = assert(io.open(path, "w")); f:close() end,
  -- a runaway loop: no wait, no hook (compiled by the JIT)
  spin = function(_, path)
    if path then local f = assert(io.open(path, "w")); f:close() end
    local x = 0
    while true do x = x + 1 end
  end,
  -- code that never waits, until `stop` exists (a thread left spinning
  -- would hold the test process at its exit)
  busy = function(_, path, stop)
    local f = assert(io.open(path, "w")); f:close()
    while true do
      local s = io.open(stop)
      if s then s:close(); return "done" end
    end
  end,
  pid = function()
    local ffi = require "ffi"
    pcall(ffi.cdef, "int getpid(void);")
    return ffi.C.getpid()
  end,
}

local function timed_out(f, limit)
  local ok, e = pcall(f.result, f, limit or 30)
  assert.is_false(ok)
  assert.is_true(corral.is_error(e, "TimeoutError"), tostring(e))
  return e
end

describe("the worker option timeout", function()
  for _, mode in ipairs { "thread", "process", "async", "sync" } do
    it("fails a call that waits too long with TimeoutError and stops it at its wait (" .. mode .. ")",
      function()
        -- (one runner: the next call is served only once the nap has
        -- stopped, long before its 60 s)
        local w = W:options { mode = mode, timeout = 0.3, name = "limited_" .. mode }:init()
        local t0 = now()
        local f = mode == "sync" and corral.spawn(function() return w:nap(60):result() end)
          or w:nap(60)
        local e = timed_out(f)
        local took = now() - t0
        assert.is_true(took >= 0.25 and took < 15, "timed out after " .. took .. " s")
        assert.matches("limited_" .. mode .. ":nap timed out after 0.3 s", e.message, 1, true)
        assert.are.equal(49, w:sq(7):result(30))
        assert.is_true(now() - t0 < 20)
        w:stop()
      end)
  end

  it("is measured from the call: a call queued behind a busy one times out and never runs", function()
    -- (the call ahead keeps its runner past both limits: code that never
    -- waits in a thread; a process whose grace is long; in an async
    -- instance, the expiries run before the freed runner does)
    for _, mode in ipairs { "thread", "process", "async" } do
      local w = W:options { mode = mode, timeout = 0.5, cancel_grace = 60,
        name = "queued_" .. mode }:init()
      local path, started, stop = h.tmpname(), h.tmpname(), h.tmpname()
      os.remove(path)
      os.remove(started)
      os.remove(stop)
      local busy = mode == "async" and w:nap(60) or w:busy(started, stop)
      local queued = w:touch(path)
      timed_out(queued)
      timed_out(busy)
      if mode == "async" then
        assert.are.equal(4, w:sq(2):result(30)) -- (served after them: the touch would have run)
        w:stop()
      else
        if mode == "process" then
          -- (the cancel reaches the child as a frame: once the child has
          -- answered it, the queued call is gone from there; a runner freed
          -- before that could still start it)
          h.wait_until(function()
            for _, r in ipairs(corral.stats()) do
              if r.name == "queued_process" then return r.active == 1 end
            end
          end, 30)
        end
        local s = assert(io.open(stop, "w")) -- the call ahead ends: the touch would run now
        s:close()
        assert.are.equal(4, w:sq(2):result(30))
        w:stop()
      end
      assert.is_false(h.exists(path), mode)
      os.remove(started)
      os.remove(stop)
    end
  end)

  it("leaves calls that end in time alone, and a script ends without waiting out the limit", function()
    local t0 = now()
    local out, err, code = h.run([[
      local corral = require "corral"
      local W = corral.worker { sq = function(_, x) return x * x end }
      for _, mode in ipairs { "thread", "process", "async", "sync" } do
        local w = W:options { mode = mode, timeout = 120 }:init()
        local fs = {}
        for i = 1, 50 do fs[i] = w:sq(i) end
        local sum = 0
        for i = 1, 50 do sum = sum + fs[i]:result() end
        print(mode, sum)
      end
    ]], 60)
    assert.are.equal(0, code, err)
    assert.are.equal("thread\t42925\nprocess\t42925\nasync\t42925\nsync\t42925\n", out)
    assert.is_true(now() - t0 < 60) -- (a live 120 s timer would hold the script)
  end)

  it("travels with a handle to another context", function()
    local w = W:options { timeout = 0.3, name = "carried" }:init()
    local Caller = corral.worker {
      go = function(_, target)
        local ok, e = pcall(function() return target:nap(60):result() end)
        return ok, e.kind
      end,
    }
    local c = Caller:init()
    assert.are.same({ false, "TimeoutError" }, { c:go(w):result(30) })
    c:stop()
    w:stop()
  end)

  it("refuses bad values with UsageError", function()
    for _, o in ipairs { { timeout = 0 }, { timeout = -1 }, { timeout = "1" },
      { cancel_grace = -1 }, { cancel_grace = 1e6 }, { cancel_grace = "x" } } do
      local ok, e = pcall(W.options, W, o)
      assert.is_false(ok)
      assert.is_true(corral.is_error(e, "UsageError"), tostring(e))
    end
  end)
end)

describe("a thread worker's running call", function()
  it("cannot be interrupted while it executes: cancel says false; a time limit fails its future", function()
    local w = W:options { timeout = 0.5, name = "runaway_thread" }:init()
    local path, stop = h.tmpname(), h.tmpname()
    os.remove(path)
    os.remove(stop)
    local f = w:busy(path, stop)
    h.wait_until(function() return h.exists(path) end, 30)
    assert.is_false(f:cancel())
    local t0 = now()
    timed_out(f)
    assert.is_true(now() - t0 < 15)
    -- (the method runs on: a stop cannot end it)
    assert.is_false(w:stop { drain = false, timeout = 0.2 })
    local s = assert(io.open(stop, "w"))
    s:close()
    assert.is_true(w:stop { timeout = 30 }) -- (it ended once it saw `stop`)
    os.remove(path)
    os.remove(stop)
  end)
end)

describe("a process worker's running call", function()
  it("is stopped by ending its process after cancel_grace, and the instance serves again", function()
    local grace = 0.5
    -- (the limit covers the next call's wait for the grace and the restart)
    local w = W:options { mode = "process", timeout = 3, cancel_grace = grace,
      name = "runaway" }:init()
    local pid = w:pid():result(30)
    local t0 = now()
    timed_out(w:spin())
    local t1 = now()
    assert.are.equal(16, w:sq(4):result(30))
    local t2 = now()
    -- (the next call waited for the grace, then for a new process)
    assert.is_true(t2 - t1 >= grace * 0.8, "served again after " .. (t2 - t1) .. " s")
    assert.is_true(t2 - t0 < 20)
    assert.are_not.equal(pid, w:pid():result(30))
    h.wait_until(function() return h.gone(pid) end, 20)
    w:stop()
  end)

  it("cancels (true) while it runs, without restart = true, and the instance serves again", function()
    local w = W:options { mode = "process", cancel_grace = 0.2, name = "cancelled_runaway",
      restart = false }:init()
    local path = h.tmpname()
    os.remove(path)
    local f = w:spin(path)
    h.wait_until(function() return h.exists(path) end, 30)
    assert.is_true(f:cancel())
    assert.is_true(f:cancelled())
    assert.is_false(f:cancel()) -- (once)
    for i = 1, 3 do assert.are.equal(i * i, w:sq(i):result(30)) end
    w:stop()
    os.remove(path)
  end)

  it("fails the calls running beside it with WorkerCrashed, or runs them again with retries", function()
    for _, retries in ipairs { 0, 1 } do
      local w = W:options { mode = "process", cancel_grace = 0.2, max_concurrency = 2,
        retries = retries, name = "beside" .. retries }:init()
      local path = h.tmpname()
      os.remove(path)
      -- (without retries it naps past the grace: the process ends under it)
      local other = w:nap(retries == 0 and 10 or 0.3)
      local f = w:spin(path)
      h.wait_until(function() return h.exists(path) end, 30)
      assert.is_true(other:running())
      assert.is_true(f:cancel())
      if retries == 0 then
        local ok, e = pcall(other.result, other, 30)
        assert.is_false(ok)
        assert.is_true(corral.is_error(e, "WorkerCrashed"), tostring(e))
        assert.matches("ended to stop a cancelled call", e.message, 1, true)
      else
        assert.are.equal("slept", other:result(30))
      end
      assert.are.equal(9, w:sq(3):result(30))
      w:stop()
      os.remove(path)
    end
  end)

  it("stops a call at its wait without ending the process when it waits", function()
    local w = W:options { mode = "process", cancel_grace = 60, name = "waits" }:init()
    local pid = w:pid():result(30)
    local path = h.tmpname()
    os.remove(path)
    local f = w:napt(path, 60)
    h.wait_until(function() return h.exists(path) end, 30)
    assert.is_true(f:cancel())
    os.remove(path)
    local t0 = now()
    assert.are.equal(4, w:sq(2):result(30))
    assert.is_true(now() - t0 < 20) -- (not the 60 s grace)
    assert.are.equal(pid, w:pid():result(30))
    w:stop()
  end)
end)
