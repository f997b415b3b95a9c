--- Worker options: the defaults (`corral.config`), their checks and bounds,
-- and the size of the default pool.
-- @module corral.worker_options
local core = require "corral.core"
local errors = require "corral.errors"

local type, pairs = type, pairs

local M = {}

local MODES = { thread = true, process = true, async = true, sync = true, remote = true }
local BALANCE = { round_robin = true, least_active = true, random = true }
-- Bounds: every thread costs a Lua state and two file descriptors; an inbox
-- bound is a C int.
local MAX_WORKERS, MAX_QUEUED, MAX_CONCURRENCY = 1024, 2 ^ 31 - 1, 2 ^ 31 - 1
local RANGE = { workers = MAX_WORKERS, pool_size = MAX_WORKERS, max_queued = MAX_QUEUED,
  max_concurrency = MAX_CONCURRENCY }

local function whole(v, max)
  return type(v) == "number" and v >= 1 and v <= max and v == math.floor(v)
end

local settings = {
  mode = "thread", workers = 1, balance = "round_robin", max_queued = 256,
  max_concurrency = 1, blocking = false, spare_worker = true,
}

-- The size of the default pool: from CORRAL_WORKERS, else one per CPU this
-- process may use (affinity, capped by its cgroup's quota).
local function pool_size()
  if settings.pool_size then return settings.pool_size end
  local env = os.getenv("CORRAL_WORKERS")
  if env == nil or env == "" then return core.ncpu() end
  local n = tonumber(env)
  if not whole(n, MAX_WORKERS) then
    errors.usage("corral", "the environment variable CORRAL_WORKERS must be a whole number from 1 to "
      .. "%d (got %q)", MAX_WORKERS, env)
  end
  return n
end

local function check_options(fname, o)
  errors.check(type(o) == "table", fname, "options", "a table", o)
  for k, v in pairs(o) do
    if k == "mode" then
      errors.check(MODES[v], fname, "mode", '"thread", "process", "async", "sync" or "remote"', v)
    elseif k == "balance" then
      errors.check(BALANCE[v], fname, "balance", '"round_robin", "least_active" or "random"', v)
    elseif RANGE[k] then
      errors.check(whole(v, RANGE[k]), fname, k, ("a whole number from 1 to %d"):format(RANGE[k]), v)
    elseif k == "blocking" or k == "restart" or (k == "spare_worker" and fname == "corral.config") then
      errors.check(type(v) == "boolean", fname, k, "a boolean", v)
    elseif k == "restart_limit" or k == "retries" then
      errors.check(type(v) == "number" and v >= 0 and v <= 1e6 and v == math.floor(v), fname, k,
        "a whole number from 0 to 1000000", v)
    elseif k == "timeout" then
      errors.check(type(v) == "number" and v > 0 and v < 1e9, fname, k,
        "a number of seconds > 0", v)
    elseif k == "cancel_grace" then
      errors.check(type(v) == "number" and v >= 0 and v <= 3600, fname, k,
        "a number of seconds from 0 to 3600", v)
    elseif k == "restart_backoff" then
      errors.check(type(v) == "number" and v >= 0 and v <= 10, fname, k,
        "a number of seconds from 0 to 10 (the longest wait)", v)
    elseif k == "retry" or k == "limits" then
      errors.check(fname ~= "corral.config", fname, k, "set per class (Class:options), not here", v)
      if k == "retry" then
        require("corral.worker_policy").normalize(fname, v, nil)
      else
        require("corral.worker_policy").normalize(fname, nil, v)
      end
    elseif k == "setup" then
      errors.check(fname ~= "corral.config", fname, k, "set per class (Class:options), not here", v)
      errors.check(type(v) == "function", fname, k, "a function", v)
    elseif k == "connection" then
      errors.check(fname ~= "corral.config", fname, k, "set per class (Class:options), not here", v)
      errors.check(require("corral.remote").is_connection(v), fname, k,
        "a connection (corral.connect)", v)
    elseif k == "pool" then
      errors.check(type(v) == "string" and v:find("^[%w_-]+$") ~= nil, fname, k,
        "a name of letters, digits, '_' and '-'", v)
    elseif k == "stateful" then
      errors.check(type(v) == "boolean", fname, k, "a boolean", v)
    elseif k == "name" then
      errors.check(type(v) == "string" and not v:find("%z"), fname, k, "a string (without NUL)", v)
    else
      errors.usage(fname, "unknown option '%s'", tostring(k))
    end
  end
end

--- Set process-wide defaults for worker options (`mode`, `workers`,
-- `balance`, `max_queued`, `max_concurrency`, `blocking`), the size of
-- the default pool (`pool_size`, also from `CORRAL_WORKERS`) and
-- `spare_worker` (true: once a thread worker has started, one more thread
-- is kept started ahead, its Lua state ready, for the next start; false:
-- none, and the one there is ends). Workers started afterwards take these
-- settings. Returns the settings in force.
function M.config(t)
  if t ~= nil then
    check_options("corral.config", t)
    errors.check(t.name == nil, "corral.config", "name", "not set here (name each class)", t.name)
    if t.pool_size and core.pool_get() and t.pool_size ~= pool_size() then
      errors.usage("corral.config", "the default pool already runs with %d workers: set pool_size "
        .. "before the first submit or map", pool_size())
    end
    for k, v in pairs(t) do settings[k] = v end
    if t.spare_worker ~= nil then core.spares(t.spare_worker) end
  end
  local copy = {}
  for k, v in pairs(settings) do copy[k] = v end
  copy.pool_size = pool_size()
  return copy
end

--- A worker's state takes its starter's settings as they are: no checks
-- (they were made where they were set) and nothing done to the runtime
-- (spare_worker is the runtime's, set by whoever calls config).
function M.adopt(t)
  for k, v in pairs(t) do settings[k] = v end
end

M.settings, M.pool_size, M.check = settings, pool_size, check_options

return M
