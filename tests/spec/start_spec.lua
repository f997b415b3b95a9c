-- Worker start: the spare thread a runtime keeps started ahead (its Lua
-- state made, corral's core loaded), and what a worker's state loads.
local h = require "helper"

local function run(code, limit)
  return h.run(code, limit or 60)
end

-- The script prints the number of threads of the process at each `mark`.
local THREADS = [[
  local function threads()
    local n = 0
    for _ in io.popen("ls /proc/" .. corral_pid() .. "/task"):lines() do n = n + 1 end
    return n
  end
]]

local PID = [[
  local ffi = require "ffi"
  ffi.cdef "int getpid(void);"
  function corral_pid() return ffi.C.getpid() end
]]

describe("the spare worker", function()
  -- (thread counts are taken once a worker runs: a sanitizer starts a thread
  -- of its own with the first)
  it("is made with a worker, taken by the next start and replaced; spare_worker = false ends it", function()
    local out, err, code = run(PID .. THREADS .. [[
      local corral = require "corral"
      local W = corral.worker { ping = function() return true end }
      assert(corral.config().spare_worker == true)
      local a = W:init()
      assert(a:ping():result(10))
      local n1 = threads()
      local b = W:init()
      assert(b:ping():result(10))
      print("b", threads() - n1)        -- b, and a new spare (the old one became b)
      corral.config { spare_worker = false }
      print("off", threads() - n1)      -- the spare ended
      local c = W:init()
      assert(c:ping():result(10))
      print("c", threads() - n1)        -- c, and no spare
      corral.config { spare_worker = true }
      local d = W:init()
      assert(d:ping():result(10))
      print("d", threads() - n1)        -- d, and a spare again
      a:stop() b:stop() c:stop() d:stop()
    ]])
    assert.are.equal(0, code, err)
    assert.are.equal("b\t1\noff\t0\nc\t1\nd\t3\n", out)
  end)

  it("a worker from the spare starts with a fresh state: nothing of an earlier worker", function()
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker {
        init = function(self, tag) self.tag = tag end,
        set = function(self) _G.LEFT = self.tag; package.loaded.left = self.tag end,
        get = function() return tostring(_G.LEFT) .. " " .. tostring(package.loaded.left) end,
      }
      for i = 1, 5 do
        local w = W:init("w" .. i)
        print(w:get():result(10))
        w:set():result(10)
        w:stop()
      end
    ]])
    assert.are.equal(0, code, err)
    local n = 0
    for line in out:gmatch("[^\n]+") do
      n = n + 1
      assert.are.equal("nil nil", line)
    end
    assert.are.equal(5, n)
  end)

  it("its class, name, options and init arguments are the taker's", function()
    local out, err, code = run([[
      local corral = require "corral"
      local A = corral.worker { who = function() return "A" end }
      local B = corral.worker {
        init = function(self, x, t) self.x, self.t = x, t end,
        who = function(self) return "B " .. self.x .. " " .. self.t.k end,
        boom = function() error("no") end,
      }
      local a = A:init()
      assert(a:who():result(10) == "A")
      local b = B:options { name = "bee", max_queued = 3 }:init(7, { k = "v" })
      print(b:who():result(10))
      local ok, e = pcall(function() return b:boom():result(10) end)
      print(ok, tostring(e):match("bee:boom") ~= nil)
      a:stop() b:stop()
    ]])
    assert.are.equal(0, code, err)
    assert.matches("B 7 v\n", out, 1, true)
    assert.matches("false\ttrue\n", out, 1, true)
  end)

  it("a failing init of a worker taken from the spare fails its calls as a cold one's", function()
    local out, err, code = run([[
      local corral = require "corral"
      local Ok = corral.worker { ping = function() return 1 end }
      local Bad = corral.worker { init = function() error("init refused") end,
        ping = function() return 2 end }
      local a = Ok:init()
      assert(a:ping():result(10) == 1)
      local b = Bad:init()
      local ok, e = pcall(function() return b:ping():result(10) end)
      print(ok, corral.is_error(e), tostring(e):match("init refused") ~= nil)
      a:stop() b:stop()
    ]])
    assert.are.equal(0, code, err)
    assert.matches("false\ttrue\ttrue\n", out, 1, true)
  end)

  it("the runtime's close ends the spare, even one still readying its state", function()
    for _ = 1, 3 do
      local t0 = os.time()
      local out, err, code = run([[
        local corral = require "corral"
        local W = corral.worker { ping = function() return true end }
        local w = W:init()          -- the spare starts here, and the script ends at once
        print(w:ping():result(10))
        w:stop()
      ]], 20)
      assert.are.equal(0, code, err)
      assert.are.equal("true\n", out)
      assert.are.equal("", err)
      assert.is_true(os.time() - t0 <= 5)
    end
  end)

  it("uses no CPU while it waits", function()
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker { ping = function() return true end }
      local w = W:init()
      assert(w:ping():result(10))
      w:stop()
      local c0 = os.clock()
      corral.sleep(1)
      print(("idle %.3f"):format(os.clock() - c0))
    ]])
    assert.are.equal(0, code, err)
    local idle = tonumber(out:match("idle ([%d%.]+)"))
    assert.is_true(idle ~= nil and idle < 0.1, out)
  end)
end)

describe("a worker's Lua state", function()
  it("loads the public corral table only when its code requires it", function()
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker {
        before = function() return package.loaded.corral == nil end,
        use = function()
          local c = require "corral"
          return c.spawn(function(x) return x * 2 end, 21):result()
        end,
      }
      local w = W:init()
      print(w:before():result(10), w:use():result(10), w:before():result(10))
      w:stop()
    ]])
    assert.are.equal(0, code, err)
    assert.are.equal("true\t42\tfalse\n", out)
  end)
end)
