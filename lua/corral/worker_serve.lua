--- Serving an instance's calls, the same in every mode: runner tasks, at
-- most `max_concurrency` of them, take calls from the instance's inbox in
-- order and in batches; each call waits for its inputs, starts (unless its
-- caller cancelled it), runs its method and settles its future, and its
-- errors are shaped in one place (`WorkerError`, `DependencyError`,
-- `CancelledError`, `CodecError`). A sync call runs the same steps inline.
--
-- What differs between modes is the inbox only, a table of functions handed
-- to `new` (the thread worker's C inbox in `worker_main`, an async or sync
-- instance's in `worker_local`):
--
-- * `take(buf, n, tail)`: move up to `n` calls into `buf[tail+1...]`,
--   return how many;
-- * `info(call)`: the method's name, and how many inputs the call has;
-- * `deps(call)`: its inputs (futures), in order; `own(call)`: its future;
-- * `start(call)`: the method starts (false: its caller cancelled it);
-- * `args(call)`: true and the arguments, or false and why they cannot be
--   read here;
-- * `finish(call, state, ...)`: settle it (no state: drop a call its caller
--   cancelled); returns nil and why when the values cannot travel;
-- * `suspend(call)`, `resume(call)`: the method waits / goes on (false: its
--   caller cancelled it), and `watch(task, call)`, called at its first wait
--   (see `sched.block`);
-- * `cancelling()`: the instance is stopping and cancels what it has;
-- * `method_of(call)`: its method's name (for an error outside the method);
-- * `carried(call, i)` (optional): the call fails with input i's failure,
--   which is then the call's to report.
-- @module corral.worker_serve
-- (the require corral was loaded with: a script may replace the global)
local require = require
local errors = require "corral.errors"
local sched = require "corral.sched"
local future = require "corral.future"
local task = require "corral.task"
local T = require "corral.trace"

local DONE, FAILED, CANCELLED = future.DONE, future.FAILED, future.CANCELLED
local xpcall, pcall, type, setmetatable = xpcall, pcall, type, setmetatable

local M = {}

-- What `inputs` returns when the call is to be cancelled.
local CANCEL = {}

-- ======================================================================== --
-- One call                                                                 --
-- ======================================================================== --

-- Wait for the call's inputs (or for its caller to cancel it). Returns an
-- error to fail the call with, CANCEL, or nil to run it.
local wait
local function inputs(srv, ib, call, method)
  local deps = ib.deps(call)
  -- a call its caller cancelled reads no input's error: the input's
  -- failure stays its own, reported if nobody retrieves it
  local own = ib.own(call)
  if own:done() then return CANCEL end
  wait = wait or require("corral.wait").wait
  for i = 1, #deps do
    local d = deps[i]
    if not d:done() then
      local ok = pcall(wait, { d, own }, { return_when = "FIRST_COMPLETED" })
      if not ok or own:done() then return CANCEL end
    end
    if d:cancelled() then return CANCEL end
    local de = d:exception()
    if de ~= nil then
      if ib.carried then ib.carried(call, i) end
      return errors.dependency(srv.name, method, i, de)
    end
  end
end

-- Arguments that cannot be read here (a module this state cannot require)
-- fail the call with a CodecError, not the worker: `args` returns false and
-- why, and the error raised is marked as the decoder's.
local decode_errors = setmetatable({}, { __mode = "k" })
local function run(fn, self, ok, ...)
  if not ok then
    local e = errors.new("CodecError", ..., nil, false)
    decode_errors[e] = true
    error(e, 0)
  end
  return fn(self, ...)
end
local function apply(fn, self, ib, call)
  return run(fn, self, ib.args(call))
end

local function fail(ib, call, err)
  if ib.finish(call, FAILED, err) == nil then
    -- what it carries cannot travel: send its text instead
    err.cause, err.value = errors.safe_tostring(err.cause), nil
    ib.finish(call, FAILED, err)
  end
end

local function finish(srv, ib, call, method, tc, ok, ...)
  if tc then T.call_end(tc) end -- (tc: the call's trace record, when a trace runs)
  local exited = srv.exited
  if exited and exited(method) then return end
  if ok then
    local done, why = ib.finish(call, DONE, ...)
    if done == nil then fail(ib, call, errors.codec(why)) end
  else
    local err = ...
    if errors.is_error(err, "CancelledError") then
      ib.finish(call, CANCELLED)
    elseif decode_errors[err] then
      err.message = ("%s:%s: %s"):format(srv.name, method, err.message)
      fail(ib, call, err)
    else
      fail(ib, call, errors.worker_error(srv.name, method, err, sched.last_traceback()))
    end
  end
end

-- Run one call of `srv` on the task `me` (a runner; nil for a sync call):
-- wait for its inputs, start it, run its method, settle its future.
local function run_call(srv, call, me)
  local ib = srv.ib
  if ib.cancelling() then
    ib.finish(call, CANCELLED)
    return
  end
  local method, ninputs = ib.info(call)
  local err = ninputs > 0 and inputs(srv, ib, call, method) or nil
  if err == CANCEL then
    ib.finish(call, CANCELLED)
  elseif err then
    fail(ib, call, err)
  elseif not ib.start(call) then
    ib.finish(call) -- its caller cancelled it meanwhile
  else
    local fn = srv.class[method]
    if type(fn) ~= "function" then
      fail(ib, call, errors.worker_error(srv.name, method, "no method '" .. method .. "'"))
    elseif me then
      me._call, me._ib, me._method = call, ib, method
      local tc = T.on and T.call_begin(me, method, call, ib, ninputs)
      finish(srv, ib, call, method, tc, xpcall(apply, sched.on_error, fn, srv.self, ib, call))
      me._call, me._ib, me._method = nil, nil, nil
    else
      local tc = T.on and T.call_begin(sched.current(), method, call, ib, ninputs)
      finish(srv, ib, call, method, tc, xpcall(apply, sched.on_error, fn, srv.self, ib, call))
    end
    if srv.after_call then srv.after_call() end
  end
end

--- Run one call of `srv` on the task `me` (a runner; nil for a sync call,
-- which runs on its caller's task and leaves that task's call alone, so
-- that a cancel of the call the caller itself runs reaches its waits). A
-- failure outside the method (an argument that cannot be read) fails the
-- call, not the runner.
local function execute(srv, call, me)
  local ok, e = pcall(run_call, srv, call, me)
  if not ok then
    if me then me._call, me._ib, me._method, me._tcall = nil, nil, nil, nil end
    fail(srv.ib, call, errors.worker_error(srv.name, srv.ib.method_of(call), e))
  end
end
M.execute = execute

-- ======================================================================== --
-- Runners                                                                  --
-- ======================================================================== --

local Server = {}
Server.__index = Server

-- A runner: runs queued calls one after another until there are none.
local function runner(srv)
  local me = sched.current()
  srv.live[me] = true
  me._inst = srv.link -- (and so are the tasks its calls spawn: see Server:runs)
  while srv.crash == nil do
    if srv.head > srv.tail and srv:refill() == 0 then break end
    local call = srv.buf[srv.head]
    srv.buf[srv.head] = nil
    srv.head = srv.head + 1
    execute(srv, call, me)
  end
  srv.live[me] = nil
  srv.runners = srv.runners - 1
end

T.name_fn(runner, "runner")

--- Start runners for new calls, up to the limit (once `started`).
function Server:wake()
  if self.started and self.runners < self.limit and self.crash == nil then
    if self.head > self.tail then self:refill() end
    while self.runners < self.limit and self.head <= self.tail do
      self.runners = self.runners + 1
      task.spawn(runner, self)
    end
  end
end

--- Take calls into an empty buffer; returns how many.
function Server:refill()
  local n = self.ib.take(self.buf, self.batch, 0)
  self.head, self.tail = 1, n
  return n
end

--- Whether calls are taken and not yet run.
function Server:holds() return self.head <= self.tail end

--- The calls taken and not yet run, removed from the buffer (to cancel or
-- fail them).
function Server:drop_taken()
  local out = {}
  for i = self.head, self.tail do out[#out + 1] = self.buf[i] end
  self.buf, self.head, self.tail = {}, 1, 0
  return out
end

--- Cancel the runners' calls (each at its wait; a method that never waits
-- runs to its end).
function Server:cancel()
  for t in pairs(self.live) do t:cancel() end
end

--- Whether task `t` is the instance's own: a runner, its init, a task
-- running one of its sync calls, or a task they spawned. A task's `_inst`
-- is a chain of links `{srv =, up =}` (a sync call adds one while it runs;
-- a task inherits its spawner's, see corral.task).
function Server:runs(t) return t ~= nil and M.in_chain(t._inst, self) end

--- Whether the chain of links `x` holds server `srv`.
function M.in_chain(x, srv)
  while x do
    if x.srv == srv then return true end
    x = x.up
  end
  return false
end

--- A server: `name` (in errors), `class` (the methods), `self` (the
-- instance's state), `limit` (max_concurrency), `batch` (calls taken at
-- once), `ib` (the inbox, above). Fields a mode may set: `started` (calls
-- run once true), `crash`, `exited(method)` (true: the call's end is not to
-- be settled), `after_call()`.
function M.new(name, class, self, limit, batch, ib)
  local srv = setmetatable({ name = name, class = class, self = self, limit = limit, batch = batch,
    ib = ib, buf = {}, head = 1, tail = 0, runners = 0, live = {}, started = false }, Server)
  srv.link = { srv = srv }
  return srv
end

return M
