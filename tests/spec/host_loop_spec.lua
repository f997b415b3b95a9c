-- The loop contract for Lua hosts with a loop of their own (Neovim, LÖVE):
-- corral.step, corral.backend_fd and corral.backend_timeout.
local corral = require "corral"
local ffi = require "ffi"
local h = require "helper"

pcall(ffi.cdef, [[
  struct corral_pollfd { int fd; short events; short revents; };
  int poll(struct corral_pollfd *fds, unsigned long n, int timeout);
]])

describe("a Lua host steps corral", function()
  it("backend_timeout is -1 idle, 0 with a task ready, the next timer's delay otherwise", function()
    assert.are.equal(-1, corral.backend_timeout())
    local t = corral.spawn(function() corral.sleep(0.3) return "woke" end)
    assert.are.equal(0, corral.backend_timeout())
    assert.is_true(corral.step())
    local ms = corral.backend_timeout()
    assert.is_true(ms > 100 and ms <= 300, ms)
    assert.are.equal("woke", t:result(5))
    assert.are.equal(-1, corral.backend_timeout())
  end)

  it("a host that polls the fd with the timeout, then steps, waits no longer than it must", function()
    local w = corral.worker { sq = function(_, x) require("corral").sleep(0.2) return x * x end }
      :options { mode = "thread" }:init()
    local f = w:sq(9)
    local pfd = ffi.new("struct corral_pollfd[1]")
    pfd[0].fd, pfd[0].events = corral.backend_fd(), 1 -- POLLIN
    local t0, polls = corral.now(), 0
    while not f:done() and corral.now() - t0 < 10 do
      local ms = corral.backend_timeout()
      if ms ~= 0 then
        polls = polls + 1
        ffi.C.poll(pfd, 1, ms < 0 and 5000 or ms) -- (-1: only the fd can bring work)
      end
      corral.step()
    end
    local took = corral.now() - t0
    assert.is_true(f:done())
    assert.are.equal(81, f:result())
    -- the result came through the fd: not the 5 s bound of a poll
    assert.is_true(took >= 0.15 and took < 3, took)
    assert.is_true(polls < 200, polls)
    w:stop()
  end)

  it("the backend fd is readable for a result before the host's first step", function()
    -- a fresh process: the fd is polled before corral's loop ever ran
    local path = h.tmpname() .. ".lua"
    local f = assert(io.open(path, "w"))
    f:write([[
      local corral = require "corral"
      local ffi = require "ffi"
      ffi.cdef("struct pfd { int fd; short events; short revents; };" ..
        "int poll(struct pfd *fds, unsigned long n, int timeout);")
      local w = corral.worker { sq = function(_, x) return x * x end }:init()
      local fut = w:sq(7)
      local pfd = ffi.new("struct pfd[1]")
      pfd[0].fd, pfd[0].events = corral.backend_fd(), 1
      local t0 = corral.now()
      local n = ffi.C.poll(pfd, 1, 5000)
      print("poll", n, corral.now() - t0 < 4)
      while not fut:done() do corral.step() end
      print("result", fut:result())
      w:stop()
    ]])
    f:close()
    local out, err, code = h.sh(h.luajit() .. " " .. path)
    os.remove(path)
    assert.are.equal(0, code, err)
    assert.matches("poll\t1\ttrue", out)
    assert.matches("result\t49", out)
  end)

  it("a stock luajit host hears of an unretrieved task error at exit, once, closed or not", function()
    for _, ending in ipairs { "", "os.exit(0)" } do
      local out, err, code = h.sh(h.luajit() .. " -e " .. h.quote([[
        local c = require "corral"
        c.spawn(function() error("boom nobody read") end)
        local seen = c.spawn(function() error("boom that was read") end)
        c.step()
        assert(not pcall(seen.result, seen))
        print("stepped")
      ]] .. ending))
      assert.are.equal(0, code, err)
      assert.matches("stepped", out, 1, true)
      assert.are.equal(1, select(2, err:gsub("unretrieved error", "")), ending .. ": " .. err)
      assert.matches("boom nobody read", err, 1, true)
      assert.is_nil(err:find("boom that was read", 1, true), err)
    end
  end)

  it("step from inside a task is a UsageError", function()
    local t = corral.spawn(function() return corral.step() end)
    assert.are.equal("UsageError", h.kind_of(function() return t:result(5) end))
  end)

  it("step never blocks: with only a long timer pending it returns at once", function()
    local t = corral.spawn(function() corral.sleep(30) end)
    local t0 = corral.now()
    for _ = 1, 5 do assert.is_true(corral.step()) end
    assert.is_true(corral.now() - t0 < 1)
    t:cancel()
    corral.run()
  end)
end)
