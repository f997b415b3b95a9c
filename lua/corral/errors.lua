--- Error objects: every failure corral reports is one of these, and this
-- module builds every kind.
--
-- An error has `kind`, `message`, `traceback` (where it happened), `cause`
-- (the error it wraps, if any) and prints itself with `tostring`. A failure
-- raised as a plain value (`error("bad")`, `error({code = 42})`) becomes a
-- `TaskError` that keeps the raised value as `value`.
-- @module corral.errors
local M = {}

local type, tostring, pcall, setmetatable, getmetatable, rawget =
  type, tostring, pcall, setmetatable, getmetatable, rawget

local Error = {}
Error.__index = Error
M.Error = Error

--- The kinds of error corral raises.
M.KINDS = {
  WorkerError = true, TimeoutError = true, CancelledError = true,
  DependencyError = true, WorkerCrashed = true, CodecError = true,
  ClosedError = true, UsageError = true, TaskError = true, BrokenBarrierError = true,
  UnhandledExceptions = true, RetryError = true, OSError = true, ConnectionError = true,
}

-- tostring that survives a raising __tostring.
local function safe_tostring(e)
  local ok, s = pcall(tostring, e)
  return ok and s or ("(error object whose __tostring failed: " .. tostring(s) .. ")")
end
M.safe_tostring = safe_tostring

--- `TaskError` reads like Lua's own error (the raised value, then the
-- traceback); the other kinds read `Kind: message`, then their cause.
function Error.__tostring(e)
  if rawget(e, "kind") == "TaskError" then
    local tb = rawget(e, "traceback")
    return tostring(e.message) .. (tb and tb ~= "" and ("\n" .. tb) or "")
  end
  local s = tostring(e.kind) .. ": " .. tostring(e.message)
  if e.cause ~= nil then
    s = s .. "\ncaused by: " .. safe_tostring(e.cause)
  end
  return s
end

local function traceback_at(level)
  if level == false then return nil end
  return (debug.traceback("", (level or 1) + 2):gsub("^\n", ""))
end

--- Make an error object.
-- @string kind one of `M.KINDS`
-- @string message what went wrong
-- @param[opt] cause the error this one wraps
-- @int[opt] level stack level for the traceback (false: none)
-- @return the error object
function M.new(kind, message, cause, level)
  return setmetatable({ kind = kind, message = message, cause = cause,
    traceback = traceback_at(level) }, Error)
end

--- Whether `e` is a corral error, and of the given kind when one is given.
-- @param e any value
-- @string[opt] kind
-- @treturn boolean
function M.is_error(e, kind)
  if getmetatable(e) ~= Error then return false end
  return kind == nil or e.kind == kind
end
local is_error = M.is_error

--- Give a decoded error table (from C or another context) its behaviour.
function M.adopt(t)
  if type(t) == "table" and type(t.kind) == "string" and getmetatable(t) == nil then
    setmetatable(t, Error)
    M.adopt(t.cause)
  end
  return t
end

-- ======================================================================== --
-- The kinds                                                                --
-- ======================================================================== --

--- What a future holds for a failure raised as `v` with traceback `tb`: the
-- error itself when it is a corral error, else a `TaskError` keeping `v`.
function M.raised(v, tb)
  if is_error(v) then
    if tb and rawget(v, "traceback") == nil then v.traceback = tb end
    return v
  end
  local msg = type(v) == "string" and v or safe_tostring(v)
  return setmetatable({ kind = "TaskError", message = msg, value = v, traceback = tb }, Error)
end

-- The CancelledError raised into cancelled tasks carries no traceback: it
-- is raised often and says where it came from by its message.
function M.cancelled(message)
  return setmetatable({ kind = "CancelledError", message = message or "cancelled" }, Error)
end

--- A `TimeoutError` for `what` (a function name).
function M.timeout(what, level)
  return M.new("TimeoutError", what .. " timed out", nil, (level or 1) + 1)
end

--- A `CodecError`: `message` names where the value was and why it cannot
-- travel.
function M.codec(message, level)
  return M.new("CodecError", message, nil, level and level + 1 or false)
end

--- The method `method` of worker `worker` raised `v` (traceback `tb`): a
-- `WorkerError` whose `cause` is what was raised (a `TaskError` for a plain
-- value) and whose `value` is the raised value itself.
function M.worker_error(worker, method, v, tb)
  local cause = M.raised(v, tb)
  local e = M.new("WorkerError", ("%s:%s: %s"):format(worker, method,
    is_error(v) and safe_tostring(rawget(v, "message")) or cause.message), cause, false)
  e.worker, e.method, e.value, e.traceback = worker, method, v, tb or rawget(cause, "traceback")
  return e
end

--- Input `index` of a call to `worker:method` failed with `upstream`.
function M.dependency(worker, method, index, upstream)
  local what = is_error(upstream) and (upstream.kind .. ": " .. safe_tostring(upstream.message))
    or safe_tostring(upstream)
  local e = M.new("DependencyError", ("%s:%s: input %d failed: %s"):format(worker, method, index, what),
    upstream, false)
  e.worker, e.method, e.input = worker, method, index
  return e
end

--- A call to `method` of a stopped `worker`.
function M.closed(worker, method)
  local e = M.new("ClosedError", ("worker %s is stopped (calling %s)"):format(worker, method), nil, false)
  e.worker, e.method = worker, method
  return e
end

--- Worker `worker` died: `why` says how; `cause` is the error that killed it
-- (an init error, a module that cannot load), `code` an exit status.
function M.crashed(worker, why, cause, code, method)
  local e = M.new("WorkerCrashed", ("worker %s crashed: %s"):format(worker, why), cause, false)
  e.worker, e.code, e.method = worker, code, method
  return e
end

--- The text of an error for a message: a `TaskError`'s own message, else
-- `Kind: message` (a value that is no error object: its tostring).
function M.text_of(e)
  if is_error(e, "TaskError") then return safe_tostring(e.message) end
  if is_error(e) then return e.kind .. ": " .. safe_tostring(e.message) end
  return safe_tostring(e)
end

--- Worker `worker` died because its init raised `e`.
function M.init_failed(worker, e)
  return M.crashed(worker, "its init failed: " .. M.text_of(e), e, nil, "init")
end

--- Raise a UsageError that names the function and what was wrong.
function M.usage(fname, fmt, ...)
  error(M.new("UsageError", fname .. ": " .. string.format(fmt, ...), nil, 3), 3)
end

local function describe(v)
  local t = type(v)
  if t == "string" then return string.format("string %q", #v > 20 and v:sub(1, 20) .. "..." or v) end
  if t == "number" or t == "boolean" then return t .. " " .. tostring(v) end
  return t
end
M.describe = describe

--- Raise a UsageError for argument `argname` of `fname`, which should have
-- been `expected`, unless `ok`.
function M.check(ok, fname, argname, expected, value)
  if not ok then
    error(M.new("UsageError", string.format("%s: argument '%s' must be %s (got %s)",
      fname, argname, expected, describe(value)), nil, 3), 3)
  end
end

--- Raise a UsageError unless every key of the options table `opts` is one
-- of `known` (a set): a misspelt option is an error, not a default.
function M.check_options(fname, opts, known)
  for k in pairs(opts) do
    if not known[k] then
      local names = {}
      for n in pairs(known) do names[#names + 1] = n end
      table.sort(names)
      error(M.new("UsageError", string.format("%s: unknown option '%s' (known: %s)", fname,
        tostring(k), table.concat(names, ", ")), nil, 3), 3)
    end
  end
end

return M
