--- A small pseudo-terminal driver for the specs: runs a command on a new
-- pty as its controlling terminal, types into it, and waits for text to
-- appear on the screen (escape sequences stripped), as a person would.
local ffi = require "ffi"

local M = {}

local function cdef(s) pcall(ffi.cdef, s) end
cdef "int posix_openpt(int flags);"
cdef "int grantpt(int fd);"
cdef "int unlockpt(int fd);"
cdef "char *ptsname(int fd);"
cdef "long read(int fd, void *buf, unsigned long n);"
cdef "long write(int fd, const void *buf, unsigned long n);"
cdef "int close(int fd);"
cdef "int kill(int pid, int sig);"
cdef "struct corral_pollfd { int fd; short events; short revents; };"
cdef "int poll(struct corral_pollfd *fds, unsigned long n, int timeout);"
cdef "struct corral_winsize { unsigned short row, col, xpixel, ypixel; };"
cdef "int ioctl(int fd, unsigned long req, ...);"
cdef "struct corral_timespec { long sec, nsec; };"
cdef "int clock_gettime(int clk, struct corral_timespec *ts);"

local O_RDWR, O_NOCTTY, O_CLOEXEC = 2, 256, 524288
local TIOCSWINSZ = 0x5414
local C = ffi.C

local function now()
  local ts = ffi.new("struct corral_timespec")
  C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.sec) + tonumber(ts.nsec) * 1e-9
end

local Pty = {}
Pty.__index = Pty

local function shq(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

--- Start `argv` (a list of words) on a new pty, with `env` (a table of
-- variables) added. The command's exit status appears on the screen as
-- `[exit N]` once it ends.
function M.spawn(argv, env)
  local fd = C.posix_openpt(O_RDWR + O_NOCTTY + O_CLOEXEC)
  assert(fd >= 0, "posix_openpt failed")
  assert(C.grantpt(fd) == 0 and C.unlockpt(fd) == 0, "grantpt/unlockpt failed")
  local ws = ffi.new("struct corral_winsize", 40, 200, 0, 0)
  C.ioctl(fd, TIOCSWINSZ, ws)
  local slave = ffi.string(C.ptsname(fd))
  local words = {}
  for k, v in pairs(env or {}) do words[#words + 1] = k .. "=" .. shq(v) end
  for _, a in ipairs(argv) do words[#words + 1] = shq(a) end
  -- sh becomes the session leader; opening the pty makes it the session's
  -- controlling terminal, and the command runs in sh's process group (so
  -- Ctrl-C reaches it). sh itself ignores SIGINT, to report the status.
  local script = ("exec 0<>%s 1>&0 2>&0; trap '' INT; echo \"[pid $$]\"; env TERM=xterm %s; "
    .. "echo \"[exit $?]\""):format(slave, table.concat(words, " "))
  os.execute("setsid sh -c " .. shq(script) .. " </dev/null >/dev/null 2>&1 &")
  local p = setmetatable({ fd = fd, raw = "", mark = 1 }, Pty)
  local pid = p:expect("%[pid (%d+)%]", 10)
  p.pgid = tonumber(pid)
  return p
end

local function strip(s)
  s = s:gsub("\27%[[%d;?]*[%a@]", ""):gsub("\27[%(%)][%w]", ""):gsub("\27[=>]", "")
  return (s:gsub("[\r\7]", ""))
end

--- Read what arrives during `ms` milliseconds (not a synchronisation: the
-- specs wait with `expect`; this only shows more on a failure).
function Pty:drain(ms)
  local deadline = now() + ms / 1000
  repeat self:pump(20) until self.eof or now() > deadline
end

-- Read what has arrived, waiting up to `ms` milliseconds for it.
function Pty:pump(ms)
  local pfd = ffi.new("struct corral_pollfd[1]")
  pfd[0].fd, pfd[0].events = self.fd, 1
  if C.poll(pfd, 1, ms) <= 0 then return false end
  local buf = ffi.new("char[4096]")
  local n = C.read(self.fd, buf, 4096)
  if n <= 0 then
    self.eof = true
    return false
  end
  self.raw = self.raw .. ffi.string(buf, n)
  return true
end

--- The screen since the last `expect` (or all of it), escapes stripped.
function Pty:screen(all)
  local text = strip(self.raw)
  return all and text or text:sub(self.mark)
end

--- Wait until `pat` (a Lua pattern; plain text with `plain`) appears after
-- the last match; returns its captures. Fails with the screen after
-- `timeout` seconds.
function Pty:expect(pat, timeout, plain)
  local deadline = now() + (timeout or 20)
  while true do
    local text = strip(self.raw)
    local s, e, c1, c2 = text:find(pat, self.mark, plain)
    if s then
      self.mark = e + 1
      return c1 or text:sub(s, e), c2
    end
    if self.eof or now() > deadline then
      error(("expected %q on the screen; it shows:\n%s"):format(pat, strip(self.raw)), 2)
    end
    self:pump(100)
  end
end

--- Type `s` (control characters included: "\3" is Ctrl-C, "\4" Ctrl-D).
function Pty:send(s)
  assert(C.write(self.fd, s, #s) == #s, "write to the pty failed")
end

--- Type a line at a REPL and wait for its next prompt (`prompt`, "> " by
-- default); returns what the line printed, with a newline at its end.
function Pty:line(s, prompt)
  self:send(s .. "\r")
  self:expect(s, 20, true) -- the echo
  local m = self.mark
  local pr = "\n" .. (prompt or "> ")
  self:expect(pr, 30, true)
  return self:screen(true):sub(m, self.mark - 1 - #pr) .. "\n"
end

--- Kill what is still running and close the pty.
function Pty:close()
  if self.pgid then C.kill(-self.pgid, 9) end
  if self.fd then C.close(self.fd) end
  self.fd = nil
end

--- A REPL fixture for a describe block: `before_each(r.setup)` makes a
-- fresh HOME (its history file), `after_each(r.teardown)` closes the pty
-- and removes it; `r.start(args)` runs `bin args` on a pty with that HOME
-- and returns it past its banner and first prompt.
function M.repl(bin)
  local r = {}
  function r.setup()
    r.home = os.tmpname()
    os.remove(r.home)
    assert(os.execute("mkdir -p " .. r.home) == 0)
  end
  function r.teardown()
    if r.p then r.p:close() end
    r.p = nil
    os.execute("rm -rf " .. r.home)
  end
  function r.start(args)
    if r.p then r.p:close() end
    local argv = { bin }
    for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
    r.p = M.spawn(argv, { HOME = r.home })
    r.p:expect("Ctrl-D to leave", 20, true)
    r.p:expect("> ", 20, true)
    return r.p
  end
  return r
end

return M
