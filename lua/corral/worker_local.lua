--- Async and sync worker instances: they live in the caller's context (an
-- async call is a task there, a sync call runs inline), with the same
-- options, calls, unwrapping, errors and stop as thread workers.
-- @module corral.worker_local
local errors = require "corral.errors"
local sched = require "corral.sched"
local future = require "corral.future"
local task = require "corral.task"
local unwrap = require "corral.unwrap"
local calls = require "corral.worker_call"
local S = require("corral.fields").S

local DONE = future.DONE
local CallFuture, closed_future = calls.CallFuture, calls.closed_future
local select, type, pairs, ipairs, unpack = select, type, pairs, ipairs, unpack

local M = {}

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
      future.settle_values(f, ...)
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
      future.settle(f, future.FAILED, 0, false, errors.init_failed(h._name, ie))
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

function M.async_call(h, inst, method, ...)
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

function M.sync_call(h, inst, method, ...)
  local f = future.new(nil, CallFuture)
  if inst.init_err ~= nil then
    future.settle(f, future.FAILED, 0, false, errors.init_failed(h._name, inst.init_err))
    return f
  end
  run_local(h, inst, method, f, { n = select("#", ...), ... })
  return f
end

--- Stop an async or sync handle's instances: with `drain` false, cancel
-- what is queued and running; let callers waiting for room go. Returns the
-- idle futures to wait for, and whether the caller is one of its own calls
-- (that instance is not waited for).
function M.stop(self, drain)
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
  return idle, itself
end

return M
