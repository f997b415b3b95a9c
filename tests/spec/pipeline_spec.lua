-- corral.pipeline: stages joined by bounded channels (lua/corral/pipeline.lua).
local corral = require "corral"
local h = require "helper"

local kind_of = h.kind_of

local function range(n)
  local t = {}
  for i = 1, n do t[i] = i end
  return t
end

describe("corral.pipeline", function()
  it("runs items through its stages, in input order when ordered", function()
    local p = corral.pipeline {
      { function(x) corral.sleep(((x * 7) % 5) * 0.002); return x * 2 end, workers = 4 },
      { function(x) return x + 1 end, workers = 2 },
      ordered = true,
    }
    local r = p:collect(range(40))
    for i = 1, 40 do assert.equal(i * 2 + 1, r[i]) end
    -- a pipeline runs again once a run is over
    assert.same({ 3, 5 }, p:collect({ 1, 2 }))
  end)

  it("gives results as they finish when not ordered", function()
    local p = corral.pipeline {
      { function(x) corral.sleep(x == 1 and 0.2 or 0); return x end, workers = 4 },
    }
    local seen = {}
    for v in p:run(range(8)) do seen[#seen + 1] = v end
    assert.equal(8, #seen)
    assert.equal(1, seen[8]) -- the slow first item came last
    table.sort(seen)
    assert.same(range(8), seen)
  end)

  it("runs stages on thread and process workers", function()
    local p = corral.pipeline {
      { function(x) return x * x end, workers = 2, mode = "thread" },
      { function(x) return tostring(x) .. "!" end, workers = 2, mode = "process" },
      { function(s) return s:upper() end },
      ordered = true,
    }
    assert.same({ "1!", "4!", "9!", "16!" }, p:collect({ 1, 2, 3, 4 }))
  end)

  it("drops items for which a stage returns nil (a filter)", function()
    local p = corral.pipeline {
      { function(x) if x % 2 == 0 then return x end end, workers = 3 },
      { function(x) return x * 10 end },
      ordered = true,
    }
    assert.same({ 20, 40, 60 }, p:collect(range(6)))
  end)

  it("on_error = stop: the first error cancels the rest and is raised", function()
    local started = 0
    local p = corral.pipeline {
      { function(x)
        started = started + 1
        if x == 3 then error("item three") end
        corral.sleep(0.01)
        return x
      end, workers = 2 },
      buffer = 1,
    }
    local _, e = kind_of(function() return p:collect(range(1000)) end)
    assert.matches("item three", tostring(e), 1, true)
    assert.is_true(started < 50, "the pipeline went on after its error: " .. started)
    -- an error of the input iterator stops it too
    local p2 = corral.pipeline { { function(x) return x end } }
    local n = 0
    local _, e2 = kind_of(function()
      return p2:collect(function()
        n = n + 1
        if n == 5 then error("input broke") end
        return n
      end)
    end)
    assert.matches("input broke", tostring(e2), 1, true)
  end)

  it("on_error = skip drops failed items; collect keeps them in input order", function()
    local function f(x)
      if x % 4 == 0 then error("no " .. x) end
      return x
    end
    local skip = corral.pipeline { { f, workers = 3 }, on_error = "skip", ordered = true }
    assert.same({ 1, 2, 3, 5, 6, 7, 9, 10 }, skip:collect(range(10)))
    assert.same({}, skip:errors())
    local col = corral.pipeline { { f, workers = 3 }, { function(x) return -x end },
      on_error = "collect" }
    local res, errs = col:collect(range(10))
    assert.equal(8, #res)
    assert.equal(2, #errs)
    assert.equal(4, errs[1].index)
    assert.equal(4, errs[1].item)
    assert.equal(1, errs[1].stage)
    assert.matches("no 4", tostring(errs[1].error), 1, true)
    assert.equal(8, errs[2].index)
    -- errors of a worker stage are its call's errors
    local w = corral.pipeline { { function(x) if x == 2 then error("in thread") end; return x end,
      mode = "thread" }, on_error = "collect" }
    local _, werrs = w:collect({ 1, 2, 3 })
    assert.equal(1, #werrs)
    assert.equal("WorkerError", werrs[1].error.kind)
  end)

  it("takes an endless iterator: a slow consumer bounds what is in flight", function()
    local produced, consumed = 0, 0
    local p = corral.pipeline {
      { function(x) return x + 1 end, workers = 2 },
      { function(x) return x * 2 end, workers = 3 },
      buffer = 4,
    }
    local bound = (2 + 1) * 4 + 2 + 3
    local worst = 0
    for _ in p:run(function() produced = produced + 1; return produced end) do
      consumed = consumed + 1
      corral.sleep(0.001) -- (a slow consumer)
      if produced - consumed > worst then worst = produced - consumed end
      if consumed == 200 then break end
    end
    assert.is_true(p:cancel())
    assert.is_true(worst <= bound + 1, "in flight " .. worst .. " > " .. bound)
    assert.is_false(p:cancel()) -- nothing left to cancel
  end)

  it("a slow stage slows the producer (backpressure)", function()
    local produced, done = 0, 0
    local p = corral.pipeline {
      { function(x) return x end, workers = 4 },
      { function(x) corral.sleep(0.005); done = done + 1; return x end },
      buffer = 2,
    }
    local n = 0
    for _ in p:run(function()
      produced = produced + 1
      assert.is_true(produced - done <= 3 * 2 + 5 + 1, "the producer ran ahead")
      if produced <= 60 then return produced end
    end) do n = n + 1 end
    assert.equal(60, n)
  end)

  it("reports progress as gather does", function()
    local calls = {}
    local p = corral.pipeline { { function(x) return x end }, progress = function(done, total)
      calls[#calls + 1] = { done, total }
    end }
    p:collect(range(5))
    assert.same({ 5, 5 }, calls[#calls])
  end)

  it("checks its spec and refuses a second run at once", function()
    assert.equal("UsageError", kind_of(function() corral.pipeline {} end))
    assert.equal("UsageError", kind_of(function() corral.pipeline { 5 } end))
    assert.equal("UsageError", kind_of(function() corral.pipeline { { print, mode = "cloud" } } end))
    assert.equal("UsageError", kind_of(function() corral.pipeline { { print, workers = 0 } } end))
    assert.equal("UsageError", kind_of(function() corral.pipeline { { print, wrkers = 2 } } end))
    assert.equal("UsageError", kind_of(function() corral.pipeline { print, bufer = 2 } end))
    assert.equal("UsageError", kind_of(function() corral.pipeline { print, on_error = "ignore" } end))
    local p = corral.pipeline { function(x) return x end }
    assert.equal("UsageError", kind_of(function() p:run(5) end))
    local it = p:run(range(3))
    assert.equal("UsageError", kind_of(function() p:run(range(3)) end))
    local n = 0
    for _ in it do n = n + 1 end
    assert.equal(3, n)
  end)
end)
