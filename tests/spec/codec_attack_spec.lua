-- The codec under attack: depth limits that agree on both sides, bytes from
-- outside that must never crash, run code or become pointers, tables that
-- only claim to be corral's, strict metatables, allocation failures.
local corral = require "corral"
local core = require "corral.core"
local h = require "helper"

local function nested(n)
  local t = { level = 1 }
  local cur = t
  for i = 2, n do
    cur.x = { level = i }
    cur = cur.x
  end
  return t
end

local function depth(t)
  local n = 0
  while type(t) == "table" do
    n = n + 1
    assert(t.level == n, "level " .. n .. " lost")
    t = t.x
  end
  return n
end

local function codec_error(pattern, fn, ...)
  local ok, e = pcall(fn, ...)
  assert.is_false(ok)
  assert.is_true(corral.is_error(e, "CodecError"), tostring(e))
  if pattern then assert.matches(pattern, e.message) end
  return e
end

local function be32(n)
  return string.char(math.floor(n / 2 ^ 24) % 256, math.floor(n / 2 ^ 16) % 256,
    math.floor(n / 2 ^ 8) % 256, n % 256)
end

describe("one depth limit for both sides", function()
  local W, w
  setup(function()
    W = corral.worker {
      nest = function(_, n)
        local t = { level = 1 }
        local cur = t
        for i = 2, n do cur.x = { level = i }; cur = cur.x end
        return t
      end,
      depth = function(_, t)
        local n = 0
        while type(t) == "table" do n = n + 1; t = t.x end
        return n
      end,
      echo = function(_, ...) return ... end,
    }
    w = W:init()
  end)
  teardown(function() w:stop() end)

  for _, n in ipairs { 40, 100 } do
    it(("carries a worker result nested %d deep as another call's input"):format(n), function()
      assert.are.equal(n, w:depth(w:nest(n)):result())
    end)
    it(("carries a table nested %d deep as an argument"):format(n), function()
      assert.are.equal(n, w:depth(nested(n)):result())
    end)
    it(("carries a table nested %d deep as a result"):format(n), function()
      assert.are.equal(n, depth(w:nest(n):result()))
      assert.are.equal(n, depth(w:echo(nested(n)):result()))
      assert.are.equal(n, depth(core.decode(assert(core.encode(nested(n))))))
    end)
  end

  it("refuses 101 deep at encode with a CodecError naming where, start and end", function()
    local e = codec_error(nil, w.depth, w, nested(101))
    assert.matches("^args%[1%]%.x%.x%.x", e.message)
    assert.matches("%.%.%.", e.message)
    assert.matches("%.x%.x: table nested too deeply %(limit 100%)$", e.message)
    local r = w:nest(101):exception()
    assert.is_true(corral.is_error(r, "CodecError"), tostring(r))
    assert.matches("^result%[1%]%.x", r.message)
  end)

  it("refuses bytes nested deeper than any payload the encoder makes", function()
    local deep = ("\145"):rep(103) .. "\192"
    codec_error("nested too deeply", core.decode, deep)
    assert.are.equal(1, #core.decode(("\145"):rep(102) .. "\192"))
  end)
end)

describe("bytes from outside (core.decode)", function()
  it("never crash: a reference with no table before it is a CodecError", function()
    codec_error("REF%) with a 1%-byte body", core.decode, "\145\212\1\0")
    codec_error("extension 1 %(REF%) to table 0, of 0 seen", core.decode, "\145\214\1\0\0\0\0")
  end)

  it("never become pointers: a future or worker extension is refused", function()
    local forged = "\145\215\3" .. ("\0\0\127\255\0\16\32\48")
    codec_error("future cannot come from outside the process", core.decode, forged)
    codec_error("worker handle cannot come from outside",
      core.decode, "\145\147\199\0\7\128\215\8" .. ("\1"):rep(8))
    codec_error("extension 8 %(INST%) cannot come from outside", core.decode, "\145\215\8" .. ("\1"):rep(8))
    codec_error("dependency cannot come from outside", core.decode, "\145\214\2\0\0\0\0")
  end)

  it("never run code: functions are refused, modules only when already loaded", function()
    local s = assert(core.encode(function() return 1 end))
    codec_error("a function cannot come from outside the process", core.decode, s)
    assert.are.equal(string, core.decode("\145\199\6\4string"))
    codec_error("module 'corral_never' is not loaded %(bytes from outside cannot load modules%)",
      core.decode, "\145\199\12\4corral_never")
    assert.is_nil(package.loaded.corral_never)
    assert.are.equal(print, core.decode(assert(core.encode(print))))
    assert.are.equal(string.format, core.decode("\145\199\13\5string.format"))
    codec_error("'string.nope' is not a function", core.decode, "\145\199\11\5string.nope")
  end)

  it("keeps shared sub-tables and cycles, checking every reference", function()
    local shared = { 1 }
    local t = { a = shared, b = shared }
    t.self = t
    local r = core.decode(assert(core.encode(t)))
    assert.are.equal(r.a, r.b)
    assert.are.equal(r, r.self)
    codec_error("to table 5, of 1 seen", core.decode, "\145\145\214\1\0\0\0\5")
  end)

  it("refuses trailing bytes, truncation, forged counts and impossible keys", function()
    codec_error("trailing bytes", core.decode, assert(core.encode(1)) .. "x")
    codec_error("truncated", core.decode, "\146\1")
    codec_error("claims more elements than the payload has bytes", core.decode, "\221\127\255\255\255\1")
    codec_error("claims more pairs", core.decode, "\145\223\127\255\255\255\1\2")
    codec_error("value%[1%]%[%?%]: a map key is nil", core.decode, "\145\129\192\1")
    codec_error("a map key is NaN", core.decode, "\145\129\203\127\248\0\0\0\0\0\0\1")
    codec_error("malformed", core.decode, "\145\193")
  end)

  it("names the path of a failure inside a value", function()
    codec_error("^value%[1%]%.a%[2%]: extension type 42 is not one corral reads",
      core.decode, "\145\129\161a\146\1\212\42\0")
  end)

  it("decodes MessagePack timestamps (extension -1, all three sizes) to {sec, nsec}", function()
    assert.are.same({ sec = 1514862245, nsec = 0 }, core.decode("\145\214\255\90\74\246\165"))
    assert.are.same({ sec = 1514862245, nsec = 678901234 },
      core.decode("\145\215\255\161\220\215\200\90\74\246\165"))
    assert.are.same({ sec = -1, nsec = 0 },
      core.decode("\145\199\12\255\0\0\0\0\255\255\255\255\255\255\255\255"))
    codec_error("a timestamp of 2 bytes", core.decode, "\145\213\255\0\0")
  end)

  it("says how many values are too many, both ways", function()
    local t = {}
    for i = 1, 7990 do t[i] = i end
    local s, err = core.encode(unpack(t, 1, 7990))
    assert.is_nil(s)
    assert.matches("7990 values are too many", err)
    local bytes = "\221" .. be32(7990) .. ("\1"):rep(7990)
    codec_error("7990 values are too many to receive", core.decode, bytes)
  end)
end)

describe("the fuzz corpus of the decoder (tests/fuzz/decode)", function()
  it("every input decodes from outside to values or a CodecError", function()
    local list = h.sh("ls tests/fuzz/decode/*")
    local n = 0
    for path in list:gmatch("[^\n]+") do
      local bytes = h.slurp(path)
      for _, decode in ipairs {
        core.decode,
        corral.decode,
        function(s) return corral.decode(s, { code = true }) end,
      } do
        local ok, e = pcall(decode, bytes)
        assert(ok or corral.is_error(e, "CodecError"), path .. ": " .. tostring(e))
      end
      n = n + 1
    end
    assert.is_true(n > 100, "corpus files: " .. n)
  end)
end)

describe("tables that only claim to be corral's", function()
  local w
  setup(function() w = corral.worker { echo = function(_, ...) return ... end }:init() end)
  teardown(function() w:stop() end)

  it("a fake __worker or __future metatable is a CodecError, not a crash", function()
    local s, err = core.encode({ setmetatable({}, { __worker = true }) })
    assert.is_nil(s)
    assert.matches("args%[1%]%[1%]: a table with a __worker metatable that is not a worker handle", err)
    s, err = core.encode(setmetatable({}, { __worker = true, _export = function() error("boom") end }))
    assert.is_nil(s)
    assert.matches("not a worker handle", err)
    s, err = core.encode(setmetatable({}, { __worker = true,
      _export = function() return {}, { newproxy(true) } end }))
    assert.is_nil(s)
    assert.matches("not a worker handle", err)
    -- (into bytes, whatever claims to be a future is refused as one: no
    -- C half is made to tell)
    s, err = core.encode(setmetatable({}, { __future = true }))
    assert.is_nil(s)
    assert.matches("a future cannot be encoded into bytes", err)
    codec_error("not a corral future", w.echo, w, { x = setmetatable({}, { __future = true }) })
    assert.are.equal(1, w:echo(1):result()) -- the worker is fine
  end)

  it("a strict class instance travels as a plain table; a strict _G does not matter", function()
    local Class = {}
    Class.__index = Class
    setmetatable(Class, { __index = function(_, k) error("strict: no field " .. tostring(k)) end })
    local obj = setmetatable({ a = 1, b = { 2 } }, Class)
    assert.are.same({ a = 1, b = { 2 } }, w:echo(obj):result())
    local mt = getmetatable(_G)
    setmetatable(_G, { __index = function(_, k) error("strict: no global " .. tostring(k)) end })
    local ok, r = pcall(function()
      local fmt = string.format
      return core.decode(assert(core.encode(print, { f = fmt })))
    end)
    setmetatable(_G, mt)
    assert.is_true(ok, tostring(r))
    assert.are.equal(print, r)
  end)

  it("a raising __index over 100 calls leaks nothing", function()
    local Class = setmetatable({}, { __index = function() error("strict") end })
    Class.__index = Class
    local big = {}
    for i = 1, 500 do big[i] = ("x"):rep(10) .. i end
    local objs = {}
    for i = 1, 100 do objs[i] = setmetatable({ i = i, big = big }, Class) end
    for i = 1, 10 do w:echo(objs[i]):result() end -- warm up
    collectgarbage(); collectgarbage()
    local counts, mem = core.debug_counts(), collectgarbage("count")
    for i = 1, 100 do
      assert.are.equal(i, w:echo(objs[i]):result().i)
      assert.is_string(core.encode(objs[i]))
    end
    collectgarbage(); collectgarbage()
    local after = core.debug_counts()
    assert.are.equal(counts.codec, after.codec)
    assert.are.equal(counts.handles, after.handles)
    assert.is_true(after.futures <= counts.futures + 2, "futures leaked")
    assert.is_true(collectgarbage("count") < mem + 512, "Lua memory grew")
  end)
end)

describe("handles under concurrency", function()
  it("futures and workers cross between threads as handles while others are freed", function()
    local Maker = corral.worker {
      make = function(_, n)
        local fs = {}
        for i = 1, n do
          local f = corral.future()
          f:set_result(i)
          fs[i] = f
        end
        return fs
      end,
      ping = function() return "pong" end,
      relay = function(_, other) return other:ping():result() end,
    }
    local a, b = Maker:init(), Maker:init()
    local before = core.debug_counts().handles
    for _ = 1, 20 do
      local x, y = a:make(50), b:make(50)
      local fx, fy = x:result(), y:result()
      for i = 1, 50 do
        assert.are.equal(i, fx[i]:result())
        assert.are.equal(i, fy[i]:result())
      end
      assert.are.equal("pong", a:relay(b):result())
      assert.are.equal("pong", b:relay(a):result())
    end
    a:stop(); b:stop()
    collectgarbage(); collectgarbage()
    -- the handles of the futures that crossed went with their futures
    assert.is_true(core.debug_counts().handles <= before + 2, "handles kept: " ..
      (core.debug_counts().handles - before))
  end)
end)

describe("functions with an environment", function()
  it("carry it: a plain table by value, an overlay of the globals falling back to the receiver's", function()
    local sandboxed = setfenv(function() return answer, print end, { answer = 42 }) -- luacheck: ignore
    local a, p = corral.submit(sandboxed):result()
    assert.are.equal(42, a)
    assert.is_nil(p)
    local overlay = setfenv(function() return extra + math.floor(1.5) end, -- luacheck: ignore
      setmetatable({ extra = 2 }, { __index = _G }))
    assert.are.equal(3, corral.submit(overlay):result())
  end)
end)

describe("error paths", function()
  it("name init's first argument init[1]", function()
    local W = corral.worker { init = function() end, f = function() end }
    local ok, e = pcall(W.init, W, coroutine.create(print))
    assert.is_false(ok)
    assert.matches("^init%[1%]: thread", e.message)
    e = select(2, pcall(W.init, W, 1, { c = coroutine.create(print) }))
    assert.matches("^init%[2%]%.c: thread", e.message)
  end)
end)

describe("the codec when C allocations fail", function()
  it("raises a clean error at every failure point and leaks nothing", function()
    local value = { list = {}, f = function(x) return x end, s = ("y"):rep(1000) }
    for i = 1, 200 do value.list[i] = { i, tostring(i) } end
    local W = corral.worker { echo = function(_, ...) return ... end }
    local stopped = W:init()
    stopped:stop()
    local fut = corral.spawn(function() return 1 end)
    stopped:echo(fut):exception() -- its C half made before counting
    local bytes = assert(core.encode({ value.list, value.s }))
    collectgarbage(); collectgarbage()
    local counts = core.debug_counts()
    local failed, n = 0, 0
    repeat
      n = n + 1
      core.codec_fail_alloc(n)
      local s, err = core.encode(value)
      local ok_call, call_err = pcall(stopped.echo, stopped, value, fut)
      local ok_dec, dec_err = pcall(core.decode, bytes)
      core.codec_fail_alloc(0)
      local hit = false
      if not s then assert.matches("out of memory", err); hit = true end
      if ok_call then
        assert.is_true(corral.is_error(call_err:exception(), "ClosedError"))
      else
        assert.is_true(corral.is_error(call_err, "CodecError"), tostring(call_err))
        assert.matches("out of memory", call_err.message); hit = true
      end
      if not ok_dec then assert.matches("out of memory", dec_err.message); hit = true end
      if hit then failed = failed + 1 end
    until not hit
    assert.is_true(failed >= 3, "failure points reached: " .. failed)
    collectgarbage(); collectgarbage()
    local after = core.debug_counts()
    assert.are.equal(counts.codec, after.codec)
    assert.are.equal(counts.handles, after.handles)
    assert.is_true(after.futures <= counts.futures, "futures leaked")
  end)
end)

describe("the codec's C tests (trusted bytes: handles, bytecode, structure; host results)", function()
  it("pass", function()
    local out, err, code = h.sh(h.quote(h.build .. "/obj/tests/test_codec"))
    assert.are.equal(0, code, out .. err)
    assert.matches("1%.%.%d+", out)
    assert.not_matches("not ok", out)
  end)
end)
