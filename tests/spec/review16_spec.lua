-- Review 16: remote workers (issue 13) attacked as an adversary would:
-- forged and malformed messages to a host, forged headers, what a host
-- without --trust runs, a serve() that fails half-way, and leaks.
local h = require "helper" -- (first: it takes LD_PRELOAD out of the children's environment)
local nats = require "nats"
local corral = require "corral"
local core = require "corral.core"
local future = require "corral.future"
local ffi = require "ffi"

local CLASSES = [[
local corral = require "corral"
local function tag() return os.getenv("HOSTTAG") or "?" end
local Sq = corral.worker {
  square = function(_, x) return x * x end,
  who = function() return tag() end,
  echo = function(_, ...) return ... end,
  -- a higher-order method: applies what it is given (a map, a callback)
  apply = function(_, fn, ...) return (fn(...)) end,
  nap = function(_, s) corral.sleep(s); return s end,
  grow = function(_, n) return string.rep("x", n) end,
  -- the length of each string argument, the type of any other
  lens = function(_, ...)
    local t = {}
    for i = 1, select("#", ...) do
      local v = select(i, ...)
      t[i] = type(v) == "string" and #v or type(v)
    end
    return t
  end,
}
local Counter = corral.worker {
  init = function(self, n) self.n = n or 0 end,
  add = function(self, k) self.n = self.n + k; return self.n end,
}
local Bad = corral.worker {
  init = function() error("this init fails") end,
  x = function() return 1 end,
}
return { sq = Sq, counter = Counter, bad = Bad }
]]

local classes_path = h.write_script(CLASSES)
local classes = dofile(classes_path)

-- A raw libnats client: messages with any headers and reply subject, as
-- anyone who can reach the server could send them.
pcall(ffi.cdef, [[
typedef struct __natsConnection natsConnection;
typedef struct __natsMsg natsMsg;
int natsConnection_ConnectTo(natsConnection **nc, const char *urls);
int natsMsg_Create(natsMsg **m, const char *subj, const char *reply, const char *data, int len);
int natsMsgHeader_Set(natsMsg *m, const char *key, const char *value);
int natsConnection_PublishMsg(natsConnection *nc, natsMsg *m);
int natsConnection_Flush(natsConnection *nc);
void natsMsg_Destroy(natsMsg *m);
void natsConnection_Close(natsConnection *nc);
void natsConnection_Destroy(natsConnection *nc);
]])
local libnats = ffi.load("nats")

local function raw_client(url)
  local pp = ffi.new("natsConnection*[1]")
  assert(libnats.natsConnection_ConnectTo(pp, url) == 0, "raw connect")
  local nc = pp[0]
  local self = {}
  -- publish data on subject with headers (a table) and an optional reply
  function self.publish(subject, data, headers, reply)
    local mp = ffi.new("natsMsg*[1]")
    assert(libnats.natsMsg_Create(mp, subject, reply, data, #data) == 0, "msg create")
    for k, v in pairs(headers or {}) do
      assert(libnats.natsMsgHeader_Set(mp[0], k, v) == 0, "header " .. k)
    end
    local rc = libnats.natsConnection_PublishMsg(nc, mp[0])
    libnats.natsMsg_Destroy(mp[0])
    assert(rc == 0, "publish " .. rc)
    assert(libnats.natsConnection_Flush(nc) == 0, "flush")
  end
  function self.close()
    libnats.natsConnection_Close(nc)
    libnats.natsConnection_Destroy(nc)
  end
  return self
end

-- A mailbox on `subject` of conn: its next message (waited for, bounded).
local function listener(conn, subject)
  local mb = assert(core.nats_subscribe(conn._ud, subject))
  local got = {}
  local self = {}
  function self.next(limit)
    local t0 = corral.now()
    while #got == 0 do
      local w = future.wrap(core.mbox_wait(mb), nil, nil, true)
      local left = (limit or 10) - (corral.now() - t0)
      if left <= 0 then return nil end
      pcall(w.result, w, left)
      for _, m in ipairs((core.mbox_take(mb, 64))) do got[#got + 1] = m end
    end
    return table.remove(got, 1)
  end
  function self.close() core.mbox_close(mb) end
  return self
end

local fx = nats.fixture("review16_spec", classes_path, classes)
local host, pool, server = fx.host, fx.pool, fx.server
local srv

describe("review 16: remote workers under attack", function()
  local conn
  before_each(function()
    srv = server()
    if srv then conn = corral.connect { url = srv.url } end
  end)
  after_each(function()
    fx.kill_hosts()
    if conn then pcall(conn.close, conn) end
    conn = nil
    if srv then srv.stop() end
  end)
  teardown(function() nats.stop_all() end) -- (whatever a failure left)

  it("a host without --trust runs no function a caller ships, a loaded module's included", function()
    if not srv then return pending(fx.skip) end
    host(srv, "A")
    local sq = pool(conn)
    assert.equal(9, sq:square(3):result(10))
    local path = h.tmpname()
    os.remove(path)
    -- io.open and os.execute are C functions of loaded modules: they travel
    -- by name, and the host's own would run
    local ok, got = pcall(function() return sq:apply(io.open, path, "w"):result(10) end)
    assert.is_false(h.exists(path), ("the host ran io.open for the caller (%s, %s)"):format(
      tostring(ok), tostring(got)))
    assert.is_false(ok)
    assert.is_true(corral.is_error(got, "CodecError"), tostring(got))
    local kind2 = h.kind_of(function()
      return sq:apply(os.execute, "touch " .. path):result(10)
    end)
    assert.equal("CodecError", kind2)
    assert.is_false(h.exists(path), "the host ran the caller's choice of function")
    os.remove(path)
  end)

  it("a host with --trust runs no C function named by a caller without its key", function()
    if not srv then return pending(fx.skip) end
    -- (this process has no CORRAL_TRUST_KEY: its marks are made with a key of its own)
    host(srv, "T", { "--trust" }, { CORRAL_TRUST_KEY = "a-shared-secret-of-32-characters" })
    local sq = pool(conn)
    assert.equal(9, sq:square(3):result(10))
    local path = h.tmpname()
    os.remove(path)
    -- a shipped Lua function is refused: its mark does not authenticate
    assert.equal("CodecError", h.kind_of(function()
      return sq:apply(function(x) return x end, 1):result(10)
    end))
    -- a C function named by module carries no mark at all
    local ok, got = pcall(function() return sq:apply(io.open, path, "w"):result(10) end)
    assert.is_false(h.exists(path), ("a keyless caller had io.open run (%s, %s)"):format(
      tostring(ok), tostring(got)))
    os.remove(path)
  end)

  -- (these run as scripts of their own: what they find stuck would stop this process)
  local function script(body)
    return ("io.stdout:setvbuf('line')\nlocal corral = require 'corral'\n"
      .. "local URL, CLASSES = %q, %q\n"):format(srv.url, classes_path) .. body
  end

  it("a serve() that fails half-way (a bad class after a good one) leaves nothing serving", function()
    if not srv then return pending(fx.skip) end
    local out, err, code = h.run(script [[
      local conn = corral.connect { url = URL }
      local classes = dofile(CLASSES)
      local ok, e = pcall(corral.serve, { connection = conn, classes = { a = classes.sq, b = 42 },
        workers = 1 })
      print("serve", ok, corral.is_error(e) and e.kind or tostring(e))
      local a = classes.sq:options { mode = "remote", connection = conn, pool = "a", timeout = 2 }:init()
      local ok2, r = pcall(function() return a:square(5):result() end)
      print("call", ok2, corral.is_error(r) and r.kind or tostring(r))
      conn:close()
      print("closed")
    ]], 30)
    assert.truthy(out:find("serve\tfalse\tUsageError", 1, true), out .. err)
    assert.truthy(out:find("call\tfalse\tTimeoutError", 1, true),
      "pool a is served by the serve() that raised: " .. out .. err)
    assert.truthy(out:find("closed", 1, true), out .. err)
    assert.equal(0, code, out .. err)
  end)

  it("a host whose connection is closed under it (no srv:stop) does not spin its loop", function()
    if not srv then return pending(fx.skip) end
    local out, err, code = h.run(script [[
      local conn = corral.connect { url = URL }
      local classes = dofile(CLASSES)
      local srv = corral.serve { connection = conn, classes = { sq = classes.sq }, workers = 1 }
      conn:close()
      local t0 = corral.now()
      corral.sleep(0.2)
      print("slept", corral.now() - t0 < 5)
      srv:stop()
      print("stopped")
    ]], 20)
    assert.truthy(out:find("slept\ttrue", 1, true), ("stuck (status %s): %s %s"):format(
      tostring(code), out, err))
    assert.truthy(out:find("stopped", 1, true), out .. err)
    assert.equal(0, code, out .. err)
  end)

  it("a script that never closes its connection still ends", function()
    if not srv then return pending(fx.skip) end
    local out, err, code = h.run(script [[
      local conn = corral.connect { url = URL }
      local sq = dofile(CLASSES).sq:options { mode = "remote", connection = conn, pool = "sq",
        timeout = 0.2 }:init()
      local f = sq:square(3) -- (no host: it waits in the stream, until its timeout)
      print("leaving", pcall(f.result, f))
    ]], 20)
    assert.truthy(out:find("leaving\tfalse", 1, true), out .. err)
    assert.is_true(code ~= 137, "killed: it did not end by itself: " .. out .. err)
  end)

  it("forged calls to a host: bad bytes, headers and references get a clear error; the host lives",
    function()
      if not srv then return pending(fx.skip) end
      local x = host(srv, "A")
      local sq = pool(conn)
      assert.equal(4, sq:square(2):result(10))
      local raw = raw_client(srv.url)
      local inbox = listener(conn, "forged.>")
      local n = 0
      -- a forged call on the pool; its reply (status, decoded values or text)
      local function forge(data, headers)
        n = n + 1
        local hd = { ["Corral-Method"] = "square", ["Corral-Call"] = "forged-" .. n,
          ["Corral-Reply"] = "forged." .. n, ["Corral-Tries"] = "1" }
        for k, v in pairs(headers or {}) do hd[k] = v or nil end
        raw.publish("corral.pool.sq", data, hd)
        local m = inbox.next(10)
        assert(m, "no reply to forged call " .. n)
        assert.equal("forged." .. n, m.subject)
        local vals = { pcall(core.decode, m.data) }
        return m.status, vals[2], vals[3]
      end
      local st, v = forge(core.encode(3))
      assert.equal("ok", st)
      assert.equal(9, v)
      -- not MessagePack; not an array; a function; nested too deep
      for _, bad in ipairs { "\193\193", "\1", "\145\199\1\6\0", string.rep("\145", 5000) .. "\1", "" } do
        st, v = forge(bad)
        assert.equal("error", st)
        assert.equal("CodecError", v.kind)
      end
      -- Corral-Tries not a number, huge: as 1; negative: past its tries
      for _, t in ipairs { "abc", "99999999999999999999", "0x10" } do
        st, v = forge(core.encode(4), { ["Corral-Tries"] = t })
        assert.equal("ok", st, "tries " .. t .. ": " .. tostring(type(v) == "table" and v.message or v))
        assert.equal(16, v)
      end
      st = forge(core.encode(4), { ["Corral-Tries"] = "-5" })
      assert.equal("crashed", st)
      -- a method the class does not have; odd bytes; a name of the handle's own
      for _, meth in ipairs { "nosuch", "sq\1are", string.rep("m", 4000), "stop", "init", "__index",
        "_name", "" } do
        st, v = forge(core.encode(4), { ["Corral-Method"] = meth })
        assert.equal("error", st, "method " .. meth:sub(1, 20))
        assert.truthy(v.kind == "WorkerError" or v.kind == "UsageError", v.kind)
      end
      -- Corral-Refs naming no argument, not a number, an argument that is
      -- no reference, a key not in the bucket, a key whose value is garbage
      local g = future.wrap(core.nats_kv_put(conn._ud, "garbage-r16", "\193\1\2"), nil, nil, true)
      g:result(10)
      local cases = {
        { core.encode(1), "0" }, { core.encode(1), "2" }, { core.encode(1), "x" },
        { core.encode(1), "1" }, { core.encode(1), "1e400" }, { core.encode(1), "1,x" },
        { core.encode { __corral_ref = "no-such-key" }, "1" },
        { core.encode { __corral_ref = "garbage-r16" }, "1" },
        { core.encode { __corral_ref = "../../x y" }, "1" },
        { core.encode { __corral_ref = 5 }, "1" },
      }
      for i, c in ipairs(cases) do
        st, v = forge(c[1], { ["Corral-Refs"] = c[2] })
        assert.equal("error", st, "refs case " .. i)
        assert.truthy(v.kind == "CodecError" or v.kind == "DependencyError", "refs case " .. i
          .. ": " .. tostring(v.kind))
      end
      -- no reply subject, an empty one, one with a space: dropped, the host lives
      for _, r in ipairs { "", "a b" } do
        raw.publish("corral.pool.sq", core.encode(5), { ["Corral-Method"] = "square",
          ["Corral-Reply"] = r })
      end
      raw.publish("corral.pool.sq", core.encode(5), { ["Corral-Method"] = "square" })
      assert.equal(36, sq:square(6):result(10))
      assert.is_true(nats.running(x.pid), h.slurp(x.log))
      -- forged spawn and instance messages
      raw.publish("corral.spawn.sq", "\193", { ["Corral-Reply"] = "forged.sp", ["Corral-Kind"] = "spawn" })
      local m = inbox.next(10)
      assert(m, "no reply to a forged spawn")
      assert.equal("forged.sp", m.subject)
      assert.equal("error", m.status)
      inbox.close()
      raw.close()
      assert.equal(49, sq:square(7):result(10))
      assert.is_true(nats.running(x.pid), h.slurp(x.log))
    end)

  it("a forged call's reply subject: the host publishes on no wildcard subject, deletes no stream",
    function()
      if not srv then return pending(fx.skip) end
      local x = host(srv, "A")
      local sq = pool(conn, { timeout = 5 })
      assert.equal(4, sq:square(2):result(10))
      local raw = raw_client(srv.url)
      -- the host answers to whatever Corral-Reply names: here the JetStream
      -- API's "delete this stream" (a client allowed only corral.pool.sq
      -- would have the host do it for it)
      raw.publish("corral.pool.sq", core.encode(3), { ["Corral-Method"] = "square",
        ["Corral-Call"] = "forged-del", ["Corral-Reply"] = "$JS.API.STREAM.DELETE.CORRAL_sq" })
      -- the pool still works: its stream is there
      local ok, e = pcall(function() return sq:square(7):result(10) end)
      assert.is_true(ok, "the pool's stream is gone: " .. tostring(e))
      assert.equal(49, e)
      -- and a wildcard: its reply reaches every subscriber of the subjects
      local inbox = listener(conn, "victim.>")
      raw.publish("corral.pool.sq", core.encode(3), { ["Corral-Method"] = "square",
        ["Corral-Call"] = "forged-wild", ["Corral-Reply"] = "victim.*" })
      raw.close()
      local m = inbox.next(3)
      inbox.close()
      assert.is_nil(m and m.subject, "a host published its reply on a wildcard subject")
      assert.is_true(nats.running(x.pid), h.slurp(x.log))
    end)

  it("a closed connection: closing twice, stats, state, calls after; jobs after close leak no future",
    function()
      if not srv then return pending(fx.skip) end
      local c2 = corral.connect { url = srv.url }
      local sq = pool(c2)
      c2:close()
      c2:close()
      assert.equal("closed", (c2:state()))
      assert.is_nil(c2:stats())
      assert.equal("ClosedError", h.kind_of(function() return sq:square(2):result(5) end))
      local kind = h.kind_of(function() return pool(c2) end)
      assert.truthy(kind == "ClosedError" or kind == "ConnectionError", kind)
      -- the lane's jobs on a closed connection fail at once, and their futures go
      collectgarbage()
      collectgarbage()
      local before = core.debug_counts().futures
      for _ = 1, 200 do
        local g = future.wrap(core.nats_kv_get(c2._ud, "k"), nil, nil, true)
        assert.equal("ClosedError", h.kind_of(function() return g:result(5) end))
      end
      collectgarbage()
      collectgarbage()
      local after = core.debug_counts().futures
      assert.is_true(after - before < 20, ("%d futures live after 200 reads on a closed connection")
        :format(after - before))
    end)

  it("1000 calls in flight through max_queued = 8, with timeouts racing replies: all settle, "
    .. "nothing left pending", function()
    if not srv then return pending(fx.skip) end
    host(srv, "A")
    local sched = require "corral.sched"
    local base = sched.ext_pending()
    local sq = pool(conn, { max_queued = 8 })
    local fs = {}
    for i = 1, 1000 do fs[i] = sq:square(i) end
    for i = 1, 1000 do assert.equal(i * i, fs[i]:result(30)) end
    assert.equal(0, conn:stats().pending)
    -- calls whose timeouts end about when their replies come
    local sqt = pool(conn, { timeout = 0.05, max_queued = 50 })
    local ts = {}
    for i = 1, 300 do ts[i] = sqt:nap(0.001 * (i % 7)) end
    local done, timed = 0, 0
    for i = 1, 300 do
      local ok, e = pcall(ts[i].result, ts[i])
      if ok then done = done + 1 else
        assert.is_true(corral.is_error(e, "TimeoutError"), tostring(e))
        timed = timed + 1
      end
    end
    assert.equal(300, done + timed)
    h.wait_until(function() return conn:stats().pending == 0 end, 10)
    h.wait_until(function() return sched.ext_pending() == base end, 10)
    -- and the host still answers
    assert.equal(4, sq:square(2):result(10))
  end)

  it("stop{drain = false} with calls held back by max_queued: those are cancelled, the sent ones "
    .. "settle", function()
    if not srv then return pending(fx.skip) end
    host(srv, "A")
    local sq = pool(conn, { max_queued = 2 })
    local fs = {}
    local t = corral.spawn(function()
      for i = 1, 6 do fs[i] = sq:nap(0.2 + i * 0.001) end
    end)
    h.wait_until(function() return #fs >= 3 end, 5)
    sq:stop { drain = false }
    -- the task held in its call by max_queued is let go: its call is
    -- cancelled, and the later ones fail (ClosedError)
    local tok, te = pcall(t.result, t, 10)
    assert.is_true(tok or corral.is_error(te, "ClosedError"), "the caller is still held: "
      .. tostring(te))
    local got = {}
    for i = 1, #fs do
      local ok, e = pcall(fs[i].result, fs[i], 10)
      got[i] = ok and "ok" or (corral.is_error(e) and e.kind or tostring(e))
    end
    assert.equal("ok", got[1])
    assert.equal("ok", got[2])
    assert.equal("ok", got[3])
    for i = 4, #fs do
      assert.truthy(got[i] == "CancelledError" or got[i] == "ClosedError", i .. ": " .. got[i])
    end
    assert.equal(0, conn:stats().pending)
  end)

  it("a stateful instance whose init fails on its host: init raises that failure, as the docs say",
    function()
      if not srv then return pending(fx.skip) end
      host(srv, "A")
      local t0 = corral.now()
      local ok, b = pcall(function()
        return classes.bad:options { mode = "remote", connection = conn, pool = "bad",
          stateful = true, timeout = 10 }:init()
      end)
      local kind, e
      if ok then -- (what its calls say, for the message)
        local ok2, got = pcall(function() return b:x():result(10) end)
        kind, e = "returned", { message = ("init returned; a call then gave %s, %s"):format(
          tostring(ok2), tostring(got)) }
      else
        kind, e = corral.is_error(b) and b.kind or tostring(b), b
      end
      assert.is_true(corral.now() - t0 < 8, "at once, not after the timeout")
      -- docs/remote.md's table of errors: "a stateful instance's init failed there" is a
      -- WorkerCrashed; the text of the failure comes with it
      assert.equal("WorkerCrashed", kind, tostring(e and e.message))
      assert.truthy(tostring(e.message):find("this init fails", 1, true), tostring(e.message))
    end)

  it("a server that takes the connection and never speaks: ConnectionError within the timeout",
    function()
      if not srv then return pending(fx.skip) end
      local portfile = h.tmpname()
      os.remove(portfile)
      local log = h.tmpname()
      local pid = assert(nats.spawn({ "python3", "-c", ([[
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
open(%q + ".tmp", "w").write(str(s.getsockname()[1]))
import os; os.rename(%q + ".tmp", %q)
conns = []
while True:
    c, _ = s.accept(); conns.append(c)
]]):format(portfile, portfile, portfile) }, log))
      h.wait_until(function() return h.exists(portfile) end, 10)
      local port = tonumber(h.slurp(portfile))
      local t0 = corral.now()
      local kind = h.kind_of(function()
        return corral.connect { url = "nats://127.0.0.1:" .. port, timeout = 1 }
      end)
      local took = corral.now() - t0
      nats.finish(pid)
      os.remove(portfile)
      assert.equal("ConnectionError", kind)
      assert.is_true(took < 6, ("it took %.1f s"):format(took))
    end)

  it("many big results handed on to one call: each argument arrives as its value", function()
    if not srv then return pending(fx.skip) end
    host(srv, "A")
    local sq = pool(conn, { timeout = 60 })
    -- 50 results over 64 KB, passed on before they settle: each travels as
    -- its key, and their places are listed in a header of the call
    local big = {}
    for i = 1, 50 do big[i] = sq:grow(70000 + i) end
    local got = sq:lens(unpack(big)):result(60)
    for i = 1, 50 do assert.equal(70000 + i, got[i], "argument " .. i) end
  end)
end)
