--- Files on libuv's asynchronous operations: each call suspends only its
-- task (outside any task it drives the loop, like `corral.sleep`) and
-- returns the value.
--
--     local text = corral.fs.read("data.txt")
--     corral.fs.write("out.txt", text:upper())
--     for _, name in ipairs(corral.fs.list(".")) do print(name) end
--
-- A failure raises `OSError`, whose message names the path and the OS
-- error; its fields: `path`, `code` (`"ENOENT"`, ...), `call` (the system
-- call: `"open"`, `"read"`, ...). A task cancelled while it waits gets
-- `CancelledError` at once; the operation itself may still complete (a
-- write that was under way is not undone).
-- @module corral.fs
local core = require "corral.core"
local errors = require "corral.errors"
local sched = require "corral.sched"
local future = require "corral.future"

local type, error, sort = type, error, table.sort
local start, finish, abandon = core.fs_start, core.fs_finish, core.fs_abandon
local waiter, block, expect, unexpect = sched.waiter, sched.block, sched.expect, sched.unexpect
local WOKE = sched.WOKE

local M = {}

--- An `OSError` for `fname` on `path`.
-- @local
function M.os_error(fname, path, code, msg, call, level)
  local e = errors.new("OSError", ("%s: %s: %s (%s)"):format(fname, path, msg, code), nil,
    level and level + 1 or 2)
  e.path, e.code, e.call = path, code, call
  return e
end
local os_error = M.os_error

local function check_mode(fname, mode)
  errors.check(mode == nil or (type(mode) == "number" and mode >= 0 and mode <= 4095
    and mode == math.floor(mode)), fname, "mode", "a whole number from 0 to 0o7777", mode)
end

-- opts: nil, or a table of these options with a valid `mode`.
local function check_opts(fname, opts, allowed)
  if opts == nil then return end
  errors.check(type(opts) == "table", fname, "opts", "a table", opts)
  errors.check_options(fname, opts, allowed)
  check_mode(fname, opts.mode)
end

local WRITE_OPTIONS, MKDIR_OPTIONS = { append = true, mode = true }, { parents = true, mode = true }

local function check_path(fname, path)
  errors.check(type(path) == "string" and path ~= "" and not path:find("\0", 1, true), fname,
    "path", "a non-empty string without NUL bytes", path)
end

-- Start an operation and wait for it: its results, or nil, the error's
-- code, message and system call.
local function try(fname, op, path, data, mode)
  local key, code, msg = start(op, path, data, mode)
  if key == nil then return nil, code, msg, op end
  local w = waiter()
  expect(key, w)
  local tok = block(w)
  if tok ~= WOKE then
    unexpect(key)
    abandon(key)
    future.raise_token(tok, fname)
  end
  return finish(key)
end

-- The same, raising an OSError.
local function run(fname, op, path, data, mode)
  local r, t, msg, call = try(fname, op, path, data, mode)
  if r == nil then error(os_error(fname, path, t, msg, call, 3), 3) end
  return r, t
end

--- The whole content of the file at `path`, as a string.
function M.read(path)
  check_path("corral.fs.read", path)
  return (run("corral.fs.read", "read", path))
end

--- Write `data` (a string) to the file at `path`, created when missing
-- (mode 0666 less the umask) and truncated first unless `opts.append`.
-- Returns the number of bytes written.
-- @param path
-- @string data
-- @tparam[opt] table opts `append` (boolean), `mode` (number)
function M.write(path, data, opts)
  local fname = "corral.fs.write"
  check_path(fname, path)
  errors.check(type(data) == "string", fname, "data", "a string", data)
  check_opts(fname, opts, WRITE_OPTIONS)
  local append = opts and opts.append
  return (run(fname, append and "append" or "write", path, data, opts and opts.mode))
end

--- The names in the directory `dir`, sorted (without `.` and `..`), and a
-- table from each name to its type (`"file"`, `"directory"`, `"link"`,
-- ...).
function M.list(dir)
  check_path("corral.fs.list", dir)
  local names, types = run("corral.fs.list", "list", dir)
  sort(names)
  return names, types
end

--- A table about the file at `path` (links followed): `type` (`"file"`,
-- `"directory"`, ...), `size`, `mode`, `mtime`, `atime`, `ctime` (seconds,
-- with fractions), `uid`, `gid`, `nlink`, `ino`, `dev`.
function M.stat(path)
  check_path("corral.fs.stat", path)
  return (run("corral.fs.stat", "stat", path))
end

--- Whether something exists at `path` (false for a missing file; other
-- errors, such as a permission denied, are raised).
function M.exists(path)
  check_path("corral.fs.exists", path)
  local r, t, emsg = try("corral.fs.exists", "stat", path)
  if r ~= nil then return true end
  if t == "ENOENT" or t == "ENOTDIR" then return false end
  error(os_error("corral.fs.exists", path, t, emsg, "stat", 2), 2)
end

--- Make the directory `path` (mode 0777 less the umask); with
-- `opts.parents`, its missing parents too, and no error when it exists.
-- Returns true.
function M.mkdir(path, opts)
  local fname = "corral.fs.mkdir"
  check_path(fname, path)
  check_opts(fname, opts, MKDIR_OPTIONS)
  if not (opts and opts.parents) then return run(fname, "mkdir", path, nil, opts and opts.mode) end
  local at = path:sub(1, 1) == "/" and "/" or ""
  for part in path:gmatch("[^/]+") do
    at = at .. part
    local r, t, emsg = try(fname, "mkdir", at, nil, opts.mode)
    if r == nil and t ~= "EEXIST" then error(os_error(fname, at, t, emsg, "mkdir", 2), 2) end
    at = at .. "/"
  end
  -- (what exists there must be a directory, as with mkdir -p)
  local st = run(fname, "stat", path)
  if st.type ~= "directory" then
    error(os_error(fname, path, "EEXIST", "file exists and is not a directory", "mkdir", 2), 2)
  end
  return true
end

return M
