-- Review 14: corral.exec, corral.fs, corral.pipeline, worker retry/limits.
-- Each `it` states the correct behaviour; they fail on the code as reviewed.
local corral = require "corral"
local h = require "helper"

local function slurp(p)
  local f = io.open(p, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

-- A pid written by a command to `path`, once it is there.
local function pid_in(path)
  h.wait_until(function() local s = slurp(path); return s and tonumber(s) ~= nil end, 10)
  return tonumber(slurp(path))
end

describe("review14: corral.exec", function()
  -- A child that leaves the group (setsid) but keeps the output pipes open:
  -- the guide says such children "are not followed", but the command's own
  -- timeout must still bound the wait for its future.
  it("a timeout settles the future in time even when a setsid child holds the output open", function()
    local pidfile = h.tmpname()
    local t0 = corral.now()
    local f = corral.exec({ "sh", "-c",
      "setsid sh -c 'echo $$ > " .. pidfile .. "; exec sleep 6' & echo started" },
      { timeout = 0.3, kill_grace = 0.2 })
    local ok, e = pcall(f.result, f)
    local took = corral.now() - t0
    local pid = pid_in(pidfile)
    os.execute("kill -9 " .. pid .. " 2>/dev/null")
    os.remove(pidfile)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "TimeoutError"))
    assert.is_true(took < 2.5, ("the future settled only after %.1f s (timeout 0.3 s)"):format(took))
  end)

  it("a cancel settles the future in time even when a setsid child holds the output open", function()
    local pidfile = h.tmpname()
    local f = corral.exec({ "sh", "-c",
      "setsid sh -c 'echo $$ > " .. pidfile .. "; exec sleep 6' & echo started; sleep 30" },
      { kill_grace = 0.2 })
    local pid = pid_in(pidfile)
    local t0 = corral.now()
    f:cancel()
    local ok, e = pcall(f.result, f)
    local took = corral.now() - t0
    os.execute("kill -9 " .. pid .. " 2>/dev/null")
    os.remove(pidfile)
    assert.is_false(ok)
    assert.is_true(corral.is_error(e, "CancelledError"))
    assert.is_true(took < 2.5, ("the cancel took %.1f s"):format(took))
  end)

  -- The deadline is only looked at between on_line calls: an on_line that
  -- waits keeps the command running past its timeout.
  it("a timeout ends the command on time while on_line waits", function()
    local pidfile = h.tmpname()
    local t0 = corral.now()
    local f = corral.exec({ "sh", "-c", "echo $$ > " .. pidfile .. "; echo a; exec sleep 10" },
      { timeout = 0.3, kill_grace = 0.1, on_line = function() corral.sleep(3) end })
    local pid = pid_in(pidfile)
    -- the command must be gone shortly after its timeout, whatever on_line does
    local gone_at
    local ok = pcall(h.wait_until, function()
      if not require("corral.exec").group_alive(pid) then gone_at = corral.now() - t0 end
      return gone_at ~= nil
    end, 5)
    pcall(f.result, f)
    os.remove(pidfile)
    assert.is_true(ok)
    assert.is_true(gone_at < 1.5,
      ("the command was ended %.1f s after its start (timeout 0.3 s)"):format(gone_at))
  end)

  it("rejects a cwd with a NUL byte (as it does argv and env) instead of cutting it", function()
    local kind = h.kind_of(function()
      return corral.exec({ "pwd" }, { cwd = "/tmp\0/nonexistent" }):result()
    end)
    assert.equal("UsageError", kind)
  end)
end)

