-- Review of the REPL and the trace timeline (issue 12): what an adversary
-- tried that broke, each fixed, each spec failing before its fix.
local h = require "helper"
local pty = require "pty"
local json = require "dkjson"

local BIN = h.bin

local write = h.write_script

describe("review15: the REPL", function()
  local repl, p = pty.repl(BIN), nil
  before_each(repl.setup)
  after_each(function() repl.teardown(); p = nil end)
  local function start() p = repl.start() end
  local function line(s) return p:line(s) end

  it("corral -i with standard input not a terminal runs its lines and leaves at their end", function()
    -- (libedit's callback interface handed such lines over as empty ones,
    -- and spun at 100% CPU at the end of the input, forever)
    local script = write("greeting = 'hi from the script'\n")
    local lines = write("print(greeting)\nx = corral.sleep(0.05)\nprint('after', 6 * 7)\n")
    local o, _, c = h.sh("timeout -s KILL 20 " .. h.quote(BIN) .. " -i " .. h.quote(script) .. " < "
      .. h.quote(lines))
    assert.equal(0, c)
    assert.matches("hi from the script\n", o, 1, true)
    assert.matches("after\t42\n", o, 1, true)
    _, _, c = h.sh("timeout -s KILL 20 " .. h.quote(BIN) .. " -i " .. h.quote(script) .. " < /dev/null")
    assert.equal(0, c)
    o, _, c = h.sh("printf 'print(1 + 1)' | timeout -s KILL 20 " .. h.quote(BIN) .. " -i")
    assert.equal(0, c)
    assert.matches("\n2\n", o, 1, true) -- (a last line without a newline runs too)
    os.remove(script)
    os.remove(lines)
  end)

  it("Ctrl-D while a line runs (and workers are busy) leaves promptly with status 0", function()
    start()
    line("w = corral.worker{ spin = function(_, s) local t = os.time() + s "
      .. "while os.time() < t do end end }:init()")
    p:send("f = w:spin(60); print('wait' .. 'ing'); corral.future():result()\r")
    p:expect("waiting", 20, true) -- the line runs: the prompt is gone
    local t0 = os.time()
    p:send("\4")
    p:expect("[exit 0]", 20, true)
    assert.is_true(os.time() - t0 < 15)
  end)

  it("output without a newline is not followed by the prompt on the same line", function()
    start()
    line("do io.write('no' .. 'eol') end")
    assert.matches("noeol\n> ", p:screen(true), 1, true)
    line("pw = corral.worker({ hi = function() io.write('child' .. 'noeol') io.stdout:flush() end }, "
      .. "{ kind = 'process' }):init()")
    line("do pw:hi():result() end")
    assert.matches("childnoeol\n> ", p:screen(true), 1, true)
  end)

  it("output above a typed line that wraps on a narrow terminal erases all its rows", function()
    -- (only the cursor's row was erased: on a terminal of 20 columns the
    -- first rows of the line stayed above the output; and libedit was not
    -- told of a resize)
    local ffi = require "ffi"
    local flag = h.tmpname()
    os.remove(flag)
    start()
    line(("corral.spawn(function() while not io.open(%q) do corral.sleep(0.02) end print('ti' .. 'ck') end)")
      :format(flag))
    assert(ffi.C.ioctl(p.fd, 0x5414, ffi.new("struct corral_winsize", 10, 20, 0, 0)) == 0) -- TIOCSWINSZ
    local typed = ("abcdefghij"):rep(4) .. "k" -- 2 + 41 columns: 3 rows of 20
    p:send(typed)
    p:expect("ijk", 20, true) -- (where it wraps, libedit writes " \r": the screen shows a space)
    local from = #p.raw
    assert(io.open(flag, "w")):close()
    p:expect("tick", 20, true)
    local raw = p.raw:sub(from + 1)
    local before = raw:sub(1, raw:find("tick", 1, true) - 1)
    assert.matches("\27%[2A\27%[J", before) -- up to the prompt's row, erase below
    os.remove(flag)
    p:send("\21\4")
    p:expect("[exit 0]", 20, true)
  end)

  it("prints a table of many keys without sorting them all (it held the loop for seconds)", function()
    -- (1e6 string keys took 7 s, 3e5 table keys 4 s, between two steps of
    -- the loop: nothing ran, Ctrl-C unheard; the work is counted here)
    start()
    line("calls = 0; mt = { __tostring = function() calls = calls + 1 return 'k' end }; u = {}")
    line("for i = 1, 5000 do u[setmetatable({}, mt)] = i end")
    local out = line("u")
    assert.matches("^%s*{ %[k%] = %d+, .*, %.%.%. }%s*$", out)
    local calls = tonumber(line("calls"):match("%d+"))
    assert.is_true(calls < 200, "__tostring called " .. calls .. " times")
  end)

  it("prints values whose __tostring raises, returns a table or nil, as keys too", function()
    start()
    line("k1 = setmetatable({}, { __tostring = function() error('k') end }); "
      .. "k2 = setmetatable({}, getmetatable(k1))")
    local out = line("({ [k1] = 1, [k2] = 2 })")
    assert.matches("^%s*{ %[%(error object whose __tostring failed: stdin:1: k%)%] = %d, %[", out)
    assert.not_matches("corral:", out, 1, true)
    out = line("setmetatable({}, { __tostring = function() return {} end })")
    assert.matches("(table whose __tostring returned a table)", out, 1, true)
    line("n = setmetatable({}, { __tostring = function() return nil end })")
    out = line("({ [n] = 1, [{}] = 2 })")
    assert.matches("= 1, [{...}] = 2 }", out, 1, true)
    out = line("setmetatable({}, { __metatable = 5 })")
    assert.matches("^%s*table: 0x%x+%s*$", out)
    line("r = { __tostring = function() return tostring(math.random()) end }; t = {}; "
      .. "for i = 1, 200 do t[setmetatable({}, r)] = i end")
    out = line("t")
    assert.matches("^%s*{ %[", out)
    assert.matches("1+1", line("'1+1'"), 1, true) -- and the REPL goes on
  end)
end)

