/* lua_fs.c: corral.fs in C: reads, writes, listings and stats on libuv's
 * asynchronous file operations, each on the calling context's own loop.
 *
 * An operation is a record (fs_op) that starts with its corral_post: Lua
 * holds the post's address as the key it waits under (sched.expect). The
 * record runs its steps (open, fstat, read..., close) through one uv_fs_t,
 * then posts itself; `fs_finish` pushes the result and frees it. A task that
 * gives up (a cancel) calls `fs_abandon`: the record is freed by its last
 * step instead. So is one still running when the context closes (its drop).
 * Everything here runs on the context's own thread: no lock.
 */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <lauxlib.h>
#include <lua.h>

#include "internal.h"

/* ======================================================================== */
/* The record                                                                */
/* ======================================================================== */

enum { OP_READ, OP_WRITE, OP_APPEND, OP_LIST, OP_STAT, OP_MKDIR };

typedef struct {
  corral_post post; /* first: Lua's key */
  corral_context *ctx;
  uv_fs_t req;
  int op;
  int running;      /* a uv_fs request is in flight */
  int abandoned;    /* nobody will finish it: its last step frees it */
  uv_file fd;       /* -1 when not open */
  int err;          /* a negated errno, or 0 */
  const char *call; /* the system call that failed */
  char *path;
  char *data; /* read: what was read; write: what is left to write */
  size_t len, cap, off;
  uv_stat_t st;
  char **names; /* list */
  int *types;
  size_t n;
  uv_pipe_t pipe; /* read: a FIFO or socket is read through the loop */
  int piped;      /* the pipe holds fd; open until its close callback */
} fs_op;

static void op_free(fs_op *o) {
  free(o->path);
  free(o->data);
  for (size_t i = 0; i < o->n; i++)
    free(o->names[i]);
  free(o->names);
  free(o->types);
  free(o);
}

static void step(uv_fs_t *req);

static void on_pipe_closed(uv_handle_t *h);

/* The operation is over (o->err says how): close what is open, then post. */
static void finish(fs_op *o) {
  if (o->piped == 1) { /* (finishes in the close callback) */
    o->piped = 2;
    uv_close((uv_handle_t *)&o->pipe, on_pipe_closed);
    return;
  }
  if (o->fd >= 0) {
    uv_fs_t req; /* (a close is quick: done in place) */
    uv_fs_close(NULL, &req, o->fd, NULL);
    uv_fs_req_cleanup(&req);
    o->fd = -1;
  }
  o->running = 0;
  if (o->abandoned) {
    op_free(o);
    return;
  }
  corral__ctx_io_wake(o->ctx, &o->post);
}

static void fail(fs_op *o, int err, const char *call) {
  o->err = err;
  o->call = call;
  finish(o);
}

/* ======================================================================== */
/* Steps                                                                     */
/* ======================================================================== */

/* The room after what was read so far, at least 64 KiB (the buffer
 * doubles), at most 1 GiB a read; a buffer of no bytes when out of memory. */
static uv_buf_t read_room(fs_op *o) {
  if (o->cap - o->len < 65536) {
    size_t cap = o->cap < 65536 ? 65536 : o->cap * 2;
    char *d = realloc(o->data, cap);
    if (d == NULL) return uv_buf_init(NULL, 0);
    o->data = d;
    o->cap = cap;
  }
  size_t room = o->cap - o->len;
  if (room > (1u << 30)) room = 1u << 30;
  return uv_buf_init(o->data + o->len, (unsigned)room);
}

static void read_more(fs_op *o) {
  uv_buf_t b = read_room(o);
  if (b.base == NULL) return fail(o, UV_ENOMEM, "read");
  int rc = uv_fs_read(&o->ctx->loop, &o->req, o->fd, &b, 1, -1, step);
  if (rc < 0) fail(o, rc, "read");
}

