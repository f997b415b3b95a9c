--- The scheduler of a context: ready queue, timers, blocking and waking,
-- and the turn of the loop that drives them.
--
-- A *waiter* is what blocks: the running task (a coroutine that suspends) or,
-- outside of any task, a plain table whose caller drives the loop until it is
-- woken. `block` and `wake` are the only ways to suspend and resume; every
-- waiting operation of corral is built on them.
-- @module corral.sched
local core = require "corral.core"
local errors = require "corral.errors"
local F = require "corral.fields"

local M = {}

local now, poll, drain, quiescent = core.now, core.poll, core.drain, core.quiescent
local co_running, co_yield, co_resume = coroutine.running, coroutine.yield, coroutine.resume
local ceil, max, min = math.ceil, math.max, math.min
local type, xpcall = type, xpcall
local traceback = debug.traceback
local S, CO = F.S, F.CO
local T = require "corral.trace" -- (T.on: the one check each trace hook pays when off)

-- Wake tokens: why a blocked waiter resumed.
local WOKE, TIMEOUT, CANCEL, FOREVER = 1, 2, 3, 4
M.WOKE, M.TIMEOUT, M.CANCEL, M.FOREVER = WOKE, TIMEOUT, CANCEL, FOREVER
-- What a task's coroutine yields to the scheduler.
local BLOCKED, FINISHED = {}, {}
M.BLOCKED, M.FINISHED = BLOCKED, FINISHED

-- ======================================================================== --
-- Ready queue                                                              --
-- ======================================================================== --

-- Items are tasks to resume (with a token and a value) or functions to call
-- (with one argument). Three parallel arrays, consumed one turn at a time.
local rq_item, rq_tok, rq_val = {}, {}, {}
local rq_head, rq_tail = 1, 0

local function push(item, tok, val)
  local i = rq_tail + 1
  rq_tail = i
  rq_item[i], rq_tok[i], rq_val[i] = item, tok, val
end
M.push = push

-- ======================================================================== --
-- Error reports                                                            --
-- ======================================================================== --

local safe_tostring = errors.safe_tostring
M.safe_tostring = safe_tostring

--- Write a report of an error nobody else will see to stderr.
function M.report(what, e, tb)
  io.stderr:write("corral: ", what, ": ", safe_tostring(e), "\n", tb or "", tb and "\n" or "")
  io.stderr:flush()
end

local last_tb
-- The traceback of a task's error, without corral's own frames below it.
local function on_error(e)
  local tb = traceback("", 2):gsub("^\n", "")
  last_tb = tb:gsub("\n%s*%[C%]: in function 'xpcall'.*$", "")
  return e
end
M.on_error = on_error
function M.last_traceback() return last_tb end

-- ======================================================================== --
-- Timers: a binary heap of {when, seq, w}, cancelled lazily                 --
-- ======================================================================== --

local heap, heap_n, timer_seq, timers_live = {}, 0, 0, 0

local function before(a, b)
  return a.when < b.when or (a.when == b.when and a.seq < b.seq)
end

local function timer_add(when, w)
  timer_seq = timer_seq + 1
  local t = { when = when, seq = timer_seq, w = w }
  heap_n = heap_n + 1
  local i = heap_n
  while i > 1 do
    local p = (i - i % 2) / 2
    if not before(t, heap[p]) then break end
    heap[i] = heap[p]
    i = p
  end
  heap[i] = t
  timers_live = timers_live + 1
  return t
end

local function timer_cancel(t)
  if t.w then
    t.w = nil
    timers_live = timers_live - 1
  end
end

local function heap_pop()
  local top = heap[1]
  local last = heap[heap_n]
  heap[heap_n] = nil
  heap_n = heap_n - 1
  if heap_n > 0 then
    local i = 1
    while true do
      local c = i * 2
      if c > heap_n then break end
      if c < heap_n and before(heap[c + 1], heap[c]) then c = c + 1 end
      if not before(heap[c], last) then break end
      heap[i] = heap[c]
      i = c
    end
    heap[i] = last
  end
  return top
