--- corral: a concurrency runtime for LuaJIT on libuv.
--
--     local corral = require "corral"
--     local t = corral.spawn(function(x) corral.sleep(0.1); return x * 2 end, 21)
--     print(t:result())  --> 42
--
-- Every operation that waits suspends the calling task and lets the loop run
-- others; called outside any task, it drives the loop until it can return.
-- @module corral
-- (the require corral was loaded with: a script may replace the global)
local require = require
local core = require "corral.core"
local errors = require "corral.errors"
local sched = require "corral.sched"
local future = require "corral.future"
local task = require "corral.task"
local wait = require "corral.wait"
local CO = require("corral.fields").CO

local corral = {}

--- Versions of corral and what it is built on: a table with `corral`,
-- `luajit`, `libuv` and `msgpack`.
corral.versions = core.versions()
corral.version = corral.versions.corral

--- Run `fn(...)` as a task; returns its future at once.
-- @function spawn
corral.spawn = task.spawn

--- A new future for code to settle with `set_result` or `set_exception`.
function corral.future()
  return future.new()
end

--- Bytes shared by reference: `corral.buffer(string)` or
-- `corral.buffer(size)`; see `corral.buffer`.
-- @function buffer
corral.buffer = require("corral.buffer").new

--- Whether `v` is a buffer.
-- @function is_buffer
corral.is_buffer = require("corral.buffer").is

--- The trace timeline: `corral.trace.start(path)`, `stop()`, `active()`; see `corral.trace`.
corral.trace = require("corral.trace").public

-- Channels and sync primitives are loaded on first use.
local sync
local function syncs()
  sync = sync or require "corral.sync"
  return sync
end

--- A channel of `capacity` values (0: unbuffered); see `corral.sync`.
function corral.channel(capacity) return syncs().channel(capacity) end
--- A queue with `task_done` and `join` (asyncio.Queue); see `corral.sync`.
function corral.queue(maxsize) return syncs().queue(maxsize) end
--- A lock; see `corral.sync`.
function corral.lock() return syncs().lock() end
--- A semaphore of `n` permits; see `corral.sync`.
function corral.semaphore(n) return syncs().semaphore(n) end
--- An event; see `corral.sync`.
function corral.event() return syncs().event() end
--- A condition over a lock; see `corral.sync`.
function corral.condition(lock) return syncs().condition(lock) end
--- A barrier of `n` parties; see `corral.sync`.
function corral.barrier(n) return syncs().barrier(n) end
--- Wait on several channel operations and futures, do one; see `corral.sync`.
function corral.select(cases, opts) return syncs().select(cases, opts) end

-- Structured concurrency, timers, retries, limits: loaded on first use (a
-- worker that loads corral starts without them).
local function lazy(module, name)
  return function(...) return require(module)[name](...) end
end

--- Run `body(s)`, whose tasks (`s:spawn`) all end before it returns; see
-- `corral.scope`.
-- @function scope
corral.scope = lazy("corral.scope", "scope")
--- Start `n` copies of `fn`; returns a waiter; see `corral.scope`.
-- @function concurrently
corral.concurrently = lazy("corral.scope", "concurrently")
--- Run `fn(...)` with a time limit; see `corral.scope`.
-- @function timeout
corral.timeout = lazy("corral.scope", "timeout")
--- Run `fn(...)` so that cancelling the caller does not cancel it.
-- @function shield
corral.shield = lazy("corral.scope", "shield")
--- Call `fn(...)` once, `seconds` from now; see `corral.patterns`.
-- @function after
corral.after = lazy("corral.patterns", "after")
--- Call `fn(...)` every `seconds`; see `corral.patterns`.
-- @function every
corral.every = lazy("corral.patterns", "every")
--- Call `fn` until it succeeds, with waits between attempts; see `corral.patterns`.
-- @function retry
corral.retry = lazy("corral.patterns", "retry")
--- A debounced `fn`; see `corral.patterns`.
-- @function debounce
corral.debounce = lazy("corral.patterns", "debounce")
--- A throttled `fn`; see `corral.patterns`.
-- @function throttle
corral.throttle = lazy("corral.patterns", "throttle")
--- `fn` called once, its results kept; see `corral.patterns`.
-- @function once
corral.once = lazy("corral.patterns", "once")
--- A rate or concurrency limit, shared with workers; see `corral.limiter`.
-- @function limiter
corral.limiter = lazy("corral.limiter", "new")
--- Stages joined by bounded channels; see `corral.pipeline`.
-- @function pipeline
corral.pipeline = lazy("corral.pipeline", "pipeline")
--- Run a command in its own process group; a future of its result; see
-- `corral.exec`.
-- @function exec
corral.exec = lazy("corral.exec", "exec")
--- Connect to a NATS server for remote workers; see `corral.remote`.
-- @function connect
corral.connect = lazy("corral.remote", "connect")
--- Serve pools of worker classes to remote callers; see `corral.remote`.
-- @function serve
corral.serve = lazy("corral.remote", "serve")
--- Files on libuv's asynchronous operations (`read`, `write`, `list`,
-- `stat`, `exists`, `mkdir`); see `corral.fs`.
-- @table fs
corral.fs = {}
for _, name in ipairs({ "read", "write", "list", "stat", "exists", "mkdir" }) do
  corral.fs[name] = lazy("corral.fs", name)
