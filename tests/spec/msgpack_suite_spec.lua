-- Plain MessagePack from elsewhere: every vector of the msgpack-test-suite
-- conformance data set (npm package), fetched with npm into build/npm on first
-- use and decoded with core.decode, as foreign bytes. If the registry cannot
-- be reached this spec fails: it never skips.
require "corral"
local core = require "corral.core"
local h = require "helper"

local DIR = "build/npm"
local JSON = DIR .. "/node_modules/msgpack-test-suite/dist/msgpack-test-suite.json"
local LUA = DIR .. "/msgpack-test-suite.lua"

-- The suite as Lua: strings are carried in hex, so that no escaping can
-- change a byte on the way.
local CONVERT = [[
const fs = require("fs");
const [src, dst] = process.argv.slice(1);
const d = JSON.parse(fs.readFileSync(src, "utf8"));
const hex = (s) => 'H"' + Buffer.from(s, "utf8").toString("hex") + '"';
function lua(v) {
  if (v === null) return "nil";
  if (typeof v === "boolean") return String(v);
  if (typeof v === "number") return Object.is(v, -0) ? "-0.0" : String(v);
  if (typeof v === "string") return hex(v);
  if (Array.isArray(v)) return "{" + v.map(lua).join(", ") + "}";
  return "{" + Object.keys(v).map((k) => "[" + hex(k) + "] = " + lua(v[k])).join(", ") + "}";
}
let out = "local H = ...\nreturn {\n";
for (const file of Object.keys(d)) {
  for (const t of d[file]) {
    const kind = Object.keys(t).find((k) => k !== "msgpack" && k !== "bignum") || "bignum";
    out += "  { file = " + hex(file) + ", kind = " + hex(kind) + ", value = " + lua(t[kind]) +
      (t.bignum ? ", bignum = " + hex(t.bignum) : "") +
      ", msgpack = " + lua(t.msgpack) + " },\n";
  }
}
fs.writeFileSync(dst, out + "}\n");
]]

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

local function unhex(s)
  return (s:gsub("[^%x]", ""):gsub("%x%x", function(c) return string.char(tonumber(c, 16)) end))
end

local suite
local function load_suite()
  if suite then return suite end
  if not exists(JSON) then
    local out, err, code = h.sh("mkdir -p " .. DIR .. " && npm install --no-audit --no-fund --prefix " ..
      DIR .. " msgpack-test-suite")
    assert(code == 0 and exists(JSON), "npm could not fetch msgpack-test-suite:\n" .. out .. err)
  end
  if not exists(LUA) then
    local out, err, code = h.sh("node -e " .. h.quote(CONVERT) .. " " .. JSON .. " " .. LUA)
    assert(code == 0, "node could not convert the suite:\n" .. out .. err)
  end
  suite = assert(loadfile(LUA))(function(s) return unhex(s) end)
  return suite
end

-- The value a vector should decode to, as core.decode gives it.
local function expected(t)
  if t.kind == "binary" then return unhex(t.value) end
  if t.kind == "timestamp" then return { sec = t.value[1], nsec = t.value[2] } end
  if t.kind == "bignum" or t.bignum then
    -- 64-bit integers beyond 2^53 have no exact Lua number: they decode to
    -- the nearest double, which is what tonumber makes of the decimal text.
    -- So they are compared with that double, not with the integer itself.
    return tonumber(t.bignum)
  end
  return t.value
end

