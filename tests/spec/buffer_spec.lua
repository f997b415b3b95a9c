-- corral.buffer: bytes shared by reference between contexts.
local corral = require "corral"
local core = require "corral.core"
local ffi = require "ffi"
local h = require "helper"

local function addr(b) return tonumber(ffi.cast("uintptr_t", b:ptr())) end

local W = corral.worker {
  len = function(_, b) return #b, b:sub(1, 5) end,
  echo = function(_, b) return b end,
  addr = function(_, b)
    return tonumber(require("ffi").cast("uintptr_t", b:ptr())), require("corral").is_buffer(b)
  end,
  sum = function(_, b)
    local p, s = b:ptr(), 0
    for i = 0, #b - 1 do s = s + p[i] end
    return s
  end,
  make = function(_, n, byte)
    local b = require("corral").buffer(n)
    local p = b:wptr()
    for i = 0, n - 1 do p[i] = byte end
    return b
  end,
  poke = function(_, b) b:write(1, "z") end,
}

describe("corral.buffer", function()
  it("holds a copy of a string, or zeroed bytes, with #, sub, tostring and ptr", function()
    local b = corral.buffer("hello world")
    assert.are.equal(11, #b)
    assert.are.equal("hello", b:sub(1, 5))
    assert.are.equal("world", b:sub(-5))
    assert.are.equal("hello world", b:sub())
    assert.are.equal("", b:sub(8, 3))
    assert.are.equal("hello world", tostring(b))
    assert.are.equal(string.byte("h"), b:ptr()[0])
    assert.is_true(corral.is_buffer(b))
    assert.is_false(corral.is_buffer("hello"))
    local z = corral.buffer(4)
    assert.are.equal("\0\0\0\0", tostring(z))
    assert.are.equal(0, #corral.buffer(0))
    assert.are.equal(0, #corral.buffer(""))
  end)

  it("is writable until it is first shared, then immutable", function()
    local b = corral.buffer(3)
    b:write(1, "ab")
    b:wptr()[2] = string.byte("c")
    assert.are.equal("abc", tostring(b))
    assert.is_false(b:shared())
    local ok, e = pcall(b.write, b, 3, "xy")
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "UsageError"), tostring(e))
    local w = W:init()
    assert.are.same({ 3, "abc" }, { w:len(b):result(30) })
    assert.is_true(b:shared())
    for _, f in ipairs { function() b:write(1, "x") end, function() b:wptr() end } do
      ok, e = pcall(f)
      assert.is_false(ok)
      assert.is_true(corral.is_error(e, "UsageError"), tostring(e))
      assert.matches("immutable", e.message)
    end
    -- (and in the worker too)
    ok, e = pcall(function() return w:poke(b):result(30) end)
    assert.is_false(ok)
    assert.matches("immutable", tostring(e))
    assert.are.equal("abc", tostring(b))
    w:stop()
  end)

  it("refuses bad arguments with UsageError", function()
    for _, x in ipairs { -1, 1.5, {}, true, 2 ^ 60 } do
      local ok, e = pcall(corral.buffer, x)
      assert.is_false(ok)
      assert.is_true(corral.is_error(e, "UsageError"), tostring(e))
    end
    local b = corral.buffer(2)
    for _, f in ipairs { function() b.sub("x") end, function() b:write(0, "a") end,
      function() b:write(1, 5) end } do
      local ok, e = pcall(f)
      assert.is_false(ok)
      assert.is_true(corral.is_error(e, "UsageError"), tostring(e))
    end
  end)

  it("goes to a thread worker by reference: the same bytes, no copy, both ways", function()
    local w = W:init()
    local big = corral.buffer(8 * 1024 * 1024)
    local a, isbuf = w:addr(big):result(30)
    assert.is_true(isbuf)
    assert.are.equal(addr(big), a)
    local back = w:echo(big):result(30)
    assert.are.equal(addr(big), addr(back))
    local made = w:make(1000, 7):result(30)
    assert.are.equal(7000, w:sum(made):result(30))
    assert.is_true(made:shared())
    w:stop()
  end)

  it("is freed when the last holder lets go, across 1,000 round trips to a thread worker", function()
    local w = W:init()
    collectgarbage()
    collectgarbage()
    local before = core.buffer_live()
    for i = 1, 1000 do
      local b = corral.buffer(i % 2 == 0 and 100 or 70000) -- (heap and memfd)
      local back = w:echo(b):result(30)
      assert.are.equal(#b, #back)
    end
    w:stop()
    h.wait_until(function()
      collectgarbage()
      collectgarbage()
      return core.buffer_live() <= before
    end, 30)
    assert.are.equal(before, core.buffer_live())
  end)

  it("goes into bytes with corral.encode and comes back as a buffer", function()
    local bytes = corral.encode({ data = corral.buffer("abc") })
    local v = corral.decode(bytes)
    assert.is_true(corral.is_buffer(v.data))
    assert.are.equal("abc", tostring(v.data))
  end)

  it("cannot be forged from outside bytes: a buffer reference is refused", function()
    -- extension 9 (BUFFER) with a made-up handle, as bytes from outside
    local forged = "\xd7\x09" .. ("\0"):rep(7) .. "\1"
    local ok, e = pcall(corral.decode, forged, { code = true })
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "CodecError"), tostring(e))
    assert.matches("BUFFER", e.message)
  end)
end)

