-- Process workers (mode = "process"): an instance in a child process, the
-- same API as a thread worker, frames between the two.
local corral = require "corral"
local h = require "helper"

local function run(code, limit)
  return h.run(code, limit or 60)
end

local gone = h.gone

local PID = [[
  local ffi = require "ffi"
  pcall(ffi.cdef, "int getpid(void); int kill(int, int);")
]]

describe("a process worker", function()
  local W = corral.worker {
    init = function(self, base) self.base = base or 0 end,
    add = function(self, x) self.base = self.base + x; return self.base end,
    pid = function()
      local ffi = require "ffi"
      pcall(ffi.cdef, "int getpid(void);")
      return ffi.C.getpid()
    end,
    apply = function(_, f, ...) return f(...) end,
    boom = function() error({ code = 7 }) end,
    sq = function(_, x) return x * x end,
    two = function(_, a, b) return b, a end,
    nap = function(_, s) require("corral").sleep(s); return "slept" end,
  }

  it("runs its methods in another process, with its own state and init arguments", function()
    local w = W:options { mode = "process" }:init(10)
    assert.are.equal(15, w:add(5):result(10))
    assert.are.equal(17, w:add(2):result(10)) -- state kept between calls
    local ffi = require "ffi"
    pcall(ffi.cdef, "int getpid(void);")
    local pid = w:pid():result(10)
    assert.are_not.equal(ffi.C.getpid(), pid)
    assert.is_true(w:stop { timeout = 10 })
    h.wait_until(function() return gone(pid) end, 10)
  end)

  it("takes values and functions as a thread worker does, and gives several results", function()
    local w = W:options { mode = "process" }:init()
    local k = 3
    assert.are.equal(21, w:apply(function(x) return x * k end, 7):result(10))
    local t = { a = { 1, 2, { "x" } } }
    assert.are.same(t, w:apply(function(v) return v end, t):result(10))
    assert.are.same({ "b", "a" }, { w:two("a", "b"):result(10) })
    assert.are.equal("hello", w:apply(string.lower, "HELLO"):result(10))
    w:stop()
  end)

  it("fails a call whose method raised with WorkerError, the value kept", function()
    local w = W:options { mode = "process", name = "raiser" }:init()
    local ok, e = pcall(function() return w:boom():result(10) end)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "WorkerError"), tostring(e))
    assert.are.equal(7, e.value.code)
    assert.matches("raiser:boom", e.message, 1, true)
    assert.are.equal(4, w:sq(2):result(10)) -- it serves on
    w:stop()
  end)

  it("pools, gathers, and forwards one worker's result to another without decoding it here", function()
    local pool = W:options { mode = "process", workers = 2 }:init()
    local fs = {}
    for i = 1, 50 do fs[i] = pool:sq(i) end
    local r = corral.gather(fs)
    assert.are.equal(1, r[1])
    assert.are.equal(2500, r[50])
    local decodes = function() return corral.stats()[1].decodes end
    local before = decodes()
    -- A -> B -> C: each result is the next call's input
    local a = pool:sq(2)
    local b = pool:apply(function(x) return x + 1 end, a)
    local c = pool:sq(b)
    assert.are.equal(25, c:result(10))
    assert.are.equal(1, decodes() - before) -- only the last result, asked for here
    pool:stop()
  end)

  it("refuses a worker handle as an argument with a clear CodecError", function()
    local w = W:options { mode = "process" }:init()
    local t = W:init()
    local ok, e = pcall(w.apply, w, function(x) return x end, t)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "CodecError"), tostring(e))
    assert.matches("args[2]: a worker handle cannot be sent to a process worker", e.message, 1, true)
    w:stop()
    t:stop()
  end)

  it("serves corral.submit and corral.map with mode = \"process\"", function()
    local r = corral.map(function(x) return x * 2 end, { 1, 2, 3, 4 }, { mode = "process", workers = 2 })
    assert.are.same({ 2, 4, 6, 8 }, r)
  end)

  it("drains what is queued on stop, then its process ends and is reaped", function()
    local w = W:options { mode = "process" }:init()
    local pid = w:pid():result(10)
    local fs = {}
    for i = 1, 20 do fs[i] = w:sq(i) end
    assert.is_true(w:stop { timeout = 10 })
    for i = 1, 20 do assert.are.equal(i * i, fs[i]:result()) end
    h.wait_until(function() return gone(pid) end, 10)
  end)

  it("stop{drain = false} ends a call that runs and cancels the queued ones", function()
    local w = W:options { mode = "process" }:init()
    local pid = w:pid():result(10)
    local running = w:nap(60)
    local queued = w:sq(3)
    h.wait_until(function() return running:running() end, 10)
    local t0 = corral.now()
    assert.is_true(w:stop { drain = false, timeout = 10 })
    assert.is_true(corral.now() - t0 < 5)
    assert.is_true(running:cancelled() or running:exception() ~= nil)
    assert.is_true(queued:cancelled())
    h.wait_until(function() return gone(pid) end, 10)
  end)