end
--- A group of background tasks; see `corral.patterns`.
-- @function group
corral.group = lazy("corral.patterns", "group")

--- Monotonic time in seconds.
-- @function now
corral.now = core.now

--- Wait `seconds` (other tasks run meanwhile).
-- @number seconds
function corral.sleep(seconds)
  errors.check(type(seconds) == "number" and seconds >= 0, "corral.sleep", "seconds",
    "a number of seconds >= 0", seconds)
  local w = sched.waiter()
  local tok = sched.block(w, core.now() + seconds)
  if tok ~= sched.TIMEOUT then future.raise_token(tok, "corral.sleep") end
end

--- Wait for futures; see `corral.wait`.
-- @function wait
corral.wait = wait.wait
--- Gather results; see `corral.wait`.
-- @function gather
corral.gather = wait.gather
--- Iterate results in completion order.
-- @function as_completed
corral.as_completed = wait.as_completed
--- Names for `wait`'s `return_when`.
corral.ReturnWhen = wait.ReturnWhen

--- Encode one value as MessagePack bytes, by the rules of a call's
-- arguments: numbers, strings, booleans, nil, tables (shared and cyclic
-- ones kept), functions as bytecode with their upvalues, loaded modules
-- and their C functions by name. Without functions or shared tables the
-- bytes are plain MessagePack that any library reads. Raises a `CodecError`
-- naming the path of what cannot be encoded (`value.a[2]: ...`): a
-- coroutine, a userdata, a future or a worker (they live in this process).
-- @param value the value
-- @treturn string the bytes
function corral.encode(value)
  local s, why = core.encode_value(value)
  if not s then error(errors.codec(why, 2), 2) end
  return s
end

local DECODE_OPTIONS = { code = true }

