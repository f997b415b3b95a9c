-- Timers, retry, debounce, throttle, once and group (lua/corral/patterns.lua).
local corral = require "corral"
local h = require "helper"
local patterns = require "corral.patterns"

local kind_of = h.kind_of

describe("timers", function()
  it("after calls fn once, as a task, not before its time; cancel stops it", function()
    local got = corral.channel(4)
    local t0 = corral.now()
    local t = corral.after(0.03, function(x) got:put({ x, corral.now() - t0 }) end, "a")
    assert.is_true(t:active())
    local v = got:get(5)
    assert.equal("a", v[1])
    assert.is_true(v[2] >= 0.025)
    assert.is_false(t:active())
    assert.is_false(t:cancel()) -- it fired already
    local fired = false
    local c = corral.after(0.02, function() fired = true end)
    assert.is_true(c:cancel())
    corral.sleep(0.05)
    assert.is_false(fired)
  end)

  it("every ticks on a fixed schedule until cancelled", function()
    local ticks = corral.channel(100)
    local t0 = corral.now()
    local t = corral.every(0.02, function() ticks:put(corral.now() - t0) end)
    local seen = {}
    for i = 1, 5 do seen[i] = ticks:get(5) end
    assert.is_true(t:cancel())
    for i = 1, 5 do assert.is_true(seen[i] >= 0.02 * i - 0.005, "tick " .. i .. " early") end
    assert.is_true(seen[5] < 2, "ticks too slow")
    corral.sleep(0.06)
    local after = #ticks
    corral.sleep(0.06)
    assert.equal(after, #ticks) -- no more ticks
    assert.equal("UsageError", kind_of(function() corral.every(0, print) end))
    assert.equal("UsageError", kind_of(function() corral.after(-1, print) end))
  end)
end)

describe("corral.retry", function()
  it("retries until fn succeeds and returns its results", function()
    local n = 0
    local a, b = corral.retry(function()
      n = n + 1
      if n < 3 then error("not yet") end
      return "ok", n
    end, { delay = 0.001 })
    assert.same({ "ok", 3 }, { a, b })
  end)

  it("raises RetryError with every attempt once the retries run out", function()
    local n = 0
    local ok, e = pcall(corral.retry, function()
      n = n + 1
      error({ code = n })
    end, { max_retries = 2, delay = 0.001 })
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "RetryError"))
    assert.equal(3, n)
    assert.equal(3, #e.attempts)
    assert.same({ code = 3 }, e.attempts[3].value)
    assert.equal(e.attempts[3], e.cause)
  end)

  it("waits between attempts by the backoff, and only its task waits", function()
    local times = {}
    local other = 0
    local ticker = corral.spawn(function()
      while true do
        other = other + 1
        corral.sleep(0.005)
      end
    end)
    local t0 = corral.now()
    pcall(corral.retry, function() times[#times + 1] = corral.now() - t0; error("x") end,
      { max_retries = 3, delay = 0.02, backoff = "exponential", jitter = false })
    ticker:cancel()
    -- waits of 0.02, 0.04, 0.08: attempts at about 0, 0.02, 0.06, 0.14
    assert.is_true(times[2] >= 0.019 and times[3] >= 0.059 and times[4] >= 0.139)
    assert.is_true(times[4] < 5)
    assert.is_true(other >= 5, "other tasks ran while retry waited")
  end)

  it("delays follow each backoff, capped by max_delay, and jitter stays within [d/2, d]", function()
    local function ds(backoff, extra)
      local o = { delay = 1, backoff = backoff, jitter = false }
      for k, v in pairs(extra or {}) do o[k] = v end
      local out = {}
      for k = 1, 5 do out[k] = patterns.delay_of(o, k) end
      return out
    end
    assert.same({ 1, 2, 4, 8, 16 }, ds("exponential"))
    assert.same({ 1, 2, 3, 4, 5 }, ds("linear"))
    assert.same({ 1, 1, 2, 3, 5 }, ds("fibonacci"))
    assert.same({ 1, 1, 1, 1, 1 }, ds("fixed"))
    assert.same({ 1, 2, 3, 3, 3 }, ds("exponential", { max_delay = 3 }))
    for _ = 1, 100 do
      local d = patterns.delay_of({ delay = 2, backoff = "fixed", jitter = true }, 1)
      assert.is_true(d >= 1 and d <= 2)
    end
  end)

  it("retry_on: a list of kinds or a function; another error is raised at once", function()
    local n = 0
    local ok, e = pcall(corral.retry, function()
      n = n + 1
      error(corral.error("CodecError", "no"))
    end, { delay = 0.001, retry_on = { "TimeoutError" } })
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "CodecError"))
    assert.equal(1, n)
    local seen = {}
    ok = pcall(corral.retry, function() error("x") end, { delay = 0.001, max_retries = 5,
      retry_on = function(err, attempt, elapsed)
        seen[#seen + 1] = { err.kind, attempt, elapsed >= 0 }
        return attempt < 2
      end })
    assert.is_false(ok)
    assert.same({ { "TaskError", 1, true }, { "TaskError", 2, true } }, seen)
  end)

  it("retry_until rejects results and retries; the rejected results are kept", function()
    local n = 0
    local v = corral.retry(function()
      n = n + 1
      return n
    end, { delay = 0.001, retry_until = function(x) return x >= 3 end })
    assert.equal(3, v)
    local ok, e = pcall(corral.retry, function() return "bad" end,
      { delay = 0.001, max_retries = 1, retry_until = function() return false end })
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "RetryError"))
    assert.same({ rejected = { "bad" } }, e.attempts[2])
  end)

  it("deadline: no wait runs past it", function()
    local t0 = corral.now()
    local ok, e = pcall(corral.retry, function() error("x") end,
      { delay = 0.05, backoff = "fixed", jitter = false, max_retries = 100, deadline = 0.12 })
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "RetryError"))
    assert.is_true(corral.now() - t0 < 0.5)
    assert.is_true(#e.attempts >= 2 and #e.attempts <= 3)
  end)

  it("a cancel is never retried, and spawn(retry) gives a future", function()
    local n = 0
    local f = corral.spawn(corral.retry, function()
      n = n + 1
      corral.sleep(10)
    end, { delay = 0.001 })
    corral.spawn(function() end):result()
    assert.is_true(f:cancel())
    assert.equal("CancelledError", kind_of(function() f:result() end))
    assert.equal(1, n)
    assert.equal("UsageError", kind_of(function() corral.retry(print, { backoff = "x" }) end))
    assert.equal("UsageError", kind_of(function() corral.retry(print, { bogus = 1 }) end))
  end)
