-- Remote workers (mode = "remote", issue 13): calls to a pool served by a
-- `corral serve` host with 2 thread workers, over a NATS server with
-- JetStream on loopback (bench/run.py starts it). The host is a separate
-- process (`bin/corral serve --nats URL --workers 2 bench/remote_classes.lua`),
-- as in real use; `inproc` serves the pool from this process instead.
--   rtt: one call at a time, median us (after a warm-up)
--   throughput: 256 calls in flight (256 tasks, each one call at a time),
--     a 16-byte argument, calls/s
-- The last word printed is the figure. BENCH_REMOTE_WORKERS sets the host's
-- workers (2), BENCH_REMOTE_MODE their mode (thread).
-- Usage: remote.lua URL rtt|throughput [N] [inproc]
local corral = require "corral"
local url = assert(arg[1], "usage: remote.lua URL rtt|throughput [N] [inproc]")
local mode = arg[2] or "rtt"
local N = tonumber(arg[3]) or (mode == "rtt" and 2000 or 20000)
local inproc = arg[4] == "inproc"
local WINDOW = 256
local WORKERS = tonumber(os.getenv("BENCH_REMOTE_WORKERS")) or 2 -- the host's
local here = (arg[0]:match("^(.*)/[^/]*$") or ".")
local classes_file = here .. "/remote_classes.lua"
local classes = dofile(classes_file)

local host, serving
if inproc then
  serving = corral.serve { url = url, classes = classes, workers = WORKERS }
else
  -- the binary running this script serves; its own process group, ended
  -- (SIGTERM, then SIGKILL) when its future is cancelled
  local exe = arg[-1] or "corral"
  host = corral.exec({ exe, "serve", "--nats", url, "--workers", tostring(WORKERS),
    "--mode", os.getenv("BENCH_REMOTE_MODE") or "thread", classes_file },
    { capture = false, kill_grace = 2 })
end

local conn = corral.connect { url = url }
local pool = classes.echo:options { mode = "remote", connection = conn, pool = "echo",
  max_queued = 1024 }:init()

local function stop()
  pool:stop()
  conn:close()
  if serving then serving:stop { drain = false } end
  if host then
    host:cancel()
    pcall(host.result, host) -- settled once the whole group is over
  end
end

-- the host answers (a call sent before it attached waits in the stream)
local first = pool:echo("ready")
corral.wait(host and { first, host } or { first }, { timeout = 30, return_when = "FIRST_COMPLETED" })
if not first:done() or first:exception() or first:result() ~= "ready" then
  local why = first:done() and tostring(first:exception()) or
    (host and host:done() and "it exited" or "no answer in 30 s")
  stop()
  error("the host did not answer: " .. why, 0)
end

local arg16 = "0123456789abcdef"
if mode == "rtt" then
  for _ = 1, 200 do pool:echo(arg16):result() end -- warm-up
  local d = {}
  for i = 1, N do
    local t0 = corral.now()
    local r = pool:echo(arg16):result()
    d[i] = corral.now() - t0
    assert(r == arg16)
  end
  table.sort(d)
  stop()
  print(("remote_round_trip_us %.1f"):format(d[math.floor(N / 2) + 1] * 1e6))
else
  local function run(n)
    local left = n
    local function client()
      while left > 0 do
        left = left - 1
        assert(pool:echo(arg16):result() == arg16)
      end
    end
    local ts = {}
    local t0 = corral.now()
    for i = 1, WINDOW do ts[i] = corral.spawn(client) end
    corral.gather(ts)
    return n / (corral.now() - t0)
  end
  run(math.min(N, 2000)) -- warm-up
  local rate = run(N)
  stop()
  print(("remote_calls_per_s %.0f"):format(rate))
end
