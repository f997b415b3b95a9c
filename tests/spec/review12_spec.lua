-- Review 12: adversarial specs for channels, sync primitives, select and
-- corral.scope/concurrently (commits 4f0080c, 9290101). The specs under
-- "defects" fail on the code as reviewed; those under "holds up" pass and
-- are kept as regression tests.
local corral = require "corral"
local sync = require "corral.sync"
local h = require "helper"

local function live()
  collectgarbage()
  collectgarbage()
  return sync.live()
end

-- one turn for the tasks spawned so far to reach their waits
local function settle()
  corral.spawn(function() end):result()
end

describe("review12 (defects found, fixed)", function()
  it("a get whose value fails to decode still wakes the putter it took it from "
    .. "(no stranded task, no leaked record)",
    function()
    -- a C function travels as its path in a loaded module; once the module
    -- is gone the value no longer decodes
    local it = ("a"):gmatch("a")
    package.loaded.review12_mod = { it = it }
    local ch = corral.channel(0)
    local _, waiters0 = live()
    local p = corral.spawn(function() ch:put(it); return "put done" end)
    settle() -- p waits as a putter
    package.loaded.review12_mod = nil
    local ok, e = pcall(ch.get, ch)
    assert.is_false(ok)
    -- the failure is a CodecError, as for a value that cannot be put
    local kind = corral.is_error(e) and e.kind or type(e)
    -- the putter handed its value over: its put must end (it is never woken)
    corral.wait({ p }, { timeout = 2 })
    local done = p:done()
    if not done then p:cancel(); corral.wait({ p }, { timeout = 2 }) end
    assert.is_true(done, "the putter whose value was taken was never woken")
    assert.equal("CodecError", kind)
    assert.equal(waiters0, select(2, live()))
  end)

  it("the same with a buffered channel: the putter moved into the ring by the get is woken", function()
    local it = ("a"):gmatch("a")
    package.loaded.review12_mod2 = { it = it }
    local ch = corral.channel(1)
    ch:put(it)
    local p = corral.spawn(function() ch:put("second"); return "put done" end)
    settle() -- p waits: the channel is full
    package.loaded.review12_mod2 = nil
    assert.is_false(pcall(ch.get, ch))
    corral.wait({ p }, { timeout = 2 })
    local done = p:done()
    if not done then p:cancel(); corral.wait({ p }, { timeout = 2 }) end
    assert.is_true(done, "the putter refilled into the ring was never woken")
  end)

  it("barrier: arrival indices stay distinct (0 to n-1) after a waiter is cancelled", function()
    local b = corral.barrier(3)
    local A = corral.spawn(function() return b:wait() end) -- index 0
    local B = corral.spawn(function() return b:wait() end) -- index 1
    settle()
    assert.is_true(A:cancel())
    settle()
    local C = corral.spawn(function() return b:wait() end)
    settle()
    local mine = b:wait(5)
    local idx = { B:result(5), C:result(5), mine }
    table.sort(idx)
    assert.same({ 0, 1, 2 }, idx)
  end)

  it("a value a cancelled getter gives back goes to the head of the channel, before later ones", function()
    -- (documented: it may make the channel hold one more than its capacity)
    local ch = corral.channel(1)
    local g = corral.spawn(function() return ch:get() end)
    settle()
    corral.spawn(function()
      ch:put("a") -- handed to g
      ch:put("b") -- fills the channel (1 of 1)
      g:cancel() -- g gives "a" back to the head
    end):result()
    assert.is_false(pcall(g.result, g))
    assert.equal(2, #ch)
    assert.equal("a", ch:get())
    assert.equal("b", ch:get())
  end)

  it("a channel put into itself is freed once the value is taken out (documented: a cycle is not)", function()
    local objects0 = live()
    -- (in a function of its own: a do-block's dead locals stay on the stack)
    local function use()
      local ch = corral.channel(1)
      ch:put(ch)
      local same = ch:get()
      return #same
    end
    assert.equal(0, use())
    assert.equal(objects0, (live()))
  end)

  it("condition:wait cancelled while it takes the lock back raises CancelledError (the cancel is not lost)",
    function()
    local c = corral.condition()
    local T = corral.spawn(function()
      -- (the lock is held again when CancelledError comes: `with` releases it)
      return c:with(function() return c:wait() end)
    end)
    settle() -- T waits for a notify (the lock released)
    c:acquire()
    c:notify() -- T is notified, then waits for the lock we hold
    settle()
    settle()
    assert.is_true(T:cancel())
    settle()
    c:release()
    corral.wait({ T }, { timeout = 2 })
    assert.is_true(T:done())
    assert.is_false(c:locked())
    -- the doc: the lock is taken again "also when cancelled, before
    -- CancelledError is raised"; cancel() said true, the task had no later wait
    local ok, e = pcall(T.result, T)
    assert.is_false(ok, "the cancel was accepted but the task returned normally")
    assert.is_true(corral.is_error(e, "CancelledError"))
  end)

  it("scope: a task spawned after scope:cancel() is cancelled too (the scope does not hang)", function()
    local t = corral.spawn(function()
      return corral.scope(function(s)
        s:cancel()
        s:spawn(function() corral.sleep(1e6) end)
      end)
    end)
    corral.wait({ t }, { timeout = 2 })
    local done = t:done()
    if not done then t:cancel(); corral.wait({ t }, { timeout = 2 }) end
    assert.is_true(done, "the scope waits for a task spawned after it was cancelled")
  end)

  it("scope: a task spawned by a child after the caller was cancelled is cancelled too", function()
    local started = corral.event()
    local t = corral.spawn(function()
      return corral.scope(function(s)
        s:spawn(function()
          started:set()
          local ok = pcall(corral.sleep, 1e6)
          -- its cleanup starts one more task of the scope
          if not ok then s:spawn(function() corral.sleep(1e6) end) end
        end)
      end)
    end)
    assert.is_true(started:wait(2))
    assert.is_true(t:cancel())
    corral.wait({ t }, { timeout = 2 })
    local done = t:done()
    if not done then t:cancel(); corral.wait({ t }, { timeout = 2 }) end
    assert.is_true(done, "the cancelled scope waits forever for a task spawned after the cancel")
  end)

  it("scope: the body's own failure is not dropped when a child failed first", function()
    local ok, e = pcall(corral.scope, function(s)
      local t = s:spawn(function() error("child") end)
      corral.wait({ t })
      error("body")
    end)
    assert.is_false(ok)
    local all = tostring(e)
    for _, o in ipairs(type(e) == "table" and e.others or {}) do all = all .. " | " .. tostring(o) end
    assert.matches("body", all)
  end)

  it("concurrently(...):wait{fail_hard=true} leaves no unretrieved error behind (no reports on stderr)",
    function()
    local out, err, code = h.run([[
      local corral = require "corral"
      local w = corral.concurrently(3, function() error("each fails") end)
      local ok = pcall(w.wait, w, { fail_hard = true })
      print(ok)
    ]], 30)
    assert.equal(0, code)
    assert.matches("false", out)
    assert.not_matches("unretrieved", err)
  end)
end)

describe("review12 holds up", function()
  it("a thread worker that dies (os.exit) after a lock and a value were granted to it gives both back",
    function()
    local W = corral.worker {
      take = function(_, l, ch, ready)
        local c = require "corral"
        local cc = require "corral.core"
        c.spawn(function() l:acquire() end)
        c.spawn(function() ch:get() end)
        c.spawn(function() end):result()
        ready:put(true)
        -- no wait here: the grants are posted but never run
        local t0 = c.now()
        while (select(4, cc.sync_info(l)) > 0 or select(4, cc.sync_info(ch)) > 0)
          and c.now() - t0 < 5 do
        end
        os.exit(3)
      end,
    }
    local w = W:init()
    local l, ch, ready = corral.lock(), corral.channel(1), corral.channel(1)
    l:acquire()
    local f = w:take(l, ch, ready)
    assert.is_true(ready:get(5))
    l:release() -- granted to the worker's waiter
    ch:put("v") -- handed to the worker's getter
    local ok, e = pcall(f.result, f, 10)
    assert.is_false(ok)
    assert.equal("WorkerCrashed", e.kind)
    assert.is_true(l:acquire(2))
    assert.equal("v", ch:try_get())
    pcall(w.stop, w)
    assert.equal(0, select(2, live()))
  end)

  it("select across thread workers with timeouts racing grants loses and duplicates nothing", function()
    local W = corral.worker {
      prod = function(_, a, b, base, n)
        local c = require "corral"
        local sent = 0
        for i = 1, n do
          while not c.select({ { a, "put", base + i }, { b, "put", base + i } }, { timeout = 0.0005 }) do end
          sent = sent + base + i
        end
        return sent
      end,
    }
    local pool = W:options { workers = 3 }:init()
    local a, b = corral.channel(0), corral.channel(2)
    local N = 1000
    local fs = {}
    for i = 1, 3 do fs[i] = pool:prod(a, b, i * 100000, N) end
    local got, cnt = 0, 0
    local consumers = {}
    for k = 1, 3 do
      consumers[k] = corral.spawn(function()
        while cnt < 3 * N do
          local mode = (cnt + k) % 3
          if mode == 0 then
            local i, v = corral.select({ { a, "get" }, { b, "get" } }, { timeout = 0.0003 })
            if i then got, cnt = got + v, cnt + 1 end
          else
            local ch = mode == 1 and a or b
            local ok, v = pcall(ch.get, ch, 0.0002)
            if ok then got, cnt = got + v, cnt + 1 end
          end
        end
      end)
    end
    corral.wait(consumers, { timeout = 60 })
    local sent = 0
    for i = 1, 3 do sent = sent + fs[i]:result(10) end
    pool:stop()
    assert.equal(3 * N, cnt)
    assert.equal(sent, got)
    assert.equal(0, #a + #b)
    assert.equal(0, select(2, live()))
  end)

  it("a lock hammered by 4 threads with timeouts and cancelled waiters: no lost update, left unlocked",
    function()
    local W = corral.worker {
      bump = function(_, lock, box, n)
        local c = require "corral"
        local tasks = {}
        for t = 1, n do
          tasks[t] = c.spawn(function()
            while not lock:acquire(0.0003) do end
            local v = box:get()
            c.sleep(0)
            box:put(v + 1)
            lock:release()
          end)
          local x = c.spawn(function() lock:acquire(); lock:release() end)
          if t % 2 == 0 then c.sleep(0) end
          x:cancel()
        end
        c.wait(tasks)
        return n
      end,
    }
    local pool = W:options { workers = 4 }:init()
    local lock, box = corral.lock(), corral.channel(1)
    box:put(0)
    local fs = {}
    for i = 1, 8 do fs[i] = pool:bump(lock, box, 100) end
    corral.gather(fs, { timeout = 60 })
    pool:stop()
    assert.equal(800, box:get())
    assert.is_false(lock:locked())
    assert.equal(0, select(2, live()))
  end)

  it("select naming one channel twice, and put and get on one channel, does one case", function()
    local ch = corral.channel(0)
    local t = corral.spawn(function() return corral.select({ { ch, "get" }, { ch, "get" } }) end)
    settle()
    assert.is_true(ch:try_put("x"))
    assert.is_false(ch:try_put("y")) -- the other record was withdrawn with it
    local i, v = t:result(2)
    assert.is_true(i == 1 or i == 2)
    assert.equal("x", v)
    -- put and get on the same unbuffered channel: two such selects meet
    local s1 = corral.spawn(function() return corral.select({ { ch, "put", 1 }, { ch, "get" } }) end)
    settle()
    local i2, v2 = corral.select({ { ch, "put", 2 }, { ch, "get" } }, { timeout = 2 })
    local j, w = s1:result(2)
    assert.is_not_nil(i2)
    -- one put and one get happened between them
    if i2 == 1 then
      assert.same({ 2, 2 }, { j, w })
    else
      assert.same({ 1, true }, { j, w })
      assert.equal(1, v2)
    end
    assert.same({ nil, "empty" }, { ch:try_get() })
    assert.equal(0, select(2, live()))
  end)

  it("a select cancelled after a case was granted returns it and takes the cancel at the next wait",
    function()
    local ch = corral.channel(0)
    local t = corral.spawn(function()
      local i, v = corral.select({ { ch, "get" }, { corral.channel(0), "get" } })
      local ok = pcall(corral.sleep, 1)
      return i, v, ok
    end)
    settle()
    corral.spawn(function()
      ch:put("won")
      t:cancel()
    end):result()
    assert.same({ 1, "won", false }, { t:result(2) })
  end)
end)
