--- wait, gather and as_completed: waiting on many futures at once.
--
-- Each registers one waiter on every pending future and is woken by the
-- settles themselves: O(N) work in all, no polling, no CPU while waiting.
-- @module corral.wait
local core = require "corral.core"
local errors = require "corral.errors"
local sched = require "corral.sched"
local future = require "corral.future"
local progress = require "corral.progress"
local S = require("corral.fields").S

local is_future, add_waiter, remove_waiter = future.is_future, future.add_waiter, future.remove_waiter
local retrieve, raise_token, check_timeout = future.retrieve, future.raise_token, future.check_timeout
local DONE, FAILED, CANCELLED = future.DONE, future.FAILED, future.CANCELLED
local waiter, block, wake, WOKE = sched.waiter, sched.block, sched.wake, sched.WOKE
local now = core.now
local select, type, pairs = select, type, pairs

local M = {}

M.ReturnWhen = {
  ALL_COMPLETED = "ALL_COMPLETED",
  FIRST_COMPLETED = "FIRST_COMPLETED",
  FIRST_EXCEPTION = "FIRST_EXCEPTION",
}

-- ======================================================================== --
-- Arguments                                                                --
-- ======================================================================== --

-- Accept `fs[, opts]` (an array or a table of named futures) or futures as
-- varargs with an optional trailing options table. Returns the table of
-- futures, the array of its keys, whether it is named, and the options.
local KNOWN = {
  ["corral.wait"] = { timeout = true, return_when = true },
  ["corral.gather"] = { timeout = true, return_exceptions = true, iter = true, progress = true },
  ["corral.as_completed"] = { timeout = true, return_exceptions = true, progress = true },
}

local function collect(fname, ...)
  local first = ...
  local fs, opts
  if is_future(first) then
    local n = select("#", ...)
    fs = { ... }
    local last = fs[n]
    if n > 1 and type(last) == "table" and not is_future(last) then
      opts = last
      fs[n] = nil
    end
  else
    errors.check(type(first) == "table", fname, "fs", "a table of futures (or futures as arguments)", first)
    fs, opts = first, select(2, ...)
  end
  errors.check(opts == nil or type(opts) == "table", fname, "opts", "a table of options", opts)
  if opts then errors.check_options(fname, opts, KNOWN[fname]) end
  local n, count = #fs, 0
  for _ in pairs(fs) do count = count + 1 end
  local keys, named = {}, count ~= n
  if named then
    for k in pairs(fs) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b)
      local ta, tb = type(a), type(b)
      if ta ~= tb then return ta < tb end
      if ta == "string" or ta == "number" then return a < b end
      return tostring(a) < tostring(b)
    end)
  else
    for i = 1, n do keys[i] = i end
  end
  return fs, keys, named, opts or {}
end

local function deadline_of(fname, opts)
  check_timeout(fname, opts.timeout)
  return opts.timeout and now() + opts.timeout
end

