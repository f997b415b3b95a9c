--- Rate and concurrency limits, shared by reference with workers.
--
--     local lim = corral.limiter { rate = 50, per = 1 }   -- 50 a second
--     for _, url in ipairs(urls) do
--       corral.spawn(function() lim:acquire(); fetch(url) end)
--     end
--
-- A limiter is a table of corral objects (a lock, a cell holding its
-- state, a semaphore) and its methods as fields, so that it travels to
-- thread and process workers as an argument and every copy uses the same
-- limit. Waiters are served in the order they came: a rate limiter's
-- waiters queue on its lock, and the one at the head waits for its tokens
-- (the task only: other tasks run meanwhile).
-- @module corral.limiter
local errors = require "corral.errors"

local M = {}

local ALGORITHMS = { token_bucket = true, leaky_bucket = true, sliding_window = true,
  fixed_window = true, gcra = true }
local OPTIONS = { rate = true, per = true, burst = true, algorithm = true, concurrency = true }

-- ======================================================================== --
-- The methods (fields of each limiter: they travel with it as bytecode,
-- so they reach what they need through require, not upvalues)
-- ======================================================================== --

-- How long until n can pass now (0: now), and the state after they do.
local function need(self, st, n, t)
  local c = self._cfg
  local alg = c.algorithm
  local interval = c.per / c.rate -- seconds per unit
  if alg == "token_bucket" then
    local tokens = math.min(c.burst, st.tokens + (t - st.last) / interval)
    st.tokens, st.last = tokens, t
    if tokens >= n then
      st.tokens = tokens - n
      return 0
    end
    return (n - tokens) * interval
  elseif alg == "gcra" or alg == "leaky_bucket" then
    -- theoretical arrival time; `burst` units may come at once
    local tat = math.max(st.tat or t, t)
    local allow_at = tat + n * interval - c.burst * interval
    if allow_at <= t then
      st.tat = tat + n * interval
      return 0
    end
    return allow_at - t
  elseif alg == "fixed_window" then
    local w = math.floor(t / c.per)
    if st.window ~= w then st.window, st.count = w, 0 end
    if st.count + n <= c.rate then
      st.count = st.count + n
      return 0
    end
    return (w + 1) * c.per - t
  else -- sliding_window: the times of the last `rate` units
    local log = st.log or {}
    st.log = log
    local first = 1
    while first <= #log and log[first] <= t - c.per do first = first + 1 end
    if first > 1 then
      local kept = {}
      for i = first, #log do kept[#kept + 1] = log[i] end
      log = kept
      st.log = log
    end
    if #log + n <= c.rate then
      for _ = 1, n do log[#log + 1] = t end
      return 0
    end
    return log[#log + n - c.rate] + c.per - t
  end
end

local function check_n(fname, n)
  if n == nil then return 1 end
  if type(n) ~= "number" or n < 1 or n ~= math.floor(n) then
    require("corral.errors").check(false, fname, "n", "a whole number >= 1", n)
  end
  return n
end

-- acquire(n, timeout): true once n units may pass, false at the timeout.
local function acquire(self, n, timeout)
  local corral = require "corral"
  n = check_n("limiter:acquire", n)
  if self._sem then return self._sem:acquire(timeout) end
  if n > self._cfg.cap then
    require("corral.errors").usage("limiter:acquire", "%d units can never pass a limit of %d", n,
      self._cfg.cap)
  end
  local deadline = timeout and corral.now() + timeout
  if not self._lock:acquire(timeout) then return false end
  local ok, r = pcall(function()
    while true do
      local st = self._cell:get()
      local t = corral.now()
      local wait = need(self, st, n, t)
      self._cell:put(st)
      if wait <= 0 then return true end
      if deadline and t + wait > deadline then return false end
      corral.sleep(wait)
    end
  end)
  self._lock:release()
  if not ok then error(r, 0) end
  return r
end

-- try_acquire(n): true when n units pass now, else false.
local function try_acquire(self, n)
  local corral = require "corral"
  n = check_n("limiter:try_acquire", n)
  if self._sem then return self._sem:acquire(0) end
  if not self._lock:acquire(0) then return false end
  local st = self._cell:get()
  local wait = need(self, st, n, corral.now())
  self._cell:put(st)
  self._lock:release()
  return wait <= 0
end

-- release(): give back a unit of a concurrency limit (a rate limit's units
-- are spent: nothing to give back).
local function release(self)
  if self._sem then self._sem:release() end
end

-- with(n, fn, ...): acquire n, call fn, release (also on error); fn's results.
local function with(self, n, fn, ...)
  acquire(self, n)
  local function done(ok, ...)
    release(self)
    if not ok then error((...), 0) end
    return ...
  end
  return done(pcall(fn, ...))
end

-- ======================================================================== --
-- Making one                                                               --
-- ======================================================================== --

--- A limit: `{rate = r, per = s (1), burst = b (r), algorithm =
-- "token_bucket" (default), "leaky_bucket", "gcra", "sliding_window" or
-- "fixed_window"}` lets r units pass per s seconds; `{concurrency = n}`
-- lets n run at once. Methods: `acquire([n][, timeout])` (true, or false
-- at the timeout), `try_acquire([n])`, `release()` (a concurrency limit's
-- unit), `with(n, fn, ...)` (acquire, call, release even on error; fn's
-- results).
function M.new(opts)
  errors.check(type(opts) == "table", "corral.limiter", "opts", "a table", opts)
  errors.check_options("corral.limiter", opts, OPTIONS)
  local corral = require "corral"
  local lim = { acquire = acquire, try_acquire = try_acquire, release = release, with = with,
    _limiter = true }
  if opts.concurrency ~= nil then
    local c = opts.concurrency
    errors.check(type(c) == "number" and c >= 1 and c == math.floor(c), "corral.limiter",
      "opts.concurrency", "a whole number >= 1", c)
    errors.check(opts.rate == nil, "corral.limiter", "opts.rate", "nothing beside concurrency",
      opts.rate)
    lim._sem = corral.semaphore(c)
    return lim
  end
  local rate, per = opts.rate, opts.per or 1
  errors.check(type(rate) == "number" and rate > 0, "corral.limiter", "opts.rate",
    "a number > 0 (or give concurrency)", rate)
  errors.check(type(per) == "number" and per > 0, "corral.limiter", "opts.per", "seconds > 0", per)
  local alg = opts.algorithm or "token_bucket"
  errors.check(ALGORITHMS[alg] ~= nil, "corral.limiter", "opts.algorithm",
    '"token_bucket", "leaky_bucket", "gcra", "sliding_window" or "fixed_window"', alg)
  local burst = opts.burst or rate
  errors.check(type(burst) == "number" and burst >= 1, "corral.limiter", "opts.burst",
    "a number >= 1", burst)
  local windowed = alg == "fixed_window" or alg == "sliding_window"
  lim._cfg = { rate = rate, per = per, burst = burst, algorithm = alg,
    cap = windowed and rate or burst }
  lim._lock = corral.lock()
  lim._cell = corral.channel(1)
  lim._cell:put({ tokens = burst, last = corral.now() })
  return lim
end

return M
