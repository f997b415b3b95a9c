--- Workers: classes of methods that run in their own context.
--
--     local Counter = corral.worker {
--       init = function(self, start) self.n = start or 0 end,
--       add  = function(self, k) self.n = self.n + k; return self.n end,
--     }
--     local w = Counter:init(10)     -- a thread worker
--     print(w:add(5):result())       --> 15
--
-- An instance is an actor: its calls start in the order they were made, and
-- its state (`self`) lives in its own context. A pool is N instances behind
-- one handle.
-- @module corral.worker
local core = require "corral.core"
local errors = require "corral.errors"
local sched = require "corral.sched"
local future = require "corral.future"
local task = require "corral.task"
local unwrap = require "corral.unwrap"
local F = require "corral.fields"

local S = F.S
local DONE = future.DONE
local select, type, pairs, ipairs, setmetatable, unpack = select, type, pairs, ipairs, setmetatable, unpack

local M = {}

-- ======================================================================== --
-- Options and defaults                                                     --
-- ======================================================================== --

local MODES = { thread = true, async = true, sync = true }
local BALANCE = { round_robin = true, least_active = true, random = true }
-- Bounds: every thread costs a Lua state and two file descriptors; an inbox
-- bound is a C int.
local MAX_WORKERS, MAX_QUEUED, MAX_CONCURRENCY = 1024, 2 ^ 31 - 1, 2 ^ 31 - 1
local RANGE = { workers = MAX_WORKERS, pool_size = MAX_WORKERS, max_queued = MAX_QUEUED,
  max_concurrency = MAX_CONCURRENCY }

local function whole(v, max)
  return type(v) == "number" and v >= 1 and v <= max and v == math.floor(v)
end

local settings = {
  mode = "thread", workers = 1, balance = "round_robin", max_queued = 256,
  max_concurrency = 1, blocking = false,
}

-- The size of the default pool: from CORRAL_WORKERS, else one per CPU.
local function pool_size()
  if settings.pool_size then return settings.pool_size end
  local env = os.getenv("CORRAL_WORKERS")
  if env == nil or env == "" then return core.ncpu() end
  local n = tonumber(env)
  if not whole(n, MAX_WORKERS) then
    errors.usage("corral", "the environment variable CORRAL_WORKERS must be a whole number from 1 to "
      .. "%d (got %q)", MAX_WORKERS, env)
  end
  return n
end

local function check_options(fname, o)
  errors.check(type(o) == "table", fname, "options", "a table", o)
  for k, v in pairs(o) do
    if k == "mode" then
      errors.check(MODES[v], fname, "mode", '"thread", "async" or "sync"', v)
    elseif k == "balance" then
      errors.check(BALANCE[v], fname, "balance", '"round_robin", "least_active" or "random"', v)
    elseif RANGE[k] then
      errors.check(whole(v, RANGE[k]), fname, k, ("a whole number from 1 to %d"):format(RANGE[k]), v)
    elseif k == "blocking" then
      errors.check(type(v) == "boolean", fname, k, "a boolean", v)
    elseif k == "name" then
      errors.check(type(v) == "string" and not v:find("%z"), fname, k, "a string (without NUL)", v)
    else
      errors.usage(fname, "unknown option '%s'", tostring(k))
    end
  end
end

local default_pool -- this context's handle on the default pool

--- Set process-wide defaults for worker options (`mode`, `workers`,
-- `balance`, `max_queued`, `max_concurrency`, `blocking`) and the size of
-- the default pool (`pool_size`, also from `CORRAL_WORKERS`). Workers
-- started afterwards take these settings. Returns the settings in force.
function M.config(t)
  if t ~= nil then
    check_options("corral.config", t)
    errors.check(t.name == nil, "corral.config", "name", "not set here (name each class)", t.name)
    if t.pool_size and (default_pool or core.pool_get()) and t.pool_size ~= pool_size() then
      errors.usage("corral.config", "the default pool already runs with %d workers: set pool_size "
        .. "before the first submit or map", pool_size())
    end
    for k, v in pairs(t) do settings[k] = v end
  end
  local copy = {}
  for k, v in pairs(settings) do copy[k] = v end
  copy.pool_size = pool_size()
  return copy