-- The TimeoutError of gather: it names (the first ten of) the keys pending.
local function timeout_error(fname, fs, keys)
  local names = {}
  for i = 1, #keys do
    local f = fs[keys[i]]
    if is_future(f) and f[S] < DONE then
      names[#names + 1] = tostring(keys[i])
      if #names == 10 then
        names[#names + 1] = "..."
        break
      end
    end
  end
  local msg = fname .. " timed out; still pending: " .. table.concat(names, ", ")
  return errors.new("TimeoutError", msg, nil, 3)
end

-- Register `cb` on every pending future of fs. Returns a registration for
-- `unregister`. (Not a closure: LuaJIT traces keep the closures they call
-- alive, and this one would hold every input future.)
local function register(fs, keys, cb)
  local reg = { cb = cb, n = 0 }
  local n = 0
  for i = 1, #keys do
    local f = fs[keys[i]]
    if is_future(f) and f[S] < DONE then
      n = n + 1
      reg[2 * n - 1], reg[2 * n] = f, add_waiter(f, cb)
    end
  end
  reg.n = n
  return reg
end

local function unregister(reg)
  local cb = reg.cb
  for i = 1, reg.n do
    remove_waiter(reg[2 * i - 1], reg[2 * i], cb)
    reg[2 * i - 1] = nil
  end
  reg.n, reg.cb = 0, nil
end

-- ======================================================================== --
-- wait                                                                     --
-- ======================================================================== --

--- Wait for futures, like Python's `concurrent.futures.wait`.
-- @param fs an array of futures, a table of named futures, or futures as varargs
-- @tab[opt] opts `timeout` (seconds), `return_when` (`"ALL_COMPLETED"`,
-- `"FIRST_COMPLETED"`, `"FIRST_EXCEPTION"`)
-- @return done, not_done: arrays in input order, or tables with the same keys
function M.wait(...)
  local fname = "corral.wait"
  local fs, keys, named, opts = collect(fname, ...)
  local when = opts.return_when or "ALL_COMPLETED"
  errors.check(M.ReturnWhen[when] ~= nil, fname, "return_when",
    "ALL_COMPLETED, FIRST_COMPLETED or FIRST_EXCEPTION", when)
  local deadline = deadline_of(fname, opts)
  local left, any_done, any_failed = 0, false, false
  for i = 1, #keys do
    local f = fs[keys[i]]
    errors.check(is_future(f), fname, "fs[" .. tostring(keys[i]) .. "]", "a future", f)
    if f[S] < DONE then
      left = left + 1
    else
      any_done = true
      if f[S] == FAILED then any_failed = true end
    end
  end
  local satisfied = left == 0 or (when == "FIRST_COMPLETED" and any_done)
    or (when == "FIRST_EXCEPTION" and any_failed)
  if not satisfied then
    local w = waiter()
    local reg = register(fs, keys, function(f)
      left = left - 1
      if left == 0 or when == "FIRST_COMPLETED" or (when == "FIRST_EXCEPTION" and f[S] == FAILED) then
        wake(w, WOKE)
      end
    end)
    local tok = block(w, deadline)
    unregister(reg)
    if tok ~= WOKE and tok ~= sched.TIMEOUT then raise_token(tok, fname) end
  end
  local done, not_done = {}, {}
  for i = 1, #keys do
    local k = keys[i]
    local f = fs[k]
    local into = f[S] >= DONE and done or not_done
    if named then into[k] = f else into[#into + 1] = f end
  end
  return done, not_done
end

-- ======================================================================== --
-- gather                                                                   --
-- ======================================================================== --

-- The value a settled input stands for in gather's results.
local function value_of(f, return_exceptions)
  if not is_future(f) then return f, false end
  if f[S] == DONE then return future.first(f), false end
  if return_exceptions then
    retrieve(f)
    return f._e or errors.cancelled(), true
  end
  return nil, true
end

local function raise_failure(f)
  retrieve(f)
  if f[S] == CANCELLED then error(f._e or errors.cancelled(), 0) end
  error(f._e, 0)
end

local function gather_iter(fname, fs, keys, opts)
  local deadline = deadline_of(fname, opts)
  local rex = opts.return_exceptions
  -- The iterator's state lives in a table, emptied when it is used up, so
  -- that closures kept by JIT traces hold nothing large.
  local st = { fs = fs, keys = keys, ready = {}, head = 1, tail = 0, left = #keys,
    index = {}, w = false, prog = progress.new(opts.progress, #keys) }
  -- index: each pending future -> the keys it stands at (one future may be
  -- given under several keys: each key is yielded once)
  local pend_keys = {}
  for i = 1, #keys do
    local f = fs[keys[i]]
    if not is_future(f) or f[S] >= DONE then
      st.tail = st.tail + 1
      st.ready[st.tail] = keys[i]
    else
      local ks = st.index[f]
      if not ks then
        ks = {}
        st.index[f] = ks
        pend_keys[#pend_keys + 1] = keys[i]
      end
      ks[#ks + 1] = keys[i]
    end
  end
  st.reg = register(fs, pend_keys, function(f)
    local ks = st.index[f]
    for j = 1, #ks do
      local t = st.tail + 1
      st.tail = t
      st.ready[t] = ks[j]
    end
    if st.w then wake(st.w, WOKE) end
  end)
  local function close()
    unregister(st.reg)
    st.fs, st.keys, st.ready, st.index = {}, {}, {}, {}
  end
  return function()
    if st.left == 0 then return nil end
    while st.head > st.tail do
      st.w = waiter()
      local tok = block(st.w, deadline)
      st.w = false
      if tok == sched.TIMEOUT then
        local e = timeout_error(fname, st.fs, st.keys)
        close()
        st.left = 0
        error(e, 2)
      elseif tok ~= WOKE then
        close()
        st.left = 0
        raise_token(tok, fname)
      end
    end
    local k = st.ready[st.head]
    local f = st.fs[k]
    st.ready[st.head] = nil
    st.head = st.head + 1
    st.left = st.left - 1
    local v, failed = value_of(f, rex)
    local prog = st.prog
    if prog then
      prog:tick(failed)
      if st.left == 0 then prog:finish() end
    end
    if st.left == 0 then close() end
    if failed and not rex then raise_failure(f) end
    return k, v
  end
end

--- Wait for all the inputs and return their results.
-- An array gives an array of results in input order; a named table gives a
-- table with the same keys. A value that is not a future is taken as an
-- already finished result; each future gives its first result.
-- @param fs an array or table of futures (or futures as varargs)
-- @tab[opt] opts `timeout` (seconds: raises `TimeoutError` naming the keys
-- still pending), `return_exceptions` (error objects stand in the results
-- instead of raising the first failure), `iter` (return an iterator of
-- `key, value` in completion order), `progress` (true, `{desc=...}` or
-- `function(done, total, elapsed)`)
function M.gather(...)
  local fname = "corral.gather"
  local fs, keys, named, opts = collect(fname, ...)
  if opts.iter then return gather_iter(fname, fs, keys, opts) end
  local deadline = deadline_of(fname, opts)
  local rex = opts.return_exceptions
  local prog = progress.new(opts.progress, #keys)
  local left, first_failed = 0, nil
  for i = 1, #keys do
    local f = fs[keys[i]]
    if is_future(f) then
      local s = f[S]
      if s < DONE then
        left = left + 1
      elseif s ~= DONE and not first_failed then
        first_failed = f
      end
      if prog and s >= DONE then prog:count(s ~= DONE) end
    elseif prog then
      prog:count(false)
    end
  end
  if prog then prog:draw(false) end
  if left > 0 and (rex or not first_failed) then
    local w = waiter()
    local reg = register(fs, keys, function(f)
      left = left - 1
      local failed = f[S] ~= DONE
      if prog then prog:tick(failed) end
      if failed and not rex and not first_failed then
        first_failed = f
        wake(w, WOKE)
      elseif left == 0 then
        wake(w, WOKE)
      end
    end)
    local tok = block(w, deadline)
    unregister(reg)
    if tok == sched.TIMEOUT then
      error(timeout_error(fname, fs, keys), 2)
    elseif tok ~= WOKE then
      raise_token(tok, fname)
    end
  end
  if prog then prog:finish() end
  if first_failed and not rex then raise_failure(first_failed) end
  local out = {}
  if named then
    for i = 1, #keys do
      local k = keys[i]
      out[k] = value_of(fs[k], rex)
    end
  else
    for i = 1, #keys do out[i] = value_of(fs[i], rex) end
  end
  return out
end

--- Iterate `key, value` pairs of `fs` in completion order; same as
-- `gather(fs, {iter=true})`.
function M.as_completed(fs, opts)
  opts = opts or {}
  errors.check(type(opts) == "table", "corral.as_completed", "opts", "a table of options", opts)
  errors.check_options("corral.as_completed", opts, KNOWN["corral.as_completed"])
  local t = {}
  for k, v in pairs(opts) do t[k] = v end
  t.iter = true
  return M.gather(fs, t)
end

return M
