--- Buffers: bytes shared by reference between tasks, threads and processes.
--
--     local buf = corral.buffer(("x"):rep(1e6))   -- or corral.buffer(size): zeroed
--     print(#buf, buf:sub(1, 3))                  --> 1000000  xxx
--     local p = buf:ptr()                         -- const uint8_t *, no copy
--
-- A buffer is writable (`buf:write`, `buf:wptr`) until it first crosses to
-- another context (an argument or a result of a thread or process worker
-- call): from then on it is immutable, and every holder reads the same
-- bytes. To a thread worker it travels by reference (no copy); to a
-- process worker as its bytes, once; a buffer of 64 KiB or more lives in
-- shared memory (a memfd). It is freed when the last holder lets go.
-- @module corral.buffer
local core = require "corral.core"
local errors = require "corral.errors"

local type, floor = type, math.floor
local new, sub, addr, write = core.buffer_new, core.buffer_sub, core.buffer_addr, core.buffer_write
local shared, is = core.buffer_shared, core.buffer_is

local M = {}
local Buffer = {}

local MAX = 2 ^ 48 -- (beyond any memory: sizes stay exact in a double)

local function self_check(b, fname)
  errors.check(is(b), fname, "self", "a buffer (call it with ':')", b)
end

--- A new buffer: a copy of the string `x`, or `x` zero bytes (writable
-- until it is first shared).
-- @param x a string, or a size in bytes
-- @return a buffer
function M.new(x)
  local t = type(x)
  errors.check(t == "string" or (t == "number" and x >= 0 and x <= MAX and x == floor(x)),
    "corral.buffer", "x", "a string, or a whole number of bytes", x)
  local b = new(x)
  if b == nil then error("corral.buffer: not enough memory for " .. (t == "string" and #x or x)
    .. " bytes", 2) end
  return b
end

--- Bytes `i` to `j` as a string (a copy), with `string.sub`'s rules:
-- negative positions count from the end; `j` defaults to the end.
-- @int[opt=1] i
-- @int[opt=-1] j
function Buffer:sub(i, j)
  self_check(self, "buffer:sub")
  i, j = i or 1, j or -1
  errors.check(type(i) == "number", "buffer:sub", "i", "a number", i)
  errors.check(type(j) == "number", "buffer:sub", "j", "a number", j)
  local n = #self
  if i < 0 then i = n + i + 1 end
  if j < 0 then j = n + j + 1 end
  if i < 1 then i = 1 end
  if j > n then j = n end
  if i > j then return "" end
  return sub(self, floor(i), floor(j))
end

local ffi
--- Its bytes as an FFI `const uint8_t *`, no copy. The pointer does not
-- keep the buffer alive: hold the buffer while you use it.
function Buffer:ptr()
  self_check(self, "buffer:ptr")
  ffi = ffi or require "ffi"
  return ffi.cast("const uint8_t *", addr(self))
end

local function writable(b, fname)
  if shared(b) then
    errors.usage(fname, "the buffer is shared: it is immutable since it first crossed to "
      .. "another context")
  end
end

--- Its bytes as an FFI `uint8_t *` to fill it, while it is writable (not
-- shared yet): raises `UsageError` once it is. Do not keep the pointer:
-- once the buffer has gone to a process worker, its memory is read-only
-- and a write through it faults.
function Buffer:wptr()
  self_check(self, "buffer:wptr")
  writable(self, "buffer:wptr")
  ffi = ffi or require "ffi"
  return ffi.cast("uint8_t *", addr(self))
end

--- Copy the string `s` into the buffer at position `i` (1-based), while it
-- is writable: raises `UsageError` once it is shared, or when `s` does not
-- fit.
-- @int i
-- @string s
function Buffer:write(i, s)
  self_check(self, "buffer:write")
  errors.check(type(i) == "number" and i >= 1 and i == floor(i), "buffer:write", "i",
    "a position from 1", i)
  errors.check(type(s) == "string", "buffer:write", "s", "a string", s)
  writable(self, "buffer:write")
  if i - 1 + #s > #self then
    errors.usage("buffer:write", "%d bytes at %d do not fit in a buffer of %d", #s, i, #self)
  end
  write(self, i - 1, s)
end

--- Whether it has crossed to another context (and is immutable).
function Buffer:shared()
  self_check(self, "buffer:shared")
  return shared(self)
end

core.buffer_index(Buffer)

M.Buffer, M.is = Buffer, is
return M
