--- The worker options `retry` and `limits`: every call of such a worker
-- goes through `corral.retry` and its limiters.
--
--     local W = Fetcher:options {
--       workers = 4,
--       retry = { fetch = { max_retries = 5, delay = 0.5 }, ["*"] = { max_retries = 1 } },
--       limits = { corral.limiter { rate = 10, per = 1 } },
--     }
--
-- `retry`: the options of `corral.retry` for every method, or a table of
-- them per method name, `"*"` for the other methods. `limits`: a limiter,
-- a list of limiters, or a table of them per method name (`"*"` for the
-- rest). A call acquires each of its limiters in order (a rate limit's
-- token, a concurrency limit's permit, released when the call settles),
-- then goes to the worker; each attempt of a retried call does so again.
-- Such a call's future is a task's: cancelling it cancels the attempt
-- under way (the call on the worker, as `cancel` does) and the retries.
-- These apply to calls made through the handle `init` returned, in the
-- context that made it (a handle passed to another worker makes plain
-- calls there).
-- @module corral.worker_policy
local errors = require "corral.errors"
local patterns = require "corral.patterns"
local task = require "corral.task"

local type, pairs, pcall, error, select, unpack = type, pairs, pcall, error, select, unpack

local M = {}

local function pack(...) return { n = select("#", ...), ... } end

local function is_limiter(v)
  return type(v) == "table" and type(v.acquire) == "function" and type(v.with) == "function"
end

-- Whether `t` is options of corral.retry (not a table per method).
local function is_retry_options(t)
  for k, v in pairs(t) do
    if patterns.RETRY_OPTIONS[k] or type(v) ~= "table" then return true end
  end
  return next(t) == nil
end

local function limiter_list(fname, v, where)
  if is_limiter(v) then return { v } end
  errors.check(type(v) == "table" and #v >= 1, fname, where, "a limiter or a list of limiters", v)
  for i = 1, #v do
    errors.check(is_limiter(v[i]), fname, where .. "[" .. i .. "]", "a limiter (corral.limiter)", v[i])
  end
  return v
end

--- Check the options `retry` and `limits` and put them in the form calls
-- use: `{ retry = { [method] = opts }, limits = { [method] = {lim...} } }`
-- (`"*"`: the other methods); nil when neither is set.
function M.normalize(fname, retry, limits)
  if retry == nil and limits == nil then return nil end
  local p = { retry = {}, limits = {} }
  if retry ~= nil then
    errors.check(type(retry) == "table", fname, "retry",
      "the options of corral.retry, or a table of them per method", retry)
    if is_retry_options(retry) then
      patterns.check_retry(retry)
      p.retry["*"] = retry
    else
      for method, o in pairs(retry) do
        errors.check(type(method) == "string", fname, "retry", "a table per method name", retry)
        patterns.check_retry(o)
        p.retry[method] = o
      end
    end
  end
  if limits ~= nil then
    if is_limiter(limits) or (type(limits) == "table" and #limits >= 1) then
      p.limits["*"] = limiter_list(fname, limits, "limits")
    else
      errors.check(type(limits) == "table", fname, "limits",
        "a limiter, a list of limiters, or a table of them per method", limits)
      for method, v in pairs(limits) do
        errors.check(type(method) == "string", fname, "limits", "a table per method name", limits)
        p.limits[method] = limiter_list(fname, v, "limits." .. method)
      end
    end
  end
  return p
end

-- Call fn(...) inside every limiter of lims from the i-th on.
local function within(lims, i, fn, ...)
  if i > #lims then return fn(...) end
  return lims[i]:with(1, within, lims, i + 1, fn, ...)
end

--- A call of `method` under the handle's policy: a task's future. `raw`
-- is the plain call (`raw(h, method, ...)` gives the call's future).
function M.call(h, raw, method, ...)
  local p = h._policy
  local r = p.retry[method] or p.retry["*"]
  local lims = p.limits[method] or p.limits["*"]
  if not r and not lims then return raw(h, method, ...) end
  local n, args = select("#", ...), { ... }
  local function attempt()
    local f = raw(h, method, unpack(args, 1, n))
    local res = pack(pcall(f.result, f))
    if not res[1] then
      f:cancel() -- (the caller was cancelled: the call goes too; else a no-op)
      error(res[2], 0)
    end
    return unpack(res, 2, res.n)
  end
  local function one()
    if lims then return within(lims, 1, attempt) end
    return attempt()
  end
  if r then return task.spawn(patterns.retry, one, r) end
  return task.spawn(one)
end

return M