describe("the msgpack-test-suite, decoded as foreign bytes", function()
  it("has its 233 vectors", function()
    local n = 0
    for _, t in ipairs(load_suite()) do n = n + #t.msgpack end
    assert.are.equal(233, n)
  end)

  it("decodes every plain vector to its value", function()
    local n = 0
    for _, t in ipairs(load_suite()) do
      if t.kind ~= "ext" then
        for _, hexbytes in ipairs(t.msgpack) do
          -- core.decode takes an array of values: the vector is its one value
          local ok, v = pcall(core.decode, "\145" .. unhex(hexbytes))
          assert(ok, t.file .. " " .. hexbytes .. ": " .. tostring(v))
          assert.are.same(expected(t), v, t.file .. " " .. hexbytes)
          n = n + 1
        end
      end
    end
    assert.are.equal(233 - 11, n)
  end)

  it("decodes the 19 timestamps (all three sizes) to {sec, nsec}", function()
    local n = 0
    for _, t in ipairs(load_suite()) do
      if t.kind == "timestamp" then
        for _, hexbytes in ipairs(t.msgpack) do
          local v = core.decode("\145" .. unhex(hexbytes))
          assert.are.same({ sec = t.value[1], nsec = t.value[2] }, v)
          n = n + 1
        end
      end
    end
    assert.are.equal(19, n)
  end)

  it("refuses every other extension with a CodecError naming its type", function()
    local corral = require "corral"
    local n = 0
    for _, t in ipairs(load_suite()) do
      if t.kind == "ext" then
        for _, hexbytes in ipairs(t.msgpack) do
          local ok, e = pcall(core.decode, "\145" .. unhex(hexbytes))
          assert.is_false(ok, hexbytes)
          assert.is_true(corral.is_error(e, "CodecError"), tostring(e))
          assert.matches("extension " .. t.value[1], e.message)
          n = n + 1
        end
      end
    end
    assert.are.equal(11, n)
  end)
end)

-- The public codec: corral.decode takes a vector as it is (one value), and
-- corral.encode writes a value the suite lists in one of its forms, for every
-- kind Lua can represent as it is. The vectors that cannot apply, and why:
-- the 11 foreign extensions (refused, as above); binary (a Lua string, so it
-- is written back as a MessagePack str); timestamps (a table {sec, nsec},
-- written back as a map); 64-bit integers beyond 2^53 (no exact Lua number);
-- maps of several keys (Lua does not keep the order of keys, so the bytes
-- may differ in order; their value is checked); and empty maps, at any depth
-- (an empty Lua table is written as the empty array).
describe("the msgpack-test-suite through corral.decode and corral.encode", function()
  local corral = require "corral"

  local function applies(t)
    return t.kind ~= "ext" and t.kind ~= "binary" and t.kind ~= "timestamp" and t.kind ~= "bignum"
      and not t.bignum
  end

  local function keys(v)
    local n = 0
    if type(v) == "table" then for _ in pairs(v) do n = n + 1 end end
    return n
  end

  -- an empty table below the top, or an empty map
  local function empty_map(v, depth, kind)
    if type(v) ~= "table" then return false end
    if next(v) == nil then return depth > 0 or kind == "map" end
    for _, x in pairs(v) do
      if empty_map(x, depth + 1) then return true end
    end
    return false
  end

  it("decodes every plain vector as one value, and gives its value back through encode", function()
    local n = 0
    for _, t in ipairs(load_suite()) do
      if t.kind ~= "ext" then
        for _, hexbytes in ipairs(t.msgpack) do
          local v = corral.decode(unhex(hexbytes))
          assert.are.same(expected(t), v, t.file .. " " .. hexbytes)
          assert.are.same(v, corral.decode(corral.encode(v)), t.file .. " " .. hexbytes)
          n = n + 1
        end
      end
    end
    assert.are.equal(233 - 11, n)
  end)

  it("writes each value it can represent in one of the forms the suite lists", function()
    local n, checked = 0, 0
    for _, t in ipairs(load_suite()) do
      if applies(t) and not (t.kind == "map" and keys(t.value) > 1) and not empty_map(t.value, 0, t.kind) then
        local forms = {}
        for _, hexbytes in ipairs(t.msgpack) do forms[unhex(hexbytes)] = true end
        local bytes = corral.encode(corral.decode(unhex(t.msgpack[1])))
        assert.is_true(forms[bytes] ~= nil, t.file .. ": wrote " .. bytes:gsub(".", function(c)
          return ("%02x"):format(c:byte())
        end))
        checked = checked + 1
      end
      n = n + 1
    end
    -- (of the 85 values of the suite: 42 apply; the others are said above)
    assert.are.equal(42, checked, n .. " values")
  end)

  it("refuses the other extensions by type, and names where", function()
    local n = 0
    for _, t in ipairs(load_suite()) do
      if t.kind == "ext" then
        for _, hexbytes in ipairs(t.msgpack) do
          local ok, e = pcall(corral.decode, unhex(hexbytes))
          assert.is_false(ok, hexbytes)
          assert.is_true(corral.is_error(e, "CodecError"), tostring(e))
          assert.matches("^value: extension " .. t.value[1], e.message)
          n = n + 1
        end
      end
    end
    assert.are.equal(11, n)
  end)
end)
