-- Adversarial review of process workers (issue 9, commit 1ad17c4): what a
-- child sends is untrusted; children die at every moment; stops, orphans,
-- cancels, inputs, closing and signals. Five defects it found are fixed
-- (idle accounting of the proxy, a lost wake-up on an input, the child's
-- socket inherited by what it starts, a future among init arguments).
local corral = require "corral"
local h = require "helper"

local function run(code, limit)
  return h.run(code, limit or 60)
end

local gone = h.gone

-- Not running any more: reaped, or a zombie of someone else's (a child whose
-- parent exited is init's to reap).
local function dead(pid)
  local s = h.slurp("/proc/" .. pid .. "/status")
  return s == "" or s:match("\nState:%s+Z") ~= nil
end

-- n as k bytes, big-endian
local be = h.be

local DONE, FAILED, CANCELLED = 2, 3, 1 + 3

local result_frame = h.result_frame

-- A worker whose methods write raw bytes to their process's end of the
-- socket to the parent (descriptor 3).
local FORGER = {
  -- write bytes; then "sleep" (a call that runs on), "exit" (the process
  -- ends at once, status 0), or return
  raw = function(_, bytes, after)
    local ffi = require "ffi"
    pcall(ffi.cdef, "long write(int, const void *, unsigned long); void _exit(int);")
    assert(ffi.C.write(3, bytes, #bytes) == #bytes)
    if after == "exit" then ffi.C._exit(0) end
    if after == "sleep" then require("corral").sleep(60) end
    return "returned"
  end,
  -- bytes of corral.encode(fn) here (the shared key marks them)
  encoded_fn = function(_, k)
    return require("corral").encode(function(x) return x + k end)
  end,
  pid = function()
    local ffi = require "ffi"
    pcall(ffi.cdef, "int getpid(void);")
    return ffi.C.getpid()
  end,
  sq = function(_, x) return x * x end,
}

local function forger(name)
  return corral.worker(FORGER):options { mode = "process", name = name }:init()
end

describe("review9: frames a child forges", function()
  local function crashed_with(f, what)
    local ok, e = pcall(f.result, f, 20)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "WorkerCrashed"), tostring(e))
    assert.matches(what, e.message, 1, true)
  end

  it("a RESULT for an id never sent ends the worker with a clear error", function()
    local w = forger("f1")
    crashed_with(w:raw(result_frame(99, DONE, "\145\42"), "sleep"), "a RESULT frame for no call it was given")
    crashed_with(w:sq(2), "crashed")
    w:stop()
  end)

  it("after a bad frame nothing more it sends is read: a good RESULT behind it settles nothing", function()
    local w = forger("f6")
    local f = w:raw(be(5, 4) .. "\9abcd" .. result_frame(1, DONE, "\145\42"), "sleep")
    crashed_with(f, "a frame of an unknown type")
    w:stop()
  end)

  it("shared buffers: a RESULT that names some without sending them, or forges SHMFD, ends it", function()
    -- (fixext 16 of type 11 (SHM) or 12 (SHMFD) in a one-value array)
    for _, case in ipairs {
      { result_frame(1, DONE + 0x80, "\145\216\11" .. ("\0"):rep(16)), "did not come" },
      { result_frame(1, DONE + 0x80, "\145\216\12" .. ("\0"):rep(16)), "did not come" },
      { result_frame(1, DONE + 0x80, "\145\1"), "did not come" }, -- (flagged, names none: fine)
    } do
      local w = forger("f7")
      local f = w:raw(case[1], "sleep")
      if case[1]:sub(-2) == "\145\1" then
        assert.are.equal(1, f:result(20))
      else
        crashed_with(f, case[2])
      end
      w:stop { drain = false } -- (its real call sleeps 60 s: cancelled, not waited for)
    end
    -- an SHMFD without the flag is refused by the decoder: a CodecError, not a descriptor
    local w = forger("f8")
    local f = w:raw(result_frame(1, DONE, "\145\216\12" .. ("\0"):rep(7) .. "\1" .. ("\0"):rep(8)),
      "sleep")
    local ok, e = pcall(f.result, f, 20)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "CodecError"), tostring(e))
    assert.matches("SHMFD", e.message)
    w:stop { drain = false }
  end)

  it("a forged RESULT for its own call settles it; the real one after is refused", function()
    local w = forger("f2")
    -- (the first call of a fresh worker is number 1 on the wire)
    local f = w:raw(result_frame(1, DONE, "\145\42"))
    assert.are.equal(42, f:result(20))
    crashed_with(w:sq(3), "a RESULT frame for no call it was given")
    w:stop()
  end)

  it("a RESULT with a bad state byte, or of an unknown type, is refused", function()
    for _, case in ipairs {
      { result_frame(1, 1, "\145\1"), "a RESULT frame with a bad state" },
      { result_frame(1, 0, "\145\1"), "a RESULT frame with a bad state" },
      { result_frame(1, 200, "\145\1"), "a RESULT frame with a bad state" },
      { be(5, 4) .. "\9abcd", "a frame of an unknown type" },
      { be(5, 4) .. "\2abcd", "a frame of an unknown type" }, -- (a CALL, the wrong way)
      { be(0, 4), "a frame with a bad length" },
      { be(2 ^ 31, 4) .. "xxxx", "a frame with a bad length" },
      { be(2 ^ 32 - 1, 4) .. "xxxx", "a frame with a bad length" },
      { be(6, 4) .. "\4\0\0\0\0\0", "a malformed RESULT frame" }, -- id cut short
      -- the payload's length says more than the frame holds
      { be(16, 4) .. "\4" .. be(1, 8) .. "\2" .. be(100, 4) .. "ab", "a malformed RESULT frame" },
      -- bytes left after the payload
      { be(18, 4) .. "\4" .. be(1, 8) .. "\2" .. be(1, 4) .. "\192xyz", "a malformed RESULT frame" },
    } do
      local w = forger("f3")
      local f = w:raw(case[1], "sleep")
      local ok, e = pcall(f.result, f, 20)
      assert.is_false(ok)
      assert.are.equal(case[2], e.kind == "WorkerCrashed" and e.message:match("sent (.*)$"), tostring(e))
      w:stop()
    end
  end)

  it("a frame cut short, then the process exits: the call fails with its exit, nothing hangs", function()
    for _, bytes in ipairs {
      "\0\0", -- half a length
      be(30, 4) .. "\4\0\0", -- a body cut short
      be(2 ^ 30, 4) .. "\4", -- the longest length allowed, then nothing
    } do
      local w = forger("f4")
      crashed_with(w:raw(bytes, "exit"), "its process exited with status 0")
      w:stop()
    end
  end)

  it("malformed MessagePack in a RESULT is a CodecError for the caller, never a crash", function()
    local w = forger("f5")
    local cases = {
      "\193", -- a byte MessagePack never uses
      "\145\219\255\255\255\255", -- a string longer than the bytes
      "\145\220\255\255", -- an array of 65535 with nothing in it
      string.rep("\145", 300) .. "\1", -- nested deeper than the codec reads
      "\145\199\8\3" .. be(1, 8), -- a FUTURE by handle
      "\145\214\2" .. be(0, 4), -- a DEP
      "\145\146\212\7\0\128", -- a WORKER
      "\145\199\0\77", -- an extension corral does not know
    }
    for i, payload in ipairs(cases) do
      local f = w:raw(result_frame(1, DONE, payload))
      local ok, e = pcall(f.result, f, 20)
      assert.is_false(ok, "case " .. i)
      assert.is_true(corral.is_error(e, "CodecError"), "case " .. i .. ": " .. tostring(e))
      -- (the real result for that call then ends the worker: a new one each time)
      w:stop { drain = false }
      w = forger("f5")
    end
    w:stop()
  end)

  it("a forged FUTURE handle in a RESULT is refused as coming from another process", function()
    local w = forger("f6")
    local f = w:raw(result_frame(1, DONE, "\145\199\8\3" .. be(1, 8)), "sleep")
    local ok, e = pcall(f.result, f, 20)
    assert.is_false(ok)
    assert.matches("a future cannot come from another process", tostring(e), 1, true)
    w:stop { drain = false }
  end)

  it("a FAILED RESULT whose payload is not an error still raises an error object", function()
    local payloads = { "", "\193", "\42", "\145\42", "\129\164kind\42", "\130\164kind\161X\167message\1" }
    for i, payload in ipairs(payloads) do
      local w = forger("f7")
      local f = w:raw(result_frame(1, FAILED, payload), "sleep")
      local ok, e = pcall(f.result, f, 20)
      assert.is_false(ok, "case " .. i)
      assert.is_true(corral.is_error(e), "case " .. i .. ": " .. tostring(e))
      w:stop { drain = false }
    end
  end)

  it("a CANCELLED RESULT cancels the call", function()
    local w = forger("f8")
    local f = w:raw(result_frame(1, CANCELLED, ""), "sleep")
    h.wait_until(function() return f:done() end, 20)
    assert.is_true(f:cancelled())
    w:stop { drain = false }
  end)

  it("a function marked with the shared key loads; with a wrong mark it is a CodecError", function()
    local w = forger("f9")
    local bytes = w:encoded_fn(5):result(20)
    w:stop()
    -- [FUNC mark (ext 6, 9 bytes: mac 8, env 1), bytecode, upvalues...]
    local at = bytes:find("\199\9\6", 1, true) or bytes:find("\216\6", 1, true)
    assert.is_truthy(at, "a FUNC mark in the bytes")
    local good = "\145" .. bytes
    local mac = at + 3 -- the first byte of the mac
    local bad = "\145" .. bytes:sub(1, mac - 1) .. string.char((bytes:byte(mac) + 1) % 256)
      .. bytes:sub(mac + 1)
    local v = forger("f9")
    local fn = v:raw(result_frame(1, DONE, good)):result(20)
    assert.are.equal(12, fn(7))
    v:stop { drain = false }
    v = forger("f9")
    local f = v:raw(result_frame(1, DONE, bad))
    local ok, e = pcall(f.result, f, 20)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "CodecError"), tostring(e))
    v:stop { drain = false }
  end)

  it("a forged result given on as an input fails the next call, never the parent", function()
    local w = forger("f10")
    local t = corral.worker { id = function(_, x) return x end }:options { mode = "thread" }:init()
    local p = forger("f10b")
    for i, payload in ipairs { "\193", "\145\199\8\3" .. be(1, 8), string.rep("\145", 300) .. "\1" } do
      local f = w:raw(result_frame(1, DONE, payload))
      local a, b = t:id(f), p:sq(f)
      for _, g in ipairs { a, b } do
        local ok, e = pcall(g.result, g, 20)
        assert.is_false(ok, "case " .. i)
        assert.is_true(corral.is_error(e), tostring(e))
      end
      w:stop { drain = false }
      w = forger("f10")
    end
    assert.are.equal(9, p:sq(3):result(20))
    w:stop()
    p:stop()
    t:stop()
  end)
