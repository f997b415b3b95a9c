-- Helpers shared by the specs: running the corral binary and the C tests.
local M = {}

M.build = os.getenv("CORRAL_BUILD") or "."
M.bin = M.build .. "/bin/corral"

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

return M
