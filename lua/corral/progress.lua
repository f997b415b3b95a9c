--- Progress display for gather and map: a bar on a terminal, plain lines
-- otherwise, or the caller's own function.
-- @module corral.progress
local core = require "corral.core"
local sched = require "corral.sched"

local M = {}
local Progress = {}
Progress.__index = Progress

local function fmt_time(s)
  if s ~= s or s == math.huge then return "?" end
  if s < 10 then return ("%.1fs"):format(s) end
  s = math.floor(s + 0.5)
  if s < 60 then return s .. "s" end
  if s < 3600 then return ("%dm%02ds"):format(s / 60, s % 60) end
  return ("%dh%02dm"):format(s / 3600, (s % 3600) / 60)
end

--- Make a progress display, or nil when `opt` is false or nil.
-- @param opt true, {desc=...}, or function(done, total, elapsed)
-- @int total how many items (nil: not known yet)
-- @param[opt] out the stream to draw on (default io.stderr)
function M.new(opt, total, out)
  if not opt then return nil end
  local p = setmetatable({ total = total, done = 0, failed = 0, start = core.now(),
    last = -1, out = out or io.stderr }, Progress)
  if type(opt) == "function" then
    p.fn = opt
  else
    p.desc = type(opt) == "table" and opt.desc or nil
    p.tty = core.isatty(2) and p.out == io.stderr
    p.every = p.tty and 0.1 or 2.0
  end
  return p
end

function Progress:line()
  local elapsed = core.now() - self.start
  local rate = elapsed > 0 and self.done / elapsed or 0
  local parts = {}
  if self.desc then parts[#parts + 1] = self.desc end
  if self.total == nil then -- (an input of unknown length: a pipeline's iterator)
    parts[#parts + 1] = ("%d done"):format(self.done)
    if self.failed > 0 then parts[#parts + 1] = ("(%d failed)"):format(self.failed) end
    parts[#parts + 1] = ("%.1f/s"):format(rate)
    return table.concat(parts, "  ")
  end
  local left = rate > 0 and (self.total - self.done) / rate or math.huge
  if self.tty then
    local width = 24
    local fill = self.total > 0 and math.floor(width * self.done / self.total) or width
    parts[#parts + 1] = "[" .. ("#"):rep(fill) .. ("."):rep(width - fill) .. "]"
  end
  parts[#parts + 1] = ("%d/%d"):format(self.done, self.total)
  if self.failed > 0 then parts[#parts + 1] = ("(%d failed)"):format(self.failed) end
  parts[#parts + 1] = ("%.1f/s"):format(rate)
  if self.done < self.total then
    parts[#parts + 1] = "left " .. fmt_time(left)
  else
    parts[#parts + 1] = "in " .. fmt_time(elapsed)
  end
  return table.concat(parts, "  ")
end

function Progress:draw(final)
  if self.fn then
    local ok, e = pcall(self.fn, self.done, self.total, core.now() - self.start)
    if not ok then sched.report("error in a progress function", e) end
    return
  end
  local t = core.now()
  if not final and t - self.last < self.every then return end
  self.last = t
  if self.tty then
    self.out:write("\r\27[K", self:line(), final and "\n" or "")
  else
    self.out:write(self:line(), "\n")
  end
  self.out:flush()
end

--- Count one finished item (failed or not) without drawing.
function Progress:count(failed)
  self.done = self.done + 1
  if failed then self.failed = self.failed + 1 end
end

--- Count one finished item and redraw when it is time.
function Progress:tick(failed)
  self:count(failed)
  self:draw(false)
end

--- Draw the last state.
function Progress:finish()
  if self.fn then return end
  self:draw(true)
end

return M
