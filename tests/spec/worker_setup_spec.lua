-- Thread and process workers start with the creating state's package.path
-- and package.cpath, and run the `setup` option first.
local corral = require "corral"
local h = require "helper"

describe("a worker's state", function()
  local dir, saved
  before_each(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir) == 0)
    local f = assert(io.open(dir .. "/corral_test_mylib.lua", "w"))
    f:write("return { twice = function(x) return 2 * x end }\n")
    f:close()
    saved = package.path
    package.path = dir .. "/?.lua;" .. package.path
  end)
  after_each(function()
    package.path = saved
    os.remove(dir .. "/corral_test_mylib.lua")
    os.remove(dir)
  end)

  for _, mode in ipairs({ "thread", "process" }) do
    it("finds modules on the creator's package.path (" .. mode .. ")", function()
      local w = corral.worker {
        twice = function(_, x) return require("corral_test_mylib").twice(x) end,
      }:options { mode = mode }:init()
      assert.are.equal(42, w:twice(21):result(20))
      w:stop()
    end)

    it("runs setup first, before init (" .. mode .. ")", function()
      local w = corral.worker {
        init = function(self) self.seen = rawget(_G, "SETUP_RAN") end,
        seen = function(self) return self.seen end,
      }:options { mode = mode, setup = function() rawset(_G, "SETUP_RAN", "yes") end }:init()
      assert.are.equal("yes", w:seen():result(20))
      w:stop()
    end)

    it("fails its calls with the cause when setup fails (" .. mode .. ")", function()
      local w = corral.worker { sq = function(_, x) return x * x end }
        :options { mode = mode, setup = function() require "corral_no_such_module" end }:init()
      local f = w:sq(3)
      local kind, e = h.kind_of(function() return f:result(20) end)
      assert.are.equal("WorkerCrashed", kind)
      assert.matches("module 'corral_no_such_module' not found", tostring(e), 1, true)
      w:stop()
    end)
  end

  it("runs setup once for a local (async) worker, and checks it is a function", function()
    local n = 0
    local w = corral.worker { get = function() return n end }
      :options { mode = "async", setup = function() n = n + 1 end }:init()
    assert.are.equal(1, w:get():result(5))
    w:stop()
    assert.are.equal("UsageError", h.kind_of(function()
      corral.worker { get = function() end }:options { setup = 5 }
    end))
  end)
end)
