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
  os.execute("(" .. cmd .. ") >" .. out .. " 2>" .. err .. "; echo $? >" .. st)
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

return M
