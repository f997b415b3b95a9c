local corral = require "corral"
local h = require "helper"

local function after(d, v, fail)
  return corral.spawn(function()
    corral.sleep(d)
    if fail then error(fail, 0) end
    return v
  end)
end

describe("wait", function()
  it("returns done and not_done arrays in input order", function()
    local fs = { after(0.03, 1), after(0, 2), after(0.01, 3) }
    local done, not_done = corral.wait(fs)
    assert.are.same({ fs[1], fs[2], fs[3] }, done)
    assert.are.same({}, not_done)
  end)

  it("keeps the keys of a named table", function()
    local fs = { a = after(0, 1), b = after(10, 2) }
    local done, not_done = corral.wait(fs, { return_when = "FIRST_COMPLETED" })
    assert.are.equal(fs.a, done.a)
    assert.are.equal(fs.b, not_done.b)
    assert.is_nil(done.b)
    fs.b:cancel()
  end)

  it("takes futures as varargs, with options last", function()
    local a, b = after(0, 1), after(10, 2)
    local done, not_done = corral.wait(a, b, { timeout = 0.02 })
    assert.are.same({ a }, done)
    assert.are.same({ b }, not_done)
    b:cancel()
  end)

  it("returns what it has when the timeout passes", function()
    local slow = after(10, 1)
    local t0 = corral.now()
    local done, not_done = corral.wait({ slow }, { timeout = 0.03 })
    assert.is_true(corral.now() - t0 >= 0.025)
    assert.are.same({}, done)
    assert.are.same({ slow }, not_done)
    done, not_done = corral.wait({ slow }, { timeout = 0 })
    assert.are.same({}, done)
    assert.are.same({ slow }, not_done)
    slow:cancel()
  end)

  it("FIRST_COMPLETED returns on the first completion", function()
    local slow = after(10, 1)
    local fast = after(0.01, 2)
    local t0 = corral.now()
    local done = corral.wait({ slow, fast }, { return_when = corral.ReturnWhen.FIRST_COMPLETED })
    assert.are.same({ fast }, done)
    assert.is_true(corral.now() - t0 < 5)
    slow:cancel()
  end)

  it("FIRST_EXCEPTION returns on the first failure, or when all are done", function()
    local slow = after(10, 1)
    local bad = after(0.01, nil, "bad")
    local done, not_done = corral.wait({ slow, bad }, { return_when = "FIRST_EXCEPTION" })
    assert.are.same({ bad }, done)
    assert.are.same({ slow }, not_done)
    slow:cancel()
    bad:exception()
    local ok1, ok2 = after(0, 1), after(0.01, 2)
    done = corral.wait({ ok1, ok2 }, { return_when = "FIRST_EXCEPTION" })
    assert.are.equal(2, #done)
  end)

  it("returns at once for empty input and for futures already done", function()
    local done, not_done = corral.wait({})
    assert.are.same({}, done)
    assert.are.same({}, not_done)
    local f = corral.future()
    f:set_result(1)
    done = corral.wait({ f }, { return_when = "FIRST_COMPLETED" })
    assert.are.same({ f }, done)
  end)

  it("suspends only the waiting task", function()
    local ticks = 0
    local ticker = corral.spawn(function()
      for _ = 1, 3 do corral.sleep(0.005); ticks = ticks + 1 end
    end)
    local w = corral.spawn(function() return corral.wait({ ticker }) end)
    local done = w:result()
    assert.are.equal(1, #done)
    assert.are.equal(3, ticks)
  end)
end)

describe("gather", function()
  it("gives results in input order, whatever the completion order", function()
    local r = corral.gather({ after(0.03, "a"), after(0, "b"), after(0.01, "c") })
    assert.are.same({ "a", "b", "c" }, r)
  end)

  it("gives a named table for a named table", function()
    local r = corral.gather({ x = after(0.01, 1), y = after(0, 2) })
    assert.are.same({ x = 1, y = 2 }, r)
  end)

  it("takes futures as varargs and non-futures as finished results", function()
    assert.are.same({ 1, "two", 3 }, corral.gather(after(0, 1), "two", after(0, 3)))
    assert.are.same({ 1, 2 }, corral.gather({ 1, 2 }))
    assert.are.same({}, corral.gather({}))
  end)

  it("raises the first failure", function()
    local slow_bad = after(0.05, nil, "second")
    local ok, e = pcall(corral.gather, { after(0, 1), after(0.01, nil, "first"), slow_bad })
    assert.is_false(ok)
    assert.are.equal("first", e.value)
    assert.are.equal("second", slow_bad:exception().value)
  end)

  it("puts errors in the results with return_exceptions", function()
    local c = corral.future()
    c:cancel()
    local r = corral.gather({ after(0, 1), after(0, nil, "bad"), c }, { return_exceptions = true })
    assert.are.equal(1, r[1])
    assert.is_true(corral.is_error(r[2], "TaskError"))
    assert.are.equal("bad", r[2].value)
    assert.is_true(corral.is_error(r[3], "CancelledError"))
  end)

  it("raises CancelledError for a cancelled input", function()
    local c = corral.future()
    c:cancel()
    local ok, e = pcall(corral.gather, { c })
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "CancelledError"))
  end)

  it("raises a TimeoutError naming the keys still pending", function()
    local fs = { hare = after(0, 1), tortoise = after(10, 2), snail = after(20, 3) }
    local ok, e = pcall(corral.gather, fs, { timeout = 0.02 })
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "TimeoutError"))
    assert.matches("still pending: snail, tortoise$", e.message)
    assert.not_matches("hare", e.message)
    fs.tortoise:cancel()
    fs.snail:cancel()
    ok, e = pcall(corral.gather, { corral.future() }, { timeout = 0 })
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "TimeoutError"))
  end)

  it("iterates in completion order with iter=true and as_completed", function()
    local fs = { after(0.04, "a"), after(0, "b"), after(0.02, "c") }
    local keys, vals = {}, {}
    for k, v in corral.gather(fs, { iter = true }) do
      keys[#keys + 1] = k
      vals[#vals + 1] = v
    end
    assert.are.same({ 2, 3, 1 }, keys)
    assert.are.same({ "b", "c", "a" }, vals)
    local named = {}
    for k, v in corral.as_completed({ p = after(0.02, 1), q = after(0, 2) }) do
      named[#named + 1] = k .. "=" .. v
    end
    assert.are.same({ "q=2", "p=1" }, named)
    local n = 0
    for _ in corral.as_completed({}) do n = n + 1 end
    assert.are.equal(0, n)
  end)

  it("iterator raises a failure unless return_exceptions", function()
    local it = corral.as_completed({ after(0, nil, "bad") })
    local ok, e = pcall(it)
    assert.is_false(ok)
    assert.are.equal("bad", e.value)
    for _, v in corral.as_completed({ after(0, nil, "bad2") }, { return_exceptions = true }) do
      assert.is_true(corral.is_error(v, "TaskError"))
      assert.are.equal("bad2", v.value)
    end
  end)

  it("iterator times out naming what is pending", function()
    local slow = after(10, 1)
    local it = corral.as_completed({ a = after(0, 1), b = slow }, { timeout = 0.02 })
    assert.are.equal("a", (it()))
    local ok, e = pcall(it)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "TimeoutError"))
    assert.matches("b", e.message)
    slow:cancel()
  end)

  it("calls a progress function with done, total and elapsed", function()
    local calls = {}
    corral.gather({ after(0, 1), after(0.01, 2), 3 }, {
      progress = function(done, total, elapsed)
        calls[#calls + 1] = { done, total }
        assert(elapsed >= 0)
      end,
    })
    assert.are.same({ 1, 3 }, calls[1])
    assert.are.same({ 3, 3 }, calls[#calls])
  end)

  it("prints plain progress lines when stderr is not a terminal", function()
    local text = h.capture_stderr(corral.gather, { after(0, 1), after(0, nil, "x") },
      { progress = { desc = "fetching" }, return_exceptions = true })
    assert.matches("fetching", text)
    assert.matches("2/2", text)
    assert.matches("1 failed", text)
  end)

  it("does O(N) work: 100,000 futures settled in random order", function()
    local fs, N = {}, 100000
    for i = 1, N do fs[i] = corral.future() end
    local setter = corral.spawn(function()
      local order = {}
      for i = 1, N do order[i] = i end
      for i = N, 2, -1 do
        local j = math.random(i)
        order[i], order[j] = order[j], order[i]
      end
      for i = 1, N do fs[order[i]]:set_result(order[i]) end
    end)
    local t0 = os.clock()
    local r = corral.gather(fs)
    local cpu = os.clock() - t0
    setter:result()
    assert.are.equal(N, #r)
    for i = 1, N, 997 do assert.are.equal(i, r[i]) end
    assert.is_true(cpu < 5, "gather took " .. cpu .. " s of CPU")
  end)
end)

describe("waiting", function()
  it("uses no CPU: a 0.3 s wait on 10,000 pending futures", function()
    local fs = {}
    for i = 1, 10000 do fs[i] = corral.future() end
    local t0, w0 = os.clock(), corral.now()
    local _, not_done = corral.wait(fs, { timeout = 0.3 })
    local cpu, wall = os.clock() - t0, corral.now() - w0
    assert.are.equal(10000, #not_done)
    assert.is_true(wall >= 0.25)
    assert.is_true(cpu < 0.1, ("%.3f s of CPU in a %.3f s wait"):format(cpu, wall))
  end)

  it("draws a bar with rate and time left on a terminal", function()
    local progress = require "corral.progress"
    local out = {}
    local sink = { flush = function() end }
    function sink:write(...)
      for _, s in ipairs({ ... }) do out[#out + 1] = s end
      return self
    end
    local p = progress.new({ desc = "work" }, 4, sink)
    p.tty, p.every = true, 0
    p:tick(false)
    p:tick(true)
    local text = table.concat(out)
    assert.matches("\r", text, 1, true)
    assert.matches("work  %[############%.+%]  2/4  %(1 failed%)", text)
    assert.matches("left", text)
    p:tick(false)
    p:tick(false)
    p:finish()
    assert.matches("4/4.*in ", table.concat(out))
  end)
end)
