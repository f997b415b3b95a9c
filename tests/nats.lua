-- A real `nats-server -js` for the specs (remote workers, issue 13).
--
-- `start(opts)` runs `nats-server -js -a 127.0.0.1 -p -1` in a fresh
-- temporary directory (its ports file and JetStream store are there), as a
-- child of this process (posix_spawnp), and waits, with a bound and no fixed
-- sleep, until the ports file names the port and a TCP connect to it
-- succeeds. It returns
--   { url, port, dir, pid, user, password, tls, ca, log, stop = function }
-- or nil and the reason (no nats-server, it exited, no port within the bound;
-- TLS asked for without the `openssl` CLI) so that a spec can `pending(reason)`.
--
-- `stop()` sends SIGTERM, waits (bounded) for the exit, then SIGKILL; it
-- reaps the child and removes the directory. It can be called twice. A spec
-- must call it in `after_each`, which busted runs even when the test fails:
--
--   local nats = require "nats"
--   local srv
--   after_each(function() if srv then srv.stop(); srv = nil end end)
--   it("...", function()
--     local why
--     srv, why = nats.start{ user = "u", password = "p" }
--     if not srv then return pending(why) end
--     ...
--   end)
--
-- `nats.stop_all()` stops every server still running (for a `teardown`).
local ffi = require "ffi"

local M = {}

local function cdef(s) pcall(ffi.cdef, s) end
-- one declaration a call: a spec may have declared one already (another way)
cdef "typedef struct { int allocated, used; void *actions; int pad[16]; } corral_nats_fa;"
cdef [[int posix_spawnp(int *pid, const char *file, const corral_nats_fa *fa, const void *attr,
                       char *const argv[], char *const envp[]);]]
cdef "int posix_spawn_file_actions_init(corral_nats_fa *fa);"
cdef "int posix_spawn_file_actions_destroy(corral_nats_fa *fa);"
cdef [[int posix_spawn_file_actions_addopen(corral_nats_fa *fa, int fd, const char *path,
                                           int oflag, unsigned mode);]]
cdef "extern char **environ;"
cdef "int kill(int pid, int sig);"
cdef "int waitpid(int pid, int *status, int options);"
cdef "char *mkdtemp(char *template);"
cdef "int poll(void *fds, unsigned long nfds, int timeout);"
cdef "int socket(int domain, int type, int protocol);"
cdef "int connect(int fd, const void *addr, unsigned len);"
cdef "int close(int fd);"
cdef "struct corral_nats_sin { uint16_t family; uint16_t port; uint32_t addr; uint8_t zero[8]; };"
local C = ffi.C

local SIGKILL, SIGTERM, WNOHANG = 9, 15, 1
local O_RDONLY, O_WRONLY, O_CREAT, O_TRUNC = 0, 1, 64, 512

local function sleep_ms(ms) C.poll(nil, 0, ms) end

