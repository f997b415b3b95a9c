--- The main of a thread worker: runs in the worker's own lua_State on its
-- own OS thread. Runs `init`, then takes calls from the inbox in batches
-- and runs them in order, at most `max_concurrency` at once, each on one of
-- that many runner tasks; settles their futures with encoded results; stops
-- when asked, and dies (failing its calls with `WorkerCrashed`) when its
-- init fails or its code calls `os.exit`.
-- @module corral.worker_main
local core = require "corral.core"
local CO = require("corral.fields").CO
local corral = require "corral"
local errors = require "corral.errors"
local sched = require "corral.sched"
local future = require "corral.future"
local task = require "corral.task"

local DONE, FAILED, CANCELLED = future.DONE, future.FAILED, future.CANCELLED
local DRAIN, CANCEL = core.STOP_DRAIN, core.STOP_CANCEL -- how the worker is asked to stop
local call_info, call_args, call_finish, call_start = core.call_info, core.call_args,
  core.call_finish, core.call_start
local stopping = core.stopping
local xpcall, pcall, type = xpcall, pcall, type

local M = {}

-- What os.exit raises in a worker where it cannot suspend the calling task
-- for good (inside a C call): it ends the worker, not the process.
local EXIT = setmetatable({}, { __tostring = function() return "os.exit in a worker" end })
local exit_code, exit_where -- set once os.exit was called, and where

-- Every instruction of a coroutine that called os.exit raises: whatever
-- catches the first error (pcall, a C function between) cannot go on.
local function exit_hook() error(EXIT, 0) end

