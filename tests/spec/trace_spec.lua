-- The trace timeline (corral --trace, CORRAL_TRACE, corral.trace.start/stop):
-- the file is checked against the trace-event format, then for what it must
-- show (tracks, task and call slices, flows), see docs/trace.md.
local h = require "helper"
local json = require "dkjson"

-- A script with a thread worker and a 2-stage unwrap chain:
-- add(1, 2) -> mul(a, 10) -> add(b, 5), the last two unwrapping futures.
local CHAIN = [[
local corral = require "corral"
local Calc = corral.worker {
  add = function(_, a, b) return a + b end,
  mul = function(_, a, b) corral.sleep(0.005) return a * b end,
}
local w = Calc:options { name = "calc" }:init()
local a = w:add(1, 2)
local b = w:mul(a, 10)
local c = w:add(b, 5)
print(c:result())
w:stop()
]]

local write = h.write_script

-- Run `code` with the corral binary: `opts` before the script, `env` before
-- the command. Returns stdout, stderr, status.
local function run(code, opts, env)
  local path = write(code)
  local o, e, c = h.sh((env or "") .. " timeout -s KILL 60 " .. h.quote(h.bin) .. " " .. (opts or "")
    .. " " .. h.quote(path))
  os.remove(path)
  return o, e, c
end

local function load_trace(path)
  local text = assert(h.slurp(path), "no trace file at " .. path)
  local doc, _, err = json.decode(text)
  assert(doc ~= nil, "not JSON: " .. tostring(err))
  return doc, text
end

local function is_num(v) return type(v) == "number" end
local function is_str(v) return type(v) == "string" end
local function is_tab(v) return type(v) == "table" end

-- The fields the trace-event format requires for each phase used.
local REQUIRED = {
  X = { name = is_str, ph = is_str, pid = is_num, tid = is_num, ts = is_num, dur = is_num },
  B = { name = is_str, ph = is_str, pid = is_num, tid = is_num, ts = is_num },
  E = { ph = is_str, pid = is_num, tid = is_num, ts = is_num },
  M = { name = is_str, ph = is_str, pid = is_num, tid = is_num, args = is_tab },
  s = { name = is_str, cat = is_str, ph = is_str, id = is_str, pid = is_num, tid = is_num, ts = is_num },
  t = { name = is_str, cat = is_str, ph = is_str, id = is_str, pid = is_num, tid = is_num, ts = is_num },
  f = { name = is_str, cat = is_str, ph = is_str, id = is_str, pid = is_num, tid = is_num, ts = is_num },
}

-- Check the document against the format; returns its events by phase.
local function check_format(doc)
  assert.are.equal("table", type(doc.traceEvents), "traceEvents")
  local by = {}
  for i, ev in ipairs(doc.traceEvents) do
    local req = REQUIRED[ev.ph]
    assert(req, ("event %d: unexpected ph %s"):format(i, tostring(ev.ph)))
    for k, ok in pairs(req) do
      assert(ok(ev[k]), ("event %d (ph %s): field %s is %s"):format(i, ev.ph, k, tostring(ev[k])))
    end
    if ev.ph == "X" then assert(ev.dur >= 0, "negative dur") end
    if ev.ph == "f" then assert.are.equal("e", ev.bp, "a flow end binds to its enclosing slice") end
    by[ev.ph] = by[ev.ph] or {}
    table.insert(by[ev.ph], ev)
  end
  return by
end

local function ns(x) return math.floor(x * 1000 + 0.5) end

-- A track: a thread (tid) of a process (pid; a process worker's events are
-- under its own pid).
local function track(ev) return ev.pid .. ":" .. ev.tid end

