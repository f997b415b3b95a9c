--- The futures of worker calls, in every mode.
-- @module corral.worker_call
local errors = require "corral.errors"
local future = require "corral.future"
local sched = require "corral.sched"
local S = require("corral.fields").S

local core = require "corral.core"

local DONE, RUNNING, FAILED = future.DONE, future.RUNNING, future.FAILED
local pairs = pairs

local M = {}

-- A call to a stopped worker: a failed future (the caller sees the error
-- through it; unretrieved, it is reported like any other).
local function closed_future(h, method)
  local f = future.new()
  f:set_exception(errors.closed(h._name, method))
  return f
end

-- The futures of calls: tostring says "call". An async call's future knows
-- its call (`_item`, see corral.worker_local), so that cancelling it stops
-- the call as a thread worker's would: a call not started never runs; a
-- running one is cancelled only where its method waits (it gets
-- `CancelledError` there); one whose method is executing (cancelling its
-- own future) is not, and cancel says false.
local CallFuture = {}
for k, v in pairs(future.Future) do CallFuture[k] = v end
CallFuture.__index = CallFuture
CallFuture._kind = "call"

function CallFuture:cancel()
  local call = self._item
  if call == nil then return future.Future.cancel(self) end
  local s = self[S]
  if s >= DONE or (s == future.RUNNING and not call.suspended) then return false end
  future.settle(self, future.CANCELLED, 0, false, errors.cancelled())
  local t = call.runner
  if s == future.RUNNING and t then sched.wake(t, sched.CANCEL) end
  return true
end

function CallFuture.set_result()
  errors.usage("future:set_result", "a call's result is set by its worker")
end

function CallFuture.set_exception()
  errors.usage("future:set_exception", "a call's error is set by its worker")
end

local wrap = future.wrap

-- A call's future, already watched by this loop under `key`.
local function call_future(c, key)
  return wrap(c, CallFuture, key)
end

-- A call's time limit passed: its future fails with TimeoutError unless it
-- has settled, and its call is stopped as a cancel stops it, except that a
-- thread worker's call that is executing is not waited for (it goes on
-- until its next wait, where it gets CancelledError, or until it returns;
-- its result is dropped). A process worker's proxy ends its process when
-- it does not stop within `cancel_grace` (see src/process.c).
local function expire(f, msg, runner)
  if type(msg) ~= "string" then msg = f._limit_msg end
  local s = f[S]
  if s >= DONE then return end
  local e = errors.new("TimeoutError", msg, nil, false)
  local c = f._c
  if c then
    if core.fexpire(c, msg) then future.settle(f, FAILED, 0, false, e, nil, true) end
    return
  end
  future.settle(f, FAILED, 0, false, e)
  local call = f._item
  local t = runner or (call and call.runner)
  if s == RUNNING and t then sched.wake(t, sched.CANCEL) end
end

--- Arm the time limit of the call future `f` (the worker option
-- `timeout`: `seconds` from the call). `runner`: the task that runs it
-- inline (a sync call), else nil.
function M.arm(f, seconds, name, method, runner)
  if f[S] >= DONE then return end
  local msg = ("call %s:%s timed out after %g s"):format(name, method, seconds)
  f._limit_msg = msg
  local tm = sched.at(sched.now() + seconds, function() expire(f, msg, runner) end)
  f:add_done_callback(function() sched.cancel_timer(tm) end)
end

--- The time limit of `f` (armed) has passed: fail it now (its timer may
-- not have fired yet).
M.expire = expire

M.CallFuture, M.closed_future, M.call_future = CallFuture, closed_future, call_future
return M
