--- Structured concurrency: scopes, `concurrently`, `timeout` and `shield`.
--
--     local a, b = corral.scope(function(s)
--       s:spawn(fetch, "a")
--       s:spawn(fetch, "b")
--     end)
--
-- A scope does not return before every task spawned in it has ended; the
-- first failure cancels the others and is raised once they have ended.
-- @module corral.scope
local errors = require "corral.errors"
local future = require "corral.future"
local task = require "corral.task"
local wait = require "corral.wait"

local pcall, error, type, unpack = pcall, error, type, unpack

local M = {}

local function is_callable(fn)
  return type(fn) == "function" or (type(getmetatable(fn)) == "table" and getmetatable(fn).__call ~= nil)
end

-- Wait until every future of `fs` has settled, whatever happens to the
-- caller meanwhile: a cancel is passed to `on_cancel` (once) and the wait
-- goes on. Returns whether the caller was cancelled.
local function settle_all(fs, on_cancel)
  local cancelled = false
  while true do
    local ok, e = pcall(wait.wait, fs)
    if ok then return cancelled end
    if not errors.is_error(e, "CancelledError") then error(e, 0) end
    if not cancelled then
      cancelled = true
      on_cancel()
    end
  end
end

-- ======================================================================== --
-- scope                                                                    --
-- ======================================================================== --

local Scope = {}
Scope.__index = Scope

local function cancel_all(s, except)
  for i = 1, #s._tasks do
    local t = s._tasks[i]
    if t ~= except then t:cancel() end
  end
end

