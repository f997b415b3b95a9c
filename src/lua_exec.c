/* lua_exec.c: corral.exec in C: a command in its own process group on the
 * calling context's loop, its output captured and split into lines.
 *
 * A command is a record (exec_op) that starts with its corral_post: Lua
 * holds the post's address as the key it waits under. The record is posted
 * when lines are ready (for `on_line`) and once more when the command is over:
 * it exited and its handles (the process, the output pipes, the input) are
 * closed. Lua then takes the result (`exec_result`), which frees it. The
 * process group (the child calls setsid: UV_PROCESS_DETACHED) is what a
 * cancel, a timeout or the context's close ends (`exec_kill`, the drop).
 * Everything runs on the context's own thread, but for one leaf lock:
 * `groups_lock`, over the list of groups that exit() kills.
 *
 * Input is written through a descriptor of our own, under a SIGPIPE guard:
 * a command that exits without reading it must not raise SIGPIPE in the
 * host (whose disposition is not ours to change).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "internal.h"

extern char **environ;

/* ======================================================================== */
/* The record                                                                */
/* ======================================================================== */

typedef struct {
  char *p;
  size_t len, cap;
} xbuf;

static int xbuf_add(xbuf *b, const void *d, size_t n) {
  if (b->cap - b->len < n) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len < n)
      cap *= 2;
    char *p = realloc(b->p, cap);
    if (p == NULL) return UV_ENOMEM;
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, d, n);
  b->len += n;
  return 0;
}

struct exec_op;

typedef struct {
  uv_pipe_t pipe;
  struct exec_op *o;
  int stream; /* 1 stdout, 2 stderr */
  int open;
  xbuf all;  /* captured */
  xbuf part; /* the line not ended yet */
} outlet;

typedef struct exec_op {
  corral_post post; /* first: Lua's key */
  corral_context *ctx;
  uv_process_t proc;
  outlet out[2];
  uv_poll_t in; /* the write end of the command's input */
  int in_fd;    /* -1 when closed */
  int in_open;  /* the poll handle is not closed */
  char *in_data;
  size_t in_len, in_off;
  int capture, lines;
  int handles; /* handles not closed yet */
  int exited;
  int64_t code;
  int sig;
  int err; /* a read error on an output (negated errno), or 0 */
  int pid;
  uint64_t t0, t1;
  xbuf queued;   /* lines for Lua: [stream byte][u32 length][bytes] ... */
  int abandoned; /* the context closed: the last close frees it */
  queue running; /* in `groups` while its group may be alive (under groups_lock) */
} exec_op;

/* ======================================================================== */
/* Groups alive at exit                                                      */
/* ======================================================================== */

/* Every command's group that may be alive, in any context: a process that
 * ends through exit() (corral.exit, os.exit) kills them at exit. */
static uv_mutex_t groups_lock;
static queue groups;
static uv_once_t groups_once = UV_ONCE_INIT;

static void kill_all_groups(void *unused) {
  (void)unused;
  uv_mutex_lock(&groups_lock);
  for (queue *q = queue_head(&groups); q != &groups; q = q->next) {
    exec_op *o = queue_data(q, exec_op, running);
    kill(-o->pid, SIGKILL);
  }
  uv_mutex_unlock(&groups_lock);
}

/* Registered as atexit does it, with this object's handle: when the module
 * is unloaded first (a Lua host's lua_close closes its C modules), the
 * handler runs then, not later from unmapped code. (Called directly: a
 * sanitizer's atexit wrapper drops the handle.) */
extern void *__dso_handle __attribute__((visibility("hidden")));
int __cxa_atexit(void (*fn)(void *), void *arg, void *dso);

static void groups_init(void) {
  uv_mutex_init(&groups_lock);
  queue_init(&groups);
  __cxa_atexit(kill_all_groups, NULL, __dso_handle);
}

static void group_add(exec_op *o) {
  uv_once(&groups_once, groups_init);
  uv_mutex_lock(&groups_lock);
  queue_insert_tail(&groups, &o->running);
  uv_mutex_unlock(&groups_lock);
}

static void group_remove(exec_op *o) {
  if (o->pid <= 0) return;
  uv_mutex_lock(&groups_lock);
  queue_remove(&o->running);
  uv_mutex_unlock(&groups_lock);
}

static void op_free(exec_op *o) {
  group_remove(o);
  for (int i = 0; i < 2; i++) {
    free(o->out[i].all.p);
    free(o->out[i].part.p);
  }
  free(o->queued.p);
  free(o->in_data);
  free(o);
}

