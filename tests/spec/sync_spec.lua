-- Channels, select and sync primitives: within one context and across
-- thread workers.
local corral = require "corral"
local sync = require "corral.sync"
local h = require "helper"

local kind_of = h.kind_of

-- the number of sync objects and waiter records alive, after a full collect
local function live()
  collectgarbage()
  collectgarbage()
  return sync.live()
end

describe("channel", function()
  it("passes values in order and ends its iterator when closed and drained", function()
    local ch = corral.channel(2)
    local p = corral.spawn(function()
      for i = 1, 10 do ch:put({ i = i }) end
      ch:close()
    end)
    local got = {}
    for v in ch:iter() do got[#got + 1] = v.i end
    p:result()
    assert.same({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }, got)
    assert.same({ nil, "closed" }, { ch:get() })
    assert.is_true(ch:closed())
  end)

  it("unbuffered: a put waits for its get", function()
    local ch = corral.channel(0)
    local order = {}
    local p = corral.spawn(function()
      ch:put("x")
      order[#order + 1] = "put returned"
    end)
    corral.spawn(function() order[#order + 1] = "other ran" end):result()
    assert.same({ "other ran" }, order) -- the put still waits
    assert.equal("x", ch:get())
    p:result()
    assert.same({ "other ran", "put returned" }, order)
  end)

  it("a bounded channel makes the producer wait (backpressure) and holds no more than its capacity",
    function()
    local ch = corral.channel(4)
    local produced = 0
    local p = corral.spawn(function()
      for i = 1, 100 do
        ch:put(i)
        produced = i
      end
      ch:close()
    end)
    local most = 0
    for v in ch:iter() do
      most = math.max(most, #ch, produced - v)
      corral.sleep(0)
    end
    p:result()
    assert.is_true(most <= 5, "at most capacity + 1 ahead, was " .. most)
    assert.equal(100, produced)
  end)

  it("try_put and try_get never wait", function()
    local ch = corral.channel(1)
    assert.is_true(ch:try_put(1))
    assert.is_false(ch:try_put(2))
    assert.equal(1, #ch)
    assert.equal(1, ch:try_get())
    assert.same({ nil, "empty" }, { ch:try_get() })
    ch:close()
    assert.same({ nil, "closed" }, { ch:try_get() })
  end)

  it("close: puts raise ClosedError, values already in it can still be got, "
    .. "waiting getters get nil, 'closed'",
    function()
    local ch = corral.channel(3)
    ch:put("a")
    ch:put("b")
    local empty, full = corral.channel(0), corral.channel(0)
    local g = corral.spawn(function() return { empty:get() } end)
    local p = corral.spawn(function() return pcall(full.put, full, "never") end)
    corral.spawn(function() end):result()
    assert.is_true(ch:close())
    assert.is_false(ch:close()) -- (closed already)
    assert.equal("ClosedError", kind_of(function() ch:put("c") end))
    assert.equal("ClosedError", kind_of(function() ch:try_put("c") end))
    assert.equal("a", ch:get())
    assert.equal("b", ch:get())
    assert.same({ nil, "closed" }, { ch:get() })
    -- a waiting getter wakes with nil, "closed"; a waiting putter with ClosedError
    corral.spawn(function() corral.sleep(0.01); empty:close(); full:close() end)
    assert.same({ nil, "closed" }, g:result())
    local ok, e = p:result()
    assert.is_false(ok)
    assert.equal("ClosedError", e.kind)
  end)

  it("get and put with a timeout raise TimeoutError and leave the channel as it was", function()
    local ch = corral.channel(1)
    local t0 = corral.now()
    assert.equal("TimeoutError", kind_of(function() ch:get(0.05) end))
    assert.is_true(corral.now() - t0 >= 0.04)
    ch:put(1)
    assert.equal("TimeoutError", kind_of(function() ch:put(2, 0.02) end))
    assert.equal(1, #ch)
    assert.equal(1, ch:get())
    assert.equal(0, #ch)
  end)

  it("refuses nil, values that cannot travel, and bad arguments", function()
    local ch = corral.channel(1)
    assert.equal("UsageError", kind_of(function() ch:put(nil) end))
    assert.equal("CodecError", kind_of(function() ch:put(coroutine.create(print)) end))
    assert.equal(0, #ch)
    assert.equal("UsageError", kind_of(function() corral.channel(-1) end))
    assert.equal("UsageError", kind_of(function() corral.channel("x") end))
    assert.equal("UsageError", kind_of(function() ch.put({}, 1) end))
    assert.equal("UsageError", kind_of(function() ch:get(-1) end))
  end)

  it("getters are served in the order they came (FIFO)", function()
    local ch = corral.channel(0)
    local got = {}
    local ts = {}
    for i = 1, 5 do
      ts[i] = corral.spawn(function()
        local v = ch:get()
        got[#got + 1] = { i, v }
      end)
    end
    corral.spawn(function() end):result() -- they all wait now
    for v = 1, 5 do ch:put(v * 10) end
    corral.wait(ts)
    assert.same({ { 1, 10 }, { 2, 20 }, { 3, 30 }, { 4, 40 }, { 5, 50 } }, got)
  end)

  it("a cancelled getter leaves the queue: the next value goes to the next getter", function()
    local ch = corral.channel(0)
    local a = corral.spawn(function() return ch:get() end)
    local b = corral.spawn(function() return ch:get() end)
    corral.spawn(function() end):result()
    assert.is_true(a:cancel())
    ch:put("v")
    assert.equal("v", b:result())
    assert.equal("CancelledError", kind_of(function() a:result() end))
    assert.equal(0, select(2, live()))
  end)

  it("a value granted to a getter cancelled before it ran goes back to the channel", function()
    local ch = corral.channel(1)
    local a = corral.spawn(function() return ch:get() end)
    corral.spawn(function() end):result() -- a waits
    -- in one turn: the value is handed to a, then a is cancelled before it runs
    local t = corral.spawn(function()
      ch:put("keep")
      a:cancel()
    end)
    t:result()
    assert.equal("CancelledError", kind_of(function() a:result() end))
    assert.equal("keep", ch:try_get())
  end)

  it("prints its state", function()
    local ch = corral.channel(2)
    ch:put(1)
    assert.equal("<channel: 1 queued>", tostring(ch))
    ch:close()
    assert.equal("<channel: 1 queued, closed>", tostring(ch))
  end)

  it("frees its values and waiter records", function()
    local objects0, waiters0 = live()
    do
      local ch = corral.channel(10)
      for i = 1, 10 do ch:put({ i, corral.buffer("x") }) end
      local t = corral.spawn(function() return pcall(ch.put, ch, 11, 0.01) end)
      t:result()
    end
    -- (objects of earlier specs, whose workers end in the background, may
    -- go meanwhile: what this one made must not stay)
    h.wait_until(function()
      local objects, waiters = live()
      return objects <= objects0 and waiters <= waiters0
    end, 10)
  end)
end)

describe("select", function()
  it("does exactly one ready case and says which", function()
    local a, b = corral.channel(1), corral.channel(1)
    b:put("from b")
    assert.same({ 2, "from b" }, { corral.select({ { a, "get" }, { b, "get" } }) })
    assert.same({ 1, true }, { corral.select({ { a, "put", "x" }, { b, "get" } }, { timeout = 0 }) })
    assert.equal("x", a:try_get())
  end)

  it("waits for the first case to become ready, and withdraws the others", function()
    local a, b = corral.channel(0), corral.channel(0)
    corral.spawn(function() corral.sleep(0.01); b:put(7) end)
    assert.same({ 2, 7 }, { corral.select({ { a, "get" }, { b, "get" } }) })
    -- the case on a was withdrawn: a put on a finds no getter
    assert.is_false(a:try_put(1))
    assert.equal(0, select(2, live()))
  end)

  it("is fair when several cases are ready", function()
    local a, b = corral.channel(1000), corral.channel(1000)
    for i = 1, 1000 do a:put(i); b:put(i) end
    local n = { 0, 0 }
    for _ = 1, 1000 do
      local i = corral.select({ { a, "get" }, { b, "get" } })
      n[i] = n[i] + 1
    end
    assert.is_true(n[1] > 350 and n[2] > 350, ("picked %d and %d times"):format(n[1], n[2]))
  end)

  it("takes futures as cases", function()
    local ch = corral.channel(0)
    local f = corral.spawn(function() corral.sleep(0.01); return "done" end)
    local i, v = corral.select({ { ch, "get" }, { f } })
    assert.equal(2, i)
    assert.equal(f, v)
    assert.is_false(ch:try_put(1)) -- the get was withdrawn
    local ready = corral.future()
    ready:set_result(1)
    assert.same({ 1, ready }, { corral.select({ { ready }, { ch, "get" } }) })
  end)

  it("returns nil, 'timeout' when nothing is ready in time", function()
    local a = corral.channel(0)
    local t0 = corral.now()
    assert.same({ nil, "timeout" }, { corral.select({ { a, "get" } }, { timeout = 0.03 }) })
    assert.is_true(corral.now() - t0 >= 0.02)
    assert.is_false(a:try_put(1))
  end)

  it("a closed channel's get case is ready with nil, 'closed'; a put case raises ClosedError", function()
    local a = corral.channel(0)
    a:close()
    assert.same({ 1, nil, "closed" }, { corral.select({ { a, "get" } }) })
    assert.equal("ClosedError", kind_of(function() corral.select({ { a, "put", 1 } }) end))
  end)

  it("rejects bad cases", function()
    assert.equal("UsageError", kind_of(function() corral.select({}) end))
    assert.equal("UsageError", kind_of(function() corral.select({ { {}, "get" } }) end))
    assert.equal("UsageError", kind_of(function() corral.select({ { corral.channel(), "take" } }) end))
    assert.equal("UsageError", kind_of(function() corral.select({ { corral.channel(), "put" } }) end))
  end)

  it("a cancelled select leaves no case behind", function()
    local a, b = corral.channel(0), corral.channel(0)
    local t = corral.spawn(function() return corral.select({ { a, "get" }, { b, "put", 1 } }) end)
    corral.spawn(function() end):result()
    assert.is_true(t:cancel())
    assert.equal("CancelledError", kind_of(function() t:result() end))
    assert.is_false(a:try_put(1))
    assert.same({ nil, "empty" }, { b:try_get() })
  end)
end)

describe("queue", function()
  it("has asyncio.Queue's put, get, task_done and join", function()
    local q = corral.queue(2)
    assert.equal(2, q:maxsize())
    local done = {}
    local workers = {}
    for w = 1, 2 do
      workers[w] = corral.spawn(function()
        while true do
          local v = q:get()
          corral.sleep(0.001)
          done[#done + 1] = v
          q:task_done()
        end
      end)
    end
    for i = 1, 10 do q:put(i) end
    q:join()
    assert.equal(10, #done)
    assert.is_true(q:empty())
    for w = 1, 2 do workers[w]:cancel() end
    assert.equal("UsageError", kind_of(function() q:task_done() end))
  end)

  it("put_nowait and get_nowait, full and qsize", function()
    local q = corral.queue(1)
    assert.is_true(q:put_nowait("a"))
    assert.is_true(q:full())
    assert.is_false(q:put_nowait("b"))
    assert.equal(1, q:qsize())
    assert.equal("a", q:get_nowait())
    assert.is_nil(q:get_nowait())
    local unbounded = corral.queue()
    for i = 1, 1000 do unbounded:put(i) end
    assert.equal(1000, unbounded:qsize())
    assert.is_false(unbounded:full())
  end)

  it("join with a timeout raises TimeoutError while work is unfinished", function()
    local q = corral.queue()
    q:put(1)
    assert.equal("TimeoutError", kind_of(function() q:join(0.02) end))
    q:get()
    q:task_done()
    assert.is_true(q:join(0))
  end)
end)

describe("lock and semaphore", function()
  it("acquire returns true, or false at the timeout; release of an unlocked lock is refused", function()
    local l = corral.lock()
    assert.is_true(l:acquire())
    assert.is_true(l:locked())
    local t0 = corral.now()
    assert.is_false(l:acquire(0.03))
    assert.is_true(corral.now() - t0 >= 0.02)
    l:release()
    assert.is_false(l:locked())
    assert.equal("UsageError", kind_of(function() l:release() end))
  end)

  it("with releases on error too and returns fn's results", function()
    local l = corral.lock()
    assert.same({ 1, 2 }, { l:with(function(a, b) return a, b end, 1, 2) })
    local ok, e = pcall(l.with, l, function() error("inside") end)
    assert.is_false(ok)
    assert.matches("inside", tostring(e))
    assert.is_false(l:locked())
  end)

  it("waiters get the lock in FIFO order", function()
    local l = corral.lock()
    l:acquire()
    local order = {}
    local ts = {}
    for i = 1, 5 do
      ts[i] = corral.spawn(function() l:with(function() order[#order + 1] = i end) end)
    end
    corral.spawn(function() end):result()
    l:release()
    corral.wait(ts)
    assert.same({ 1, 2, 3, 4, 5 }, order)
  end)

  it("a cancelled acquire never leaves the lock held", function()
    local l = corral.lock()
    l:acquire()
    local a = corral.spawn(function() return l:acquire() end)
    corral.spawn(function() end):result()
    -- in one turn: the lock is handed to a, then a is cancelled before it runs
    corral.spawn(function()
      l:release()
      a:cancel()
    end):result()
    assert.equal("CancelledError", kind_of(function() a:result() end))
    assert.is_false(l:locked())
    assert.is_true(l:acquire(0))
  end)

  it("a semaphore lets n in at once", function()
    local s = corral.semaphore(2)
    local inside, most = 0, 0
    local ts = {}
    for i = 1, 6 do
      ts[i] = corral.spawn(function()
        s:with(function()
          inside = inside + 1
          most = math.max(most, inside)
          corral.sleep(0.005)
          inside = inside - 1
        end)
      end)
    end
    corral.wait(ts)
    assert.equal(2, most)
    assert.equal(2, s:value())
  end)
end)

describe("event, condition and barrier", function()
  it("event: wait returns true once set, false at the timeout", function()
    local e = corral.event()
    assert.is_false(e:wait(0.01))
    local ws = {}
    for i = 1, 3 do ws[i] = corral.spawn(function() return e:wait() end) end
    corral.spawn(function() end):result()
    e:set()
    for i = 1, 3 do assert.is_true(ws[i]:result()) end
    assert.is_true(e:is_set())
    assert.is_true(e:wait(0))
    e:clear()
    assert.is_false(e:is_set())
  end)

  it("condition: wait releases the lock, notify wakes one, notify_all the rest", function()
    local c = corral.condition()
    local items, got = {}, {}
    local consumers = {}
    for i = 1, 3 do
      consumers[i] = corral.spawn(function()
        c:with(function()
          c:wait_for(function() return #items > 0 end)
          got[#got + 1] = table.remove(items, 1)
        end)
      end)
    end
    corral.spawn(function() end):result()
    c:with(function()
      items[1] = "one"
      assert.equal(1, c:notify())
    end)
    consumers[1]:result()
    assert.same({ "one" }, got)
    c:with(function()
      items[1], items[2] = "two", "three"
      assert.equal(2, c:notify_all())
    end)
    corral.wait(consumers)
    assert.equal(3, #got)
    assert.equal("UsageError", kind_of(function() c:notify() end))
    assert.equal("UsageError", kind_of(function() c:wait() end))
  end)

  it("condition: wait with a timeout returns false and holds the lock again", function()
    local c = corral.condition()
    c:acquire()
    assert.is_false(c:wait(0.02))
    assert.is_true(c:locked())
    c:release()
  end)

  it("barrier: n parties pass together, each with its index", function()
    local b = corral.barrier(3)
    local idx = {}
    local ts = {}
    for i = 1, 3 do
      ts[i] = corral.spawn(function()
        local v = b:wait()
        idx[#idx + 1] = v
      end)
    end
    corral.wait(ts)
    table.sort(idx)
    assert.same({ 0, 1, 2 }, idx)
    -- and again: it resets itself
    for i = 1, 3 do ts[i] = corral.spawn(function() return b:wait() end) end
    corral.wait(ts)
    for i = 1, 3 do assert.is_true(ts[i]:done() and not ts[i]:exception()) end
  end)

  it("barrier: abort breaks it for waiters and later waits; reset mends it", function()
    local b = corral.barrier(2)
    local w = corral.spawn(function() return b:wait() end)
    corral.spawn(function() end):result()
    b:abort()
    assert.equal("BrokenBarrierError", kind_of(function() w:result() end))
    assert.is_true(b:broken())
    assert.equal("BrokenBarrierError", kind_of(function() b:wait() end))
    b:reset()
    assert.is_false(b:broken())
    local t = corral.spawn(function() return b:wait() end)
    assert.is_number(b:wait())
    assert.is_number(t:result())
  end)

  it("barrier: a wait that times out breaks it", function()
    local b = corral.barrier(2)
    assert.equal("TimeoutError", kind_of(function() b:wait(0.02) end))
    assert.is_true(b:broken())
  end)
end)

describe("across thread workers", function()
  it("a channel passed as an argument is the same channel on both sides", function()
    local W = corral.worker { double = function(_, inch, outch)
      for v in inch:iter() do outch:put(v * 2) end
      outch:close()
      return "drained"
    end }
    local w = W:init()
    local a, b = corral.channel(4), corral.channel(4)
    local f = w:double(a, b)
    corral.spawn(function()
      for i = 1, 1000 do a:put(i) end
      a:close()
    end)
    local sum = 0
    for v in b:iter() do sum = sum + v end
    assert.equal(1000 * 1001, sum)
    assert.equal("drained", f:result())
    w:stop()
  end)

  it("unbuffered ping-pong between two thread workers", function()
    local P = corral.worker { run = function(_, me, other, n, first)
      local last
      for i = 1, n do
        if first then other:put(i); last = me:get() else last = me:get(); other:put(last) end
      end
      return last
    end }
    local a, b = P:init(), P:init()
    local ca, cb = corral.channel(0), corral.channel(0)
    local fa = a:run(ca, cb, 2000, true)
    local fb = b:run(cb, ca, 2000, false)
    assert.equal(2000, fa:result(20))
    assert.equal(2000, fb:result(20))
    a:stop(); b:stop()
  end)

  it("no lost update: 100 tasks over 4 threads increment a shared counter under a lock", function()
    local W = corral.worker { bump = function(_, lock, box, n)
      local tasks = {}
      for t = 1, n do
        tasks[t] = require("corral").spawn(function()
          lock:with(function()
            local v = box:get()
            require("corral").sleep(0) -- another task may run here: only the lock keeps it out
            box:put(v + 1)
          end)
        end)
      end
      require("corral").wait(tasks)
      return true
    end }
    local pool = W:options { workers = 4 }:init()
    local lock, box = corral.lock(), corral.channel(1)
    box:put(0)
    local fs = {}
    for i = 1, 4 do fs[i] = pool:bump(lock, box, 25) end
    corral.gather(fs)
    assert.equal(100, box:get())
    pool:stop()
  end)

  it("producer/consumer with backpressure across threads keeps the channel bounded", function()
    local W = corral.worker { produce = function(_, ch, n)
      for i = 1, n do ch:put(("x"):rep(100) .. i) end
      ch:close()
      return n
    end }
    local w = W:init()
    local ch = corral.channel(8)
    local f = w:produce(ch, 5000)
    local n, most = 0, 0
    for _ in ch:iter() do
      n = n + 1
      most = math.max(most, #ch)
    end
    assert.equal(5000, n)
    assert.is_true(most <= 8)
    assert.equal(5000, f:result())
    w:stop()
  end)

  it("events and barriers work between threads and the script", function()
    local W = corral.worker { meet = function(_, b, e)
      local i = b:wait(10)
      e:wait(10)
      return i
    end }
    local pool = W:options { workers = 3 }:init()
    local b, e = corral.barrier(4), corral.event()
    local fs = {}
    for i = 1, 3 do fs[i] = pool:meet(b, e) end
    local mine = b:wait(10)
    e:set()
    local idx = { mine }
    for i = 1, 3 do idx[#idx + 1] = fs[i]:result(10) end
    table.sort(idx)
    assert.same({ 0, 1, 2, 3 }, idx)
    pool:stop()
  end)

  it("queue, semaphore and condition between thread workers and the script", function()
    local W = corral.worker {
      consume = function(_, q)
        local n = 0
        while true do
          local v = q:get()
          q:task_done()
          if v == "stop" then return n end
          n = n + v
        end
      end,
      limited = function(_, sem, box)
        return sem:with(function()
          local inside = box:get() + 1
          box:put(inside)
          require("corral").sleep(0.002)
          box:put(box:get() - 1)
          return inside
        end)
      end,
      waiter = function(_, c, box)
        return c:with(function()
          return c:wait_for(function() return box:try_get() == "go" end, 10)
        end)
      end,
    }
    local pool = W:options { workers = 3 }:init()
    local q = corral.queue(2)
    local f = pool:consume(q)
    for i = 1, 20 do q:put(i) end
    q:put("stop")
    q:join(10)
    assert.equal(210, f:result(10))
    local sem, box = corral.semaphore(1), corral.channel(1)
    box:put(0)
    local fs = {}
    for i = 1, 6 do fs[i] = pool:limited(sem, box) end
    for i = 1, 6 do assert.equal(1, fs[i]:result(10)) end -- never two inside at once
    local c, gate = corral.condition(), corral.channel(1)
    local wf = pool:waiter(c, gate)
    h.wait_until(function() return select(4, require("corral.core").sync_info(c)) > 0 end)
    c:with(function()
      gate:put("go")
      c:notify_all()
    end)
    assert.is_true(wf:result(10))
    pool:stop()
  end)

  it("a worker that stops while it waits on a channel gives its place back", function()
    local W = corral.worker { take = function(_, ch) return ch:get() end }
    local w = W:init()
    local ch = corral.channel(0)
    local f = w:take(ch)
    -- wait until the worker waits on the channel
    h.wait_until(function() return select(4, require("corral.core").sync_info(ch)) > 0 end)
    assert.is_true(f:cancel())
    w:stop()
    assert.is_false(ch:try_put("nobody"))
  end)

  it("a channel first used in one context keeps its values, order and waiters when it is shared", function()
    local ch = corral.channel(3)
    ch:put(1); ch:put({ two = 2 }); ch:put(("3"):rep(100))
    -- a putter waits (full), and a getter on another channel
    local p = corral.spawn(function() ch:put("four"); return "put" end)
    local other = corral.channel(0)
    local g = corral.spawn(function() return other:get() end)
    corral.spawn(function() end):result()
    local W = corral.worker { drain = function(_, c, o, n)
      local got = {}
      for i = 1, n do got[i] = c:get() end
      o:put("from the worker")
      return got
    end }
    local w = W:init()
    local got = w:drain(ch, other, 4):result(10) -- ch and other are shared now
    assert.same({ 1, { two = 2 }, ("3"):rep(100), "four" }, got)
    assert.equal("put", p:result(10))
    assert.equal("from the worker", g:result(10))
    w:stop()
  end)

  it("a value put in a channel is a copy, whether or not the channel was shared", function()
    local ch = corral.channel(2)
    local t = { n = 1 }
    ch:put(t)
    t.n = 2
    local got = ch:get()
    assert.equal(1, got.n)
    assert.are_not.equal(t, got)
    assert.equal("CodecError", kind_of(function() ch:put({ co = coroutine.create(print) }) end))
  end)

  it("a process worker cannot hand the parent's channel back: a clear CodecError", function()
    local W = corral.worker { f = function(_, ch) return ch end }
    local w = W:options { mode = "process" }:init()
    local ok, e = pcall(function() return w:f(corral.channel(1)):result(10) end)
    assert.is_false(ok)
    assert.equal("CodecError", e.kind)
    assert.matches("cannot come from another process", e.message)
    w:stop()
  end)

  it("cannot be encoded as bytes", function()
    assert.equal("CodecError", kind_of(function() corral.encode(corral.lock()) end))
  end)
end)