end)

describe("when a process worker dies", function()
  it("os.exit fails its call with WorkerCrashed naming it, and the calls after it", function()
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker { exit = function(_, c) os.exit(c) end, sq = function(_, x) return x * x end }
      local w = W:options { mode = "process", name = "exiter" }:init()
      local f, g = w:exit(3), w:sq(2)
      local ok, e = pcall(f.result, f, 10)
      print(ok, e.kind, e.message)
      ok, e = pcall(g.result, g, 10)
      print(ok, e.kind)
      w:stop()
    ]])
    assert.are.equal(0, code, err)
    assert.matches("false\tWorkerCrashed\tworker exiter crashed: os.exit(3) in exit\n", out, 1, true)
    assert.matches("\nfalse\tWorkerCrashed\n", out, 1, true)
  end)

  it("os.exit(n) in a method ends its process with status n", function()
    local W = corral.worker { exit = function(_, c) os.exit(c) end, sq = function(_, x) return x * x end,
      pid = function()
        local f = require "ffi"
        pcall(f.cdef, "int getpid(void);")
        return f.C.getpid()
      end }
    local w = W:options { mode = "process", name = "exit7" }:init()
    local pid = w:pid():result(20)
    local ok, e = pcall(function() return w:exit(7):result(20) end)
    assert.is_false(ok)
    assert.matches("os.exit(7) in exit", tostring(e), 1, true)
    -- (the calls after it fail with how its process ended: once it has, no
    -- call of ours reached it)
    h.wait_until(function() return gone(pid) end, 20)
    local msg
    h.wait_until(function()
      local ok2, e2 = pcall(function() return w:sq(2):result(20) end)
      assert.is_false(ok2)
      msg = tostring(e2)
      return msg:find("exited with status", 1, true) ~= nil
    end, 20)
    assert.matches("its process exited with status 7", msg, 1, true)
    w:stop()
  end)

  it("SIGKILL or a crash in C code fails the running call with the signal, and nothing hangs", function()
    local out, err, code = run(PID .. [[
      local corral = require "corral"
      local W = corral.worker {
        pid = function() local f = require "ffi"; pcall(f.cdef, "int getpid(void);"); return f.C.getpid() end,
        -- (`started` tells the parent the method runs: a call only handed
        -- over may not have started, and is sent again to the next process)
        nap = function(_, s, started) started:put(true) require("corral").sleep(s) end,
        segv = function() return require("ffi").cast("int *", 0)[0] end,
      }
      local k = W:options { mode = "process", name = "victim" }:init()
      local pid = k:pid():result(10)
      local started = corral.channel(1)
      local f = k:nap(60, started)
      assert(started:get(10))
      ffi.C.kill(pid, 9)
      local ok, e = pcall(f.result, f, 10)
      print(ok, e.kind, e.message)
      k:stop()
      local v = W:options { mode = "process", name = "segv" }:init()
      ok, e = pcall(function() return v:segv():result(10) end)
      print(ok, e.kind, e.message)
      v:stop()
    ]])
    assert.are.equal(0, code, err)
    assert.matches("false\tWorkerCrashed\tworker victim crashed: its process was killed by signal 9",
      out, 1, true)
    if h.preload then -- (a sanitizer turns the SIGSEGV into its own report and exit)
      assert.matches("false\tWorkerCrashed\tworker segv crashed: its process ", out, 1, true)
    else
      assert.matches("false\tWorkerCrashed\tworker segv crashed: its process was killed by signal 11",
        out, 1, true)
    end
  end)

  it("a process that sends bytes that are not frames is ended with a clear error", function()
    local W = corral.worker {
      forge = function()
        -- (descriptor 3 is this process's end of the socket to its parent)
        local ffi = require "ffi"
        pcall(ffi.cdef, "long write(int, const void *, unsigned long);")
        ffi.C.write(3, "\255\255\255\255garbage", 11)
        require("corral").sleep(30)
      end,
    }
    local w = W:options { mode = "process", name = "forger" }:init()
    local ok, e = pcall(function() return w:forge():result(20) end)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "WorkerCrashed"), tostring(e))
    assert.matches("worker forger crashed: its process sent a frame with a bad length", e.message, 1, true)
    w:stop()
  end)

  it("its children never outlive the parent", function()
    local pidfile = h.tmpname()
    local out, err = h.sh(h.quote(h.bin) .. " - " .. pidfile .. [[ <<'EOF' &
      local corral = require "corral"
      local W = corral.worker { pid = function()
        local f = require "ffi"
        pcall(f.cdef, "int getpid(void);")
        return f.C.getpid()
      end }
      local w = W:options { mode = "process" }:init()
      local f = io.open(arg[1], "w"); f:write(w:pid():result(10)); f:close()
      corral.sleep(60)
EOF
    parent=$!; i=0; while [ ! -s ]] .. pidfile .. [[ ] && [ $i -lt 500 ]; do sleep 0.02; i=$((i+1)); done
    kill -9 $parent; wait $parent; cat ]] .. pidfile)
    os.remove(pidfile)
    local child = tonumber(out)
    assert.is_true(child ~= nil, out .. err)
    h.wait_until(function() return gone(child) end, 10)
  end)
