--- Small patterns of orchestration: timers, retries, debounce, throttle,
-- once, and a group of background tasks.
--
--     local r = corral.retry(fetch, { max_retries = 5, delay = 0.1 })
--     local t = corral.every(1, report)        -- t:cancel() stops it
--
-- Every function given here runs as a task of the caller's context (so it
-- may wait); an error it raises is reported as any task's is.
-- @module corral.patterns
local errors = require "corral.errors"
local sched = require "corral.sched"
local task = require "corral.task"
local wait = require "corral.wait"

local type, pcall, error, select, floor, random, min = type, pcall, error, select, math.floor,
  math.random, math.min
local now = sched.now

local M = {}

local function is_callable(fn)
  return type(fn) == "function" or (type(getmetatable(fn)) == "table" and getmetatable(fn).__call ~= nil)
end

local function check_seconds(fname, s)
  errors.check(type(s) == "number" and s >= 0 and s == s, fname, "seconds", "a number of seconds >= 0", s)
end

local function sleep(s)
  local w = sched.waiter()
  local tok = sched.block(w, now() + s)
  if tok ~= sched.TIMEOUT then require("corral.future").raise_token(tok, "corral.retry") end
end

-- ======================================================================== --
-- Timers                                                                   --
-- ======================================================================== --

local Timer = {}
Timer.__index = Timer

--- Stop the timer: true when that stopped something (a call that had not
-- happened yet, or the ticks to come); false when it had fired (after) or
-- was stopped already.
function Timer:cancel()
  if not self._live then return false end
  self._live = false
  sched.cancel_timer(self._t)
  return true
end

--- Whether it will still fire.
function Timer:active() return self._live end

--- Call `fn(...)` (as a task) once, `seconds` from now. Returns a timer
-- with `cancel()`. A live timer keeps the loop (and a script) running.
function M.after(seconds, fn, ...)
  check_seconds("corral.after", seconds)
  errors.check(is_callable(fn), "corral.after", "fn", "a function", fn)
  local n, args = select("#", ...), { ... }
  local t = setmetatable({ _live = true }, Timer)
  t._t = sched.at(now() + seconds, function()
    if not t._live then return end
    t._live = false
    task.spawn(fn, unpack(args, 1, n))
  end)
  return t
end

--- Call `fn(...)` (as a task) every `seconds` (> 0), the first time
-- `seconds` from now, on a fixed schedule (a late tick does not shift the
-- next ones; ticks missed while the loop was busy are skipped). Returns a
-- timer; `cancel()` stops the ticks to come.
function M.every(seconds, fn, ...)
  check_seconds("corral.every", seconds)
  errors.check(seconds > 0, "corral.every", "seconds", "a number of seconds > 0", seconds)
  errors.check(is_callable(fn), "corral.every", "fn", "a function", fn)
  local n, args = select("#", ...), { ... }
  local t = setmetatable({ _live = true }, Timer)
  local due = now() + seconds
  local function tick()
    if not t._live then return end
    task.spawn(fn, unpack(args, 1, n))
    local at = now()
    due = due + seconds
    if due <= at then due = due + floor((at - due) / seconds + 1) * seconds end
    t._t = sched.at(due, tick)
  end
  t._t = sched.at(due, tick)
  return t
end

-- ======================================================================== --
-- retry                                                                    --
-- ======================================================================== --

local BACKOFF = { exponential = true, linear = true, fibonacci = true, fixed = true }
local RETRY_OPTIONS = { max_retries = true, delay = true, backoff = true, max_delay = true,
  jitter = true, retry_on = true, retry_until = true, deadline = true }

local function fib(k)
  local a, b = 1, 1
  for _ = 2, k do a, b = b, a + b end
  return a
end

-- The wait before retry number k (from 1).
local function delay_of(o, k)
  local d = o.delay
  if o.backoff == "exponential" then
    d = d * 2 ^ (k - 1)
  elseif o.backoff == "linear" then
    d = d * k
  elseif o.backoff == "fibonacci" then
    d = d * fib(k)
  end
  if o.max_delay then d = min(d, o.max_delay) end
  if o.jitter then d = d / 2 + random() * d / 2 end -- (equal jitter: [d/2, d])
  return d
end
M.delay_of = delay_of

