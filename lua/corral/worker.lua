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
-- (the require corral was loaded with: a script may replace the global)
local require = require
local core = require "corral.core"
local errors = require "corral.errors"
local future = require "corral.future"
local loc = require "corral.worker_local"
local options = require "corral.worker_options"
local handles = require "corral.worker_handle"
local S = require("corral.fields").S

local DONE = future.DONE
local Handle, RESERVED = handles.Handle, handles.RESERVED
local settings, pool_size = options.settings, options.pool_size
local check_options = options.check
local type, pairs, ipairs, setmetatable, unpack = type, pairs, ipairs, setmetatable, unpack

local M = {}

--- Set or read the process-wide worker defaults; see `corral.worker_options`.
M.config = options.config
--- Rebuild a thread worker handle sent from another context.
M.import = handles.import
--- Whether v is a worker handle.
M.is_worker = handles.is_worker

local default_pool -- this context's handle on the default pool

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
-- `max_concurrency`, `blocking`, `name`; for process workers only (a
-- thread worker ignores them) `restart`
-- (start another process when one dies: default true for a pool),
-- `restart_limit` (5), `restart_backoff` (0.1 s, doubling) and `retries`
-- (how many times a call whose process died is run again: 0).
function Class:options(o)
  check_options("Class:options", o)
  local opts = {}
  for k, v in pairs(self._options) do opts[k] = v end
  for k, v in pairs(o) do opts[k] = v end
  return setmetatable({ _methods = self._methods, _options = opts }, Class)
end

-- The C instances of a thread worker handle.
local function instance_uds(h)
  local uds = {}
  for i, inst in ipairs(h._insts) do uds[i] = inst.ud end
  return uds
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
    _max_concurrency = opt(o, "max_concurrency"), _timeout = opt(o, "timeout") or false,
    _class = self._methods, _insts = {}, _rr = 0, _stopped = false }, Handle)
  if o.retry ~= nil or o.limits ~= nil then
    h._policy = require("corral.worker_policy").normalize("Class:init", o.retry, o.limits)
  end
  if mode == "remote" then
    -- (its instances are on other machines: corral.remote)
    h._max_concurrency = 1
    return require("corral.remote").init(h, o, ...)
  end
  for i = 1, n do
    local inst
    local name = n > 1 and ("%s#%d"):format(o.name, i) or o.name
    if mode == "thread" or mode == "process" then
      -- (the worker's state finds modules where this one does, then runs
      -- `setup` before init)
      local boot = { max_concurrency = h._max_concurrency, max_queued = h._max_queued,
        settings = settings, path = package.path, cpath = package.cpath, setup = o.setup,
        -- (a child process cannot call the host's C functions: it says so)
        host_fns = mode == "process" and core.host_names() or nil }
      local process = mode == "process" and h._max_concurrency or 0
      local ud, why = core.worker_start(name, h._max_queued, process, self._methods, boot, ...)
      if not ud then
        h:stop { drain = false }
        if why:find("^cannot start a thread") then
          error(errors.crashed(name, why), 2)
        end
        error(errors.codec(why, 2), 2)
      end
      inst = { ud = ud }
      if process > 0 then
        -- when its process dies: a pool replaces it, a single instance only
        -- with restart = true; the calls it had run again up to `retries`
        local again = o.restart
        if again == nil then again = settings.restart end
        if again == nil then again = n > 1 end
        core.process_policy(ud, again and (opt(o, "restart_limit") or 5) or 0,
          opt(o, "restart_backoff") or 0.1, opt(o, "retries") or 0, opt(o, "cancel_grace") or 1)
      end
    else
      if i == 1 and o.setup then o.setup() end -- (one state: it runs once)
      inst = loc.new(h, name, mode == "async", ...)
    end
    h._insts[i] = inst
  end
  if mode == "thread" or mode == "process" then
    h._c = core.handle_new(h._name, h._balance, h._blocking, h._timeout or 0,
      unpack(instance_uds(h)))
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
    -- (its calls give futures whatever the settings say: blocking = false)
    local p = Runner:options { name = "pool", workers = pool_size(), blocking = false }:init()
    if core.pool_set(unpack(instance_uds(p))) then
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
      mode = opts.mode or "thread", blocking = false }:init(), true
  end
  return the_pool(), false
end
M.pool_for = pool_for

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
  check_options("corral.map", { workers = opts.workers, mode = opts.mode })
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
  -- a pool of its own is stopped however this ends (with no items, or
  -- with the first failure, which cancels the calls still queued)
  local ok, e = pcall(function()
    for i, v in step do out[i] = v end
  end)
  if own and not pool._stopped then pool:stop { drain = ok } end
  if not ok then error(e, 0) end
  return out
end



return M
