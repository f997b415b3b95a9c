--- Async and sync worker instances: they live in the caller's context (an
-- async instance's calls run on its runner tasks there, a sync call runs
-- inline). Their calls are served by `corral.worker_serve`, as a thread
-- worker's are; only the inbox differs: a Lua queue of calls whose
-- arguments are the caller's own values (nothing is copied), bounded by
-- `max_queued` as a thread worker's inbox is.
-- @module corral.worker_local
local errors = require "corral.errors"
local sched = require "corral.sched"
local future = require "corral.future"
local task = require "corral.task"
local unwrap = require "corral.unwrap"
local serving = require "corral.worker_serve"
local calls = require "corral.worker_call"
local F = require "corral.fields"
local S, CO = F.S, F.CO

local DONE, FAILED, CANCELLED, RUNNING = future.DONE, future.FAILED, future.CANCELLED, future.RUNNING
local settle, settle_values = future.settle, future.settle_values
local CallFuture = calls.CallFuture
local select, ipairs = select, ipairs

local M = {}

-- ======================================================================== --
-- The inbox                                                                --
-- ======================================================================== --

-- A call is a table: `method`, `args` (with `n`), `f` (its future, whose
-- `_item` is the call), `inst`; `deps` once its inputs are found; `room`
-- while its caller waits for room; `runner` and `suspended` while it runs.

-- The instance is idle: its calls are done and its init has ended.
local function check_idle(inst)
  if inst.active == 0 and inst.idle and not (inst.init and not inst.init:done()) then
    local idle = inst.idle
    inst.idle = nil
    idle:set_result()
  end
end

-- The call leaves the instance (done, failed, cancelled or dropped).
local function release(call)
  local inst = call.inst
  if not inst then return end
  call.inst = false -- (released)
  inst.active = inst.active - 1
  check_idle(inst)
end

