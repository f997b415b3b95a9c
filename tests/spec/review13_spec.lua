-- Review 13: the parent's channels and sync primitives used by process
-- workers "through the parent" (SYNC / SYNC_CANCEL / SYNC_REPLY frames).
-- An adversarial review: forged frames from a child, cancellation racing
-- grants, children that die, what the guide claims.
local corral = require "corral"
local sync = require "corral.sync"
local core = require "corral.core"
local ffi = require "ffi"
local h = require "helper"

local be = h.be

-- waiters queued on s now (in the parent)
local function waiting(s) return select(4, core.sync_info(s)) end

local function live()
  collectgarbage()
  collectgarbage()
  return sync.live()
end

-- The handle a parent's object is known by once it crossed (corral_sync's
-- `handle`, at offset 8 of the structure: src/internal.h). The child gets
-- the same number in its RSYNC extension; a forging child can also simply
-- count (handles are generation << 32 | slot + 1).
local function handle_of(x)
  local p = ffi.cast("void **", x)[0]
  return tonumber(ffi.cast("uint64_t *", ffi.cast("char *", p) + 8)[0])
end

local OP = { PUT = 1, GET = 2, ACQUIRE = 3, TRY_PUT = 16, TRY_GET = 17, CLOSE = 18, RELEASE = 19,
  INFO = 24, UNDO_GET = 25, UNDO_ACQUIRE = 26 }

