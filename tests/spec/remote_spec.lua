-- Remote workers (issue 13) against a real nats-server -js started per
-- spec (tests/nats.lua): pools served by `corral serve` processes, a host
-- killed mid-call, a server restart with calls queued, stateful instances,
-- bad credentials and certificates, trust, and replies forged or broken.
local h = require "helper" -- (first: it takes LD_PRELOAD out of the children's environment)
local nats = require "nats"
local corral = require "corral"

local CLASSES = [[
local corral = require "corral"
local function tag() return os.getenv("HOSTTAG") or "?" end
local Sq = corral.worker {
  square = function(_, x) return x * x end,
  boom = function() error("boom on " .. tag()) end,
  who = function() return tag() end,
  nap = function(_, s) corral.sleep(s); return s end,
  echo = function(_, ...) return ... end,
  call = function(_, fn, ...) return fn(...) end,
  -- the first run writes its host's tag to `path`, then sleeps; a run that
  -- finds the file (a delivery again) answers at once
  mark = function(_, path, s)
    local f = io.open(path, "r")
    if f then f:close(); return "again@" .. tag() end
    f = assert(io.open(path .. ".tmp", "w"))
    f:write(tag())
    f:close()
    os.rename(path .. ".tmp", path)
    corral.sleep(s)
    return "first@" .. tag()
  end,
  grow = function(_, n) return string.rep("x", n) end,
  len = function(_, s) return #s end,
}
local Counter = corral.worker {
  init = function(self, n) self.n = n or 0 end,
  add = function(self, k) self.n = self.n + k; return self.n end,
  who = function() return tag() end,
}
return { sq = Sq, counter = Counter }
]]

local classes_path = h.write_script(CLASSES)
local classes = dofile(classes_path)

local fx = nats.fixture("remote_spec", classes_path, classes)
local host, pool, server = fx.host, fx.pool, fx.server
local srv
local function kill(x, sig) nats.finish(x.pid, sig) end

describe("remote workers", function()
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

  it("a pool served by two hosts: results, errors, work on both, unwrapping, a chain", function()
    if not srv then return pending(fx.skip) end
    host(srv, "A")
    host(srv, "B")
    local sq = pool(conn)
    assert.equal(49, sq:square(7):result())
    -- 40 calls that each take a while: both hosts take some
    local fs = {}
    for i = 1, 40 do fs[i] = sq:echo(i, sq:who()) end
    local seen = {}
    for i, f in ipairs(fs) do
      local a, b = f:result()
      assert.equal(i, a)
      seen[b] = true
    end
    -- (the echo's who() input ran somewhere: the tags come from the hosts)
    local naps, tags = {}, {}
    for i = 1, 8 do naps[i] = sq:nap(0.05) end
    corral.wait(naps)
    for _ = 1, 20 do tags[sq:who():result()] = true end
    local both = {}
    for k in pairs(seen) do both[k] = true end
    for k in pairs(tags) do both[k] = true end
    assert.is_true(both.A and both.B and true or false, "calls ran on both hosts")
    -- a method's error, with the host's message
    local kind, e = h.kind_of(function() return sq:boom():result() end)
    assert.equal("WorkerError", kind)
    assert.truthy(tostring(e.message):find("boom on [AB]"))
    -- a method the class does not have
    kind, e = h.kind_of(function() return sq:nosuch():result() end)
    assert.equal("WorkerError", kind)
    assert.truthy(tostring(e.message):find("no method", 1, true))
    -- a chain A -> B -> C across the hosts: the caller never waits
    local f = sq:square(sq:square(sq:square(2)))
    assert.equal(256, f:result())
    -- a failed input fails the call taking it
    kind = h.kind_of(function() return sq:square(sq:boom()):result() end)
    assert.equal("DependencyError", kind)
    sq:stop()
  end)

  it("a chain of big results across hosts: the caller moves none of their bytes", function()
    if not srv then return pending(fx.skip) end
    host(srv, "A")
    host(srv, "B")
    local sq = pool(conn)
    assert.equal(3, sq:len(sq:echo("abc")):result(20))
    local before = conn:stats()
    local f = sq:len(sq:echo(sq:grow(300000)))
    assert.equal(300000, f:result(20))
    local after = conn:stats()
    local moved = after.in_bytes - before.in_bytes + after.out_bytes - before.out_bytes
    assert.is_true(moved < 20000, ("the caller moved %d bytes"):format(moved))
    -- a big result wanted here is read from the result bucket
    assert.equal(200000, #sq:grow(200000):result(20))
    -- handed on, and then wanted here too; two readers at once
    local a = sq:grow(100000)
    local b = sq:len(a)
    assert.equal(100000, b:result(20))
    local t1 = corral.spawn(function() return #a:result() end)
    local t2 = corral.spawn(function() return #a:result() end)
    assert.equal(100000, t1:result(20))
    assert.equal(100000, t2:result(20))
    -- a reference that names nothing: the call fails with a DependencyError
    local core = require "corral.core"
    local _, id = core.nats_state(conn._ud)
    assert(id)
    local bad = sq:echo(1)
    bad:result(20)
    bad._lazy, bad._ref, bad._conn = function() return 0 end, "no-such-result", conn
    local kind = h.kind_of(function() return sq:len(bad):result(20) end)
    assert.equal("DependencyError", kind)
  end)

  it("a host that stops (SIGTERM) leaves the pool to the others: its calls not started go back",
    function()
      if not srv then return pending(fx.skip) end
      local a = host(srv, "A") -- (the first: it made the pool's consumer)
      local b = host(srv, "B")
      local sq = pool(conn)
      assert.equal(4, sq:square(2):result(10))
      kill(a, 15)
      assert.is_false(nats.running(a.pid))
      assert.truthy(h.slurp(a.log):find("terminated", 1, true))
      local t0 = corral.now()
      for i = 1, 5 do assert.equal("B", sq:who():result(10), "call " .. i) end
      assert.is_true(corral.now() - t0 < 5, "B serves at once: the consumer is still there")
      kill(b, 15)
      -- no host: the calls wait in the stream; a new host takes them
      local fs = {}
      for i = 1, 5 do fs[i] = sq:square(i) end
      host(srv, "C")
      for i = 1, 5 do assert.equal(i * i, fs[i]:result(10)) end
    end)

  it("a host killed mid-call: the call runs again on the other host; with retries = 0 it fails "
    .. "with WorkerCrashed", function()
    if not srv then return pending(fx.skip) end
    local a, b = host(srv, "A"), host(srv, "B")
    local by = { A = a, B = b }
    -- retries = 1: delivered again to the other host after ack_wait (1 s)
    local sq = pool(conn, { retries = 1 })
    local path = h.tmpname()
    os.remove(path)
    local f = sq:mark(path, 60)
    h.wait_until(function() return h.exists(path) end, 10)
    local first = h.slurp(path)
    kill(by[first])
    local t0 = corral.now()
    local r = f:result(20)
    local other = first == "A" and "B" or "A"
    assert.equal("again@" .. other, r)
    assert.is_true(corral.now() - t0 < 15)
    os.remove(path)
    -- retries = 0: the next delivery fails the call
    local survivor = by[other]
    local c = host(srv, "C")
    by.C = c
    local sq0 = pool(conn, { retries = 0 })
    path = h.tmpname()
    os.remove(path)
    local g = sq0:mark(path, 60)
    h.wait_until(function() return h.exists(path) end, 10)
    kill(by[h.slurp(path)])
    local kind, e = h.kind_of(function() return g:result(20) end)
    assert.equal("WorkerCrashed", kind)
    assert.truthy(tostring(e.message):find("retries = 0", 1, true))
    os.remove(path)
    assert.is_true(nats.running(survivor.pid) or nats.running(c.pid))
  end)

  it("a server restart with calls queued: none is lost", function()
    if not srv then return pending(fx.skip) end
    local sq = pool(conn)
    local fs = {}
    for i = 1, 30 do fs[i] = sq:square(i) end
    assert(srv.restart())
    -- more calls while the client reconnects: kept and sent after
    for i = 31, 40 do fs[i] = sq:square(i) end
    h.wait_until(function() return (conn:state()) == "connected" end, 10)
    host(srv, "A")
    for i = 1, 40 do assert.equal(i * i, fs[i]:result(20)) end
    local _, reconnects = conn:state()
    assert.is_true(reconnects >= 1)
  end)

  it("a stateful instance keeps its state; a dead one fails calls at once with WorkerCrashed",
    function()
      if not srv then return pending(fx.skip) end
      local a = host(srv, "A")
      local c = classes.counter:options { mode = "remote", connection = conn, pool = "counter",
        stateful = true }:init(10)
      assert.equal(15, c:add(5):result())
      assert.equal(16, c:add(1):result())
      assert.equal("A", c:who():result())
      kill(a)
      local t0 = corral.now()
      local kind = h.kind_of(function() return c:add(1):result(10) end)
      assert.equal("WorkerCrashed", kind)
      assert.is_true(corral.now() - t0 < 5, "at once, not after a timeout")
      -- no host at all: starting one fails the same way
      kind = h.kind_of(function()
        return classes.counter:options { mode = "remote", connection = conn, pool = "counter",
          stateful = true }:init(1)
      end)
      assert.equal("WorkerCrashed", kind)
    end)

  it("timeouts, cancel, max_queued, stop and close", function()
    if not srv then return pending(fx.skip) end
    host(srv, "A")
    local sq = pool(conn, { timeout = 0.3 })
    local sched = require "corral.sched"
    local base = sched.ext_pending()
    local f = sq:nap(3)
    local kind = h.kind_of(function() return f:result() end)
    assert.equal("TimeoutError", kind)
    assert.equal(0, conn:stats().pending, "the call is no longer awaited")
    -- nor counted as something that may still settle (corral.run would wait for it)
    h.wait_until(function() return sched.ext_pending() == base end, 5)
    -- what cannot travel (a channel, a worker handle): CodecError, nothing sent
    assert.equal("CodecError", h.kind_of(function() return sq:echo(corral.channel(1)):result() end))
    assert.equal("CodecError", h.kind_of(function() return sq:echo(sq):result() end))
    assert.equal("CodecError", h.kind_of(function()
      return classes.counter:options { mode = "remote", connection = conn, pool = "counter",
        stateful = true }:init(corral.channel(1))
    end))
    -- nil arguments and results keep their places
    local plain = pool(conn) -- (no time limit: the host's one worker naps for 3 s first)
    local r = { plain:echo(nil, 1, nil):result(10) }
    assert.same({ nil, 1 }, r)
    assert.equal(3, select("#", plain:echo(nil, 1, nil):result(10)))
    -- arguments bigger than the server takes in one message: CodecError
    local e
    kind, e = h.kind_of(function() return sq:len(string.rep("y", 2 * 1024 * 1024)):result() end)
    assert.equal("CodecError", kind)
    assert.truthy(e.message:find("max_payload", 1, true), e.message)
    -- sent: cancel says false; held back by max_queued: true, and it never runs
    local sq2 = pool(conn, { max_queued = 1 })
    local a = sq2:nap(0.3)
    assert.is_false(a:cancel())
    local b
    local t = corral.spawn(function() b = sq2:square(3) end)
    h.wait_until(function() return b ~= nil or t:done() end, 5)
    assert.equal(0.3, a:result())
    t:result()
    assert.equal(9, b:result())
    -- stop: later calls fail with ClosedError
    sq2:stop()
    assert.equal("ClosedError", h.kind_of(function() return sq2:square(2):result() end))
    -- a closed connection fails what waits on it, and new calls
    local sq3 = pool(conn)
    local g = sq3:nap(2)
    conn:close()
    assert.equal("ClosedError", h.kind_of(function() return g:result() end))
    assert.equal("ClosedError", h.kind_of(function() return sq3:square(2):result() end))
    conn = nil
  end)

  it("replies are untrusted bytes: forged, broken and duplicate ones settle a call once or fail it "
    .. "with a clear error", function()
    if not srv then return pending(fx.skip) end
    local core = require "corral.core"
    local _, id = core.nats_state(conn._ud)
    local inbox = "_INBOX." .. id
    local sq = pool(conn)
    -- no host: the calls wait in the stream; replies are forged to them
    local forger = corral.connect { url = srv.url }
    local function forge(n, status, payload)
      assert(core.nats_publish(forger._ud, inbox .. "." .. n, status, payload))
    end
    local fs = {}
    for i = 1, 6 do fs[i] = sq:square(i) end
    -- (the calls are numbered from 1 on this connection: the pool's set-up was not a call)
    forge(1, "ok", core.encode(41))
    forge(1, "ok", core.encode(42)) -- a duplicate: dropped
    forge(2, "ok", "\193\193") -- not MessagePack
    forge(3, "ok", "\145\199\1\6\0") -- an array holding a FUNC extension
    forge(4, "error", core.encode("not a map"))
    forge(5, "weird", "text\0with\1control")
    forge(6, "ok", string.rep("\145", 5000) .. "\1") -- nested too deep
    assert.equal(41, fs[1]:result(5))
    assert.equal("CodecError", h.kind_of(function() return fs[2]:result(5) end))
    assert.equal("CodecError", h.kind_of(function() return fs[3]:result(5) end))
    assert.equal("CodecError", h.kind_of(function() return fs[4]:result(5) end))
    local kind, e = h.kind_of(function() return fs[5]:result(5) end)
    assert.equal("WorkerError", kind)
    assert.truthy(e.message:find("text with control", 1, true))
    assert.equal("CodecError", h.kind_of(function() return fs[6]:result(5) end))
    forger:close()
    -- the real host answers the calls later: nothing is settled twice
    host(srv, "A")
    assert.equal(49, sq:square(7):result(10))
    assert.equal(41, fs[1]:result())
  end)

  it("trust: a host runs shipped functions only with --trust and the caller's key", function()
    if not srv then return pending(fx.skip) end
    local key = "a-shared-secret-of-32-characters"
    host(srv, "plain")
    local client = h.write_script(([[
      local corral = require "corral"
      local conn = corral.connect { url = %q }
      local sq = dofile(%q).sq:options { mode = "remote", connection = conn, pool = "sq" }:init()
      -- (the bytecode differs with arg[1]: a closure the host loaded once is
      -- kept, by its bytes, and not checked again)
      local fn = assert(loadstring("return function(x) return x + " .. arg[1] .. " end"))()
      local ok, e = pcall(function() return sq:call(fn, 41):result() end)
      print(ok, corral.is_error(e) and e.kind or e, corral.is_error(e) and e.message or "")
    ]]):format(srv.url, classes_path))
    local out = h.sh("CORRAL_TRUST_KEY=" .. key .. " " .. h.quote(h.bin) .. " " .. client .. " 1")
    assert.truthy(out:find("^false\tCodecError\t[^\n]*refuses functions"), out)
    -- nor a C function by name (os.execute would run on the host)
    local marker = h.tmpname()
    os.remove(marker)
    local conn2 = corral.connect { url = srv.url }
    local sq = pool(conn2)
    local kind, e = h.kind_of(function()
      return sq:call(os.execute, "touch " .. marker):result(10)
    end)
    assert.equal("CodecError", kind)
    assert.truthy(e.message:find("refuses functions", 1, true), e.message)
    assert.is_false(h.exists(marker))
    conn2:close()
    fx.kill_hosts()
    host(srv, "trusting", { "--trust" }, { CORRAL_TRUST_KEY = key })
    out = h.sh("CORRAL_TRUST_KEY=" .. key .. " " .. h.quote(h.bin) .. " " .. client .. " 1")
    assert.equal("true\t42\t", out:match("^[^\n]*"))
    -- another key: the mark does not authenticate, refused
    out = h.sh("CORRAL_TRUST_KEY=another-secret-of-32-characters!! " .. h.quote(h.bin) .. " "
      .. client .. " 2")
    assert.truthy(out:find("^false\tCodecError"), out)
    os.remove(client)
  end)
end)

describe("connecting", function()
  after_each(function()
    fx.kill_hosts()
    if srv then srv.stop() end
    srv = nil
  end)

  it("nothing listening, wrong credentials, a missing or untrusted CA: ConnectionError, no hang",
    function()
      srv = server { user = "alice", password = "s3cret", tls = true }
      if not srv then return pending(fx.skip) end
      local t0 = corral.now()
      local ok, e = pcall(corral.connect, { url = "nats://127.0.0.1:1", timeout = 2 })
      assert.is_false(ok)
      assert.is_true(corral.is_error(e, "ConnectionError"))
      local kind
      assert.is_true(corral.now() - t0 < 10)
      kind, e = h.kind_of(function()
        return corral.connect { url = srv.url, user = "alice", password = "wrong",
          tls = { ca = srv.ca }, timeout = 3 }
      end)
      assert.equal("ConnectionError", kind)
      assert.truthy(e.message:lower():find("author"), e.message)
      kind, e = h.kind_of(function()
        return corral.connect { url = srv.url, user = "alice", password = "s3cret",
          tls = { ca = "/nonexistent/ca.pem" } }
      end)
      assert.equal("ConnectionError", kind)
      assert.truthy(e.message:find("/nonexistent/ca.pem", 1, true))
      kind = h.kind_of(function()
        return corral.connect { url = srv.url, user = "alice", password = "s3cret", timeout = 3 }
      end)
      assert.equal("ConnectionError", kind)
      assert.is_true(corral.now() - t0 < 30, "every failure came in time")
      assert.equal("UsageError", h.kind_of(function() return corral.connect { url = 5 } end))
      assert.equal("UsageError", h.kind_of(function() return corral.connect { nope = 1 } end))
    end)

  it("TLS with user and password: a host and a caller", function()
    srv = server { user = "alice", password = "s3cret", tls = true }
    if not srv then return pending(fx.skip) end
    host(srv, "T", { "--user", "alice", "--password", "s3cret", "--ca", srv.ca })
    local conn = corral.connect { url = srv.url, user = "alice", password = "s3cret",
      tls = { ca = srv.ca } }
    local sq = pool(conn)
    assert.equal(121, sq:square(11):result(10))
    assert.equal("T", sq:who():result(10))
    conn:close()
  end)
end)