static int over(exec_op *o) { return o->exited && o->handles == 0; }

static void on_closed(uv_handle_t *h) {
  exec_op *o = h->data;
  o->handles--;
  if (o->handles > 0) return;
  if (o->abandoned) {
    op_free(o);
    return;
  }
  if (o->exited) corral__ctx_io_wake(o->ctx, &o->post);
}

static void close_handle(exec_op *o, uv_handle_t *h) {
  h->data = o;
  uv_close(h, on_closed);
}

/* ======================================================================== */
/* Output                                                                    */
/* ======================================================================== */

static void queue_line(exec_op *o, int stream, const char *s, size_t n) {
  if (n > 0 && s[n - 1] == '\r') n--;
  unsigned char hdr[5] = {(unsigned char)stream, (unsigned char)(n >> 24), (unsigned char)(n >> 16),
                          (unsigned char)(n >> 8), (unsigned char)n};
  if (xbuf_add(&o->queued, hdr, 5) != 0 || xbuf_add(&o->queued, s, n) != 0) o->err = UV_ENOMEM;
}

/* Split what came into lines (a partial one waits in `part`). */
static void split(outlet *t, const char *d, size_t n) {
  exec_op *o = t->o;
  size_t start = 0;
  for (size_t i = 0; i < n; i++) {
    if (d[i] != '\n') continue;
    if (t->part.len > 0) {
      if (xbuf_add(&t->part, d + start, i - start) != 0) o->err = UV_ENOMEM;
      queue_line(o, t->stream, t->part.p, t->part.len);
      t->part.len = 0;
    } else {
      queue_line(o, t->stream, d + start, i - start);
    }
    start = i + 1;
  }
  if (start < n && xbuf_add(&t->part, d + start, n - start) != 0) o->err = UV_ENOMEM;
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b) {
  (void)h;
  (void)hint;
  static __thread char slab[65536]; /* (one read at a time per thread) */
  *b = uv_buf_init(slab, sizeof slab);
}

static void outlet_close(outlet *t) {
  if (!t->open) return;
  t->open = 0;
  exec_op *o = t->o;
  if (o->lines && t->part.len > 0) {
    queue_line(o, t->stream, t->part.p, t->part.len);
    t->part.len = 0;
  }
  close_handle(o, (uv_handle_t *)&t->pipe);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
  outlet *t = s->data;
  exec_op *o = t->o;
  if (n < 0) {
    if (n != UV_EOF && o->err == 0) o->err = (int)n;
    outlet_close(t);
    if (o->lines && o->queued.len > 0) corral__ctx_io_wake(o->ctx, &o->post);
    return;
  }
  if (n == 0) return;
  if (o->capture && xbuf_add(&t->all, b->base, (size_t)n) != 0) o->err = UV_ENOMEM;
  if (o->lines) {
    split(t, b->base, (size_t)n);
    if (o->queued.len > 0) corral__ctx_io_wake(o->ctx, &o->post);
  }
}

/* ======================================================================== */
/* Input                                                                     */
/* ======================================================================== */

static void input_close(exec_op *o) {
  if (o->in_fd >= 0) {
    close(o->in_fd);
    o->in_fd = -1;
  }
  if (o->in_open) {
    o->in_open = 0;
    uv_poll_stop(&o->in);
    close_handle(o, (uv_handle_t *)&o->in);
  }
}

/* write(2) with SIGPIPE held back on this thread: a command that closed its
 * input gives EPIPE, and the signal (if it was not pending before) is taken
 * off again before the mask is restored. */
