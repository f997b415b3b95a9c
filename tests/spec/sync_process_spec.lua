-- Channels and sync primitives with process workers: the parent's objects,
-- used by a child through its parent.
local corral = require "corral"
local sync = require "corral.sync"
local core = require "corral.core"
local h = require "helper"

local function live()
  collectgarbage()
  collectgarbage()
  return sync.live()
end

-- waiters queued on s now (in the parent)
local function waiting(s) return select(4, core.sync_info(s)) end

local W = corral.worker {
  double = function(_, inch, outch)
    local n = 0
    for v in inch:iter() do
      outch:put(v * 2)
      n = n + 1
    end
    outch:close()
    return n
  end,
  bump = function(_, lock, box, n)
    for _ = 1, n do
      lock:with(function()
        local v = box:get()
        box:put(v + 1)
      end)
    end
    return true
  end,
  get = function(_, ch, timeout) return ch:get(timeout) end,
  try = function(_, ch) return { ch:try_get() } end,
  put = function(_, ch, v, timeout) return ch:put(v, timeout) end,
  acquire = function(_, l, timeout) return l:acquire(timeout) end,
  queue_work = function(_, q)
    local n = 0
    while true do
      local v = q:get()
      if v == "stop" then q:task_done(); return n end
      n = n + v
      q:task_done()
    end
  end,
  meet = function(_, b, e, sem)
    local i = b:wait(10)
    sem:with(function() end)
    assert(e:wait(10))
    return i
  end,
  cond = function(_, c, box)
    return c:with(function()
      c:wait_for(function() return box:try_get() == "go" end, 10)
      return "woke"
    end)
  end,
  state = function(_, ch, l, e, q, b)
    return { len = #ch, closed = ch:closed(), locked = l:locked(), set = e:is_set(),
      qsize = q:qsize(), maxsize = q:maxsize(), broken = b:broken(), text = tostring(ch) }
  end,
  sel = function(_, ch) return require("corral").select({ { ch, "get" } }) end,
  give_back = function(_, ch) return ch end,

  exit_holding = function(_, l, ch)
    l:acquire()
    ch:get()
    os.exit(3)
  end,
}