static void write_more(fs_op *o) {
  if (o->off >= o->len) return finish(o);
  size_t left = o->len - o->off;
  if (left > (1u << 30)) left = 1u << 30;
  uv_buf_t b = uv_buf_init(o->data + o->off, (unsigned)left);
  int rc = uv_fs_write(&o->ctx->loop, &o->req, o->fd, &b, 1, -1, step);
  if (rc < 0) fail(o, rc, "write");
}

static void list_take(fs_op *o) {
  uv_dirent_t ent;
  size_t cap = 0;
  while (uv_fs_scandir_next(&o->req, &ent) != UV_EOF) {
    if (o->n == cap) {
      cap = cap ? cap * 2 : 16;
      char **nn = realloc(o->names, cap * sizeof *nn);
      if (nn != NULL) o->names = nn;
      int *nt = realloc(o->types, cap * sizeof *nt);
      if (nt != NULL) o->types = nt;
      if (nn == NULL || nt == NULL) return (void)(o->err = UV_ENOMEM);
    }
    o->names[o->n] = strdup(ent.name);
    if (o->names[o->n] == NULL) return (void)(o->err = UV_ENOMEM);
    o->types[o->n++] = ent.type;
  }
}

/* ---- a FIFO (or a socket): read through the loop, so that a reader that
 * waits for its writer holds no thread of the pool and can be abandoned */

static void on_pipe_closed(uv_handle_t *h) {
  fs_op *o = h->data;
  o->piped = 0;
  finish(o);
}

static void pipe_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b) {
  (void)hint;
  *b = read_room(h->data); /* (no bytes: libuv then reports UV_ENOBUFS) */
}

static void pipe_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
  (void)b;
  fs_op *o = s->data;
  if (n > 0) o->len += (size_t)n;
  if (n >= 0) return;
  uv_read_stop(s);
  if (n != UV_EOF) o->err = (int)n, o->call = "read";
  finish(o);
}

/* Read the open FIFO o->fd through a pipe handle (the fd is its own now). */
static void read_piped(fs_op *o) {
  int rc = uv_pipe_init(&o->ctx->loop, &o->pipe, 0);
  if (rc < 0) return fail(o, rc, "read");
  o->pipe.data = o;
  o->piped = 1;
  rc = uv_pipe_open(&o->pipe, o->fd);
  if (rc < 0) return fail(o, rc, "read"); /* (the close closes no fd: finish does) */
  o->fd = -1;
  rc = uv_read_start((uv_stream_t *)&o->pipe, pipe_alloc, pipe_read);
  if (rc < 0) fail(o, rc, "read");
}

/* One request ended: go on to the next step of the operation. */
static void step(uv_fs_t *req) {
  fs_op *o = req->data;
  ssize_t r = req->result;
  uv_fs_type t = req->fs_type;
  if (t == UV_FS_STAT || t == UV_FS_FSTAT) o->st = req->statbuf;
  if (t == UV_FS_SCANDIR && r >= 0) list_take(o);
  uv_fs_req_cleanup(req);
  req->data = o;
  if (o->abandoned && o->fd < 0 && t != UV_FS_OPEN) return finish(o);
  switch (t) {
  case UV_FS_OPEN:
    if (r < 0) return fail(o, (int)r, "open");
    o->fd = (uv_file)r;
    if (o->abandoned) return finish(o);
    if (o->op == OP_READ) {
      int rc = uv_fs_fstat(&o->ctx->loop, &o->req, o->fd, step);
      if (rc < 0) fail(o, rc, "fstat");
      return;
    }
    return write_more(o);
  case UV_FS_FSTAT:
    if (r < 0) return fail(o, (int)r, "fstat");
    if (o->abandoned) return finish(o);
    if (S_ISFIFO(o->st.st_mode) || S_ISSOCK(o->st.st_mode)) return read_piped(o);
    /* (a regular file ignores O_NONBLOCK; a device reads as it would) */
    fcntl(o->fd, F_SETFL, fcntl(o->fd, F_GETFL) & ~O_NONBLOCK);
    return read_more(o);
  case UV_FS_READ:
    if (r < 0) return fail(o, (int)r, "read");
    if (r == 0 || o->abandoned) return finish(o);
    o->len += (size_t)r;
    return read_more(o);
  case UV_FS_WRITE:
    if (r < 0) return fail(o, (int)r, "write");
    o->off += (size_t)r;
    if (o->abandoned) return finish(o);
    return write_more(o);
  case UV_FS_SCANDIR:
    if (r < 0) return fail(o, (int)r, "scandir");
    return finish(o);
  case UV_FS_STAT:
    if (r < 0) return fail(o, (int)r, "stat");
    return finish(o);
  case UV_FS_MKDIR:
    if (r < 0) return fail(o, (int)r, "mkdir");
    return finish(o);
  default: return fail(o, UV_EINVAL, "fs");
  }
}

