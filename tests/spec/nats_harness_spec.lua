-- The nats-server harness of the remote-worker specs (tests/nats.lua, issue
-- 13): a real server starts on a random loopback port, refuses wrong
-- credentials, speaks TLS with the CA made for it, and stop() leaves no
-- process and no directory. Credentials are checked twice: by the NATS
-- protocol over a raw socket (INFO, CONNECT, PING; no client library) and
-- by bench/nats_raw (libnats), which is also what checks TLS.
local h = require "helper" -- (first: it takes LD_PRELOAD out of the children's environment)
local nats = require "nats"
local ffi = require "ffi"

pcall(ffi.cdef, "int socket(int domain, int type, int protocol);")
pcall(ffi.cdef, "int connect(int fd, const void *addr, unsigned len);")
pcall(ffi.cdef, "int close(int fd);")
pcall(ffi.cdef, "long read(int fd, void *buf, unsigned long n);")
pcall(ffi.cdef, "long write(int fd, const void *buf, unsigned long n);")
pcall(ffi.cdef, "struct corral_nats_timeval { long sec, usec; };")
pcall(ffi.cdef, "int setsockopt(int fd, int level, int name, const void *val, unsigned len);")
local C = ffi.C

-- A raw NATS exchange: read the server's INFO line, send `send`, read what
-- comes back until `until_pat` matches or the 5 s receive timeout; returns
-- the INFO line and the reply.
local function exchange(port, send, until_pat)
  local fd = C.socket(2, 1, 0)
  assert(fd >= 0, "socket")
  local tv = ffi.new("struct corral_nats_timeval", 5, 0)
  C.setsockopt(fd, 1, 20, ffi.cast("void *", tv), ffi.sizeof(tv)) -- SOL_SOCKET, SO_RCVTIMEO
  local sa = ffi.new("struct corral_nats_sin")
  sa.family = 2
  sa.port = bit.rshift(bit.bswap(port), 16)
  sa.addr = bit.bswap(0x7f000001)
  assert(C.connect(fd, ffi.cast("void *", sa), ffi.sizeof(sa)) == 0, "connect")
  local buf, got = ffi.new("char[4096]"), ""
  local function read_until(pat)
    while not got:find(pat) do
      local n = C.read(fd, buf, 4096)
      if n <= 0 then break end
      got = got .. ffi.string(buf, n)
    end
  end
  read_until("\r\n")
  local info = got:match("^(INFO [^\r]*)\r\n") or got
  got = got:sub(#info + 3)
  if send then
    C.write(fd, send, #send)
    read_until(until_pat)
  end
  C.close(fd)
  return info, got
end

local raw = h.build .. "/obj/bench/nats_raw"
local function have_raw()
  local f = io.open(raw, "rb")
  if f then f:close() end
  return f ~= nil
end
local function check(args)
  local out, err, code = h.sh(raw .. " check " .. args)
  return out .. err, code
end

describe("the nats-server harness", function()
  local srv
  after_each(function()
    if srv then srv.stop(); srv = nil end
  end)

  it("starts a JetStream server on a loopback port, reachable by TCP", function()
    local why
    srv, why = nats.start()
    if not srv then return pending(why) end
    assert.is_true(srv.port > 0)
    assert.are.equal("nats://127.0.0.1:" .. srv.port, srv.url)
    assert.is_true(nats.can_connect(srv.port))
    assert.is_true(nats.process_exists(srv.pid))
    local info = exchange(srv.port)
    assert.matches('"jetstream":true', info)
    assert.is_nil(info:find('"auth_required":true', 1, true))
    -- the JetStream store is in the server's own directory
    local js = io.open(srv.dir .. "/js/jetstream")
    assert.is_truthy(js, "no JetStream store in " .. srv.dir)
    if js then js:close() end
  end)

  it("two servers get two ports", function()
    local a, why = nats.start()
    if not a then return pending(why) end
    local b, why2 = nats.start()
    if not b then a.stop(); return pending(why2) end
    local pa, pb = a.port, b.port
    a.stop(); b.stop()
    assert.are_not.equal(pa, pb)
  end)

  it("stop() leaves no process and no directory, and can be called twice", function()
    local why
    srv, why = nats.start()
    if not srv then return pending(why) end
    local pid, dir, port = srv.pid, srv.dir, srv.port
    srv.stop()
    srv.stop()
    assert.is_false(nats.process_exists(pid))
    assert.is_nil(io.open(dir))
    assert.is_false(nats.can_connect(port))
  end)

  it("with user and password, refuses wrong credentials and accepts the right ones", function()
    local why
    srv, why = nats.start{ user = "corral", password = "s3cret" }
    if not srv then return pending(why) end
    local info, bad = exchange(srv.port,
      'CONNECT {"verbose":false,"user":"corral","pass":"wrong"}\r\nPING\r\n', "\r\n")
    assert.matches('"auth_required":true', info)
    assert.matches("%-ERR 'Authorization Violation'", bad)
    local _, none = exchange(srv.port, 'CONNECT {"verbose":false}\r\nPING\r\n', "\r\n")
    assert.matches("%-ERR 'Authorization Violation'", none)
    local _, good = exchange(srv.port,
      'CONNECT {"verbose":false,"user":"corral","pass":"s3cret"}\r\nPING\r\n', "PONG\r\n")
    assert.matches("^PONG\r\n", good)
    if not have_raw() then
      print("# nats_harness: " .. raw .. " not built (make " .. raw .. "): libnats check skipped")
      return
    end
    local out, code = check(srv.url .. " corral s3cret")
    assert.are.equal(0, code, out)
    out, code = check(srv.url .. " corral wrong")
    assert.are.equal(1, code)
    assert.matches("Authorization Violation", out)
  end)

  it("with TLS, a client trusting its CA connects and one that does not is refused", function()
    local why
    srv, why = nats.start{ tls = true }
    if not srv then
      print("# nats_harness: " .. why)
      return pending(why)
    end
    assert.are.equal("tls://127.0.0.1:" .. srv.port, srv.url)
    local info = exchange(srv.port)
    assert.matches('"tls_required":true', info)
    if not have_raw() then
      local reason = raw .. " not built: the TLS handshake is not checked"
      print("# nats_harness: " .. reason)
      return pending(reason)
    end
    local out, code = check(srv.url .. " " .. srv.ca)
    assert.are.equal(0, code, out)
    out, code = check(srv.url .. " /etc/ssl/certs/ca-certificates.crt")
    assert.are.equal(1, code)
    assert.matches("SSL", out)
  end)

  it("returns nil and a reason when nats-server cannot start", function()
    local path = os.getenv("PATH")
    local env = ffi.C
    pcall(ffi.cdef, "int setenv(const char *, const char *, int);")
    env.setenv("PATH", "/nonexistent", 1)
    local ok, s, why = pcall(nats.start)
    env.setenv("PATH", path, 1)
    assert.is_true(ok, s)
    assert.is_nil(s)
    assert.matches("nats%-server is not installed", why)
  end)
end)
