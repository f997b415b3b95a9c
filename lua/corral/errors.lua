--- Error objects: every failure corral reports is one of these.
-- An error has `kind`, `message`, `traceback` (where it happened), `cause`
-- (the error it wraps, if any) and prints itself with `tostring`.
-- @module corral.errors
local M = {}

local Error = {}
Error.__index = Error
M.Error = Error

--- The kinds of error corral raises.
M.KINDS = {
  WorkerError = true, TimeoutError = true, CancelledError = true,
  DependencyError = true, WorkerCrashed = true, CodecError = true,
  ClosedError = true, UsageError = true,
}

function Error.__tostring(e)
  local s = e.kind .. ": " .. tostring(e.message)
  if e.cause ~= nil then
    s = s .. "\ncaused by: " .. tostring(e.cause)
  end
  return s
end

--- Make an error object.
-- @string kind one of `M.KINDS`
-- @string message what went wrong
-- @param[opt] cause the error this one wraps
-- @int[opt] level stack level for the traceback (false: none)
-- @return the error object
function M.new(kind, message, cause, level)
  local tb
  if level ~= false then
    tb = debug.traceback("", (level or 1) + 1):gsub("^\n", "")
  end
  return setmetatable({ kind = kind, message = message, cause = cause, traceback = tb }, Error)
end

--- Whether `e` is a corral error, and of the given kind when one is given.
-- @param e any value
-- @string[opt] kind
-- @treturn boolean
function M.is_error(e, kind)
  if getmetatable(e) ~= Error then return false end
  return kind == nil or e.kind == kind
end

--- Give a decoded error table (from C or another context) its behaviour.
function M.adopt(t)
  if type(t) == "table" and type(t.kind) == "string" and getmetatable(t) == nil then
    setmetatable(t, Error)
    M.adopt(t.cause)
  end
  return t
end

-- The CancelledError raised into cancelled tasks carries no traceback: it
-- is raised often and says where it came from by its message.
function M.cancelled(message)
  return setmetatable({ kind = "CancelledError", message = message or "cancelled" }, Error)
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

return M