end

-- ======================================================================== --
-- Handles                                                                  --
-- ======================================================================== --

local Handle = { __worker = true }
local stubs = {} -- method name -> function(handle, ...)
-- What a handle answers itself: a class cannot declare methods with these
-- names (or names starting with "_").
local RESERVED = { stop = true, init = false }

-- A call to a stopped worker: a failed future (the caller sees the error
-- through it; unretrieved, it is reported like any other).
local function closed_future(h, method)
  local f = future.new()
  f:set_exception(errors.closed(h._name, method))
  return f
end

-- The futures of calls: tostring says "call". An async call's future knows
-- its task, so that cancelling the call stops it.
local CallFuture = {}
for k, v in pairs(future.Future) do CallFuture[k] = v end
CallFuture.__index = CallFuture
CallFuture._kind = "call"

function CallFuture:cancel()
  local t = self._task
  if t == nil then return future.Future.cancel(self) end
  if self[S] >= DONE then return false end
  future.settle(self, future.CANCELLED, 0, false, errors.cancelled())
  -- a task that has not started yet sees its call cancelled and skips it
  if t[S] == future.RUNNING then t:cancel() end
  return true
end

local wrap = future.wrap

-- A call's future, already watched by this loop under `key`.
local function call_future(c, key)
  return wrap(c, CallFuture, key)
end

local function pick(h)
  local insts = h._insts
  local n = #insts
  if n == 1 then return insts[1] end
  local b = h._balance
  if b == "round_robin" then
    local i = h._rr % n + 1
    h._rr = i
    return insts[i]
  elseif b == "random" then
    return insts[math.random(n)]
  end
  local best, load = insts[1], math.huge
  for i = 1, n do
    local inst = insts[i]
    local a = inst.ud and core.wactive(inst.ud) or inst.active
    if a < load then best, load = inst, a end
  end
  return best
end

-- ---- thread instances ------------------------------------------------------

local function thread_call(h, inst, method, ...)
  local c, why, rc, accepted, key = core.wcall(inst.ud, method, ...)
  if c then return call_future(c, why) end
  if why == "codec" then error(errors.codec(rc, 4), 4) end
  local f = call_future(rc, key)
  if why == "full" then
    -- the worker holds the call, in order; this task waits until it moves
    -- into the inbox (backpressure). A stop drains or cancels it as any.
    local a = wrap(accepted)
    local ok, e = pcall(a.result, a)
    if not ok then
      -- cancelled while waiting for room: the call never runs
      core.fcancel(rc)
      error(e, 0)
    end
  elseif why == "closed" then
    core.fsettle_encode(rc, future.FAILED, errors.closed(h._name, method))
  end
  return f -- "crashed": failed with the worker's crash already
end