describe("review15: the trace", function()
  it("keeps UTF-8 names as they are, and escapes the bytes that are not UTF-8", function()
    local out = h.tmpname() .. ".json"
    local script = write([[
local corral = require "corral"
local w = corral.worker({ ["calc_é✓"] = function(_, a) return a end,
  ["bad\255\254\192\128\237\160\128x"] = function(_, a) return a end }):init()
assert(w["calc_é✓"](w, 1):result() == 1)
assert(w["bad\255\254\192\128\237\160\128x"](w, 2):result() == 2)
w:stop()
]])
    local _, e, c = h.sh("timeout -s KILL 60 " .. h.quote(BIN) .. " --trace " .. h.quote(out) .. " "
      .. h.quote(script))
    assert.equal(0, c, e)
    local text = h.slurp(out)
    local _, _, py = h.sh("python3 -c 'import json,sys; json.load(open(sys.argv[1], encoding=\"utf-8\"))' "
      .. h.quote(out))
    assert.equal(0, py)
    local doc = json.decode(text)
    local names = {}
    for _, ev in ipairs(doc.traceEvents) do names[ev.name] = true end
    assert.is_true(names["calc_é✓"] and names["call calc_é✓"])
    -- each byte of the invalid sequences (overlong, surrogate) stands for itself
    assert.matches('"bad\\u00ff\\u00fe\\u00c0\\u0080\\u00ed\\u00a0\\u0080x"', text, 1, true)
    os.remove(out)
    os.remove(script)
  end)

  it("stop says so when the file was removed while the trace ran (its directory gone)", function()
    local dir = h.tmpname()
    os.remove(dir)
    local script = write(([[
local corral = require "corral"
os.execute("mkdir -p %s")
corral.trace.start("%s/t.json")
corral.spawn(function() corral.sleep(0.01) end):result()
os.execute("rm -rf %s")
local ok, e = pcall(corral.trace.stop)
print(ok, e)
]]):format(dir, dir, dir))
    local o, e, c = h.sh("timeout -s KILL 60 " .. h.quote(BIN) .. " " .. h.quote(script))
    assert.equal(0, c, e)
    assert.matches("false\t.*cannot write " .. dir:gsub("%p", "%%%0") .. "/t.json: it was removed", o)
    os.remove(script)
  end)

  it("start and stop again and again while thread workers make calls (a race under TSan before)", function()
    -- (the process id, written by start, was read without the lock by every
    -- worker thread formatting an event; make test-tsan runs this one)
    local out = h.tmpname() .. ".json"
    local script = write(([[
local corral = require "corral"
local W = corral.worker { f = function(_, x) return x + 1 end }
local ws, loops, stop = {}, {}, false
for i = 1, 3 do ws[i] = W:options { name = "w" .. i }:init() end
for i = 1, 3 do
  loops[i] = corral.spawn(function() local n = 0 while not stop do n = ws[i]:f(n):result() end end)
end
local total = 0
for _ = 1, 20 do
  corral.trace.start("%s")
  corral.sleep(0.002)
  total = total + corral.trace.stop()
  corral.sleep(0.001)
end
stop = true
for i = 1, 3 do loops[i]:result() ws[i]:stop() end
print("events", total)
]]):format(out))
    local o, e, c = h.sh("timeout -s KILL 120 " .. h.quote(BIN) .. " " .. h.quote(script))
    assert.equal(0, c, e)
    assert.not_matches("ThreadSanitizer", e, 1, true)
    assert.is_true(tonumber(o:match("events\t(%d+)")) > 0)
    local _, _, py = h.sh("python3 -c 'import json,sys; json.load(open(sys.argv[1]))' " .. h.quote(out))
    assert.equal(0, py)
    os.remove(out)
    os.remove(script)
  end)

  it("a process ended at once (a second Ctrl-C in code that never waits) leaves a valid trace", function()
    -- (the file made at start stayed empty: not JSON)
    local out, ready = h.tmpname() .. ".json", h.tmpname()
    os.remove(ready)
    local script = write(([[
local corral = require "corral"
corral.spawn(function() corral.sleep(0.001) end):result()
assert(io.open("%s", "w")):close()
while true do io.open("/dev/null"):close() end -- (a system call: TSan delivers signals at them)
]]):format(ready))
    -- (signals sent at once merge into one: Ctrl-C again until it is gone)
    local _, _, c = h.sh(("%s --trace %s %s & P=$!; "
      .. "for i in $(seq 600); do [ -e %s ] && break; sleep 0.05; done; "
      .. "for i in $(seq 300); do kill -INT $P 2>/dev/null || break; sleep 0.1; done; "
      .. "kill -KILL $P 2>/dev/null; wait $P")
      :format(h.quote(BIN), h.quote(out), h.quote(script), h.quote(ready)))
    assert.equal(130, c)
    local doc = json.decode(h.slurp(out))
    assert.is_table(doc)
    assert.same({}, doc.traceEvents)
    assert.matches("ended before the trace was written", doc.otherData.incomplete, 1, true)
    os.remove(out)
    os.remove(ready)
    os.remove(script)
  end)
end)
