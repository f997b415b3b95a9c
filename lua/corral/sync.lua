--- Channels and sync primitives, shared by every context.
--
--     local ch = corral.channel(16)
--     corral.spawn(function() for i = 1, 3 do ch:put(i) end; ch:close() end)
--     for v in ch:iter() do print(v) end        --> 1 2 3
--
-- Each object lives in C and is shared by reference: pass it to a thread
-- worker as an argument (or put it in a channel) and both sides use the
-- same one. Values put in a channel are copied in and out as the arguments
-- of a call are. Waiters are served in the order they came (FIFO). A wait
-- suspends only its task (outside any task it drives the loop); a waiting
-- task that is cancelled leaves the queue cleanly: a value or a permit that
-- was granted to it at that moment is given back.
--
-- Timeouts: `channel:put`/`get`, `queue:put`/`get`/`join` and
-- `barrier:wait` raise `TimeoutError`; `lock:acquire`,
-- `semaphore:acquire`, `event:wait` and `condition:wait` return false;
-- `corral.select` returns nil, "timeout".
-- @module corral.sync
local core = require "corral.core"
local errors = require "corral.errors"
local sched = require "corral.sched"
local future = require "corral.future"

local type, pcall, error, select, floor = type, pcall, error, select, math.floor
local random = math.random
local now, waiter, block, wake = core.now, sched.waiter, sched.block, sched.wake
local expect, unexpect, wake_key = sched.expect, sched.unexpect, sched.wake_key
local WOKE, TIMEOUT, CANCEL = sched.WOKE, sched.TIMEOUT, sched.CANCEL
local c_select, c_finish, c_claim = core.sync_select, core.sync_finish, core.sync_claim
local c_new, c_kind, c_count, c_info = core.sync_new, core.sync_kind, core.sync_count, core.sync_info

