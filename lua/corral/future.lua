--- Futures: the result of work that may not have finished yet.
--
-- A future is a Lua object with a C half (`_c`, a `corral_future`) whose
-- state machine is thread-safe. The C half is made when the future first
-- becomes visible to another thread or to C (`M.cref`); until then only the
-- loop's own thread can touch it, so a future that never leaves its context
-- costs no C allocation. The Lua side keeps the values, the error and the
-- waiters of its own context; a future settled by another thread reaches
-- this context through the loop (`_sync`).
--
-- Fields: the hot ones in array slots named by `corral.fields` (state,
-- results, first waiter); `_e` error, `_w` more waiters, `_c` the C half.
-- @classmod corral.Future
local core = require "corral.core"
local errors = require "corral.errors"
local sched = require "corral.sched"
local F = require "corral.fields"

local fnew, fsettle = core.fnew, core.fsettle
local wake, block, waiter = sched.wake, sched.block, sched.waiter
local WOKE, TIMEOUT, CANCEL, FOREVER = sched.WOKE, sched.TIMEOUT, sched.CANCEL, sched.FOREVER
local now = core.now
local type, select, unpack, setmetatable, getmetatable = type, select, unpack, setmetatable, getmetatable

local PENDING, RUNNING, DONE, FAILED, CANCELLED = core.PENDING, core.RUNNING, core.DONE, core.FAILED,
  core.CANCELLED
local S, N, V, W1 = F.S, F.N, F.V, F.W1
local STATE_NAMES = { [PENDING] = "pending", [RUNNING] = "running", [DONE] = "done", [FAILED] = "failed",
  [CANCELLED] = "cancelled" }

local Future = {}
Future.__index = Future

local M = { Future = Future, PENDING = PENDING, RUNNING = RUNNING, DONE = DONE,
  FAILED = FAILED, CANCELLED = CANCELLED }

--- Whether `v` is a corral future (or task).
local function is_future(v)
  local mt = getmetatable(v)
  return type(mt) == "table" and rawget(mt, "__future") == true
end
M.is_future = is_future
Future.__future = true

--- A new pending future, over `c` (a C future) when given, with metatable
-- `mt` (default: Future).
function M.new(c, mt)
  -- (`_c` in the constructor: its slot is made with the table, not by a
  -- resize; and no tail call into setmetatable, which stops a trace)
  local f = setmetatable({ PENDING, 0, false, false, _c = c }, mt or Future)
  return f
end

-- One Lua future per C future in each context (weak: a future no one
-- holds goes, and its C half with it).
local wrappers = setmetatable({}, { __mode = "v" })

