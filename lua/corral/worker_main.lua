--- The main of a thread worker: runs in the worker's own lua_State on its
-- own OS thread. Runs `init`, then takes calls from the inbox in batches
-- and runs them in order, at most `max_concurrency` at once, each on one of
-- that many runner tasks; settles their futures with encoded results; stops
-- when asked, and dies (failing its calls with `WorkerCrashed`) when its
-- init fails or its code calls `os.exit`.
-- @module corral.worker_main
-- (the require corral was loaded with: a script may replace the global)
local require = require
local core = require "corral.core"
local CO = require("corral.fields").CO
local errors = require "corral.errors"
local sched = require "corral.sched"
local future = require "corral.future"
local task = require "corral.task"
local serving = require "corral.worker_serve"
local trace = require "corral.trace"

local DONE = future.DONE
local DRAIN, CANCEL = core.STOP_DRAIN, core.STOP_CANCEL -- how the worker is asked to stop
local stopping = core.stopping
local pcall = pcall

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
local current_srv -- the worker's server (see serve)

local function exited(name, method)
  return errors.crashed(name, ("os.exit(%d) in %s"):format(exit_code, method), nil, exit_code, method)
end

-- After os.exit, a call's end is the worker's crash (the server's
-- `exited`, set only then: the calls before pay nothing for it).
local function exited_call(method)
  local srv = current_srv
  srv.crash = srv.crash or exited(srv.name, method)
  return true
end

local function worker_exit(code)
  if code == true or code == nil then code = 0 elseif code == false then code = 1 end
  local t = sched.current()
  if not exit_code then
    exit_code = tonumber(code) or 1
    if exit_code ~= exit_code or exit_code == math.huge or exit_code == -math.huge then
      exit_code = 1
    end
    exit_code = math.floor(exit_code)
    core.exit_code(exit_code)
    if current_srv then current_srv.exited = exited_call end
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

-- The thread worker's inbox (see corral.worker_serve): its calls are C
-- objects, their arguments and results encoded.
local function own(call) return future.wrap(core.call_result(call), nil, nil, true) end
local inbox = {
  take = core.inbox_take,
  info = core.call_info,
  method_of = function(call) return (core.call_info(call)) end,
  deps = function(call)
    local deps = core.call_deps(call)
    -- (quiet: an input's failure is its caller's side to report, or the
    -- call's once it carries it)
    for i = 1, #deps do deps[i] = future.wrap(deps[i], nil, nil, true) end
    return deps
  end,
  own = own,
  start = core.call_start,
  args = core.call_args,
  carried = core.call_carried,
  finish = core.call_finish,
  suspend = core.call_suspend,
  resume = core.call_resume,
  -- the caller may cancel a call whose method waits (or its time limit
  -- pass): watch its future while it runs, and deliver the cancel at the
  -- wait (see sched.block). (Settled while the method still runs, it was
  -- settled by the caller's side: the worker settles it once it has ended.)
  watch = function(t, call)
    future.add_waiter(own(call), function(f)
      if t._call == call and t._call_cancelled ~= call and f[1] >= DONE then
        sched.wake(t, sched.CANCEL)
      end
    end)
  end,
  cancelling = function() return stopping() >= CANCEL end,
}

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
  trace.name = "worker " .. name
  if opts.settings then require("corral.worker_options").adopt(opts.settings) end
  if opts.path then package.path = opts.path end
  if opts.cpath then package.cpath = opts.cpath end
  if opts.host_fns then core.host_unreachable(opts.host_fns) else core.host_install() end
  -- (a failure here fails the worker's calls with WorkerCrashed, its text
  -- the cause: "module 'x' not found ...")
  if opts.setup then opts.setup() end
  local self = {}
  -- init runs first, as a task of its own; no call starts before it ends.
  -- (A tail call: this frame, which holds the init arguments, goes.)
  local init = task.spawn(function(...)
    if class.init then class.init(self, ...) end
  end, ...)
  init._where = "init"
  return serve(name, class, opts, self, init)
end

-- Serve calls until stopped or dead: `self` is the instance's state, `init`
-- its init task.
function serve(name, class, opts, self, init)
  -- calls taken from the inbox at once: no more than the inbox holds, so
  -- that at most 2 x max_queued calls wait for this worker in all
  local srv = serving.new(name, class, self, opts.max_concurrency or 1,
    math.min(64, opts.max_queued or 64), inbox)
  srv.after_call = collect_if_grown
  current_srv = srv
  if exit_code then srv.exited = exited_call end

  -- On each turn, once init has succeeded: start runners for new calls.
  sched.on_wake = function()
    trace.refresh() -- (a trace may have started or stopped meanwhile)
    srv:wake()
    core.set_tasks(task.live())
  end
  sched.before_park = collect_if_grown
  sched.keepalive = true
  while srv.crash == nil do
    sched.turn(true)
    if exit_code then
      srv.crash = exited(name, exit_where)
      break
    end
    local st = stopping()
    if not srv.started and init:done() then
      local ie = init:exception()
      if ie ~= nil then
        -- (init ended by itself: a stop that cancels it ends this loop at
        -- once, so a CancelledError here is init's own, a failure like any)
        srv.crash = errors.init_failed(name, ie)
      else
        srv.started = true
        srv:wake()
      end
    end
    if st >= CANCEL then
      -- cancel what runs (at its waits); the runners cancel what they took,
      -- the thread what is left in the inbox
      if not srv.started then init:cancel() end
      srv:cancel()
      sched.keepalive = false
      while (srv.runners > 0 or not init:done()) and srv.crash == nil and sched.turn(true) do end
      break
    elseif st == DRAIN and srv.runners == 0 and not srv:holds() then
      -- the end, unless calls remain (in the inbox, or waiting for room);
      -- with none, an init still running is not waited for
      if srv:refill() == 0 then
        if not srv.started then
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
  if srv.crash then crash_with(srv.crash) end
  -- what is left (tasks, futures still pending) ends as its state closes
end

return M
