-- A function that travels is a copy: each decode gives a closure of its
-- own, whose upvalues start where the sender's were.
local corral = require "corral"

describe("a function sent twice", function()
  local n = 0
  local function counter() n = n + 1; return n end

  it("is a closure of its own each time it is decoded (its upvalues are not shared)", function()
    local bytes = corral.encode(counter)
    local f, g = corral.decode(bytes, { code = true }), corral.decode(bytes, { code = true })
    assert.are_not.equal(f, g)
    assert.are.same({ 1, 2, 1 }, { f(), f(), g() })
  end)

  it("starts from the sender's upvalues in every call to a worker", function()
    local W = corral.worker { run = function(_, fn) return fn() end }
    for _, mode in ipairs { "thread", "process" } do
      local w = W:options { mode = mode }:init()
      assert.are.same({ 1, 1, 1 }, { w:run(counter):result(30), w:run(counter):result(30),
        w:run(counter):result(30) })
      w:stop()
    end
    assert.are.equal(0, n)
  end)

  it("without upvalues (or only modules) still decodes to a working function", function()
    local up = string.upper
    local bytes = corral.encode(function(s) return up(s) .. "!" end)
    assert.are.equal("HI!", corral.decode(bytes, { code = true })("hi"))
    assert.are.equal("HI!", corral.decode(bytes, { code = true })("hi"))
  end)
end)
