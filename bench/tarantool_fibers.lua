-- Tarantool's fiber rate: fiber.create of N trivial fibers (run by `tarantool`).
local fiber = require "fiber"
local N = tonumber(arg[1]) or 1000000
local clock = require "clock"
local t0 = clock.monotonic()
local done = 0
for _ = 1, N do fiber.create(function() done = done + 1 end) end
while done < N do fiber.yield() end
print(("tasks_per_s %.0f"):format(N / (clock.monotonic() - t0)))
os.exit(0)