-- The instance's crash is carried by a call: the init's own failure is no
-- longer reported by itself (the call's is).
local function carry(inst)
  local f = inst.init_failure
  if f then
    inst.init_failure = nil
    future.retrieve(f)
  end
end

local function finish(call, state, ...)
  local f = call.f
  if state ~= nil and f[S] < DONE then
    if state == DONE then
      settle_values(f, ...)
    elseif state == FAILED then
      settle(f, FAILED, 0, false, (...))
    else
      settle(f, CANCELLED, 0, false, errors.cancelled())
    end
  end
  release(call)
  return true
end

-- What every local instance's inbox does with a call.
local per_call = {
  method_of = function(call) return call.method end,
  info = function(call)
    call.deps = unwrap.inputs(call.args, call.args.n)
    return call.method, #call.deps
  end,
  deps = function(call) return call.deps end,
  own = function(call) return call.f end,
  start = function(call)
    local f = call.f
    if f[S] >= DONE then return false end
    f[S] = RUNNING
    return true
  end,
  args = function(call)
    local a = call.args
    call.args = nil -- the call keeps nothing it does not need
    if #call.deps == 0 then return true, unpack(a, 1, a.n) end
    return true, unwrap.values(a, a.n)
  end,
  finish = finish,
  suspend = function(call)
    if call.f[S] >= DONE then return false end
    call.suspended = true
    return true
  end,
  resume = function(call)
    call.suspended = false
    return call.f[S] < DONE
  end,
  watch = function(t, call) call.runner = t end,
}

-- The caller of `call`, if it waits for room, goes on.
local function let_go(call)
  local room = call.room
  if room then
    call.room = nil
    room:set_result()
  end
end

-- Grant room to the callers whose calls are now within the first
-- `max_queued` of the queue.
local function grant(inst)
  local q, last = inst.queue, math.min(inst.qtail, inst.qhead + inst.max_queued - 1)
  for i = inst.granted, last do let_go(q[i]) end
  if last + 1 > inst.granted then inst.granted = last + 1 end
end

local function inbox(inst)
  local ib = { cancelling = function() return inst.cancelling end }
  for k, v in pairs(per_call) do ib[k] = v end
  ib.take = function(buf, n, at)
    local q, k = inst.queue, 0
    while k < n and inst.qhead <= inst.qtail do
      k = k + 1
      buf[at + k] = q[inst.qhead]
      q[inst.qhead] = nil
      inst.qhead = inst.qhead + 1
    end
    if inst.granted < inst.qhead then inst.granted = inst.qhead end
    grant(inst)
    return k
  end
  return ib
end

-- Every call the instance holds and has not started: failed with `err`, or
-- cancelled; their callers waiting for room go.
local function drop_all(inst, err)
  local q = inst.queue
  local list = inst.srv:drop_taken()
  for i = inst.qhead, inst.qtail do list[#list + 1] = q[i] end
  inst.queue, inst.qhead, inst.qtail, inst.granted = {}, 1, 0, 1
  if err and #list > 0 then carry(inst) end
  for _, call in ipairs(list) do
    let_go(call)
    if err then finish(call, FAILED, err) else finish(call, CANCELLED) end
  end
end

-- ======================================================================== --
-- Sync calls: on their caller's task                                       --
-- ======================================================================== --

-- The task a sync call (or init) runs on: the caller's (nil outside any
-- task, or in a coroutine of the code's own).
local function caller()
  local me = sched.current()
  if me and me[CO] ~= coroutine.running() then return nil end
  return me
end

-- The link that makes the caller the instance's own (for `stop`) while it
-- runs the instance's code, on top of the caller's own chain `up`.
local function link_on(srv, up)
  if up == nil then return srv.link end
  if serving.in_chain(up, srv) then return up end -- (already there: the chain stays bounded)
  return { srv = srv, up = up }
end

-- Run fn(...) (which returns two values and does not raise) as the
-- instance's own code on the caller's task `me` (nil: outside any task).
-- Returns fn's values, and whether a cancel of the caller was taken
-- meanwhile: of the task (counted, or asked before), or of the call that
-- task runs (cancelled during it).
local function inline(inst, me, fn, ...)
  local srv = inst.srv
  if not me then
    local up = task.outside
    task.outside, inst.outside = link_on(srv, up), inst.outside + 1
    local a, b = fn(...)
    task.outside, inst.outside = up, inst.outside - 1
    return a, b, false
  end
  local up, n0, pending, c0, cc0 = me._inst, me._ncancel or 0, me._cancel_req, me._call,
    me._call_cancelled
  me._inst = link_on(srv, up)
  local a, b = fn(...)
  me._inst = up
  local taken = (me._ncancel or 0) ~= n0 or pending
    or (c0 ~= nil and me._call_cancelled == c0 and cc0 ~= c0)
  return a, b, taken
end

-- ======================================================================== --
-- Instances                                                                --
-- ======================================================================== --

--- A new async (`async` true) or sync instance of handle `h`, named `name`:
-- `init(...)` runs first (as a task of its own for an async instance, and
-- no call starts before it has ended; inline for a sync one). When it
-- fails, every call fails with `WorkerCrashed`; its error is reported as
-- unretrieved only when no call carries it.
function M.new(h, name, async, ...)
  task.track_instances()
  local inst = { self = {}, active = 0, queue = {}, qhead = 1, qtail = 0, granted = 1,
    max_queued = h._max_queued, cancelling = false, stopping = false, inline = {}, ninline = 0,
    outside = 0 }
  local srv = serving.new(name, h._class, inst.self, h._max_concurrency or 1,
    math.min(64, h._max_queued), inbox(inst))
  inst.srv = srv
  local init = h._class.init
  if not init then
    srv.started = true
    return inst
  end
  if not async then
    local ok, e, taken = inline(inst, caller(), xpcall, init, sched.on_error, inst.self, ...)
    if not ok and taken and errors.is_error(e, "CancelledError") then
      error(e, 0) -- the creator's task was cancelled: init took it at a wait
    end
    srv.started = true
    if not ok then
      local f = future.new()
      settle(f, FAILED, 0, false, e, sched.last_traceback())
      inst.init_failure = f
      inst.crash = errors.init_failed(name, f._e)
    end
    return inst
  end
  local t = task.spawn(init, inst.self, ...)
  t._inst, t._where = srv.link, "init"
  inst.init = t
  future.add_waiter(t, function()
    local st = t[S]
    if st == DONE then
      srv.started = true
      srv:wake()
    elseif st == CANCELLED and inst.init_stopped then
      drop_all(inst) -- stopped while init ran
    else
      -- (a CancelledError init raised by itself, with no stop asked, is a
      -- failure like any; the task's own report stands until a call
      -- carries it)
      inst.init_failure = t
      inst.crash = errors.init_failed(name, t._e or errors.cancelled())
      drop_all(inst, inst.crash)
    end
    check_idle(inst)
  end)
  return inst
end

-- A call's future; failed with the instance's crash (and true) when its
-- init failed.
local function call_future(inst)
  local f = future.new(nil, CallFuture)
  if not inst.crash then return f, false end
  carry(inst)
  settle(f, FAILED, 0, false, inst.crash)
  return f, true
end

--- Call `method` on an async instance: the call joins its queue. Returns
-- its future, and when the queue is full a future to wait on for room (the
-- call is the instance's from now on: a stop drains or cancels it like any
-- other).
function M.async_call(h, inst, method, ...)
  local f, crashed = call_future(inst)
  if crashed then return f end
  -- (every field it will have, made at once: a table that grows rehashes)
  local call = { method = method, args = { n = select("#", ...), ... }, f = f, inst = inst,
    deps = false, room = false, runner = false, suspended = false }
  f._item = call
  inst.active = inst.active + 1
  local q = inst.qtail + 1
  inst.qtail, inst.queue[q] = q, call
  local room
  if q - inst.qhead >= h._max_queued then
    room = future.new()
    call.room = room
  elseif inst.granted <= q then
    inst.granted = q + 1
  end
  inst.srv:wake()
  if room and room[S] < DONE then return f, room end
  return f
end

-- A sync call has ended: off the instance's list.
local function unlist(inst, call)
  local n, i = inst.ninline, call.slot
  local last = inst.inline[n]
  inst.inline[i], last.slot = last, i
  inst.inline[n], inst.ninline = nil, n - 1
end

--- Call `method` on a sync instance: it runs now, inline on the caller's
-- task (`max_queued` and `max_concurrency` do not apply: each caller runs
-- its call at once); its future is settled when this returns. A cancel of
-- the caller (its task, or the call that task runs) that the method took at
-- one of its waits is raised in the caller.
function M.sync_call(h, inst, method, ...)
  local f, crashed = call_future(inst)
  if crashed then return f end
  -- (its future has no `_item`: nobody holds it before it is settled, so
  -- only a stop cancels it, through the call)
  local call = { method = method, args = { n = select("#", ...), ... }, f = f, inst = inst,
    deps = false, task = false, slot = 0 }
  inst.active = inst.active + 1
  local me = caller()
  call.task = me
  if h._timeout then calls.arm(f, h._timeout, h._name, method, me) end
  local n = inst.ninline + 1 -- (an array: a set of fresh keys would rehash)
  inst.inline[n], inst.ninline, call.slot = call, n, n
  local _, _, taken = inline(inst, me, serving.execute, inst.srv, call, nil)
  unlist(inst, call)
  -- (a call a stop cancelled has no task any more: see M.stop)
  if taken and f[S] == CANCELLED and call.task then error(errors.cancelled(), 0) end
  return f
end

--- Stop instance `inst` of handle `h`: with `drain` false, cancel what it
-- holds and runs, and let callers waiting for room go. Returns a future
-- settled once it is idle (its calls ended, its init too), and whether the
-- caller is one of its own calls (it is then not waited for: no future).
function M.stop(h, inst, drain)
  local srv = inst.srv
  local me = caller()
  -- (outside any task (or in a coroutine of the code's own), while a sync
  -- call runs there, the caller is that call: nothing else runs there
  -- meanwhile)
  local inside = srv:runs(me) or (me == nil and inst.outside > 0)
  inst.stopping = true
  if not drain then
    inst.cancelling = true
    if h._mode == "sync" then
      -- a sync call at a wait on its caller's task gets CancelledError there
      -- (one made outside any task cannot be reached: it runs to its end)
      for i = inst.ninline, 1, -1 do
        local call = inst.inline[i]
        local t = call.task
        if t and call.f[S] < DONE then
          if t._blocked or t._in_block then
            call.task = false
            settle(call.f, CANCELLED, 0, false, errors.cancelled())
            -- at its wait; or, woken and not resumed yet, at the wait it
            -- was woken from
            if t._blocked then sched.wake(t, sched.CANCEL) else t._cancel_req = true end
          elseif t == me then
            t._cancel_req = true -- the caller's own call: at its next wait
          end
        end
      end
    else
      drop_all(inst)
      srv:cancel()
    end
  end
  -- an init still running is cancelled when the calls are, or when there
  -- are none to run after it (unless init is the caller)
  local init = inst.init
  if init and not init:done() and not inside and (not drain or inst.active == 0) then
    inst.init_stopped = true
    init:cancel()
  end
  if inside then return nil, true end
  inst.idle = inst.idle or future.new()
  local idle = inst.idle
  check_idle(inst)
  return idle, false
end

return M
