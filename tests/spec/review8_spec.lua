-- Review 8: an adversarial review of the performance changes of issue 8
-- (the codec's array fast path and exact_int, the spin budget, registry
-- lookups by light userdata, fvalues' count + value, corral.worker loaded
-- lazily in worker threads). Each `it` either exposes a defect (said so in
-- its comment) or guards behaviour the changes could have broken.
local corral = require "corral"
local h = require "helper"

local function run(code, limit)
  return h.run(code, limit or 60)
end

-- A number as text that tells apart what == does not (NaN, -0, the bits).
local function show(x)
  if type(x) ~= "number" then return type(x) .. ":" .. tostring(x) end
  if x ~= x then return "nan" end
  if x == 0 and 1 / x < 0 then return "-0" end
  return ("%.17g"):format(x)
end

local Echo = corral.worker {
  echo = function(_, ...) return ... end,
  -- what the worker sees, as text (so the check does not decode twice)
  seen = function(_, t)
    local function sh(x)
      if type(x) ~= "number" then return type(x) end
      if x ~= x then return "nan" end
      if x == 0 and 1 / x < 0 then return "-0" end
      return ("%.17g"):format(x)
    end
    local out = {}
    for i = 1, t.n do out[i] = sh(t[i]) end
    return table.concat(out, " ")
  end,
}

