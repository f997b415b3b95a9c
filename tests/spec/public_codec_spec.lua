-- corral.encode / corral.decode: one value as MessagePack bytes, by the
-- rules of calls, for users who persist or send values.
local corral = require "corral"

local function codec_error(fn, ...)
  local ok, e = pcall(fn, ...)
  assert.is_false(ok, "expected a CodecError")
  assert.is_true(corral.is_error(e, "CodecError"), tostring(e))
  return e.message
end

describe("corral.encode and corral.decode", function()
  it("give plain MessagePack for plain values, readable by any library", function()
    assert.are.equal("\192", corral.encode(nil))
    assert.are.equal("\195", corral.encode(true))
    assert.are.equal("\42", corral.encode(42))
    assert.are.equal("\255", corral.encode(-1))
    assert.are.equal("\205\1\0", corral.encode(256))
    assert.are.equal("\203\63\224\0\0\0\0\0\0", corral.encode(0.5))
    assert.are.equal("\163abc", corral.encode("abc"))
    -- an array is an array (not the values of a call), a table with other
    -- keys a map
    assert.are.equal("\147\1\2\3", corral.encode({ 1, 2, 3 }))
    assert.are.equal("\129\161a\1", corral.encode({ a = 1 }))
    assert.are.equal("\144", corral.encode({}))
  end)

  it("give back what was encoded", function()
    local values = {
      0, 1, -1, 127, 128, -32, -33, 255, 65535, 65536, 2 ^ 31, -2 ^ 31, 2 ^ 53, -2 ^ 53, 1.5, -0.25,
      1 / 0, -1 / 0, 1e308, 5e-324, "", "x", ("y"):rep(70000), "a\0b", true, false,
      { 1, "two", { 3 } }, { a = { b = { c = "d" } }, [1.5] = "k", [true] = false },
      { n = 1, 2, 3, [10] = 4 },
    }
    for _, v in ipairs(values) do
      assert.are.same(v, corral.decode(corral.encode(v)))
    end
    local nan = corral.decode(corral.encode(0 / 0))
    assert.is_true(nan ~= nan)
    local negz = corral.decode(corral.encode(-0.0))
    assert.are.equal("-0", tostring(negz))
    assert.is_nil(corral.decode(corral.encode(nil)))
  end)

  it("keep shared and cyclic tables", function()
    local shared = { "s" }
    local t = { a = shared, b = shared }
    t.self = t
    local r = corral.decode(corral.encode(t))
    assert.are.equal(r.a, r.b)
    assert.are.equal(r, r.self)
    assert.are.equal("s", r.a[1])
  end)

  it("encode functions with their upvalues; decode them only with code = true", function()
    local k = 10
    local add = function(x) return x + k end
    local bytes = corral.encode({ f = add, mod = string.format })
    local msg = codec_error(corral.decode, bytes)
    assert.matches("value.f", msg, 1, true)
    local r = corral.decode(bytes, { code = true })
    assert.are.equal(15, r.f(5))
    assert.are.equal(string.format, r.mod)
  end)

  it("name the path of what cannot be encoded", function()
    local msg = codec_error(corral.encode, { a = { 1, coroutine.create(function() end) } })
    assert.matches("^value%.a%[2%]: ", msg)
    assert.matches("coroutine", msg)
    msg = codec_error(corral.encode, io.stdout)
    assert.matches("^value: ", msg)
    msg = codec_error(corral.encode, { f = corral.future() })
    assert.matches("value.f: a future cannot be encoded into bytes", msg, 1, true)
    local W = corral.worker { x = function() end }
    local w = W:init()
    msg = codec_error(corral.encode, { 1, w })
    assert.matches("value[2]: a worker cannot be encoded into bytes", msg, 1, true)
    w:stop()
  end)

  it("refuse bad bytes with a CodecError naming where, and never crash", function()
    assert.matches("truncated", codec_error(corral.decode, "\147\1\2"))
    assert.matches("trailing", codec_error(corral.decode, "\1\2"))
    assert.matches("truncated", codec_error(corral.decode, ""))
    assert.matches("claims more", codec_error(corral.decode, "\221\255\255\255\255"))
    -- a map key that is nil, deep inside: the path says where
    assert.matches("^value%.a%[2%]", codec_error(corral.decode, "\129\161a\146\1\129\192\1"))
    -- a future handle from outside the process is never followed
    assert.matches("FUTURE", codec_error(corral.decode, "\215\3\0\0\0\0\0\0\0\1"))
    -- random bytes: a value or a CodecError, nothing else
    math.randomseed(7)
    for _ = 1, 3000 do
      local n = math.random(0, 24)
      local b = {}
      for i = 1, n do b[i] = string.char(math.random(0, 255)) end
      local ok, e = pcall(corral.decode, table.concat(b))
      if not ok then assert.is_true(corral.is_error(e, "CodecError"), tostring(e)) end
    end
  end)

  it("check their arguments", function()
    local ok, e = pcall(corral.decode, 42)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "UsageError"), tostring(e))
    ok, e = pcall(corral.decode, "\1", { trust = true })
    assert.is_false(ok)
    assert.matches("unknown option 'trust'", tostring(e))
  end)

  it("travel: bytes made in a worker decode at home and back", function()
    local W = corral.worker {
      pack = function(_, v) return require("corral").encode(v) end,
      unpack = function(_, s) return require("corral").decode(s).x * 2 end,
    }
    local w = W:init()
    local bytes = w:pack({ x = 21, list = { 1, 2 } }):result(10)
    assert.are.same({ x = 21, list = { 1, 2 } }, corral.decode(bytes))
    assert.are.equal(42, w:unpack(corral.encode({ x = 21 })):result(10))
    w:stop()
  end)
end)