end

--- Call `fn` on this loop (as a callback) at `when`, a `now()` time. Returns
-- the timer, for `cancel_timer`. A live timer keeps the loop running.
function M.at(when, fn) return timer_add(when, fn) end
M.cancel_timer = timer_cancel
M.now = now

-- The earliest live deadline, dropping cancelled timers from the top.
local function next_deadline()
  while heap_n > 0 and heap[1].w == nil do heap_pop() end
  return heap_n > 0 and heap[1].when or nil
end

-- ======================================================================== --
-- Blocking and waking                                                      --
-- ======================================================================== --

local current = nil -- the task whose coroutine runs now

--- The task running now, or nil.
function M.current() return current end

--- What will block for the caller: the current task when called from its
-- own coroutine, else a new outside waiter that drives the loop.
local function waiter()
  local t = current
  if t ~= nil and t[CO] == co_running() then return t end
  return { _outside = true }
end
M.waiter = waiter

--- Wake a blocked waiter with a token and a value; a waiter that is not
-- blocked (already woken) ignores it.
local function wake(w, tok, val)
  if not w._blocked then return end
  w._blocked = false
  if w._outside then
    w._tok, w._val = tok, val
  else
    push(w, tok, val)
  end
end
M.wake = wake

local turn -- defined below
local in_turn = false -- a turn is running: an outside waiter cannot drive another
local halted = false -- corral.exit in an embedded runtime: the loop runs nothing more, ever
local unhook -- takes off the hook corral.exit set (see exit_hook)


