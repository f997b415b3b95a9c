-- A busted output handler: a dot per test, the failures in full, and a last
-- line "N passed, N failed" that CI reads.
return function(options)
  local busted = require "busted"
  local handler = require "busted.outputHandlers.base"()
  local io_write, io_flush = io.write, io.flush

  handler.testEnd = function(_, _, status)
    io_write(status == "success" and "." or status == "pending" and "p" or "F")
    io_flush()
    return nil, true
  end

  local function show(kind, list)
    for _, t in ipairs(list) do
      io_write("\n", kind, ": ", t.name or "?", "\n")
      if t.trace and t.trace.short_src then
        io_write("  at ", t.trace.short_src, ":", tostring(t.trace.currentline), "\n")
      end
      local msg = t.message
      if type(msg) ~= "string" then msg = require("pl.pretty").write(msg) end
      io_write("  ", (msg or "nil"):gsub("\n", "\n  "), "\n")
      if options.verbose and t.trace and t.trace.traceback then io_write(t.trace.traceback, "\n") end
    end
  end

  handler.suiteEnd = function()
    show("FAILED", handler.failures)
    show("ERROR", handler.errors)
    local failed = #handler.failures + #handler.errors
    io_write("\n", #handler.successes, " passed, ", failed, " failed\n")
    io_flush()
    return nil, true
  end

  busted.subscribe({ "test", "end" }, handler.testEnd, { predicate = handler.cancelOnPending })
  busted.subscribe({ "suite", "end" }, handler.suiteEnd)
  return handler
end
