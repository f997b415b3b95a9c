--- The trace timeline: a Chrome trace-event file (JSON) of what every
-- context ran: a track per context (the home loop, each thread worker, each
-- process worker's child, which writes its events for its parent to merge:
-- see docs/trace.md), a slice per piece of a task (from a start or a resume to its next wait or
-- its end) and per call (named by its method, with the size of its encoded
-- arguments), and flow arrows from a call to where it ran and from a future
-- to the calls it was unwrapped into. Open the file in Perfetto
-- (ui.perfetto.dev) or chrome://tracing; docs/trace.md says how to read it.
--
-- Start it with `corral --trace out.json script.lua`, with the environment
-- variable `CORRAL_TRACE=out.json` (read when corral loads), or with
-- `corral.trace.start(path)` and `corral.trace.stop()`. A trace still
-- running when the process exits is written then.
--
-- Off, a trace costs one check of a flag at each hook (`M.on`); the hooks
-- (in corral.sched, corral.task, corral.worker_serve and
-- corral.worker_handle) call the functions below only when it is set.
-- @module corral.trace
local core = require "corral.core"

local now, slice, flow = core.trace_now, core.trace_slice, core.trace_flow
local trace_on, fid, newid = core.trace_on, core.trace_fid, core.trace_newid
local settled, unwrap = core.trace_settled, core.trace_unwrap
local type, rawget, getinfo, min = type, rawget, debug.getinfo, math.min

local M = {}

--- Whether a trace runs (the hooks' one check). In a worker's state it is
-- read again from C on each turn of its loop.
M.on = trace_on()

--- The name of this context's track ("main"; a worker's main names its own).
M.name = "main"

local tid -- this context's track, made at its first event

local function my_tid()
  if not tid then tid = core.trace_thread(M.name) end
  return tid
end

-- ---- ids -------------------------------------------------------------------

-- A future's id: its C half's address (the same in every context that
-- holds it), else a number of its own.
local ids = setmetatable({}, { __mode = "k" })
local function idof(f)
  local c = rawget(f, "_c")
  if c then
    local id = fid(c)
    if id then return id end
  end
  local id = ids[f]
  if not id then
    id = newid()
    ids[f] = id
  end
  return id
end
M.idof = idof

-- ---- names -----------------------------------------------------------------

local names = setmetatable({}, { __mode = "k" })

--- Name the slices of the tasks that run `fn` (else "task file:line").
function M.name_fn(fn, name) names[fn] = name end