--- Block until woken or until `deadline` (a `now()` time, optional).
-- Returns the token (WOKE, TIMEOUT, CANCEL, or FOREVER for an outside waiter
-- that nothing can ever wake) and the value given to `wake`.
function M.block(w, deadline)
  if w._outside then
    if in_turn then
      if current ~= nil then
        errors.usage("corral", "cannot wait inside a coroutine that corral does not run (one made "
          .. "inside a task): wait from the task itself, or spawn a task")
      end
      errors.usage("corral", "cannot wait inside a callback that corral runs (a waiter or progress "
        .. "function): spawn a task to wait instead")
    end
    w._blocked = true
    while w._blocked do
      -- one turn at least: an outside wait (even for 0 s) lets the loop run
      local more = turn(true, deadline)
      if not w._blocked then break end
      if halted then -- (corral.exit stopped the loop: nothing will wake it)
        w._blocked = false
        return FOREVER
      end
      if deadline and now() >= deadline then
        w._blocked = false
        return TIMEOUT
      end
      if not more and not deadline then
        w._blocked = false
        return FOREVER
      end
    end
    return w._tok, w._val
  end
  if w._cancel_req then
    w._cancel_req = false
    return CANCEL
  end
  -- A call's method waits: from now until it resumes, its caller may
  -- cancel it (false: the caller already did). Once the cancel has been
  -- delivered, its cleanup may wait like any task's.
  -- (w._call is set on the task that runs a call's method, w._ib to its
  -- instance's inbox: see corral.worker_serve.)
  local call, ib = w._call, nil
  if call and w._call_cancelled == call then call = nil end
  if call then
    ib = w._ib
    if not ib.suspend(call) then
      w._call_cancelled = call
      return CANCEL
    end
    if w._cwatch ~= call then
      w._cwatch = call
      ib.watch(w, call)
    end
  end
  w._blocked, w._in_block = true, true
  local tm = deadline and timer_add(deadline, w)
  if T.on then T.task_end(w, false) end
  local tok, val = co_yield(BLOCKED)
  if T.on then T.task_begin(w) end
  w._in_block = false
  if tm then timer_cancel(tm) end
  if call and not ib.resume(call) then
    w._cancel_req = false
    w._call_cancelled = call
    return CANCEL
  end
  if (tok == WOKE or tok == TIMEOUT) and w._cancel_req then
    -- cancelled after being woken (or timed out), before it ran: the
    -- cancel, which said true, is what is delivered at this point
    w._cancel_req = false
    return CANCEL
  end
  return tok, val
end

-- ======================================================================== --
-- External completions (futures settled by other threads or by C)          --
-- ======================================================================== --

local watched, ext_pending = {}, 0
local dbuf = {}

--- Ask to be told when the C half of `f` settles: `f:_sync()` is then
-- called on this loop. Returns false when it has settled already.
function M.watch(f)
  local key = core.fwatch(f._c)
  if not key then return false end
  watched[key] = f
  ext_pending = ext_pending + 1
  return true
end

--- Record that this loop watches the C half of `f` under `key` (the watch
-- was made in C): `f:_sync()` is called when it settles.
function M.watched(f, key)
  watched[key] = f
  ext_pending = ext_pending + 1
end

-- Waiters of sync primitives (corral.sync): a grant from another context
-- is posted to this loop under the waiter record's key.
local posts = {}

--- Wake `w` when the grant of the record `key` is posted to this loop.
function M.expect(key, w)
  posts[key] = w
  ext_pending = ext_pending + 1
end

--- Forget a record (its wait ended): true when it was still expected.
local function unexpect(key)
  if posts[key] == nil then return false end
  posts[key] = nil
  ext_pending = ext_pending - 1
  return true
end
M.unexpect = unexpect

--- A record was granted (in this very context, or posted): wake its waiter.
local function wake_key(key)
  local w = posts[key]
  if w ~= nil then
    posts[key] = nil
    ext_pending = ext_pending - 1
    wake(w, WOKE, key)
  end
end
M.wake_key = wake_key

M.on_signal = nil -- set by the runner: on_signal(signum) for SIGINT/SIGTERM
M.exiting = false -- os.exit in a worker, or corral.exit in an embedded runtime: tasks that
                  -- unwind with its error are not bugs
M.on_wake = nil   -- set in a worker context: takes calls from the inbox
M.keepalive = false -- a worker's loop waits for calls even with nothing pending
M.before_park = nil -- called when a worker's loop is about to wait with nothing to do

-- ======================================================================== --
-- Running                                                                  --
-- ======================================================================== --

local pool, pool_n = {}, 0
local POOL_MAX = 256
local turn_last = 0 -- the last ready item of the current turn
local run_one -- runs a started task's function to its end (set by corral.task)

function M.set_run_one(fn) run_one = fn end

-- The body of every task coroutine. After its task finishes, a coroutine
-- goes straight on to the next ready item when that is a task not yet
-- started in this turn: a burst of tasks that never wait costs no coroutine
-- switch each. A task that waits keeps the coroutine it is running on.
local function co_body(t)
  while true do
    run_one(t)
    t[CO] = false
    t = nil -- a pooled coroutine must not keep its last task alive
    local i = rq_head
    if i <= turn_last then
      local item = rq_item[i]
      if type(item) == "table" and item[S] == 0 and not item[CO] and not item._outside then
        rq_item[i], rq_tok[i], rq_val[i] = nil, nil, nil
        rq_head = i + 1
        t = item
        t[CO] = co_running()
        current = t
      end
    end
    if t == nil then t = co_yield(FINISHED) end
  end
end

local function run_task(t, tok, val)
  local co = t[CO]
  local prev = current
  current = t
  local ok, r
  if not co then
    -- first start: a task cancelled before it started never runs
    if t[S] ~= 0 then
      current = prev
      return
    end
    if pool_n > 0 then
      co = pool[pool_n]
      pool[pool_n] = nil
      pool_n = pool_n - 1
    else
      co = coroutine.create(co_body)
    end
    t[CO] = co
    ok, r = co_resume(co, t)
  else
    ok, r = co_resume(co, tok, val)
  end
  local last = current -- the task that yielded, when it was a later one
  current = prev
  if unhook then
    unhook()
    unhook = nil
  end
  if r == BLOCKED then return end
  if r == FINISHED then
    if pool_n < POOL_MAX then
      pool_n = pool_n + 1
      pool[pool_n] = co
    end
  elseif not ok then
    -- (a task ended by os.exit in a worker unwinds this way: not a bug)
    if not M.exiting then M.report("internal error in the scheduler", r, traceback(co)) end
  else
    -- the task yielded by itself (coroutine.yield): let others run first
    push(last, WOKE, nil)
  end
end

local function run_item(item, tok, val)
  if type(item) == "table" then
    run_task(item, tok, val)
  else
    local ok, e = xpcall(item, on_error, tok)
    if not ok and not M.exiting then M.report("error in a callback", e, last_tb) end
  end
end

--- Whether anything is pending: ready items, live timers, or futures that
-- another thread may still settle.
local function pending()
  return rq_head <= rq_tail or timers_live > 0 or ext_pending > 0
end

--- How many futures settled elsewhere this loop still waits on.
function M.ext_pending() return ext_pending end

-- The home loop waits only on futures settled elsewhere: if nothing in the
-- process can make progress (every worker parked idle, no host future, no
-- timer, nothing ready), nothing will ever settle them.
M.stuck = false
-- Set by the runner once the main chunk has returned: workers asked to stop
-- get this many seconds to end while nothing else can progress.
M.wind_down = nil
local wind_since = nil
local suspect = false -- nothing could progress at the last look
local SUSPECT_MS = 20

--- Stop the loop for good (corral.exit in an embedded runtime): the turn
-- running now runs nothing more, and every later turn returns at once
-- (nothing pending).
function M.halt()
  halted = true
  M.exiting = true
end
function M.halted() return halted end

-- corral.exit in a coroutine of a task's own: until that task's coroutine
-- has returned to the scheduler, every instruction of either coroutine
-- raises `err`, so no pcall there goes on. (LuaJIT's hooks are global: the
-- hook checks the coroutine, and the scheduler takes it off, giving back a
-- hook that was there before.)
function M.exit_hook(err, a, b)
  local old_fn, old_mask, old_count = debug.gethook()
  -- (set first: the hook raises at the next instruction here, in `a`)
  unhook = function()
    if old_fn then debug.sethook(old_fn, old_mask, old_count) else debug.sethook() end
  end
  debug.sethook(function()
    local c = co_running()
    if c == a or c == b then error(err, 0) end
  end, "", 1)
end
--- Whether a turn is running (the caller runs inside the loop).
function M.in_turn() return in_turn end

local turn_body
local busy_turns = 0 -- turns in a row that had work ready (they poll every 16th)
local EXTEND = 64 -- items a turn runs beyond those ready at its start

--- One turn of the loop: poll for events (blocking, when `block` and there is
-- nothing ready, until the next timer or `until_deadline`), deliver
-- completions, fire due timers, then run what was ready at that point.
-- Returns whether anything is still pending. Not re-entrant: driving the
-- loop from inside a turn is a `UsageError`.
function turn(block, until_deadline)
  if halted then
    -- nothing runs, but the loop's events are taken (C callbacks only): else
    -- what other threads post after corral.exit would leave the backend fd
    -- readable for good, and a host that polls it would spin
    if not in_turn then poll(0) end
    return false
  end
  if in_turn then
    errors.usage("corral", "cannot drive the loop from inside itself (corral.run or a wait in a "
      .. "coroutine of your own inside a task, or in a callback): wait from the task itself")
  end
  in_turn = true
  local ok, r = pcall(turn_body, block, until_deadline)
  in_turn = false
  if not ok then error(r, 0) end
  return r and not halted
end
M.turn = turn

function turn_body(block, until_deadline)
  if rq_head > rq_tail then
    local timeout = 0
    if block then
      local d = next_deadline()
      if until_deadline and (d == nil or until_deadline < d) then d = until_deadline end
      if d then
        -- whole ms, at most ~12 days a poll (a sleep(math.huge) polls again)
        timeout = min(max(0, ceil((d - now()) * 1000)), 1e9)
      elseif M.keepalive then
        if M.before_park then M.before_park() end
        timeout = -1
      elseif ext_pending > 0 then
        local q = quiescent()
        if q == 1 and suspect then
          M.stuck = true
          return false
        elseif q == 1 then
          -- (seen twice, a short poll apart, with nothing settled between:
          -- a count that is between two threads is not taken for a deadlock)
          suspect = true
          timeout = SUSPECT_MS
        elseif q == 2 and M.wind_down then
          wind_since = wind_since or now()
          local left = wind_since + M.wind_down - now()
          if left <= 0 then
            M.stuck = "stopping"
            return false
          end
          timeout = ceil(left * 1000)
        else
          wind_since, suspect = nil, false
          timeout = -1
        end
      end
    end
    poll(timeout)
  elseif ext_pending > 0 then
    -- work is ready: completions are drained below without polling; the
    -- loop's other events are looked at every few turns
    busy_turns = busy_turns + 1
    if busy_turns >= 16 then
      busy_turns = 0
      poll(0)
    end
  end
  local n, sig, stopping = drain(dbuf)
  if n > 0 or stopping then suspect = false end
  if stopping then
    -- workers whose last handle went: pending work until they have ended
    for i = 1, #stopping do
      if not M.watch({ _c = stopping[i], _sync = core.reap }) then core.reap() end
    end
  end
  for i = 1, n do
    local key = dbuf[i]
    dbuf[i] = nil
    local f = watched[key]
    if f then
      watched[key] = nil
      ext_pending = ext_pending - 1
      f:_sync()
    else
      wake_key(key)
    end
  end
  if sig ~= 0 and M.on_signal then M.on_signal(sig) end
  if M.on_wake then M.on_wake() end
  if heap_n > 0 then
    local t = now()
    while heap_n > 0 and heap[1].when <= t do
      local e = heap_pop()
      local w = e.w
      if w then
        timer_cancel(e)
        if type(w) == "function" then push(w, TIMEOUT) else wake(w, TIMEOUT) end
      end
    end
  end
  local last = rq_tail
  turn_last = last
  -- what was ready at this point runs; so does what it makes ready, up to
  -- EXTEND items more (tasks that hand work to each other, a channel's
  -- ping-pong, go on without a turn each), then the loop is looked at again
  local extend = EXTEND
  while rq_head <= last and not halted do
    local i = rq_head
    local item, tok, val = rq_item[i], rq_tok[i], rq_val[i]
    rq_item[i], rq_tok[i], rq_val[i] = nil, nil, nil
    rq_head = i + 1
    run_item(item, tok, val)
    if rq_head > last and rq_tail > last and extend > 0 then
      extend = extend - (rq_tail - last)
      last = rq_tail
      turn_last = last
    end
  end
  if rq_head > rq_tail then rq_head, rq_tail = 1, 0 end
  return pending()
end

--- The loop contract for a host with a loop of its own: milliseconds until
-- the loop next has work to do (0: work is ready now; the time to the next
-- timer; -1: none is due, only an event on the backend fd can bring some).
-- A host polls `core.backend_fd()` with this timeout, then steps.
function M.backend_timeout()
  if halted then return -1 end
  if rq_head <= rq_tail then return 0 end
  local t = core.backend_timeout()
  if t ~= 0 then
    local d = next_deadline()
    if d then
      local ms = min(max(0, ceil((d - now()) * 1000)), 1e9)
      if t < 0 or ms < t then t = ms end
    end
  end
  return t
end

--- Drive the loop until nothing is pending (block) or for one turn that
-- does not block. Returns whether anything is still pending.
function M.drive(block)
  if not block then return turn(false) end
  while turn(true) do end
  return false
end

return M
