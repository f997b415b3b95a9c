--- Worker handles: method stubs, balancing, the thread mode's calls, stop,
-- and handles rebuilt in another context.
-- @module corral.worker_handle
-- (the require corral was loaded with: a script may replace the global)
local require = require
local core = require "corral.core"
local errors = require "corral.errors"
local future = require "corral.future"
local calls = require "corral.worker_call"
local loc = require "corral.worker_local"
local T = require "corral.trace"

local wrap = future.wrap
local now, S, DONE = core.now, require("corral.fields").S, future.DONE
local closed_future, call_future = calls.closed_future, calls.call_future
local select, type, ipairs, setmetatable = select, type, ipairs, setmetatable

local M = {}

local Handle = { __worker = true }
local stubs = {} -- method name -> function(handle, ...)
-- What a handle answers itself: a class cannot declare methods with these
-- names (or names starting with "_").
local RESERVED = { stop = true, init = false }

-- (an instance dead for good, a process worker past its restarts, takes
-- no call while another instance can)
local function dead(inst)
  return inst.ud ~= nil and core.wactive(inst.ud) >= 1e300
end

local function pick(h)
  local insts = h._insts
  local n = #insts
  if n == 1 then return insts[1] end
  local b = h._balance
  if b == "round_robin" or b == "random" then
    local i = b == "random" and math.random(n) or h._rr % n + 1
    for _ = 1, n do
      if not dead(insts[i]) then break end
      i = i % n + 1
    end
    h._rr = i
    return insts[i]
  end
  local best, load = insts[1], math.huge
  for i = 1, n do
    local inst = insts[i]
    -- (an async or sync instance whose init failed takes no call)
    local a = inst.ud and core.wactive(inst.ud) or (inst.crash and math.huge) or inst.active
    if a < load then best, load = inst, a end
  end
  return best
end

-- ---- calls -------------------------------------------------------------------

-- A call to a thread instance: encoded once and pushed on its C inbox.
-- Returns its future, and a future to wait on when the inbox was full.
local function thread_push(h, inst, method, ...)
  local c, why, rc, accepted, key = core.wcall(inst.ud, method, ...)
  if c then
    local f = call_future(c, why)
    return f
  end
  if why == "codec" then error(errors.codec(rc, 4), 4) end
  local f = call_future(rc, key)
  if why == "full" then return f, wrap(accepted) end
  if why == "closed" then core.fsettle_encode(rc, future.FAILED, errors.closed(h._name, method)) end
  return f -- "crashed": failed with the worker's crash already
end

-- (a process instance has the same C inbox: its proxy takes from it)
local push = { thread = thread_push, process = thread_push, async = loc.async_call,
  sync = loc.sync_call, remote = function(...) return require("corral.remote").push(...) end }

local function plain(h, method, ...)
  local f
  if h._stopped then
    f = closed_future(h, method)
  else
    local room
    local ts = T.on and T.now()
    f, room = push[h._mode](h, pick(h), method, ...)
    if ts then T.sent(method, f, ts, h._mode) end
    local limit = h._timeout
    local t0 = limit and room and now()
    if limit and h._mode ~= "sync" then calls.arm(f, limit, h._name, method) end
    if room then
      -- the instance holds the call, in order; this task waits until it
      -- moves into the inbox (backpressure), at most until the call's time
      -- limit (the call has then failed: its future says so). A stop
      -- drains or cancels it as any other.
      local ok, e = pcall(room.result, room, limit and math.max(0, t0 + limit - now()) or nil)
      if not ok then
        if limit and errors.is_error(e, "TimeoutError") and room[S] < DONE then
          calls.expire(f)
          return f
        end
        f:cancel() -- cancelled while waiting for room: the call never runs
        error(e, 0)
      end
    end
  end
  return f
end

local function call(h, method, ...)
  local f
  if h._policy and not h._stopped then
    f = require("corral.worker_policy").call(h, plain, method, ...)
  else
    f = plain(h, method, ...)
  end
  if h._blocking then return f:result() end
  return f
end

-- The stub of method k: made once per name (a closure: kept out of
-- __index, so that a lookup that misses can still be compiled).
local function make_stub(k)
  local fname = "worker:" .. k
  local stub = function(self, ...)
    if getmetatable(self) ~= Handle then
      errors.check(false, fname, "self", "a worker (call it with ':')", self)
    end
    return call(self, k, ...)
  end
  stubs[k] = stub
  return stub
end

Handle.__index = function(h, k)
  local m = Handle[k]
  if m ~= nil then return m end
  if type(k) ~= "string" or k:sub(1, 1) == "_" then return nil end
  local stub = stubs[k] or make_stub(k)
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
  -- a worker stopping itself (from one of its methods) stops once that
  -- call is done: it cannot wait for that here, so it returns false
  local stopped, others, itself = {}, {}, false
  for _, inst in ipairs(self._insts) do
    local f, inside
    if inst.ud then
      f, inside = wrap(core.wstop(inst.ud, drain)), core.wis_self(inst.ud)
    elseif inst.remote then
      f = require("corral.remote").stop(self, inst, drain)
    else
      f, inside = loc.stop(self, inst, drain)
    end
    if inside then
      itself = true
    elseif f then
      stopped[#stopped + 1], others[#others + 1] = f, inst
    end
  end
  local _, not_done = wait(stopped, { timeout = opts.timeout })
  if #not_done > 0 then return false end
  for _, inst in ipairs(others) do
    if inst.ud then core.wjoin(inst.ud) end
  end
  return not itself
end

--- Rebuild a thread worker handle sent from another context: the options
-- and the instances' userdata, made by the codec from their handles. (What
-- the codec sends of a handle is its C half, `_c`.)
function M.import(opts, ...)
  local insts = {}
  for i = 1, select("#", ...) do insts[i] = { ud = (select(i, ...)) } end
  local balance, blocking = opts.balance or "round_robin", opts.blocking or false
  local timeout = type(opts.timeout) == "number" and opts.timeout > 0 and opts.timeout or false
  return setmetatable({ _name = opts.name, _mode = "thread", _balance = balance,
    _blocking = blocking, _timeout = timeout, _insts = insts, _rr = 0, _stopped = false,
    _c = core.handle_new(opts.name, balance, blocking, timeout or 0, ...) }, Handle)
end

--- Whether v is a worker handle.
function M.is_worker(v) return getmetatable(v) == Handle end

M.Handle, M.RESERVED = Handle, RESERVED
return M
