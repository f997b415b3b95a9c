-- Neovim as a Lua host: corral.so loaded into `nvim --headless`, thread
-- workers driven from Neovim's own loop by examples/nvim/corral_nvim.lua
-- (a vim.loop poll on corral.backend_fd(), a timer from
-- corral.backend_timeout(), steps under vim.schedule).
local h = require "helper"

local has_nvim = os.execute("command -v nvim >/dev/null 2>&1") == 0

-- Run nvim headless with `script` (a file) and a hard bound: a hang fails.
local function nvim(script, env)
  local pre = (h.preload and "LD_PRELOAD=" .. h.quote(h.preload) .. " " or "")
    .. "LUA_CPATH=" .. h.quote(h.build .. "/lib/?.so;;") .. " " .. (env or "")
  return h.sh(pre .. " timeout -s KILL 60 nvim --headless --clean -u NONE -c "
    .. h.quote("luafile " .. script))
end

local script = h.write_script

describe("Neovim drives corral", function()
  if not has_nvim then
    io.stderr:write("nvim_spec: nvim is not installed (scripts/install-deps installs it): skipped\n")
    pending("nvim is not installed (scripts/install-deps installs it)")
    return
  end

  it("the demo: workers' results arrive, Neovim's timer ticks meanwhile, a task calls vim.api", function()
    local out_path = h.tmpname()
    local _, err, code = nvim("examples/nvim/demo.lua", "CORRAL_NVIM_OUT=" .. h.quote(out_path))
    local out = h.slurp(out_path)
    os.remove(out_path)
    assert.are.equal(0, code, err)
    -- (a) the results of 12 calls on 2 thread workers
    assert.matches("primes below 6000000: 412849", out, 1, true)
    -- (b) Neovim's 10 ms timer went on while the workers computed: had a
    -- wait held Neovim's loop, it would have ticked about never, with one
    -- gap as long as the computation
    local took, ticked, gap = out:match("computed in ([%d.]+) s on 2 thread workers; "
      .. "the Neovim timer ticked (%d+) times meanwhile, longest gap ([%d.]+) s")
    took, ticked, gap = tonumber(took), tonumber(ticked), tonumber(gap)
    assert.is_truthy(took, out)
    assert.is_true(took > 0.2, "the computation was too short to tell: " .. took)
    assert.is_true(ticked >= 5, out)
    assert.is_true(gap < took / 2, out)
    -- (c) the task ran on Neovim's main loop, not in a fast callback
    assert.matches("from the buffer (vim.api, fast event: false): primes below 6000000: 412849", out, 1, true)
  end)

  it("a call made outside any step, then kick(): a task waits on it, Neovim's timer goes on", function()
    local out_path = h.tmpname()
    local path = script([[
      local corral = require "corral"
      local cn = dofile("examples/nvim/corral_nvim.lua")
      local out = assert(io.open(os.getenv("OUT"), "w"))
      cn.start()
      local w = corral.worker { slow = function(_, x) require("corral").sleep(0.3) return x + 1 end }:init()
      local ticks = 0
      local t = vim.loop.new_timer()
      t:start(5, 5, function() ticks = ticks + 1 end)
      -- a call made outside any step: kick() makes the module step for it
      local f = w:slow(41)
      cn.kick()
      cn.spawn(function()
        local r = f:result()
        out:write("result ", r, " ticks ", ticks, " mode ", vim.api.nvim_get_mode().mode, "\n")
        t:stop()
        w:stop()
        out:close()
        vim.schedule(function() vim.cmd("qa!") end)
      end)
    ]])
    local _, err, code = nvim(path, "OUT=" .. h.quote(out_path))
    os.remove(path)
    local out = h.slurp(out_path)
    os.remove(out_path)
    assert.are.equal(0, code, err)
    local r, ticks = out:match("result (%d+) ticks (%d+) mode n")
    assert.are.equal("42", r, out .. err)
    assert.is_true(tonumber(ticks) >= 5, out)
  end)

  it("an unretrieved task error is reported on stderr when Neovim exits (:qa)", function()
    local path = script([[
      local corral = require "corral"
      local cn = dofile("examples/nvim/corral_nvim.lua")
      cn.start()
      cn.spawn(function() corral.sleep(0.01) error("boom nobody read") end)
      local seen = cn.spawn(function() error("boom that was read") end)
      cn.spawn(function()
        corral.sleep(0.1)
        assert(not pcall(seen.result, seen))
        vim.schedule(function() vim.cmd("qa") end)
      end)
    ]])
    local _, err, code = nvim(path)
    os.remove(path)
    assert.are.equal(0, code, err)
    local n = select(2, err:gsub("unretrieved error", ""))
    assert.are.equal(1, n, err)
    assert.matches("boom nobody read", err, 1, true)
    assert.is_nil(err:find("boom that was read", 1, true), err)
  end)
end)
