--- The main of a thread worker: runs in the worker's own lua_State on its
-- own OS thread. Takes calls from the inbox, runs each as a task (at most
-- `max_concurrency` at once, started in the order they were made), settles
-- their futures with encoded results, and stops when asked.
-- @module corral.worker_main
local core = require "corral.core"
local corral = require "corral"
local errors = require "corral.errors"
local sched = require "corral.sched"
local task = require "corral.task"
local future = require "corral.future"

local DONE, FAILED = future.DONE, future.FAILED
local DRAIN, CANCEL = 1, 2

local M = {}

-- A method's error as a WorkerError with the worker's traceback.
local function worker_error(name, method, e, tb)
  local msg = type(e) == "table" and rawget(e, "message") or sched.safe_tostring(e)
  local err = errors.new("WorkerError", ("%s:%s: %s"):format(name, method, tostring(msg)), e, false)
  err.worker, err.method = name, method
  err.traceback = tb or (type(e) == "table" and rawget(e, "traceback")) or nil
  return err
end

local function fail(rc, err)
  local ok = core.fsettle_encode(rc, FAILED, err)
  if ok == nil then
    -- the cause cannot travel: send its text instead
    err.cause = sched.safe_tostring(err.cause)
    core.fsettle_encode(rc, FAILED, err)
  end
end

local function succeed(rc, ...)
  local ok, why = core.fsettle_encode(rc, DONE, ...)
  if ok == nil then
    fail(rc, errors.new("CodecError", why, nil, false))
  end
end

--- Run the worker: `name`, its class (a table of methods), its options and
-- the arguments of `init`.
function M.run(name, class, opts, ...)
  local self = {}
  local limit = opts.max_concurrency or 1
  local running, stopping = 0, 0
  local calls = {}
  local live = {} -- tasks running calls, to cancel when stopping without drain

  -- init runs first, as a task of its own; calls wait for it
  local init_err
  local init = corral.spawn(function(...)
    if class.init then class.init(self, ...) end
  end, ...)

  local pump

  local function run_call(call)
    local method, rc, deps = core.call_info(call)
    local me = sched.current()
    live[me] = true
    local ok, e = pcall(function()
      if stopping == CANCEL then
        core.fcancel(rc)
        return
      end
      if init:exception() ~= nil then
        init_err = init_err or init:exception()
        fail(rc, worker_error(name, "init", init_err, init._tb))
        return
      end
      for i = 1, #deps do
        local d = corral._wrap(deps[i])
        local de = d:exception()
        if d:cancelled() then
          core.fcancel(rc)
          return
        elseif de ~= nil then
          local what = type(de) == "table" and rawget(de, "kind") and (de.kind .. ": " .. tostring(de.message))
            or sched.safe_tostring(de)
          fail(rc, errors.new("DependencyError", ("%s:%s: input %d failed: %s"):format(name, method, i, what),
            de, false))
          return
        end
      end
      local fn = class[method]
      if type(fn) ~= "function" then
        fail(rc, worker_error(name, method, "no method '" .. tostring(method) .. "'"))
        return
      end
      local function finish(ok2, ...)
        if ok2 then
          succeed(rc, ...)
        else
          local err = ...
          if errors.is_error(err, "CancelledError") then
            core.fcancel(rc)
          else
            fail(rc, worker_error(name, method, err, sched.last_traceback()))
          end
        end
      end
      finish(xpcall(fn, sched.on_error, self, core.call_args(call)))
    end)
    if not ok then
      -- cancelled while waiting for init or an input, or a codec failure
      if errors.is_error(e, "CancelledError") then core.fcancel(rc)
      else fail(rc, worker_error(name, method, e)) end
    end
    core.call_done(call)
    live[me] = nil
    running = running - 1
    pump()
  end

  -- Take calls while there is room; always learn whether to stop.
  pump = function()
    repeat
      local room = limit - running
      local n, st = core.inbox_take(calls, room > 0 and room or 0)
      stopping = st
      for i = 1, n do
        running = running + 1
        corral.spawn(run_call, calls[i])
        calls[i] = nil
      end
    until n == 0 or running >= limit
    core.set_tasks(task.live())
  end

  sched.on_wake = pump
  sched.keepalive = true
  while true do
    sched.turn(true)
    if stopping == CANCEL then
      -- cancel what is queued and what runs, then wait for them to end
      sched.on_wake = nil
      local n
      repeat
        n = core.inbox_take(calls, 64)
        for i = 1, n do
          local _, rc = core.call_info(calls[i])
          core.fcancel(rc)
          core.call_done(calls[i])
          calls[i] = nil
        end
      until n == 0
      for t in pairs(live) do t:cancel() end -- the others cancel their calls as they start
      sched.keepalive = false
      while running > 0 and sched.turn(true) do end
      break
    elseif stopping == DRAIN and running == 0 then
      local n = core.inbox_take(calls, 1)
      if n == 0 then break end
      -- one more came in before the stop: run it
      running = running + 1
      corral.spawn(run_call, calls[1])
      calls[1] = nil
    end
  end
  sched.on_wake = nil
  sched.keepalive = false
  -- what the methods left behind (timers, tasks) ends with the worker
end

return M