--- The Lua future of a C future in this context: the one there is, or a new
-- one (with metatable `mt`) that this loop watches. `key`, when given, says
-- the watch was already made in C under that key.
-- `quiet`: its failure is reported elsewhere (a worker watching its own
-- call's future), never as unretrieved here.
function M.wrap(c, mt, key, quiet)
  local k, f = key
  -- (a C future watched in C just now, `key` given, is new to this context)
  if not k then
    k = core.fkey(c)
    f = wrappers[k]
    if f then return f end
  end
  f = M.new(c, mt)
  if quiet then f._quiet = true end
  wrappers[k] = f
  if key then
    sched.watched(f, key)
  elseif not sched.watch(f) then
    f:_sync()
  end
  return f
end

-- Futures whose C half an encode made while they were settled already:
-- settled when that encode is done (never by an encode nested in it).
local unsettled = {}

--- The C half of `f`, made (and brought to f's state) on first use. While
-- it is pending this loop watches it: C code (a host, through
-- `corral_to_future`) or another context may settle it, and `f` follows.
-- `in_encode`: the codec asks, in the middle of an encode; a settled `f`'s
-- C half is then settled by `flush_crefs` once that encode is done (the
-- second result says so).
function M.cref(f, in_encode)
  local c = f._c
  if c then return c, false end
  c = fnew()
  f._c = c
  wrappers[core.fkey(c)] = f
  local s = f[S]
  if s == RUNNING then
    core.fstart(c)
  elseif s >= DONE then
    if f._rep then core.reporter_attach(f._rep, c) end
    if in_encode then
      unsettled[#unsettled + 1] = f
      return c, true
    end
    M.settle_c(c, s, f[N], f[V], f._e)
  end
  if s < DONE then sched.watch(f) end
  return c, false
end

--- Settle the C halves that encodes made of settled futures (see cref).
function M.flush_crefs()
  while #unsettled > 0 do
    local f = table.remove(unsettled)
    M.settle_c(f._c, f[S], f[N], f[V], f._e)
  end
end

-- ======================================================================== --
-- Waiters                                                                  --
-- ======================================================================== --

-- A future's waiters: the first in slot W1, more in the array `_w`. A removed
-- waiter leaves `false` in its slot. Each is a function (internal, called at
-- once with the future), a callback record {_cb = fn} (called on the next
-- turn), or a waiter (task or outside) to wake.

--- Add a waiter; returns its slot for `remove_waiter`. Waiters fire in the
-- order they were added.
local function add_waiter(f, x)
  if not f[W1] and not f._w then
    f[W1] = x
    return 0
  end
  local w = f._w
  if not w then
    w = {}
    f._w = w
  end
  local i = #w + 1
  w[i] = x
  return i
end
M.add_waiter = add_waiter

local function remove_waiter(f, slot, x)
  if slot == 0 then
    if f[W1] == x then f[W1] = false end
  else
    local w = f._w
    if w and w[slot] == x then w[slot] = false end
  end
end
M.remove_waiter = remove_waiter

-- Runs a done callback fn(f) as a task of its own, so that it may wait
-- (set by corral.task).
M.run_callback = nil

local function fire(f, x)
  if type(x) == "function" then
    x(f)
  elseif x._cb then
    M.run_callback(x._cb, f)
  else
    wake(x, WOKE, f)
  end
end

local function unretrieved_text(f, e, tb)
  local text = "corral: unretrieved error in " .. tostring(f) .. ":\n" .. sched.safe_tostring(e)
  if not errors.is_error(e, "TaskError") then -- the others do not print their traceback
    tb = tb or rawget(e, "traceback")
    if tb then text = text .. "\n" .. tb end
  end
  return text .. "\n"
end

--- Settle a C half with a Lua future's outcome, encoding the values (or the
-- error) so that other contexts can read them. A value that cannot travel
-- fails the C half with a CodecError. Returns false when it was settled.
function M.settle_c(c, s, n, v, e)
  local ok, why
  if s == DONE then
    if n == 1 then
      ok, why = core.fsettle_encode(c, DONE, v)
    elseif n == 0 then
      ok, why = core.fsettle_encode(c, DONE)
    else
      ok, why = core.fsettle_encode(c, DONE, unpack(v, 1, v.n))
    end
  elseif s == FAILED then
    ok, why = core.fsettle_encode(c, FAILED, e)
    if ok == nil then ok, why = core.fsettle_encode(c, FAILED, sched.safe_tostring(e)) end
  else
    return fsettle(c, s)
  end
  if ok == nil then return core.fset_error(c, "CodecError", why) end
  return ok
end
local settle_c = M.settle_c

--- Settle `f`: state, number of results, result(s) (see the fields above),
-- error, traceback. `external` says the C half is settled already. Returns
-- false when it was already settled (perhaps by another thread).
local function settle(f, s, n, v, e, tb, external)
  if f[S] >= DONE then return false end
  -- every failure a future holds is an error object
  if s == FAILED then e = errors.raised(e, tb) end
  local c = f._c
  if c and not external and not settle_c(c, s, n, v, e) then return false end
  f[S], f[N], f[V], f._e = s, n, v, e
  if s == FAILED then
    f._tb = tb or rawget(e, "traceback")
    -- an input of another call hands its error on to that call's future
    if not f._quiet then f._rep = core.reporter(unretrieved_text(f, e, tb), f._c) end
  end
  local x = f[W1]
  if x then
    f[W1] = false
    fire(f, x)
  end
  local w = f._w
  if w then
    f._w = false
    for i = 1, #w do
      x = w[i]
      if x then fire(f, x) end
    end
  end
  return true
end
M.settle = settle

--- Settle `f` as done with the values `...`; false when it was settled
-- already.
local function settle_values(f, ...)
  local n = select("#", ...)
  if n == 1 then return settle(f, DONE, 1, (...)) end
  return settle(f, DONE, n, n > 1 and { n = n, ... } or false)
end
M.settle_values = settle_values

--- Mark the error as seen: it will not be reported as unretrieved.
local function retrieve(f)
  local r = f._rep
  if r then
    f._rep = nil
    core.disarm(r)
  end
end
M.retrieve = retrieve

-- A future settled by C or another thread: take its state and values.
function Future:_sync()
  local s = core.fstate(self._c)
  if self[S] >= DONE or s < DONE then return end
  local v, e = false, false
  local n = 0
  if s == DONE then
    n = -1 -- still encoded: decoded where someone asks (see values)
  elseif s == FAILED then
    local vn, ve = core.fvalues(self._c)
    if vn then
      if vn > 1 then ve = ve[1] elseif vn == 0 then ve = nil end
      e = errors.adopt(ve)
    else
      e = errors.codec("the error of this future cannot be decoded here: " .. tostring(ve))
    end
  else
    e = errors.cancelled()
  end
  settle(self, s, n, v, e, type(e) == "table" and rawget(e, "traceback") or nil, true)
end

-- Decode the results of a future settled elsewhere, on first use. Values
-- that cannot be decoded here fail the future (in this context) with a
-- CodecError: a decode failure is never a value.
local function values(f)
  -- (a remote call's result left on the server: fetched now, see corral.remote)
  local lazy = f._lazy
  if lazy then return lazy(f) end
  local n, v = core.fvalues(f._c)
  if not n then
    f[S], f[N], f[V] = FAILED, 0, false
    f._e = errors.codec("the result cannot be decoded here: " .. tostring(v))
    return nil
  end
  f[N], f[V] = n, v -- (one value, false for none, or a table {n=...})
  return n
end
M.values = values

-- ======================================================================== --
-- Waiting                                                                  --
-- ======================================================================== --

local function check_timeout(fname, timeout)
  if timeout ~= nil then
    errors.check(type(timeout) == "number" and timeout >= 0, fname, "timeout",
      "a number of seconds >= 0", timeout)
  end
end
M.check_timeout = check_timeout

--- Raise the error that a block token stands for (TIMEOUT, CANCEL, FOREVER).
function M.raise_token(tok, what)
  if tok == TIMEOUT then
    error(errors.timeout(what, 2), 3)
  elseif tok == CANCEL then
    error(errors.cancelled(), 3)
  elseif tok == FOREVER then
    if sched.halted() then
      error(errors.new("UsageError", what .. " would wait forever: corral.exit stopped the runtime",
        nil, 3), 3)
    end
    error(errors.new("UsageError", what .. " would wait forever: nothing pending can settle it", nil, 3), 3)
  end
end
local raise_token = M.raise_token

-- Wait until f settles (or the timeout passes, or the waiter is cancelled).
local function await(f, timeout, fname)
  check_timeout(fname, timeout)
  local w = waiter()
  local slot = add_waiter(f, w)
  local tok = block(w, timeout and now() + timeout)
  if tok ~= WOKE then
    remove_waiter(f, slot, w)
    raise_token(tok, fname)
  end
end

--- The future's results: all the values its task returned. Waits for them;
-- raises the future's error when it failed, `CancelledError` when it was
-- cancelled, and `TimeoutError` when `timeout` seconds pass first (the
-- future itself is untouched).
-- @number[opt] timeout seconds
function Future:result(timeout)
  if self[S] < DONE then await(self, timeout, "future:result") end
  if self[S] == DONE then
    local n = self[N]
    if n < 0 then n = values(self) end
    if n == 1 then return self[V] end
    if n == 0 then return end
    if n then
      local v = self[V]
      return unpack(v, 1, v.n)
    end
  end
  retrieve(self)
  error(self._e or errors.cancelled(), 0)
end

--- The future's error, or nil when it succeeded; a cancelled future gives its
-- `CancelledError`. Waits like `result`. (A result that cannot be decoded
-- in this context is a `CodecError`.)
-- @number[opt] timeout seconds
function Future:exception(timeout)
  if self[S] < DONE then await(self, timeout, "future:exception") end
  if self[S] == DONE and self[N] < 0 then values(self) end
  retrieve(self)
  if self[S] == DONE then return nil end
  return self._e or errors.cancelled()
end

--- Whether the future has settled (done, failed or cancelled).
function Future:done() return self[S] >= DONE end
--- Whether its work is running now (a call: its method has started).
function Future:running()
  local s = self[S]
  if s == PENDING and self._c then return core.fstate(self._c) == RUNNING end
  return s == RUNNING
end
--- Whether it was cancelled.
function Future:cancelled() return self[S] == CANCELLED end

--- Cancel the future. Returns true when it took effect: it was pending, or
-- its work (a call) is stopped at the wait where it is suspended. Work
-- that is executing cannot be cancelled: false.
function Future:cancel()
  if self[S] >= DONE then return false end
  local c = self._c
  if c then
    if not core.fcancel(c) then return false end
    return settle(self, CANCELLED, 0, false, errors.cancelled(), nil, true)
  end
  return settle(self, CANCELLED, 0, false, errors.cancelled())
end

--- Settle with results. Settling twice raises `UsageError`.
function Future:set_result(...)
  if not settle_values(self, ...) then
    errors.usage("future:set_result", "the future is already settled (%s)", STATE_NAMES[self[S]])
  end
end

--- Settle as failed with `err`. A value that is not a corral error becomes
-- a `TaskError` keeping it as `value`. Settling twice raises `UsageError`.
function Future:set_exception(err)
  errors.check(err ~= nil, "future:set_exception", "err", "an error value", err)
  local tb = type(err) == "table" and rawget(err, "traceback") or nil
  if not settle(self, FAILED, 0, false, err, tb or debug.traceback("", 2):gsub("^\n", "")) then
    errors.usage("future:set_exception", "the future is already settled (%s)", STATE_NAMES[self[S]])
  end
end

--- Call `fn(f)` once the future settles, on this context's loop (on the next
-- turn when it has settled already). An error in `fn` is reported on stderr.
function Future:add_done_callback(fn)
  errors.check(type(fn) == "function" or (getmetatable(fn) or {}).__call ~= nil,
    "future:add_done_callback", "fn", "a function", fn)
  if self[S] >= DONE then
    M.run_callback(fn, self)
  else
    add_waiter(self, { _cb = fn })
  end
end

function Future:__tostring()
  local s = STATE_NAMES[self[S]]
  if self[S] == FAILED then s = s .. ": " .. sched.safe_tostring(self._e) end
  return ("corral.%s(%s)"):format(self._kind or "future", s)
end

--- The first result of a settled future (nil when it has none). Raises the
-- CodecError of a result that cannot be decoded here.
function M.first(f)
  local n = f[N]
  if n < 0 then n = values(f) end
  if n == 1 then return f[V] end
  if n == 0 then return nil end
  if not n then error(f._e, 0) end
  return f[V][1]
end

M.STATE_NAMES = STATE_NAMES
return M
