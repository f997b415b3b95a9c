-- Embedding corral: the C host API's tests (tests/c/test_embed.c), under
-- valgrind too; corral.exit returned to a Lua host; the example C host of
-- examples/host, built and run for a second.
local h = require "helper"

local function have(cmd)
  return os.execute("command -v " .. cmd .. " >/dev/null 2>&1") == 0
end

describe("the C embedding API", function()
  local embed = h.quote(h.build .. "/obj/tests/test_embed")

  it("passes its C tests (corral_register, corral_spawn, values, payloads, exit, close)", function()
    local out, err, code = h.sh(embed)
    assert.are.equal(0, code, out .. err)
    assert.matches("1%.%.%d+", out)
    assert.not_matches("not ok", out)
  end)

  -- (valgrind cannot run a sanitizer build; it finds leaks of C memory:
  -- LuaJIT's heap is its own)
  local it_valgrind = (h.preload or not have("valgrind")) and pending or it
  it_valgrind("leaks nothing under valgrind (a short run of the same tests)", function()
    local log = os.tmpname()
    local out, err, code = h.sh("CORRAL_EMBED_FUZZ=300 timeout 300 valgrind --leak-check=full "
      .. "--errors-for-leak-kinds=definite --error-exitcode=99 --log-file=" .. h.quote(log) .. " "
      .. embed)
    local f = io.open(log)
    local report = f and f:read("*a") or ""
    if f then f:close() end
    os.remove(log)
    assert.are.equal(0, code, report .. out .. err)
    assert.not_matches("not ok", out)
    assert.matches("ERROR SUMMARY: 0 errors", report)
    assert.is_true(report:find("definitely lost: 0 bytes", 1, true) ~= nil
      or report:find("no leaks are possible", 1, true) ~= nil, report)
  end)
end)

describe("corral.exit in a Lua host", function()
  it("stops corral and is returned: step() is false, exit_status() the status, the host goes on", function()
    local out, err, code = h.sh(h.luajit() .. " -e " .. h.quote([[
      local corral = require "corral"
      local W = corral.worker { nap = function(_, d) require("corral").sleep(d) return "ok" end }
      local w = W:options { mode = "thread" }:init()
      assert(corral.exit_status() == nil)
      local t = corral.spawn(function()
        assert(w:nap(0):result() == "ok")
        w:nap(30) -- (cancelled by the stop)
        pcall(corral.exit, 4)
        print("not reached")
      end)
      for _ = 1, 100000 do if not corral.step() then break end end
      print("status", corral.exit_status(), corral.step(), corral.backend_timeout(), t:done())
      local ok, e = pcall(function() return t:result() end)
      print(ok, e.kind, e.message:find("corral.exit", 1, true) ~= nil)
      corral.run() -- returns at once
      print("the host goes on")
    ]]))
    assert.are.equal(0, code, err)
    assert.are.equal("status\t4\tfalse\t-1\tfalse\nfalse\tUsageError\ttrue\nthe host goes on\n", out)
  end)

  it("outside any task it returns; the first status counts", function()
    local out, err, code = h.sh(h.luajit() .. " -e " .. h.quote([[
      local corral = require "corral"
      corral.exit(5)
      corral.exit(6)
      print(corral.exit_status(), corral.step())
      os.exit(0)
    ]]))
    assert.are.equal(0, code, err)
    assert.are.equal("5\tfalse\n", out)
  end)
end)

describe("examples/host", function()
  it("runs its 60 Hz frame loop with two busy workers and prints corral_step's distribution", function()
    local out, err, code = h.sh("timeout 60 " .. h.quote(h.build .. "/obj/examples/host")
      .. " examples/host/frame.lua 1")
    assert.are.equal(0, code, out .. err)
    assert.matches("^60 frames at 60 Hz", out)
    assert.matches("corral_step per frame: p50 [%d.]+ us, p99 [%d.]+ us, max [%d.]+ us", out)
    assert.matches("overran the 16%.7 ms budget: %d+", out)
  end)

  local it_plain = h.preload and pending or it
  it_plain("builds with its own Makefile against an installed corral (pkg-config)", function()
    local dest = os.tmpname()
    os.remove(dest)
    local _, err, code = h.sh("make -s install BUILD=" .. h.quote(h.build) .. " DESTDIR="
      .. h.quote(dest) .. " PREFIX=/usr/local >/dev/null && cp -r examples/host " .. h.quote(dest))
    assert.are.equal(0, code, err)
    local lib = dest .. "/usr/local/lib"
    local out
    out, err, code = h.sh("cd " .. h.quote(dest .. "/host") .. " && rm -f host && PKG_CONFIG_PATH="
      .. h.quote(lib .. "/pkgconfig") .. " make -s host && LD_LIBRARY_PATH=" .. h.quote(lib)
      .. " ./host frame.lua 0.5")
    os.execute("rm -rf " .. h.quote(dest))
    assert.are.equal(0, code, out .. err)
    assert.matches("corral_step per frame: p50", out)
  end)
end)