-- Per track: X slices nest (each inside the one it starts in, or after it
-- ends), and every B has its E.
local function check_nesting(by)
  local tracks = {}
  for _, ev in ipairs(by.X or {}) do
    local k = track(ev)
    tracks[k] = tracks[k] or {}
    table.insert(tracks[k], { s = ns(ev.ts), e = ns(ev.ts) + ns(ev.dur), name = ev.name })
  end
  for tid, list in pairs(tracks) do
    table.sort(list, function(a, b)
      if a.s ~= b.s then return a.s < b.s end
      return a.e > b.e
    end)
    local stack = {}
    for _, sl in ipairs(list) do
      while #stack > 0 and stack[#stack].e <= sl.s do table.remove(stack) end
      local top = stack[#stack]
      if top and sl.e > top.e then
        error(("track %s: %s [%d, %d] overlaps %s [%d, %d]"):format(tid, sl.name, sl.s, sl.e, top.name,
          top.s, top.e))
      end
      table.insert(stack, sl)
    end
  end
  local open = {}
  local be = {}
  for _, ev in ipairs(by.B or {}) do table.insert(be, ev) end
  for _, ev in ipairs(by.E or {}) do table.insert(be, ev) end
  table.sort(be, function(a, b) return a.ts < b.ts end)
  for _, ev in ipairs(be) do
    local k = track(ev)
    open[k] = (open[k] or 0) + (ev.ph == "B" and 1 or -1)
    assert(open[k] >= 0, "an E without its B")
  end
  for _, n in pairs(open) do assert.are.equal(0, n, "a B without its E") end
  return tracks
end

-- The slice of track tr (pid:tid) enclosing time ts (the innermost).
local function enclosing(by, tr, ts)
  local best
  for _, ev in ipairs(by.X or {}) do
    if track(ev) == tr and ns(ev.ts) <= ns(ts) and ns(ts) <= ns(ev.ts) + ns(ev.dur) then
      if not best or ev.ts > best.ts or (ev.ts == best.ts and ev.dur < best.dur) then best = ev end
    end
  end
  return best
end

-- Flows by name: id -> {s =, f =} (each once, s before f).
local function flows(by, name)
  local out = {}
  for _, ph in ipairs { "s", "f" } do
    for _, ev in ipairs(by[ph] or {}) do
      if ev.name == name then
        out[ev.id] = out[ev.id] or {}
        assert.is_nil(out[ev.id][ph], "flow id " .. ev.id .. " has two " .. ph)
        out[ev.id][ph] = ev
      end
    end
  end
  return out
end

local function thread_names(by)
  local names, seen = {}, {}
  for _, ev in ipairs(by.M or {}) do
    if ev.name == "thread_name" then
      assert.is_nil(seen[track(ev)], "two thread_name for track " .. track(ev))
      seen[track(ev)] = true
      names[ev.args.name] = track(ev)
    end
  end
  return names, seen
end

describe("the trace timeline", function()
  local out_path

  before_each(function() out_path = h.tmpname() .. ".json" end)
  after_each(function() os.remove(out_path) end)

  it("corral --trace writes a valid trace of a thread worker and an unwrap chain", function()
    local out, err, code = run(CHAIN, "--trace " .. h.quote(out_path))
    assert.are.equal(0, code, err)
    assert.are.equal("35\n", out)
    local doc = load_trace(out_path)
    local by = check_format(doc)
    check_nesting(by)

    -- one named track per context, and every event on a named track
    local names, named = thread_names(by)
    assert.is_string(names.main)
    assert.is_string(names["worker calc"])
    for _, ev in ipairs(doc.traceEvents) do
      if ev.ph ~= "M" then assert(named[track(ev)], "an event on an unnamed track " .. track(ev)) end
    end
    local main, wk = names.main, names["worker calc"]

    -- task slices; call slices with the method's name and argument bytes
    local sends, runs, main_task = {}, {}, false
    for _, ev in ipairs(by.X) do
      if track(ev) == main and ev.name == "main chunk" then main_task = true end
      if ev.cat == "send" then
        assert.are.equal(main, track(ev))
        table.insert(sends, ev)
      elseif ev.cat == "call" then
        assert.are.equal(wk, track(ev))
        assert.is_number(ev.args.bytes)
        assert(ev.args.bytes > 0, "argument bytes")
        assert.is_string(ev.args.id)
        runs[ev.args.id] = runs[ev.args.id] or ev
      end
    end
    assert.is_true(main_task, "the main chunk's task slice")
    assert.are.same({ "call add", "call mul", "call add" },
      { sends[1].name, sends[2].name, sends[3].name })
    local n = 0
    for _ in pairs(runs) do n = n + 1 end
    assert.are.equal(3, n, "three calls ran")

    -- a flow from each call to where it ran: matching ids, s before f, each
    -- bound to the call's slices
    local calls = flows(by, "call")
    for _, send in ipairs(sends) do
      local fl = calls[send.args.id]
      assert(fl and fl.s and fl.f, "a flow for " .. send.name)
      assert(fl.s.ts < fl.f.ts, "s before f")
      assert.are.equal(send, enclosing(by, main, fl.s.ts))
      local ran = enclosing(by, wk, fl.f.ts)
      assert.are.equal("call", ran.cat)
      assert.are.equal(send.name, "call " .. ran.name)
      assert.are.equal(send.args.id, ran.args.id)
    end

    -- flows from a future to the call it was unwrapped into: add -> mul,
    -- mul -> add
    local unwraps = flows(by, "unwrap")
    local chain = {}
    for _, fl in pairs(unwraps) do
      assert(fl.s and fl.f, "an unwrap flow has both ends")
      assert(fl.s.ts < fl.f.ts, "s before f")
      local from, into = enclosing(by, track(fl.s), fl.s.ts), enclosing(by, track(fl.f), fl.f.ts)
      assert.are.equal("call", from.cat)
      assert.are.equal("call", into.cat)
      chain[#chain + 1] = from.name .. "->" .. into.name .. ":" .. into.args.id
    end
    table.sort(chain)
    assert.are.equal(2, #chain)
    assert.are.same({ "add->mul:" .. sends[2].args.id, "mul->add:" .. sends[3].args.id }, chain)
  end)

  it("the file parses with Python's json too (what Perfetto's users would try)", function()
    local _, err, code = run(CHAIN, "--trace " .. h.quote(out_path))
    assert.are.equal(0, code, err)
    local out, _, pc = h.sh("python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); "
      .. "print(len(d[\"traceEvents\"]) > 10)' " .. h.quote(out_path))
    assert.are.equal(0, pc)
    assert.are.equal("True\n", out)
  end)

  it("CORRAL_TRACE=file traces the run", function()
    local out, err, code = run(CHAIN, nil, "CORRAL_TRACE=" .. h.quote(out_path))
    assert.are.equal(0, code, err)
    assert.are.equal("35\n", out)
    local by = check_format(load_trace(out_path))
    check_nesting(by)
    local names = thread_names(by)
    assert.is_string(names["worker calc"])
    assert.is_true(#(by.f or {}) >= 3)
  end)

  it("CORRAL_TRACE works in a stock luajit host that loads corral.so", function()
    local path = write([[
      local corral = require "corral"
      local w = corral.worker { sq = function(_, x) return x * x end }:options { name = "hostsq" }:init()
      print(w:sq(7):result())
      w:stop()
    ]])
    local out, err, code = h.sh("CORRAL_TRACE=" .. h.quote(out_path) .. " " .. h.luajit() .. " "
      .. h.quote(path))
    os.remove(path)
    assert.are.equal(0, code, err)
    assert.are.equal("49\n", out)
    local by = check_format(load_trace(out_path))
    check_nesting(by)
    local names = thread_names(by)
    assert.is_string(names.main)
    assert.is_string(names["worker hostsq"])
    assert.are.equal(1, #by.s)
    assert.are.equal(by.s[1].id, by.f[1].id)
  end)

  it("corral.trace.start/stop from a script write a file, workers started before included", function()
    local path = write([[
      local corral = require "corral"
      local w = corral.worker { sq = function(_, x) return x * x end }:options { name = "sq" }:init()
      assert(w:sq(2):result() == 4) -- (the worker runs before the trace starts)
      assert(corral.trace.active() == false)
      assert(corral.trace.start(arg[1]) == true)
      assert(corral.trace.active() == true)
      local ok, e = pcall(corral.trace.start, arg[1])
      assert(not ok and e:match("already"), e)
      local f3, f4 = w:sq(3), w:sq(4)
      local r3, r4 = f3:result(), f4:result()
      local n = corral.trace.stop()
      print(r3, r4, type(n), n > 0, corral.trace.stop(), corral.trace.active())
      w:stop()
    ]])
    local out, err, code = h.sh("timeout -s KILL 60 " .. h.quote(h.bin) .. " " .. h.quote(path) .. " "
      .. h.quote(out_path))
    os.remove(path)
    assert.are.equal(0, code, err)
    assert.are.equal("9\t16\tnumber\ttrue\tfalse\tfalse\n", out)
    local by = check_format(load_trace(out_path))
    check_nesting(by)
    local names = thread_names(by)
    assert.is_string(names["worker sq"], "the worker's track")
    local ran = 0
    for _, ev in ipairs(by.X) do
      if ev.cat == "call" and ev.name == "sq" then ran = ran + 1 end
    end
    assert.are.equal(2, ran, "the two calls made while tracing, not the one before")
  end)

  it("a path that cannot be written is a clear error", function()
    local bad = "/nonexistent-dir/trace.json"
    local out, err, code = run("print('ran')", "--trace " .. bad)
    assert.are.equal(1, code)
    assert.are.equal("", out)
    assert.matches("corral: --trace: cannot open " .. bad .. ": No such file or directory", err, 1, true)
    out, err, code = run([[
      local corral = require "corral"
      local ok, e = pcall(corral.trace.start, "/nonexistent-dir/trace.json")
      print(ok, e)
    ]])
    assert.are.equal(0, code, err)
    assert.matches("false\t.*corral.trace.start: cannot open /nonexistent%-dir/trace.json", out)
    -- CORRAL_TRACE with a bad path: said on stderr, the script still runs
    out, err, code = run("print('ran')", nil, "CORRAL_TRACE=" .. bad)
    assert.are.equal(0, code)
    assert.are.equal("ran\n", out)
    assert.matches("corral: CORRAL_TRACE: cannot open " .. bad, err, 1, true)
    -- not a path
    local _, err3, code3 = run("require('corral').trace.start(42)")
    assert.are.equal(1, code3)
    assert.matches("corral.trace.start: path: a string expected, got number", err3, 1, true)
    -- --trace without a file
    local _, err2, code2 = h.sh(h.quote(h.bin) .. " --trace")
    assert.are.equal(1, code2)
    assert.matches("usage", err2, 1, true)
  end)

  it("async and sync workers: call slices on the caller's track, nested, with their flows", function()
    local out, err, code = run([[
      local corral = require "corral"
      local C = corral.worker {
        add = function(_, a, b) return a + b end,
        mul = function(_, a, b) corral.sleep(0.002) return a * b end,
      }
      for _, mode in ipairs { "async", "sync" } do
        local w = C:options { mode = mode }:init()
        local a = w:add(1, 2)
        print(mode, w:add(w:mul(a, 10), 5):result())
        w:stop()
      end
    ]], "--trace " .. h.quote(out_path))
    assert.are.equal(0, code, err)
    assert.are.equal("async\t35\nsync\t35\n", out)
    local by = check_format(load_trace(out_path))
    check_nesting(by)
    local names = thread_names(by)
    local runs = 0
    for _, ev in ipairs(by.X) do
      if ev.cat == "call" then
        assert.are.equal(names.main, track(ev))
        runs = runs + 1
      end
    end
    assert(runs >= 6, "six calls ran (a waiting one in pieces)")
    local n = 0
    for _, fl in pairs(flows(by, "unwrap")) do
      assert(fl.s and fl.f and fl.s.ts < fl.f.ts)
      n = n + 1
    end
    assert.are.equal(4, n, "two unwraps per mode")
  end)
  it("a process worker: its own process and track in the parent's file, flows into it", function()
    local out, err, code = run([[
      local corral = require "corral"
      local Calc = corral.worker {
        add = function(_, a, b) return a + b end,
        mul = function(_, a, b) corral.sleep(0.002) return a * b end,
      }
      local w = Calc:options { name = "pcalc", mode = "process" }:init()
      local a = w:add(1, 2)
      print(w:add(w:mul(a, 10), 5):result())
      w:stop()
    ]], "--trace " .. h.quote(out_path))
    assert.are.equal(0, code, err)
    assert.are.equal("35\n", out)
    local by = check_format(load_trace(out_path))
    check_nesting(by)
    local names = thread_names(by)
    local main, wk = names.main, names["worker pcalc"]
    assert.is_string(wk, "the process worker's track")
    assert.are_not.equal(main:match("^%d+"), wk:match("^%d+"), "under the child's pid")
    local pname
    for _, ev in ipairs(by.M) do
      local same = track(ev):match("^%d+") == wk:match("^%d+")
      if ev.name == "process_name" and same then pname = ev.args.name end
    end
    assert.matches("worker pcalc", pname)
    local calls = flows(by, "call")
    local n = 0
    for _, fl in pairs(calls) do
      assert(fl.s and fl.f, "a flow with both ends")
      assert(fl.s.ts < fl.f.ts, "s before f")
      assert.are.equal("send", enclosing(by, main, fl.s.ts).cat)
      local ran = enclosing(by, wk, fl.f.ts)
      assert.are.equal("call", ran.cat)
      assert(ran.args.bytes > 0)
      n = n + 1
    end
    assert.are.equal(3, n, "a flow into the child for each call")
    -- the child's fragment is merged and gone
    local left = h.sh("ls " .. h.quote(out_path) .. ".*.part 2>/dev/null")
    assert.are.equal("", left)
  end)
end)
