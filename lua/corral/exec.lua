--- Commands in their own process group: `corral.exec`.
--
--     local r = corral.exec({ "ls", "-l" }):result()
--     print(r.code, r.stdout)
--     corral.exec({ "make" }, { on_line = function(stream, line) print(stream, line) end })
--
-- `argv` is a list of strings run without a shell (ask for one with
-- `{ "sh", "-c", cmd }`). The command runs in a process group of its own
-- (a new session): a cancel of its future, or its `timeout`, ends the whole
-- group (SIGTERM, then SIGKILL after `kill_grace` seconds), and the future
-- settles only once the command is over. When the runtime closes with a
-- command still running, its group gets SIGKILL.
-- @module corral.exec
local core = require "corral.core"
local errors = require "corral.errors"
local sched = require "corral.sched"
local task = require "corral.task"
local fs = require "corral.fs"

local type, pcall, error, concat = type, pcall, error, table.concat
local now = core.now
local start, take, result, kill = core.exec_start, core.exec_take, core.exec_result, core.exec_kill
local release = core.exec_release
local waiter, block, expect, unexpect = sched.waiter, sched.block, sched.expect, sched.unexpect
local WOKE, TIMEOUT, CANCEL = sched.WOKE, sched.TIMEOUT, sched.CANCEL
local SIGTERM, SIGKILL = 15, 9
local RELEASE_AFTER = 0.5 -- seconds from SIGKILL until what still holds its output is let go

local M = {}

local OPTIONS = { cwd = true, env = true, stdin = true, timeout = true, capture = true,
  on_line = true, kill_grace = true }

-- The command as people read it, for messages.
local function show(argv)
  local s = concat(argv, " ")
  if #s > 80 then s = s:sub(1, 77) .. "..." end
  return "'" .. s .. "'"
end

local function check(argv, o)
  local fname = "corral.exec"
  errors.check(type(argv) == "table" and #argv >= 1, fname, "argv",
    "a list of strings (no shell: ask for one with {\"sh\", \"-c\", cmd})", argv)
  for i = 1, #argv do
    if type(argv[i]) ~= "string" or argv[i]:find("\0", 1, true) then
      errors.check(false, fname, "argv[" .. i .. "]", "a string without NUL bytes", argv[i])
    end
  end
  errors.check(type(o) == "table", fname, "opts", "a table", o)
  errors.check_options(fname, o, OPTIONS)
  errors.check(o.cwd == nil or (type(o.cwd) == "string" and not o.cwd:find("\0", 1, true)), fname,
    "cwd", "a string without NUL bytes", o.cwd)
  errors.check(o.stdin == nil or type(o.stdin) == "string", fname, "stdin", "a string", o.stdin)
  errors.check(o.timeout == nil or (type(o.timeout) == "number" and o.timeout >= 0), fname,
    "timeout", "a number of seconds >= 0", o.timeout)
  errors.check(o.kill_grace == nil or (type(o.kill_grace) == "number" and o.kill_grace >= 0),
    fname, "kill_grace", "a number of seconds >= 0", o.kill_grace)
  errors.check(o.on_line == nil or type(o.on_line) == "function", fname, "on_line",
    "a function (stream, line)", o.on_line)
  errors.check(o.capture == nil or type(o.capture) == "boolean", fname, "capture", "a boolean",
    o.capture)
  if o.env ~= nil then
    errors.check(type(o.env) == "table", fname, "env", "a table of name = string|false", o.env)
    for k, v in pairs(o.env) do
      if type(k) ~= "string" or k == "" or k:find("[=%z]") or (type(v) ~= "string" and v ~= false)
          or (type(v) == "string" and v:find("\0", 1, true)) then
        errors.check(false, fname, "env", "a table of name = string|false (names without '=')",
          o.env)
      end
    end
  end
end

