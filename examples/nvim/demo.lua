-- demo.lua: two thread workers count primes while Neovim goes on; a task
-- waits for them and shows the count in a scratch buffer through vim.api.
--
--   nvim --clean -u NONE -c "luafile examples/nvim/demo.lua"            (in the corral tree)
--   nvim --headless --clean -u NONE -c "luafile examples/nvim/demo.lua"  (quits when done)
--
-- corral.so comes from LUA_CPATH when set (LUA_CPATH="/path/to/lib/?.so;;"),
-- else from this tree's lib/.
--
-- A `vim.loop` timer ticks every 10 ms all along: the tick count shows that
-- Neovim's loop kept running while the workers computed. With CORRAL_NVIM_OUT
-- set, the report also goes to that file; CORRAL_NVIM_N sets the bound (6e6).
-- luacheck: read globals vim
local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
-- corral.so from LUA_CPATH if it is there, else from this tree's lib/
if not package.searchpath("corral", package.cpath) then
  package.cpath = here .. "/../../lib/?.so;" .. package.cpath
end
local corral = require "corral"
local cn = dofile(here .. "/corral_nvim.lua")
local uv = vim.loop

local N, CHUNKS = tonumber(os.getenv("CORRAL_NVIM_N")) or 6000000, 12
local out_path = os.getenv("CORRAL_NVIM_OUT")
local headless = #vim.api.nvim_list_uis() == 0

local function report(line)
  if out_path then
    local f = assert(io.open(out_path, "a"))
    f:write(line, "\n")
    f:close()
  end
  if not headless then vim.api.nvim_echo({ { line } }, true, {}) end
end

-- Neovim's own timer: counts its ticks and the longest gap between two.
local ticks, last, max_gap = 0, uv.hrtime(), 0
local ticker = uv.new_timer()
ticker:start(10, 10, function()
  local now = uv.hrtime()
  ticks, max_gap = ticks + 1, math.max(max_gap, (now - last) / 1e9)
  last = now
end)

local Primes = corral.worker {
  -- how many primes in [lo, hi): CPU-bound, on a thread of its own
  count = function(_, lo, hi)
    local c = 0
    for i = math.max(lo, 2), hi - 1 do
      local prime = true
      for d = 2, math.floor(math.sqrt(i)) do
        if i % d == 0 then prime = false break end
      end
      if prime then c = c + 1 end
    end
    return c
  end,
}
local pool = Primes:options { mode = "thread", workers = 2 }:init()

cn.start()
cn.spawn(function()
  local t0, ticks0 = corral.now(), ticks
  max_gap, last = 0, uv.hrtime()
  local calls = {}
  for i = 0, CHUNKS - 1 do
    calls[#calls + 1] = pool:count(math.floor(N * i / CHUNKS), math.floor(N * (i + 1) / CHUNKS))
  end
  local total = 0
  for _, f in ipairs(calls) do total = total + f:result() end -- waits inside a task
  local took, ticked, gap = corral.now() - t0, ticks - ticks0, max_gap
  -- a task runs under vim.schedule: vim.api is allowed here
  local buf = vim.api.nvim_create_buf(false, true)
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, { ("primes below %d: %d"):format(N, total) })
  report(("primes below %d: %d"):format(N, total))
  report(("computed in %.3f s on 2 thread workers; the Neovim timer ticked %d times meanwhile, "
    .. "longest gap %.3f s"):format(took, ticked, gap))
  report(("from the buffer (vim.api, fast event: %s): %s"):format(
    tostring(vim.in_fast_event()), vim.api.nvim_buf_get_lines(buf, 0, 1, false)[1]))
  report(("corral steps: %d"):format(cn.steps))
  if not headless then vim.api.nvim_win_set_buf(0, buf) end -- (shows the buffer)
  ticker:stop()
  ticker:close()
  pool:stop()
  if headless then vim.schedule(function() vim.cmd("qa!") end) end
end)