local function shq(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

--- The absolute path of an executable on PATH, or nil.
function M.which(name)
  for d in (os.getenv("PATH") or ""):gmatch("[^:]+") do
    local p = d .. "/" .. name
    local f = io.open(p, "rb")
    if f then
      f:close()
      if os.execute("test -x " .. shq(p)) == 0 then return p end
    end
  end
  return nil
end

--- True when a TCP connect to 127.0.0.1:port succeeds (LuaJIT FFI, no nc).
function M.can_connect(port)
  local fd = C.socket(2, 1, 0) -- AF_INET, SOCK_STREAM
  if fd < 0 then return false end
  local sa = ffi.new("struct corral_nats_sin")
  sa.family = 2
  sa.port = bit.rshift(bit.bswap(port), 16)
  sa.addr = bit.bswap(0x7f000001)
  local ok = C.connect(fd, ffi.cast("void *", sa), ffi.sizeof(sa)) == 0
  C.close(fd)
  return ok
end

-- pid's state: "running", or "exited" once reaped (by us, now or before).
local function reap(pid)
  local st = ffi.new("int[1]")
  local r = C.waitpid(pid, st, WNOHANG)
  if r == 0 then return "running" end
  return "exited"
end

--- True while a process with this pid exists and is not a zombie.
function M.process_exists(pid)
  local s = slurp("/proc/" .. pid .. "/stat")
  if not s then return false end
  return not s:match("^%d+ %b() Z")
end

local function spawn(argv, log, extra_env)
  local fa = ffi.new("corral_nats_fa")
  C.posix_spawn_file_actions_init(fa)
  C.posix_spawn_file_actions_addopen(fa, 0, "/dev/null", O_RDONLY, 0)
  C.posix_spawn_file_actions_addopen(fa, 1, log, O_WRONLY + O_CREAT + O_TRUNC, 420)
  C.posix_spawn_file_actions_addopen(fa, 2, log, O_WRONLY + O_CREAT + O_TRUNC, 420)
  local cargv = ffi.new("char *[?]", #argv + 1)
  local keep = {}
  for i, a in ipairs(argv) do
    keep[i] = ffi.new("char[?]", #a + 1, a)
    cargv[i - 1] = keep[i]
  end
  cargv[#argv] = nil
  -- the environment, less LD_PRELOAD (a sanitizer runtime under make test-asan)
  local envs, i = {}, 0
  while C.environ[i] ~= nil do
    local e = ffi.string(C.environ[i])
    local k = e:match("^([^=]*)=")
    if k ~= "LD_PRELOAD" and not (extra_env and extra_env[k]) then envs[#envs + 1] = e end
    i = i + 1
  end
  for k, v in pairs(extra_env or {}) do envs[#envs + 1] = k .. "=" .. v end
  local cenv = ffi.new("char *[?]", #envs + 1)
  for j, e in ipairs(envs) do
    keep[#keep + 1] = ffi.new("char[?]", #e + 1, e)
    cenv[j - 1] = keep[#keep]
  end
  cenv[#envs] = nil
  local pid = ffi.new("int[1]")
  local rc = C.posix_spawnp(pid, argv[1], fa, nil, cargv, cenv)
  C.posix_spawn_file_actions_destroy(fa)
  if rc ~= 0 then return nil, "posix_spawnp " .. argv[1] .. ": error " .. rc end
  return pid[0]
end

local function tls_files(dir)
  if not M.which("openssl") then
    return nil, "TLS: the openssl CLI is not installed (no certificates made)"
  end
  local cmd = table.concat({
    "cd " .. shq(dir),
    "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
      .. " -keyout ca.key -out ca.pem -days 1 -subj /CN=corral-test-ca",
    "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
      .. " -keyout server.key -out server.csr -subj /CN=127.0.0.1",
    "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > san.ext",
    "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial"
      .. " -out server.pem -days 1 -extfile san.ext",
  }, " && ")
  if os.execute("(" .. cmd .. ") >" .. shq(dir .. "/openssl.log") .. " 2>&1") ~= 0 then
    return nil, "TLS: openssl failed: " .. (slurp(dir .. "/openssl.log") or "")
  end
  return { ca = dir .. "/ca.pem", cert = dir .. "/server.pem", key = dir .. "/server.key" }
end

local running = {}

--- Start a server. opts: user, password (both or neither), tls (boolean),
-- timeout (seconds to wait for the port, 10). Returns the server table, or
-- nil and the reason.
function M.start(opts)
  opts = opts or {}
  local bin = M.which("nats-server")
  if not bin then return nil, "nats-server is not installed (scripts/install-deps installs it)" end
  local tmpl = ffi.new("char[?]", 64, (os.getenv("TMPDIR") or "/tmp") .. "/corral-nats-XXXXXX")
  if C.mkdtemp(tmpl) == nil then return nil, "mkdtemp failed" end
  local dir = ffi.string(tmpl)
  local function fail(why)
    os.execute("rm -rf " .. shq(dir))
    return nil, why
  end
  local argv = { bin, "-js", "-a", "127.0.0.1", "-p", "-1", "--ports_file_dir", dir,
                 "-sd", dir .. "/js" }
  local srv = { dir = dir, log = dir .. "/server.log", user = opts.user, password = opts.password }
  if opts.user then
    argv[#argv + 1] = "--user"; argv[#argv + 1] = opts.user
    argv[#argv + 1] = "--pass"; argv[#argv + 1] = opts.password or ""
  end
  if opts.tls then
    local files, why = tls_files(dir)
    if not files then return fail(why) end
    srv.ca, srv.cert, srv.key, srv.tls = files.ca, files.cert, files.key, true
    argv[#argv + 1] = "--tls"
    argv[#argv + 1] = "--tlscert"; argv[#argv + 1] = files.cert
    argv[#argv + 1] = "--tlskey"; argv[#argv + 1] = files.key
  end
  local pid, why = spawn(argv, srv.log)
  if not pid then return fail(why) end
  srv.pid = pid
  local done = false
  -- end the server process (SIGTERM, then SIGKILL after 5 s)
  local function halt()
    if reap(srv.pid) == "running" then
      C.kill(srv.pid, SIGTERM)
      for _ = 1, 500 do -- 5 s
        if reap(srv.pid) ~= "running" then break end
        sleep_ms(10)
      end
      if reap(srv.pid) == "running" then
        C.kill(srv.pid, SIGKILL)
        C.waitpid(srv.pid, nil, 0)
      end
    end
  end
  function srv.stop()
    if done then return end
    done = true
    running[srv] = nil
    halt()
    os.execute("rm -rf " .. shq(dir))
  end
  running[srv] = true
  -- wait for the server's port (and for it to take connections)
  local function await(p, want)
    local portsfile = dir .. "/nats-server_" .. p .. ".ports"
    local steps = math.floor((opts.timeout or 10) * 100)
    for _ = 1, steps do
      if reap(p) ~= "running" then
        return nil, "nats-server exited at start: " .. (slurp(srv.log) or ""):sub(-400)
      end
      local ports = slurp(portsfile)
      local port = ports and tonumber(ports:match('"nats":%s*%[%s*"[%w]+://[^:"]+:(%d+)"'))
      if port and (want == nil or port == want) and M.can_connect(port) then return port end
      sleep_ms(10)
    end
    return nil, "nats-server gave no port within " .. (opts.timeout or 10) .. " s"
  end
  local port, werr = await(pid)
  if not port then
    srv.stop()
    return nil, werr
  end
  srv.port = port
  srv.url = (opts.tls and "tls" or "nats") .. "://127.0.0.1:" .. port
  --- Stop the server (SIGTERM: what JetStream stored stays on disk) and
  -- start it again on the same port and store. True, or nil and why.
  function srv.restart()
    halt()
    argv[6] = tostring(srv.port) -- (-p)
    local p2, err = spawn(argv, srv.log)
    if not p2 then return nil, err end
    srv.pid = p2
    local got, e2 = await(p2, srv.port)
    if not got then return nil, e2 end
    return true
  end
  return srv
end

--- Start a program (argv[1] found on PATH) with stdin /dev/null and stdout
-- and stderr to `log`, the environment plus `env` (a table). Returns its
-- pid, or nil and why. Reap it with M.finish.
function M.spawn(argv, log, env)
  return spawn(argv, log, env)
end

--- Send `sig` (default SIGKILL) to pid and reap it (waiting up to 5 s
-- after a SIGTERM before a SIGKILL).
function M.finish(pid, sig)
  if reap(pid) ~= "running" then return end
  C.kill(pid, sig or SIGKILL)
  for _ = 1, 500 do
    if reap(pid) ~= "running" then return end
    sleep_ms(10)
  end
  C.kill(pid, SIGKILL)
  C.waitpid(pid, nil, 0)
end

--- Whether pid runs still (reaping it once it has ended).
function M.running(pid) return reap(pid) == "running" end

M.slurp = slurp

--- What the remote specs share, for the classes file at `path` (whose
-- table is `classes`): `server(opts)` (nil when none can start: `skip`
-- says why, printed once), `host(srv, tag, extra, env)` (a `corral serve`
-- process of that file, 1 worker, --ack-wait 1, HOSTTAG=tag, waited for
-- until it serves), `kill_hosts()`, and `pool(conn, o)` (the pool "sq").
function M.fixture(spec, path, classes)
  local h = require "helper"
  local fx = { hosts = {} }
  function fx.server(opts)
    local s, why = M.start(opts)
    if not s then
      fx.skip = why
      print(spec .. ": skipped: " .. tostring(why))
    end
    return s
  end
  function fx.host(srv, tag, extra, env)
    local log = h.tmpname()
    local argv = { h.bin, "serve", "--nats", srv.url, "--workers", "1", "--ack-wait", "1" }
    for _, a in ipairs(extra or {}) do argv[#argv + 1] = a end
    argv[#argv + 1] = path
    local e = { HOSTTAG = tag }
    for k, v in pairs(env or {}) do e[k] = v end
    local pid = assert(M.spawn(argv, log, e))
    local x = { pid = pid, log = log, tag = tag }
    fx.hosts[#fx.hosts + 1] = x
    h.wait_until(function()
      assert(M.running(pid), "the host ended: " .. slurp(log))
      return (slurp(log) or ""):find("serving", 1, true) ~= nil
    end, 20)
    return x
  end
  function fx.kill_hosts()
    for _, x in ipairs(fx.hosts) do M.finish(x.pid) end
    fx.hosts = {}
  end
  function fx.pool(conn, o)
    local opts = { mode = "remote", connection = conn, pool = "sq" }
    for k, v in pairs(o or {}) do opts[k] = v end
    return classes.sq:options(opts):init()
  end
  return fx
end

--- Stop every server started here and not stopped yet.
function M.stop_all()
  for srv in pairs(running) do srv.stop() end
end

return M
