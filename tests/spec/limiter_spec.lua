-- Rate and concurrency limits (lua/corral/limiter.lua).
local corral = require "corral"

-- the times (from t0) at which n tasks got through lim
local function passes(lim, n)
  local t0 = corral.now()
  local fs = {}
  for i = 1, n do
    fs[i] = corral.spawn(function()
      assert(lim:acquire())
      return corral.now() - t0
    end)
  end
  return corral.gather(fs)
end

describe("corral.limiter", function()
  for _, alg in ipairs({ "token_bucket", "gcra", "leaky_bucket" }) do
    it(alg .. ": units pass at the rate, a burst at once, FIFO", function()
      local lim = corral.limiter { rate = 40, per = 1, burst = 5, algorithm = alg }
      local t = passes(lim, 25)
      -- 5 at once, then one every 25 ms: the 25th after ~0.5 s
      assert.is_true(t[5] < 0.02, "the burst waited")
      assert.is_true(t[25] >= 0.45 and t[25] < 3, ("25 in %.3f s"):format(t[25]))
      for i = 2, 25 do assert.is_true(t[i] >= t[i - 1], "not FIFO at " .. i) end
    end)
  end

  it("sliding_window: at most `rate` units in any `per` seconds", function()
    local lim = corral.limiter { rate = 10, per = 0.2, algorithm = "sliding_window" }
    local t = passes(lim, 25)
    table.sort(t)
    for i = 11, 25 do
      assert.is_true(t[i] - t[i - 10] >= 0.19, ("11 units within %.3f s"):format(t[i] - t[i - 10]))
    end
    assert.is_true(t[25] < 3)
  end)

  it("fixed_window: at most `rate` units in each window", function()
    local lim = corral.limiter { rate = 10, per = 0.2, algorithm = "fixed_window" }
    local t0 = corral.now()
    local t = passes(lim, 25)
    local per_window = {}
    for i = 1, 25 do
      local w = math.floor((t0 + t[i]) / 0.2)
      per_window[w] = (per_window[w] or 0) + 1
    end
    for _, c in pairs(per_window) do assert.is_true(c <= 10) end
  end)

  it("200 calls through a limit of 50 per second, across 4 thread workers, take about 4 s", function()
    local W = corral.worker { call = function(_, lim, n)
      for _ = 1, n do lim:acquire() end
      return true
    end }
    local pool = W:options { workers = 4 }:init()
    local lim = corral.limiter { rate = 50, per = 1, burst = 1 }
    local t0 = corral.now()
    local fs = {}
    for i = 1, 4 do fs[i] = pool:call(lim, 50) end
    corral.gather(fs)
    local took = corral.now() - t0
    assert.is_true(took >= 3.8 and took < 8, ("200 calls took %.2f s"):format(took))
    pool:stop()
  end)

  it("one limit across process workers and the script", function()
    local W = corral.worker { call = function(_, lim, n)
      for _ = 1, n do lim:acquire() end
      return true
    end }
    local pool = W:options { workers = 2, mode = "process" }:init()
    local lim = corral.limiter { rate = 50, per = 1, burst = 1 }
    local t0 = corral.now()
    corral.gather { pool:call(lim, 20), pool:call(lim, 20) }
    for _ = 1, 10 do lim:acquire() end
    local took = corral.now() - t0
    assert.is_true(took >= 0.9 and took < 6, ("50 units took %.2f s"):format(took))
    local c = corral.limiter { concurrency = 1 }
    assert.is_true(pool:call(c, 1):result(10)) -- the child holds the one unit
    assert.is_false(c:try_acquire())
    c:release()
    assert.is_true(c:try_acquire())
    pool:stop()
  end)

  it("acquire returns false at the timeout; try_acquire never waits", function()
    local lim = corral.limiter { rate = 1, per = 10, burst = 1 }
    assert.is_true(lim:try_acquire())
    assert.is_false(lim:try_acquire())
    local t0 = corral.now()
    assert.is_false(lim:acquire(1, 0.05))
    assert.is_true(corral.now() - t0 < 1)
    local ok, e = pcall(lim.acquire, lim, 2)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "UsageError"))
  end)

  it("concurrency: n at once; with releases on error too", function()
    local lim = corral.limiter { concurrency = 2 }
    local inside, most = 0, 0
    local fs = {}
    for i = 1, 6 do
      fs[i] = corral.spawn(function()
        return lim:with(1, function()
          inside = inside + 1
          most = math.max(most, inside)
          corral.sleep(0.005)
          inside = inside - 1
          return i
        end)
      end)
    end
    corral.gather(fs)
    assert.equal(2, most)
    assert.is_false(pcall(lim.with, lim, 1, function() error("x") end))
    assert.is_true(lim:try_acquire())
    assert.is_true(lim:try_acquire())
    assert.is_false(lim:try_acquire())
  end)

  it("checks its options", function()
    for _, o in ipairs({ {}, { rate = 0 }, { rate = 1, algorithm = "x" }, { concurrency = 0 },
      { rate = 1, bogus = 1 }, { concurrency = 1, rate = 1 } }) do
      local ok, e = pcall(corral.limiter, o)
      assert.is_false(ok)
      assert.is_true(corral.is_error(e, "UsageError"))
    end
  end)
end)
