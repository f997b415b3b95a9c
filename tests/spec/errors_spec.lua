local corral = require "corral"

describe("errors", function()
  it("have kind, message, traceback, cause and print themselves", function()
    local cause = corral.error("TimeoutError", "slow")
    local e = corral.error("DependencyError", "upstream failed", cause)
    assert.are.equal("DependencyError", e.kind)
    assert.are.equal("upstream failed", e.message)
    assert.are.equal(cause, e.cause)
    assert.matches("stack traceback", e.traceback)
    assert.matches("DependencyError: upstream failed", tostring(e))
    assert.matches("caused by: TimeoutError: slow", tostring(e))
  end)

  it("are told apart by is_error", function()
    local e = corral.error("TimeoutError", "x")
    assert.is_true(corral.is_error(e))
    assert.is_true(corral.is_error(e, "TimeoutError"))
    assert.is_false(corral.is_error(e, "UsageError"))
    assert.is_false(corral.is_error("TimeoutError"))
    assert.is_false(corral.is_error({ kind = "TimeoutError" }))
  end)

  it("name the argument and what was expected for bad arguments", function()
    local cases = {
      { corral.spawn, { 42 }, "corral.spawn: argument 'fn' must be a function %(got number 42%)" },
      { corral.sleep, { "1" }, "corral.sleep: argument 'seconds'" },
      { corral.sleep, { -1 }, "corral.sleep: argument 'seconds'" },
      { corral.gather, { 5 }, "corral.gather: argument 'fs'" },
      { corral.wait, { {}, 5 }, "corral.wait: argument 'opts'" },
      { corral.wait, { { 1 } }, "corral.wait: argument 'fs%[1%]' must be a future" },
      { corral.wait, { {}, { return_when = "SOMETIME" } }, "argument 'return_when'" },
      { corral.gather, { {}, { timeout = -2 } }, "argument 'timeout'" },
      { corral.error, { 1 }, "corral.error: argument 'kind'" },
      { corral.exit, { "now" }, "corral.exit: argument 'code'" },
    }
    for _, c in ipairs(cases) do
      local ok, e = pcall(c[1], unpack(c[2]))
      assert.is_false(ok)
      assert.is_true(corral.is_error(e, "UsageError"), tostring(e))
      assert.matches(c[3], e.message)
    end
  end)
end)
