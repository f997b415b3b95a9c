-- main.lua: corral in LÖVE. love.update steps corral once a frame; two
-- thread workers count primes while the frames go on; a task waits for them
-- (inside the task: a wait at top level would stop the frames).
--
--   love examples/love                            (a window; Escape quits)
--   CORRAL_LOVE_HEADLESS=1 love examples/love     (no display: prints, quits when done)
--   xvfb-run love examples/love                   (a window on a virtual display)
--
-- corral.so comes from LUA_CPATH when set (LUA_CPATH="/path/to/lib/?.so;;"),
-- else from this tree's lib/.
-- luacheck: globals love
if not package.searchpath("corral", package.cpath) then
  package.cpath = love.filesystem.getSource() .. "/../../lib/?.so;" .. package.cpath
end
local corral = require "corral"

local N, CHUNKS = tonumber(os.getenv("CORRAL_LOVE_N")) or 6000000, 12
local headless = love.window == nil

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

local frames, longest = 0, 0 -- frames while the workers compute, the longest one
local status = "counting primes on 2 thread workers..."
local pool, job

function love.load()
  pool = Primes:options { mode = "thread", workers = 2 }:init()
  job = corral.spawn(function()
    local t0, frames0 = corral.now(), frames
    longest = 0
    local calls = {}
    for i = 0, CHUNKS - 1 do
      calls[#calls + 1] = pool:count(math.floor(N * i / CHUNKS), math.floor(N * (i + 1) / CHUNKS))
    end
    local total = 0
    for _, f in ipairs(calls) do total = total + f:result() end -- waits inside the task
    local took = corral.now() - t0
    status = ("primes below %d: %d"):format(N, total)
    print(status)
    print(("computed in %.3f s on 2 thread workers; %d frames meanwhile, longest %.3f s")
      :format(took, frames - frames0, longest))
    pool:stop()
  end)
end

function love.update(dt)
  frames = frames + 1
  longest = math.max(longest, dt)
  corral.step() -- never blocks: completions, due timers, the tasks ready then
  if headless and job:done() then
    job:result() -- (raises if the task failed)
    love.event.quit(0)
  end
end

function love.draw()
  love.graphics.print(("frame %d\n%s"):format(frames, status), 20, 20)
end

function love.keypressed(key)
  if key == "escape" then love.event.quit(0) end
end
