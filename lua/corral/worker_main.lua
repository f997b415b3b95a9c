--- The main of a thread worker: runs in the worker's own lua_State on its
-- own OS thread. Takes calls from the inbox in batches and runs them in
-- order, at most `max_concurrency` at once, each on one of that many runner
-- tasks; settles their futures with encoded results; stops when asked.
-- @module corral.worker_main
local core = require "corral.core"
local corral = require "corral"
local errors = require "corral.errors"
local sched = require "corral.sched"
local task = require "corral.task"

local DONE, FAILED, CANCELLED = 2, 3, 4
local DRAIN, CANCEL = 1, 2
local call_info, call_args, call_finish = core.call_info, core.call_args, core.call_finish
local xpcall, type = xpcall, type

local M = {}

-- A method with its arguments decoded, inside the protection of xpcall.
-- Arguments that cannot be decoded here (a module this state cannot
-- require) fail the call with a CodecError, not the worker: call_args
-- returns false and why, and the error raised is marked as the decoder's.
local decode_errors = setmetatable({}, { __mode = "k" })
local function run(fn, self, ok, ...)
  if not ok then
    local e = errors.new("CodecError", ..., nil, false)
    decode_errors[e] = true
    error(e, 0)
  end
  return fn(self, ...)
end
local function apply(fn, self, call)
  return run(fn, self, call_args(call))
end

-- A method's error as a WorkerError with the worker's traceback.
local function worker_error(name, method, e, tb)
  local msg = type(e) == "table" and rawget(e, "message") or sched.safe_tostring(e)
  local err = errors.new("WorkerError", ("%s:%s: %s"):format(name, method, tostring(msg)), e, false)
  err.worker, err.method = name, method
  err.traceback = tb or (type(e) == "table" and rawget(e, "traceback")) or nil
  return err
end

local function fail(call, err)
  if call_finish(call, FAILED, err) == nil then
    -- the cause cannot travel: send its text instead
    err.cause = sched.safe_tostring(err.cause)
    call_finish(call, FAILED, err)
  end
end

--- Run the worker: `name`, its class (a table of methods), its options and
-- the arguments of `init`.
function M.run(name, class, opts, ...)
  local self = {}
  local limit = opts.max_concurrency or 1
  local stopping = 0
  local buf, head, tail = {}, 1, 0 -- calls taken from the inbox, in order
  local runners = 0                 -- runner tasks alive
  local live = {}                   -- runner tasks, to cancel on stop

  -- init runs first, as a task of its own; calls wait for it
  local init = corral.spawn(function(...)
    if class.init then class.init(self, ...) end
  end, ...)
  local init_err -- false once init succeeded

  -- Wait for init and the call's inputs; returns an error to fail the call
  -- with, CANCEL, or nil to run it.
  local function prepare(call, method, ndeps)
    if init_err == nil then
      local ok, e = pcall(init.exception, init)
      if not ok then return CANCEL end
      init_err = e or false
    end
    if init_err then return worker_error(name, "init", init_err, init._tb) end
    if ndeps > 0 then
      local deps = core.call_deps(call)
      for i = 1, #deps do
        local d = corral._wrap(deps[i])
        local ok, de = pcall(d.exception, d)
        if not ok or d:cancelled() then return CANCEL end
        if de ~= nil then
          local what = type(de) == "table" and rawget(de, "kind")
            and (de.kind .. ": " .. tostring(de.message)) or sched.safe_tostring(de)
          return errors.new("DependencyError", ("%s:%s: input %d failed: %s"):format(name, method, i, what),
            de, false)
        end
      end
    end
  end

  local function finish(call, method, ok, ...)
    if ok then
      local done, why = call_finish(call, DONE, ...)
      if done == nil then fail(call, errors.new("CodecError", why, nil, false)) end
    else
      local err = ...
      if errors.is_error(err, "CancelledError") then
        call_finish(call, CANCELLED)
      elseif decode_errors[err] then
        err.message = ("%s:%s: %s"):format(name, method, err.message)
        fail(call, err)
      else
        fail(call, worker_error(name, method, err, sched.last_traceback()))
      end
    end
  end

  local function refill()
    local n, st = core.inbox_take(buf, 64, tail)
    stopping = st
    tail = tail + n
    return n
  end

  -- A runner: runs queued calls one after another until there are none.
  local function runner()
    local me = sched.current()
    live[me] = true
    while true do
      if head > tail then
        head, tail = 1, 0
        if refill() == 0 then break end
      end
      local call = buf[head]
      buf[head] = nil
      head = head + 1
      local method, ndeps = call_info(call)
      local err
      if stopping == CANCEL then
        err = CANCEL
      elseif init_err ~= false or ndeps > 0 then
        err = prepare(call, method, ndeps)
      end
      if err == CANCEL then
        call_finish(call, CANCELLED)
      elseif err then
        fail(call, err)
      else
        local fn = class[method]
        if type(fn) ~= "function" then
          fail(call, worker_error(name, method, "no method '" .. tostring(method) .. "'"))
        else
          finish(call, method, xpcall(apply, sched.on_error, fn, self, call))
        end
      end
    end
    live[me] = nil
    runners = runners - 1
  end

  -- On each turn: learn whether to stop, and start runners for new calls.
  sched.on_wake = function()
    if runners < limit then
      if head > tail then
        head, tail = 1, 0
        refill()
      else
        local _, st = core.inbox_take(buf, 0, tail)
        stopping = st
      end
      while runners < limit and head <= tail do
        runners = runners + 1
        corral.spawn(runner)
      end
    else
      local _, st = core.inbox_take(buf, 0, tail)
      stopping = st
    end
    core.set_tasks(task.live())
  end
  sched.keepalive = true
  while true do
    sched.turn(true)
    if stopping == CANCEL then
      -- cancel what runs; queued calls are cancelled by the runners (and
      -- what is left in the inbox by the thread as it ends)
      for t in pairs(live) do t:cancel() end
      sched.keepalive = false
      while runners > 0 and sched.turn(true) do end
      break
    elseif stopping == DRAIN and runners == 0 and head > tail then
      head, tail = 1, 0
      if refill() == 0 then break end
    end
  end
  sched.on_wake = nil
  sched.keepalive = false
end

return M