--- Decode the one value of MessagePack bytes (from `corral.encode`, or
-- from any MessagePack library). The bytes are untrusted: malformed ones
-- raise a `CodecError` naming where (`value.a[2]: ...`), and they never
-- run code or reach into this process: a function is refused unless
-- `opts.code` is true, and even then only one this very process encoded is
-- loaded (its bytecode carries a mark made with the process's random key);
-- futures and workers are always refused. An extension
-- type it does not know is refused; MessagePack's timestamp becomes
-- `{sec =, nsec =}`, binary a string.
-- @string bytes the bytes
-- @tab[opt] opts `code`
-- @return the value
function corral.decode(bytes, opts)
  errors.check(type(bytes) == "string", "corral.decode", "bytes", "a string", bytes)
  if opts ~= nil then
    errors.check(type(opts) == "table", "corral.decode", "opts", "a table", opts)
    errors.check_options("corral.decode", opts, DECODE_OPTIONS)
  end
  return core.decode_value(bytes, opts ~= nil and opts.code == true)
end

--- Whether `v` is a corral future.
-- @function is_future
corral.is_future = future.is_future

--- Whether `e` is a corral error (of the given kind).
-- @function is_error
corral.is_error = errors.is_error
--- Make a corral error object: `corral.error(kind, message[, cause])`.
function corral.error(kind, message, cause)
  errors.check(type(kind) == "string", "corral.error", "kind", "a string", kind)
  return errors.new(kind, message, cause, 2)
end

--- Drive the loop until nothing is pending (no task ready, no timer, no
-- future that another thread may settle). Not for use inside a task.
function corral.run()
  if sched.current() ~= nil and sched.current()[CO] == coroutine.running() then
    errors.usage("corral.run", "called from inside a task; wait on futures instead")
  end
  sched.drive(true)
end

--- For a host with a loop of its own (Neovim, LÖVE, a game engine): one
-- turn of corral's loop that never blocks: completions, due timers and the
-- tasks ready then. Returns whether anything is still pending. Call it from
-- the host's loop, never from inside a task (a `UsageError`).
function corral.step()
  if sched.current() ~= nil and sched.current()[CO] == coroutine.running() then
    errors.usage("corral.step", "called from inside a task: the host's loop steps corral")
  end
  return sched.drive(false)
end

--- The loop's backend file descriptor: it becomes readable when another
-- thread has settled something for this loop. Poll it with the timeout of
-- `corral.backend_timeout()`, then call `corral.step()`.
function corral.backend_fd() return core.backend_fd() end

--- Milliseconds until `corral.step()` has work: 0 when work is ready, the
-- time to the next timer, -1 when nothing is due (only the backend fd can
-- bring work).
function corral.backend_timeout() return sched.backend_timeout() end

-- What corral.exit raises where it cannot suspend the calling task for good.
local EXIT = setmetatable({}, { __tostring = function() return "corral.exit" end })

--- Stop with `code` (0 to 255; true is 0, false is 1).
--
-- Run by the `corral` command, it ends the process at once with that
-- status, after reporting unretrieved errors. In a thread or process
-- worker it ends that worker, as `os.exit` does there: its calls fail with
-- `WorkerCrashed`.
--
-- In an embedded runtime (a C host's `corral_open`, or `require "corral"`
-- in a host's own Lua state) it never ends the host's process: it stops
-- the runtime. The workers are asked to stop (their calls are cancelled),
-- the loop runs nothing more (`corral.step()` returns false, `corral.run()`
-- returns, a wait outside a task raises), `code` is kept for the host
-- (`corral.exit_status()`, or `corral_exit_status` and `CORRAL_EEXIT` from
-- `corral_step` in C), and the host closes the state when it likes. The task
-- that called it goes no further: it is suspended for good, even inside a
-- `pcall`. Where it cannot be suspended it raises an error instead: inside
-- a coroutine of the task's own, every further instruction of that
-- coroutine and of the task raises it too (no `pcall` there goes on); in a
-- callback that corral runs (`corral.after`, a future's callback) a `pcall`
-- around `corral.exit` catches it, and the callback's code after it runs.
-- Called outside any task (a Lua host's own code), it returns once the
-- runtime has stopped.
function corral.exit(code)
  if code == true or code == nil then code = 0 elseif code == false then code = 1 end
  errors.check(type(code) == "number" and code >= 0 and code <= 255 and code == math.floor(code),
    "corral.exit", "code", "a whole number from 0 to 255, or a boolean", code)
  if core.is_worker() then os.exit(code) end
  if core.exit_ends_process() then core.exit(code) end
  core.halt(code)
  sched.halt()
  if not sched.in_turn() then return end -- a host's own code: it goes on
  local t, co = sched.current(), coroutine.running()
  if t and t[CO] == co then pcall(coroutine.yield, sched.BLOCKED) end -- (never resumed)
  if t and t[CO] then sched.exit_hook(EXIT, co, t[CO]) end
  error(EXIT, 0)
end

--- The status `corral.exit` stopped this embedded runtime with, or nil
-- while it runs.
function corral.exit_status() return core.exit_status() end

-- The worker module is loaded on first use (a worker thread that makes no
-- worker of its own starts without it).
local worker
local function workers()
  worker = worker or require "corral.worker"
  return worker
end

--- Declare a worker class; see `corral.worker`.
-- @function worker
function corral.worker(def) return workers().worker(def) end
--- Set or read process-wide worker defaults; see `corral.worker.config`.
-- @function config
corral.config = require("corral.worker_options").config
--- Run a function on the default pool of thread workers.
-- @function submit
function corral.submit(fn, ...) return workers().submit(fn, ...) end
--- Apply a function to items on a pool, with backpressure.
-- @function map
function corral.map(fn, items, opts) return workers().map(fn, items, opts) end

--- Statistics per context: an array of rows `{name, tasks, queued, active,
-- encodes, decodes}`, the home context (or, in a worker, the caller's
-- runtime's home) first.
function corral.stats()
  core.set_tasks(task.live())
  return core.stats()
end

return corral
