local h = require "helper"

describe("the corral command", function()
  it("runs a script as the main task with arg set as luajit sets it", function()
    local out, err, code = h.corral([[
      local corral = require "corral"
      local t = corral.spawn(function() corral.sleep(0.01); return #arg end)
      print(arg[0]:match("%.lua$") ~= nil, arg[1], arg[2], t:result(), ...)
    ]], "a b")
    assert.are.equal(0, code, err)
    assert.are.equal("true\ta\tb\t2\ta\tb\n", out)
  end)

  it("runs a string with -e and prints versions with -v", function()
    local out, _, code = h.sh(h.quote(h.bin) .. " -e 'print(1 + 1)'")
    assert.are.equal(0, code)
    assert.are.equal("2\n", out)
    out, _, code = h.sh(h.quote(h.bin) .. " -v")
    assert.are.equal(0, code)
    assert.matches("^corral %d+%.%d+%.%d+", out)
    assert.matches("LuaJIT", out)
    assert.matches("libuv 1%.", out)
  end)

  it("-e code script.lua runs the strings, in order, then the script with its arguments", function()
    local path = os.tmpname() .. ".lua"
    local f = assert(io.open(path, "w"))
    f:write("print('script', x, y, ...)\n")
    f:close()
    local out, err, code = h.sh(h.quote(h.bin) .. " -e 'x = 1' -e 'y = x + 1; print(\"e\", y)' "
      .. h.quote(path) .. " a b")
    os.remove(path)
    assert.are.equal(0, code, err)
    assert.are.equal("e\t2\nscript\t1\t2\ta\tb\n", out)
    -- a bad string is reported and nothing runs
    out, err, code = h.sh(h.quote(h.bin) .. " -e 'print(' -e 'print(2)'")
    assert.are.equal(1, code)
    assert.are.equal("", out)
    assert.matches("command line", err, 1, true)
  end)

  it("waits for pending tasks and timers after the main chunk returns", function()
    local out, _, code = h.corral([[
      local corral = require "corral"
      corral.spawn(function() corral.sleep(0.05); print("late task") end)
      print("main done")
    ]])
    assert.are.equal(0, code)
    assert.are.equal("main done\nlate task\n", out)
  end)

  it("prints an uncaught error with its traceback and exits with 1", function()
    local _, err, code = h.corral([[
      local function deep() error("kaboom") end
      deep()
    ]])
    assert.are.equal(1, code)
    assert.matches("kaboom", err)
    assert.matches("stack traceback", err)
    assert.matches("deep", err)
  end)

  it("reports a task error that nobody retrieved", function()
    local _, err, code = h.corral([[
      local corral = require "corral"
      corral.spawn(function() error("nobody looked") end)
      local seen = corral.spawn(function() error("someone looked") end)
      seen:exception()
    ]])
    assert.are.equal(0, code)
    assert.matches("unretrieved error.*nobody looked", err)
    assert.matches("stack traceback", err)
    assert.not_matches("someone looked", err)
  end)

  it("reports an unretrieved error when its future is collected", function()
    local out, err, code = h.corral([[
      local corral = require "corral"
      corral.spawn(function() error("collected early") end)
      corral.sleep(0.01)
      collectgarbage(); collectgarbage()
      io.stderr:write("after gc\n")
    ]])
    assert.are.equal(0, code, out)
    assert.matches("collected early.*after gc", err)
  end)

  it("ends at once with corral.exit(code)", function()
    local out, err, code = h.corral([[
      local corral = require "corral"
      corral.spawn(function() error("still reported") end)
      corral.spawn(function() corral.sleep(30) end)
      corral.sleep(0.01)
      io.write("before")
      corral.exit(3)
      print("not reached")
    ]])
    assert.are.equal(3, code)
    assert.are.equal("before", out)
    assert.matches("still reported", err)
  end)

  it("says so when the main chunk waits on what nothing can settle", function()
    local _, err, code = h.corral([[
      local corral = require "corral"
      corral.future():result()
    ]])
    assert.are.equal(1, code)
    assert.matches("blocked", err)
  end)

  -- Run script with a marker prefix as arg[1]; before the k-th SIGINT, wait
  -- (bounded) until the script has created the file prefix..k.
  local function interrupt(script, signals)
    local ready = h.tmpname()
    local path = h.tmpname() .. ".lua"
    local f = assert(io.open(path, "w"))
    f:write(script)
    f:close()
    local cmd = h.quote(h.bin) .. " " .. path .. " " .. ready .. " & pid=$!; "
    for k = 1, signals do
      cmd = cmd .. "i=0; while [ ! -e " .. ready .. k .. " ] && [ $i -lt 400 ]; " ..
        "do sleep 0.05; i=$((i+1)); done; kill -INT $pid; "
    end
    local out, err, code = h.sh(cmd .. "wait $pid")
    os.remove(path)
    os.remove(ready)
    for k = 1, signals do os.remove(ready .. k) end
    return out, err, code
  end

  it("cancels the main task on Ctrl-C, running its cleanup", function()
    local t0 = os.time()
    local out, err, code = interrupt([[
      local corral = require "corral"
      io.open(arg[1] .. 1, "w"):close()
      local ok, e = pcall(corral.sleep, 60)
      print("cleanup", corral.is_error(e, "CancelledError"))
      error(e, 0)
    ]], 1)
    assert.are.equal(130, code)
    assert.are.equal("cleanup\ttrue\n", out)
    assert.matches("interrupted", err)
    assert.is_true(os.time() - t0 < 30)
  end)

  it("ends the process on a second Ctrl-C", function()
    local t0 = os.time()
    local _, _, code = interrupt([[
      local corral = require "corral"
      local n = 1
      io.open(arg[1] .. n, "w"):close()
      while true do
        pcall(corral.sleep, 60) -- the first Ctrl-C lands here: say so
        n = n + 1
        io.open(arg[1] .. n, "w"):close()
      end
    ]], 2)
    assert.are.equal(130, code)
    assert.is_true(os.time() - t0 < 30)
  end)
end)

describe("the Lua module", function()
  it("loads in stock luajit, where waits drive the loop and run() drains it", function()
    local code = [[
      local corral = require "corral"
      local t = corral.spawn(function(x) corral.sleep(0.01); return x end, "from luajit")
      print(t:result())
      local later = false
      corral.spawn(function() corral.sleep(0.01); later = true end)
      corral.run()
      print(later)
    ]]
    local out, err, status = h.sh(h.luajit() .. " -e " .. h.quote(code))
    assert.are.equal(0, status, err)
    assert.are.equal("from luajit\ntrue\n", out)
  end)
end)

describe("the C API", function()
  it("passes its C tests (futures settled from threads, foreign waits, stepping)", function()
    local out, err, code = h.sh(h.quote(h.build .. "/obj/tests/test_future"))
    assert.are.equal(0, code, out .. err)
    assert.matches("1%.%.%d+", out)
    assert.not_matches("not ok", out)
  end)
end)

describe("workers and the end of the process", function()
  it("a script that never stops its workers still ends, joining them", function()
    local out, err, code = h.corral([[
      local corral = require "corral"
      local W = corral.worker { nap = function(_, d) corral.sleep(d); return "woke" end }
      local w = W:options { workers = 2 }:init()
      print(w:nap(0.01):result())
      w:nap(0.05) -- still running when the main chunk returns
    ]])
    assert.are.equal(0, code, err)
    assert.are.equal("woke\n", out)
  end)

  it("corral.exit ends the process with workers busy", function()
    local _, err, code = h.corral([[
      local corral = require "corral"
      local W = corral.worker { spin = function() while true do corral.sleep(0.001) end end }
      local w = W:init()
      w:spin()
      corral.sleep(0.02)
      corral.exit(7)
    ]])
    assert.are.equal(7, code, err)
  end)
end)