static ssize_t write_nosigpipe(int fd, const char *d, size_t n) {
  sigset_t pipe_set, old, pending;
  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  sigpending(&pending);
  int was_pending = sigismember(&pending, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
  ssize_t r = write(fd, d, n);
  int e = errno;
  if (r < 0 && e == EPIPE && !was_pending) {
    struct timespec zero = {0, 0};
    while (sigtimedwait(&pipe_set, NULL, &zero) < 0 && errno == EINTR) {
    }
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  errno = e;
  return r;
}

static void on_writable(uv_poll_t *h, int status, int events) {
  (void)events;
  exec_op *o = h->data;
  while (status == 0 && o->in_off < o->in_len) {
    ssize_t r = write_nosigpipe(o->in_fd, o->in_data + o->in_off, o->in_len - o->in_off);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return; /* wait for room */
    if (r < 0) break; /* EPIPE: the command does not read it */
    o->in_off += (size_t)r;
  }
  input_close(o);
}

/* ======================================================================== */
/* The process                                                               */
/* ======================================================================== */

static void on_exit_cb(uv_process_t *p, int64_t code, int sig) {
  exec_op *o = p->data;
  o->exited = 1;
  o->code = code;
  o->sig = sig;
  o->t1 = uv_hrtime();
  close_handle(o, (uv_handle_t *)p);
}

/* The environment: this process's, with `over` (a table at idx: name ->
 * string, or false to remove) applied. The new "name=value" strings are
 * anchored in the table at `strs` until uv_spawn returns. */
static char **make_env(lua_State *L, int idx, int strs) {
  int n = 0;
  while (environ[n] != NULL)
    n++;
  int extra = 0;
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    extra++;
    lua_pop(L, 1);
  }
  char **env = malloc(sizeof(char *) * (size_t)(n + extra + 1));
  if (env == NULL) return NULL;
  int k = 0;
  for (int i = 0; i < n; i++) {
    const char *eq = strchr(environ[i], '=');
    size_t nl = eq != NULL ? (size_t)(eq - environ[i]) : strlen(environ[i]);
    lua_pushlstring(L, environ[i], nl);
    lua_rawget(L, idx);
    int replaced = !lua_isnil(L, -1);
    lua_pop(L, 1);
    if (!replaced) env[k++] = environ[i];
  }
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    if (lua_type(L, -1) == LUA_TSTRING) {
      /* "name=value", kept alive in the table's own string slot */
      lua_pushvalue(L, -2);
      lua_pushliteral(L, "=");
      lua_pushvalue(L, -3);
      lua_concat(L, 3);
      lua_rawseti(L, strs, (int)lua_objlen(L, strs) + 1);
    }
    lua_pop(L, 1);
  }
  int m = (int)lua_objlen(L, strs);
  for (int i = 1; i <= m; i++) {
    lua_rawgeti(L, strs, i);
    env[k++] = (char *)lua_tostring(L, -1); /* (anchored in the table) */
    lua_pop(L, 1);
  }
  env[k] = NULL;
  return env;
}

static void exec_drop(corral_post *p);

static void push_error(lua_State *L, int rc) {
  lua_pushnil(L);
  lua_pushstring(L, uv_err_name(rc));
  lua_pushstring(L, uv_strerror(rc));
}

/* exec_start(argv, cwd, env, stdin, capture, lines): the key to wait under,
 * and the pid; or nil, the error's name and message. argv: a list of
 * strings; env: nil or name -> string|false; stdin: nil or a string. */