local function be_double(x)
  local b = ffi.new("double[1]", x)
  local u = ffi.cast("uint8_t *", b)
  local t = {}
  for i = 7, 0, -1 do t[#t + 1] = string.char(u[i]) end
  return table.concat(t)
end

-- A SYNC frame as a child's pump writes it (process.c): id, handle, op, n,
-- value (tag 0 none, 3 number, 4 string, 5 encoded).
local function sync_frame(id, hd, op, n, tag, val)
  local v = string.char(tag or 0)
  if tag == 3 then
    v = v .. be_double(val)
  elseif tag == 4 or tag == 5 then
    v = v .. be(#val, 4) .. val
  end
  local body = "\6" .. be(id, 8) .. be(hd, 8) .. string.char(op) .. be(n, 8) .. v
  return be(#body, 4) .. body
end

local W = corral.worker {
  touch = function() return "ok" end,
  -- raw bytes to the parent on descriptor 3 (the frames' socket)
  raw = function(_, bytes)
    local lffi = require "ffi"
    pcall(lffi.cdef, "long write(int, const void *, unsigned long);")
    assert(lffi.C.write(3, bytes, #bytes) == #bytes)
    return "returned"
  end,
  get = function(_, ch, timeout) return ch:get(timeout) end,
  acquire = function(_, l, timeout) return l:acquire(timeout) end,
  -- the parent's channel handed to a thread worker of the child's own
  to_thread = function(_, ch)
    local c = require "corral"
    local T = c.worker { g = function(_, x) return x:get(5) end }
    local t = T:init()
    local ok, v = pcall(function() return t:g(ch):result(10) end)
    t:stop()
    if not ok then error(v, 0) end
    return v
  end,
  -- and to a process worker of its own
  to_process = function(_, ch)
    local c = require "corral"
    local P = c.worker { g = function(_, x) return x:get(5) end }
    local t = P:options { mode = "process" }:init()
    local ok, v = pcall(function() return t:g(ch):result(10) end)
    t:stop()
    return { ok = ok, err = tostring(v) }
  end,
  -- 8 tasks getting with a short timeout, over and over, until nil/"stop"
  gets = function(_, ch, timeout)
    local c = require "corral"
    local got, fs = {}, {}
    for t = 1, 8 do
      fs[t] = c.spawn(function()
        while true do
          local ok, v = pcall(ch.get, ch, timeout)
          if ok then
            if v == nil then return end
            got[#got + 1] = v
          end
        end
      end)
    end
    c.gather(fs)
    return got
  end,
  -- 8 tasks putting 1..n with a short timeout each: which puts said yes
  puts = function(_, ch, n, timeout)
    local c = require "corral"
    local done, fs = {}, {}
    for t = 1, 8 do
      fs[t] = c.spawn(function()
        for i = t, n, 8 do
          if pcall(ch.put, ch, i, timeout) then done[#done + 1] = i end
        end
      end)
    end
    c.gather(fs)
    return done
  end,
  -- one task waits on the lock, another on the channel
  wait_both = function(_, l, ch)
    local c = require "corral"
    return c.gather { c.spawn(function() return l:acquire() end), c.spawn(function() return ch:get() end) }
  end,
  pid = function()
    local lffi = require "ffi"
    pcall(lffi.cdef, "int getpid(void);")
    return lffi.C.getpid()
  end,
}

describe("review 13 (defects found, fixed): the parent's sync objects from process workers", function()
  local w
  before_each(function() w = W:options { mode = "process" }:init() end)
  after_each(function() if w then w:stop { drain = false } end end)

  ---------------------------------------------------------------------------
  -- Defects found (fixed)
  ---------------------------------------------------------------------------

  it("a child can hand the parent's channel to a thread worker of its own", function()
    local ch = corral.channel(1)
    ch:put("through")
    assert.equal("through", w:to_thread(ch):result(20))
  end)

  it("a forged UNDO_GET cannot push a value past a channel's capacity", function()
    local ch = corral.channel(1)
    w:touch(ch):result(10)
    local hd = handle_of(ch)
    local frames = sync_frame(0, hd, OP.UNDO_GET, 0, 3, 1) .. sync_frame(0, hd, OP.UNDO_GET, 0, 3, 2)
      .. sync_frame(0, hd, OP.UNDO_GET, 0, 3, 3)
    pcall(function() return w:raw(frames):result(10) end)
    assert.is_true(#ch <= 1, ("a channel of capacity 1 holds %d values"):format(#ch))
  end)

  it("a forged UNDO_GET cannot put a value into a closed channel", function()
    local ch = corral.channel(1)
    w:touch(ch):result(10)
    ch:close()
    pcall(function() return w:raw(sync_frame(0, handle_of(ch), OP.UNDO_GET, 0, 3, 42)):result(10) end)
    assert.equal(0, #ch)
    assert.is_nil(ch:get())
  end)

  it("a forged UNDO_GET does not upset a queue's count of unfinished tasks", function()
    local q = corral.queue()
    w:touch(q):result(10)
    pcall(function() return w:raw(sync_frame(0, handle_of(q), OP.UNDO_GET, 0, 3, 42)):result(10) end)
    if #q > 0 then
      q:get(1)
      -- a value got from the queue: task_done is due for it
      assert.has_no.errors(function() q:task_done() end)
    end
  end)

  it("a forged ACQUIRE of 2 permits on a lock does not wedge the lock", function()
    local l = corral.lock()
    w:touch(l):result(10)
    pcall(function() return w:raw(sync_frame(7, handle_of(l), OP.ACQUIRE, 2)):result(10) end)
    -- either the child was ended for it, or the request was refused: the
    -- lock, unlocked, can be taken
    assert.is_false(l:locked())
    assert.is_true(l:acquire(2))
    l:release()
  end)

  it("gets that time out while values are granted: the child does not crash, no value lost",
    function()
    -- A child's task gives up (timeout) after its request was sent: the
    -- record is posted to the pump for a CANCEL; when the parent's reply
    -- comes before the pump drained that post, on_sync_reply frees the
    -- record while it is still in the pump's post queue (use after free).
    local ch = corral.channel(0)
    local f = w:gets(ch, 0.0003)
    local n, put = 300, 0
    for i = 1, n do
      if not pcall(ch.put, ch, i, 5) then break end -- (the child is gone)
      put = i
      if i % 7 == 0 then corral.sleep(0.0002) end
    end
    ch:close()
    local ok, got = pcall(f.result, f, 30)
    assert.is_true(ok, tostring(got))
    assert.equal(n, put)
    local seen, missing, twice = {}, 0, 0
    for _, v in ipairs(got) do seen[v] = (seen[v] or 0) + 1 end
    for i = 1, n do
      if not seen[i] then missing = missing + 1 elseif seen[i] > 1 then twice = twice + 1 end
    end
    assert.same({ 0, 0 }, { missing, twice })
  end)

  it("a child's put that reports a timeout did not put its value", function()
    -- The parent grants a put (the value is in the channel) while the
    -- child's task times out: the reply finds the record abandoned and it
    -- is dropped, so the task raises TimeoutError for a value delivered.
    -- (A thread worker's put is never both: sync_finish decides.)
    local phantom, rounds, crashed = 0, 0, nil
    while phantom == 0 and rounds < 5 and not crashed do
      rounds = rounds + 1
      local ch = corral.channel(0)
      local g = w:puts(ch, 1000, 0.0003)
      local recv = {}
      while not g:done() do
        local ok, v = pcall(ch.get, ch, 0.0005)
        if ok and v ~= nil then recv[#recv + 1] = v end
      end
      for v in function() return ch:try_get() end do recv[#recv + 1] = v end
      local ok, done = pcall(g.result, g, 30)
      if not ok then
        crashed = tostring(done)
      else
        local said = {}
        for _, v in ipairs(done) do said[v] = true end
        for _, v in ipairs(recv) do if not said[v] then phantom = phantom + 1 end end
      end
    end
    assert.is_nil(crashed)
    assert.equal(0, phantom)
  end)

  ---------------------------------------------------------------------------
  -- Attacks that held up (regression tests)
  ---------------------------------------------------------------------------

  local function ends_child(frames_of, why)
    local mine, other = corral.channel(1), corral.channel(1)
    local w1, w2 = W:options { mode = "process" }:init(), W:options { mode = "process" }:init()
    w1:touch(mine):result(10)
    w2:touch(other):result(10)
    other:put("keep")
    local ok, e = pcall(function() return w1:raw(frames_of(handle_of(mine), handle_of(other))):result(10) end)
    w1:stop { drain = false }
    assert.is_false(ok, why)
    assert.is_true(corral.is_error(e, "WorkerCrashed"), tostring(e))
    assert.truthy(tostring(e):find(why, 1, true), tostring(e))
    assert.equal(1, #other)
    assert.equal("keep", w2:get(other):result(10))
    w2:stop()
  end

  it("forged SYNC frames end only that child, with a clear error", function()
    ends_child(function(mine) return sync_frame(1, mine + 77, OP.INFO, 0) end,
      "an object it was not given")
    ends_child(function(_, other) return sync_frame(1, other, OP.TRY_GET, 0) end,
      "an object it was not given")
    ends_child(function(mine) return sync_frame(1, mine, OP.ACQUIRE, 1) end,
      "an operation its object does not have")
    ends_child(function(mine) return sync_frame(1, mine, 99, 1) end,
      "an operation its object does not have")
    ends_child(function(mine) return sync_frame(1, mine, OP.GET, -1) end, "a bad count")
    ends_child(function(mine) return sync_frame(1, mine, OP.GET, 2 ^ 41) end, "a bad count")
    ends_child(function(mine) return sync_frame(1, mine, OP.TRY_PUT, 0, 4, ("x"):rep(23)) end,
      "a malformed value")
    ends_child(function(mine) return sync_frame(1, mine, OP.TRY_PUT, 0) end,
      "does not fit its operation")
    ends_child(function(mine) return sync_frame(1, mine, OP.GET, 0, 3, 1) end,
      "does not fit its operation")
    ends_child(function(mine) return sync_frame(1, mine, OP.GET, 0, 9) end, "malformed SYNC")
  end)

  it("a child's process worker is refused the parent's channel clearly", function()
    local ch = corral.channel(1)
    local r = w:to_process(ch):result(30)
    assert.is_false(r.ok)
    assert.truthy(r.err:find("CodecError", 1, true), r.err)
  end)

  it("a child SIGKILLed while it waits on the parent's lock: withdrawn, nothing leaked, restarted",
    function()
    local objects0, waiters0 = live()
    local l, ch = corral.lock(), corral.channel(0)
    local r = W:options { mode = "process", restart = true, restart_backoff = 0 }:init()
    local pid = r:pid():result(10)
    l:acquire()
    local f1 = r:wait_both(l, ch)
    h.wait_until(function() return waiting(l) > 0 and waiting(ch) > 0 end)
    pcall(ffi.cdef, "int kill(int, int);")
    ffi.C.kill(pid, 9)
    local ok, e = pcall(f1.result, f1, 10)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "WorkerCrashed"), tostring(e))
    h.wait_until(function() return waiting(l) == 0 and waiting(ch) == 0 end)
    l:release()
    assert.is_true(l:acquire(1))
    l:release()
    -- the new process uses the same objects
    local g = r:get(ch)
    h.wait_until(function() return waiting(ch) > 0 end)
    ch:put("again")
    assert.equal("again", g:result(10))
    assert.is_true(r:acquire(l):result(10))
    assert.is_true(l:locked()) -- (held by the child, as documented)
    r:stop()
    l, ch, g, f1 = nil, nil, nil, nil -- luacheck: ignore (let go, for the leak check)
    h.wait_until(function()
      local objects, waiters = live()
      return objects <= objects0 and waiters <= waiters0
    end, 10)
  end)

  it("a hard cancel that kills a child waiting on the parent's channel withdraws its wait", function()
    local hw = W:options { mode = "process", cancel_grace = 0.05, restart = true, restart_backoff = 0 }
      :init()
    local ch = corral.channel(0)
    local f = hw:get(ch)
    h.wait_until(function() return waiting(ch) > 0 end)
    f:cancel()
    h.wait_until(function() return waiting(ch) == 0 end)
    assert.is_false(ch:try_put("nobody"))
    local g = hw:get(ch, 5)
    h.wait_until(function() return waiting(ch) > 0 end)
    ch:put("next")
    assert.equal("next", g:result(10))
    hw:stop()
  end)
end)
