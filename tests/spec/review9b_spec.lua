-- Review of process workers' restarts (commit c4eff86): restart,
-- restart_limit, restart_backoff, retries; stops, the runtime ending and
-- orphans during a back-off; collateral calls; pools with a dead instance;
-- resources after many restarts. Specs marked (fixed) failed on c4eff86.
local corral = require "corral"
local h = require "helper"

local function run(code, limit)
  return h.run(code, limit or 60)
end

-- What every script starts with: ffi, the pids of this process's worker
-- children, a bounded wait, a directory for run counts.
local PRE = h.WORKER_CHILDREN .. [[
  local corral = require "corral"
  local function gone(pid)
    local f = io.open("/proc/" .. pid .. "/status")
    if f then f:close() end
    return f == nil
  end
  local function wait_until(cond, limit)
    local deadline = corral.now() + (limit or 10)
    while not cond() do
      if corral.now() > deadline then error("condition not met in time", 2) end
      corral.sleep(0.002)
    end
  end
  local function count(dir)
    local p = io.popen("ls " .. dir .. " | wc -l")
    local n = tonumber(p:read("*a"))
    p:close()
    return n
  end
  local dir = os.tmpname()
  os.remove(dir)
  os.execute("mkdir -p " .. dir)
  local W = corral.worker {
    init = function(self, base, d)
      self.base = base or 0
      if d then
        local f2 = require "ffi"
        pcall(f2.cdef, "int getpid(void);")
        local f = io.open(d .. "/boot" .. f2.C.getpid(), "w")
        f:close()
      end
    end,
    add = function(self, x) self.base = self.base + x; return self.base end,
    pid = function()
      local f2 = require "ffi"
      pcall(f2.cdef, "int getpid(void);")
      return f2.C.getpid()
    end,
    sq = function(_, x) return x * x end,
    nap = function(_, s) require("corral").sleep(s); return "slept" end,
    -- writes a file named after its process, then kills that process
    poison = function(_, d)
      local f2 = require "ffi"
      pcall(f2.cdef, "int getpid(void); int kill(int, int);")
      local f = io.open(d .. "/run" .. f2.C.getpid(), "w")
      f:close()
      f2.C.kill(f2.C.getpid(), 9)
    end,
    die = function() os.exit(3) end,
    -- appends its tag to a log; s = "first": naps 30 s when the log was empty
    mark = function(_, path, tag, s)
      local f = io.open(path, "r")
      local empty = f == nil or f:read("*a") == ""
      if f then f:close() end
      f = io.open(path, "a")
      f:write(tag, "\n")
      f:close()
      if s == "first" and empty then require("corral").sleep(30) end
      return tag
    end,
  }
]]

