-- The worker options retry and limits (lua/corral/worker_policy.lua).
local corral = require "corral"
local h = require "helper"

local kind_of = h.kind_of

-- Fails its first `n` calls of each method, per instance.
local Flaky = corral.worker {
  init = function(self, n) self.n, self.seen = n, {} end,
  fetch = function(self, x)
    self.seen.fetch = (self.seen.fetch or 0) + 1
    if self.seen.fetch <= self.n then error("flaky fetch " .. self.seen.fetch) end
    return x * 2, self.seen.fetch
  end,
  store = function(self)
    self.seen.store = (self.seen.store or 0) + 1
    if self.seen.store <= self.n then error("flaky store") end
    return "stored"
  end,
}

describe("worker option retry", function()
  it("retries a failed call with the given schedule and returns its results", function()
    for _, mode in ipairs({ "thread", "async", "process" }) do
      local w = Flaky:options { mode = mode, retry = { max_retries = 3, delay = 0.01 } }:init(2)
      local v, attempts = w:fetch(21):result(10)
      assert.equal(42, v)
      assert.equal(3, attempts)
      w:stop()
    end
  end)

  it("takes settings per method, '*' for the rest", function()
    local w = Flaky:options { retry = { fetch = { max_retries = 2, delay = 0 },
      ["*"] = { max_retries = 0, delay = 0 } } }:init(1)
    assert.equal(2, select(2, w:fetch(1):result(10)))
    local k, e = kind_of(function() return w:store():result(10) end)
    assert.equal("RetryError", k)
    assert.equal(1, #e.attempts)
    w:stop()
  end)

  it("raises RetryError listing each attempt when they run out", function()
    local w = Flaky:options { retry = { max_retries = 2, delay = 0.001 } }:init(10)
    local k, e = kind_of(function() return w:fetch(1):result(10) end)
    assert.equal("RetryError", k)
    assert.equal(3, #e.attempts)
    for i = 1, 3 do
      assert.is_true(corral.is_error(e.attempts[i], "WorkerError"))
      assert.matches("flaky fetch " .. i, tostring(e.attempts[i]), 1, true)
    end
    w:stop()
  end)

  it("retries only the kinds of retry_on", function()
    local w = Flaky:options { retry = { max_retries = 5, delay = 0, retry_on = { "TimeoutError" } } }
      :init(1)
    local k = kind_of(function() return w:fetch(1):result(10) end)
    assert.equal("WorkerError", k)
    w:stop()
  end)

  it("cancelling the call's future cancels the attempt on the worker", function()
    local W = corral.worker {
      wait = function(_, started, got)
        started:put(true)
        local ok, e = pcall(corral.sleep, 30)
        got:put(ok and "slept" or e.kind)
      end,
    }
    local w = W:options { retry = { max_retries = 3, delay = 0 } }:init()
    local started, got = corral.channel(1), corral.channel(1)
    local f = w:wait(started, got)
    started:get(10)
    assert.is_true(f:cancel())
    assert.equal("CancelledError", got:get(10))
    assert.equal("CancelledError", kind_of(function() return f:result() end))
    w:stop()
  end)

  it("checks its settings when the class is configured", function()
    assert.equal("UsageError", kind_of(function() Flaky:options { retry = { max_retries = -1 } } end))
    assert.equal("UsageError", kind_of(function() Flaky:options { retry = 3 } end))
    assert.equal("UsageError", kind_of(function() Flaky:options { retry = { fetch = { dely = 1 } } } end))
    assert.equal("UsageError", kind_of(function() corral.config { retry = { max_retries = 1 } } end))
  end)
end)

describe("worker option limits", function()
  local Slow = corral.worker {
    work = function(_, s)
      local c = require "corral"
      local t0 = c.now()
      c.sleep(s)
      return t0, c.now()
    end,
  }

  it("a concurrency limit bounds the calls running at once across a pool", function()
    local lim = corral.limiter { concurrency = 2 }
    local w = Slow:options { workers = 4, limits = lim }:init()
    local fs = {}
    for i = 1, 8 do fs[i] = w:work(0.05) end
    local spans = {}
    for i = 1, 8 do spans[i] = { fs[i]:result(10) } end
    local worst = 0
    for i = 1, 8 do
      local at, n = spans[i][1], 0
      for j = 1, 8 do
        if spans[j][1] <= at and at < spans[j][2] then n = n + 1 end
      end
      if n > worst then worst = n end
    end
    assert.is_true(worst <= 2, "calls at once: " .. worst)
    assert.is_true(worst >= 1)
    w:stop()
  end)

  it("a rate limit spaces the calls (per method, '*' for the rest)", function()
    local rate = corral.limiter { rate = 20, per = 1, burst = 1 }
    local w = Slow:options { workers = 2, limits = { work = { rate } } }:init()
    local t0 = corral.now()
    local fs = {}
    for i = 1, 10 do fs[i] = w:work(0) end
    corral.gather(fs)
    local took = corral.now() - t0
    assert.is_true(took >= 0.4, "10 calls at 20/s took " .. took)
    assert.is_true(took < 5)
    w:stop()
  end)

  it("checks its settings", function()
    assert.equal("UsageError", kind_of(function() Slow:options { limits = 5 } end))
    assert.equal("UsageError", kind_of(function() Slow:options { limits = { 5 } } end))
    assert.equal("UsageError", kind_of(function() Slow:options { limits = { work = "x" } } end))
  end)
end)
