--- Remote workers: a script's workers on other machines, through a NATS
-- server with JetStream (docs/remote.md).
--
--     local conn = corral.connect { url = "nats://127.0.0.1:4222" }
--     local sq = Squarer:options { mode = "remote", connection = conn, pool = "sq" }:init()
--     print(sq:square(7):result())   --> 49, computed by a `corral serve` host
--
-- A stateless pool is a JetStream work-queue stream (`CORRAL_<pool>`, subject
-- `corral.pool.<pool>`) with one durable pull consumer that every host of
-- the pool shares: the server keeps the calls, hands each to one host,
-- delivers it again when its host dies before acknowledging it. A stateful
-- instance (`stateful = true`) lives on one host and is reached with core
-- request/reply on a subject of its own. Each call carries its reply
-- subject; the reply settles the call's future once (src/nats.c).
-- @module corral.remote
local core = require "corral.core"
local errors = require "corral.errors"
local future = require "corral.future"
local sched = require "corral.sched"
local task = require "corral.task"
local unwrap = require "corral.unwrap"
local F = require "corral.fields"

local S, N, V = F.S, F.N, F.V
local DONE, FAILED, CANCELLED = future.DONE, future.FAILED, future.CANCELLED
local settle, settle_values, add_waiter = future.settle, future.settle_values, future.add_waiter
local type, select, pairs, ipairs, unpack, pcall, tostring, setmetatable, getmetatable =
  type, select, pairs, ipairs, unpack, pcall, tostring, setmetatable, getmetatable

local M = {}

-- The values as a payload; raises a CodecError naming what cannot travel.
local function encode(...)
  local s, why = core.encode(...)
  if s == nil then error(errors.codec(why), 0) end
  return s
end

-- Pool names are NATS subject tokens and stream names.
local NAME = "^[%w_-]+$"

-- ======================================================================== --
-- Connections                                                              --
-- ======================================================================== --

local Connection = { __nats = true }
Connection.__index = Connection

local CONNECT_OPTIONS = { url = true, user = true, password = true, token = true, tls = true,
  name = true, timeout = true, send_asap = true }
local TLS_OPTIONS = { ca = true, cert = true, key = true }

local function conn_error(fmt, ...)
  return errors.new("ConnectionError", fmt:format(...), nil, false)
end

--- Connect to a NATS server (with JetStream enabled): returns a connection
-- for `Class:options{mode = "remote", connection = conn}` and `corral.serve`.
-- The connecting runs on a thread of its own: a task waiting here lets the
-- loop run. Raises `ConnectionError` when the server cannot be reached or
-- refuses (bad credentials, a certificate it does not trust) within
-- `timeout` seconds (5), and `UsageError` for a bad option.
-- @tab[opt] opts `url` (else `CORRAL_NATS_URL`), `user` and `password`,
-- `token`, `tls = {ca =, cert =, key =}` (file names), `name`, `timeout`,
-- `send_asap` (true: each publish leaves at once; false: libnats' flusher
-- batches them, more throughput and up to 1 ms more latency)
function M.connect(opts)
  opts = opts or {}
  local fname = "corral.connect"
  errors.check(type(opts) == "table", fname, "opts", "a table", opts)
  errors.check_options(fname, opts, CONNECT_OPTIONS)
  local url = opts.url or os.getenv("CORRAL_NATS_URL")
  errors.check(type(url) == "string" and url ~= "", fname, "url", "a string (or CORRAL_NATS_URL set)",
    url)
  for _, k in ipairs { "user", "password", "token", "name" } do
    errors.check(opts[k] == nil or type(opts[k]) == "string", fname, k, "a string", opts[k])
  end
  local tls = opts.tls or {}
  errors.check(type(tls) == "table", fname, "tls", "a table {ca =, cert =, key =}", tls)
  errors.check_options(fname, tls, TLS_OPTIONS)
  for k, v in pairs(tls) do
    errors.check(type(v) == "string", fname, "tls." .. k, "a file name", v)
    local fh = io.open(v, "rb")
    if not fh then error(conn_error("%s: tls.%s: cannot read %s", fname, k, v), 2) end
    fh:close()
  end
  errors.check((tls.cert == nil) == (tls.key == nil), fname, "tls", "both cert and key, or neither",
    tls)
  local timeout = opts.timeout or 5
  errors.check(type(timeout) == "number" and timeout > 0 and timeout <= 3600, fname, "timeout",
    "a number of seconds from 0 to 3600", timeout)
  local ud, cf = core.nats_connect { url = url, user = opts.user, password = opts.password,
    token = opts.token, ca = tls.ca, cert = tls.cert, key = tls.key, name = opts.name,
    timeout = timeout, send_asap = opts.send_asap ~= false }
  if not ud then error(conn_error("%s: %s", fname, tostring(cf)), 2) end
  local f = future.wrap(cf, nil, nil, true)
  local ok, e = pcall(f.result, f)
  if not ok then
    core.nats_close(ud)
    if errors.is_error(e, "CancelledError") then error(e, 0) end
    error(conn_error("%s: %s: %s", fname, url, errors.is_error(e) and e.message or tostring(e)), 2)
  end
  return setmetatable({ _ud = ud, url = url, name = opts.name }, Connection)