describe("review8: the codec's array fast path", function()
  local w
  setup(function() w = Echo:init() end)
  teardown(function() w:stop() end)

  local specials = { 0 / 0, -0.0, 1 / 0, -1 / 0, 2 ^ 53, 2 ^ 53 + 2, -2 ^ 53, -2 ^ 53 - 2,
    2 ^ 63, -2 ^ 63, 2 ^ 64, 1e308, 5e-324, -5e-324, 0.1, -1.5, 2 ^ 31, -2 ^ 31 - 1, 2 ^ 32,
    4294967295, -1, 0, 1, 127, 128, -32, -33, 255, 256, 65535, 65536 }

  it("numbers in an array go there and back exactly (NaN, -0, inf, 2^53 and beyond)", function()
    local back = w:echo(specials):result(10)
    assert.are.equal(#specials, #back)
    for i = 1, #specials do
      assert.are.equal(show(specials[i]), show(back[i]), "at [" .. i .. "]")
    end
  end)

  it("the worker sees the same numbers as the caller sent (one way)", function()
    local tn, expect = { n = #specials }, {}
    for i, x in ipairs(specials) do tn[i], expect[i] = x, show(x) end
    assert.are.equal(table.concat(expect, " "), w:seen(tn):result(10))
  end)

  it("random doubles keep their bits through a worker, in an array and in a map", function()
    local ffi = require "ffi"
    local u = ffi.new("union { double d; uint64_t u; }")
    local rs = { 12345 }
    local function rnd32()
      rs[1] = (rs[1] * 1103515245 + 12345) % 2147483648
      return rs[1]
    end
    local arr, map = {}, {}
    for i = 1, 2000 do
      u.u = ffi.cast("uint64_t", rnd32()) * 4294967296ULL + rnd32() * 2
      arr[i] = u.d
      map["k" .. i] = u.d
    end
    local a2, m2 = w:echo(arr, map):result(10)
    for i = 1, #arr do
      assert.are.equal(show(arr[i]), show(a2[i]), "array [" .. i .. "]")
      assert.are.equal(show(arr[i]), show(m2["k" .. i]), "map k" .. i)
    end
  end)

  it("integers near 2^53 and huge integer-valued doubles as keys and values", function()
    local t = { [2 ^ 53] = "a", [-2 ^ 53] = "b", [2 ^ 60] = "c", [1e300] = "d", [0.5] = "e" }
    local back = w:echo(t):result(10)
    for k, v in pairs(t) do assert.are.equal(v, back[k], show(k)) end
    local arr = {}
    for i = 1, 64 do arr[i] = 2 ^ 53 - 32 + i end
    local b2 = w:echo(arr):result(10)
    for i = 1, 64 do assert.are.equal(show(arr[i]), show(b2[i])) end
  end)

  it("arrays with holes, a nil at the end, a lying border, array+hash parts", function()
    local holes = w:echo({ 1, nil, 3 }):result(10)
    assert.are.same({ 1, nil, 3 }, { holes[1], holes[2], holes[3] })
    local tail = w:echo({ 1, 2, nil }):result(10)
    assert.are.same({ 1, 2 }, tail)
    local lie = { 1, 2, 3, 4, 5, 6, 7, 8 }
    lie[8], lie[4] = nil, nil -- (#lie may say 3 or 7)
    local b = w:echo(lie):result(10)
    for i = 1, 8 do assert.are.equal(lie[i], b[i], "[" .. i .. "]") end
    local sparse = {}
    sparse[1], sparse[2], sparse[4] = 1, 2, 4
    b = w:echo(sparse):result(10)
    assert.are.same(sparse, b)
    local both = { 1, "two", 3, x = "y", [10] = 10, [0] = 0, [-1] = -1, [1.5] = 1.5 }
    b = w:echo(both):result(10)
    assert.are.same(both, b)
  end)

  it("mixed arrays: numbers, strings, tables, booleans, the same subtable twice, a cycle", function()
    local sub = { 1, 2 }
    local long = string.rep("x", 1024 * 1024)
    local m = { 1, "a", sub, sub, { x = 1 }, true, false, long, long, -0.0, "" }
    m[12] = m
    local r = w:echo(m):result(10)
    assert.are.equal(12, #r)
    assert.are.equal(1, r[1])
    assert.are.equal("a", r[2])
    assert.are.same({ 1, 2 }, r[3])
    assert.are.equal(r[3], r[4]) -- one table, twice
    assert.are.equal(1, r[5].x)
    assert.is_true(r[6])
    assert.is_false(r[7])
    assert.are.equal(long, r[8])
    assert.are.equal(long, r[9])
    assert.are.equal("-0", show(r[10]))
    assert.are.equal("", r[11])
    assert.are.equal(r, r[12]) -- the cycle through the array
  end)

  it("metatables (__index, __len, __pairs) are not consulted: the raw array goes", function()
    local t = setmetatable({ 1, 2, 3 }, {
      __index = function() return 9 end,
      __len = function() return 99 end,
      __pairs = function() error("pairs consulted") end,
    })
    local r = w:echo(t):result(10)
    assert.are.equal(3, #r)
    assert.is_nil(r[4])
    assert.is_nil(getmetatable(r))
  end)

  it("a value that cannot travel after fast-path elements names its path", function()
    local co = coroutine.create(function() end)
    local cases = {
      { { 1, "a", co }, "args%[1%]%[3%]" },
      { { { 1, 2, co } }, "args%[1%]%[1%]%[3%]" },
      { { a = { 1, 2, 3 }, b = co }, "args%[1%]%.b" },
      { { { 1, 2 }, { 3, 4 }, { 5, { 6, co } } }, "args%[1%]%[3%]%[2%]%[2%]" },
    }
    for _, c in ipairs(cases) do
      local ok, e = pcall(function() return w:echo(c[1]):result(10) end)
      assert.is_false(ok)
      assert.is_true(corral.is_error(e, "CodecError"), tostring(e))
      assert.matches(c[2] .. ": thread", tostring(e))
    end
    -- and the next encode is not confused by the failed one's frames
    local ok, e = pcall(function() return w:echo(1, { 2, 3 }, { 4, co }):result(10) end)
    assert.is_false(ok)
    assert.matches("args%[3%]%[2%]: thread", tostring(e))
    assert.are.same({ 1, 2, 3 }, w:echo({ 1, 2, 3 }):result(10))
  end)

  it("futures among numbers in an array are unwrapped (their first value), pending or settled", function()
    local W2 = corral.worker {
      pair = function(_, x) return x, "second" end,
      sum = function(_, t)
        local s = 0
        for i = 1, #t do s = s + t[i] end
        return s, #t
      end,
    }
    local a, b = W2:init(), W2:init()
    local arr = {}
    for i = 1, 50 do
      arr[#arr + 1] = i
      arr[#arr + 1] = b:pair(i) -- (two values: the first stands for it)
    end
    local s, n = a:sum(arr):result(10)
    assert.are.equal(2550, s)
    assert.are.equal(100, n)
    local p = corral.future()
    local f = a:sum({ 1, 2, p, 4 })
    corral.spawn(function() p:set_result(3, "ignored") end)
    assert.are.equal(10, f:result(10))
    a:stop()
    b:stop()
  end)

  it("a large array of numbers and strings round-trips", function()
    local big = {}
    for i = 1, 100000 do big[i] = (i % 3 == 0) and tostring(i) or i * 0.5 end
    local r = w:echo(big):result(20)
    assert.are.equal(#big, #r)
    for i = 1, #big do
      if r[i] ~= big[i] then assert.are.equal(big[i], r[i], "[" .. i .. "]") end
    end
  end)
end)

describe("review8: fvalues (count and one value)", function()
  local w
  local W = corral.worker {
    many = function(_, n)
      local t = {}
      for i = 1, n do t[i] = i end
      return unpack(t, 1, n)
    end,
    holes = function() return nil, 2, nil end,
    none = function() end,
    one_nil = function() return nil end,
    one_false = function() return false end,
    soft = function() return nil, "boom" end,
    first = function(_, x) return x end,
    count = function(_, ...) return select("#", ...) end,
    raise = function(_, v) error(v, 0) end,
  }
  setup(function() w = W:init() end)
  teardown(function() w:stop() end)
  local function pack(...) return { n = select("#", ...), ... } end

  it("keeps nil holes and the count: return nil, 2, nil", function()
    local r = pack(w:holes():result(10))
    assert.are.equal(3, r.n)
    assert.is_nil(r[1])
    assert.are.equal(2, r[2])
    assert.is_nil(r[3])
  end)

  it("0, 1 (nil and false), 2, 255 values", function()
    assert.are.equal(0, pack(w:none():result(10)).n)
    local one = pack(w:one_nil():result(10))
    assert.are.equal(1, one.n)
    assert.is_nil(one[1])
    one = pack(w:one_false():result(10))
    assert.are.equal(1, one.n)
    assert.is_false(one[1])
    for _, n in ipairs { 0, 1, 2, 3, 255 } do
      local r = pack(w:many(n):result(10))
      assert.are.equal(n, r.n)
      for i = 1, n do assert.are.equal(i, r[i]) end
    end
    local s = pack(w:soft():result(10))
    assert.are.same({ n = 2, nil, "boom" }, s)
  end)

  it("a future's result asked twice gives the same values (decoded once)", function()
    for _, f in ipairs { w:holes(), w:none(), w:many(1), w:many(2) } do
      local a, b = pack(f:result(10)), pack(f:result(10))
      assert.are.same(a, b)
    end
  end)

  it("an input stands for its first value, whatever the count", function()
    assert.is_nil(w:first(w:holes()):result(10))
    assert.is_nil(w:first(w:none()):result(10))
    assert.are.equal(1, w:first(w:many(3)):result(10))
    assert.is_false(w:first(w:one_false()):result(10))
    assert.are.equal(1, w:count(w:none()):result(10)) -- (an argument, nil)
  end)

  it("gather and wait take the first value of each", function()
    local r = corral.gather({ w:holes(), w:none(), w:many(2), w:one_false() }, { timeout = 10 })
    assert.is_nil(r[1])
    assert.is_nil(r[2])
    assert.are.equal(1, r[3])
    assert.is_false(r[4])
  end)

  it("errors raised as values of any kind (a table, a string, nil, false) come back as the cause", function()
    for _, v in ipairs { { code = 7 }, "plain", false } do
      local f = w:raise(v)
      local ok, e = pcall(f.result, f, 10)
      assert.is_false(ok)
      assert.is_true(corral.is_error(e, "WorkerError"), tostring(e))
      if type(v) == "table" then
        assert.are.equal(7, e.value.code)
      else
        assert.are.equal(v, e.value)
      end
      assert.are.equal(tostring(e), tostring(f:exception(10)))
    end
    local f = w:raise(nil)
    local ok, e = pcall(f.result, f, 10)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "WorkerError"), tostring(e))
    assert.is_nil(e.value)
  end)
end)

describe("review8: corral.worker loaded lazily in worker threads", function()
  local Target = corral.worker { hi = function(_, x) return "hi " .. tostring(x) end }

  it("a worker starts without the handle module, loaded when a handle arrives deep in an array", function()
    local t = Target:init()
    local W = corral.worker {
      loaded = function() return package.loaded["corral.worker_handle"] ~= nil end,
      call_in = function(_, arr) return arr[2][1].h:hi(arr[1]):result(10) end,
    }
    local w = W:init()
    assert.is_false(w:loaded():result(10))
    assert.are.equal("hi a", w:call_in({ "a", { { h = t } } }):result(10))
    assert.is_true(w:loaded():result(10))
    w:stop()
    t:stop()
  end)

  it("a handle as an init argument, a worker that makes its own worker, a handle as a result", function()
    local t = Target:init()
    local I = corral.worker {
      init = function(self, x) self.x = x end,
      go = function(self) return self.x:hi("init"):result(10) end,
      own = function()
        local c = require "corral"
        local X = c.worker { sq = function(_, x) return x * x end }
        local x = X:init()
        local r = x:sq(7):result(10)
        x:stop()
        return r
      end,
      make = function()
        return require("corral").worker { tw = function(_, x) return x * 2 end }:init()
      end,
      via = function(_, other) -- a handle in a result, decoded in a worker
        local made = other:make():result(10)
        local r = made:tw(5):result(10)
        made:stop()
        return r
      end,
      submit = function() return require("corral").submit(function(a) return a + 1 end, 41):result(10) end,
    }
    local is = {}
    for k = 1, 6 do is[k] = I:init(t) end
    assert.are.equal("hi init", is[1]:go():result(10))
    assert.are.equal(49, is[2]:own():result(10))
    local made = is[3]:make():result(10)
    assert.are.equal(42, made:tw(21):result(10))
    made:stop()
    assert.are.equal(10, is[4]:via(is[5]):result(10))
    assert.are.equal(42, is[6]:submit():result(10))
    for k = 1, 6 do is[k]:stop() end
    t:stop()
  end)

  it("a worker whose code replaced the global require still receives handles", function()
    -- Before e8b956f the codec's import function was hooked when corral
    -- loaded (luaopen_corral: hook(L, "corral.worker", "import", ...)).
    -- Now corral__lua_push_import (src/lua_worker.c) calls the *global*
    -- `require` at decode time: a worker that sandboxes or replaces
    -- `require` (require = nil, or a loader that refuses names) can no
    -- longer receive a worker handle: "worker handles cannot be rebuilt in
    -- this state". (Also: when `require` is not a function the function
    -- pops one of the two values it pushed.) Fix: take `require` (or
    -- package.loaded / the preload loader of corral.worker_handle) from the
    -- registry, or hook the import from corral.worker_handle when corral
    -- loads (it is loaded by worker_main anyway, through worker_serve's
    -- users), not through the script's global.
    local t = Target:init()
    local W = corral.worker {
      sandbox = function() _G.require = function(name) error("module " .. name .. " refused", 0) end end,
      use = function(_, x) return x:hi("s"):result(10) end,
      still = function() return (pcall(require, "string")) end,
    }
    local w = W:init()
    w:sandbox():result(10)
    local ok, r = pcall(function() return w:use(t):result(10) end)
    -- and the script's own require is left in place
    local still = w:still():result(10)
    w:stop()
    t:stop()
    assert.is_true(ok, tostring(r))
    assert.are.equal("hi s", r)
    assert.is_false(still)
  end)
end)

describe("review8: many workers on 2 cores (the spin budget)", function()
  it("48 instances, each with calls that mix work and tiny replies, all make progress", function()
    local out, err, code = run([==[
      local corral = require "corral"
      local W = corral.worker {
        inc = function(_, x) return x + 1 end,
        burn = function(_, ms)
          local t0 = os.clock()
          while os.clock() - t0 < ms / 1000 do end
          return true
        end,
      }
      local N = 48
      local ws = {}
      for i = 1, N do ws[i] = W:init() end
      local t0 = corral.now()
      local fs, owner = {}, {}
      for round = 1, 60 do
        for i = 1, N do
          if (i + round) % 16 == 0 then
            fs[#fs + 1] = ws[i]:burn(1)
          else
            fs[#fs + 1] = ws[i]:inc(round)
          end
          owner[#fs] = i
        end
      end
      local r = corral.gather(fs, { timeout = 60 })
      local per = {}
      for k = 1, #fs do
        if r[k] ~= nil then per[owner[k]] = (per[owner[k]] or 0) + 1 end
      end
      local short = 0
      for i = 1, N do if per[i] ~= 60 then short = short + 1 end end
      for i = 1, N do assert(ws[i]:stop { timeout = 10 }) end
      print(("short %d elapsed %.2f"):format(short, corral.now() - t0))
    ]==], 90)
    assert.are.equal(0, code, err)
    local short, el = out:match("short (%d+) elapsed ([%d%.]+)")
    assert.are.equal("0", short, out .. err)
    assert.is_true(tonumber(el) < 60, out)
  end)

  it("a ring of 32 workers each waiting on the next one's reply does not hang", function()
    -- every worker loop waits for a reply while most of them cannot spin
    -- (the budget is the CPUs): each needs a real wake-up.
    local out, err, code = run([==[
      local corral = require "corral"
      local R = corral.worker {
        init = function(self, i) self.i = i end,
        set = function(self, nxt) self.nxt = nxt end,
        pass = function(self, hops)
          if hops == 0 then return self.i end
          return self.nxt:pass(hops - 1):result(30)
        end,
      }
      local N = 32
      local ws = {}
      -- (room for every chain in each: with one runner the chains deadlock)
      R = R:options { max_concurrency = 64 }
      for i = 1, N do ws[i] = R:init(i) end
      for i = 1, N do ws[i]:set(ws[i % N + 1]):result(10) end
      local t0 = corral.now()
      local fs = {}
      for k = 1, 40 do fs[k] = ws[k % N + 1]:pass(N - 1) end
      local r = corral.gather(fs, { timeout = 60 })
      local ok = 0
      for k = 1, 40 do if r[k] == (k % N + N - 1) % N + 1 then ok = ok + 1 end end
      print(("ok %d elapsed %.2f"):format(ok, corral.now() - t0))
      for i = 1, N do ws[i]:set(false):result(10) end
      for i = 1, N do ws[i]:stop { timeout = 10 } end
    ]==], 90)
    assert.are.equal(0, code, err)
    assert.matches("ok 40 ", out, err)
  end)

  it("stopping 32 workers right after a burst (while they spin) returns promptly", function()
    local out, err, code = run([==[
      local corral = require "corral"
      local W = corral.worker { inc = function(_, x) return x + 1 end }
      for _ = 1, 5 do
        local ws = {}
        for i = 1, 32 do ws[i] = W:init() end
        local fs = {}
        for k = 1, 3200 do fs[k] = ws[k % 32 + 1]:inc(k) end
        corral.gather(fs, { timeout = 30 })
        local t0 = corral.now()
        local stops = {}
        for i = 1, 32 do stops[i] = corral.spawn(function() return ws[i]:stop { timeout = 10 } end) end
        local r = corral.gather(stops, { timeout = 30 })
        local all = true
        for i = 1, 32 do all = all and r[i] == true end
        print(("stopped %s in %.3f"):format(tostring(all), corral.now() - t0))
      end
    ]==], 90)
    assert.are.equal(0, code, err)
    local n = 0
    for all, s in out:gmatch("stopped (%a+) in ([%d%.]+)") do
      n = n + 1
      assert.are.equal("true", all, out)
      assert.is_true(tonumber(s) < 5, out)
    end
    assert.are.equal(5, n, out .. err)
  end)

  it("no CPU is burnt while idle after a burst on 64 workers", function()
    local out, err, code = run([==[
      local corral = require "corral"
      local W = corral.worker { inc = function(_, x) return x + 1 end }
      local ws = {}
      for i = 1, 64 do ws[i] = W:init() end
      local fs = {}
      for k = 1, 20000 do fs[k] = ws[k % 64 + 1]:inc(k) end
      corral.gather(fs, { timeout = 30 })
      local c0, t0 = os.clock(), corral.now()
      corral.sleep(1)
      print(("idle %.4f over %.3f"):format(os.clock() - c0, corral.now() - t0))
      c0, t0 = os.clock(), corral.now()
      for _ = 1, 100 do corral.sleep(0.01) end
      print(("ticking %.4f over %.3f"):format(os.clock() - c0, corral.now() - t0))
      for i = 1, 64 do ws[i]:stop() end
    ]==], 60)
    assert.are.equal(0, code, err)
    local idle = tonumber(out:match("idle ([%d%.]+)"))
    local ticking = tonumber(out:match("ticking ([%d%.]+)"))
    assert.is_true(idle ~= nil and idle < 0.1, out .. err) -- (0.2 ms measured)
    assert.is_true(ticking ~= nil and ticking < 0.3, out .. err) -- (20 ms measured)
  end)
end)

describe("review8: the CPU count", function()
  it("follows the process's affinity: one CPU allowed, a default pool of one", function()
    local out, err = h.corral([[
      local corral = require "corral"
      print("pool " .. corral.config().pool_size)
      print("answer " .. corral.submit(function(x) return x + 1 end, 1):result(10))
    ]], "", "taskset -c 0 ")
    assert.matches("pool 1\n", out, 1, true)
    assert.matches("answer 2", out, 1, true)
    assert.are.equal("", err)
  end)
end)