local function check_retry(opts)
  opts = opts or {}
  errors.check(type(opts) == "table", "corral.retry", "opts", "a table", opts)
  errors.check_options("corral.retry", opts, RETRY_OPTIONS)
  local o = {
    max_retries = opts.max_retries == nil and 3 or opts.max_retries,
    delay = opts.delay == nil and 1 or opts.delay,
    backoff = opts.backoff or "exponential",
    max_delay = opts.max_delay,
    jitter = opts.jitter ~= false,
    retry_on = opts.retry_on,
    retry_until = opts.retry_until,
    deadline = opts.deadline,
  }
  errors.check(type(o.max_retries) == "number" and o.max_retries >= 0
    and o.max_retries == floor(o.max_retries), "corral.retry", "opts.max_retries",
    "a whole number >= 0", o.max_retries)
  errors.check(type(o.delay) == "number" and o.delay >= 0, "corral.retry", "opts.delay",
    "a number of seconds >= 0", o.delay)
  errors.check(BACKOFF[o.backoff] ~= nil, "corral.retry", "opts.backoff",
    '"exponential", "linear", "fibonacci" or "fixed"', o.backoff)
  if o.max_delay ~= nil then
    errors.check(type(o.max_delay) == "number" and o.max_delay >= 0, "corral.retry",
      "opts.max_delay", "a number of seconds >= 0", o.max_delay)
  end
  if o.deadline ~= nil then
    errors.check(type(o.deadline) == "number" and o.deadline >= 0, "corral.retry",
      "opts.deadline", "a number of seconds >= 0", o.deadline)
  end
  local ro = o.retry_on
  errors.check(ro == nil or type(ro) == "table" or is_callable(ro), "corral.retry",
    "opts.retry_on", "a list of error kinds or a function", ro)
  if type(ro) == "table" and not is_callable(ro) then
    local kinds = {}
    for i = 1, #ro do
      errors.check(type(ro[i]) == "string", "corral.retry", "opts.retry_on[" .. i .. "]",
        "an error kind", ro[i])
      kinds[ro[i]] = true
    end
    o.retry_on = function(e) return kinds[e.kind] == true end
  end
  errors.check(o.retry_until == nil or is_callable(o.retry_until), "corral.retry",
    "opts.retry_until", "a function", o.retry_until)
  return o
end

local function pack(...) return { n = select("#", ...), ... } end

M.check_retry, M.RETRY_OPTIONS = check_retry, RETRY_OPTIONS

--- Call `fn(...)` until it succeeds, waiting between attempts (the task
-- only: other tasks run meanwhile). `opts`: `max_retries` (3), `delay` (1
-- s), `backoff` ("exponential", "linear", "fibonacci" or "fixed"),
-- `max_delay`, `jitter` (true: each wait is drawn from [d/2, d]),
-- `retry_on` (a list of error kinds, or `fn(err, attempt, elapsed)`: false
-- raises that error at once), `retry_until` (`fn(...)` of the results: a
-- falsy answer rejects them and retries), `deadline` (seconds: no attempt
-- starts, no wait runs, past it). Returns fn's results; when the attempts
-- run out, raises a `RetryError` whose `attempts` lists each attempt's
-- error (or `{rejected = {results}}`) and whose `cause` is the last error.
-- A cancel is never retried.
function M.retry(fn, opts)
  errors.check(is_callable(fn), "corral.retry", "fn", "a function", fn)
  local o = check_retry(opts)
  local t0 = now()
  local attempts = {}
  local k = 0
  while true do
    k = k + 1
    local r = pack(pcall(fn))
    local failure
    if r[1] then
      if o.retry_until == nil or o.retry_until(unpack(r, 2, r.n)) then return unpack(r, 2, r.n) end
      failure = { rejected = { unpack(r, 2, r.n) } }
    else
      local e = errors.raised(r[2])
      if errors.is_error(e, "CancelledError") then error(e, 0) end
      if o.retry_on and not o.retry_on(e, k, now() - t0) then error(r[2], 0) end
      failure = e
    end
    attempts[k] = failure
    local d = k <= o.max_retries and delay_of(o, k) or nil
    if d and o.deadline and now() - t0 + d >= o.deadline then d = nil end
    if d == nil then
      local last = attempts[k]
      local why = last.rejected and "its result was rejected" or errors.safe_tostring(last)
      local e = errors.new("RetryError", ("%d attempt%s failed; the last: %s"):format(k,
        k == 1 and "" or "s", why), not last.rejected and last or nil, 2)
      e.attempts = attempts
      error(e, 2)
    end
    sleep(d)
  end
end