static int l_exec_start(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  const char *cwd = luaL_optstring(L, 2, NULL);
  int has_env = !lua_isnoneornil(L, 3);
  size_t in_len = 0;
  const char *in = luaL_optlstring(L, 4, NULL, &in_len);
  int capture = lua_toboolean(L, 5), lines = lua_toboolean(L, 6);
  lua_settop(L, 6);
  int argc = (int)lua_objlen(L, 1);
  if (argc < 1) return luaL_argerror(L, 1, "an empty command");
  char **args = malloc(sizeof(char *) * (size_t)(argc + 1));
  if (args == NULL) return luaL_error(L, "out of memory");
  for (int i = 1; i <= argc; i++) {
    lua_rawgeti(L, 1, i);
    args[i - 1] = (char *)lua_tostring(L, -1); /* (anchored in argv: checked by the caller) */
    lua_pop(L, 1);
  }
  args[argc] = NULL;
  char **env = NULL;
  if (has_env) {
    lua_newtable(L); /* at 7: the "name=value" strings */
    env = make_env(L, 3, 7);
    if (env == NULL) {
      free(args);
      return luaL_error(L, "out of memory");
    }
  }
  exec_op *o = calloc(1, sizeof *o);
  if (o == NULL) {
    free(args);
    free(env);
    return luaL_error(L, "out of memory");
  }
  o->ctx = corral__ctx_of(L);
  o->capture = capture;
  o->lines = lines;
  o->in_fd = -1;
  uv_loop_t *loop = &o->ctx->loop;
  uv_stdio_container_t stdio[3];
  int fds[2] = {-1, -1};
  if (in != NULL) {
    if (pipe2(fds, O_CLOEXEC) != 0) {
      int rc = uv_translate_sys_error(errno);
      free(args);
      free(env);
      op_free(o);
      push_error(L, rc);
      return 3;
    }
    stdio[0].flags = UV_INHERIT_FD;
    stdio[0].data.fd = fds[0];
  } else {
    stdio[0].flags = UV_IGNORE;
  }
  for (int i = 0; i < 2; i++) {
    outlet *t = &o->out[i];
    t->o = o;
    t->stream = i + 1;
    if (capture || lines) {
      uv_pipe_init(loop, &t->pipe, 0);
      t->pipe.data = t;
      t->open = 1;
      stdio[1 + i].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
      stdio[1 + i].data.stream = (uv_stream_t *)&t->pipe;
    } else {
      stdio[1 + i].flags = UV_INHERIT_FD;
      stdio[1 + i].data.fd = 1 + i;
    }
  }
  uv_process_options_t po;
  memset(&po, 0, sizeof po);
  po.file = args[0];
  po.args = args;
  po.env = env;
  po.cwd = cwd;
  po.exit_cb = on_exit_cb;
  po.stdio = stdio;
  po.stdio_count = 3;
  po.flags = UV_PROCESS_DETACHED; /* setsid: its own process group */
  o->proc.data = o;
  o->t0 = uv_hrtime();
  int rc = uv_spawn(loop, &o->proc, &po);
  free(args);
  free(env);
  if (fds[0] >= 0) close(fds[0]);
  o->handles = 1;
  for (int i = 0; i < 2; i++)
    o->handles += o->out[i].open;
  if (rc != 0) {
    if (fds[1] >= 0) close(fds[1]);
    o->abandoned = 1; /* the closes free it */
    o->exited = 1;
    close_handle(o, (uv_handle_t *)&o->proc);
    for (int i = 0; i < 2; i++)
      if (o->out[i].open) {
        o->out[i].open = 0;
        close_handle(o, (uv_handle_t *)&o->out[i].pipe);
      }
    push_error(L, rc);
    return 3;
  }
  o->pid = o->proc.pid;
  group_add(o);
  for (int i = 0; i < 2; i++)
    if (o->out[i].open) uv_read_start((uv_stream_t *)&o->out[i].pipe, on_alloc, on_read);
  if (fds[1] >= 0) {
    o->in_fd = fds[1];
    fcntl(o->in_fd, F_SETFL, fcntl(o->in_fd, F_GETFL) | O_NONBLOCK);
    o->in_data = malloc(in_len > 0 ? in_len : 1);
    if (o->in_data != NULL) memcpy(o->in_data, in, in_len);
    o->in_len = o->in_data != NULL ? in_len : 0;
    if (uv_poll_init(loop, &o->in, o->in_fd) == 0) {
      o->in_open = 1;
      o->in.data = o;
      o->handles++;
      uv_poll_start(&o->in, UV_WRITABLE, on_writable);
    } else {
      input_close(o);
    }
  }
  o->post.drop = exec_drop;
  corral__ctx_io_begin(o->ctx, &o->post);
  lua_pushlightuserdata(L, o);
  lua_pushinteger(L, o->pid);
  return 2;
}

/* Send sig to the command's process group (and the command itself): true
 * when something received it. */
static int kill_group(exec_op *o, int sig) {
  if (o->pid <= 0) return 0;
  int any = kill(-o->pid, sig) == 0;
  if (!o->exited) any |= kill(o->pid, sig) == 0;
  return any;
}

/* The context closes with the command running: it is killed (its group
 * too) and reaped here, and the record goes with its last handle. */
static void exec_drop(corral_post *p) {
  exec_op *o = (exec_op *)p;
  corral__ctx_io_end(o->ctx, p);
  kill_group(o, SIGKILL);
  if (!o->exited) {
    o->exited = 1;
    while (waitpid(o->pid, NULL, 0) < 0 && errno == EINTR) {
    }
    close_handle(o, (uv_handle_t *)&o->proc);
  }
  for (int i = 0; i < 2; i++)
    outlet_close(&o->out[i]);
  input_close(o);
  o->abandoned = 1;
  if (o->handles == 0) op_free(o);
}

/* ======================================================================== */
/* Lua functions                                                             */
/* ======================================================================== */

static exec_op *op_arg(lua_State *L) {
  luaL_checktype(L, 1, LUA_TLIGHTUSERDATA);
  return lua_touserdata(L, 1);
}

/* exec_take(key): the lines that came (a list: stream, line, stream,
 * line...; or nil) and whether the command is over. */
