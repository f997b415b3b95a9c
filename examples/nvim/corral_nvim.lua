--- corral_nvim.lua: drive corral from Neovim's own loop.
--
-- Neovim has a loop of its own (`vim.loop`, libuv); corral must not wait
-- outside a task there, or Neovim freezes. This module steps corral instead,
-- following corral's loop contract:
--
-- * a `vim.loop` poll handle watches `corral.backend_fd()`, which becomes
--   readable when a worker thread settles something for this loop;
-- * a `vim.loop` timer is set from `corral.backend_timeout()` (0: work is
--   ready now; n: corral's next timer is due in n ms; -1: only the fd can
--   bring work);
-- * either one schedules `corral.step()` with `vim.schedule`, so it runs on
--   Neovim's main loop, outside a "fast" callback: corral's tasks may call
--   `vim.api`.
--
-- Use:
--
--     package.cpath = "/path/to/corral/lib/?.so;" .. package.cpath
--     local cn = dofile("/path/to/corral/examples/nvim/corral_nvim.lua")
--     cn.start()
--     cn.spawn(function()
--       local n = worker:count(1e6):result()   -- waits inside a task: fine
--       vim.api.nvim_echo({ { "count: " .. n } }, false, {})
--     end)
--
-- Work started outside a step (a `corral.spawn`, a worker call made from a
-- command or an autocmd) needs `cn.kick()` afterwards; `cn.spawn` does it.
-- luacheck: read globals vim
local corral = require "corral"
local uv = vim.loop

local M = { steps = 0 }

local poll, timer
local scheduled = false
local arm

--- Optional: called with the message when `corral.step()` raises.
M.on_error = function(msg) vim.notify("corral: " .. tostring(msg), vim.log.levels.ERROR) end

-- One turn of corral's loop, on Neovim's main loop (vim.api is allowed).
local function step()
  scheduled = false
  if poll == nil then return end -- stopped meanwhile
  M.steps = M.steps + 1
  local ok, err = pcall(corral.step)
  if not ok then M.on_error(err) end
  arm()
end

local function schedule_step()
  if scheduled or poll == nil then return end
  scheduled = true
  vim.schedule(step)
end

-- The fd is readable: stop watching it until the step has run (a level-
-- triggered poll would fire again at once), and step.
local function on_readable()
  poll:stop()
  schedule_step()
end

-- Watch for whatever brings corral work next: the fd always, the timer for
-- corral's next deadline.
arm = function()
  poll:start("r", on_readable)
  timer:stop()
  local ms = corral.backend_timeout()
  if ms == 0 then
    schedule_step()
  elseif ms > 0 then
    timer:start(ms, 0, schedule_step)
  end
end

--- Start driving corral from Neovim's loop (once; again after `stop`).
function M.start()
  if poll ~= nil then return end
  poll = uv.new_poll(corral.backend_fd())
  timer = uv.new_timer()
  arm()
end

--- Stop driving corral (its pending work stays pending).
function M.stop()
  if poll == nil then return end
  poll:stop()
  poll:close()
  timer:stop()
  timer:close()
  poll, timer = nil, nil
end

--- Step soon: after starting work from outside a step.
function M.kick() schedule_step() end

--- `corral.spawn(fn, ...)`, then step soon. Returns the task.
function M.spawn(fn, ...)
  local t = corral.spawn(fn, ...)
  schedule_step()
  return t
end

return M
