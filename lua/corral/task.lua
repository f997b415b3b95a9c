--- Tasks: functions running as coroutines on a context's loop.
-- A task is a future (see `corral.Future`) whose work is a function.
-- @classmod corral.Task
local core = require "corral.core"
local errors = require "corral.errors"
local sched = require "corral.sched"
local future = require "corral.future"
local F = require "corral.fields"

local Future, settle, settle_values = future.Future, future.settle, future.settle_values
local PENDING, RUNNING, DONE, CANCELLED = future.PENDING, future.RUNNING, future.DONE, future.CANCELLED
local push, wake, on_error, current = sched.push, sched.wake, sched.on_error, sched.current
local WOKE, CANCEL = sched.WOKE, sched.CANCEL
local fstart = core.fstart
local xpcall, select, unpack, setmetatable = xpcall, select, unpack, setmetatable
local is_error = errors.is_error
local S, FN, NA, A = F.S, F.FN, F.NA, F.A
local T = require "corral.trace"

local Task = {}
for k, v in pairs(Future) do Task[k] = v end
Task.__index = Task
Task._kind = "task"

local M = { Task = Task }
local live = 0 -- tasks spawned and not finished
local lineage = false -- tasks inherit `_inst` (see M.track_instances)

--- From now on a task spawned by an async or sync instance's code belongs
-- to that instance (its `_inst`), so that `stop` knows its own code.
function M.track_instances() lineage = true end

--- The `_inst` of tasks spawned outside any task (set while a sync call
-- runs outside any task).
M.outside = nil

--- How many tasks have been spawned and have not finished.
function M.live() return live end

local function finish(t, ok, ...)
  if T.on then T.task_end(t, true) end
  live = live - 1
  t[FN], t[A] = false, false
  if ok then
    settle_values(t, ...)
  else
    local e = ...
    if is_error(e, "CancelledError") then
      settle(t, CANCELLED, 0, false, e)
    else
      settle(t, future.FAILED, 0, false, e, sched.last_traceback())
    end
  end
end

-- Run a task's function to its end on the current coroutine. Arguments:
-- `_na` of them, in `_a` (the value itself when there is one, else a table
-- {n=...}).
local function run_one(t)
  t[S] = RUNNING
  if t._c then fstart(t._c) end
  if T.on then T.task_begin(t) end
  local na = t[NA]
  if na == 0 then
    finish(t, xpcall(t[FN], on_error))
  elseif na == 1 then
    finish(t, xpcall(t[FN], on_error, t[A]))
  else
    local a = t[A]
    finish(t, xpcall(t[FN], on_error, unpack(a, 1, a.n)))
  end
end
sched.set_run_one(run_one)

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
  local n = select("#", ...)
  local a = false
  if n == 1 then a = ... elseif n > 1 then a = { n = n, ... } end
  -- state, results, first waiter, function, arguments, coroutine (see
  -- corral.fields); the rest (_c, _e, _w, _blocked) only where needed
  local t = setmetatable({ PENDING, 0, false, false, fn, n, a, false }, Task)
  -- a task spawned by a worker instance's code is that instance's (looked
  -- at only once the context has async or sync instances)
  if lineage then
    local cur = current()
    local inst
    if cur then inst = rawget(cur, "_inst") else inst = M.outside end
    if inst then t._inst = inst end
  end
  live = live + 1
  push(t, WOKE, nil)
  return t
end

-- A done callback runs as a task of its own (so that it may wait); its
-- error is reported at once and stops nothing else.
local function callback_body(fn, f)
  local ok, e = xpcall(fn, on_error, f)
  if not ok then sched.report("error in a done callback", e, sched.last_traceback()) end
end
-- (a callback is its registrant's code, not that of the instance whose
-- runner settled the future)
future.run_callback = function(fn, f) M.spawn(callback_body, fn, f)._inst = nil end

--- Cancel the task: one that has not started never runs; a running one gets
-- `CancelledError` at the corral wait where it is suspended, so its cleanup
-- runs. Returns true when the cancellation took effect; false when the task
-- has ended, or is suspended in a plain `coroutine.yield()` (where corral
-- cannot raise).
function Task:cancel()
  local s = self[S]
  if s >= DONE then return false end
  if s == PENDING then
    live = live - 1
    return settle(self, CANCELLED, 0, false, errors.cancelled())
  end
  if self._blocked then
    wake(self, CANCEL)
  elseif self._in_block or sched.current() == self then
    -- woken but not resumed yet (it gets CancelledError at the wait it was
    -- woken from), or cancelling itself (at its next wait)
    self._cancel_req = true
  else
    -- it yielded by itself (coroutine.yield): corral cannot raise there
    return false
  end
  -- (counted: a sync call that takes this cancel at one of its waits
  -- passes it on to the task, see corral.worker_local)
  self._ncancel = (self._ncancel or 0) + 1
  return true
end

-- Cancelled from elsewhere (its C half) before it started: it never runs.
function Task:_sync()
  local was = self[S]
  Future._sync(self)
  if was == PENDING and self[S] >= DONE then live = live - 1 end
end

function Task.set_result()
  errors.usage("task:set_result", "a task's result is set by its function")
end

function Task.set_exception()
  errors.usage("task:set_exception", "a task's error is set by its function")
end

return M
