--- The interactive REPL's Lua half: chunks made of lines, each run as a task,
-- values printed, completion, and the colon commands. The terminal half
-- (libedit, the prompt, output printed above it) is in `src/main.c`, which
-- calls these functions between two steps of the loop, never inside one.
-- @module corral.repl
local core = require "corral.core"
local corral = require "corral"
local sched = require "corral.sched"
local future = require "corral.future"

local M = {}

local pending = nil     -- the lines of an unfinished chunk
local running = nil     -- the future of the line being run
local interrupted = false -- a Ctrl-C at the prompt, for the terminal half
local stop_requested = false

-- ---- printing values -----------------------------------------------------

local MAX_DEPTH, MAX_ITEMS = 3, 40
-- keys sorted at most: a table with more shows some of them, unsorted (the
-- values are printed between two steps of the loop, which sorting a
-- million keys held for seconds, Ctrl-C unheard)
local SORT_MAX = 1000
local fmt

-- tostring that returns a string whatever the value's __tostring does
-- (raises, returns nil, a number or a table)
local function str(v)
  local s = sched.safe_tostring(v)
  if type(s) == "string" then return s end
  return ("(%s whose __tostring returned a %s)"):format(type(v), type(s))
end

local function is_ident(k)
  return type(k) == "string" and k:match("^[%a_][%w_]*$") ~= nil
end

local function pack(...) return { n = select("#", ...), ... } end

local function fmt_values(t, n, depth)
  local parts = {}
  for i = 1, n do parts[i] = fmt(t[i], depth) end
  return table.concat(parts, ", ")
end

local function fmt_future(f, depth)
  local s = f:done() and (f:cancelled() and "cancelled" or (f:exception() and "failed" or "done"))
    or (f:running() and "running" or "pending")
  if s == "done" then
    local ok, vals = pcall(function() return pack(f:result()) end)
    if not ok then return "<future done: (" .. str(vals) .. ")>" end
    if vals.n == 0 then return "<future done>" end
    return "<future done: " .. fmt_values(vals, vals.n, depth + 1) .. ">"
  elseif s == "failed" then
    local text = str(f:exception())
    return "<future failed: " .. (text:match("^[^\n]*")) .. ">"
  end
  return "<future " .. s .. ">"
end

