--- Tasks: functions running as coroutines on a context's loop.
-- A task is a future (see `corral.Future`) whose work is a function.
-- @classmod corral.Task
local core = require "corral.core"
local errors = require "corral.errors"
local sched = require "corral.sched"
local future = require "corral.future"

local Future, settle = future.Future, future.settle
local PENDING, DONE, FAILED, CANCELLED = future.PENDING, future.DONE, future.FAILED, future.CANCELLED
local push, wake, on_error = sched.push, sched.wake, sched.on_error
local WOKE, CANCEL, FINISHED = sched.WOKE, sched.CANCEL, sched.FINISHED
local fnew, fstart = core.fnew, core.fstart
local co_yield, xpcall, select, unpack, setmetatable = coroutine.yield, xpcall, select, unpack, setmetatable
local is_error = errors.is_error

local Task = {}
for k, v in pairs(Future) do Task[k] = v end
Task.__index = Task
Task._kind = "task"

local M = { Task = Task, live = 0 }

local function finish(t, ok, ...)
  M.live = M.live - 1
  t._fn, t._args = nil, nil
  if ok then
    local n = select("#", ...)
    settle(t, DONE, n > 0 and { n = n, ... } or nil)
  else
    local e = ...
    if is_error(e, "CancelledError") then
      settle(t, CANCELLED, nil, e)
    else
      settle(t, FAILED, nil, e, sched.last_traceback())
    end
  end
end

-- The body of every task coroutine; coroutines are reused from a pool, so
-- one runs many tasks in turn.
local function task_main(t)
  while true do
    fstart(t._c)
    t._s = future.RUNNING
    local args = t._args
    if args then
      finish(t, xpcall(t._fn, on_error, unpack(args, 1, args.n)))
    else
      finish(t, xpcall(t._fn, on_error))
    end
    t._co = nil
    t = co_yield(FINISHED)
  end
end
sched.set_task_main(task_main)

local function is_callable(fn)
  return type(fn) == "function" or (type(getmetatable(fn)) == "table" and getmetatable(fn).__call ~= nil)
end
M.is_callable = is_callable

--- Run `fn(...)` as a task on this context's loop; returns its future at
-- once. The task starts on the next turn of the loop.
function M.spawn(fn, ...)
  if not is_callable(fn) then
    errors.check(false, "corral.spawn", "fn", "a function", fn)
  end
  local t = setmetatable({ _c = fnew(), _s = PENDING, _fn = fn }, Task)
  local n = select("#", ...)
  if n > 0 then t._args = { n = n, ... } end
  M.live = M.live + 1
  push(t, WOKE, nil)
  return t
end

--- Cancel the task: one that has not started never runs; a running one gets
-- `CancelledError` at its next suspension point, so its cleanup runs.
-- Returns true when the cancellation took effect.
function Task:cancel()
  local s = self._s
  if s >= DONE then return false end
  if s == PENDING then
    M.live = M.live - 1
    return settle(self, CANCELLED, nil, errors.cancelled())
  end
  if self._blocked then
    wake(self, CANCEL)
  else
    self._cancel_req = true
  end
  return true
end

function Task:set_result()
  errors.usage("task:set_result", "a task's result is set by its function")
end

function Task:set_exception()
  errors.usage("task:set_exception", "a task's error is set by its function")
end

-- Keep the linter quiet about deliberately unused imports.
local _ = { FAILED, fnew }

return M
