-- Adversarial review of the embedding work (issue 12), the Lua side: what a
-- Lua host sees of corral.exit_status, corral.exit and the loop contract.
local corral = require "corral"
local h = require "helper"

describe("review15b: a Lua host", function()
  it("corral.exit_status() is one value, nil, while the runtime runs", function()
    assert.are.equal(1, select("#", corral.exit_status()))
    assert.are.equal("nil", tostring(corral.exit_status()))
  end)

  it("after corral.exit nothing runs, waits raise, and the status stays the first", function()
    local path = h.tmpname() .. ".lua"
    local fh = assert(io.open(path, "w"))
    fh:write([[
local c = require "corral"
local w = c.worker { nap = function(_, s) require("corral").sleep(s) return 1 end }
  :options { mode = "thread" }:init()
local f = w:nap(30)
c.exit(3)
c.exit(4)
local t = c.spawn(function() print("TASK RAN") end)
print(c.exit_status(), c.step(), c.backend_timeout(), pcall(c.run))
print(pcall(function() return t:result() end))
print(pcall(function() return f:result(1) end))
]])
    fh:close()
    local o, e, code = h.sh(h.luajit() .. " " .. path)
    os.remove(path)
    assert.are.equal(0, code, e)
    assert.is_nil(o:find("TASK RAN"), o)
    assert.truthy(o:find("^3\tfalse\t%-1\ttrue\n"), o)
    assert.truthy(select(2, o:gsub("would wait forever: corral.exit", "")) == 2, o)
  end)

  it("corral.exit in a coroutine of a task's own takes its debug hook off: the host's own is back",
    function()
    local path = h.tmpname() .. ".lua"
    local fh = assert(io.open(path, "w"))
    fh:write([[
local c = require "corral"
local function mine() end
debug.sethook(mine, "", 1000)
c.spawn(function()
  local co = coroutine.wrap(function() pcall(c.exit, 3) end)
  co()
  print("AFTER")
end)
for _ = 1, 3 do c.step() end
local fn, mask, count = debug.gethook()
print(c.exit_status(), fn == mine, mask, count)
debug.sethook()
jit.off()
local t = os.clock()
local x = 0
for i = 1, 2e6 do x = x + i end
print(os.clock() - t < 1)
]])
    fh:close()
    local o, e, code = h.sh(h.luajit() .. " " .. path)
    os.remove(path)
    assert.are.equal(0, code, e)
    assert.are.equal("3\ttrue\t\t1000\ntrue\n", o)
  end)

  it("after corral.exit the backend fd does not stay readable: a host that polls it does not spin",
    function()
    local path = h.tmpname() .. ".lua"
    local fh = assert(io.open(path, "w"))
    fh:write([[
local c = require "corral"
local ffi = require "ffi"
ffi.cdef "struct r15pfd { int fd; short events; short revents; };"
ffi.cdef "int poll(struct r15pfd *fds, unsigned long n, int timeout);"
local w = c.worker { nap = function(_, s) require("corral").sleep(s) return 1 end }
  :options { mode = "thread", workers = 2 }:init()
local calls = { w:nap(0.2), w:nap(0.3) }
c.spawn(function() c.sleep(0.05); c.exit(2) end)
local p = ffi.new("struct r15pfd[1]")
p[0].fd, p[0].events = c.backend_fd(), 1
local t0, steps = c.now(), 0
while c.now() - t0 < 1.5 do
  local ms = c.backend_timeout()
  ffi.C.poll(p, 1, ms < 0 and 200 or ms)
  c.step()
  steps = steps + 1
end
print(c.exit_status(), steps, #calls)
]])
    fh:close()
    local o, e, code = h.sh(h.luajit() .. " " .. path)
    os.remove(path)
    assert.are.equal(0, code, e)
    local status, steps = o:match("^(%d+)\t(%d+)")
    assert.are.equal("2", status, o)
    -- (200 ms polls for 1.5 s: about 8; it was about a million)
    assert.is_true(tonumber(steps) < 100, o)
  end)

  -- (a sanitizer build's objects need its runtime in the host too)
  local it_plain = h.preload and pending or it
  it_plain("a C host linked with an installed libcorral.so (PREFIX not /usr/local) starts a "
    .. "process worker", function()
    local dest = os.tmpname()
    os.remove(dest)
    local _, err, code = h.sh("make -s install BUILD=" .. h.quote(h.build) .. " DESTDIR="
      .. h.quote(dest) .. " PREFIX=/opt/corral >/dev/null")
    assert.are.equal(0, code, err)
    local lib = dest .. "/opt/corral/lib"
    local f = assert(io.open(dest .. "/host.c", "w"))
    f:write([[
#include <stdio.h>
#include <string.h>
#include <corral.h>
int main(int argc, char **argv) {
  if (argc >= 2 && strcmp(argv[1], "-e") == 0) return 3; /* (not the child: luajit is) */
  corral_runtime *rt = corral_open();
  corral_future *f = corral_dostring_future(rt, "local c = require 'corral'\n"
    "local w = c.worker { sq = function(_, x) return x * x end }"
    ":options { mode = 'process' }:init()\n"
    "local r = w:sq(7):result(20); w:stop(); return tostring(r)");
  corral_run(rt);
  const char *s; size_t n; char msg[300] = "";
  if (corral_future_get_string(f, &s, &n) == 0) printf("result %.*s\n", (int)n, s);
  else { corral_future_error_message(f, msg, sizeof msg); printf("failed: %s\n", msg); }
  corral_future_release(f);
  corral_close(rt);
  return 0;
}
]])
    f:close()
    local pc = "PKG_CONFIG_PATH=" .. h.quote(lib .. "/pkgconfig") .. " pkg-config "
    local out
    out, err, code = h.sh("cd " .. h.quote(dest) .. " && cc host.c -o host $(" .. pc
      .. "--cflags --libs corral) && cd / && LD_LIBRARY_PATH=" .. h.quote(lib) .. " timeout 60 "
      .. h.quote(dest .. "/host"))
    os.execute("rm -rf " .. h.quote(dest))
    assert.are.equal(0, code, err)
    assert.are.equal("result 49\n", out, err)
  end)
end)
