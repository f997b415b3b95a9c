-- seed.lua DIR: write the seed corpus of the decoder's fuzz targets into
-- DIR/fuzz_trusted and DIR/fuzz_foreign: encodings of representative values,
-- and corral's extensions in their trusted shapes.
-- luacheck: globals answer
require "corral"
local core = require "corral.core"
local dir = assert(arg[1], "usage: seed.lua DIR")

local function be(n, bytes)
  local t = {}
  for i = bytes, 1, -1 do t[i] = string.char(n % 256); n = math.floor(n / 256) end
  return table.concat(t)
end

local shared = { "s" }
local cyclic = { name = "c" }
cyclic.self = cyclic
local deep = {}
local cur = deep
for _ = 1, 99 do cur.x = {}; cur = cur.x end

local seeds = {
  plain = assert(core.encode(nil, true, false, 0, -1, 127, 255, 65536, 2 ^ 40, -2 ^ 40, 0.5, 1 / 0,
    "", "text")),
  table = assert(core.encode({ 1, 2, 3, { a = 1, b = { true } }, [10] = "hole" })),
  shared = assert(core.encode({ a = shared, b = shared }, cyclic)),
  deep = assert(core.encode(deep)),
  cfunc = assert(core.encode(print, string.format)),
  func = assert(core.encode(function(x) return x + #shared end)),
  env = assert(core.encode(setfenv(function() return answer end, { answer = 42 }))),
  module = "\145\199\6\4string",
  timestamps = "\147\214\255\90\74\246\165\215\255\161\220\215\200\90\74\246\165" ..
    "\199\12\255\0\0\0\0\255\255\255\255\255\255\255\255",
  ref = "\146\145\1\214\1\0\0\0\0",
  dep = "\145\214\2\0\0\0\0",
  future = "\145\215\3" .. be(0, 4) .. be(1, 4),
  worker = "\145\147\199\0\7\129\164name\161w\215\8" .. be(0, 4) .. be(2, 4),
  map = "\145\131\161a\1\2\146\3\4\195\192",
  bin = "\145\196\3abc",
  ext = "\145\212\42\0",
}

for _, target in ipairs { "fuzz_trusted", "fuzz_foreign" } do
  os.execute("mkdir -p " .. dir .. "/" .. target)
  for name, bytes in pairs(seeds) do
    local f = assert(io.open(dir .. "/" .. target .. "/seed-" .. name, "wb"))
    f:write(bytes)
    f:close()
  end
end