end)

-- The methods of most specs below (a file as a side effect, a nap, a pid).
local PLAIN = [[
  local corral = require "corral"
  local ffi = require "ffi"
  pcall(ffi.cdef, "int getpid(void); int kill(int, int);")
  local W = corral.worker {
    pid = function() local f = require "ffi"; pcall(f.cdef, "int getpid(void);"); return f.C.getpid() end,
    sq = function(_, x) return x * x end,
    nap = function(_, s) require("corral").sleep(s); return "slept" end,
    spin = function() while true do end end,
    touch = function(_, path) local f = io.open(path, "w"); f:write("ran"); f:close(); return true end,
  }
]]

describe("review9: what can never finish", function()
  -- A thread worker's call waiting for an input nothing can settle is named
  -- and the runner exits 1; a process worker's proxy never parks idle (it
  -- runs uv_run itself rather than corral__ctx_poll), so rt->nbusy never
  -- reaches 0 and the home loop waits forever.
  for _, mode in ipairs { "thread", "process" } do
    local defect = mode == "process" and "" or ""
    it(mode .. ": a call waiting for an input nothing settles, after the main chunk returned" .. defect,
      function()
        local out, err, code = run(PLAIN .. [[
          local w = W:options { mode = "]] .. mode .. [[", name = "stuck" }:init()
          local f = w:sq(corral.future())
          print("returning")
        ]], 20)
        assert.are.equal(1, code, out .. err)
        assert.matches("can never finish", err, 1, true)
        assert.matches("worker stuck: 1 call(s) unfinished", err, 1, true)
      end)

    it(mode .. ": the main chunk blocked on such a call" .. defect, function()
      local out, err, code = run(PLAIN .. [[
        local w = W:options { mode = "]] .. mode .. [[", name = "stuck" }:init()
        print(w:sq(corral.future()):result())
      ]], 20)
      assert.are.equal(1, code, out .. err)
      assert.matches("the main chunk is blocked on futures that nothing can settle", err, 1, true)
    end)
  end

  it("an idle process worker does not hide a main chunk blocked for good", function()
    local out, err, code = run(PLAIN .. [[
      local w = W:options { mode = "process" }:init()
      print(w:sq(3):result(10))
      local t = corral.worker { f = function() end }:options { mode = "thread" }:init()
      local g = t:f(corral.future())
      g:result()
    ]], 20)
    assert.are.equal(1, code, out .. err)
    assert.matches("blocked on futures that nothing can settle", err, 1, true)
  end)
