local corral = require "corral"

describe("tasks", function()
  it("run a function with its arguments and return all its results", function()
    local t = corral.spawn(function(a, b, c) return c, b, a end, 1, nil, 3)
    assert.is_true(corral.is_future(t))
    local x, y, z = t:result()
    assert.are.same({ 3, nil, 1 }, { x, y, z })
  end)

  it("start on a later turn, not inside spawn", function()
    local started = false
    local t = corral.spawn(function() started = true end)
    assert.is_false(started)
    assert.is_false(t:running())
    t:result()
    assert.is_true(started)
  end)

  it("wake sleepers in the order their timers fall due", function()
    local log = {}
    local function sleeper(name, d)
      corral.sleep(d)
      log[#log + 1] = name
    end
    local ts = { corral.spawn(sleeper, "c", 0.03), corral.spawn(sleeper, "a", 0.01),
      corral.spawn(sleeper, "b", 0.02) }
    corral.sleep(0) -- a turn: they start and sleep
    for i = 1, 3 do assert.is_true(ts[i]:running()) end
    local t = corral.now()
    while corral.now() - t < 0.05 do end -- the loop is busy: all three fall due at once
    corral.gather(ts)
    assert.are.same({ "a", "b", "c" }, log)
  end)

  it("run others while one sleeps", function()
    local order = {}
    local a = corral.spawn(function() corral.sleep(0.03); order[#order + 1] = "a" end)
    local b = corral.spawn(function() order[#order + 1] = "b" end)
    corral.gather({ a, b })
    assert.are.same({ "b", "a" }, order)
  end)

  it("wait on other tasks from inside a task, nested", function()
    local outer = corral.spawn(function()
      local inner = corral.spawn(function()
        local leaf = corral.spawn(function() corral.sleep(0.01); return 5 end)
        return leaf:result() * 2
      end)
      return inner:result() + 1
    end)
    assert.are.equal(11, outer:result())
  end)

  it("may yield with coroutine.yield to let others run", function()
    local log = {}
    local a = corral.spawn(function()
      log[#log + 1] = "a1"
      coroutine.yield()
      log[#log + 1] = "a2"
    end)
    local b = corral.spawn(function() log[#log + 1] = "b" end)
    corral.gather({ a, b })
    assert.are.same({ "a1", "b", "a2" }, log)
  end)

  it("fail with the error and keep the task's traceback", function()
    local t = corral.spawn(function() error("broken here") end)
    local ok, e = pcall(t.result, t)
    assert.is_false(ok)
    assert.matches("broken here", e)
    assert.matches("task_spec.lua", t._tb)
  end)

  it("measure time with a monotonic now()", function()
    local a = corral.now()
    corral.sleep(0.02)
    local b = corral.now()
    assert.is_true(b - a >= 0.015)
    assert.is_true(b - a < 5)
  end)

  it("sleep(0) yields to other tasks", function()
    local log = {}
    local a = corral.spawn(function() corral.sleep(0); log[#log + 1] = "a" end)
    local b = corral.spawn(function() log[#log + 1] = "b" end)
    corral.gather({ a, b })
    assert.are.same({ "b", "a" }, log)
  end)

  describe("cancellation", function()
    it("of a pending task means it never starts", function()
      local ran = false
      local t = corral.spawn(function() ran = true end)
      assert.is_true(t:cancel())
      corral.run()
      assert.is_false(ran)
      assert.is_true(t:cancelled())
      assert.is_false(t:cancel())
    end)

    it("of a running task raises CancelledError at its suspension point", function()
      local cleaned, reached = false, false
      local t = corral.spawn(function()
        local ok, e = pcall(corral.sleep, 10)
        cleaned = not ok and corral.is_error(e, "CancelledError")
        error(e, 0)
      end)
      -- spawned after t: it runs once t has reached its wait
      local killer = corral.spawn(function()
        assert(t:running())
        assert(t:cancel())
        reached = true
      end)
      local t0 = corral.now()
      local ok, e = pcall(t.result, t)
      assert.is_false(ok)
      assert.is_true(corral.is_error(e, "CancelledError"))
      assert.is_true(cleaned)
      assert.is_true(t:cancelled())
      assert.is_true(corral.now() - t0 < 5)
      killer:result()
      assert.is_true(reached)
    end)

    it("lets a task catch it and finish normally", function()
      local t = corral.spawn(function()
        local ok = pcall(corral.sleep, 10)
        return ok and "slept" or "caught"
      end)
      corral.spawn(function() t:cancel() end)
      assert.are.equal("caught", t:result())
      assert.is_false(t:cancelled())
    end)

    it("of a task that cancels itself happens at its next wait", function()
      local t
      local after = false
      t = corral.spawn(function()
        t:cancel()
        after = true
        corral.sleep(0)
        return "not reached"
      end)
      local ok, e = pcall(t.result, t)
      assert.is_false(ok)
      assert.is_true(corral.is_error(e, "CancelledError"))
      assert.is_true(after)
    end)

    it("during a gather stops the gather and leaves the inputs running", function()
      local child = corral.spawn(function() corral.sleep(0.05); return "child" end)
      local g = corral.spawn(function() return corral.gather({ child }) end)
      corral.spawn(function() g:cancel() end) -- runs after g is waiting
      local ok, e = pcall(g.result, g)
      assert.is_false(ok)
      assert.is_true(corral.is_error(e, "CancelledError"))
      assert.are.equal("child", child:result())
    end)

    it("of a task woken but not yet resumed raises at that wait, as in asyncio", function()
      local f = corral.future()
      local got
      local t = corral.spawn(function()
        got = f:result()
        corral.sleep(0)
        return "not reached"
      end)
      corral.spawn(function()
        f:set_result("value")
        t:cancel()
      end)
      local ok, e = pcall(t.result, t)
      assert.is_false(ok)
      assert.is_true(corral.is_error(e, "CancelledError"))
      assert.is_nil(got)
      assert.are.equal("value", f:result())
    end)
  end)

  it("work the same outside any task: waits drive the loop", function()
    -- this spec itself runs outside any task
    local log = {}
    corral.spawn(function() log[#log + 1] = "task" end)
    corral.sleep(0.01)
    assert.are.same({ "task" }, log)
  end)

  it("refuse corral.run() from inside a task", function()
    local t = corral.spawn(function() return corral.run() end)
    local ok, e = pcall(t.result, t)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "UsageError"))
  end)
end)

describe("sleep", function()
  it("accepts math.huge and is cancelled like any other wait", function()
    local t = corral.spawn(corral.sleep, math.huge)
    corral.spawn(function() t:cancel() end) -- runs after t is asleep
    local ok, e = pcall(t.result, t, 10)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "CancelledError"))
  end)
end)