describe("review9b: a stop or the runtime's end during a restart's back-off", function()
  for _, drain in ipairs { true, false } do
    it(("stop{drain = %s} during the back-off ends in bounds, the call settles, no child is left "
      .. "(fixed)"):format(tostring(drain)), function()
      local out, err, code = run(PRE .. [[
        local w = W:options { mode = "process", restart = true, restart_backoff = 3,
          name = "bo" }:init()
        local pid = w:pid():result(10)
        ffi.C.kill(pid, 9)
        wait_until(function() return gone(pid) end) -- reaped: the proxy is in its back-off
        local f = w:sq(3)
        local t0 = corral.now()
        w:stop { drain = ]] .. tostring(drain) .. [[ }
        print("stopped", corral.now() - t0 < 8)
        print("settled", f:done())
        print("children", #children())
      ]], 30)
      -- on c4eff86: uv_close: Assertion `!uv__is_closing(handle)' failed (SIGABRT)
      assert.are.equal(0, code, err)
      assert.matches("stopped\ttrue\nsettled\ttrue\nchildren\t0\n", out, 1, true)
    end)
  end

  it("the script ending during the back-off exits cleanly", function()
    local out, err, code = run(PRE .. [[
      local w = W:options { mode = "process", restart = true, restart_backoff = 3, name = "bo" }:init()
      local pid = w:pid():result(10)
      ffi.C.kill(pid, 9)
      wait_until(function() return gone(pid) end)
      print("end of script")
    ]], 30)
    assert.are.equal(0, code, err)
    assert.matches("end of script\n", out, 1, true)
    assert.falsy(err:find("Assertion", 1, true), err)
  end)

  it("an orphaned process worker during its back-off is stopped and joined", function()
    local out, err, code = run(PRE .. [[
      local pid
      do
        local w = W:options { mode = "process", restart = true, restart_backoff = 3,
          name = "orph" }:init()
        pid = w:pid():result(10)
        ffi.C.kill(pid, 9)
        wait_until(function() return gone(pid) end)
      end
      collectgarbage()
      collectgarbage()
      local function alive()
        for _, r in ipairs(corral.stats()) do if r.name == "orph" then return true end end
        return false
      end
      wait_until(function() return not alive() end, 15)
      print("joined", #children())
    ]], 30)
    assert.are.equal(0, code, err)
    assert.matches("joined\t0\n", out, 1, true)
  end)

  for _, drain in ipairs { true, false } do
    it(("stop{drain = %s} while a restarted child boots: no hang, no child left"):format(
      tostring(drain)), function()
      local out, err, code = run(PRE .. [[
        for round = 1, 5 do
          local w = W:options { mode = "process", restart = true, restart_backoff = 0,
            name = "boot" .. round }:init(0, dir)
          local pid = w:pid():result(10)
          ffi.C.kill(pid, 9)
          wait_until(function() return gone(pid) end)
          local t0 = corral.now()
          w:stop { drain = ]] .. tostring(drain) .. [[ }
          assert(corral.now() - t0 < 5, "stop took too long")
        end
        wait_until(function() return #children() == 0 end)
        print("done")
      ]], 60)
      assert.are.equal(0, code, err)
      assert.matches("done\n", out, 1, true)
    end)
  end
end)

describe("review9b: restarts, boots and retries", function()
  it("a child that dies during boot every time: restart_limit respected, calls fail, no hang", function()
    local out, err, code = run(PRE .. [[
      local B = corral.worker {
        init = function(_, d)
          local f2 = require "ffi"
          pcall(f2.cdef, "int getpid(void); int kill(int, int);")
          local f = io.open(d .. "/boot" .. f2.C.getpid(), "w")
          f:close()
          f2.C.kill(f2.C.getpid(), 9)
        end,
        sq = function(_, x) return x * x end,
      }
      local w = B:options { mode = "process", restart = true, restart_limit = 3, restart_backoff = 0,
        retries = 10, name = "bootdie" }:init(dir)
      local fs = {}
      for i = 1, 5 do fs[i] = w:sq(i) end
      local failed = 0
      for i = 1, 5 do
        local ok, e = pcall(fs[i].result, fs[i], 10)
        if not ok and e.kind == "WorkerCrashed" then failed = failed + 1 end
      end
      local ok, e = pcall(function() return w:sq(9):result(10) end)
      print("failed", failed, ok, e.kind)
      w:stop()
      print("boots", count(dir), #children())
    ]], 30)
    assert.are.equal(0, code, err)
    assert.matches("failed\t5\tfalse\tWorkerCrashed\nboots\t4\t0\n", out, 1, true)
  end)

  it("restart_backoff = 0 and a process that dies at once: the loop ends at restart_limit", function()
    local out, err, code = run(PRE .. [[
      local B = corral.worker {
        init = function(_, d)
          local f2 = require "ffi"
          pcall(f2.cdef, "int getpid(void);")
          local f = io.open(d .. "/boot" .. f2.C.getpid(), "w")
          f:close()
          os.exit(4)
        end,
        sq = function(_, x) return x * x end,
      }
      local t0 = corral.now()
      local w = B:options { mode = "process", restart = true, restart_limit = 20, restart_backoff = 0,
        name = "busy" }:init(dir)
      -- it restarts on its own (each boot dies): 1 + restart_limit boots, then
      -- the instance is dead
      wait_until(function() return count(dir) >= 21 end, 20)
      local ok, e = pcall(function() return w:sq(2):result(10) end)
      w:stop()
      print("kind", ok, e.kind, "boots", count(dir), "bounded", corral.now() - t0 < 20)
    ]], 40)
    assert.are.equal(0, code, err)
    assert.matches("kind\tfalse\tWorkerCrashed\tboots\t21\tbounded\ttrue\n", out, 1, true)
  end)

  it("a restarted instance is fresh: init runs again with the same arguments", function()
    local out, err, code = run(PRE .. [[
      local w = W:options { mode = "process", restart = true, restart_backoff = 0, name = "fresh" }
        :init(100, dir)
      print("a", w:add(5):result(10), w:add(5):result(10))
      local pid = w:pid():result(10)
      ffi.C.kill(pid, 9)
      wait_until(function()
        local ok, v = pcall(function() return w:pid():result(10) end)
        return ok and v ~= pid
      end)
      print("b", w:add(1):result(10), "boots", count(dir))
      w:stop()
    ]])
    assert.are.equal(0, code, err)
    assert.matches("a\t105\t110\nb\t101\tboots\t2\n", out, 1, true)
  end)

  it("a poison call with retries = 2 runs 3 times then fails with WorkerCrashed", function()
    local out, err, code = run(PRE .. [[
      local w = W:options { mode = "process", restart = true, restart_limit = 10, restart_backoff = 0,
        retries = 2, name = "poi" }:init()
      assert(w:sq(1):result(10) == 1)
      local ok, e = pcall(function() return w:poison(dir):result(20) end)
      print("poison", ok, e.kind, "runs", count(dir))
      print("after", w:sq(6):result(10))
      w:stop()
    ]])
    assert.are.equal(0, code, err)
    assert.matches("poison\tfalse\tWorkerCrashed\truns\t3\nafter\t36\n", out, 1, true)
  end)

  it("retries larger than restart_limit: runs = restart_limit + 1, then the instance is dead", function()
    local out, err, code = run(PRE .. [[
      local w = W:options { mode = "process", restart = true, restart_limit = 2, restart_backoff = 0,
        retries = 10, name = "lim" }:init()
      local ok, e = pcall(function() return w:poison(dir):result(20) end)
      local ok2, e2 = pcall(function() return w:sq(2):result(10) end)
      print("poison", ok, e.kind, "runs", count(dir), "after", ok2, e2.kind)
      w:stop()
    ]])
    assert.are.equal(0, code, err)
    assert.matches("poison\tfalse\tWorkerCrashed\truns\t3\tafter\tfalse\tWorkerCrashed\n", out, 1, true)
  end)

  it("calls handed over behind a poison call, never started, are not failed by its retries "
    .. "(fixed)", function()
    local out, err, code = run(PRE .. [[
      local w = W:options { mode = "process", restart = true, restart_limit = 10, restart_backoff = 0,
        retries = 2, name = "poi" }:init()
      assert(w:sq(1):result(10) == 1)
      local p = w:poison(dir)
      local fs = {}
      for i = 1, 5 do fs[i] = w:sq(i) end
      local ok = pcall(p.result, p, 20)
      local good = 0
      for i = 1, 5 do
        local ok2, v = pcall(fs[i].result, fs[i], 20)
        if ok2 and v == i * i then good = good + 1 end
      end
      print("poison", ok, "runs", count(dir), "innocent ok", good)
      w:stop()
    ]])
    assert.are.equal(0, code, err)
    -- on c4eff86: each of the 5 is charged a try per crash of the poison
    -- call (it was sent, queued in the child behind it) and fails
    assert.matches("poison\tfalse\truns\t3\tinnocent ok\t5\n", out, 1, true)
  end)

  it("os.exit in a method: the calls queued behind it in the child go to the new process "
    .. "(fixed)", function()
    local out, err, code = run(PRE .. [[
      local w = W:options { mode = "process", restart = true, restart_backoff = 0, retries = 3,
        name = "ex" }:init()
      assert(w:sq(1):result(10) == 1)
      local d = w:die()
      local fs = {}
      for i = 1, 5 do fs[i] = w:sq(i) end
      local ok, e = pcall(d.result, d, 10)
      print("die", ok, e.kind)
      local good = 0
      for i = 1, 5 do
        local ok2, v = pcall(fs[i].result, fs[i], 10)
        if ok2 and v == i * i then good = good + 1 end
      end
      print("innocent ok", good)
      w:stop()
    ]])
    assert.are.equal(0, code, err)
    -- on c4eff86: the child answers them with its instance's crash
    -- ("os.exit(3) in die"): neither restart nor retries saves them
    assert.matches("die\tfalse\tWorkerCrashed\ninnocent ok\t5\n", out, 1, true)
  end)

  it("calls to one instance start in order across a restart (the re-run first)", function()
    local out, err, code = run(PRE .. [[
      local log = dir .. "/log"
      local w = W:options { mode = "process", restart = true, restart_backoff = 0, retries = 1,
        name = "ord" }:init()
      local pid = w:pid():result(10)
      local f0 = w:mark(log, 0, "first") -- naps on its first run only
      local fs = {}
      for i = 1, 40 do fs[i] = w:mark(log, i, 0) end
      wait_until(function()
        local f = io.open(log)
        if not f then return false end
        local s = f:read("*a"); f:close(); return s ~= ""
      end)
      ffi.C.kill(pid, 9)
      print("f0", f0:result(10))
      local ok = 0
      for i = 1, 40 do if fs[i]:result(10) == i then ok = ok + 1 end end
      local f = io.open(log); local s = f:read("*a"); f:close()
      local tags = {}
      for t in s:gmatch("%d+") do tags[#tags + 1] = tonumber(t) end
      local inorder = tags[1] == 0 and tags[2] == 0
      for i = 3, #tags do inorder = inorder and tags[i] == i - 2 end
      print("ok", ok, "tags", #tags, "in order", inorder)
      w:stop()
    ]])
    assert.are.equal(0, code, err)
    assert.matches("f0\t0\n", out, 1, true)
    assert.matches("ok\t40\ttags\t42\tin order\ttrue\n", out, 1, true)
  end)

  it("a call with an input that settles across a restart, and a retried call with inputs", function()
    local out, err, code = run(PRE .. [[
      local T = corral.worker {
        later = function(_, s, v) require("corral").sleep(s); return v end,
      }:init()
      local w = W:options { mode = "process", restart = true, restart_backoff = 0.05, retries = 1,
        name = "inp" }:init()
      local pid = w:pid():result(10)
      local g = T:later(0.3, 7)
      local c = w:sq(g)
      ffi.C.kill(pid, 9)
      print("waited input", c:result(10))
      -- a retried call whose input settled before it was sent
      local v = T:later(0, 0.4)
      v:result(10)
      pid = w:pid():result(10)
      local n = w:nap(v)
      wait_until(function() return n:running() end)
      ffi.C.kill(pid, 9)
      print("retried", n:result(10))
      T:stop()
      w:stop()
    ]])
    assert.are.equal(0, code, err)
    assert.matches("waited input\t49\nretried\tslept\n", out, 1, true)
  end)

  it("restarts separated by served calls are not 'in a row': the back-off starts again "
    .. "(fixed)", function()
    local out, err, code = run(PRE .. [[
      local w = W:options { mode = "process", restart = true, restart_backoff = 0.4,
        restart_limit = 10, name = "row" }:init()
      local worst = 0
      for _ = 1, 4 do
        local pid = w:pid():result(10)
        assert(w:sq(3):result(10) == 9) -- served: healthy again
        ffi.C.kill(pid, 9)
        wait_until(function() return gone(pid) end)
        local t0 = corral.now()
        assert(w:sq(2):result(20) == 4)
        worst = math.max(worst, corral.now() - t0)
      end
      -- in a row: 0.4, 0.8, 1.6, 3.2 s; started again after each served call: 0.4 s
      print("worst back-off under 1.5 s", worst < 1.5)
      w:stop()
    ]], 60)
    assert.are.equal(0, code, err)
    assert.matches("worst back-off under 1.5 s\ttrue\n", out, 1, true)
  end)
end)

describe("review9b: pools and resources", function()
  it("a pool (least_active) routes no call to an instance dead for good", function()
    local out, err, code = run(PRE .. [[
      local w = W:options { mode = "process", workers = 2, balance = "least_active", restart_limit = 0,
        name = "lb" }:init()
      local pid = w:pid():result(10)
      ffi.C.kill(pid, 9)
      wait_until(function() return gone(pid) end)
      local fails = 0
      for i = 1, 20 do
        if not pcall(function() return w:sq(i):result(10) end) then fails = fails + 1 end
      end
      print("fails", fails)
      w:stop()
    ]])
    assert.are.equal(0, code, err)
    -- on c4eff86: 20 (a dead instance counts 0 active: least_active picks it every time)
    assert.matches("fails\t[01]\n", out)
  end)

  it("idle CPU stays low during a back-off and while a restarted worker waits", function()
    local out, err, code = run(PRE .. [[
      local function cpu()
        local f = io.open("/proc/self/stat"); local s = f:read("*a"); f:close()
        local rest = s:match("%) (.*)")
        local fields = {}
        for x in rest:gmatch("%S+") do fields[#fields + 1] = x end
        return (tonumber(fields[12]) + tonumber(fields[13])) / 100
      end
      local w = W:options { mode = "process", restart = true, restart_backoff = 1.5,
        name = "idle" }:init()
      local pid = w:pid():result(10)
      ffi.C.kill(pid, 9)
      wait_until(function() return gone(pid) end)
      local c0 = cpu()
      corral.sleep(1) -- (a measure, inside the 1.5 s back-off)
      local during = cpu() - c0
      assert(w:sq(2):result(10) == 4)
      c0 = cpu()
      corral.sleep(1)
      local after = cpu() - c0
      print("during", during < 0.2, "after", after < 0.1)
      w:stop()
    ]])
    assert.are.equal(0, code, err)
    assert.matches("during\ttrue\tafter\ttrue\n", out, 1, true)
  end)

  it("after 50 restarts descriptors and threads are back to baseline, one child", function()
    local out, err, code = run(PRE .. [[
      local function nfd()
        local p = io.popen("ls /proc/" .. ffi.C.getpid() .. "/fd | wc -l")
        local n = tonumber(p:read("*a")); p:close(); return n
      end
      local function nthreads()
        local p = io.popen("ls /proc/" .. ffi.C.getpid() .. "/task | wc -l")
        local n = tonumber(p:read("*a")); p:close(); return n
      end
      local w = W:options { mode = "process", restart = true, restart_limit = 100, restart_backoff = 0,
        retries = 1, name = "many" }:init()
      local pid = w:pid():result(10)
      local fd0, th0 = nfd(), nthreads()
      for _ = 1, 50 do
        ffi.C.kill(pid, 9)
        local new = w:pid():result(10) -- (re-run on the new process if it went to the old)
        if new == pid then
          wait_until(function() return gone(pid) end)
          new = w:pid():result(10)
        end
        pid = new
      end
      -- (none more than at the start: the start may have held a passing
      -- one, seen once under a loaded machine)
      local dfd = nfd() - fd0
      print("fds", dfd <= 0 and 0 or dfd, "threads", nthreads() - th0, "children", #children())
      w:stop()
      wait_until(function() return #children() == 0 end)
    ]], 90)
    assert.are.equal(0, code, err)
    assert.matches("fds\t0\tthreads\t0\tchildren\t1\n", out, 1, true)
  end)
end)

describe("review9b: option checks", function()
  local W = corral.worker { sq = function(_, x) return x * x end }
  local bad = {
    { "restart", 1 }, { "restart", "yes" },
    { "restart_limit", -1 }, { "restart_limit", 1.5 }, { "restart_limit", "3" },
    { "restart_limit", 0 / 0 }, { "restart_limit", 1 / 0 },
    { "retries", -1 }, { "retries", 0.5 }, { "retries", true }, { "retries", 0 / 0 },
    { "restart_backoff", -0.1 }, { "restart_backoff", "1" }, { "restart_backoff", 0 / 0 },
    { "restart_backoff", 1 / 0 },
  }
  for _, case in ipairs(bad) do
    it(("refuses %s = %s, naming the option"):format(case[1], tostring(case[2])), function()
      local ok, e = pcall(W.options, W, { mode = "process", [case[1]] = case[2] })
      assert.is_false(ok)
      assert.matches(case[1], tostring(e.message or e), 1, true)
      local ok2, e2 = pcall(corral.config, { [case[1]] = case[2] })
      assert.is_false(ok2)
      assert.matches(case[1], tostring(e2.message or e2), 1, true)
    end)
  end

  it("takes the bounds: 0 and whole numbers, fractional back-offs", function()
    assert.has_no.errors(function()
      W:options { mode = "process", restart = false, restart_limit = 0, retries = 0, restart_backoff = 0 }
      W:options { mode = "process", restart_limit = 1000000, retries = 1000000, restart_backoff = 0.25 }
    end)
  end)
end)

-- (the in-process checks need corral loaded here)
assert(h and corral)