end)

describe("process workers from stock luajit", function()
  it("start their worker program without a corral binary on PATH", function()
    local out, err, code = h.sh("PATH=/usr/bin:/bin " .. h.luajit() .. " -e " .. h.quote([[
      local corral = require "corral"
      local w = corral.worker { f = function(_, x) print("in the child") return x + 1 end }
        :options { mode = "process" }:init()
      print(w:f(41):result(10))
      w:stop()
    ]]))
    assert.are.equal(0, code, err)
    assert.matches("in the child\n", out, 1, true)
    assert.matches("42\n", out, 1, true)
  end)
end)

describe("a process worker's restarts", function()
  it("restart = true starts another process; retries runs the call that was running again", function()
    local out, err, code = run(PID .. [[
      local corral = require "corral"
      local W = corral.worker {
        pid = function() local f = require "ffi"; pcall(f.cdef, "int getpid(void);"); return f.C.getpid() end,
        -- (`started` tells the parent the method runs: a call only handed
        -- over may not have started, and is sent again to the next process)
        nap = function(_, s, started) started:put(true) require("corral").sleep(s) return "slept" end,
        sq = function(_, x) return x * x end,
      }
      local w = W:options { mode = "process", restart = true, retries = 1, name = "phoenix" }:init()
      local pid = w:pid():result(10)
      local started = corral.channel(1)
      local f = w:nap(0.3, started)
      assert(started:get(10))
      ffi.C.kill(pid, 9)
      print("retried", f:result(10))
      local pid2 = w:pid():result(10)
      print("another process", pid2 ~= pid)
      w:stop()
      -- without retries the running call fails, and the instance serves on
      local v = W:options { mode = "process", restart = true, name = "phoenix2" }:init()
      pid = v:pid():result(10)
      started = corral.channel(1) -- (the retried nap put into the first one again)
      local g = v:nap(30, started)
      assert(started:get(10))
      ffi.C.kill(pid, 9)
      local ok, e = pcall(g.result, g, 10)
      print("failed", ok, e.kind, e.message)
      print("serves", v:sq(7):result(10))
      v:stop()
    ]])
    assert.are.equal(0, code, err)
    assert.matches("retried\tslept\nanother process\ttrue\n", out, 1, true)
    assert.matches("failed\tfalse\tWorkerCrashed\tworker phoenix2 crashed: its process was killed by "
      .. "signal 9",
      out, 1, true)
    assert.matches("serves\t49\n", out, 1, true)
  end)

  it("restarts at most restart_limit times, then its calls fail", function()
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker { die = function() os.exit(5) end, sq = function(_, x) return x * x end }
      local w = W:options { mode = "process", restart = true, restart_limit = 2, restart_backoff = 0,
        retries = 1,
        name = "mortal" }:init()
      for i = 1, 3 do
        assert(w:sq(i):result(10) == i * i) -- (a process of its own each time)
        local ok, e = pcall(function() return w:die():result(10) end)
        print("die", i, ok, e.kind)
      end
      local ok, e = pcall(function() return w:sq(3):result(10) end)
      print("after", ok, e.kind)
      w:stop()
    ]])
    assert.are.equal(0, code, err)
    for i = 1, 3 do assert.matches("die\t" .. i .. "\tfalse\tWorkerCrashed\n", out, 1, true) end
    assert.matches("after\tfalse\tWorkerCrashed\n", out, 1, true)
  end)

  -- The chaos test of the issue (5,000 calls; make soak runs 50,000): a
  -- pool of 4 while a killer ends a random worker every 50 ms. Every
  -- future settles; every result is right; with retries every call
  -- succeeds.
  it("a pool of 4 under a killer: every call settles, and with retries every one succeeds", function()
    local out, err, code = run(h.WORKER_CHILDREN .. [[
      local corral = require "corral"
      local N = tonumber(os.getenv("CORRAL_CHAOS_CALLS")) or 5000
      local W = corral.worker {
        sq = function(_, x) local t = os.clock() + 0.001; while os.clock() < t do end; return x * x end,
      }
      local pool = W:options { mode = "process", workers = 4, retries = 20, restart_limit = 1000,
        restart_backoff = 0 }:init()
      local stop = false
      local killer = corral.spawn(function()
        local kills = 0
        while not stop do
          corral.sleep(0.05)
          local pids = children()
          if #pids > 0 and not stop then
            ffi.C.kill(pids[math.random(#pids)], 9)
            kills = kills + 1
          end
        end
        return kills
      end)
      local fs = {}
      for i = 1, N do fs[i] = pool:sq(i) end
      local bad = 0
      for i = 1, N do
        local ok, v = pcall(fs[i].result, fs[i], 60)
        if not ok or v ~= i * i then bad = bad + 1 end
      end
      stop = true
      print("bad", bad, "kills", killer:result(10) > 0)
      pool:stop()
    ]], 120)
    assert.are.equal(0, code, err)
    assert.matches("bad\t0\tkills\ttrue\n", out, 1, true)
  end)
end)

describe("a process worker's output", function()
  it("reaches the parent's stdout and stderr a whole line at a time, prefixed with its name", function()
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker { say = function(_, tag)
        for i = 1, 500 do print(tag, i, ("x"):rep(40)) end
        io.stderr:write("done " .. tag .. "\n")
        io.write("no newline at the end")
        return true
      end }
      local a = W:options { mode = "process", name = "alpha" }:init()
      local b = W:options { mode = "process", name = "beta" }:init()
      corral.gather { a:say("A"), b:say("B") }
      a:stop() b:stop()
    ]])
    assert.are.equal(0, code, err)
    local n = 0
    for line in out:gmatch("[^\n]*\n") do
      if not line:find("no newline", 1, true) then
        n = n + 1
        local name, tag = line:match("^%[(%a+)%] (%u)\t%d+\t" .. ("x"):rep(40) .. "\n$")
        assert.is_true(name ~= nil, line)
        assert.are.equal(name == "alpha" and "A" or "B", tag)
      end
    end
    assert.are.equal(1000, n)
    assert.matches("[alpha] no newline at the end\n", out, 1, true)
    assert.matches("[alpha] done A\n", err, 1, true)
    assert.matches("[beta] done B\n", err, 1, true)
  end)
end)
