-- Helpers shared by the specs: running the corral binary and the C tests.
local M = {}

M.build = os.getenv("CORRAL_BUILD") or "."
M.bin = M.build .. "/bin/corral"

-- Under the sanitizers the suite runs with the runtime in LD_PRELOAD; the
-- shell of os.execute must not get it (dash crashes under ThreadSanitizer),
-- so it is kept here and given back only to the luajit children that need it.
M.preload = os.getenv("LD_PRELOAD")
if M.preload then
  local ffi = require "ffi"
  ffi.cdef "int unsetenv(const char *name);"
  ffi.C.unsetenv("LD_PRELOAD")
end

local function tmpname()
  return os.tmpname()
end
M.tmpname = tmpname

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end
M.slurp = slurp

--- Run a shell command; returns stdout, stderr and the exit status.
function M.sh(cmd)
  local out, err = tmpname(), tmpname()
  local st = tmpname()
  -- (the shell's own word on a crashed command, "Segmentation fault", goes
  -- to err too, not to the test run's output)
  os.execute("{ (" .. cmd .. ") >" .. out .. " 2>" .. err .. "; echo $? >" .. st .. "; } 2>>" .. err)
  local o, e, code = slurp(out), slurp(err), tonumber(slurp(st))
  os.remove(out); os.remove(err); os.remove(st)
  return o, e, code
end

local function quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end
M.quote = quote

--- The command prefix that runs stock luajit with the module under test.
function M.luajit()
  return (M.preload and "LD_PRELOAD=" .. quote(M.preload) .. " " or "") ..
    "LUA_CPATH=" .. quote(M.build .. "/lib/?.so") .. " luajit"
end

--- Write `code` to a temporary script and run it with the corral binary.
function M.corral(code, args, prefix)
  local path = tmpname() .. ".lua"
  local f = assert(io.open(path, "w"))
  f:write(code)
  f:close()
  local o, e, c = M.sh((prefix or "") .. quote(M.bin) .. " " .. path .. " " .. (args or ""))
  os.remove(path)
  return o, e, c, path
end

--- Run a script with the corral binary, killed after `limit` seconds.
function M.run(code, limit)
  return M.corral(code, "", "timeout -s KILL " .. (limit or 30) .. " ")
end

--- Run a script with the corral binary; before signal k, wait (bounded)
-- until the script has created the file marker..k (arg[1] is the marker).
-- Returns stdout, stderr, the status and the milliseconds from the last
-- signal to the exit. The child is killed after 20 s whatever happens (not
-- by timeout(1): it changes how a second signal reaches the child).
function M.signal_script(script, sig, signals)
  local ready = tmpname()
  local path = tmpname() .. ".lua"
  local f = assert(io.open(path, "w"))
  f:write(script)
  f:close()
  local cmd = "t0=$(date +%s%N); " .. quote(M.bin) .. " " .. path .. " " .. ready
    .. " & pid=$!; (sleep 20; kill -KILL $pid 2>/dev/null) & wd=$!; "
  for k = 1, signals do
    cmd = cmd .. "i=0; while [ ! -e " .. ready .. k .. " ] && [ $i -lt 400 ]; " ..
      "do sleep 0.05; i=$((i+1)); done; t0=$(date +%s%N); kill -" .. sig .. " $pid; "
  end
  local out, err, code = M.sh(cmd .. "wait $pid; c=$?; kill $wd 2>/dev/null; "
    .. "echo $(( ($(date +%s%N) - t0) / 1000000 )); exit $c")
  os.remove(path)
  os.remove(ready)
  for k = 1, signals do os.remove(ready .. k) end
  local ms = tonumber(out:match("(%d+)\n$"))
  return (out:gsub("%d+\n$", "")), err, code, ms
end

--- Call f, which must raise: the kind of the corral error it raised (or
-- the raised value as a string), and the error itself.
function M.kind_of(f)
  local ok, e = pcall(f)
  assert(not ok, "expected an error, but it returned")
  local corral = require "corral"
  return corral.is_error(e) and e.kind or tostring(e), e
end

--- Write `code` to a new temporary .lua file; returns its path.
function M.write_script(code)
  local path = M.tmpname() .. ".lua"
  local f = assert(io.open(path, "w"))
  f:write(code)
  f:close()
  return path
end

--- Wait (bounded, driving corral's loop) until cond() holds.
function M.wait_until(cond, limit)
  local corral = require "corral"
  local deadline = corral.now() + (limit or 5)
  while not cond() do
    if corral.now() > deadline then error("condition not met in time", 2) end
    corral.sleep(0.002)
  end
end

--- Source of a function that counts the descriptors this process holds
-- open on `path` (a FIFO that corral.fs reads is opened at once, without
-- waiting for a writer, and read through the loop): specs wait for it to
-- know that a read has really started, in this process or in a child.
M.fifo_opens_src = [==[
return function(path)
  local ffi = require "ffi"
  pcall(ffi.cdef, "int getpid(void);")
  local n, ls = 0, io.popen("ls -l /proc/" .. ffi.C.getpid() .. "/fd 2>/dev/null")
  for l in ls:lines() do
    if l:sub(-#path - 4) == " -> " .. path then n = n + 1 end
  end
  ls:close()
  return n
end]==]
M.fifo_opens = assert(loadstring(M.fifo_opens_src))()

--- How many handles the worker named `name` has (corral.stats), or nil.
function M.handles(name)
  for _, r in ipairs(require("corral").stats()) do
    if r.name == name then return r.handles end
  end
end

--- Whether the process pid is gone: reaped (a zombie still has its /proc
-- entry).
function M.gone(pid)
  return not M.exists("/proc/" .. pid .. "/status")
end

--- Lua for a script (prefix it): `ffi` with getpid and kill, and
-- `children()`, the pids of this process's process workers (the children
-- of its threads that serve as one).
M.WORKER_CHILDREN = [[
  local ffi = require "ffi"
  pcall(ffi.cdef, "int getpid(void); int kill(int, int);")
  local function children()
    local pids = {}
    local p = io.popen("cat /proc/" .. ffi.C.getpid() .. "/task/*/children 2>/dev/null")
    for pid in p:read("*a"):gmatch("%d+") do
      local f = io.open("/proc/" .. pid .. "/cmdline")
      local cmd = f and f:read("*a") or ""
      if f then f:close() end
      if cmd:find("process_child", 1, true) then pids[#pids + 1] = tonumber(pid) end
    end
    p:close()
    return pids
  end
]]

--- Whether a file exists.
function M.exists(path)
  local f = io.open(path, "r")
  if f then f:close() end
  return f ~= nil
end

--- Whether a worker of that name is still a context of the runtime (not
-- joined yet).
function M.alive(name)
  for _, r in ipairs(require("corral").stats()) do
    if r.name == name then return true end
  end
  return false
end

--- Run fn with io.stderr captured; returns what was written to it.
function M.capture_stderr(fn, ...)
  local real, got = io.stderr, {}
  rawset(io, "stderr", {
    write = function(self, ...)
      for _, x in ipairs({ ... }) do got[#got + 1] = tostring(x) end
      return self
    end,
    flush = function() end,
  })
  local ok, e = pcall(fn, ...)
  rawset(io, "stderr", real)
  if not ok then error(e, 0) end
  return table.concat(got)
end

--- n as k bytes, big-endian.
function M.be(n, k)
  local t = {}
  for i = k, 1, -1 do
    t[i] = string.char(n % 256)
    n = math.floor(n / 256)
  end
  return table.concat(t)
end

--- A RESULT frame as process.c writes it: length, type (4), id, state,
-- payload.
function M.result_frame(id, state, payload)
  local be = M.be
  local body = "\4" .. be(id, 8) .. string.char(state) .. be(#payload, 4) .. payload
  return be(#body, 4) .. body
end

--- The memfd descriptors (buffers in shared memory) this process holds.
function M.memfds()
  local ffi = require "ffi"
  pcall(ffi.cdef, "int getpid(void);")
  local p = io.popen("ls -l /proc/" .. ffi.C.getpid() .. "/fd 2>/dev/null | grep -c memfd")
  local n = tonumber(p:read("*a"))
  p:close()
  return n
end

--- Wait (bounded) until the buffers alive and the memfd descriptors of this
-- process are back to at most live0 and fd0 (buffers of earlier specs may
-- have been collected meanwhile), collecting garbage; then assert it.
function M.buffers_back(live0, fd0)
  local core = require "corral.core"
  M.wait_until(function()
    collectgarbage()
    collectgarbage()
    return core.buffer_live() <= live0 and M.memfds() <= fd0
  end, 30)
  assert(core.buffer_live() <= live0, "buffers left alive")
  assert(M.memfds() <= fd0, "memfd descriptors left open")
end

return M
