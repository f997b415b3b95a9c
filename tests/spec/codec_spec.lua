require "corral"
local core = require "corral.core"

local function roundtrip(...)
  local s = assert(core.encode(...))
  return core.decode(s)
end

describe("the MessagePack codec", function()
  it("keeps numbers exactly: integers to 2^53, -0, NaN, infinities", function()
    local xs = { 0, 1, -1, 2 ^ 53, -(2 ^ 53), 2 ^ 53 + 2, 0.5, -1e300, 1 / 0, -1 / 0, 2 ^ 63 }
    for _, x in ipairs(xs) do
      assert.are.equal(x, (roundtrip(x)))
    end
    local nz = roundtrip(-0.0)
    assert.are.equal(-math.huge, 1 / nz)
    local nan = roundtrip(0 / 0)
    assert.is_true(nan ~= nan)
  end)

  it("keeps strings of any bytes, booleans and nils", function()
    local bytes = {}
    for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
    local s = table.concat(bytes)
    local a, b, c, d = roundtrip(s, true, nil, false)
    assert.are.equal(s, a)
    assert.are.same({ true, nil, false }, { b, c, d })
    assert.are.equal(4, select("#", roundtrip(s, true, nil, false)))
  end)

  it("keeps nested tables with array and hash parts", function()
    local t = { 1, 2, { x = "y", [10] = { true } }, name = "n", [1.5] = "float key" }
    assert.are.same(t, (roundtrip(t)))
    assert.are.same({}, (roundtrip({})))
  end)

  it("refuses what cannot travel, naming where it was", function()
    local s, err = core.encode(1, { conn = coroutine.create(print) })
    assert.is_nil(s)
    assert.matches("args%[2%]%.conn: thread %(a coroutine%) cannot travel", err)
    local deep = {}
    local cur = deep
    for _ = 1, 200 do cur.next = {}; cur = cur.next end
    s, err = core.encode(deep)
    assert.is_nil(s)
    assert.matches("nested too deeply", err)
  end)
end)