local M = {}
local rwait -- (a wait on a parent's object: defined with them, below)

-- Kinds and operations, as sync.c numbers them.
local CHANNEL, QUEUE, SEMAPHORE, LOCK, EVENT, CONDITION, BARRIER = 1, 2, 3, 4, 5, 6, 7
local PUT, GET, ACQUIRE, EVENT_WAIT, NOTIFY, BARRIER_WAIT, JOIN = 1, 2, 3, 4, 5, 6, 7
local QUEUED, GRANTED, CLOSED, BROKEN, UNREADABLE = 0, 1, 2, 3, 6
local KIND_NAME = { "channel", "queue", "semaphore", "lock", "event", "condition", "barrier" }

local woken = {}
local function wake_woken(n)
  for i = 1, n do
    local k = woken[i]
    woken[i] = nil
    wake_key(k)
  end
end

local function check_timeout(fname, timeout)
  if timeout ~= nil then
    errors.check(type(timeout) == "number" and timeout >= 0, fname, "timeout",
      "a number of seconds >= 0", timeout)
  end
end

local function self_check(x, kind, fname)
  if c_kind(x) ~= kind then
    errors.check(false, fname, "self", "a " .. KIND_NAME[kind] .. " (call it with ':')", x)
  end
end

-- Operations whose grant is given back when its waiter does not take it.
local UNDOABLE = { [GET] = true, [ACQUIRE] = true }

-- A value got that cannot be decoded here (a module it names is not
-- loaded, say): it is dropped, and the getter gets a CodecError.
local function unreadable(fname, why, level)
  error(errors.codec(fname .. ": the value got cannot be decoded here (it is dropped): "
    .. tostring(why), level + 1), level + 1)
end

--- Do `op` on `s`, waiting when it cannot happen now. Returns the state
-- (GRANTED, CLOSED, BROKEN) and the value (a get's) or index (a
-- barrier's); raises TimeoutError or CancelledError (`soft`: returns
-- false at the timeout instead).
local function wait_op(fname, s, op, x, timeout, soft)
  local st, rec, v, nk = c_select(true, 1, s, op, x)
  if st == nil then error(errors.codec(fname .. ": " .. rec, 3), 3) end
  if st ~= QUEUED then
    if nk > 0 then wake_woken(nk) end
    if st == UNREADABLE then unreadable(fname, v, 3) end
    return st, v
  end
  local w = waiter()
  expect(rec, w)
  local tok = block(w, timeout and now() + timeout)
  unexpect(rec)
  local abandon = tok ~= WOKE
  local st2, v2, _, nk2 = c_finish(rec, abandon and UNDOABLE[op] == true)
  if nk2 > 0 then wake_woken(nk2) end
  if st2 == UNREADABLE then unreadable(fname, v2, 3) end
  if tok ~= WOKE then
    if st2 == GRANTED and not UNDOABLE[op] then
      -- it happened (a put went, the event was set): the cancel comes
      -- at the task's next wait
      if tok == CANCEL then w._cancel_req = true end
      return st2, v2
    end
    if tok == TIMEOUT and soft then return false end
    future.raise_token(tok, fname)
  end
  return st2, v2
end
M.wait_op = wait_op

-- A sync call that never waits: its woken waiters are woken here.
local function now_op(f, ...)
  local r, nk = f(...)
  if nk > 0 then wake_woken(nk) end
  return r
end

local function closed_error(fname, level)
  return errors.new("ClosedError", fname .. ": the channel is closed", nil, level + 1)
end

-- ======================================================================== --
-- Channels                                                                 --
-- ======================================================================== --

local Channel = {}

-- A channel lives on the Lua side of the context that made it until it is
-- first shared (encoded: passed to a worker, put in another channel): its
-- values and waiters are here, and an operation costs no C call. Numbers,
-- booleans and strings are kept as they are (immutable: a copy changes
-- nothing), other values encoded into an item box (a copy, checked as a
-- call's arguments are). When it is shared, `share` moves everything to its
-- C object; its waiters then do their operation again there.
local locals = setmetatable({}, { __mode = "k" })
local c_box, c_unbox = core.sync_box, core.sync_unbox

-- FIFO queues of waiting entries: { w = waiter, v = value, gone = bool }
local function q_new() return { h = 1, t = 0 } end
local function q_push(q, e)
  local t = q.t + 1
  q.t = t
  q[t] = e
end
local function q_pop(q)
  local h = q.h
  while h <= q.t do
    local e = q[h]
    q[h] = nil
    h = h + 1
    if not e.gone then
      q.h = h
      return e
    end
  end
  q.h, q.t = 1, 0
  return nil
end

-- Wake every entry of q, marked with `why` (true).
local function wake_all(q, why)
  local e = q_pop(q)
  while e do
    e[why] = true
    wake(e.w, WOKE)
    e = q_pop(q)
  end
end

local function unbox(fname, x, level)
  if type(x) ~= "userdata" then return x end
  local v, why = c_unbox(x)
  if v == nil and why ~= nil then unreadable(fname, why, level + 1) end
  return v
end

-- The value as the channel keeps it (raises CodecError for one that
-- cannot travel).
local function keep(fname, v)
  local t = type(v)
  if t == "number" or t == "string" or t == "boolean" then return v end
  local b, why = c_box(v)
  if b == nil then error(errors.codec(fname .. ": " .. why, 3), 3) end
  return b
end

-- ring of values: st[1..] as a FIFO (st.rh .. st.rt)
local function r_push(st, x)
  local t = st.rt + 1
  st.rt = t
  st[t] = x
end
local function r_pop(st)
  local h = st.rh
  local x = st[h]
  st[h] = nil
  if h == st.rt then st.rh, st.rt = 1, 0 else st.rh = h + 1 end
  return x
end

-- A put that can happen now on a local channel: to the first waiting
-- getter, or into the ring; false when it would wait.
local function offer(st, x)
  local g = q_pop(st.getters)
  if g ~= nil then
    g.v, g.ok = x, true
    wake(g.w, WOKE)
    return true
  end
  if st.rt - st.rh + 1 < st.cap then
    r_push(st, x)
    return true
  end
  return false
end

--- A channel holding up to `capacity` values (0: unbuffered, a put waits
-- for its get).
-- @int[opt=0] capacity
function M.channel(capacity)
  capacity = capacity or 0
  errors.check(type(capacity) == "number" and capacity >= 0 and capacity == floor(capacity)
    and capacity < 2 ^ 31, "corral.channel", "capacity", "a whole number >= 0", capacity)
  local ch = c_new(CHANNEL, capacity, nil, true)
  locals[ch] = { cap = capacity, rh = 1, rt = 0, closed = false, getters = q_new(),
    putters = q_new() }
  return ch
end

-- Move a channel of this context's Lua side to its C object (called by the
-- encoder, through the registry, as the channel is first encoded).
local function share(ch)
  local st = locals[ch]
  if st == nil then return end
  locals[ch] = nil
  core.sync_set_local(ch, false)
  for i = st.rh, st.rt do
    if not core.sync_adopt(ch, st[i]) then error("corral: not enough memory", 0) end
    st[i] = nil
  end
  if st.closed then core.sync_close(ch) end
  -- its waiters do their operation again, on the C object
  wake_all(st.putters, "retry")
  wake_all(st.getters, "retry")
end
M.share = share

local function time_left(deadline)
  if deadline == nil then return nil end
  local l = deadline - now()
  return l > 0 and l or 0
end

--- Put `v` (any value that can travel, not nil): waits while the channel
-- is full. Raises `ClosedError` on a closed channel, `TimeoutError` when
-- `timeout` seconds pass first.
function Channel:put(v, timeout)
  local st = locals[self]
  if st == nil then self_check(self, CHANNEL, "channel:put") end
  if v == nil then errors.usage("channel:put", "a channel carries values: nil cannot be put") end
  if timeout ~= nil then check_timeout("channel:put", timeout) end
  if st ~= nil then
    if st.closed then error(closed_error("channel:put", 2), 2) end
    local x = keep("channel:put", v)
    -- (a value holding the channel itself shares it as it is encoded)
    if locals[self] ~= st then return Channel.put(self, v, timeout) end
    if offer(st, x) then return true end
    local deadline = timeout and now() + timeout
    local e = { w = waiter(), v = x }
    q_push(st.putters, e)
    local tok = block(e.w, deadline)
    if e.ok then -- it was taken
      if tok == CANCEL then e.w._cancel_req = true end
      return true
    end
    e.gone = true
    if e.closed then error(closed_error("channel:put", 2), 2) end
    if e.retry then return Channel.put(self, v, time_left(deadline)) end
    future.raise_token(tok, "channel:put")
  end
  if wait_op("channel:put", self, PUT, v, timeout) == CLOSED then
    error(closed_error("channel:put", 2), 2)
  end
  return true
end

-- A value out of a local channel's ring, and a waiting putter's into it.
local function take(st)
  local x = r_pop(st)
  local p = st.rt - st.rh + 1 < st.cap and q_pop(st.putters) or nil
  if p ~= nil then
    r_push(st, p.v)
    p.ok = true
    wake(p.w, WOKE)
  end
  return x
end

-- A get that can happen now on a local channel: true and the value (from
-- the ring, or from a waiting putter), or false.
local function take_now(st)
  if st.rt >= st.rh then return true, take(st) end
  local p = q_pop(st.putters)
  if p == nil then return false end
  p.ok = true
  wake(p.w, WOKE)
  return true, p.v
end

--- The next value: waits while the channel is empty. On a closed channel
-- that is drained returns nil, "closed".
function Channel:get(timeout)
  local st = locals[self]
  if st == nil then self_check(self, CHANNEL, "channel:get") end
  if timeout ~= nil then check_timeout("channel:get", timeout) end
  if st ~= nil then
    local got, x = take_now(st)
    if got then return unbox("channel:get", x, 1) end
    if st.closed then return nil, "closed" end
    local deadline = timeout and now() + timeout
    local e = { w = waiter() }
    q_push(st.getters, e)
    local tok = block(e.w, deadline)
    if e.ok then
      if tok ~= WOKE then
        -- it came as the wait ended: back to the head, for the next getter
        local g = q_pop(st.getters)
        if g ~= nil then
          g.v, g.ok = e.v, true
          wake(g.w, WOKE)
        else
          local h = st.rh - 1
          st.rh = h
          st[h] = e.v
          if st.rt < h then st.rt = h end
        end
        future.raise_token(tok, "channel:get")
      end
      return unbox("channel:get", e.v, 1)
    end
    e.gone = true
    if e.closed then return nil, "closed" end
    if e.retry then return Channel.get(self, time_left(deadline)) end
    future.raise_token(tok, "channel:get")
  end
  local s, v = wait_op("channel:get", self, GET, nil, timeout)
  if s == CLOSED then return nil, "closed" end
  return v
end

--- Put `v` only if that can happen now: true, or false (full).
function Channel:try_put(v)
  local st = locals[self]
  if st == nil then self_check(self, CHANNEL, "channel:try_put") end
  if v == nil then errors.usage("channel:try_put", "a channel carries values: nil cannot be put") end
  if st ~= nil then
    if st.closed then error(closed_error("channel:try_put", 2), 2) end
    local x = keep("channel:try_put", v)
    if locals[self] ~= st then return Channel.try_put(self, v) end
    return offer(st, x)
  end
  local r, why, _, nk = c_select(false, 1, self, PUT, v)
  if r == nil then error(errors.codec("channel:try_put: " .. why, 2), 2) end
  if nk > 0 then wake_woken(nk) end
  if r == CLOSED then error(closed_error("channel:try_put", 2), 2) end
  return r == GRANTED
end

--- The next value if there is one now; else nil, "empty" (or "closed").
function Channel:try_get()
  local st = locals[self]
  if st == nil then self_check(self, CHANNEL, "channel:try_get") end
  if st ~= nil then
    local got, x = take_now(st)
    if got then return unbox("channel:try_get", x, 1) end
    return nil, st.closed and "closed" or "empty"
  end
  local r, _, v, nk = c_select(false, 1, self, GET)
  if nk > 0 then wake_woken(nk) end
  if r == UNREADABLE then unreadable("channel:try_get", v, 1) end
  if r == GRANTED then return v end
  return nil, r == CLOSED and "closed" or "empty"
end

--- Close: puts raise `ClosedError` from now on, waiting getters get nil,
-- "closed"; values in the channel can still be got. True when it was open.
function Channel:close()
  local st = locals[self]
  if st ~= nil then
    if st.closed then return false end
    st.closed = true
    wake_all(st.getters, "closed")
    wake_all(st.putters, "closed")
    return true
  end
  self_check(self, CHANNEL, "channel:close")
  return now_op(core.sync_close, self)
end

--- Whether it is closed.
function Channel:closed()
  local st = locals[self]
  if st ~= nil then return st.closed end
  self_check(self, CHANNEL, "channel:closed")
  local _, closed = c_info(self)
  return closed
end

--- An iterator over the values, until the channel is closed and drained.
function Channel:iter()
  self_check(self, CHANNEL, "channel:iter")
  return function()
    local v = self:get()
    return v
  end
end

-- ======================================================================== --
-- Queues (asyncio.Queue)                                                   --
-- ======================================================================== --

local Queue = {}

--- A queue of up to `maxsize` values (0 or less: no limit) with
-- `task_done` and `join`, as asyncio.Queue.
function M.queue(maxsize)
  maxsize = maxsize or 0
  errors.check(type(maxsize) == "number" and maxsize == floor(maxsize) and maxsize < 2 ^ 31,
    "corral.queue", "maxsize", "a whole number", maxsize)
  return c_new(QUEUE, maxsize <= 0 and -1 or maxsize)
end

--- Put `v`, waiting while the queue is full.
function Queue:put(v, timeout)
  self_check(self, QUEUE, "queue:put")
  if v == nil then errors.usage("queue:put", "a queue carries values: nil cannot be put") end
  check_timeout("queue:put", timeout)
  wait_op("queue:put", self, PUT, v, timeout)
  return true
end

--- The next value, waiting while the queue is empty.
function Queue:get(timeout)
  self_check(self, QUEUE, "queue:get")
  check_timeout("queue:get", timeout)
  local _, v = wait_op("queue:get", self, GET, nil, timeout)
  return v
end

--- Put now: true, or false when full.
function Queue:put_nowait(v)
  self_check(self, QUEUE, "queue:put_nowait")
  if v == nil then errors.usage("queue:put_nowait", "a queue carries values: nil cannot be put") end
  local st, why, _, nk = c_select(false, 1, self, PUT, v)
  if st == nil then error(errors.codec("queue:put_nowait: " .. why, 2), 2) end
  if nk > 0 then wake_woken(nk) end
  return st == GRANTED
end

--- Get now: the value, or nil when empty.
function Queue:get_nowait()
  self_check(self, QUEUE, "queue:get_nowait")
  local st, _, v, nk = c_select(false, 1, self, GET)
  if nk > 0 then wake_woken(nk) end
  if st == UNREADABLE then unreadable("queue:get_nowait", v, 1) end
  if st == GRANTED then return v end
  return nil
end

--- A value got earlier is dealt with. Raises `UsageError` when called more
-- times than values were put.
function Queue:task_done()
  self_check(self, QUEUE, "queue:task_done")
  if not now_op(core.sync_task_done, self) then
    errors.usage("queue:task_done", "called more times than there were values put")
  end
end

--- Wait until every value put has been got and marked done.
function Queue:join(timeout)
  self_check(self, QUEUE, "queue:join")
  check_timeout("queue:join", timeout)
  wait_op("queue:join", self, JOIN, nil, timeout)
  return true
end

--- Values in the queue now.
function Queue:qsize() return c_count(self) end
function Queue:empty() return c_count(self) == 0 end
--- The most it holds (0: no limit).
function Queue:maxsize()
  local cap = select(6, c_info(self))
  return cap > 0 and cap or 0
end
function Queue:full()
  local m = self:maxsize()
  return m > 0 and c_count(self) >= m
end

-- ======================================================================== --
-- Locks and semaphores                                                     --
-- ======================================================================== --

local Lock, Semaphore = {}, {}

--- A lock (a semaphore of one permit that a release of an unlocked lock
-- refuses).
function M.lock() return c_new(LOCK, 1) end

--- A semaphore of `n` permits.
function M.semaphore(n)
  n = n or 1
  errors.check(type(n) == "number" and n >= 0 and n == floor(n) and n < 2 ^ 31,
    "corral.semaphore", "n", "a whole number >= 0", n)
  return c_new(SEMAPHORE, n)
end

local function acquire(self, kind, fname, timeout)
  self_check(self, kind, fname)
  check_timeout(fname, timeout)
  return wait_op(fname, self, ACQUIRE, 1, timeout, true) == GRANTED
end

--- Acquire: true, or false when `timeout` seconds pass first.
function Lock:acquire(timeout) return acquire(self, LOCK, "lock:acquire", timeout) end
--- Release; raises `UsageError` when it is not locked.
function Lock:release()
  self_check(self, LOCK, "lock:release")
  if not now_op(core.sync_release, self, 1) then
    errors.usage("lock:release", "the lock is not locked")
  end
end
--- Whether it is held.
function Lock:locked() return c_count(self) == 0 end

function Semaphore:acquire(timeout) return acquire(self, SEMAPHORE, "semaphore:acquire", timeout) end
--- Give back `n` permits (default 1).
function Semaphore:release(n)
  self_check(self, SEMAPHORE, "semaphore:release")
  n = n or 1
  errors.check(type(n) == "number" and n >= 1 and n == floor(n), "semaphore:release", "n",
    "a whole number >= 1", n)
  now_op(core.sync_release, self, n)
end
--- The permits free now.
function Semaphore:value() return c_count(self) end
function Semaphore:locked() return c_count(self) == 0 end

-- fn(...) with the lock held: released on error too; returns fn's results.
local function with(self, fname, fn, ...)
  errors.check(type(fn) == "function" or (getmetatable(fn) or {}).__call ~= nil, fname, "fn",
    "a function", fn)
  self:acquire()
  local function done(ok, ...)
    self:release()
    if not ok then error((...), 0) end
    return ...
  end
  return done(pcall(fn, ...))
end

--- Call `fn(...)` holding the lock; it is released when fn returns or
-- raises. Returns fn's results.
function Lock:with(fn, ...) return with(self, "lock:with", fn, ...) end
function Semaphore:with(fn, ...) return with(self, "semaphore:with", fn, ...) end

-- ======================================================================== --
-- Events                                                                   --
-- ======================================================================== --

local Event = {}

--- An event: a flag that tasks wait for.
function M.event() return c_new(EVENT, 0) end
--- Set the flag: every waiter wakes.
function Event:set() self_check(self, EVENT, "event:set"); now_op(core.sync_set, self, true) end
--- Clear the flag.
function Event:clear() self_check(self, EVENT, "event:clear"); now_op(core.sync_set, self, false) end
function Event:is_set() self_check(self, EVENT, "event:is_set"); return c_count(self) ~= 0 end
--- Wait until set: true, or false when `timeout` seconds pass first.
function Event:wait(timeout)
  self_check(self, EVENT, "event:wait")
  check_timeout("event:wait", timeout)
  return wait_op("event:wait", self, EVENT_WAIT, nil, timeout, true) == GRANTED
end

-- ======================================================================== --
-- Conditions                                                               --
-- ======================================================================== --

local Condition = {}
local cond_locks = setmetatable({}, { __mode = "k" })

--- A condition variable over `lock` (a new lock when none is given).
function M.condition(lock)
  if lock == nil then lock = M.lock() end
  errors.check(c_kind(lock) == LOCK, "corral.condition", "lock", "a corral.lock()", lock)
  local c = c_new(CONDITION, 0, lock)
  cond_locks[c] = lock
  return c
end

local function lock_of(c)
  local l = cond_locks[c]
  if l == nil then
    l = core.sync_lock_of(c)
    cond_locks[c] = l
  end
  return l
end

function Condition:lock() return lock_of(self) end
function Condition:acquire(timeout) return lock_of(self):acquire(timeout) end
function Condition:release() return lock_of(self):release() end
function Condition:locked() return lock_of(self):locked() end
function Condition:with(fn, ...) return lock_of(self):with(fn, ...) end

--- Release the lock, wait for a notify, take the lock again (also when
-- cancelled, before `CancelledError` is raised: a cancel that came while
-- it waited, or while it took the lock back, is raised even when it was
-- notified). True when notified, false when `timeout` seconds passed
-- first. The lock must be held.
function Condition:wait(timeout)
  self_check(self, CONDITION, "condition:wait")
  check_timeout("condition:wait", timeout)
  local lock = lock_of(self)
  if not lock:locked() then errors.usage("condition:wait", "the lock is not held") end
  local _, remote = c_kind(self)
  local rec
  if remote then
    rec = core.sync_remote(self, NOTIFY, 0)
  else
    local st
    st, rec = c_select(true, 1, self, NOTIFY, 0)
    if st ~= QUEUED then error("corral: internal: a condition's wait did not queue") end
  end
  local w = waiter()
  expect(rec, w)
  lock:release()
  local tok
  if remote then
    local cancelled
    tok, cancelled = rwait(rec, w, timeout and now() + timeout)
    if cancelled then tok = CANCEL end
  else
    tok = block(w, timeout and now() + timeout)
    unexpect(rec)
  end
  local st2, _, _, nk = c_finish(rec, false)
  if nk > 0 then wake_woken(nk) end
  -- the lock again, whatever happened (a cancel meanwhile is kept for later)
  local cancelled = tok == CANCEL
  while true do
    local ok, e = pcall(lock.acquire, lock)
    if ok then break end
    if not errors.is_error(e, "CancelledError") then error(e, 0) end
    cancelled = true
  end
  if cancelled then error(errors.cancelled(), 2) end
  if st2 == GRANTED then return true end
  if tok ~= WOKE and tok ~= TIMEOUT then future.raise_token(tok, "condition:wait") end
  return false
end

--- Wait until `pred()` is true (checked first, then after each notify);
-- returns its last value (false-ish when `timeout` passed first).
function Condition:wait_for(pred, timeout)
  self_check(self, CONDITION, "condition:wait_for")
  errors.check(type(pred) == "function", "condition:wait_for", "pred", "a function", pred)
  check_timeout("condition:wait_for", timeout)
  local deadline = timeout and now() + timeout
  local r = pred()
  while not r do
    local left = deadline and deadline - now()
    if left and left <= 0 then return r end
    self:wait(left)
    r = pred()
  end
  return r
end

--- Wake up to `n` (default 1) waiters: how many woke. The lock must be held.
function Condition:notify(n)
  self_check(self, CONDITION, "condition:notify")
  n = n or 1
  errors.check(type(n) == "number" and n >= 0, "condition:notify", "n", "a number >= 0", n)
  if not lock_of(self):locked() then errors.usage("condition:notify", "the lock is not held") end
  return now_op(core.sync_notify, self, n)
end

function Condition:notify_all() return self:notify(2 ^ 31) end

-- ======================================================================== --
-- Barriers                                                                 --
-- ======================================================================== --

local Barrier = {}

--- A barrier for `n` parties.
function M.barrier(n)
  errors.check(type(n) == "number" and n >= 1 and n == floor(n) and n < 2 ^ 31, "corral.barrier",
    "n", "a whole number >= 1", n)
  return c_new(BARRIER, n)
end

local function broken_error(fname, level)
  return errors.new("BrokenBarrierError", fname .. ": the barrier is broken", nil, level + 1)
end

--- Wait until `n` parties have arrived: returns this one's arrival index
-- (0 to n - 1). Raises `BrokenBarrierError` when the barrier is (or gets)
-- broken; at `timeout` the barrier breaks and this wait raises `TimeoutError`.
function Barrier:wait(timeout)
  self_check(self, BARRIER, "barrier:wait")
  check_timeout("barrier:wait", timeout)
  local ok, st, v = pcall(wait_op, "barrier:wait", self, BARRIER_WAIT, nil, timeout)
  if not ok then
    if errors.is_error(st, "TimeoutError") then now_op(core.sync_close, self) end
    error(st, 0)
  end
  if st == BROKEN then error(broken_error("barrier:wait", 2), 2) end
  return v
end

--- Break the barrier: its waiters and later waits raise `BrokenBarrierError`.
function Barrier:abort() self_check(self, BARRIER, "barrier:abort"); now_op(core.sync_close, self) end
--- Back to its first state (waiters now fail as broken).
function Barrier:reset() self_check(self, BARRIER, "barrier:reset"); now_op(core.sync_reset, self) end
function Barrier:broken()
  self_check(self, BARRIER, "barrier:broken")
  local _, b = c_info(self)
  return b
end
--- Parties waiting now.
function Barrier:n_waiting() return c_count(self) end

-- ======================================================================== --
-- select                                                                   --
-- ======================================================================== --

local OPS = { get = GET, put = PUT }

--- Wait on several channel operations and futures at once and do exactly
-- one: `corral.select({ {ch1, "get"}, {ch2, "put", v}, {fut} }, {timeout=})`.
-- Returns the index of the case done and its value (a get's value, or nil,
-- "closed" for a closed and drained channel; true for a put; the future for
-- a future); nil, "timeout" when the timeout passes first. When several are
-- ready one is picked at random (fair).
function M.select(cases, opts)
  errors.check(type(cases) == "table" and #cases >= 1 and #cases <= 64, "corral.select", "cases",
    "a list of 1 to 64 cases", cases)
  local timeout
  if opts ~= nil then
    errors.check(type(opts) == "table", "corral.select", "opts", "a table", opts)
    errors.check_options("corral.select", opts, { timeout = true })
    timeout = opts.timeout
    check_timeout("corral.select", timeout)
  end
  local n = #cases
  -- a random order: fair when several are ready
  local order = {}
  for i = 1, n do
    local c = cases[i]
    errors.check(type(c) == "table", "corral.select", "cases[" .. i .. "]", "a table", c)
    local x = c[1]
    if future.is_future(x) then
      order[i] = i
    else
      local k, remote = c_kind(x)
      errors.check(k == CHANNEL, "corral.select", "cases[" .. i .. "][1]", "a channel or a future", x)
      if remote then
        errors.usage("corral.select", "cases[%d]: a channel of the parent process cannot be "
          .. "selected on in a process worker (use its get or put)", i)
      end
      share(x) -- (a select waits on the C objects)
      errors.check(OPS[c[2]] ~= nil, "corral.select", "cases[" .. i .. "][2]", '"get" or "put"', c[2])
      if c[2] == "put" and c[3] == nil then
        errors.usage("corral.select", "cases[%d]: a channel carries values: nil cannot be put", i)
      end
      order[i] = i
    end
  end
  for i = n, 2, -1 do
    local j = random(i)
    order[i], order[j] = order[j], order[i]
  end
  -- what is ready now, in that order: channels up to the first done future
  local args, na, map = {}, 0, {}
  local function flush(wait)
    if na == 0 then return nil end
    local r = { c_select(wait, na / 3, unpack(args, 1, na)) }
    if r[1] == nil then error(errors.codec("corral.select: " .. r[2], 3), 3) end
    return r
  end
  local function outcome(i, st, v)
    local c = cases[i]
    if st == UNREADABLE then unreadable("corral.select", v, 2) end
    if st == CLOSED then
      if c[2] == "put" then error(closed_error("corral.select", 3), 3) end
      return i, nil, "closed"
    end
    if c[2] == "put" then return i, true end
    return i, v
  end
  for k = 1, n do
    local i = order[k]
    local c = cases[i]
    if future.is_future(c[1]) then
      if c[1]:done() then
        local r = flush(false)
        if r and r[1] ~= QUEUED then
          if r[4] > 0 then wake_woken(r[4]) end
          return outcome(map[r[2]], r[1], r[3])
        end
        return i, c[1]
      end
    else
      na = na + 3
      args[na - 2], args[na - 1], args[na] = c[1], OPS[c[2]], c[3]
      map[na / 3] = i
    end
  end
  -- nothing ready among the futures: the channels, waiting this time
  local nfut = n - na / 3
  local r
  if na > 0 then
    r = flush(2) -- (2: as one select, even of one channel)
    if r[1] ~= QUEUED then
      if r[4] > 0 then wake_woken(r[4]) end
      return outcome(map[r[2]], r[1], r[3])
    end
  end
  local w = waiter()
  local nrec = na / 3
  for k = 1, nrec do expect(r[k + 1], w) end
  -- futures: the first to settle wins the select (if no channel did)
  local won_future
  local hooks = {}
  if nfut > 0 then
    for i = 1, n do
      local f = cases[i][1]
      if future.is_future(f) then
        local function hook()
          if won_future then return end
          if nrec == 0 or c_claim(r[2], 1000 + i) then
            won_future = i
            wake(w, WOKE, nil)
          end
        end
        hooks[#hooks + 1] = { f, future.add_waiter(f, hook), hook }
      end
    end
  end
  local tok = block(w, timeout and now() + timeout)
  for k = 1, #hooks do future.remove_waiter(hooks[k][1], hooks[k][2], hooks[k][3]) end
  -- the timeout or a cancel wins the select unless a case won first
  local gave_up = tok ~= WOKE and not won_future and (nrec == 0 or c_claim(r[2], 999))
  local result_i, result_st, result_v
  for k = 1, nrec do
    local rec = r[k + 1]
    unexpect(rec)
    local st, v, won, nk = c_finish(rec, false)
    if nk > 0 then wake_woken(nk) end
    if won == k then result_i, result_st, result_v = map[k], st, v end
    -- (an unreadable value is raised once every record is finished)
  end
  if gave_up then
    if tok == TIMEOUT then return nil, "timeout" end
    future.raise_token(tok, "corral.select")
  end
  if tok == CANCEL then w._cancel_req = true end
  if won_future then return won_future, cases[won_future][1] end
  return outcome(result_i, result_st, result_v)
end

-- ======================================================================== --
-- The parent's objects, in a process worker                                --
-- ======================================================================== --

-- In a process worker, an object that a call gave it is the parent's: each
-- operation is a request to the parent, which waits on the worker's behalf
-- and answers. Every method is then a wait (a short one for those that
-- never wait in the parent). Values go as bytes: no futures, buffers or
-- channels inside them.
local TRY_PUT, TRY_GET, CLOSE, RELEASE, SET, NOTIFY_N, TASK_DONE, RESET, INFO =
  16, 17, 18, 19, 20, 21, 22, 23, 24
local c_remote, c_rcancel = core.sync_remote, core.sync_rcancel

-- Wait for the parent's answer to the request `rec` until `deadline`. A
-- task that gives up (the timeout, a cancel) asks the parent to withdraw
-- it and still waits for the answer, which is GONE or the grant that came
-- first: a request is never both done and given up. Returns the first
-- token, and whether a cancel came meanwhile.
function rwait(rec, w, deadline)
  local tok = block(w, deadline)
  local cancelled = tok == CANCEL
  if tok ~= WOKE and not c_rcancel(rec) then
    while true do
      local t2 = block(w)
      if t2 == WOKE then break end
      if t2 == CANCEL then cancelled = true end
      if t2 == sched.FOREVER then break end
    end
  end
  unexpect(rec)
  return tok, cancelled
end

local function rop(fname, s, op, n, v, timeout, soft)
  local rec, why = c_remote(s, op, n, v)
  if rec == nil then error(errors.codec(fname .. ": " .. tostring(why), 3), 3) end
  local w = waiter()
  expect(rec, w)
  local tok, cancelled = rwait(rec, w, timeout and now() + timeout)
  local st, v2, _, _, count, closed, unfinished, waiting, putting, cap = c_finish(rec, false)
  if st == UNREADABLE then
    if cancelled then w._cancel_req = true end
    error(errors.codec(fname .. ": the value cannot come to this process worker (it holds a "
      .. "future, a buffer or a channel, or cannot be decoded here); it stays in the channel", 3), 3)
  end
  if tok ~= WOKE or cancelled then
    if st == GRANTED or st == CLOSED or st == BROKEN or st == QUEUED then
      -- it was answered before it could be withdrawn: it happened; a cancel
      -- comes at the task's next wait
      if cancelled then w._cancel_req = true end
      return st, v2, count, closed, unfinished, waiting, putting, cap
    end
    if cancelled then future.raise_token(CANCEL, fname) end
    if tok == TIMEOUT and soft then return false end
    future.raise_token(tok, fname)
  end
  return st, v2, count, closed, unfinished, waiting, putting, cap
end

local function rinfo(self)
  local _, _, count, closed, unfinished, waiting, putting, cap = rop("corral.sync", self, INFO, 0)
  return count, closed, unfinished, waiting, putting, cap
end

local RChannel, RQueue, RLock, RSemaphore, REvent, RCondition, RBarrier = {}, {}, {}, {}, {}, {}, {}

function RChannel:put(v, timeout)
  if v == nil then errors.usage("channel:put", "a channel carries values: nil cannot be put") end
  check_timeout("channel:put", timeout)
  if rop("channel:put", self, PUT, 0, v, timeout) == CLOSED then error(closed_error("channel:put", 2), 2) end
  return true
end
function RChannel:get(timeout)
  check_timeout("channel:get", timeout)
  local st, v = rop("channel:get", self, GET, 0, nil, timeout)
  if st == CLOSED then return nil, "closed" end
  return v
end
function RChannel:try_put(v)
  if v == nil then errors.usage("channel:try_put", "a channel carries values: nil cannot be put") end
  local st = rop("channel:try_put", self, TRY_PUT, 0, v)
  if st == CLOSED then error(closed_error("channel:try_put", 2), 2) end
  return st == GRANTED
end
function RChannel:try_get()
  local st, v = rop("channel:try_get", self, TRY_GET, 0)
  if st == GRANTED then return v end
  return nil, st == CLOSED and "closed" or "empty"
end
function RChannel:close() return rop("channel:close", self, CLOSE, 0) == GRANTED end
function RChannel:closed() return (select(2, rinfo(self))) end
RChannel.iter = Channel.iter

function RQueue:put(v, timeout)
  if v == nil then errors.usage("queue:put", "a queue carries values: nil cannot be put") end
  check_timeout("queue:put", timeout)
  rop("queue:put", self, PUT, 0, v, timeout)
  return true
end
function RQueue:get(timeout)
  check_timeout("queue:get", timeout)
  return (select(2, rop("queue:get", self, GET, 0, nil, timeout)))
end
function RQueue:put_nowait(v)
  if v == nil then errors.usage("queue:put_nowait", "a queue carries values: nil cannot be put") end
  return rop("queue:put_nowait", self, TRY_PUT, 0, v) == GRANTED
end
function RQueue:get_nowait()
  local st, v = rop("queue:get_nowait", self, TRY_GET, 0)
  if st == GRANTED then return v end
  return nil
end
function RQueue:task_done()
  if rop("queue:task_done", self, TASK_DONE, 0) ~= GRANTED then
    errors.usage("queue:task_done", "called more times than there were values put")
  end
end
function RQueue:join(timeout)
  check_timeout("queue:join", timeout)
  rop("queue:join", self, JOIN, 0, nil, timeout)
  return true
end
function RQueue:qsize() return (rinfo(self)) end
function RQueue:empty() return rinfo(self) == 0 end
function RQueue:maxsize()
  local cap = select(6, rinfo(self))
  return cap > 0 and cap or 0
end
function RQueue:full()
  local count, _, _, _, _, cap = rinfo(self)
  return cap > 0 and count >= cap
end

local function racquire(self, fname, timeout)
  check_timeout(fname, timeout)
  return rop(fname, self, ACQUIRE, 1, nil, timeout, true) == GRANTED
end
function RLock:acquire(timeout) return racquire(self, "lock:acquire", timeout) end
function RLock:release()
  if rop("lock:release", self, RELEASE, 1) ~= GRANTED then
    errors.usage("lock:release", "the lock is not locked")
  end
end
function RLock:locked() return rinfo(self) == 0 end
function RLock:with(fn, ...) return with(self, "lock:with", fn, ...) end
function RSemaphore:acquire(timeout) return racquire(self, "semaphore:acquire", timeout) end
function RSemaphore:release(n)
  n = n or 1
  errors.check(type(n) == "number" and n >= 1 and n == floor(n), "semaphore:release", "n",
    "a whole number >= 1", n)
  rop("semaphore:release", self, RELEASE, n)
end
function RSemaphore:value() return (rinfo(self)) end
function RSemaphore:locked() return rinfo(self) == 0 end
function RSemaphore:with(fn, ...) return with(self, "semaphore:with", fn, ...) end

function REvent:set() rop("event:set", self, SET, 1) end
function REvent:clear() rop("event:clear", self, SET, 0) end
function REvent:is_set() return rinfo(self) ~= 0 end
function REvent:wait(timeout)
  check_timeout("event:wait", timeout)
  return rop("event:wait", self, EVENT_WAIT, 0, nil, timeout, true) == GRANTED
end

for _, k in ipairs({ "lock", "acquire", "release", "locked", "with", "wait", "wait_for", "notify_all" }) do
  RCondition[k] = Condition[k]
end
function RCondition:notify(n)
  n = n or 1
  errors.check(type(n) == "number" and n >= 0, "condition:notify", "n", "a number >= 0", n)
  if not lock_of(self):locked() then errors.usage("condition:notify", "the lock is not held") end
  return (select(2, rop("condition:notify", self, NOTIFY_N, floor(math.min(n, 2 ^ 31)))))
end

function RBarrier:wait(timeout)
  check_timeout("barrier:wait", timeout)
  local ok, st, v = pcall(rop, "barrier:wait", self, BARRIER_WAIT, 0, nil, timeout)
  if not ok then
    if errors.is_error(st, "TimeoutError") then rop("barrier:abort", self, CLOSE, 0) end
    error(st, 0)
  end
  if st == BROKEN then error(broken_error("barrier:wait", 2), 2) end
  return v
end
function RBarrier:abort() rop("barrier:abort", self, CLOSE, 0) end
function RBarrier:reset() rop("barrier:reset", self, RESET, 0) end
function RBarrier:broken() return (select(2, rinfo(self))) end
function RBarrier:n_waiting() return (rinfo(self)) end

-- ======================================================================== --
-- Printing and the methods of every state                                  --
-- ======================================================================== --

local function tostr(x)
  local k = c_kind(x)
  local count, closed, _, waiting = c_info(x)
  local st = locals[x]
  if st ~= nil then
    count, closed, waiting = st.rt - st.rh + 1, st.closed, 0
    for _, q in ipairs({ st.getters, st.putters }) do
      for i = q.h, q.t do
        if q[i] and not q[i].gone then waiting = waiting + 1 end
      end
    end
  end
  local s = ("<%s %s"):format(KIND_NAME[k], tostring(count))
  if k == CHANNEL or k == QUEUE then
    s = ("<%s: %d queued"):format(KIND_NAME[k], count)
  elseif k == LOCK then
    s = count == 0 and "<lock: locked" or "<lock: unlocked"
  elseif k == SEMAPHORE then
    s = ("<semaphore: %d free"):format(count)
  elseif k == EVENT then
    s = count ~= 0 and "<event: set" or "<event: clear"
  elseif k == BARRIER then
    s = ("<barrier: %d waiting"):format(count)
  elseif k == CONDITION then
    s = "<condition"
  end
  if closed then s = s .. (k == BARRIER and ", broken" or ", closed") end
  if waiting > 0 then s = s .. (", %d waiting"):format(waiting) end
  return s .. ">"
end

core.sync_open({
  channel = Channel, queue = Queue, lock = Lock, semaphore = Semaphore, event = Event,
  condition = Condition, barrier = Barrier,
  rchannel = RChannel, rqueue = RQueue, rlock = RLock, rsemaphore = RSemaphore, revent = REvent,
  rcondition = RCondition, rbarrier = RBarrier,
  __tostring = tostr,
  __len = function(x)
    local st = locals[x]
    if st ~= nil then return st.rt - st.rh + 1 end
    return c_count(x)
  end,
  __rtostring = function(x) return ("<%s of the parent process>"):format(KIND_NAME[c_kind(x)]) end,
  __rlen = function(x) return (rinfo(x)) end,
}, woken, share)

--- The kind of a sync object ("channel", "lock", ...), or nil.
function M.kind(x)
  local k = c_kind(x)
  return k and KIND_NAME[k]
end

--- Sync objects and waiter records alive in the process (for leak specs).
M.live = core.sync_live

return M
