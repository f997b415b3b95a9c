--- The futures of worker calls, in every mode.
-- @module corral.worker_call
local errors = require "corral.errors"
local future = require "corral.future"
local S = require("corral.fields").S

local DONE = future.DONE
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

M.CallFuture, M.closed_future, M.call_future = CallFuture, closed_future, call_future
return M