-- ---- async and sync instances (in the caller's context) ----------------------

local function init_failed(h, e)
  return errors.crashed(h._name, "its init failed: " .. errors.safe_tostring(e), e, nil, "init")
end

-- Run one call inline (sync) or in its task (async): wait for its inputs,
-- run the method, settle its future (unless cancelled meanwhile).
local function run_local(h, inst, method, f, args)
  local ok, resolved, err, input = pcall(unwrap.resolve, args, args.n)
  if not ok then -- this task was cancelled while waiting for the inputs
    future.settle(f, future.CANCELLED, 0, false, errors.cancelled())
    return
  end
  if not resolved then
    if errors.is_error(err, "CancelledError") then
      future.settle(f, future.CANCELLED, 0, false, err)
    else
      future.settle(f, future.FAILED, 0, false, errors.dependency(h._name, method, input, err))
    end
    return
  end
  local fn = h._class[method]
  if type(fn) ~= "function" then
    future.settle(f, future.FAILED, 0, false, errors.worker_error(h._name, method,
      "no method '" .. method .. "'"))
    return
  end
  if f[S] < DONE then f[S] = future.RUNNING end
  local function finish(done, ...)
    if f[S] >= DONE then return end -- cancelled while it ran
    if done then
      local n = select("#", ...)
      if n == 1 then
        future.settle(f, DONE, 1, (...))
      else
        future.settle(f, DONE, n, n > 1 and { n = n, ... } or false)
      end
    else
      local e = ...
      if errors.is_error(e, "CancelledError") then
        future.settle(f, future.CANCELLED, 0, false, e)
      else
        future.settle(f, future.FAILED, 0, false, errors.worker_error(h._name, method, e,
          sched.last_traceback()))
      end
    end
  end
  finish(xpcall(fn, sched.on_error, inst.self, unpack(resolved, 1, resolved.n)))
end

local pump_async

local function async_run(h, inst, item)
  local f = item.f
  if f[S] < DONE then
    local ie
    if inst.init then
      local ok, e = pcall(inst.init.exception, inst.init)
      ie = ok and e or nil
      if not ok then future.settle(f, future.CANCELLED, 0, false, errors.cancelled()) end
    end
    if ie ~= nil then
      future.settle(f, future.FAILED, 0, false, init_failed(h, ie))
    elseif f[S] < DONE then
      run_local(h, inst, item.method, f, item.args)
    end
  end
  f._task = nil
  inst.tasks[item] = nil
  inst.active = inst.active - 1
  inst.running = inst.running - 1
  pump_async(h, inst)
end

pump_async = function(h, inst)
  while inst.running < h._max_concurrency and inst.head <= inst.tail do
    local item = inst.queue[inst.head]
    inst.queue[inst.head] = nil
    inst.head = inst.head + 1
    if item.f[S] >= DONE then -- cancelled while it was queued
      inst.active = inst.active - 1
    else
      inst.running = inst.running + 1
      local t = task.spawn(async_run, h, inst, item)
      item.f._task = t
      inst.tasks[item] = t
    end
  end
  if inst.space and inst.tail - inst.head + 1 < h._max_queued then
    local sp = inst.space
    inst.space = nil
    sp:set_result()
  end
  if inst.active == 0 and inst.idle then
    local idle = inst.idle
    inst.idle = nil
    idle:set_result()
  end
end

local function async_call(h, inst, method, ...)
  while inst.tail - inst.head + 1 >= h._max_queued do
    inst.space = inst.space or future.new()
    inst.space:result()
    if h._stopped then return closed_future(h, method) end
  end
  local f = future.new(nil, CallFuture)
  inst.tail = inst.tail + 1
  inst.queue[inst.tail] = { method = method, f = f, args = { n = select("#", ...), ... } }
  inst.active = inst.active + 1
  pump_async(h, inst)
  return f
end

local function sync_call(h, inst, method, ...)
  local f = future.new(nil, CallFuture)
  if inst.init_err ~= nil then
    future.settle(f, future.FAILED, 0, false, init_failed(h, inst.init_err))
    return f
  end
  run_local(h, inst, method, f, { n = select("#", ...), ... })
  return f
end

-- ---- calls -------------------------------------------------------------------

local function call(h, method, ...)
  local f
  if h._stopped then
    f = closed_future(h, method)
  elseif h._mode == "thread" then
    f = thread_call(h, pick(h), method, ...)
  elseif h._mode == "async" then
    f = async_call(h, pick(h), method, ...)
  else
    f = sync_call(h, pick(h), method, ...)
  end
  if h._blocking then return f:result() end
  return f
end

Handle.__index = function(h, k)
  local m = Handle[k]
  if m ~= nil then return m end
  if type(k) ~= "string" or k:sub(1, 1) == "_" then return nil end
  local stub = stubs[k]
  if not stub then
    local fname = "worker:" .. k
    stub = function(self, ...)
      if getmetatable(self) ~= Handle then
        errors.check(false, fname, "self", "a worker (call it with ':')", self)
      end
      return call(self, k, ...)
    end
    stubs[k] = stub
  end
  rawset(h, k, stub) -- found directly next time
  return stub
end

function Handle:__tostring()
  return ("corral.worker(%s, %s, %d instance%s%s)"):format(self._name, self._mode, #self._insts,
    #self._insts == 1 and "" or "s", self._stopped and ", stopped" or "")
end

local STOP_OPTIONS = { timeout = true, drain = true }

--- Stop the worker. By default (`drain=true`) it finishes what is queued,
-- then stops; `drain=false` cancels the queued calls and the running ones
-- that are waiting (they get `CancelledError` where they wait). Calls made
-- after stop fail with `ClosedError`. Waits up to `timeout` seconds (forever
-- by default) for the instances to end: returns true when they have, false
-- when the time ran out (they go on stopping in the background). Called
-- from one of the worker's own methods, it does not wait for that instance
-- (it stops once the call is done) and returns false.
-- @tab[opt] opts `timeout`, `drain`
function Handle:stop(opts)
  opts = opts or {}
  errors.check(type(opts) == "table", "worker:stop", "opts", "a table", opts)
  errors.check_options("worker:stop", opts, STOP_OPTIONS)
  future.check_timeout("worker:stop", opts.timeout)
  local drain = opts.drain ~= false
  local wait = require("corral.wait").wait
  self._stopped = true
  if self._mode ~= "thread" then
    -- called from one of its own calls: that instance is not waited for
    local me, itself = sched.current(), false
    local idle = {}
    for _, inst in ipairs(self._insts) do
      if self._mode == "async" then
        if not drain then
          for i = inst.head, inst.tail do
            local item = inst.queue[i]
            if item then item.f:cancel() end
          end
          for item in pairs(inst.tasks) do item.f:cancel() end
        end
        if inst.space then
          local sp = inst.space
          inst.space = nil
          sp:set_result()
        end
        pump_async(self, inst)
        local inside = false
        for _, t in pairs(inst.tasks) do inside = inside or t == me end
        if inside then
          itself = true
        elseif inst.active > 0 then
          inst.idle = inst.idle or future.new()
          idle[#idle + 1] = inst.idle
        end
      end
    end
    local _, not_done = wait(idle, { timeout = opts.timeout })
    return #not_done == 0 and not itself
  end
  -- a worker stopping itself (from one of its methods) stops once that
  -- call is done: it cannot wait for that here, so it returns false
  local stopped, others, itself = {}, {}, false
  for _, inst in ipairs(self._insts) do
    local f = wrap(core.wstop(inst.ud, drain))
    if core.wis_self(inst.ud) then
      itself = true
    else
      stopped[#stopped + 1], others[#others + 1] = f, inst
    end
  end
  local _, not_done = wait(stopped, { timeout = opts.timeout })
  if #not_done > 0 then return false end
  for _, inst in ipairs(others) do core.wjoin(inst.ud) end
  return not itself
end

--- Rebuild a thread worker handle sent from another context: the options
-- and the instances' userdata, made by the codec from their handles. (What
-- the codec sends of a handle is its C half, `_c`.)
function M.import(opts, ...)
  local insts = {}
  for i = 1, select("#", ...) do insts[i] = { ud = (select(i, ...)) } end
  local balance, blocking = opts.balance or "round_robin", opts.blocking or false
  return setmetatable({ _name = opts.name, _mode = "thread", _balance = balance,
    _blocking = blocking, _insts = insts, _rr = 0,
    _c = core.handle_new(opts.name, balance, blocking, ...) }, Handle)
end

--- Whether v is a worker handle.
function M.is_worker(v) return getmetatable(v) == Handle end

-- ======================================================================== --
-- Classes                                                                  --
-- ======================================================================== --

local Class = {}
Class.__index = Class

local class_count = 0

--- Declare a worker class: every function in `def` is a method that runs in
-- the worker's context with `self` holding the instance's state; `init`,
-- when present, runs first with the arguments of `Class:init(...)`. Method
-- names are strings without NUL, not starting with "_", and not `stop`
-- (the handle's own).
-- @tab def the methods
-- @return the class
function M.worker(def)
  errors.check(type(def) == "table", "corral.worker", "def", "a table of methods", def)
  local methods = {}
  for k, v in pairs(def) do
    errors.check(type(k) == "string", "corral.worker", "def", "a table with string keys", k)
    if RESERVED[k] or k:sub(1, 1) == "_" or k:find("%z") then
      errors.usage("corral.worker", "a method cannot be named %q: names starting with '_', "
        .. "holding NUL, and 'stop' belong to the worker handle", k)
    end
    errors.check(type(v) == "function", "corral.worker", "def." .. k, "a function", v)
    methods[k] = v
  end
  class_count = class_count + 1
  return setmetatable({ _methods = methods, _options = { name = "worker" .. class_count } }, Class)
end

--- A class with other options: `mode`, `workers`, `balance`, `max_queued`,
-- `max_concurrency`, `blocking`, `name`.
function Class:options(o)
  check_options("Class:options", o)
  local opts = {}
  for k, v in pairs(self._options) do opts[k] = v end
  for k, v in pairs(o) do opts[k] = v end
  return setmetatable({ _methods = self._methods, _options = opts }, Class)
end

local function opt(o, k)
  if o[k] ~= nil then return o[k] end
  return settings[k]
end

--- Start an instance (or a pool of `workers` instances) with `init(...)`.
-- A thread that cannot start raises `WorkerCrashed` saying why (the
-- instances already started are stopped).
-- @return a worker handle whose methods return futures
function Class:init(...)
  local o = self._options
  local mode, n = opt(o, "mode"), opt(o, "workers")
  local h = setmetatable({ _name = o.name, _mode = mode, _balance = opt(o, "balance"),
    _blocking = opt(o, "blocking"), _max_queued = opt(o, "max_queued"),
    _max_concurrency = opt(o, "max_concurrency"), _class = self._methods, _insts = {}, _rr = 0 }, Handle)
  for i = 1, n do
    local inst
    local name = n > 1 and ("%s#%d"):format(o.name, i) or o.name
    if mode == "thread" then
      local boot = { max_concurrency = h._max_concurrency, max_queued = h._max_queued,
        settings = settings }
      local ud, why = core.worker_start(name, h._max_queued, self._methods, boot, ...)
      if not ud then
        h:stop { drain = false }
        if why:find("^cannot start a thread") then
          error(errors.crashed(name, why), 2)
        end
        error(errors.codec(why, 2), 2)
      end
      inst = { ud = ud }
    elseif mode == "async" then
      inst = { self = {}, queue = {}, head = 1, tail = 0, running = 0, active = 0, tasks = {} }
      if self._methods.init then inst.init = task.spawn(self._methods.init, inst.self, ...) end
    else
      inst = { self = {}, active = 0 }
      if self._methods.init then
        local ok, e = xpcall(self._methods.init, sched.on_error, inst.self, ...)
        if not ok then inst.init_err = errors.raised(e, sched.last_traceback()) end
      end
    end
    h._insts[i] = inst
  end
  if mode == "thread" then
    local uds = {}
    for i, inst in ipairs(h._insts) do uds[i] = inst.ud end
    h._c = core.handle_new(h._name, h._balance, h._blocking, unpack(uds))
  end
  return h
end

-- ======================================================================== --
-- submit and map                                                           --
-- ======================================================================== --

local Runner = M.worker { call = function(_, fn, ...) return fn(...) end }

-- The default pool is one per process: the first context that needs it
-- starts it and leaves it with the runtime, where the others find it.
local function the_pool()
  if default_pool then return default_pool end
  local got = { core.pool_get() }
  if #got == 0 then
    local p = Runner:options { name = "pool", workers = pool_size() }:init()
    local uds = {}
    for i, inst in ipairs(p._insts) do uds[i] = inst.ud end
    if core.pool_set(unpack(uds)) then
      default_pool = p
      return p
    end
    p:stop { drain = false } -- another context was first
    got = { core.pool_get() }
  end
  default_pool = M.import({ name = "pool" }, unpack(got))
  default_pool._max_concurrency = 1
  return default_pool
end

local function pool_for(opts)
  if opts and (opts.workers or opts.mode) then
    return Runner:options { name = "map", workers = opts.workers or pool_size(),
      mode = opts.mode or "thread" }:init(), true
  end
  return the_pool(), false
end

--- Run `fn(...)` on the default pool of thread workers (one per CPU, started
-- on first use); returns its future. `fn` travels as bytecode with its
-- upvalues.
function M.submit(fn, ...)
  errors.check(type(fn) == "function", "corral.submit", "fn", "a function", fn)
  return (pool_for(nil)):call(fn, ...)
end

local MAP_OPTIONS = { workers = true, mode = true, ordered = true, iter = true, progress = true }

--- Apply `fn` to every item on a pool, with at most max(4, 2 x instances x
-- max_concurrency) calls in flight. Returns the results in input order, or
-- with `iter=true` an iterator of `index, result` (in input order, or in
-- completion order with `ordered=false`).
-- @func fn the function, applied to each item
-- @tab items an array
-- @tab[opt] opts `workers`, `mode`, `ordered` (true), `iter`, `progress`
function M.map(fn, items, opts)
  opts = opts or {}
  errors.check(type(fn) == "function", "corral.map", "fn", "a function", fn)
  errors.check(type(items) == "table", "corral.map", "items", "an array", items)
  errors.check(type(opts) == "table", "corral.map", "opts", "a table", opts)
  errors.check_options("corral.map", opts, MAP_OPTIONS)
  if opts.workers ~= nil then
    errors.check(whole(opts.workers, MAX_WORKERS), "corral.map", "workers",
      ("a whole number from 1 to %d"):format(MAX_WORKERS), opts.workers)
  end
  if opts.mode ~= nil then
    errors.check(MODES[opts.mode], "corral.map", "mode", '"thread", "async" or "sync"', opts.mode)
  end
  local pool, own = pool_for(opts)
  local n = #items
  local bound = math.max(4, 2 * #pool._insts * (pool._max_concurrency or 1))
  local ordered = opts.ordered ~= false
  local prog = require("corral.progress").new(opts.progress, n)
  local fs, next_submit, next_out, inflight = {}, 1, 1, 0
  local pending = {} -- in flight, for completion order
  local wait = require("corral.wait").wait

  local function top_up()
    while next_submit <= n and inflight < bound do
      local f = pool:call(fn, items[next_submit])
      fs[next_submit] = f
      pending[f] = next_submit
      inflight = inflight + 1
      next_submit = next_submit + 1
    end
  end

  local function take(i)
    local f = fs[i]
    fs[i] = nil
    pending[f] = nil
    inflight = inflight - 1
    if prog then prog:tick(f[S] ~= DONE) end
    if next_out > n and prog then prog:finish() end
    if own and next_submit > n and inflight == 0 then pool:stop() end
    return i, f:result()
  end

  local function step()
    if next_out > n then return nil end
    top_up()
    if ordered then
      local f = fs[next_out]
      if f[S] < DONE then wait({ f }) end
      next_out = next_out + 1
      return take(next_out - 1)
    end
    local list = {}
    for f in pairs(pending) do list[#list + 1] = f end
    local done = wait(list, { return_when = "FIRST_COMPLETED" })
    next_out = next_out + 1
    return take(pending[done[1]])
  end

  if opts.iter then return step end
  local out = {}
  for i, v in step do out[i] = v end
  return out
end


return M