local function task_name(t)
  if t._kind == "main" then return "main chunk" end
  if t._where then return t._where end -- ("init": a worker's init)
  local fn = t[5] -- (corral.fields FN: the task's function, until it ends)
  if type(fn) ~= "function" then return t._where or "task" end
  local n = names[fn]
  if not n then
    local info = getinfo(fn, "S")
    n = ("task %s:%d"):format(info.short_src, info.linedefined)
    names[fn] = n
  end
  return n
end

-- ---- tasks -----------------------------------------------------------------

--- A task starts or resumes: a piece of it begins.
function M.task_begin(t)
  if not t._tname then t._tname = task_name(t) end
  t._tts = now()
end

-- A piece of call `c`, from `s` to `e`, on track `me`; its first piece is
-- where the arrows into the call end (from the send, and from its inputs).
local function call_piece(me, c, s, e)
  slice(me, c.name, "call", s, e - s, c.id, c.bytes)
  if not c.first then return end
  c.first = false
  local mid = s + (e - s) / 2
  flow(me, "f", mid, c.id)
  local deps = c.deps
  if deps then for i = 1, #deps do unwrap(deps[i], me, mid) end end
end

-- End the pieces of the calls that run on task t (the innermost first),
-- then t's own: at a wait (`done` false) or at its end.
local function pieces_end(t, done)
  local t0 = t._tts
  if not t0 then return end
  local me = my_tid()
  local c = t._tcall
  while c do
    local s = c.start
    if s < t0 then s = t0 end
    call_piece(me, c, s, now())
    c = c.up
  end
  local e = now()
  slice(me, t._tname or "task", "task", t0, e - t0, nil, nil)
  if done then t._tts = nil end
end

--- A task waits (`done` false) or ends: the piece that ran ends.
function M.task_end(t, done)
  if done and t._tts then settled(idof(t), my_tid(), now()) end
  pieces_end(t, done)
end

-- ---- calls -----------------------------------------------------------------

--- A call is sent (by the caller's task): `t0` is when the send began,
-- `f` the call's future, `mode` the worker's. Its slice on the caller's
-- track, and the start of the arrow to where it runs (nothing for a sync
-- call, which runs inline).
function M.sent(method, f, t0, mode)
  if mode == "sync" then return end -- (it ran inline: its slice is on this track already)
  local me = my_tid()
  local e = now()
  local id = idof(f)
  slice(me, "call " .. method, "send", t0, e - t0, id, nil)
  -- (at its start: the worker may start the call before the send returns;
  -- a process worker's flow is drawn once its proxy has sent it to a child)
  local ts = t0 + min(0.001, (e - t0) / 2)
  if mode == "process" then core.trace_sent(id, me, ts) else flow(me, "s", ts, id) end
end

--- The method of a call starts on task `t` (the runner, or the caller's
-- task for a sync call; nil outside any task): `ib` is its instance's inbox
-- (see corral.worker_serve), `ninputs` how many inputs it has. Returns the
-- record for `call_end`.
function M.call_begin(t, method, call, ib, ninputs)
  local id, bytes, ds
  if type(call) == "userdata" then
    id, bytes, ds = core.trace_call(call) -- (a thread or process worker's: encoded)
  else
    id = idof(ib.own(call))
    if ninputs > 0 then
      local deps = ib.deps(call)
      ds = {}
      for i = 1, #deps do ds[i] = idof(deps[i]) end
    end
  end
  local c = { name = method, id = id, bytes = bytes, start = now(), first = true, deps = ds,
    up = t and t._tcall, t = t }
  if t then
    t._tcall = c
    if not t._tts then t._tts, t._tname = c.start, t._tname or task_name(t) end
  end
  return c
end

--- The method of call record `c` has returned: its future settles now.
function M.call_end(c)
  local me = my_tid()
  local t0 = now()
  settled(c.id, me, t0)
  local t = c.t
  local s = c.start
  if t and t._tts and s < t._tts then s = t._tts end
  call_piece(me, c, s, now())
  if t then t._tcall = c.up end
end

--- The time now, in the trace's clock (microseconds since its start).
M.now = now

-- ---- start and stop --------------------------------------------------------

--- Start writing a trace to `path` (created or truncated at once: a path
-- that cannot be written is an error here). The trace covers every context
-- of the process: the home loop and every thread worker, those running now
-- and those started later.
-- @string path the JSON file to write
-- @return true
-- @raise an error naming the path when it cannot be opened, or when a
-- trace already runs
function M.start(path)
  if type(path) ~= "string" then
    error("corral.trace.start: path: a string expected, got " .. type(path), 2)
  end
  local ok, err = core.trace_start(path)
  if not ok then error("corral.trace.start: " .. err, 2) end
  M.on = true
  return true
end

--- Stop the trace and write its file.
-- @return the number of events written, or false when no trace was running
-- @raise an error when the file cannot be written
function M.stop()
  M.on = false
  local ok, n = core.trace_stop()
  if ok == nil then error("corral.trace.stop: " .. n, 2) end
  if not ok then return false end
  return n
end

--- Whether a trace is being recorded.
function M.active() return trace_on() end

--- In a worker's loop: read again whether a trace runs (it may have
-- started or stopped since the last turn).
function M.refresh() M.on = trace_on() end

--- The public table, `corral.trace`: `start`, `stop` and `active`.
M.public = { start = M.start, stop = M.stop, active = M.active }

-- CORRAL_TRACE=file: trace from the start (not in a process worker's
-- child, which inherits the variable: the file is its parent's).
local env, child = os.getenv("CORRAL_TRACE"), os.getenv("CORRAL_PARENT_PID")
if child then
  -- a process worker's child started while its parent traces: it records
  -- its own events, written where the parent will read them at its end
  local spec = os.getenv("CORRAL_TRACE_CHILD")
  if spec and not M.on and core.trace_claim_env() then M.on = core.trace_start_child(spec) end
elseif env and env ~= "" and core.trace_claim_env() then
  if not M.on then
    local ok, err = core.trace_start(env)
    if ok then
      M.on = true
    else
      io.stderr:write("corral: CORRAL_TRACE: ", err, "\n")
    end
  end
end

return M