end)

describe("review9: a grandchild of a process worker", function()
  -- The child's descriptor 3 (its end of the socket) is not close-on-exec:
  -- whatever it starts (os.execute, io.popen, corral.exec) holds the socket
  -- open, and the parent, waiting for end-of-file after the child's exit,
  -- fails the calls only when the grandchild ends too.
  it("does not keep the calls of a killed worker from failing", function()
    local out, err, code = run(PLAIN .. [[
      local G = corral.worker {
        bg = function() os.execute("sleep 30 </dev/null >/dev/null 2>&1 &") end,
        pid = function() local f = require "ffi"; pcall(f.cdef, "int getpid(void);"); return f.C.getpid() end,
        nap = function(_, started) started:put(true) require("corral").sleep(60) end,
      }
      local w = G:options { mode = "process", name = "parent_of_bg" }:init()
      w:bg():result(10)
      local pid = w:pid():result(10)
      local started = corral.channel(1)
      local f = w:nap(started)
      assert(started:get(10)) -- (a call only handed over may not have started yet)
      local t0 = corral.now()
      ffi.C.kill(pid, 9)
      local ok, e = pcall(f.result, f, 25)
      print(ok, e.kind, corral.now() - t0 < 5)
      w:stop()
    ]], 60)
    assert.are.equal(0, code, err)
    assert.matches("false\tWorkerCrashed\ttrue\n", out, 1, true)
  end)

  it("cannot write frames into its grandparent's socket", function()
    -- (the shell started by the method writes a RESULT for a call that was
    -- never sent on the inherited descriptor 3)
    local w = corral.worker {
      sh = function(_, cmd) return os.execute(cmd) end,
      sq = function(_, x) return x * x end,
    }:options { mode = "process", name = "leaky" }:init()
    assert.are.equal(4, w:sq(2):result(20))
    w:sh("printf '\\000\\000\\000\\017\\004\\000\\000\\000\\000\\000\\000\\000\\143"
      .. "\\002\\000\\000\\000\\001\\300' >&3 2>/dev/null"):result(20)
    assert.are.equal(9, w:sq(3):result(20))
    w:stop()
  end)
end)