static int l_exec_take(lua_State *L) {
  exec_op *o = op_arg(L);
  corral__ctx_unpost(o->ctx, &o->post);
  if (o->queued.len == 0) {
    lua_pushnil(L);
  } else {
    lua_newtable(L);
    int n = 0;
    const unsigned char *q = (const unsigned char *)o->queued.p;
    size_t at = 0;
    while (at + 5 <= o->queued.len) {
      size_t len = ((size_t)q[at + 1] << 24) | ((size_t)q[at + 2] << 16) |
                   ((size_t)q[at + 3] << 8) | q[at + 4];
      lua_pushstring(L, q[at] == 1 ? "stdout" : "stderr");
      lua_rawseti(L, -2, ++n);
      lua_pushlstring(L, (const char *)q + at + 5, len);
      lua_rawseti(L, -2, ++n);
      at += 5 + len;
    }
    o->queued.len = 0;
  }
  lua_pushboolean(L, over(o));
  return 2;
}

/* exec_result(key): {code=, signal=, stdout=, stderr=, elapsed=, pid=} of a
 * command that is over, and the read error's message (or nil). Frees it. */
static int l_exec_result(lua_State *L) {
  exec_op *o = op_arg(L);
  if (!over(o)) return luaL_error(L, "exec_result: the command is still running");
  corral__ctx_io_end(o->ctx, &o->post);
  lua_createtable(L, 0, 6);
  if (o->sig != 0) {
    lua_pushinteger(L, o->sig);
    lua_setfield(L, -2, "signal");
  } else {
    lua_pushnumber(L, (double)o->code);
    lua_setfield(L, -2, "code");
  }
  if (o->capture) {
    lua_pushlstring(L, o->out[0].all.p != NULL ? o->out[0].all.p : "", o->out[0].all.len);
    lua_setfield(L, -2, "stdout");
    lua_pushlstring(L, o->out[1].all.p != NULL ? o->out[1].all.p : "", o->out[1].all.len);
    lua_setfield(L, -2, "stderr");
  }
  lua_pushnumber(L, (double)(o->t1 - o->t0) * 1e-9);
  lua_setfield(L, -2, "elapsed");
  lua_pushinteger(L, o->pid);
  lua_setfield(L, -2, "pid");
  if (o->err != 0)
    lua_pushstring(L, uv_strerror(o->err));
  else
    lua_pushnil(L);
  op_free(o);
  return 2;
}

/* exec_kill(key, signum): signal the command's process group; true when
 * something received it. */
static int l_exec_kill(lua_State *L) {
  exec_op *o = op_arg(L);
  lua_pushboolean(L, kill_group(o, (int)luaL_checkinteger(L, 2)));
  return 1;
}

/* Whether a process of the group g is alive (not a zombie), from /proc. */
static int group_alive(pid_t g) {
  DIR *d = opendir("/proc");
  if (d == NULL) return kill(-g, 0) == 0 || errno == EPERM;
  int alive = 0;
  struct dirent *e;
  while (!alive && (e = readdir(d)) != NULL) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    char path[300], buf[512];
    snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
    FILE *f = fopen(path, "r");
    if (f == NULL) continue;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *rp = strrchr(buf, ')'); /* after the command's name */
    char state;
    int ppid, pgrp;
    if (rp != NULL && sscanf(rp + 1, " %c %d %d", &state, &ppid, &pgrp) == 3)
      alive = pgrp == g && state != 'Z' && state != 'X';
  }
  closedir(d);
  return alive;
}

/* exec_release(key): stop reading the command's output and input (what
 * holds them now is outside its group: the command is over for us once its
 * process has exited). */
static int l_exec_release(lua_State *L) {
  exec_op *o = op_arg(L);
  for (int i = 0; i < 2; i++)
    outlet_close(&o->out[i]);
  input_close(o);
  return 0;
}

/* group_alive(pgid): whether a process of that group is alive, a zombie
 * aside (the specs' check that a command left nothing behind). */
static int l_group_alive(lua_State *L) {
  pid_t g = (pid_t)luaL_checkinteger(L, 1);
  lua_pushboolean(L, g > 0 && group_alive(g));
  return 1;
}

const luaL_Reg corral__lua_exec_funcs[] = {{"exec_start", l_exec_start},
                                           {"exec_take", l_exec_take},
                                           {"exec_result", l_exec_result},
                                           {"exec_kill", l_exec_kill},
                                           {"exec_release", l_exec_release},
                                           {"group_alive", l_group_alive},
                                           {NULL, NULL}};