end)

describe("debounce, throttle, once, group", function()
  it("debounce calls fn once with the last arguments after the quiet time", function()
    local got = corral.channel(10)
    local d = corral.debounce(0.03, function(x) got:put(x) end)
    for i = 1, 5 do
      d(i)
      corral.sleep(0.005)
    end
    assert.equal(5, got:get(5))
    corral.sleep(0.05)
    assert.equal(0, #got)
    d("x")
    assert.is_true(d.flush())
    assert.equal("x", got:get(5))
    d("y")
    assert.is_true(d.cancel())
    corral.sleep(0.05)
    assert.equal(0, #got)
  end)

  it("throttle calls at once, then at most once per window with the last arguments", function()
    local got = corral.channel(100)
    local t = corral.throttle(0.05, function(x) got:put(x) end)
    for i = 1, 10 do t(i) end
    assert.equal(1, got:get(5)) -- the first, at once
    assert.equal(10, got:get(5)) -- the last of the window, at its end
    corral.sleep(0.08)
    assert.equal(0, #got)
  end)

  it("once runs fn once; later and concurrent callers get its results or its error", function()
    local n = 0
    local f = corral.once(function(x)
      n = n + 1
      corral.sleep(0.01)
      return x * 2
    end)
    local a = corral.spawn(f, 21)
    local b = corral.spawn(f, 5)
    assert.equal(42, a:result())
    assert.equal(42, b:result())
    assert.equal(42, f(7))
    assert.equal(1, n)
    local g = corral.once(function() error("only once") end)
    assert.is_false(pcall(g))
    local ok, e = pcall(g)
    assert.is_false(ok)
    assert.matches("only once", tostring(e))
  end)

  it("group: spawn, cancel, wait, close", function()
    local g = corral.group()
    local done = {}
    for i = 1, 3 do g:spawn(function() corral.sleep(0.01); done[#done + 1] = i end) end
    assert.is_true(g:wait(5))
    assert.equal(3, #done)
    local long = g:spawn(corral.sleep, 10)
    assert.is_false(g:wait(0.01))
    assert.equal(1, g:cancel())
    assert.is_true(g:close())
    assert.is_true(long:cancelled())
    assert.equal("UsageError", kind_of(function() g:spawn(print) end))
  end)
end)