describe("sync primitives with a process worker", function()
  local w
  before_each(function() w = W:options { mode = "process" }:init() end)
  after_each(function() w:stop() end)

  it("a channel passed to a process worker is the parent's: producer/consumer with backpressure", function()
    local a, b = corral.channel(4), corral.channel(4)
    local f = w:double(a, b)
    local most = 0
    corral.spawn(function()
      for i = 1, 200 do
        a:put(i)
        most = math.max(most, #a)
      end
      a:close()
    end)
    local sum = 0
    for v in b:iter() do sum = sum + v end
    assert.equal(200 * 201, sum)
    assert.equal(200, f:result(20))
    assert.is_true(most <= 4)
  end)

  it("values of every simple kind go both ways, long strings and tables included", function()
    local ch = corral.channel(10)
    local long = ("x"):rep(1000)
    for _, v in ipairs({ true, false, 1.5, "short", long, { a = { 1, 2 } } }) do
      ch:put(v)
      assert.same(v, w:get(ch):result(10))
    end
    assert.is_true(w:put(ch, { n = 7 }):result(10))
    assert.same({ n = 7 }, ch:get())
  end)

  it("no lost update: 4 process workers increment a counter under the parent's lock", function()
    local pool = W:options { mode = "process", workers = 4 }:init()
    local lock, box = corral.lock(), corral.channel(1)
    box:put(0)
    local fs = {}
    for i = 1, 4 do fs[i] = pool:bump(lock, box, 25) end
    corral.gather(fs)
    assert.equal(100, box:get())
    assert.is_false(lock:locked())
    pool:stop()
  end)

  it("a child's get waits in the parent until a value comes, and its timeout ends the wait cleanly",
    function()
    local ch = corral.channel(0)
    local f = w:get(ch)
    h.wait_until(function() return waiting(ch) > 0 end)
    ch:put("late")
    assert.equal("late", f:result(10))
    local ok, e = pcall(function() return w:get(ch, 0.05):result(10) end)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "WorkerError"))
    assert.is_true(corral.is_error(e.cause, "TimeoutError"))
    assert.equal(0, waiting(ch)) -- the request was withdrawn in the parent
    assert.is_false(ch:try_put(1))
  end)

  it("a cancelled call waiting on the parent's channel leaves nothing queued and loses no value", function()
    local ch = corral.channel(0)
    local f = w:get(ch)
    h.wait_until(function() return waiting(ch) > 0 end)
    assert.is_true(f:cancel())
    h.wait_until(function() return waiting(ch) == 0 end)
    assert.is_false(ch:try_put("nobody"))
    -- the worker serves on
    local g = w:get(ch)
    h.wait_until(function() return waiting(ch) > 0 end)
    ch:put("next")
    assert.equal("next", g:result(10))
  end)

  it("try_get, a closed channel and ClosedError", function()
    local ch = corral.channel(1)
    assert.same({ nil, "empty" }, w:try(ch):result(10))
    ch:put(5)
    assert.same({ 5 }, w:try(ch):result(10))
    ch:close()
    assert.same({ nil, "closed" }, w:try(ch):result(10))
    local ok, e = pcall(function() return w:put(ch, 1):result(10) end)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e.cause, "ClosedError"))
  end)

  it("lock: a child's acquire times out with false, and takes the lock once released", function()
    local l = corral.lock()
    l:acquire()
    assert.is_false(w:acquire(l, 0.05):result(10))
    local f = w:acquire(l)
    h.wait_until(function() return waiting(l) > 0 end)
    l:release()
    assert.is_true(f:result(10))
    assert.is_true(l:locked()) -- the child holds it (its call returned without releasing)
  end)

  it("queue: join in the parent waits for the child's task_done", function()
    local q = corral.queue(2)
    local f = w:queue_work(q)
    for i = 1, 10 do q:put(i) end
    q:join(20)
    q:put("stop")
    assert.equal(55, f:result(10))
  end)

  it("barrier, event and semaphore between the script and process workers", function()
    local pool = W:options { mode = "process", workers = 2 }:init()
    local b, e, sem = corral.barrier(3), corral.event(), corral.semaphore(1)
    local f1, f2 = pool:meet(b, e, sem), pool:meet(b, e, sem)
    local mine = b:wait(10)
    e:set()
    local idx = { mine, f1:result(10), f2:result(10) }
    table.sort(idx)
    assert.same({ 0, 1, 2 }, idx)
    assert.equal(1, sem:value())
    pool:stop()
  end)

  it("condition: a child waits, the script notifies", function()
    local c, box = corral.condition(), corral.channel(1)
    local f = w:cond(c, box)
    h.wait_until(function() return waiting(c) > 0 end)
    c:with(function()
      box:put("go")
      c:notify_all()
    end)
    assert.equal("woke", f:result(10))
    assert.is_false(c:locked())
  end)

  it("the state of the parent's objects reads the same in the child", function()
    local ch, l, e, q, b = corral.channel(3), corral.lock(), corral.event(), corral.queue(5),
      corral.barrier(2)
    ch:put(1); ch:put(2); ch:close()
    l:acquire(); e:set(); q:put("x"); b:abort()
    local s = w:state(ch, l, e, q, b):result(10)
    assert.same({ len = 2, closed = true, locked = true, set = true, qsize = 1, maxsize = 5,
      broken = true, text = "<channel of the parent process>" }, s)
  end)

  it("refuses what cannot be done from a child, with clear errors", function()
    local ch = corral.channel(1)
    -- select over a parent's channel
    local ok, e = pcall(function() return w:sel(ch):result(10) end)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e.cause, "UsageError"))
    -- handing the parent's channel back (or on) from the child
    ok, e = pcall(function() return w:give_back(ch):result(10) end)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "WorkerError") or corral.is_error(e, "CodecError"))
    -- a value that holds a reference cannot go to the child: it stays
    ch:put({ corral.buffer("b") })
    ok, e = pcall(function() return w:get(ch):result(10) end)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e.cause, "CodecError"))
    assert.equal(1, #ch)
  end)

  it("a child that dies holding the parent's lock and waiting on a channel: the wait is withdrawn", function()
    local l, ch = corral.lock(), corral.channel(0)
    local f = w:exit_holding(l, ch)
    h.wait_until(function() return waiting(ch) > 0 end)
    assert.is_true(l:locked())
    -- its process ends: the channel's waiter goes (the lock it took is the
    -- caller's to know about: it stays held, as a thread that died holding it)
    w:stop { drain = false }
    pcall(f.result, f, 10)
    h.wait_until(function() return waiting(ch) == 0 end)
    assert.is_false(ch:try_put(1))
  end)

  it("leaks no object and no waiter record in the parent", function()
    local objects0, waiters0 = live()
    local function use()
      local ch = corral.channel(0)
      for i = 1, 20 do
        local f = w:get(ch, 5)
        h.wait_until(function() return waiting(ch) > 0 end)
        ch:put(i)
        assert.equal(i, f:result(10))
      end
      local f = w:get(ch)
      h.wait_until(function() return waiting(ch) > 0 end)
      f:cancel()
      h.wait_until(function() return waiting(ch) == 0 end)
    end
    use()
    w:stop()
    w = W:options { mode = "process" }:init()
    -- (the proxy lets go of what it kept as its thread ends, just after stop)
    h.wait_until(function()
      local objects, waiters = live()
      return objects <= objects0 and waiters <= waiters0
    end, 30) -- (slow under ThreadSanitizer with the whole suite around it)
  end)
end)