/* The context closes with o still running: its last step frees it. */
static void op_drop(corral_post *p) {
  fs_op *o = (fs_op *)p;
  corral__ctx_io_end(o->ctx, p);
  if (!o->running) {
    op_free(o);
    return;
  }
  o->abandoned = 1;
  if (o->piped == 1) { /* a FIFO waiting for its writer: stop now */
    uv_read_stop((uv_stream_t *)&o->pipe);
    finish(o);
  } else {
    uv_cancel((uv_req_t *)&o->req); /* (not started yet: its step sees ECANCELED) */
  }
}

/* ======================================================================== */
/* Lua functions                                                             */
/* ======================================================================== */

static const char *const op_names[] = {"read", "write", "append", "list", "stat", "mkdir", NULL};

/* fs_start(op, path [, data [, mode]]): the key to wait under. */
static int l_fs_start(lua_State *L) {
  int op = luaL_checkoption(L, 1, NULL, op_names);
  size_t plen, dlen = 0;
  const char *path = luaL_checklstring(L, 2, &plen);
  const char *data = (op == OP_WRITE || op == OP_APPEND) ? luaL_checklstring(L, 3, &dlen) : NULL;
  int mode = (int)luaL_optinteger(L, 4, op == OP_MKDIR ? 0777 : 0666);
  fs_op *o = calloc(1, sizeof *o);
  if (o == NULL) return luaL_error(L, "out of memory");
  o->ctx = corral__ctx_of(L);
  o->op = op;
  o->fd = -1;
  o->post.drop = op_drop;
  o->req.data = o;
  o->path = malloc(plen + 1);
  if (o->path == NULL || (dlen > 0 && (o->data = malloc(dlen)) == NULL)) {
    op_free(o);
    return luaL_error(L, "out of memory");
  }
  memcpy(o->path, path, plen + 1);
  if (dlen > 0) memcpy(o->data, data, dlen);
  o->len = dlen;
  uv_loop_t *loop = &o->ctx->loop;
  int rc;
  switch (op) {
  case OP_READ:
    /* (non-blocking: opening a FIFO must not wait for its writer in a
     * thread of the pool; its reads then wait on the loop) */
    rc = uv_fs_open(loop, &o->req, o->path, O_RDONLY | O_NONBLOCK | O_CLOEXEC, 0, step);
    break;
  case OP_WRITE:
  case OP_APPEND:
    rc = uv_fs_open(loop, &o->req, o->path,
                    O_WRONLY | O_CREAT | O_CLOEXEC | (op == OP_APPEND ? O_APPEND : O_TRUNC), mode,
                    step);
    break;
  case OP_LIST: rc = uv_fs_scandir(loop, &o->req, o->path, 0, step); break;
  case OP_STAT: rc = uv_fs_stat(loop, &o->req, o->path, step); break;
  default: rc = uv_fs_mkdir(loop, &o->req, o->path, mode, step); break;
  }
  if (rc < 0) {
    uv_fs_req_cleanup(&o->req);
    op_free(o);
    lua_pushnil(L);
    lua_pushstring(L, uv_err_name(rc));
    lua_pushstring(L, uv_strerror(rc));
    return 3;
  }
  o->running = 1;
  corral__ctx_io_begin(o->ctx, &o->post);
  lua_pushlightuserdata(L, o);
  return 1;
}

