-- Adversarial review of the embedding work (issue 12), the Lua side: what a
-- Lua host sees of corral.exit_status, corral.exit and the loop contract.
local corral = require "corral"
local h = require "helper"

describe("review15b: a Lua host", function()
  it("corral.exit_status() is one value, nil, while the runtime runs", function()
    assert.are.equal(1, select("#", corral.exit_status()))
    assert.are.equal("nil", tostring(corral.exit_status()))
  end)

  it("after corral.exit nothing runs, waits raise, and the status stays the first", function()
    local path = h.tmpname() .. ".lua"
    local fh = assert(io.open(path, "w"))
    fh:write([[
local c = require "corral"
local w = c.worker { nap = function(_, s) require("corral").sleep(s) return 1 end }
  :options { mode = "thread" }:init()
local f = w:nap(30)
c.exit(3)
c.exit(4)
local t = c.spawn(function() print("TASK RAN") end)
print(c.exit_status(), c.step(), c.backend_timeout(), pcall(c.run))
print(pcall(function() return t:result() end))
print(pcall(function() return f:result(1) end))
]])
    fh:close()
    local o, e, code = h.sh(h.luajit() .. " " .. path)
    os.remove(path)
    assert.are.equal(0, code, e)
    assert.is_nil(o:find("TASK RAN"), o)
    assert.truthy(o:find("^3\tfalse\t%-1\ttrue\n"), o)
    assert.truthy(select(2, o:gsub("would wait forever: corral.exit", "")) == 2, o)
  end)
end)