end

--- Close the connection: calls still waiting for a reply fail with
-- `ClosedError`; pools and instances reached through it take no more calls.
function Connection:close()
  core.nats_close(self._ud)
end

--- "connecting", "connected", "reconnecting" (the server was lost: libnats
-- tries again, and what is published meanwhile is kept) or "closed", and
-- how many times it reconnected.
function Connection:state()
  local st, _, reconnects = core.nats_state(self._ud)
  return st, reconnects
end

--- Counts of the connection: `in_msgs`, `out_msgs`, `in_bytes`,
-- `out_bytes` (what crossed its socket) and `pending` (calls waiting for
-- their replies); nil once closed.
function Connection:stats()
  return core.nats_stats(self._ud)
end

function Connection:__tostring()
  return ("corral.connection(%s, %s)"):format(self.url, (core.nats_state(self._ud)))
end

--- Whether `v` is a connection made by `corral.connect`.
function M.is_connection(v) return getmetatable(v) == Connection end

local default_conn
-- The connection of a remote worker given none: one to CORRAL_NATS_URL,
-- made on first use.
local function the_connection()
  if default_conn and core.nats_state(default_conn._ud) ~= "closed" then return default_conn end
  default_conn = M.connect()
  return default_conn
end

-- ======================================================================== --
-- The futures of remote calls                                              --
-- ======================================================================== --

-- A remote call's future: settled from its reply. A call not sent yet
-- (waiting for its inputs, or for room) can be cancelled; once sent it is
-- on a host or in the stream, and cancel says false.
local RemoteFuture = {}
for k, v in pairs(future.Future) do RemoteFuture[k] = v end
RemoteFuture.__index = RemoteFuture
RemoteFuture._kind = "call"

function RemoteFuture:cancel()
  local call = self._item
  if self[S] >= DONE or call == nil or call.sent then return false end
  call.cancelled = true
  settle(self, CANCELLED, 0, false, errors.cancelled())
  if call.room then -- (its caller waits for room: it has its answer)
    local room = call.room
    call.room = nil
    settle_values(room)
  end
  return true
end

-- (a call's result and error are its worker's, as in every mode)
local CallFuture = require("corral.worker_call").CallFuture
RemoteFuture.set_result, RemoteFuture.set_exception = CallFuture.set_result, CallFuture.set_exception

-- A result left in the server's result bucket (too big to come back
-- inline) is read when its value is first wanted: f:result(), or an input
-- of a call that is not remote. Two readers at once share one read.
local function fetch_now(f)
  local g = f._fetching
  if not g then
    g = future.wrap(core.nats_kv_get(f._conn._ud, f._ref), nil, nil, true)
    f._fetching = g
  end
  pcall(g.result, g)
  if f._lazy == nil then -- (another reader got it)
    if f[S] == FAILED then return nil end
    return f[N]
  end
  f._lazy = nil
  if g[S] == DONE then
    local n = future.values(g)
    if n then
      f[N], f[V] = g[N], g[V]
      return n
    end
  end
  future.retrieve(g)
  f[S], f[N], f[V] = FAILED, 0, false
  f._e = errors.new("WorkerError", ("the result of %s cannot be read: %s"):format(tostring(f._what),
    errors.text_of(g._e)), g._e, false)
  return nil
end