-- os.exit in a worker: the calling task is suspended for good (no code after
-- os.exit runs, pcall or not) and the worker ends at its next turn. Where it
-- cannot suspend (inside a C call, in a coroutine of the code's own), every
-- further instruction of that coroutine and of its task raises.
local function worker_exit(code)
  if code == true or code == nil then code = 0 elseif code == false then code = 1 end
  local t = sched.current()
  if not exit_code then
    exit_code = tonumber(code) or 1
    if exit_code ~= exit_code or exit_code == math.huge or exit_code == -math.huge then
      exit_code = 1
    end
    exit_code = math.floor(exit_code)
    exit_where = t and (t._method or t._where) or "a task it spawned"
  end
  sched.exiting = true
  local co = coroutine.running()
  if t and t[CO] == co then pcall(coroutine.yield, sched.BLOCKED) end
  debug.sethook(co, exit_hook, "", 1)
  if t and t[CO] and t[CO] ~= co then debug.sethook(t[CO], exit_hook, "", 1) end
  error(EXIT, 0)
end

--- Before the boot payload is rebuilt: what the worker's code sees.
function M.prepare()
  os.exit = worker_exit -- luacheck: ignore 122
end

local text_of = errors.text_of

-- The worker dies with `err`: sent to its calls, its cause as text when it
-- cannot travel.
local function crash_with(err)
  if not core.worker_crash(err) then
    err.cause = text_of(err.cause)
    core.worker_crash(err, true)
  end
end

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

-- What a call leaves (a large argument, its result) is garbage once the call
-- is done; an idle worker allocates nothing, so its collector would not run
-- and would keep it. After a call and before parking, collect when the heap
-- has grown by more than 64 MiB since the last full collection. (Not for
-- less: the collector's own pace is cheaper, as memory freed at once is
-- faulted in again by the next large call: a 16 MiB round trip ran 35%
-- slower when collected after every call.)
local heap_after_gc = collectgarbage("count")
local function collect_if_grown()
  if collectgarbage("count") > heap_after_gc + 65536 then
    collectgarbage()
    heap_after_gc = collectgarbage("count")
  end
end

local function fail(call, err)
  if call_finish(call, FAILED, err) == nil then
    -- what it carries cannot travel: send its text instead
    err.cause, err.value = errors.safe_tostring(err.cause), nil
    call_finish(call, FAILED, err)
  end
end

-- The caller may cancel a call whose method waits: watch its future while
-- it runs, and deliver the cancel at the wait (see sched.block).
sched.on_call_wait = function(t, call)
  t._cwatch = call
  local own = future.wrap(core.call_result(call), nil, nil, true)
  future.add_waiter(own, function(f)
    if t._call == call and t._call_cancelled ~= call and f[1] == CANCELLED then
      sched.wake(t, sched.CANCEL)
    end
  end)
end

--- The worker died outside its main loop (its boot payload could not be
-- rebuilt here, say, or it ran out of memory): fail its calls with
-- `WorkerCrashed`.
function M.died(name, e, booted)
  crash_with(errors.crashed(name, (booted and "it failed: " or "it could not start: ") .. text_of(e),
    errors.raised(e)))
end

local serve -- the worker's loop, below

--- Run the worker: `name`, its class (a table of methods), its options and
-- the arguments of `init`.
function M.run(name, class, opts, ...)
  if opts.settings then require("corral.worker").config(opts.settings) end
  local self = {}
  -- init runs first, as a task of its own; no call starts before it ends.
  -- (A tail call: this frame, which holds the init arguments, goes.)
  local init = corral.spawn(function(...)
    if class.init then class.init(self, ...) end
  end, ...)
  init._where = "init"
  return serve(name, class, opts, self, init)
end

-- Serve calls until stopped or dead: `self` is the instance's state, `init`
-- its init task.
function serve(name, class, opts, self, init)
  local limit = opts.max_concurrency or 1
  -- calls taken from the inbox at once: no more than the inbox holds, so
  -- that at most 2 x max_queued calls wait for this worker in all
  local batch = math.min(64, opts.max_queued or 64)
  local buf, head, tail = {}, 1, 0 -- calls taken from the inbox, in order
  local runners = 0                 -- runner tasks alive
  local live = {}                   -- runner tasks, to cancel on stop
  local crash                       -- the WorkerCrashed that ends the worker

  local function exited(method)
    return errors.crashed(name, ("os.exit(%d) in %s"):format(exit_code, method), nil, exit_code, method)
  end

  -- Wait for the call's inputs (or for its caller to cancel it). Returns an
  -- error to fail the call with, CANCEL, or nil to run it.
  local function inputs(call, method)
    local deps = core.call_deps(call)
    local own
    for i = 1, #deps do
      local d = future.wrap(deps[i])
      if not d:done() then
        own = own or future.wrap(core.call_result(call), nil, nil, true)
        local ok = pcall(corral.wait, { d, own }, { return_when = "FIRST_COMPLETED" })
        if not ok or own:done() then return CANCEL end
      end
      if d:cancelled() then return CANCEL end
      local de = d:exception()
      if de ~= nil then return errors.dependency(name, method, i, de) end
    end
  end

  local function finish(call, method, ok, ...)
    if exit_code then
      crash = crash or exited(method)
      return
    end
    if ok then
      local done, why = call_finish(call, DONE, ...)
      if done == nil then fail(call, errors.codec(why)) end
    else
      local err = ...
      if errors.is_error(err, "CancelledError") then
        call_finish(call, CANCELLED)
      elseif decode_errors[err] then
        err.message = ("%s:%s: %s"):format(name, method, err.message)
        fail(call, err)
      else
        fail(call, errors.worker_error(name, method, err, sched.last_traceback()))
      end
    end
  end

  local function refill()
    local n = core.inbox_take(buf, batch, tail)
    tail = tail + n
    return n
  end

  -- A runner: runs queued calls one after another until there are none.
  local function runner()
    local me = sched.current()
    live[me] = true
    while crash == nil do
      if head > tail then
        head, tail = 1, 0
        if refill() == 0 then break end
      end
      local call = buf[head]
      buf[head] = nil
      head = head + 1
      if stopping() >= CANCEL then
        call_finish(call, CANCELLED)
      else
        local method, ndeps = call_info(call)
        local err = ndeps > 0 and inputs(call, method) or nil
        if err == CANCEL then
          call_finish(call, CANCELLED)
        elseif err then
          fail(call, err)
        elseif not call_start(call) then
          call_finish(call) -- its caller cancelled it meanwhile
        else
          local fn = class[method]
          if type(fn) ~= "function" then
            fail(call, errors.worker_error(name, method, "no method '" .. method .. "'"))
          else
            me._call, me._method = call, method
            finish(call, method, xpcall(apply, sched.on_error, fn, self, call))
            me._call, me._method = nil, nil
            collect_if_grown()
          end
        end
      end
    end
    live[me] = nil
    runners = runners - 1
  end

  -- On each turn, once init has succeeded: start runners for new calls.
  local started = false
  sched.on_wake = function()
    if started and runners < limit then
      if head > tail then
        head, tail = 1, 0
        refill()
      end
      while runners < limit and head <= tail do
        runners = runners + 1
        corral.spawn(runner)
      end
    end
    core.set_tasks(task.live())
  end
  sched.before_park = collect_if_grown
  sched.keepalive = true
  while crash == nil do
    sched.turn(true)
    if exit_code then
      crash = exited(exit_where)
      break
    end
    local st = stopping()
    if not started and init:done() then
      local ie = init:exception()
      if ie ~= nil and not errors.is_error(ie, "CancelledError") then
        crash = errors.init_failed(name, ie)
      elseif ie ~= nil then
        break -- stopped while init ran
      else
        started = true
        sched.on_wake()
      end
    end
    if st >= CANCEL then
      -- cancel what runs (at its waits); the runners cancel what they took,
      -- the thread what is left in the inbox
      if not started then init:cancel() end
      for t in pairs(live) do t:cancel() end
      sched.keepalive = false
      while (runners > 0 or not init:done()) and crash == nil and sched.turn(true) do end
      break
    elseif st == DRAIN and runners == 0 and head > tail then
      -- the end, unless calls remain (in the inbox, or waiting for room);
      -- with none, an init still running is not waited for
      head, tail = 1, 0
      if refill() == 0 then
        if not started then
          init:cancel()
          sched.keepalive = false
          while not init:done() and sched.turn(true) do end
        end
        break
      end
    end
  end
  sched.on_wake, sched.before_park = nil, nil
  sched.keepalive = false
  if crash then crash_with(crash) end
  -- what is left (tasks, futures still pending) ends as its state closes
end

return M