-- ======================================================================== --
-- debounce, throttle, once                                                 --
-- ======================================================================== --

local Callable = {}
Callable.__index = Callable
Callable.__call = function(self, ...) return self._call(...) end

--- A function that calls `fn` (as a task) with the arguments of its last
-- call once `seconds` have passed without a call. `d:cancel()` drops a
-- call waiting to happen; `d:flush()` makes it now.
function M.debounce(seconds, fn)
  check_seconds("corral.debounce", seconds)
  errors.check(is_callable(fn), "corral.debounce", "fn", "a function", fn)
  local d = setmetatable({}, Callable)
  local timer, args
  local function fire()
    timer = nil
    local a = args
    args = nil
    task.spawn(fn, unpack(a, 1, a.n))
  end
  d._call = function(...)
    args = pack(...)
    if timer then sched.cancel_timer(timer) end
    timer = sched.at(now() + seconds, fire)
  end
  function d.cancel()
    if not timer then return false end
    sched.cancel_timer(timer)
    timer, args = nil, nil
    return true
  end
  function d.flush()
    if not timer then return false end
    sched.cancel_timer(timer)
    fire()
    return true
  end
  return d
end

--- A function that calls `fn` (as a task) at most once per `seconds`: the
-- first call at once, and the last of the calls made during the window
-- when it ends (with its arguments). `t:cancel()` drops that last call.
function M.throttle(seconds, fn)
  check_seconds("corral.throttle", seconds)
  errors.check(is_callable(fn), "corral.throttle", "fn", "a function", fn)
  local t = setmetatable({}, Callable)
  local timer, pending
  local function window_end()
    timer = nil
    if pending then
      local a = pending
      pending = nil
      task.spawn(fn, unpack(a, 1, a.n))
      timer = sched.at(now() + seconds, window_end)
    end
  end
  t._call = function(...)
    if timer then
      pending = pack(...)
      return
    end
    task.spawn(fn, ...)
    timer = sched.at(now() + seconds, window_end)
  end
  function t.cancel()
    local had = pending ~= nil
    pending = nil
    return had
  end
  return t
end

--- A function that calls `fn` the first time it is called and returns its
-- results then and ever after (a failure is raised again each time).
-- Callers that come while the first call waits wait for its results.
function M.once(fn)
  errors.check(is_callable(fn), "corral.once", "fn", "a function", fn)
  local state, results, f -- nil, "running", "done"
  return function(...)
    if state == "done" then
      if results.ok then return unpack(results, 1, results.n) end
      error(results.err, 0)
    end
    if state == "running" then
      f:exception() -- (waits for it)
      return f:result()
    end
    state = "running"
    f = require("corral.future").new()
    local r = pack(pcall(fn, ...))
    if r[1] then
      results = { ok = true, n = r.n - 1, unpack(r, 2, r.n) }
      f:set_result(unpack(r, 2, r.n))
    else
      results = { ok = false, err = r[2] }
      f:set_exception(errors.raised(r[2]))
      f:exception() -- (retrieved: the callers get it raised)
    end
    state = "done"
    if results.ok then return unpack(results, 1, results.n) end
    error(results.err, 0)
  end
end

-- ======================================================================== --
-- group                                                                    --
-- ======================================================================== --

local Group = {}
Group.__index = Group

--- Start `fn(...)` as a task of the group; returns its future.
function Group:spawn(fn, ...)
  errors.check(is_callable(fn), "group:spawn", "fn", "a function", fn)
  if self._closed then errors.usage("group:spawn", "the group is closed") end
  local t = task.spawn(fn, ...)
  self._tasks[#self._tasks + 1] = t
  return t
end

--- Cancel every task of the group still running: how many took it.
function Group:cancel()
  local n = 0
  for _, t in ipairs(self._tasks) do
    if not t:done() and t:cancel() then n = n + 1 end
  end
  return n
end

--- Wait until every task of the group has ended (or `timeout` passes):
-- true when they all have.
function Group:wait(timeout)
  local _, left = wait.wait(self._tasks, { timeout = timeout })
  return #left == 0
end

--- Cancel what runs, wait for it to end, and take no more tasks.
function Group:close()
  self._closed = true
  self:cancel()
  return self:wait()
end

--- A group of background tasks: `g:spawn(fn, ...)`, `g:cancel()`,
-- `g:wait([timeout])`, `g:close()` (cancel, then wait).
function M.group() return setmetatable({ _tasks = {} }, Group) end

return M