-- g (the reply's future) settled: f takes its outcome. A result left in
-- the result bucket (under key) stays there when f was handed on to
-- another remote call (that call's host reads it); else it is read now.
local function take_outcome(f, g, conn)
  local s = g[S]
  local e = g._e
  if s == FAILED and type(e) == "table" and e.kind == "RemoteRef" and conn then
    future.retrieve(g)
    f._ref, f._conn = e.message, conn
    if f._forwarded then
      f._lazy = fetch_now
      settle(f, DONE, -1, false)
    else
      local k = future.wrap(core.nats_kv_get(conn._ud, f._ref), nil, nil, true)
      local function took() take_outcome(f, k) end
      if k[S] >= DONE then took() else add_waiter(k, took) end
    end
    return
  end
  if s == DONE then
    local n = g[N]
    if n < 0 then n = future.values(g) end
    if n == nil then
      settle(f, FAILED, 0, false, g._e)
    else
      settle(f, DONE, g[N], g[V])
    end
  elseif s == FAILED then
    future.retrieve(g)
    settle(f, FAILED, 0, false, g._e)
  else
    settle(f, CANCELLED, 0, false, errors.cancelled())
  end
end

-- ======================================================================== --
-- Sending calls                                                            --
-- ======================================================================== --

local pump

-- Nothing in flight, queued or waiting for inputs: a draining stop ends.
local function check_idle(r)
  if r.idle and r.inflight == 0 and r.waiting == 0 and r.queue_head > r.queue_tail then
    local idle = r.idle
    r.idle = nil
    settle_values(idle)
  end
end

-- The call's reply came (or it failed to be sent): room for the next.
local function sent_done(r)
  r.inflight = r.inflight - 1
  if r.queue_head <= r.queue_tail then pump(r) end
  check_idle(r)
end

-- Send a call whose inputs are done: encode, publish, follow its reply.
local function send(r, call)
  local f = call.f
  call.sent = true
  if call.room then
    local room = call.room
    call.room = nil
    settle_values(room)
  end
  if f[S] >= DONE then return end -- (its time ran out meanwhile)
  local args, n = call.args, call.args.n
  local refs
  if call.deps then
    for i, d in ipairs(call.deps) do
      if d[S] ~= DONE then
        future.retrieve(d)
        settle(f, FAILED, 0, false, errors.dependency(r.name, call.method, i, d._e or
          errors.cancelled()))
        return
      end
    end
    -- an argument whose value waits in the result bucket travels as its
    -- key: the host reads it there, not through this process
    local plain = args
    for i = 1, n do
      local d = args[i]
      if type(d) == "table" and d._lazy and d._conn == r.conn then
        if plain == args then
          plain = { n = n }
          for j = 1, n do plain[j] = args[j] end
        end
        plain[i] = { __corral_ref = d._ref }
        refs = (refs and refs .. "," or "") .. i
      end
    end
    local ok, vals = pcall(function() return { n = n, unwrap.values(plain, n) } end)
    if not ok then return settle(f, FAILED, 0, false, vals) end
    args = vals
  end
  local ok, payload = pcall(encode, unpack(args, 1, n))
  if not ok then
    settle(f, FAILED, 0, false, errors.is_error(payload) and payload or errors.codec(tostring(payload)))
    return
  end
  local what = ("call %s:%s"):format(r.name, call.method)
  f._what = what
  local cf, num, kind = core.nats_call(r.conn._ud, r.subject, call.method, payload, r.js, r.tries,
    r.kind, refs, what)
  if not cf then
    local why = tostring(num)
    if kind == "CodecError" then
      why = ("%s (the call is %d bytes: more than the server takes in one message, its "
        .. "max_payload)"):format(why, #payload)
    end
    settle(f, FAILED, 0, false, errors.new(kind, ("%s: %s"):format(what, why), nil, false))
    return
  end
  r.inflight = r.inflight + 1
  local g = future.wrap(cf, nil, nil, true)
  local ud = r.conn._ud
  if g[S] >= DONE then
    take_outcome(f, g, r.conn)
    sent_done(r)
    return
  end
  add_waiter(g, function()
    take_outcome(f, g, r.conn)
    sent_done(r)
  end)
  -- settled otherwise (its time limit): its reply is no longer awaited
  add_waiter(f, function()
    if g[S] < DONE then core.nats_forget(ud, num) end
  end)
end

-- Send what the queue holds while there is room.
function pump(r)
  while r.queue_head <= r.queue_tail and r.inflight < r.cap do
    local call = r.queue[r.queue_head]
    r.queue[r.queue_head] = nil
    r.queue_head = r.queue_head + 1
    if not call.cancelled then send(r, call) end
  end
end

-- The call is ready (its inputs are done): sent now, or queued behind the
-- calls that wait for room.
local function ready(r, call)
  if call.cancelled then return end
  if r.cancelling then -- (stopped without draining while it waited for its inputs)
    call.f:cancel()
    return
  end
  if r.inflight < r.cap and r.queue_head > r.queue_tail then
    send(r, call)
  else
    r.queue_tail = r.queue_tail + 1
    r.queue[r.queue_tail] = call
  end
end

--- A call to a remote worker (the handle's `push` for mode "remote"):
-- returns its future, and a future to wait on when `max_queued` calls are
-- in flight already (backpressure, as a thread worker's full inbox).
function M.push(_, inst, method, ...)
  local r = inst.remote
  local n = select("#", ...)
  local args = { n = n, ... }
  local f = future.new(nil, RemoteFuture)
  local call = { f = f, method = method, args = args }
  f._item = call
  local deps = unwrap.inputs(args, n)
  local waiting = false
  if #deps > 0 then
    call.deps = deps
    for _, d in ipairs(deps) do
      if d[S] < DONE then waiting = true end
    end
    -- a remote call's future handed on as an argument: a big result of it
    -- is left in the result bucket for this call's host
    for i = 1, n do
      local d = args[i]
      if getmetatable(d) == RemoteFuture then d._forwarded = true end
    end
  end
  if waiting then
    -- the call waits for its inputs here, the caller does not
    r.waiting = r.waiting + 1
    task.spawn(function()
      local wait = require("corral.wait").wait
      pcall(wait, deps)
      r.waiting = r.waiting - 1
      ready(r, call)
      check_idle(r)
    end)
    return f
  end
  local full = r.inflight >= r.cap
  ready(r, call)
  if full and not call.sent then
    call.room = future.new()
    return f, call.room
  end
  return f
end

-- ======================================================================== --
-- Handles                                                                  --
-- ======================================================================== --

local function remote_state(h, conn, name, o)
  return { conn = conn, name = name, cap = h._max_queued, inflight = 0, waiting = 0,
    queue = {}, queue_head = 1, queue_tail = 0, tries = (o.retries or 0) + 1 }
end

--- Start a remote worker: a handle on the pool `o.pool` (default: the
-- class's name), served by `corral serve` hosts; with `o.stateful`, one
-- instance started on a host with `init(...)`. `h` is the handle, built by
-- `Class:init` (corral.worker).
function M.init(h, o, ...)
  local fname = "Class:init"
  local conn = o.connection or the_connection()
  errors.check(M.is_connection(conn), fname, "connection", "a connection (corral.connect)", conn)
  local name = o.pool or o.name
  errors.check(type(name) == "string" and name:find(NAME) ~= nil, fname, "pool",
    "a name of letters, digits, '_' and '-'", name)
  h._name = name
  local r = remote_state(h, conn, name, o)
  h._insts[1] = { remote = r }
  if o.stateful then
    local payload = encode(...)
    local cf, why, kind = core.nats_call(conn._ud, "corral.spawn." .. name, "init", payload, false,
      1, "spawn", nil, ("start a %s instance"):format(name))
    if not cf then error(errors.new(kind, fname .. ": " .. tostring(why), nil, false), 2) end
    local g = future.wrap(cf, nil, nil, true)
    local ok, subject = pcall(g.result, g)
    if not ok then
      if errors.is_error(subject, "WorkerCrashed") then
        subject.message = ("cannot start a %s instance: %s"):format(name, subject.message)
      end
      error(subject, 2)
    end
    errors.check(type(subject) == "string" and subject:find("^corral%.inst%.[%w_-]+%.%d+$"), fname,
      "the host's answer", "an instance subject", subject)
    r.subject, r.js, r.kind, r.stateful = subject, false, "call", true
  else
    if select("#", ...) > 0 then
      errors.usage(fname, "a remote pool's instances are started by its hosts (corral serve): "
        .. "init takes no arguments (a stateful instance does: stateful = true)")
    end
    local g = future.wrap(core.nats_ensure_pool(conn._ud, name), nil, nil, true)
    local ok, e = pcall(g.result, g)
    if not ok then error(conn_error("%s: pool %s: %s", fname, name, errors.text_of(e)), 2) end
    r.subject, r.js, r.kind = "corral.pool." .. name, true, "call"
  end
  return h
end

--- Stop a remote handle (from worker:stop): no more calls; with `drain`,
-- the future settles when the calls sent have their replies; without,
-- the calls not sent yet are cancelled and it settles at once. A stateful
-- instance is stopped on its host. Returns the future.
function M.stop(_, inst, drain)
  local r = inst.remote
  if not drain then
    r.cancelling = true
    for i = r.queue_head, r.queue_tail do
      local call = r.queue[i]
      if call and not call.cancelled then call.f:cancel() end
    end
  end
  local idle = future.new()
  r.idle = idle
  check_idle(r)
  if not r.stateful then
    if drain then return idle end
    local done = future.new()
    settle_values(done)
    return done
  end
  local stopped = future.new()
  local function tell_host()
    local cf = core.nats_call(r.conn._ud, r.subject, "stop", core.encode(drain), false, 1, "stop",
      nil, ("stop %s"):format(r.name))
    if not cf then return settle_values(stopped) end
    local g = future.wrap(cf, nil, nil, true)
    add_waiter(g, function() future.retrieve(g); settle_values(stopped) end)
    if g[S] >= DONE then settle_values(stopped) end
  end
  if idle[S] >= DONE or not drain then tell_host() else add_waiter(idle, tell_host) end
  return stopped
end

-- ======================================================================== --
-- Hosts (corral serve)                                                     --
-- ======================================================================== --

local Server = {}
Server.__index = Server

-- A host's reply to `subject`: the results (ok), or an error.
-- The reply subject came with the call (bytes from outside): a literal
-- subject only, never a wildcard nor one of the server's own ($JS, $SYS).
local function reply(srv, subject, status, payload)
  if subject == nil or subject == "" or subject:find("[%s%*>]") or subject:find("^%$") then
    return
  end
  local ok, why = core.nats_publish(srv.ud, subject, status, payload)
  if not ok and status ~= "crashed" then
    -- (too big for the server's max_payload, most likely: say so instead)
    local e = { kind = "CodecError", message = ("the reply cannot be sent: %s (%d bytes)"):format(
      tostring(why), #payload) }
    core.nats_publish(srv.ud, subject, "error", core.encode(e))
  end
end

-- An error as it travels: plain fields only (its value and cause may hold
-- anything: their text travels).
local function plain_error(e, host)
  if not errors.is_error(e) then e = errors.raised(e) end
  local t = { kind = e.kind, message = tostring(e.message), traceback = e.traceback, host = host }
  if e.cause ~= nil then
    local c = e.cause
    t.cause = errors.is_error(c) and { kind = c.kind, message = tostring(c.message),
      traceback = c.traceback } or { kind = "TaskError", message = errors.safe_tostring(c) }
  end
  for _, k in ipairs { "worker", "method", "input", "code" } do
    local v = rawget(e, k)
    if type(v) == "string" or type(v) == "number" then t[k] = v end
  end
  return t
end

local function reply_error(srv, subject, e)
  reply(srv, subject, "error", core.encode(plain_error(e, srv.name)))
end

local function pack(...) return { n = select("#", ...), ... } end

-- The arguments of a message: a table {n=...}, or nil and the error.
local function decode_args(srv, data)
  -- (untrusted, nothing that names code passes: no function, and no C
  -- function or module by name either; trusted, those only inside a
  -- function the key vouches for)
  local ok, vals = pcall(function() return pack(core.decode(data, srv.trust or "plain")) end)
  if ok then return vals end
  local msg = errors.is_error(vals) and vals.message or tostring(vals)
  if not srv.trust and (msg:find("a function cannot come from outside", 1, true)
      or msg:find("outside a function the key vouches for", 1, true)) then
    msg = "this host runs only the methods of its own classes: it refuses functions shipped "
      .. "with a call (start it with --trust, and give it and the caller the same "
      .. "CORRAL_TRUST_KEY): " .. msg
  end
  return nil, errors.new("CodecError", msg, nil, false)
end

-- Run a call on the local handle `lh`; `done(f)` when it has ended.
local function run_call(lh, methods, m, args, done)
  local method = m.method
  if type(methods[method]) ~= "function" then
    local f = future.new()
    settle(f, FAILED, 0, false, errors.new("WorkerError", ("%s has no method %q"):format(lh._name,
      method), nil, false))
    return done(f)
  end
  local ok, f = pcall(lh[method], lh, unpack(args, 1, args.n))
  if not ok then
    local e = f
    f = future.new()
    settle(f, FAILED, 0, false, e)
    return done(f)
  end
  if f[S] >= DONE then return done(f) end
  add_waiter(f, done)
end

-- Results bigger than this wait in the result bucket: the reply names
-- them (the caller reads them when it wants them; a call they are handed
-- on to reads them on its host).
local INLINE_MAX = 64 * 1024

-- A finished call's outcome as it travels: "ok" and the results, or
-- "error" and the error.
local function outcome(f)
  local s = f[S]
  if s == DONE then
    local n = f[N]
    if n < 0 then n = future.values(f) end
    local ok, payload
    if n == nil then
      ok, payload = false, f._e
    elseif n == 0 then
      ok, payload = pcall(encode)
    elseif n == 1 then
      ok, payload = pcall(encode, f[V])
    else
      ok, payload = pcall(encode, unpack(f[V], 1, f[V].n))
    end
    if ok then return "ok", payload end
    return "error", core.encode(plain_error(payload))
  end
  future.retrieve(f)
  return "error", core.encode(plain_error(s == FAILED and f._e or errors.cancelled()))
end

-- Answer the call of message m with the outcome of f; then after().
local function respond(srv, m, f, after)
  local status, payload = outcome(f)
  if status == "ok" and #payload > INLINE_MAX and m.call:find("^[%w_-]+$") then
    local k = future.wrap(core.nats_kv_put(srv.ud, m.call, payload), nil, nil, true)
    local function stored()
      if k[S] == DONE then
        reply(srv, m.reply_to, "ref", m.call)
      else
        future.retrieve(k)
        reply_error(srv, m.reply_to, k._e)
      end
      after()
    end
    if k[S] >= DONE then stored() else add_waiter(k, stored) end
    return
  end
  reply(srv, m.reply_to, status, payload)
  after()
end

-- The arguments that are references to results in the result bucket
-- (Corral-Refs names their places) are read; then go(args), or go(nil, e).
local function resolve_refs(srv, m, args, go)
  if m.refs == "" then return go(args) end
  task.spawn(function()
    for pos in m.refs:gmatch("[^,]+") do
      local i = tonumber(pos)
      local v = i and args[i]
      if not i or i < 1 or i > args.n or type(v) ~= "table" or type(v.__corral_ref) ~= "string" then
        return go(nil, errors.codec(("argument %s is not a result reference"):format(pos)))
      end
      local g = future.wrap(core.nats_kv_get(srv.ud, v.__corral_ref), nil, nil, true)
      local ok, first = pcall(g.result, g)
      if not ok then
        return go(nil, errors.new("DependencyError", ("%s: input %d (result %s) cannot be read: %s")
          :format(m.method, i, v.__corral_ref, errors.text_of(first)), first, false))
      end
      args[i] = first
    end
    go(args)
  end)
end

-- Run the call of message m on the local handle lh, its references read
-- first; answer it, then after().
local function serve_call(srv, lh, methods, m, args, after)
  resolve_refs(srv, m, args, function(a, err)
    if not a then
      local f = future.new()
      settle(f, FAILED, 0, false, err)
      return respond(srv, m, f, after)
    end
    run_call(lh, methods, m, a, function(f) respond(srv, m, f, after) end)
  end)
end

-- A pool's messages: each a call, run on the host's local pool.
local function serve_pool_msg(srv, p, m)
  local tries = tonumber(m.tries) or 1
  if m.delivered > tries then
    -- delivered again after its host died, past the caller's retries
    reply(srv, m.reply_to, "crashed", ("call %s:%s: its host died while it ran (delivered %d "
      .. "times, retries = %d)"):format(p.name, m.method, m.delivered - 1, tries - 1))
    core.nats_ack(srv.ud, m.reply, "+TERM")
    return
  end
  local args, e = decode_args(srv, m.data)
  if not args then
    reply_error(srv, m.reply_to, e)
    core.nats_ack(srv.ud, m.reply, "+TERM")
    return
  end
  p.running = p.running + 1
  srv.held[m] = true
  local function after()
    srv.held[m] = nil
    if srv.emptied and next(srv.held) == nil then settle_values(srv.emptied) end
    core.nats_ack(srv.ud, m.reply, "+ACK")
    p.running = p.running - 1
    srv.calls = srv.calls + 1
    if p.slot then
      local slot = p.slot
      p.slot = nil
      settle_values(slot)
    end
  end
  serve_call(srv, p.handle, p.methods, m, args, after)
end

-- A message to one of this host's instances (a call or a stop), or a
-- request to start one.
local function serve_inst_msg(srv, m)
  local id = tonumber(m.subject:match("%.(%d+)$"))
  local inst = id and srv.insts[id]
  if not inst then
    return reply(srv, m.reply_to, "crashed", "this instance is gone (stopped)")
  end
  if m.kind == "stop" then
    srv.insts[id] = nil
    local ok, drain = pcall(core.decode, m.data)
    local h = inst.handle
    task.spawn(function()
      pcall(h.stop, h, { drain = not ok or drain ~= false })
      reply(srv, m.reply_to, "ok", core.encode(true))
    end)
    return
  end
  local args, e = decode_args(srv, m.data)
  if not args then return reply_error(srv, m.reply_to, e) end
  local function after() srv.calls = srv.calls + 1 end
  serve_call(srv, inst.handle, inst.methods, m, args, after)
end

local function serve_spawn_msg(srv, p, m)
  local args, e = decode_args(srv, m.data)
  if not args then return reply_error(srv, m.reply_to, e) end
  task.spawn(function()
    local ok, h = pcall(function()
      return p.class:options { mode = srv.mode, workers = 1, name = p.name }:init(unpack(args, 1,
        args.n))
    end)
    if not ok then return reply_error(srv, m.reply_to, h) end
    -- its init has run when a call to a method no class has fails with "no
    -- method"; a WorkerCrashed says that init failed
    local probe_ok, crash = pcall(function()
      local f = h["\0ready"](h)
      if type(f) == "table" and f.result then return f:result() end
    end)
    if not probe_ok and errors.is_error(crash, "WorkerCrashed") then
      pcall(h.stop, h, { drain = false })
      return reply_error(srv, m.reply_to, crash)
    end
    if srv.stopping then -- (stopped meanwhile: it is not served)
      pcall(h.stop, h, { drain = false })
      return reply(srv, m.reply_to, "crashed", "the host stopped")
    end
    srv.next_inst = srv.next_inst + 1
    srv.insts[srv.next_inst] = { handle = h, methods = p.methods }
    reply(srv, m.reply_to, "ok", core.encode(("corral.inst.%s.%d"):format(srv.id, srv.next_inst)))
  end)
end

-- Wait for a mailbox's next messages (or `slot`): the mailbox's future.
local function mbox_future(mb)
  return future.wrap(core.mbox_wait(mb), nil, nil, true)
end

-- A pool's loop: keep the local workers busy, with calls fetched ahead
-- (`p.ahead` of them: fewer pull requests, no wait for one between two
-- calls). Those wait in `p.queue`, held: "in progress" acks keep them
-- this host's; a stop hands them back.
local function pool_loop(srv, p)
  local wait = require("corral.wait").wait
  local q = p.queue
  while not srv.stopping do
    while p.running < p.cap and q.head <= q.tail do
      local m = q[q.head]
      q[q.head] = nil
      q.head = q.head + 1
      serve_pool_msg(srv, p, m)
    end
    local want = p.cap + p.ahead - p.running - (q.tail - q.head + 1)
    core.mbox_want(p.mb, want > 0 and want or 0)
    p.slot = p.slot or future.new()
    if want > 0 then
      -- (the mailbox's future is kept while it waits: one per delivery, not per turn)
      local mf = p.mfut
      if not mf or mf[S] >= DONE then
        mf = mbox_future(p.mb)
        p.mfut = mf
      end
      if mf[S] < DONE and p.slot[S] < DONE then
        wait({ mf, p.slot }, { return_when = "FIRST_COMPLETED" })
      end
    elseif p.slot[S] < DONE then
      wait({ p.slot })
    end
    if srv.stopping then break end
    local msgs, closed = core.mbox_take(p.mb, 1024)
    for _, m in ipairs(msgs) do
      q.tail = q.tail + 1
      q[q.tail] = m
      srv.held[m] = true
    end
    if closed then break end -- (its connection was closed under it: nothing more comes)
  end
end

local function mbox_loop(srv, mb, fn)
  while not srv.stopping do
    mbox_future(mb):result()
    local msgs, closed = core.mbox_take(mb, 256)
    for _, m in ipairs(msgs) do fn(m) end
    if closed then break end
  end
end

local SERVE_OPTIONS = { connection = true, url = true, classes = true, workers = true, mode = true,
  trust = true, ack_wait = true, max_pending = true, name = true, user = true, password = true,
  token = true, tls = true }

--- Serve pools and stateful instances to remote callers: a worker host.
-- `classes` maps pool names to worker classes (`{ sq = Squarer }`); each
-- pool's calls run on `workers` local workers (default: one per CPU) in
-- `mode` ("thread" or "process"). Returns a server (`:stop()`, `:wait()`,
-- `:stats()`) once it is attached to every pool.
-- @tab opts `connection` (or `url` and the options of corral.connect),
-- `classes`, `workers`, `mode`, `trust` (run functions shipped with calls:
-- needs the caller's CORRAL_TRUST_KEY), `ack_wait` (seconds before the
-- server gives a call whose host went silent to another: 30),
-- `max_pending` (calls of a pool given out and not acknowledged, over all
-- its hosts: 1000), `name` (for errors)
function M.serve(opts)
  local fname = "corral.serve"
  errors.check(type(opts) == "table", fname, "opts", "a table", opts)
  errors.check_options(fname, opts, SERVE_OPTIONS)
  errors.check(type(opts.classes) == "table", fname, "classes", "a table of pool name -> class",
    opts.classes)
  local mode = opts.mode or "thread"
  errors.check(mode == "thread" or mode == "process" or mode == "async", fname, "mode",
    '"thread", "process" or "async"', mode)
  local workers = opts.workers or core.ncpu()
  errors.check(type(workers) == "number" and workers >= 1 and workers <= 1024 and
    workers == math.floor(workers), fname, "workers", "a whole number from 1 to 1024", workers)
  local ack_wait = opts.ack_wait or 30
  errors.check(type(ack_wait) == "number" and ack_wait >= 0.1 and ack_wait <= 86400, fname,
    "ack_wait", "a number of seconds from 0.1 to 86400", ack_wait)
  local max_pending = opts.max_pending or 1000
  errors.check(type(max_pending) == "number" and max_pending >= 1, fname, "max_pending",
    "a whole number >= 1", max_pending)
  local names = {}
  for name in pairs(opts.classes) do names[#names + 1] = name end
  table.sort(names, function(a, b) return tostring(a) < tostring(b) end)
  -- (every name and class checked before connecting or serving)
  for _, name in ipairs(names) do
    local cls = opts.classes[name]
    errors.check(type(name) == "string" and name:find(NAME) ~= nil, fname, "classes",
      "pool names of letters, digits, '_' and '-'", name)
    errors.check(type(cls) == "table" and type(rawget(cls, "_methods")) == "table", fname,
      "classes." .. name, "a worker class (corral.worker)", cls)
  end
  if opts.trust then
    local key = os.getenv("CORRAL_TRUST_KEY")
    if not key or #key < 16 then
      errors.usage(fname, "trust = true needs CORRAL_TRUST_KEY (at least 16 characters), the "
        .. "same as the callers': only their functions are run")
    end
  end
  local conn, own = opts.connection, false
  if conn == nil then
    conn = M.connect { url = opts.url, user = opts.user, password = opts.password,
      token = opts.token, tls = opts.tls, name = opts.name }
    own = true
  end
  errors.check(M.is_connection(conn), fname, "connection", "a connection (corral.connect)", conn)
  local _, id = core.nats_state(conn._ud)
  local srv = setmetatable({ conn = conn, ud = conn._ud, own = own, id = id, trust = opts.trust == true,
    name = opts.name or ("host " .. id), mode = mode, pools = {}, insts = {}, next_inst = 0,
    held = {}, calls = 0, stopping = false, tasks = {}, mboxes = {} }, Server)
  for _, name in ipairs(names) do
    local cls = opts.classes[name]
    local mc = cls._options.max_concurrency or 1
    local handle = cls:options { mode = mode, workers = workers, name = name }:init()
    local mb, attached = core.nats_pull(srv.ud, name, ack_wait * 1000, max_pending)
    if not mb then
      srv:stop { drain = false }
      handle:stop { drain = false }
      error(conn_error("%s: pool %s: %s", fname, name, tostring(attached)), 2)
    end
    srv.mboxes[#srv.mboxes + 1] = mb
    local g = future.wrap(attached, nil, nil, true)
    local ok, e = pcall(g.result, g)
    if not ok then
      srv:stop { drain = false }
      handle:stop { drain = false }
      error(conn_error("%s: pool %s: %s", fname, name, errors.text_of(e)), 2)
    end
    local p = { name = name, class = cls, methods = cls._methods, handle = handle, mb = mb,
      cap = workers * mc, running = 0, queue = { head = 1, tail = 0 } }
    p.ahead = math.min(math.max(p.cap, 32), max_pending)
    srv.pools[name] = p
    local smb, why = core.nats_subscribe(srv.ud, "corral.spawn." .. name, "corral")
    if not smb then
      srv:stop { drain = false }
      error(conn_error("%s: pool %s: %s", fname, name, tostring(why)), 2)
    end
    srv.mboxes[#srv.mboxes + 1] = smb
    srv.tasks[#srv.tasks + 1] = task.spawn(pool_loop, srv, p)
    srv.tasks[#srv.tasks + 1] = task.spawn(mbox_loop, srv, smb, function(m) serve_spawn_msg(srv, p, m) end)
  end
  local imb, why = core.nats_subscribe(srv.ud, ("corral.inst.%s.*"):format(id))
  if not imb then
    srv:stop { drain = false }
    error(conn_error("%s: %s", fname, tostring(why)), 2)
  end
  srv.mboxes[#srv.mboxes + 1] = imb
  srv.tasks[#srv.tasks + 1] = task.spawn(mbox_loop, srv, imb, function(m) serve_inst_msg(srv, m) end)
  -- calls that run long keep their delivery: "in progress" every third of
  -- ack_wait
  local function keep()
    if srv.closed then return end
    for m in pairs(srv.held) do core.nats_ack(srv.ud, m.reply, "+WPI") end
    srv.timer = sched.at(sched.now() + ack_wait / 3, keep)
  end
  srv.timer = sched.at(sched.now() + ack_wait / 3, keep)
  srv.done = future.new()
  return srv
end

--- Stop serving: no more calls are taken; with `drain` (true) the calls
-- running finish and are answered first. Calls taken and not started go
-- back to the server at once (another host gets them).
function Server:stop(opts)
  opts = opts or {}
  if self.stopping then return true end
  self.stopping = true
  local drain = opts.drain ~= false
  for _, mb in ipairs(self.mboxes) do core.mbox_close(mb) end
  -- fetched and not started: back to the server now, not after ack_wait
  for _, p in pairs(self.pools) do
    local q = p.queue
    for i = q.head, q.tail do
      local m = q[i]
      q[i] = nil
      self.held[m] = nil
      core.nats_ack(self.ud, m.reply, "+NAK")
    end
    q.head, q.tail = 1, 0
    repeat
      local left = core.mbox_take(p.mb, 1024)
      for _, m in ipairs(left) do core.nats_ack(self.ud, m.reply, "+NAK") end
    until #left == 0
    if p.slot then settle_values(p.slot) end
  end
  for _, p in pairs(self.pools) do p.handle:stop { drain = drain } end
  for _, inst in pairs(self.insts) do inst.handle:stop { drain = drain } end
  self.insts = {}
  -- the answers of the calls that ran (a big result is kept first), then
  -- what is held still (not answered: cancelled) goes back
  if drain and next(self.held) then
    self.emptied = future.new()
    pcall(self.emptied.result, self.emptied, 10)
  end
  for m in pairs(self.held) do core.nats_ack(self.ud, m.reply, "+NAK") end
  self.held = {}
  self.closed = true
  if self.timer then sched.cancel_timer(self.timer) end
  if self.own then self.conn:close() end
  if self.done then settle_values(self.done) end
  return true
end

--- Wait until the server is stopped (forever, unless something stops it).
function Server:wait()
  return self.done:result()
end

--- What the server has done: `calls` answered, `running` now, and its id.
function Server:stats()
  local running = 0
  for _, p in pairs(self.pools) do running = running + p.running end
  return { calls = self.calls, running = running, id = self.id }
end

M.RemoteFuture, M.Connection = RemoteFuture, Connection
return M