local function on_child_done(s, t)
  if t:cancelled() then return end
  local e = t:exception()
  if e == nil then return end
  if s._failure == nil then
    s._failure = e
    cancel_all(s, t)
  else
    s._others[#s._others + 1] = e
  end
end

--- Start `fn(...)` as a task of the scope; returns its future.
function Scope:spawn(fn, ...)
  errors.check(is_callable(fn), "scope:spawn", "fn", "a function", fn)
  if self._closed then errors.usage("scope:spawn", "the scope has ended") end
  local t = task.spawn(fn, ...)
  self._tasks[#self._tasks + 1] = t
  if self._failure ~= nil or self._cancelled then t:cancel() end
  future.add_waiter(t, function(f) on_child_done(self, f) end)
  return t
end

--- Cancel every task of the scope (the scope still waits for them to end).
function Scope:cancel()
  self._cancelled = true
  cancel_all(self)
end

--- Run `body(s, ...)` with a new scope `s`; returns once every task spawned
-- in it has ended: the first result of each, in spawn order. The first
-- failure (the body's or a task's) cancels the other tasks and is raised
-- after they end, with the other failures in its `others` field. When the
-- caller is cancelled meanwhile, the tasks are cancelled, waited for, and
-- `CancelledError` is raised.
function M.scope(body, ...)
  errors.check(is_callable(body), "corral.scope", "body", "a function", body)
  local s = setmetatable({ _tasks = {}, _others = {} }, Scope)
  local ok, e = pcall(body, s, ...)
  if not ok then
    if s._failure == nil then s._failure = e else s._others[#s._others + 1] = e end
    cancel_all(s)
  end
  -- (tasks spawned by tasks of the scope while it waits are waited for too)
  local cancelled = false
  local n = 0
  while n < #s._tasks do
    n = #s._tasks
    local list = { unpack(s._tasks, 1, n) }
    if settle_all(list, function() s._cancelled = true; cancel_all(s) end) then cancelled = true end
  end
  s._closed = true
  if s._failure ~= nil then
    local f = s._failure
    if #s._others > 0 and type(f) == "table" then rawset(f, "others", s._others) end
    error(f, 0)
  end
  if cancelled then error(errors.cancelled(), 2) end
  local out = {}
  for i = 1, n do
    local t = s._tasks[i]
    if not t:cancelled() then out[i] = (t:result()) end
  end
  return unpack(out, 1, n)
end

-- ======================================================================== --
-- concurrently                                                             --
-- ======================================================================== --

local Waiter = {}
Waiter.__index = Waiter

--- The failures so far (a list of error objects).
function Waiter:exceptions()
  local out = {}
  for i = 1, #self._fs do
    local f = self._fs[i]
    if f:done() and not f:cancelled() then
      local e = f:exception()
      if e ~= nil then out[#out + 1] = e end
    end
  end
  return out
end

local function finish(self)
  if self._pool then
    local p = self._pool
    self._pool = nil
    p:stop()
  end
end

--- Cancel every copy still running and wait until all have ended. (A
-- copy in a thread worker that is executing, not waiting, when it is
-- cancelled is cancelled again until it reaches a wait: one that never
-- waits is waited for.)
function Waiter:stop()
  local delay = 0.001
  while true do
    local left = {}
    for i = 1, #self._fs do
      local f = self._fs[i]
      if not f:done() and not f:cancel() then left[#left + 1] = f end
    end
    if #left == 0 then break end
    pcall(wait.wait, left, { timeout = delay })
    delay = math.min(delay * 2, 0.05)
  end
  settle_all(self._fs, function() end)
  finish(self)
end

local WAIT_OPTIONS = { suppress_exceptions = true, fail_hard = true }

--- Wait until every copy has ended. With `fail_hard`, the first failure
-- stops the rest and is raised; otherwise failures are collected and
-- raised together as an `UnhandledExceptions` error (its `exceptions`
-- list), unless `suppress_exceptions`. Returns the first result of each
-- copy, in order.
function Waiter:wait(opts)
  opts = opts or {}
  errors.check(type(opts) == "table", "waiter:wait", "opts", "a table", opts)
  errors.check_options("waiter:wait", opts, WAIT_OPTIONS)
  local fs = self._fs
  if opts.fail_hard then
    local pending = {}
    for i = 1, #fs do pending[i] = fs[i] end
    while #pending > 0 do
      local ok, done, rest = pcall(wait.wait, pending, { return_when = wait.ReturnWhen.FIRST_EXCEPTION })
      if not ok then
        self:stop()
        error(done, 0)
      end
      for _, f in ipairs(done) do
        if not f:cancelled() and f:exception() ~= nil then
          local e = f:exception()
          self:stop()
          -- the other failures are retrieved here (none is reported as lost)
          local others = {}
          for _, x in ipairs(self:exceptions()) do
            if x ~= e then others[#others + 1] = x end
          end
          if #others > 0 and type(e) == "table" then rawset(e, "others", others) end
          error(e, 0)
        end
      end
      pending = rest
    end
  else
    if settle_all(fs, function() for i = 1, #fs do fs[i]:cancel() end end) then
      finish(self)
      error(errors.cancelled(), 2)
    end
  end
  finish(self)
  local exc = self:exceptions()
  if #exc > 0 and not opts.suppress_exceptions then
    local e = errors.new("UnhandledExceptions", ("%d of %d copies failed; the first: %s"):format(
      #exc, #fs, errors.safe_tostring(exc[1])), exc[1], 2)
    e.exceptions = exc
    error(e, 2)
  end
  local out = {}
  for i = 1, #fs do
    local f = fs[i]
    if not f:cancelled() and f:exception() == nil then out[i] = (f:result()) end
  end
  return out
end

local CONC_OPTIONS = { mode = true, args = true }
local CONC_MODES = { async = true, thread = true, process = true }

--- Start `n` copies of `fn(args...)` and return a waiter (`wait`,
-- `exceptions`, `stop`). `mode` is "async" (tasks here, the default),
-- "thread" or "process" (one worker each; `fn` travels as bytecode).
function M.concurrently(n, fn, opts)
  errors.check(type(n) == "number" and n >= 1 and n == math.floor(n), "corral.concurrently", "n",
    "a whole number >= 1", n)
  errors.check(is_callable(fn), "corral.concurrently", "fn", "a function", fn)
  opts = opts or {}
  errors.check(type(opts) == "table", "corral.concurrently", "opts", "a table", opts)
  errors.check_options("corral.concurrently", opts, CONC_OPTIONS)
  local mode = opts.mode or "async"
  errors.check(CONC_MODES[mode] ~= nil, "corral.concurrently", "opts.mode",
    '"async", "thread" or "process"', mode)
  local args = opts.args or {}
  errors.check(type(args) == "table", "corral.concurrently", "opts.args", "a table", args)
  local w = setmetatable({ _fs = {} }, Waiter)
  if mode == "async" then
    for i = 1, n do w._fs[i] = task.spawn(fn, unpack(args, 1, args.n or #args)) end
  else
    local pool = require("corral.worker").pool_for({ workers = n, mode = mode })
    w._pool = pool
    for i = 1, n do w._fs[i] = pool:call(fn, unpack(args, 1, args.n or #args)) end
  end
  return w
end

-- ======================================================================== --
-- timeout and shield                                                       --
-- ======================================================================== --

--- Run `fn(...)` (as a task) and return its results; when `seconds` pass
-- first, it is cancelled, waited for, and `TimeoutError` is raised.
function M.timeout(seconds, fn, ...)
  errors.check(type(seconds) == "number" and seconds >= 0, "corral.timeout", "seconds",
    "a number of seconds >= 0", seconds)
  errors.check(is_callable(fn), "corral.timeout", "fn", "a function", fn)
  local t = task.spawn(fn, ...)
  local ok, e = pcall(wait.wait, { t }, { timeout = seconds })
  if not ok then
    t:cancel()
    settle_all({ t }, function() end)
    error(e, 0)
  end
  if not t:done() and t:cancel() then
    -- (however fn ends now, even swallowing the cancel, its time ran out)
    settle_all({ t }, function() end)
    error(errors.new("TimeoutError", ("corral.timeout: timed out after %g s"):format(seconds),
      nil, 2), 2)
  end
  return t:result()
end

--- Run `fn(...)` (as a task) and return its results; cancelling the caller
-- does not cancel it (the caller still gets `CancelledError`, and `fn`
-- runs on).
function M.shield(fn, ...)
  errors.check(is_callable(fn), "corral.shield", "fn", "a function", fn)
  local t = task.spawn(fn, ...)
  return t:result()
end

return M
