--- The `corral` command: run a script or a string as the main task.
-- @module corral.cli
local core = require "corral.core"
local corral = require "corral"
local sched = require "corral.sched"
local task = require "corral.task"
local future = require "corral.future"
local S = require("corral.fields").S

local M = {}

local USAGE = [==[
usage: corral [options] [script [args...]]
  -e code   run the string `code` (before the script, if one is given;
            -e may be given more than once)
  --trace FILE  write a trace of the run to FILE (Chrome trace-event JSON:
            open it in ui.perfetto.dev; see docs/trace.md)
  -i        enter the interactive REPL after running the script
  -v        print versions (corral, LuaJIT, libuv, msgpack-c) and exit
  -h        show this help
With no script: the interactive REPL on a terminal, else standard input
is run as a script.

usage: corral serve --nats URL [serve options] classes.lua
  Serve the pools of classes.lua (it returns {pool = Class, ...}) to remote
  callers (docs/remote.md), until SIGINT or SIGTERM.
  --nats URL       the NATS server (else CORRAL_NATS_URL)
  --workers N      local workers per pool (default: one per CPU)
  --mode M         thread (default), process, or async (the calls run as
                   tasks of the host's own loop: for I/O-bound methods)
  --trust          run functions shipped with calls (CORRAL_TRUST_KEY)
  --ack-wait S     seconds before a silent host's calls go to another (30)
  --max-pending N  calls of a pool out at once, over all its hosts (1000)
  --user U --password P | --token T   credentials
  --ca FILE --cert FILE --key FILE    TLS
  --name NAME      the host's name, in errors and the server's list]==]

local function errf(...)
  io.stderr:write(...)
  io.stderr:flush()
end

-- What the workers still hold, for a report of what is stuck.
local function stuck_details()
  local lines = {}
  for _, row in ipairs(core.stats()) do
    if row.name ~= "home" and (row.active > 0 or row.running) then
      lines[#lines + 1] = ("  worker %s: %d call(s) unfinished%s\n"):format(row.name, row.active,
        row.running and (", running " .. row.running) or " (waiting for their inputs)")
    end
  end
  return table.concat(lines)
end

local SIGNAMES = { [2] = "interrupted", [15] = "terminated" }

--- Run the main task until it ends, then until nothing is pending.
-- Returns the process's exit status. With `interactive`, returns as soon
-- as the main task has ended (the REPL follows, with everything running).
function M.run_main(main, interactive)
  local signalled = nil
  sched.on_signal = function(sig)
    signalled = signalled or sig
    io.stdout:flush() -- a second signal ends the process without flushing
    io.stderr:flush()
    core.exit_fast() -- close by cancelling the workers' calls, not draining them
    if not main:done() then main:cancel() end
  end
  while not main:done() and sched.turn(true) do end
  if not main:done() then
    core.exit_fast()
    errf("corral: the main chunk is blocked on futures that nothing can settle\n", stuck_details())
    return 1
  end
  local s = main[S]
  if s == future.FAILED then
    if not interactive then core.exit_fast() end
    future.retrieve(main)
    local e = main._e
    local text = sched.safe_tostring(e)
    if not corral.is_error(e, "TaskError") then
      local tb = main._tb or rawget(e, "traceback")
      if tb then text = text .. "\n" .. tb end
    end
    errf("corral: ", text, "\n")
    return 1
  elseif s == future.CANCELLED then
    future.retrieve(main)
    if signalled then
      errf("corral: ", SIGNAMES[signalled] or ("signal " .. signalled), "\n")
      return 128 + signalled
    end
    errf("corral: the main task was cancelled\n")
    return 1
  end
  if interactive then return 0 end
  sched.wind_down = 1 -- workers asked to stop get a second once nothing else can go on
  while not signalled and sched.turn(true) do end
  if signalled then
    errf("corral: ", SIGNAMES[signalled] or ("signal " .. signalled), "\n")
    return 128 + signalled
  end
  if sched.stuck == "stopping" then
    core.exit_fast()
    errf("corral: the main chunk has returned, but workers asked to stop are still running\n",
      stuck_details())
    return 1
  elseif sched.stuck or task.live() > 0 then
    core.exit_fast()
    errf(("corral: the main chunk has returned, but %d task(s) and %d call(s) or future(s) can "
      .. "never finish: blocked on futures that nothing can settle\n"):format(task.live(),
      sched.ext_pending()), stuck_details())
    return 1
  end
  return 0
end

-- `corral serve ...`: the options, then the classes file. Returns the
-- main function, or nil and the usage error.
local SERVE_FLAGS = { ["--nats"] = "url", ["--workers"] = "workers", ["--mode"] = "mode",
  ["--ack-wait"] = "ack_wait", ["--max-pending"] = "max_pending", ["--user"] = "user",
  ["--password"] = "password", ["--token"] = "token", ["--ca"] = "ca", ["--cert"] = "cert",
  ["--key"] = "key", ["--name"] = "name" }
local NUMERIC = { workers = true, ack_wait = true, max_pending = true }

local function serve_main(argv)
  local o, i = {}, 2
  while argv[i] and argv[i]:sub(1, 2) == "--" do
    local a = argv[i]
    if a == "--trust" then
      o.trust = true
      i = i + 1
    elseif SERVE_FLAGS[a] and argv[i + 1] then
      local k, v = SERVE_FLAGS[a], argv[i + 1]
      if NUMERIC[k] then
        v = tonumber(v)
        if not v then return nil, ("%s wants a number (got %q)"):format(a, argv[i + 1]) end
      end
      o[k] = v
      i = i + 2
    else
      return nil, ("unknown or incomplete option %s"):format(a)
    end
  end
  local file = argv[i]
  if not file or argv[i + 1] then return nil, "one classes file is wanted" end
  if o.ca or o.cert or o.key then o.tls = { ca = o.ca, cert = o.cert, key = o.key } end
  o.ca, o.cert, o.key = nil, nil, nil
  return function()
    local chunk, err = loadfile(file)
    if not chunk then error(err, 0) end
    o.classes = chunk()
    if type(o.classes) ~= "table" then
      error(("corral serve: %s must return a table of pool name -> worker class (got %s)"):format(
        file, type(o.classes)), 0)
    end
    local srv = corral.serve(o)
    io.stderr:write(("corral serve: %s serving %s\n"):format(srv.name, table.concat((function()
      local t = {}
      for name in pairs(srv.pools) do t[#t + 1] = name end
      table.sort(t)
      return t
    end)(), ", ")))
    io.stderr:flush()
    local ok, e = pcall(srv.wait, srv)
    srv:stop { drain = true }
    if not ok then error(e, 0) end
  end
end

--- Entry point: `argv` as the C main gives it (argv[0] is the program).
-- Returns the exit status, and "repl" when the C half is to start the REPL.
function M.main(argv)
  if argv[1] == "serve" then
    local main, why = serve_main(argv)
    if not main then
      errf("corral serve: ", why, "\n", USAGE, "\n")
      return 1
    end
    core.exit_ends_process(true)
    core.catch_signals()
    local t = task.spawn(main)
    t._kind = "main"
    return M.run_main(t)
  end
  local i, codes, interactive = 1, {}, false
  while argv[i] do
    local a = argv[i]
    if a == "-v" or a == "--version" then
      local v = corral.versions
      print(("corral %s  (LuaJIT %s, libuv %s, msgpack-c %s)"):format(v.corral,
        v.luajit:gsub("^LuaJIT ", ""), v.libuv, v.msgpack))
      return 0
    elseif a == "-h" or a == "--help" then
      print(USAGE)
      return 0
    elseif a == "-e" then
      codes[#codes + 1] = argv[i + 1]
      if not argv[i + 1] then errf(USAGE, "\n"); return 1 end
      i = i + 2
    elseif a == "-i" then
      interactive = true
      i = i + 1
    elseif a == "--trace" then -- the trace timeline (corral.trace, docs/trace.md)
      if not argv[i + 1] then errf(USAGE, "\n"); return 1 end
      local ok, e = pcall(corral.trace.start, argv[i + 1])
      if not ok then
        errf("corral: --trace: ", (tostring(e):gsub("^corral%.trace%.start: ", "")), "\n")
        return 1
      end
      i = i + 2
    elseif a == "--" then
      i = i + 1
      break
    elseif a:sub(1, 1) == "-" and a ~= "-" then
      errf("corral: unknown option ", a, "\n", USAGE, "\n")
      return 1
    else
      break
    end
  end
  local script = argv[i]
  if script then i = i + 1 end
  if not script and #codes == 0 and core.isatty(0) then interactive = true end
  -- `arg` as luajit sets it: arg[0] the script, arg[1..] its arguments,
  -- negative indices the interpreter and its options.
  local arg, script_at = {}, i - 1
  for j = 0, #argv do arg[j - script_at] = argv[j] end
  if #codes > 0 and not script then arg[0] = "-e" end
  rawset(_G, "arg", arg)

  -- the -e strings first, each its own chunk (as luajit runs them), then
  -- the script
  local chunks = {}
  for k = 1, #codes do
    local c, e = loadstring(codes[k], "=(command line)")
    if not c then
      errf("corral: ", e, "\n")
      return 1
    end
    chunks[k] = c
  end
  local chunk, err
  if interactive and not script and #codes == 0 then
    return 0, "repl"
  elseif #codes > 0 and not script then
    chunk = function() end
  elseif script and script ~= "-" then
    chunk, err = loadfile(script)
  else
    chunk, err = loadstring(io.read("*a"), "=stdin")
  end
  if not chunk then
    errf("corral: ", err, "\n")
    return 1
  end
  core.exit_ends_process(true) -- corral.exit in the script ends the process
  core.catch_signals()
  local body = chunk
  if #chunks > 0 then
    body = function(...)
      for k = 1, #chunks do chunks[k]() end
      return chunk(...)
    end
  end
  local main = task.spawn(body, unpack(arg, 1, #arg))
  main._kind = "main"
  if interactive then return M.run_main(main, true), "repl" end
  return M.run_main(main)
end

return M