static fs_op *op_arg(lua_State *L) {
  luaL_checktype(L, 1, LUA_TLIGHTUSERDATA);
  return lua_touserdata(L, 1);
}

static const char *type_name(int mode_or_dirent, int is_dirent) {
  if (is_dirent) {
    switch (mode_or_dirent) {
    case UV_DIRENT_FILE: return "file";
    case UV_DIRENT_DIR: return "directory";
    case UV_DIRENT_LINK: return "link";
    case UV_DIRENT_FIFO: return "fifo";
    case UV_DIRENT_SOCKET: return "socket";
    case UV_DIRENT_CHAR: return "char";
    case UV_DIRENT_BLOCK: return "block";
    default: return "unknown";
    }
  }
  switch (mode_or_dirent & S_IFMT) {
  case S_IFREG: return "file";
  case S_IFDIR: return "directory";
  case S_IFLNK: return "link";
  case S_IFIFO: return "fifo";
  case S_IFSOCK: return "socket";
  case S_IFCHR: return "char";
  case S_IFBLK: return "block";
  default: return "unknown";
  }
}

static void set_num(lua_State *L, const char *k, double v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, k);
}

static double ts(uv_timespec_t t) { return (double)t.tv_sec + (double)t.tv_nsec * 1e-9; }

static void push_stat(lua_State *L, const uv_stat_t *st) {
  lua_createtable(L, 0, 12);
  lua_pushstring(L, type_name((int)st->st_mode, 0));
  lua_setfield(L, -2, "type");
  set_num(L, "size", (double)st->st_size);
  set_num(L, "mode", (double)(st->st_mode & 07777));
  set_num(L, "mtime", ts(st->st_mtim));
  set_num(L, "atime", ts(st->st_atim));
  set_num(L, "ctime", ts(st->st_ctim));
  set_num(L, "uid", (double)st->st_uid);
  set_num(L, "gid", (double)st->st_gid);
  set_num(L, "nlink", (double)st->st_nlink);
  set_num(L, "ino", (double)st->st_ino);
  set_num(L, "dev", (double)st->st_dev);
}

/* fs_finish(key): the result (read: the bytes; write: their count; list:
 * names and a table of their types; stat: a table; mkdir: true), or nil,
 * the error's name, its message and the system call. Frees the record. */
static int l_fs_finish(lua_State *L) {
  fs_op *o = op_arg(L);
  if (o->running) return luaL_error(L, "fs_finish: the operation is still running");
  corral__ctx_io_end(o->ctx, &o->post);
  int n = 1;
  if (o->err != 0) {
    lua_pushnil(L);
    lua_pushstring(L, uv_err_name(o->err));
    lua_pushstring(L, uv_strerror(o->err));
    lua_pushstring(L, o->call);
    n = 4;
  } else {
    switch (o->op) {
    case OP_READ: lua_pushlstring(L, o->data != NULL ? o->data : "", o->len); break;
    case OP_WRITE:
    case OP_APPEND: lua_pushnumber(L, (double)o->off); break;
    case OP_LIST:
      lua_createtable(L, (int)o->n, 0);
      lua_createtable(L, 0, (int)o->n);
      for (size_t i = 0; i < o->n; i++) {
        lua_pushstring(L, o->names[i]);
        lua_rawseti(L, -3, (int)i + 1);
        lua_pushstring(L, type_name(o->types[i], 1));
        lua_setfield(L, -2, o->names[i]);
      }
      n = 2;
      break;
    case OP_STAT: push_stat(L, &o->st); break;
    default: lua_pushboolean(L, 1); break;
    }
  }
  op_free(o);
  return n;
}

/* fs_abandon(key): the waiting task gave up; the record goes when done. */
static int l_fs_abandon(lua_State *L) {
  op_drop(&op_arg(L)->post);
  return 0;
}

const luaL_Reg corral__lua_fs_funcs[] = {{"fs_start", l_fs_start},
                                         {"fs_finish", l_fs_finish},
                                         {"fs_abandon", l_fs_abandon},
                                         {NULL, NULL}};