describe("a buffer and a process worker", function()
  local fds = h.memfds

  local P = corral.worker {
    sum = function(_, b)
      local p, s = b:ptr(), 0
      for i = 0, #b - 1 do s = s + p[i] end
      return s
    end,
    echo = function(_, b) return b end,
    make = function(_, n, byte)
      local b = require("corral").buffer(n)
      local p = b:wptr()
      for i = 0, n - 1 do p[i] = byte end
      return b
    end,
    live = function()
      collectgarbage()
      collectgarbage()
      local lffi = require "ffi"
      pcall(lffi.cdef, "int getpid(void);")
      local p = io.popen("ls -l /proc/" .. lffi.C.getpid() .. "/fd 2>/dev/null | grep -c memfd")
      local n = tonumber(p:read("*a"))
      p:close()
      return require("corral.core").buffer_live(), n
    end,
  }

  it("travels both ways, small (as bytes) and large (in shared memory), with the same bytes", function()
    local w = P:options { mode = "process" }:init()
    for _, n in ipairs { 10, 100000, 3 * 1024 * 1024 } do
      local b = corral.buffer(n)
      local p = b:wptr()
      for i = 0, n - 1 do p[i] = i % 251 end
      local want = 0
      for i = 0, n - 1 do want = want + i % 251 end
      assert.are.equal(want, w:sum(b):result(30))
      local back = w:echo(b):result(30)
      assert.is_true(corral.is_buffer(back))
      assert.are.equal(n, #back)
      assert.are.equal(b:sub(1, 1000), back:sub(1, 1000))
      assert.are.equal(b:sub(-1000), back:sub(-1000))
      local made = w:make(n, 9):result(30)
      assert.are.equal(9 * n, w:sum(made):result(30))
    end
    w:stop()
  end)

  it("goes from one process worker to another as an input (in shared memory both hops)", function()
    local a, b = P:options { mode = "process" }:init(), P:options { mode = "process" }:init()
    local made = a:make(200000, 3)
    assert.are.equal(600000, b:sum(made):result(30))
    a:stop()
    b:stop()
  end)

  it("is freed in every process when the last holder lets go, across 1,000 round trips", function()
    local w = P:options { mode = "process" }:init()
    local clive0, cfd0 = w:live():result(30)
    collectgarbage()
    collectgarbage()
    local live0, fd0 = core.buffer_live(), fds()
    do -- (the count sees a buffer in shared memory)
      local held = corral.buffer(100000)
      assert.is_true(fds() > fd0 and core.buffer_live() == live0 + 1)
      assert.are.equal(100000, #held)
    end
    for i = 1, 1000 do
      local b = corral.buffer(i % 2 == 0 and 100 or 100000)
      local back = w:echo(b):result(30)
      assert.are.equal(#b, #back)
    end
    h.wait_until(function()
      collectgarbage()
      collectgarbage()
      return core.buffer_live() <= live0 and fds() <= fd0
    end, 30)
    assert.are.equal(live0, core.buffer_live())
    assert.are.equal(fd0, fds())
    local clive, cfd = w:live():result(30)
    assert.are.equal(clive0, clive)
    assert.are.equal(cfd0, cfd)
    w:stop()
  end)

  it("passes 64 MiB to a process worker and back in far less time than copying it would take", function()
    local w = P:options { mode = "process" }:init()
    local big = corral.buffer(64 * 1024 * 1024)
    w:echo(corral.buffer(100000)):result(30) -- (started)
    local t0 = corral.now()
    local back = w:echo(big):result(30)
    local took = corral.now() - t0
    assert.are.equal(#big, #back)
    -- (a copy each way is ~50-100 ms here; by its descriptor it is < 5 ms)
    assert.is_true(took < 0.05, "64 MiB round trip took " .. took .. " s")
    w:stop()
  end)
end)