describe("review9: init arguments", function()
  it("a future among them is refused at init with a CodecError, not misread in the child", function()
    local T = corral.worker { one = function() return 1 end }:options { mode = "thread" }:init()
    local f = T:one()
    f:result(10)
    local W = corral.worker { init = function(self, v) self.v = v end,
      get = function(self) return type(self.v) end }
    local ok, e = pcall(function() return W:options { mode = "process", name = "initf" }:init(f) end)
    if ok then -- (then its calls at least should not fail with a stale handle)
      local ok2, e2 = pcall(function() return e:get():result(20) end)
      e:stop()
      assert.is_true(ok2, tostring(e2))
    else
      assert.is_true(corral.is_error(e, "CodecError"), tostring(e))
      assert.matches("init", e.message, 1, true)
    end
    T:stop()
  end)

  it("an init that raises fails the calls with WorkerCrashed naming it", function()
    local W = corral.worker { init = function() error("no good") end, f = function() return 1 end }
    local w = W:options { mode = "process", name = "badinit" }:init()
    local ok, e = pcall(function() return w:f():result(20) end)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "WorkerCrashed"), tostring(e))
    assert.matches("no good", tostring(e), 1, true)
    w:stop()
  end)
end)

local W = corral.worker {
  pid = function()
    local ffi = require "ffi"
    pcall(ffi.cdef, "int getpid(void);")
    return ffi.C.getpid()
  end,
  sq = function(_, x) return x * x end,
  id = function(_, ...) return ... end,
  len = function(_, s) return #s end,
  big = function(_, n) return string.rep("y", n) end,
  nap = function(_, s) require("corral").sleep(s); return "slept" end,
  touch = function(_, path)
    local f = io.open(path, "w")
    f:write("ran")
    f:close()
    return true
  end,
  fail = function() error("upstream") end,
}

local ffi = require "ffi"
pcall(ffi.cdef, "int kill(int, int); int getpid(void);")