local function key_before(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then return ta < tb end
  if ta == "string" or ta == "number" then return a < b end
  return str(a) < str(b)
end

local function fmt_table(t, depth, seen)
  if seen[t] then return "<cycle>" end
  if depth >= MAX_DEPTH then return "{...}" end
  seen[t] = true
  local parts, n = {}, #t
  for i = 1, math.min(n, MAX_ITEMS) do parts[#parts + 1] = fmt(t[i], depth + 1, seen) end
  local keys, more = {}, false
  for k in pairs(t) do
    if not (type(k) == "number" and k >= 1 and k <= n and k == math.floor(k)) then
      if #keys >= SORT_MAX then
        more = true
        break
      end
      keys[#keys + 1] = k
    end
  end
  if not more then pcall(table.sort, keys, key_before) end -- (unsorted if a __tostring is not consistent)
  for _, k in ipairs(keys) do
    if #parts >= MAX_ITEMS then break end
    local ks = is_ident(k) and k or ("[" .. fmt(k, MAX_DEPTH, seen) .. "]")
    parts[#parts + 1] = ks .. " = " .. fmt(t[k], depth + 1, seen)
  end
  if more or n + #keys > MAX_ITEMS then parts[#parts + 1] = "..." end
  seen[t] = nil
  if #parts == 0 then return "{}" end
  return "{ " .. table.concat(parts, ", ") .. " }"
end

--- A value as the REPL shows it: strings quoted, tables pretty-printed to a
-- depth of 3, futures as `<future done: 15>`, other objects by `tostring`.
function fmt(v, depth, seen)
  depth = depth or 0
  local t = type(v)
  if t == "string" then
    return ("%q"):format(v):gsub("\\\n", "\\n")
  elseif future.is_future(v) then
    return fmt_future(v, depth)
  elseif t == "table" then
    local mt = getmetatable(v) -- (a __metatable field may make it anything)
    if mt ~= nil and (type(mt) ~= "table" or rawget(mt, "__tostring") ~= nil) then return str(v) end
    return fmt_table(v, depth, seen or {})
  end
  return str(v)
end
M.format = fmt

-- ---- running lines ---------------------------------------------------------

local function incomplete(err)
  return err:sub(-7) == "'<eof>'"
end

-- The chunk of `src`: an expression (its values printed) or statements; nil
-- and "more" when it is unfinished, nil and the message when it is wrong.
local function compile(src)
  if src:sub(1, 1) == "=" then src = src:sub(2) end
  -- (`return select(1, expr)`, not `return expr`: a tail call would lose
  -- the line of an error raised by the expression itself)
  local f = loadstring("local select = ...; return select(1, " .. src .. "\n)", "=stdin")
  if f then return f, true end
  local err
  f, err = loadstring(src, "=stdin")
  if f then return f end
  if incomplete(err) then return nil, "more" end
  return nil, err
end

-- The frames of a traceback that say something (not the runtime's own).
local function useful_frames(tb)
  local keep = {}
  for l in tb:gmatch("[^\n]+") do
    if l:match("^%s+stdin:") or (l:match("^%s+[^%[%s]") and not l:match("corral/")) then
      keep[#keep + 1] = l
    end
  end
  return #keep > 0 and ("stack traceback:\n" .. table.concat(keep, "\n")) or nil
end

local function show_error(e, tb)
  local text = str(e)
  tb = tb and not text:find("stack traceback:", 1, true) and useful_frames(tb)
  if tb then text = text .. "\n" .. tb end
  io.stderr:write("error: ", text, "\n")
end

local HELP = [[
Each line runs as a task on the loop, which keeps running while you type:
workers, timers and callbacks go on, and what they print appears above the
prompt. An expression prints its value (`=expr` works too); an unfinished
chunk asks for more with `>>`.
  Ctrl-C     cancel the running line (or clear the line being typed)
  Ctrl-D     stop the workers and leave (as does corral.exit())
  Tab        complete globals, fields and methods
  :help      this text
  :stats     corral.stats(), one row per context
  :workers   the workers and their calls]]

local function cmd_stats()
  local rows = corral.stats()
  print(("%-16s %6s %7s %7s %8s %8s"):format("context", "tasks", "queued", "active", "encodes",
    "decodes"))
  for _, r in ipairs(rows) do
    print(("%-16s %6d %7d %7d %8d %8d"):format(r.name, r.tasks or 0, r.queued or 0, r.active or 0,
      r.encodes or 0, r.decodes or 0))
  end
end

local function cmd_workers()
  local rows, n = corral.stats(), 0
  for _, r in ipairs(rows) do
    if r.name ~= "home" then
      n = n + 1
      print(("%-16s %d queued, %d active%s"):format(r.name, r.queued or 0, r.active or 0,
        r.running and (", running " .. r.running) or ""))
    end
  end
  if n == 0 then print("no workers") end
end

local COMMANDS = { help = function() print(HELP) end, stats = cmd_stats, workers = cmd_workers }

--- Feed one line typed at the prompt: a colon command runs at once, an
-- unfinished chunk waits for more (`M.prompt` says so), a complete one runs
-- as a task (`M.poll` says when it is done).
function M.feed(line)
  if pending == nil then
    local cmd = line:match("^%s*:(%a+)%s*$")
    if cmd then
      local fn = COMMANDS[cmd]
      if fn then
        local ok, e = pcall(fn)
        if not ok then show_error(e) end
      else
        io.stderr:write("unknown command :", cmd, " (try :help)\n")
      end
      return
    end
    if line:match("^%s*$") then return end
  end
  local src = pending and (pending .. "\n" .. line) or line
  local fn, err = compile(src)
  local is_expr = err == true
  if not fn and err == "more" then
    pending = src
    return
  end
  pending = nil
  if not fn then
    io.stderr:write("error: ", err, "\n")
    return
  end
  running = is_expr and corral.spawn(fn, select) or corral.spawn(fn)
  running._quiet = true -- its failure is shown here, not reported at exit
end

--- Called after each step: shows the values or the error of a line that has
-- finished. Returns true while a line runs.
function M.poll()
  local f = running
  if f == nil then return false end
  if not f:done() then return true end
  running = nil
  if f:cancelled() then
    io.stderr:write("cancelled\n")
    return false
  end
  local e = f:exception()
  if e ~= nil then
    show_error(e, rawget(f, "_tb"))
    return false
  end
  local vals = pack(f:result())
  if vals.n > 0 then
    local parts = {}
    for i = 1, vals.n do parts[i] = fmt(vals[i]) end
    print(table.concat(parts, "\t"))
  end
  return false
end

--- The prompt: "> ", or ">> " inside an unfinished chunk.
function M.prompt() return pending and ">> " or "> " end

--- True once after a Ctrl-C that came while no line ran (the terminal half
-- clears the line being typed); the unfinished chunk is dropped too.
function M.take_interrupt()
  if not interrupted then return false end
  interrupted, pending = false, nil
  return true
end

-- ---- completion ------------------------------------------------------------

local function add_keys(t, out, seen, depth)
  if type(t) ~= "table" or seen[t] or depth > 4 then return end
  seen[t] = true
  for k in pairs(t) do
    if is_ident(k) and k:sub(1, 1) ~= "_" then out[k] = true end
  end
  if type(rawget(t, "_class")) == "table" then add_keys(rawget(t, "_class"), out, seen, depth + 1) end
  local mt = getmetatable(t)
  if type(mt) == "table" and type(rawget(mt, "__index")) == "table" then
    add_keys(rawget(mt, "__index"), out, seen, depth + 1)
  end
end

--- Completions of `word` (the text before the cursor, back to a space or
-- an operator): globals, or the fields and methods of `a.b.` / `a:`.
-- Walks tables by rawget and metatables' `__index` tables only: completing
-- runs no code of the script's.
function M.complete(word)
  local path, sep, last = word:match("^(.*)([%.:])([%w_]*)$")
  local t
  if path == nil then
    t, last, path = _G, word, ""
  else
    t = _G
    for name in path:gmatch("[^%.]+") do
      if type(t) ~= "table" then return {} end
      local v = rawget(t, name)
      if v == nil then
        local mt = getmetatable(t)
        local idx = type(mt) == "table" and rawget(mt, "__index")
        if type(idx) == "table" then v = rawget(idx, name) end
      end
      t = v
    end
    if type(t) == "userdata" then
      local mt = getmetatable(t)
      t = type(mt) == "table" and type(rawget(mt, "__index")) == "table" and rawget(mt, "__index") or nil
    end
    if type(t) ~= "table" then return {} end
    path = path .. sep
  end
  local keys = {}
  add_keys(t, keys, {}, 0)
  local out = {}
  for k in pairs(keys) do
    if k:sub(1, #last) == last then out[#out + 1] = path .. k end
  end
  table.sort(out)
  return out
end

-- ---- start and end ---------------------------------------------------------

--- Start the REPL: Ctrl-C now cancels the running line (or clears the
-- prompt's line) instead of ending the process. Returns the banner.
function M.start()
  rawset(_G, "corral", corral) -- at the prompt, corral is at hand
  core.catch_signals()
  sched.on_signal = function(sig)
    core.signal_rearm() -- the next Ctrl-C is handled too
    if sig ~= 2 then
      stop_requested = true
      return
    end
    if running == nil then
      interrupted = true
    elseif not running:done() then
      running:cancel()
    end -- (a line that has just ended: M.poll shows how, and the prompt is kept)
  end
  local v = corral.versions
  return ("corral %s (LuaJIT %s): each line runs as a task; :help for help, Ctrl-D to leave")
    :format(v.corral, v.luajit:gsub("^LuaJIT ", ""))
end

--- True after SIGTERM: the terminal half leaves as for Ctrl-D.
function M.stop_requested() return stop_requested end

--- Leave: the line still running is cancelled, and closing the runtime
-- then cancels the workers' calls instead of draining them.
function M.finish()
  if running ~= nil and not running:done() then running:cancel() end
  core.exit_fast()
end

return M