describe("review14: corral.fs", function()
  it("mkdir{parents=true} on an existing regular file raises OSError", function()
    local p = h.tmpname() -- (a regular file, made by os.tmpname)
    local ok, e = pcall(corral.fs.mkdir, p, { parents = true })
    os.remove(p)
    assert.is_false(ok, "mkdir -p on a regular file returned true")
    assert.is_true(corral.is_error(e, "OSError"))
  end)

  it("mkdir with a mode that is not a number raises UsageError (as write does)", function()
    local p = h.tmpname()
    os.remove(p)
    local kind = h.kind_of(function() return corral.fs.mkdir(p, { mode = "rwx" }) end)
    os.remove(p)
    assert.equal("UsageError", kind)
  end)

  -- Cancelled operations blocked by the OS (a FIFO without a writer) keep
  -- libuv's thread pool (4 threads) busy: every later fs operation in the
  -- process hangs. Run in a child process (it would poison this one).
  it("a few cancelled reads of FIFOs do not stop every other fs operation", function()
    local fifo = h.tmpname()
    os.remove(fifo)
    os.execute("mkfifo " .. fifo)
    local out = h.run([[
      local corral = require "corral"
      local fifo = ]] .. ("%q"):format(fifo) .. [[
      local fs = {}
      for i = 1, 4 do fs[i] = corral.spawn(corral.fs.read, fifo) end
      local fifo_opens, t0 = (loadstring(]] .. ("%q"):format(h.fifo_opens_src) .. [[))(), corral.now()
      while fifo_opens(fifo) < 4 and corral.now() - t0 < 10 do corral.sleep(0.005) end
      print("reads open: " .. fifo_opens(fifo))
      for i = 1, 4 do fs[i]:cancel() end
      local f = corral.spawn(corral.fs.stat, "/")
      local ok, r = pcall(f.result, f, 3)
      print(ok and "stat ok" or ("stat failed: " .. tostring(r)))
      io.stdout:flush()
      -- unblock the opens so that the script can end
      for i = 1, 4 do local w = io.open(fifo, "w"); w:close() end
    ]], 30)
    os.remove(fifo)
    assert.matches("reads open: 4", out, 1, true)
    assert.matches("stat ok", out)
  end)

  -- The guide: a task cancelled while it waits on corral.fs gets
  -- CancelledError at once. w:stop{drain = false} of a worker whose method
  -- waits on a FIFO's open blocks the caller until the open completes.
  it("stop{drain=false} of a worker waiting on fs.read of a FIFO does not block the caller", function()
    local fifo = h.tmpname()
    os.remove(fifo)
    os.execute("mkfifo " .. fifo)
    local out = h.run([[
      local corral = require "corral"
      local fifo = ]] .. ("%q"):format(fifo) .. [[
      local W = corral.worker { rd = function(self, p) return corral.fs.read(p) end }
      local w = W:init()
      local f = w:rd(fifo)
      local fifo_opens, t0 = (loadstring(]] .. ("%q"):format(h.fifo_opens_src) .. [[))(), corral.now()
      while fifo_opens(fifo) < 1 and corral.now() - t0 < 10 do corral.sleep(0.005) end
      print("reads open: " .. fifo_opens(fifo))
      -- a writer, 4 s from now, so that the script ends either way
      local writer = corral.exec({ "sh", "-c", "sleep 4; echo hi > " .. fifo }, { capture = false })
      local t0 = corral.now()
      w:stop{ drain = false }
      print(("stop took %.2f"):format(corral.now() - t0))
      io.stdout:flush()
      -- (no reader is left: the writer would wait for one for good)
      writer:cancel()
      pcall(writer.result, writer)
    ]], 30)
    os.remove(fifo)
    assert.matches("reads open: 1", out, 1, true)
    local took = tonumber(out:match("stop took ([%d.]+)"))
    assert.is_not_nil(took, out)
    assert.is_true(took < 1.5, ("w:stop{drain=false} blocked %.2f s"):format(took))
  end)
end)

describe("review14: the notes without a spec", function()
  it("a pipeline's async stage fails with an error object (TaskError), as a worker stage does", function()
    local p = corral.pipeline { { function(x) if x == 2 then error("two") end; return x end },
      on_error = "collect" }
    local _, errs = p:collect({ 1, 2, 3 })
    assert.equal(1, #errs)
    assert.is_true(corral.is_error(errs[1].error, "TaskError"))
    local stop = corral.pipeline { { function() error("always") end } }
    local kind = h.kind_of(function() return stop:collect({ 1 }) end)
    assert.equal("TaskError", kind)
  end)

  it("p:cancel() draws the progress line a last time", function()
    local p = corral.pipeline { { function(x) corral.sleep(0.01); return x end },
      progress = { desc = "cancelled run" } }
    local drawn = h.capture_stderr(function()
      local n = 0
      for _ in p:run({ 1, 2, 3, 4, 5, 6 }) do
        n = n + 1
        if n == 2 then break end
      end
      assert.is_true(p:cancel())
    end)
    -- (ticks are drawn every 2 s off a terminal: the first one, then the last by cancel)
    local last = drawn:match("([^\n]*)\n$")
    assert.matches("cancelled run  2/6", last, 1, true)
  end)

  it("the result in a command's TimeoutError says ok = false", function()
    local _, e = h.kind_of(function()
      return corral.exec({ "sleep", "10" }, { timeout = 0.1, kill_grace = 0.1 }):result()
    end)
    assert.is_false(e.result.ok)
  end)

  it("fs.write and fs.mkdir take a mode from 0 to 0o7777 only", function()
    local p = h.tmpname()
    assert.equal("UsageError", h.kind_of(function() corral.fs.write(p, "x", { mode = 1e20 }) end))
    assert.equal("UsageError", h.kind_of(function() corral.fs.write(p, "x", { mode = 1.5 }) end))
    assert.equal("UsageError", h.kind_of(function() corral.fs.mkdir(p .. ".d", { mode = -1 }) end))
    os.remove(p)
  end)

  it("a read of a FIFO waits for its writer on the loop and takes what it wrote", function()
    local fifo = h.tmpname()
    os.remove(fifo)
    os.execute("mkfifo " .. fifo)
    local r = corral.spawn(corral.fs.read, fifo)
    local w = corral.exec({ "sh", "-c", "sleep 0.2; printf 'one\n' > " .. fifo })
    assert.equal("one\n", r:result(10))
    assert.equal(0, w:result(10).code)
    os.remove(fifo)
  end)
end)