describe("review9: cancel", function()
  -- (the proxy hands a child max_concurrency calls and 16 more: those are
  -- RUNNING here, and a cancel stops them there: at the wait of the one
  -- that runs, before they start for the others; the calls beyond wait in
  -- the parent's inbox)
  it("a call queued in the parent cancels (true) and never runs; one handed over cancels there", function()
    -- (a grace longer than the waits below: the process is not ended)
    local w = W:options { mode = "process", name = "canceller", cancel_grace = 60 }:init()
    local path = h.tmpname()
    os.remove(path)
    local running = w:nap(60) -- (stopped at its wait, or sq(3) below would wait 60 s)
    h.wait_until(function() return running:running() end, 20)
    local handed = {}
    for i = 1, 16 do handed[i] = w:sq(i) end
    h.wait_until(function() return handed[16]:running() end, 20)
    local queued = w:touch(path)
    assert.is_true(queued:cancel())
    assert.is_true(queued:cancelled())
    assert.is_true(running:cancel())
    assert.is_true(handed[16]:cancel())
    assert.is_true(running:cancelled() and handed[16]:cancelled())
    assert.are.equal(225, handed[15]:result(20))
    assert.are.equal(9, w:sq(3):result(20)) -- (after it: the queued call would have run)
    w:stop()
    assert.is_false(h.exists(path))
  end)

  it("a call waiting in the parent for its inputs cancels (true) and never runs", function()
    local w = W:options { mode = "process", name = "canceller2" }:init()
    local path = h.tmpname()
    os.remove(path)
    local input = corral.future()
    local f = w:touch(path, input)
    -- the proxy has taken it out of the inbox: it waits for its input there
    h.wait_until(function()
      for _, r in ipairs(corral.stats()) do
        if r.name == "canceller2" then return r.queued == 0 end
      end
    end, 20)
    assert.is_true(f:cancel())
    input:set_result(1)
    assert.are.equal(4, w:sq(2):result(20))
    w:stop()
    assert.is_true(f:cancelled())
    assert.is_false(h.exists(path))
  end)

  it("many calls queued and cancelled while one runs: none runs, the rest are served in order", function()
    local w = W:options { mode = "process", name = "canceller3" }:init()
    local dir = h.tmpname()
    os.remove(dir)
    local running = w:nap(0.5)
    local fs, kept = {}, {}
    for i = 1, 40 do fs[i] = w:touch(dir .. "." .. i) end
    local said = {}
    for i = 1, 40 do
      if i % 2 == 0 then said[i] = fs[i]:cancel() else kept[#kept + 1] = i end
    end
    -- (at most 16 of the 19 kept before it are handed over: it waits in the parent)
    assert.is_true(said[40])
    running:result(20)
    for _, i in ipairs(kept) do assert.is_true(fs[i]:result(20)) end
    w:stop()
    for i = 1, 40 do
      -- a cancel that said true: it never ran; false: it ran
      assert.are.equal(not said[i], h.exists(dir .. "." .. i), "call " .. i)
      os.remove(dir .. "." .. i)
    end
  end)
end)

describe("review9: inputs", function()
  it("failed inputs: DependencyError from any source; cancelled ones as for a thread worker", function()
    local p = W:options { mode = "process", name = "consumer" }:init()
    local q = W:options { mode = "process", name = "producer" }:init()
    local t = W:options { mode = "thread", name = "tproducer" }:init()
    local cancelled = corral.future()
    cancelled:cancel()
    local failed = corral.future()
    failed:set_exception(corral.error("UsageError", "plain failure"))
    for name, input in pairs {
      process = q:fail(), thread = t:fail(), cancelled = cancelled, failed = failed,
    } do
      local f = p:sq(input)
      local ok, e = pcall(f.result, f, 20)
      assert.is_false(ok, name)
      -- (a thread worker's call with a cancelled input is cancelled too)
      local kind = name == "cancelled" and "CancelledError" or "DependencyError"
      assert.is_true(corral.is_error(e, kind), name .. ": " .. tostring(e))
    end
    assert.are.equal(9, p:sq(3):result(20)) -- it serves on
    p:stop(); q:stop(); t:stop()
  end)

  it("takes inputs from thread workers, other process workers and plain futures settled later", function()
    local p = W:options { mode = "process", name = "consumer2" }:init()
    local q = W:options { mode = "process", name = "producer2" }:init()
    local t = W:options { mode = "thread", name = "tproducer2" }:init()
    local later = corral.future()
    local f = p:id(q:sq(2), t:sq(3), later, { nested = { q:sq(4) } })
    corral.sleep(0.05)
    assert.is_false(f:done())
    later:set_result({ k = "v" })
    local a, b, c, d = f:result(20)
    assert.are.same({ 4, 9, { k = "v" }, { nested = { 16 } } }, { a, b, c, d })
    p:stop(); q:stop(); t:stop()
  end)

  it("a plain future settled with a value that cannot go to the child fails the call clearly", function()
    local p = W:options { mode = "process", name = "consumer3" }:init()
    local t = W:options { mode = "thread", name = "holder" }:init()
    local later = corral.future()
    local f = p:id(later)
    later:set_result({ t }) -- (a worker handle)
    local ok, e = pcall(f.result, f, 20)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e), tostring(e))
    assert.are.equal(4, p:sq(2):result(20))
    p:stop(); t:stop()
  end)
end)

describe("review9: a child that dies", function()
  it("right after it is started (before it read its BOOT): the calls fail, nothing hangs", function()
    local out, err, code = run([[
      local corral = require "corral"
      local ffi = require "ffi"
      pcall(ffi.cdef, "int kill(int, int); int getpid(void);")
      local W = corral.worker { sq = function(_, x) return x * x end }
      for round = 1, 5 do
        local w = W:options { mode = "process", name = "early" }:init()
        local f = w:sq(2)
        -- its child, found among this process's children at once
        local kids
        for _ = 1, 2000 do
          local t = {}
          -- (not /proc/self: in the popen that is ls itself)
          local ls = io.popen("ls /proc/" .. ffi.C.getpid() .. "/task")
          for dir in ls:lines() do t[#t + 1] = dir end
          ls:close()
          kids = ""
          for _, tid in ipairs(t) do
            local fh = io.open("/proc/" .. ffi.C.getpid() .. "/task/" .. tid .. "/children")
            if fh then kids = kids .. fh:read("*a"); fh:close() end
          end
          if kids:match("%d") then break end
        end
        for pid in kids:gmatch("%d+") do ffi.C.kill(tonumber(pid), 9) end
        local ok, e = pcall(f.result, f, 10)
        print(round, ok and "ok" or e.kind)
        w:stop()
      end
    ]], 60)
    assert.are.equal(0, code, err)
    for round = 1, 5 do
      assert.is_truthy(out:match(round .. "\t(%a+)\n"), out)
      local r = out:match(round .. "\t(%a+)\n")
      assert.is_true(r == "ok" or r == "WorkerCrashed", out)
    end
  end)

  it("between calls: the next call fails with WorkerCrashed naming the signal", function()
    local w = W:options { mode = "process", name = "between" }:init()
    local pid = w:pid():result(20)
    ffi.C.kill(pid, 9)
    h.wait_until(function() return gone(pid) end, 20)
    local ok, e = pcall(function() return w:sq(2):result(20) end)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "WorkerCrashed") or corral.is_error(e, "ClosedError"), tostring(e))
    w:stop()
  end)

  it("with calls in the inbox and callers waiting for room: every future settles, every caller goes on",
    function()
    local w = W:options { mode = "process", name = "crowded", max_queued = 2 }:init()
    local pid = w:pid():result(20)
    local running = w:nap(60)
    h.wait_until(function() return running:running() end, 20)
    local fs, n = {}, 0
    local waiters = {}
    for i = 1, 20 do
      waiters[i] = corral.spawn(function()
        fs[i] = w:sq(i)
        n = n + 1
      end)
    end
    h.wait_until(function() return #fs >= 2 end, 20)
    ffi.C.kill(pid, 9)
    for i = 1, 20 do waiters[i]:result(20) end
    assert.are.equal(20, n)
    local ok, e = pcall(running.result, running, 20)
    assert.is_false(ok)
    assert.matches("killed by signal 9", e.message, 1, true)
    for i = 1, 20 do
      local ok2, e2 = pcall(fs[i].result, fs[i], 20)
      assert.is_false(ok2)
      assert.is_true(corral.is_error(e2, "WorkerCrashed"), tostring(e2))
    end
    w:stop()
    h.wait_until(function() return gone(pid) end, 20)
  end)

  it("while the parent drains it (stop): the stop returns and the calls fail", function()
    local w = W:options { mode = "process", name = "drained" }:init()
    local pid = w:pid():result(20)
    local running, queued = w:nap(60), w:sq(3)
    h.wait_until(function() return running:running() end, 20)
    local stopped = corral.spawn(function() return w:stop { timeout = 30 } end)
    corral.spawn(function() end):result() -- (the stop has begun: it runs first)
    ffi.C.kill(pid, 9)
    assert.is_true(stopped:result(30))
    assert.is_true(corral.is_error(running:exception(), "WorkerCrashed"))
    assert.is_true(queued:done())
    h.wait_until(function() return gone(pid) end, 20)
  end)
end)

describe("review9: stops and orphans under load", function()
  it("stop{drain = true} during load serves every call right, and the child is reaped", function()
    local pool = W:options { mode = "process", workers = 3, name = "loaded", max_queued = 8 }:init()
    local pids = {}
    for _ = 1, 6 do pids[pool:pid():result(20)] = true end
    local fs = {}
    local caller = corral.spawn(function()
      for i = 1, 300 do
        local ok, f = pcall(pool.sq, pool, i)
        if not ok then break end -- (stopped: ClosedError)
        fs[i] = f
      end
    end)
    h.wait_until(function() return #fs >= 50 end, 20)
    assert.is_true(pool:stop { timeout = 30 })
    caller:result(20)
    for i, f in ipairs(fs) do
      local ok, v = pcall(f.result, f, 20)
      assert.is_true(ok and v == i * i or corral.is_error(v, "ClosedError"), tostring(v))
    end
    for pid in pairs(pids) do h.wait_until(function() return gone(pid) end, 20) end
  end)

  it("stop{drain = false} during load settles every future, and the child is reaped", function()
    local pool = W:options { mode = "process", workers = 2, name = "loaded2", max_concurrency = 3 }:init()
    local pids = {}
    for _ = 1, 4 do pids[pool:pid():result(20)] = true end
    local fs = {}
    for i = 1, 200 do fs[i] = i % 10 == 0 and pool:nap(30) or pool:sq(i) end
    h.wait_until(function() return fs[10]:running() end, 20) -- (under load when it stops)
    assert.is_true(pool:stop { drain = false, timeout = 20 })
    for i, f in ipairs(fs) do
      assert.is_true(f:done(), "call " .. i)
      if f:exception() == nil and not f:cancelled() and i % 10 ~= 0 then
        assert.are.equal(i * i, f:result())
      end
    end
    for pid in pairs(pids) do h.wait_until(function() return gone(pid) end, 20) end
  end)

  it("an orphan (its handle dropped) finishes its calls in flight, then its child is reaped", function()
    local out, err, code = run([[
      local corral = require "corral"
      local W = corral.worker {
        pid = function() local f = require "ffi"; pcall(f.cdef, "int getpid(void);"); return f.C.getpid() end,
        nap = function(_, s) require("corral").sleep(s); return s end,
      }
      local fs, pid = {}, nil
      do
        local w = W:options { mode = "process", name = "orphan" }:init()
        pid = w:pid():result(10)
        for i = 1, 5 do fs[i] = w:nap(0.05) end
      end
      collectgarbage(); collectgarbage()
      for i = 1, 5 do assert(fs[i]:result(10) == 0.05) end
      local deadline = corral.now() + 10
      while io.open("/proc/" .. pid .. "/status") and corral.now() < deadline do corral.sleep(0.01) end
      print("reaped", io.open("/proc/" .. pid .. "/status") == nil)
    ]], 60)
    assert.are.equal(0, code, err)
    assert.matches("reaped\ttrue", out, 1, true)
  end)
end)

describe("review9: payloads", function()
  it("16 MiB arguments and results cross both ways", function()
    local w = W:options { mode = "process", name = "bulk" }:init()
    local s = string.rep("x", 16 * 1024 * 1024)
    assert.are.equal(#s, w:len(s):result(60))
    local r = w:big(16 * 1024 * 1024):result(60)
    assert.are.equal(16 * 1024 * 1024, #r)
    assert.are.equal(string.rep("y", 1000), r:sub(1, 1000))
    local a, b = w:id(s, s):result(60)
    assert.are.equal(s, a)
    assert.are.equal(s, b)
    w:stop()
  end)
end)

describe("review9: many process workers", function()
  local function count(dir)
    local p = io.popen("ls " .. dir)
    local n = 0
    for _ in p:lines() do n = n + 1 end
    p:close()
    return n
  end

  it("16 at once serve, and their descriptors, threads and children come back after they stop", function()
    local me = "/proc/" .. ffi.C.getpid()
    -- (a first round warms what stays: the default pool, caches)
    W:options { mode = "process", workers = 2 }:init():stop()
    local fds, tasks = count(me .. "/fd"), count(me .. "/task")
    for _ = 1, 2 do
      local pool = W:options { mode = "process", workers = 16, name = "many" }:init()
      local fs, pids = {}, {}
      for i = 1, 160 do fs[i] = pool:pid() end
      for i = 1, 160 do pids[fs[i]:result(60)] = true end
      local n = 0
      for _ in pairs(pids) do n = n + 1 end
      assert.are.equal(16, n)
      assert.is_true(pool:stop { timeout = 30 })
      for pid in pairs(pids) do h.wait_until(function() return gone(pid) end, 20) end
    end
    h.wait_until(function() return count(me .. "/fd") <= fds and count(me .. "/task") <= tasks end, 20)
  end)
end)

describe("review9: the runtime closing", function()
  local PIDS = [[
    local function save(pids)
      local fh = io.open(arg[1], "w"); fh:write(table.concat(pids, " ")); fh:close()
    end
  ]]

  local function corral_run(code)
    local pidfile = h.tmpname()
    local out, err, code_ = h.corral(code, pidfile, "timeout -s KILL 60 ")
    local pids = {}
    for p in h.slurp(pidfile):gmatch("%d+") do pids[#pids + 1] = tonumber(p) end
    os.remove(pidfile)
    return out, err, code_, pids
  end

  it("the main chunk returning with calls in flight waits for them; every child is reaped", function()
    local out, err, code, pids = corral_run(PLAIN .. PIDS .. [[
      local pool = W:options { mode = "process", workers = 3 }:init()
      local pids = {}
      for i = 1, 6 do pids[i] = pool:pid():result(10) end
      save(pids)
      for i = 1, 30 do pool:nap(0.01) end
      local f = pool:nap(0.3)
      f:add_done_callback(function() print("done") end)
    ]])
    assert.are.equal(0, code, err)
    assert.matches("done", out, 1, true)
    assert.is_true(#pids > 0)
    for _, pid in ipairs(pids) do assert.is_true(dead(pid), "child " .. pid) end
  end)

  it("an error in the main chunk with children in loops that never wait: ends at once, none left", function()
    local t0 = corral.now()
    local _, err, code, pids = corral_run(PLAIN .. PIDS .. [[
      local pool = W:options { mode = "process", workers = 2 }:init()
      local pids = {}
      for i = 1, 4 do pids[i] = pool:pid():result(10) end
      save(pids)
      local spins = {}
      for i = 1, 4 do spins[i] = pool:spin() end
      while not (spins[1]:running() and spins[2]:running()) do corral.sleep(0.001) end
      error("boom")
    ]])
    assert.are.equal(1, code, err)
    assert.matches("boom", err, 1, true)
    assert.is_true(corral.now() - t0 < 20)
    assert.is_true(#pids > 0)
    for _, pid in ipairs(pids) do h.wait_until(function() return dead(pid) end, 10) end
  end)

  it("corral.exit with children busy: ends at once, no child left running", function()
    local _, err, code, pids = corral_run(PLAIN .. PIDS .. [[
      local pool = W:options { mode = "process", workers = 2 }:init()
      local pids = {}
      for i = 1, 4 do pids[i] = pool:pid():result(10) end
      save(pids)
      local spins = {}
      for i = 1, 4 do spins[i] = pool:spin() end
      while not (spins[1]:running() and spins[2]:running()) do corral.sleep(0.001) end
      corral.exit(3)
    ]])
    assert.are.equal(3, code, err)
    for _, pid in ipairs(pids) do h.wait_until(function() return dead(pid) end, 10) end
  end)

  for _, group in ipairs { false, true } do
    it("Ctrl-C (SIGINT to the " .. (group and "process group" or "parent") .. ") with busy process workers: "
      .. "130, no child left", function()
      local script = h.tmpname() .. ".lua"
      local fh = io.open(script, "w")
      fh:write(PLAIN .. [[
        local pool = W:options { mode = "process", workers = 2 }:init()
        local pids = {}
        for i = 1, 4 do pids[i] = pool:pid():result(10) end
        local f = io.open(arg[1] .. ".pids", "w"); f:write(table.concat(pids, " ")); f:close()
        pool:spin()
        for i = 1, 10 do pool:nap(60) end
        io.open(arg[1], "w"):close()
        corral.sleep(60)
      ]])
      fh:close()
      local ready = h.tmpname()
      os.remove(ready)
      -- (setsid: the script leads a process group of its own, as in a terminal)
      local target = group and "-$pid" or "$pid"
      local out, err, code = h.sh("setsid " .. h.quote(h.bin) .. " " .. script .. " " .. ready
        .. " & pid=$!; i=0; while [ ! -e " .. ready .. " ] && [ $i -lt 400 ]; do sleep 0.05; "
        .. "i=$((i+1)); done; kill -INT " .. target .. "; i=0; "
        .. "while kill -0 $pid 2>/dev/null && [ $i -lt 200 ]; do sleep 0.05; "
        .. "i=$((i+1)); done; kill -KILL $pid 2>/dev/null; wait $pid")
      local pids = {}
      for p in h.slurp(ready .. ".pids"):gmatch("%d+") do pids[#pids + 1] = tonumber(p) end
      os.remove(script); os.remove(ready); os.remove(ready .. ".pids")
      assert.are.equal(130, code, out .. err)
      assert.is_true(#pids > 0)
      for _, pid in ipairs(pids) do h.wait_until(function() return dead(pid) end, 10) end
      assert.is_nil(err:find("WorkerCrashed", 1, true), err)
    end)
  end
end)

describe("review9: environment", function()
  it("a spoofed CORRAL_PARENT_PID in the parent's environment changes nothing", function()
    local out, err, code = h.sh("CORRAL_PARENT_PID=1 " .. h.quote(h.bin) .. " -e " .. h.quote([[
      local corral = require "corral"
      local w = corral.worker { f = function(_, x) return x + 1, os.getenv("CORRAL_PARENT_PID") end }
        :options { mode = "process" }:init()
      local ffi = require "ffi"
      ffi.cdef "int getpid(void);"
      local v, ppid = w:f(41):result(10)
      print(v, tonumber(ppid) == ffi.C.getpid())
      w:stop()
    ]]))
    assert.are.equal(0, code, err)
    assert.matches("42\ttrue", out, 1, true)
  end)

  it("a process worker can start process workers of its own", function()
    local out, err, code = run([[
      local corral = require "corral"
      local Inner = { f = function(_, x)
        local ffi = require "ffi"; pcall(ffi.cdef, "int getppid(void);"); return x * 2, ffi.C.getppid() end }
      local Outer = corral.worker { g = function(_, C, x)
        local ffi = require "ffi"; pcall(ffi.cdef, "int getpid(void);")
        local w = require("corral").worker(C):options { mode = "process" }:init()
        local v, pp = w:f(x):result(10)
        w:stop()
        return v, pp == ffi.C.getpid()
      end }
      local o = Outer:options { mode = "process" }:init()
      print(o:g(Inner, 21):result(20))
      o:stop()
    ]], 60)
    assert.are.equal(0, code, err)
    assert.matches("42\ttrue", out, 1, true)
  end)
end)

describe("review9: a call waiting for its inputs in the parent", function()
  -- inputs_ready (process.c) reads an input's state, then watches it; when
  -- the input settles in between, corral__future_watch returns 1 (settled:
  -- no watch made), the call is taken as not ready and the proxy sleeps in
  -- uv_run with nothing to wake it: the call hangs until some other call or
  -- a stop wakes the proxy.
  it("is handed over when an input settles just as the proxy looks at it", function()
    local p = W:options { mode = "process", name = "racer" }:init()
    local t = W:options { mode = "thread", name = "feeder" }:init()
    local deadline = corral.now() + 15
    local i, stuck = 0, nil
    while corral.now() < deadline and not stuck do
      i = i + 1
      local f = p:id(t:id(i))
      local ok = pcall(f.result, f, 5)
      if not ok then stuck = i end
    end
    p:stop(); t:stop()
    assert.is_nil(stuck, "call " .. tostring(stuck) .. " waited 5 s for an input that had settled")
  end)
end)
