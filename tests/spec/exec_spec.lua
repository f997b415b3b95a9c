-- corral.exec: commands in their own process group (src/lua_exec.c,
-- lua/corral/exec.lua).
local corral = require "corral"
local exec = require "corral.exec"
local h = require "helper"

local kind_of = h.kind_of

-- A command that prints its process group's id first: its lines go to
-- `lines`, the id to the returned table once it came.
local function with_pid(script, opts)
  local seen = { lines = {} }
  opts = opts or {}
  opts.on_line = function(_, line)
    if not seen.pid then seen.pid = tonumber(line) else seen.lines[#seen.lines + 1] = line end
  end
  seen.f = corral.exec({ "sh", "-c", "echo $$; " .. script }, opts)
  h.wait_until(function() return seen.pid ~= nil end, 10)
  return seen
end

describe("corral.exec", function()
  it("gives the exit code, the output of each stream and the time it took", function()
    local r = corral.exec({ "sh", "-c", "echo out; echo err >&2; exit 3" }):result()
    assert.equal(3, r.code)
    assert.is_nil(r.signal)
    assert.is_false(r.ok)
    assert.equal("out\n", r.stdout)
    assert.equal("err\n", r.stderr)
    assert.is_true(r.elapsed > 0 and r.elapsed < 10)
    assert.is_true(r.pid > 0)
    local ok = corral.exec({ "true" }):result()
    assert.equal(0, ok.code)
    assert.is_true(ok.ok)
  end)

  it("passes arguments as they are: no shell unless asked", function()
    local r = corral.exec({ "printf", "%s|", "a b", "$HOME", "*" }):result()
    assert.equal("a b|$HOME|*|", r.stdout)
  end)

  it("reports the signal that ended a command", function()
    local r = corral.exec({ "sh", "-c", "kill -9 $$" }):result()
    assert.equal(9, r.signal)
    assert.is_nil(r.code)
    assert.is_false(r.ok)
  end)

  it("streams lines to on_line as they come, each tagged with its stream", function()
    local got = corral.channel(16)
    local f = corral.exec({ "sh", "-c", "echo first; echo warn >&2; printf 'crlf\\r\\n'; "
      .. "sleep 30" }, {
      on_line = function(stream, line) got:put(stream .. ":" .. line) end })
    -- the lines arrive while the command still runs
    local seen = {}
    for i = 1, 3 do seen[i] = got:get(10) end
    assert.is_false(f:done())
    table.sort(seen)
    assert.same({ "stderr:warn", "stdout:crlf", "stdout:first" }, seen)
    assert.is_true(f:cancel())
    assert.equal("CancelledError", kind_of(function() return f:result() end))
    -- a last line without its newline comes when its stream ends
    local last = {}
    corral.exec({ "printf", "a\nno newline" }, { on_line = function(_, l) last[#last + 1] = l end })
      :result()
    assert.same({ "a", "no newline" }, last)
  end)

  it("keeps capturing what on_line sees, unless capture is false", function()
    local n = 0
    local r = corral.exec({ "seq", "1", "1000" }, { on_line = function() n = n + 1 end }):result()
    assert.equal(1000, n)
    assert.equal(1000, select(2, r.stdout:gsub("\n", "")))
    local r2 = corral.exec({ "seq", "1", "5" }, { capture = false, on_line = function() end })
      :result()
    assert.is_nil(r2.stdout)
  end)

  it("lets the output through to this process's own with capture = false", function()
    local out, _, code = h.run([[
      local corral = require "corral"
      local r = corral.exec({ "echo", "straight through" }, { capture = false }):result()
      print("code", r.code, r.stdout)
    ]])
    assert.equal(0, code)
    assert.matches("straight through\ncode\t0\tnil", out, 1, true)
  end)

  it("feeds stdin, large or unread, without SIGPIPE in this process", function()
    local big = string.rep("0123456789", 300000)
    local r = corral.exec({ "cat" }, { stdin = big }):result()
    assert.equal(#big, #r.stdout)
    assert.equal(big, r.stdout)
    -- the command exits without reading: the write fails quietly
    local r2 = corral.exec({ "true" }, { stdin = big }):result()
    assert.equal(0, r2.code)
    local r3 = corral.exec({ "wc", "-c" }, { stdin = "" }):result()
    assert.equal("0", r3.stdout:match("%d+"))
    -- without stdin the input is /dev/null: a reader gets EOF at once
    local r4 = corral.exec({ "cat" }):result()
    assert.equal("", r4.stdout)
  end)

  it("runs in cwd, with env merged on this process's environment", function()
    local r = corral.exec({ "pwd" }, { cwd = "/tmp" }):result()
    assert.equal("/tmp\n", r.stdout)
    local r2 = corral.exec({ "sh", "-c", "echo \"$CORRAL_T1|${HOME-unset}|$PATH\"" },
      { env = { CORRAL_T1 = "x y", HOME = false } }):result()
    local a, b, c = r2.stdout:match("^(.-)|(.-)|(.-)\n$")
    assert.equal("x y", a)
    assert.equal("unset", b)
    assert.equal(os.getenv("PATH"), c)
  end)

  it("fails a command that cannot start with an OSError naming it", function()
    local k, e = kind_of(function() return corral.exec({ "no-such-command-corral" }):result() end)
    assert.equal("OSError", k)
    assert.matches("cannot start 'no-such-command-corral'", e.message, 1, true)
    assert.equal("ENOENT", e.code)
    local k2, e2 = kind_of(function()
      return corral.exec({ "true" }, { cwd = "/no/such/dir" }):result()
    end)
    assert.equal("OSError", k2)
    assert.matches("/no/such/dir", e2.message, 1, true)
  end)

  it("checks its arguments", function()
    assert.equal("UsageError", kind_of(function() corral.exec("ls -l") end))
    assert.equal("UsageError", kind_of(function() corral.exec({}) end))
    assert.equal("UsageError", kind_of(function() corral.exec({ "ls", 3 }) end))
    assert.equal("UsageError", kind_of(function() corral.exec({ "ls" }, { timout = 1 }) end))
    assert.equal("UsageError", kind_of(function() corral.exec({ "ls" }, { env = { A = 1 } }) end))
    assert.equal("UsageError", kind_of(function() corral.exec({ "ls" }, { env = { ["A=B"] = "x" } }) end))
    assert.equal("UsageError", kind_of(function() corral.exec({ "ls" }, { timeout = -1 }) end))
    assert.equal("UsageError", kind_of(function() corral.exec({ "ls" }, { stdin = {} }) end))
    assert.equal("UsageError", kind_of(function() corral.exec({ "ls\0x" }) end))
  end)

  it("a timeout ends the whole process group and fails with TimeoutError", function()
    local t0 = corral.now()
    local s = with_pid("sleep 30 & sleep 30; echo never", { timeout = 0.3 })
    local k, e = kind_of(function() return s.f:result() end)
    assert.equal("TimeoutError", k)
    assert.matches("timed out after 0.3 s", e.message, 1, true)
    assert.is_table(e.result)
    assert.equal(15, e.result.signal)
    assert.is_true(corral.now() - t0 < 10)
    h.wait_until(function() return not exec.group_alive(s.pid) end, 10)
    assert.same({}, s.lines)
  end)

  it("a command that ignores SIGTERM gets SIGKILL after kill_grace", function()
    local t0 = corral.now()
    local s = with_pid("trap '' TERM; while :; do sleep 0.05; done",
      { timeout = 0.2, kill_grace = 0.3 })
    local k, e = kind_of(function() return s.f:result() end)
    local took = corral.now() - t0
    assert.equal("TimeoutError", k)
    assert.equal(9, e.result.signal)
    assert.is_true(took >= 0.45, "killed before its grace: " .. took)
    assert.is_true(took < 10)
    h.wait_until(function() return not exec.group_alive(s.pid) end, 10)
  end)

  it("cancel ends the process group, returns true, and the future says CancelledError", function()
    local s = with_pid("sleep 30 & sleep 30")
    assert.is_true(exec.group_alive(s.pid))
    assert.is_true(s.f:cancel())
    assert.equal("CancelledError", kind_of(function() return s.f:result() end))
    h.wait_until(function() return not exec.group_alive(s.pid) end, 10)
    -- a finished command cannot be cancelled
    local f = corral.exec({ "true" })
    f:result()
    assert.is_false(f:cancel())
  end)

  it("an error in on_line ends the command and fails the future with it", function()
    local s
    s = with_pid("echo boom; sleep 30", {})
    -- (with_pid's on_line took the pid; a second command raises on its first line)
    assert.is_true(s.f:cancel())
    local f = corral.exec({ "sh", "-c", "echo boom; sleep 30" },
      { on_line = function(_, line) error("bad line: " .. line) end })
    local _, e = kind_of(function() return f:result() end)
    assert.matches("bad line: boom", tostring(e), 1, true)
  end)

  it("runs many commands at once, suspending only its tasks", function()
    local fs = {}
    local t0 = corral.now()
    for i = 1, 20 do fs[i] = corral.exec({ "sh", "-c", "sleep 0.2; echo " .. i }) end
    local ticks = 0
    local ticker = corral.spawn(function()
      while true do corral.sleep(0.01); ticks = ticks + 1 end
    end)
    local rs = corral.gather(fs)
    ticker:cancel()
    for i = 1, 20 do assert.equal(i .. "\n", rs[i].stdout) end
    assert.is_true(corral.now() - t0 < 3, "the commands did not run at once")
    assert.is_true(ticks >= 5, "the loop did not run while they did: " .. ticks)
  end)

  it("works from a thread worker", function()
    local W = corral.worker {
      run = function(_, n)
        local c = require "corral"
        return c.exec({ "sh", "-c", "sleep 0.1; echo $0", tostring(n) }):result().stdout
      end,
    }
    local w = W:options({ mode = "thread" }):init()
    assert.equal("7\n", w:run(7):result(10))
    w:stop()
  end)

  it("kills a running command's group when the runtime closes", function()
    local out, _, code = h.run([[
      local corral = require "corral"
      local got = corral.channel(1)
      corral.exec({ "sh", "-c", "echo $$; sleep 30 & sleep 30" },
        { on_line = function(_, l) got:put(l) end })
      print(got:get(10))
      io.stdout:flush()
      corral.exit(0)
    ]], 20)
    assert.equal(0, code)
    local pid = tonumber(out:match("(%d+)"))
    assert.is_number(pid)
    h.wait_until(function() return not exec.group_alive(pid) end, 10)
  end)
end)