-- Lines for `on_line`, called in a task of their own (a waiting on_line
-- does not hold up the command's deadline): `push` queues them, `close`
-- says no more will come, `stop` cancels the task.
local function line_feeder(on_line, on_error)
  local q, head, tail = {}, 1, 0
  local closed, idle, me, stopping = false, false, nil, false
  local t = task.spawn(function()
    me = waiter()
    while true do
      if head > tail then
        if closed or stopping then return end
        idle = true
        local tok = block(me)
        idle = false
        if tok == CANCEL then return end
      else
        local stream, line = q[head], q[head + 1]
        q[head], q[head + 1] = nil, nil
        head = head + 2
        local ok, e = pcall(on_line, stream, line)
        if not ok then
          if not stopping then on_error(e) end
          return
        end
      end
    end
  end)
  local function poke()
    if idle then sched.wake(me, WOKE) end
  end
  return {
    push = function(lines)
      for i = 1, #lines do q[tail + i] = lines[i] end
      tail = tail + #lines
      poke()
    end,
    close = function() closed = true; poke() end,
    stop = function() stopping = true; t:cancel() end,
    task = t,
  }
end

-- Wait for the task t to end, at most until `deadline` (or nil): false
-- when the time ran out; a cancel of the caller is raised.
local function join(t, deadline)
  while not t:done() do
    local left = deadline and math.max(0, deadline - now()) or nil
    local ok, e = pcall(t.result, t, left)
    if not ok then
      if errors.is_error(e, "TimeoutError") and not t:done() then return false end
      if errors.is_error(e, "CancelledError") and not t:done() then error(e, 0) end
    end
  end
  return true
end

-- Run the command to its end (a task): its result table.
local function run(argv, o)
  local capture = o.capture ~= false
  local key, pid, msg = start(argv, o.cwd, o.env, o.stdin, capture, o.on_line ~= nil)
  if key == nil then
    local where = o.cwd and (" in " .. o.cwd) or ""
    local e = fs.os_error("corral.exec", "cannot start " .. show(argv) .. where, pid, msg,
      "spawn", 3)
    e.path = argv[1]
    error(e, 0)
  end
  local grace = o.kill_grace or 2
  local deadline = o.timeout and now() + o.timeout
  local ended -- why we ended it: TIMEOUT, CANCEL, or the error of on_line
  local killed = false
  local w = waiter()
  local lines
  -- End the command: SIGTERM to its group, SIGKILL after the grace, and
  -- after a short while more, stop reading what still holds its output
  -- (a child that left the group).
  local function stop(why)
    if ended == nil then ended = why end
    if lines then lines.stop() end
    if key == nil then return end -- (over, and its record freed)
    if not killed and kill(key, SIGTERM) and grace > 0 then
      deadline, killed = now() + grace, "term"
    elseif killed ~= "kill" and killed ~= "released" then
      kill(key, SIGKILL)
      deadline, killed = now() + RELEASE_AFTER, "kill"
    else
      release(key)
      deadline, killed = nil, "released"
    end
  end
  if o.on_line then
    lines = line_feeder(o.on_line, function(e)
      stop(e)
      sched.wake(w, WOKE)
    end)
  end
  while true do
    local got, done = take(key)
    if got and lines and ended == nil then lines.push(got) end
    if done then break end
    expect(key, w)
    local tok = block(w, deadline)
    unexpect(key)
    if tok == TIMEOUT then
      stop(TIMEOUT)
    elseif tok == CANCEL then
      stop(CANCEL)
      ended = CANCEL -- (cancelled while it was being ended: the cancel is what is raised)
    end
  end
  -- what of its group outlived the SIGTERM without holding its output
  if ended ~= nil then kill(key, SIGKILL) end
  local r, read_err = result(key)
  key = nil
  r.pid = pid
  r.ok = r.code == 0
  if read_err then r.error = read_err end
  if lines and ended == nil then
    -- the last lines, within the command's time
    lines.close()
    local ok, in_time = pcall(join, lines.task, deadline)
    if not ok then
      lines.stop()
      error(in_time, 0)
    elseif not in_time then
      lines.stop()
      ended = TIMEOUT
    end
  end
  if ended == TIMEOUT then
    local e = errors.new("TimeoutError", ("corral.exec: %s timed out after %g s (its process "
      .. "group was ended)"):format(show(argv), o.timeout), nil, false)
    e.result = r
    error(e, 0)
  elseif ended == CANCEL then
    error(errors.cancelled(), 0)
  elseif ended ~= nil then
    error(ended, 0)
  end
  return r
end

--- Run a command; a future of its result.
-- @tparam {string,...} argv the program (looked up in `PATH`) and its arguments
-- @tparam[opt] table opts
--  `cwd` (the directory it runs in);
--  `env` (a table name = value merged onto this process's environment, `false` removes one);
--  `stdin` (a string written to its input, then closed; without it the input is `/dev/null`);
--  `timeout` (seconds: then its group is ended and the future fails with `TimeoutError`, whose
--  `result` has what the command wrote);
--  `capture` (default true: its output is kept in `stdout` and `stderr`; false: it goes to
--  this process's own, unless `on_line` takes it);
--  `on_line(stream, line)` (each line as it comes, `stream` is `"stdout"` or `"stderr"`, the
--  line without its newline; an error it raises ends the command and fails the future);
--  `kill_grace` (seconds between SIGTERM and SIGKILL when it is ended; default 2).
-- @return a future of `{ code =, signal =, ok =, stdout =, stderr =, elapsed =, pid = }`:
--  `code` the exit status (nil when a signal ended it), `signal` that signal's number,
--  `ok` whether the code is 0, `elapsed` seconds from start to exit. A command that cannot
--  start fails the future with `OSError` naming it.
function M.exec(argv, opts)
  opts = opts or {}
  check(argv, opts)
  local copy = {}
  for i = 1, #argv do copy[i] = argv[i] end
  return task.spawn(run, copy, opts)
end

--- Whether a process of the process group `pgid` is alive (a command's
-- `pid` is its group's id).
function M.group_alive(pgid) return core.group_alive(pgid) end

return M
