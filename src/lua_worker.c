/* lua_worker.c: thread workers in Lua: handles (`corral.worker`), calls
 * (`corral.call`), the default pool, and the worker side of a call. */
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <luajit.h>
#include <lualib.h>
#include <msgpack.h>

#include "internal.h"

/* What runs on a worker's thread: handed by the module above (its worker
 * main opens corral in the new state). */
/* (every state's opening sets it, to the same function) */
static void (*_Atomic worker_body)(corral_worker *w);

/* ======================================================================== */
/* Workers                                                                   */
/* ======================================================================== */

static corral_worker *w_check(lua_State *L, int idx) {
  return corral__box_check(L, idx, WORKER_MT)->p;
}

static void w_push(lua_State *L, corral_worker *w) { corral__box_push(L, w, NULL, WORKER_MT); }

static int w_gc(lua_State *L) {
  corral_worker **p = lua_touserdata(L, 1);
  corral_worker *w = *p;
  *p = NULL;
  if (w == NULL) return 0;
  /* When this was the last handle, the worker stops once its calls are
   * done: the home does it at its next drain (no lock in a __gc). */
  corral__worker_drop_handle(w);
  return 0;
}

/* A new Lua handle on w, taking a reference the caller holds. */
void corral__lua_worker_push(lua_State *L, corral_worker *w) {
  atomic_fetch_add(&w->handles, 1);
  w_push(L, w);
}

/* worker_start(name, cap, ...): a thread worker whose Lua main receives
 * the other arguments (class, options, init arguments). Returns it, or nil
 * and why it cannot start. */
atomic_int corral__inject_state, corral__inject_alloc; /* (lua_core.c's inject_fault sets them) */

/* Faults injected for tests and not met yet: no spare is made meanwhile
 * (they are meant for the next start). */
static int faults_pending(void) {
  return atomic_load(&corral__inject_state) > 0 || atomic_load(&corral__inject_alloc) > 0 ||
         corral__thread_inject_pending();
}

/* worker_start(name, cap, process, class, options, init args...): a thread
 * worker (process 0), or a process worker running `process` calls at once;
 * its handle, or nil and why (a CodecError's message, or the start's). */
static int l_worker_start(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  lua_Number cap = luaL_checknumber(L, 2);
  luaL_argcheck(L, cap >= 1 && cap <= 0x7fffffff, 2, "inbox bound out of range");
  int process = (int)luaL_checkinteger(L, 3);
  static const char *const lead[] = {"class", "options"};
  codec_opts o = {0};
  o.what = "init";
  o.offset = 2;
  o.lead = lead;
  o.no_handles = process > 0;
  o.no_shm = 1; /* (BOOT carries no descriptors: init's buffers go as bytes) */
  size_t len;
  char *boot = corral__codec_encode(L, 4, lua_gettop(L) - 3, &len, &o);
  if (boot == NULL) return corral__lua_codec_error(L, o.err);
  int err;
  /* the home's starts take and make the spare: a thread inherits its
   * maker's affinity, priority and signal mask, and a worker's are its own */
  int home = corral__ctx_of(L)->worker == NULL && process == 0;
  corral_worker *w =
      corral__worker_start(corral__lua_rt(L), name, boot, len, o.has_refs, (int)cap,
                           process ? corral__process_main : worker_body, home, process, &err);
  if (w == NULL) {
    corral__codec_free(boot, len, o.has_refs);
    lua_pushnil(L);
    lua_pushfstring(L, "cannot start a thread for worker %s: %s", name,
                    err == CORRAL_ENOMEM ? "out of memory" : uv_strerror(err));
    return 2;
  }
  w_push(L, w); /* its handle was counted at birth */
  /* the next start takes a state made ahead (none while tests inject
   * faults: they are meant for the next start) */
  if (home && !faults_pending()) corral__worker_make_spare(corral__lua_rt(L), worker_body);
  return 1;
}

/* process_policy(w, restart_limit, backoff, retries, cancel_grace): what w
 * does when its child process dies, and how long a cancelled call may run
 * on there. */
/* exit_code(n): a worker of this runtime called os.exit(n): in a process
 * worker's child, the process ends with n (the first one counts). */
static int l_exit_code(lua_State *L) {
  corral_runtime *rt = corral__lua_rt(L);
  int n = (int)luaL_checkinteger(L, 1) & 0xff;
  int none = 0;
  if (rt != NULL) atomic_compare_exchange_strong(&rt->exit_code, &none, n + 1);
  return 0;
}

static int l_process_policy(lua_State *L) {
  corral_worker *w = w_check(L, 1);
  corral__process_policy(w, (int)luaL_checkinteger(L, 2), luaL_checknumber(L, 3),
                         (int)luaL_checkinteger(L, 4), luaL_checknumber(L, 5));
  return 0;
}

/* process_child(fd): this process is a process worker; serve the parent on
 * fd. Never returns. */
static int l_process_child(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  corral__process_child(corral__lua_rt(L), fd, worker_body);
  return 0;
}

/* The program a process worker's child runs: this executable with -e when
 * corral is built into it (the corral runner); when corral is a module
 * loaded by LuaJIT, luajit (this one, or the one on PATH) told where the
 * module is. */
static void find_program(void) {
  static char exe[4096], code[8800];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  exe[n > 0 ? n : 0] = '\0';
  Dl_info info;
  const char *argv[4] = {exe, "-e", code, NULL};
  const char *lib = dladdr((void *)&l_process_child, &info) ? info.dli_fname : NULL;
  if (lib != NULL && strstr(lib, ".so") != NULL) {
    char dir[4096];
    if (realpath(lib, dir) == NULL) snprintf(dir, sizeof dir, "%s", lib);
    char *slash = strrchr(dir, '/');
    if (slash != NULL)
      *slash = '\0';
    else
      snprintf(dir, sizeof dir, ".");
    const char *base = strrchr(exe, '/');
    if (base == NULL || strstr(base, "luajit") == NULL) argv[0] = "luajit";
    /* (the module beside the library: corral.so in the build tree, or
     * lib/lua/5.1/corral.so beside an installed lib/libcorral.so.0) */
    snprintf(code, sizeof code,
             "package.cpath = [==[%s/?.so;%s/lua/5.1/?.so;]==] .. package.cpath; "
             "require 'corral'; require('corral.core').process_child(3)",
             dir, dir);
  } else {
    snprintf(code, sizeof code, "require('corral.core').process_child(3)");
  }
  corral__process_program(argv);
}

/* spares(on): keep a worker state started ahead for the next start. */
static int l_spares(lua_State *L) {
  corral__worker_spares(corral__lua_rt(L), lua_toboolean(L, 1));
  return 0;
}

static corral_call *call_check(lua_State *L, int idx) {
  corral_call *c = corral__box_check(L, idx, CALL_MT)->p;
  if (c == NULL) luaL_error(L, "corral: call already finished");
  return c;
}

static void call_push(lua_State *L, corral_call *c) { corral__box_push(L, c, NULL, CALL_MT); }

static int call_gc(lua_State *L) {
  corral_call **p = lua_touserdata(L, 1);
  /* A call a worker took is its thread's until finished (it is cancelled
   * there if the worker dies); one that never left its caller is freed
   * here: memory and references only, no lock. */
  if (*p != NULL && !(*p)->taken) corral__call_free(*p);
  *p = NULL;
  return 0;
}

static int push_status(lua_State *L, int rc) {
  if (rc == 0)
    lua_pushboolean(L, 1);
  else
    lua_pushstring(L, rc == CORRAL_EAGAIN ? "full" : rc == CORRAL_ECRASHED ? "crashed" : "closed");
  return 1;
}

/* A push refused because the worker died: fail the call with its crash. */
static void fail_crashed(corral_worker *w, corral_future *result) {
  size_t len;
  char *crash = corral__worker_crash_copy(w, &len);
  if (crash != NULL)
    corral__future_settle(result, CORRAL_FAILED, crash, len);
  else
    corral_future_set_error(result, "WorkerCrashed", "the worker died");
}

/* Give back the inputs an encode collected. */
static void drop_deps(codec_opts *o) {
  for (int i = 0; i < o->ndeps; i++)
    corral__future_drop_dep(o->deps[i]);
  free(o->deps);
}

/* wcall(w, method, ...): encode the arguments (futures become inputs to
 * unwrap) and queue the call. Returns the result's C future and its watch
 * key (the caller's loop is told when it settles); or nil, "full", the
 * result, a C future settled when the call moves into the inbox (the
 * caller waits for it) and the key; or nil, "closed" (the caller fails it)
 * / "crashed" (failed), the result, nil, key; or nil, "codec", why. */
static int l_wcall(lua_State *L) {
  corral_worker *w = w_check(L, 1);
  size_t mlen;
  const char *method = luaL_checklstring(L, 2, &mlen);
  codec_opts o = {0};
  o.unwrap = 1;
  o.no_handles = w->process > 0; /* (another process has not its handles) */
  size_t len;
  char *payload = corral__codec_encode(L, 3, lua_gettop(L) - 2, &len, &o);
  if (payload == NULL) {
    drop_deps(&o);
    lua_pushnil(L);
    lua_pushliteral(L, "codec");
    lua_pushstring(L, o.err);
    return 3;
  }
  corral_context *ctx = corral__ctx_of(L);
  atomic_fetch_add_explicit(&ctx->encodes, 1, memory_order_relaxed);
  corral_future *result = corral__future_new();
  corral_call *c =
      result ? corral__call_new(method, mlen, result, payload, len, o.has_refs, o.deps, o.ndeps)
             : NULL;
  if (c == NULL) {
    corral__codec_free(payload, len, o.has_refs);
    drop_deps(&o);
    corral_future_release(result);
    return luaL_error(L, "corral: out of memory");
  }
  corral_future_retain(result);
  /* the caller's loop hears of the result through a watch made here */
  if (corral__future_watch(result, ctx, corral__ctx_post) < 0) {
    corral__call_free(c);
    return luaL_error(L, "corral: out of memory");
  }
  corral_future *accepted;
  int rc = corral__worker_push(w, c, &accepted);
  if (rc == 0) {
    corral__lua_cf_push(L, result);
    lua_pushlightuserdata(L, result);
    return 2;
  }
  lua_pushnil(L);
  if (rc == CORRAL_EAGAIN) { /* the worker holds it; the caller waits for room */
    lua_pushliteral(L, "full");
    corral__lua_cf_push(L, result);
    corral__lua_cf_push(L, accepted);
    lua_pushlightuserdata(L, result);
    return 5;
  }
  corral__call_free(c); /* refused: still the caller's */
  if (rc == CORRAL_ECRASHED) fail_crashed(w, result);
  push_status(L, rc);
  corral__lua_cf_push(L, result); /* its watch still waits: it fails */
  lua_pushnil(L);
  lua_pushlightuserdata(L, result);
  return 5;
}

/* wactive(w): its calls queued or running (huge when it is dead: a pool
 * gives it no call while another can take it). */
static int l_wactive(lua_State *L) {
  corral_worker *w = w_check(L, 1);
  if (atomic_load(&w->stopping) == WORKER_CRASHED)
    lua_pushnumber(L, 1e300);
  else
    lua_pushinteger(L, atomic_load(&w->active));
  return 1;
}

/* wstop(w, drain): ask it to stop; returns the C future settled when its
 * thread has ended. */
static int l_wstop(lua_State *L) {
  corral_worker *w = w_check(L, 1);
  corral__worker_stop(w, lua_toboolean(L, 2) ? WORKER_DRAIN : WORKER_CANCEL);
  corral_future_retain(w->stopped);
  corral__lua_cf_push(L, w->stopped);
  return 1;
}

/* wis_self(w): whether w is the worker this code runs in. */
static int l_wis_self(lua_State *L) {
  lua_pushboolean(L, w_check(L, 1) == corral__ctx_of(L)->worker);
  return 1;
}

static int l_wjoin(lua_State *L) {
  corral__worker_join(w_check(L, 1));
  return 0;
}

static int l_wname(lua_State *L) {
  lua_pushstring(L, w_check(L, 1)->name);
  return 1;
}

/* pool_set(w...): make these instances the process's default pool, unless
 * one is set already (false). pool_get(): its instances (none: no pool). */
static int l_pool_set(lua_State *L) {
  corral_runtime *rt = corral__lua_rt(L);
  int n = lua_gettop(L);
  for (int i = 1; i <= n; i++)
    w_check(L, i);
  corral_worker **pool = calloc((size_t)(n > 0 ? n : 1), sizeof(void *));
  if (pool == NULL) return luaL_error(L, "corral: out of memory");
  for (int i = 0; i < n; i++)
    pool[i] = w_check(L, i + 1);
  int ok = 0;
  uv_mutex_lock(&rt->wlock);
  if (rt->pool == NULL) {
    for (int i = 0; i < n; i++) {
      corral__worker_retain(pool[i]);
      atomic_fetch_add(&pool[i]->handles, 1); /* the runtime holds it open */
    }
    rt->pool = pool;
    rt->npool = n;
    ok = 1;
  }
  uv_mutex_unlock(&rt->wlock);
  if (!ok) free(pool);
  lua_pushboolean(L, ok);
  return 1;
}

static int l_pool_get(lua_State *L) {
  corral_runtime *rt = corral__lua_rt(L);
  corral_worker *got[64], **ws = got;
  uv_mutex_lock(&rt->wlock);
  int n = rt->npool;
  if (n > 64) ws = malloc(sizeof(void *) * (size_t)n);
  if (ws == NULL) n = 0;
  for (int i = 0; i < n; i++) {
    ws[i] = rt->pool[i];
    corral__worker_retain(ws[i]); /* the userdata's reference */
  }
  uv_mutex_unlock(&rt->wlock);
  if (!lua_checkstack(L, n + 1)) {
    for (int i = 0; i < n; i++)
      corral__worker_release(ws[i]);
    n = 0;
  }
  for (int i = 0; i < n; i++)
    corral__lua_worker_push(L, ws[i]);
  if (ws != got) free(ws);
  return n;
}

/* ---- the worker's side ---------------------------------------------------- */

static corral_worker *self_worker(lua_State *L) {
  corral_worker *w = corral__ctx_of(L)->worker;
  if (w == NULL) luaL_error(L, "corral: not a worker context");
  return w;
}

/* inbox_take(t, max, at): put up to max calls in t[at+1..]; returns how
 * many. */
static int l_inbox_take(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  int max = (int)luaL_checkinteger(L, 2);
  int at = (int)luaL_optinteger(L, 3, 0);
  corral_worker *w = self_worker(L);
  corral_call *calls[64];
  if (max > 64) max = 64;
  int n = corral__worker_take(w, calls, max);
  for (int i = 0; i < n; i++) {
    call_push(L, calls[i]);
    lua_rawseti(L, 1, at + i + 1);
  }
  lua_pushinteger(L, n);
  return 1;
}

/* stopping(): how this worker is asked to stop (0 running, 1 drain, 2
 * cancel, 3 crashed): an atomic read, no lock. */
static int l_stopping(lua_State *L) {
  lua_pushinteger(L, atomic_load(&self_worker(L)->stopping));
  return 1;
}

/* worker_crash(err): this worker dies: err (encoded) fails its calls and
 * every call made from now on. False (and nothing done) when err cannot
 * travel; with `force`, a plain WorkerCrashed is sent instead. */
static int l_worker_crash(lua_State *L) {
  corral_worker *w = self_worker(L);
  int force = lua_toboolean(L, 2);
  lua_settop(L, 1);
  codec_opts o = {0};
  o.what = "error";
  size_t len;
  char *buf = corral__codec_encode(L, 1, 1, &len, &o);
  if (buf == NULL || o.has_refs) {
    corral__codec_free(buf, len, buf != NULL);
    if (!force) {
      lua_pushboolean(L, 0);
      return 1;
    }
    buf = corral__future_error_payload("WorkerCrashed", "the worker died", &len);
  }
  if (buf != NULL) corral__worker_crash(w, buf, len);
  lua_pushboolean(L, 1);
  return 1;
}

/* call_info(call): the method's name and how many inputs it has. */
static int l_call_info(lua_State *L) {
  corral_call *c = call_check(L, 1);
  lua_pushlstring(L, c->method, c->mlen);
  lua_pushinteger(L, c->ndeps);
  return 2;
}

/* call_start(call): the method starts: its future becomes RUNNING. False
 * when it was cancelled (or settled) meanwhile: it must not run. */
static int l_call_start(lua_State *L) {
  corral_call *c = call_check(L, 1);
  int ok = corral__future_start(c->result) == 0;
  if (ok) {
    corral_worker *w = self_worker(L);
    corral__worker_set_current(w, c->method, c->mlen);
    /* in a process worker's child: the parent learns it started, in shared
     * memory that outlives this process (before the method runs) */
    corral_runtime *rt = w ? w->rt : NULL;
    if (rt != NULL && rt->start_ring != NULL && c->wire_id != 0)
      atomic_store_explicit(&rt->start_ring[c->wire_id & rt->ring_mask], c->wire_id,
                            memory_order_release);
  }
  lua_pushboolean(L, ok);
  return 1;
}

/* call_suspend(call) / call_resume(call): the method waits / goes on. False
 * when its caller cancelled it: the wait must raise CancelledError. */
static int l_call_suspend(lua_State *L) {
  lua_pushboolean(L, corral__future_suspend(call_check(L, 1)->result) == 0);
  return 1;
}

static int l_call_resume(lua_State *L) {
  lua_pushboolean(L, corral__future_resume(call_check(L, 1)->result) == 0);
  return 1;
}

/* call_result(call): the call's own C future (to learn of a cancel). */
static int l_call_result(lua_State *L) {
  corral_call *c = call_check(L, 1);
  corral_future_retain(c->result);
  corral__lua_cf_push(L, c->result);
  return 1;
}

/* call_deps(call): its inputs, as C futures. */
static int l_call_deps(lua_State *L) {
  corral_call *c = call_check(L, 1);
  lua_createtable(L, c->ndeps, 0);
  for (int i = 0; i < c->ndeps; i++) {
    corral_future_retain(c->deps[i]);
    corral__lua_cf_push(L, c->deps[i]);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

/* call_carried(call, i): the call fails with its input i's failure (a
 * DependencyError): that input's own reporter says nothing, for good. */
static int l_call_carried(lua_State *L) {
  corral_call *c = call_check(L, 1);
  lua_Integer i = luaL_checkinteger(L, 2);
  if (i >= 1 && i <= c->ndeps) corral__future_carried(c->deps[i - 1]);
  return 0;
}

/* call_args(call): true and the decoded arguments, inputs in their places;
 * or false and why they cannot be decoded here (a CodecError's message). */
static int l_call_args(lua_State *L) {
  corral_call *c = call_check(L, 1);
  lua_settop(L, 1);
  lua_pushboolean(L, 1);
  codec_deps deps = {c->deps, c->ndeps};
  int n = corral__codec_decode(L, c->payload, c->len, &deps, CODEC_TRUSTED | CODEC_AS_ARGS);
  if (n < 0) {
    lua_pushboolean(L, 0);
    lua_replace(L, 2);
    return 2;
  }
  atomic_fetch_add_explicit(&corral__ctx_of(L)->decodes, 1, memory_order_relaxed);
  /* the arguments live in Lua now: the encoded copy can go (a large
   * argument is then held twice at most, not three times) */
  corral__call_drop_payload(c);
  return n + 1;
}

/* The call has finished: count it and free it. */
static void call_done(lua_State *L, corral_call **p) {
  corral_worker *w = corral__ctx_of(L)->worker;
  if (w != NULL) {
    atomic_fetch_sub(&w->active, 1);
    if (w->current[0] != '\0') corral__worker_set_current(w, "", 0);
  }
  if ((*p)->taken) queue_remove(&(*p)->node);
  corral__call_free(*p);
  *p = NULL;
}

/* call_finish(call, state, ...): settle the call's future with the values
 * (state DONE) or the error (FAILED), encoded; or cancel it (CANCELLED);
 * or, with no state, just let it go (it was settled by its caller).
 * Returns true, or nil and why the values cannot travel (the call is then
 * still open, to fail with that). */
static int l_call_finish(lua_State *L) {
  corral_call **p = (corral_call **)&corral__box_check(L, 1, CALL_MT)->p;
  if (*p == NULL) return luaL_error(L, "corral: call already finished");
  corral_future *f = (*p)->result;
  if (lua_isnoneornil(L, 2)) {
    /* nothing to settle */
  } else if (lua_tointeger(L, 2) == CORRAL_CANCELLED) {
    corral__future_settle(f, CORRAL_CANCELLED, NULL, 0);
  } else {
    int state = (int)luaL_checkinteger(L, 2);
    if (corral__lua_settle_encoded(L, f, state) < 0) return 2; /* nil, why */
  }
  call_done(L, p);
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- handles as C sees them --------------------------------------------- */

static int handle_gc(lua_State *L) {
  corral__handle *h = lua_touserdata(L, 1);
  for (int i = 0; i < h->n; i++)
    corral__worker_drop_handle(h->insts[i]); /* atomic: no lock in a __gc */
  h->n = 0;
  return 0;
}

/* handle_new(name, balance, blocking, timeout, w...): the C half of a
 * thread worker handle over those instances (each counted as a handle). */
static int l_handle_new(lua_State *L) {
  int n = lua_gettop(L) - 4;
  const char *name = luaL_checkstring(L, 1);
  const char *balance = luaL_checkstring(L, 2);
  double timeout = luaL_optnumber(L, 4, 0);
  for (int i = 0; i < n; i++)
    w_check(L, 5 + i);
  corral__handle *h = lua_newuserdata(L, sizeof *h + sizeof(corral_worker *) * (size_t)n);
  snprintf(h->name, sizeof h->name, "%s", name);
  snprintf(h->balance, sizeof h->balance, "%s", balance);
  h->blocking = lua_toboolean(L, 3);
  h->timeout = timeout > 0 ? timeout : 0;
  h->n = 0;
  luaL_getmetatable(L, HANDLE_MT);
  lua_setmetatable(L, -2);
  for (int i = 0; i < n; i++) {
    h->insts[i] = w_check(L, 5 + i);
    corral__worker_hold_handle(h->insts[i]);
    h->n = i + 1;
  }
  return 1;
}

/* For the codec: the C half of the worker handle at idx (see the iface). */
int corral__lua_handle_of(lua_State *L, int idx, const corral__handle **h) {
  lua_pushliteral(L, "_c");
  lua_rawget(L, idx);
  *h = luaL_testudata(L, -1, HANDLE_MT);
  lua_pop(L, 1); /* the handle table keeps it alive */
  if (*h != NULL) return 1;
  lua_pushliteral(L, "_mode");
  lua_rawget(L, idx);
  int local = lua_type(L, -1) == LUA_TSTRING;
  lua_pop(L, 1);
  return local ? 0 : -1;
}

/* require(name) with the require corral was loaded with as the global
 * while corral's own modules load (their bodies say `require`): a script
 * may have replaced or removed it (a sandbox). Only corral's code runs
 * meanwhile. Pushes the module, or returns 0 (nothing pushed). */
static void set_require(lua_State *L, int idx) {
  lua_pushliteral(L, "require");
  lua_pushvalue(L, idx);
  lua_rawset(L, LUA_GLOBALSINDEX); /* raw: a strict _G may refuse a write */
}

static int require_own(lua_State *L, const char *name) {
  int top = lua_gettop(L);
  lua_pushliteral(L, "require");
  lua_rawget(L, LUA_GLOBALSINDEX);                 /* top+1: the script's */
  lua_getfield(L, LUA_REGISTRYINDEX, REQUIRE_KEY); /* top+2: corral's */
  int ok = lua_isfunction(L, top + 2);
  if (ok) {
    set_require(L, top + 2);
    lua_pushstring(L, name);
    ok = lua_pcall(L, 1, 1, 0) == 0 && lua_istable(L, -1); /* at top+2 */
    set_require(L, top + 1);
  }
  if (!ok) {
    lua_settop(L, top);
    return 0;
  }
  lua_replace(L, top + 1);
  return 1;
}

/* For the codec: push the function that rebuilds a handle (the import of
 * corral.worker_handle, loaded on first need). */
int corral__lua_push_import(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, IMPORT_KEY);
  if (lua_isfunction(L, -1)) return 1;
  lua_pop(L, 1);
  if (!require_own(L, "corral.worker_handle")) return 0;
  lua_getfield(L, -1, "import");
  lua_remove(L, -2);
  if (!lua_isfunction(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, IMPORT_KEY);
  return 1;
}

void corral__lua_worker_open(lua_State *L, void (*body)(corral_worker *w)) {
  corral__box_kind(L, HANDLE_MT, handle_gc);
  worker_body = body;
  corral__box_kind(L, WORKER_MT, w_gc);
  corral__box_kind(L, CALL_MT, call_gc);
  static uv_once_t once = UV_ONCE_INIT;
  uv_once(&once, find_program);
}

const luaL_Reg corral__lua_worker_funcs[] = {{"handle_new", l_handle_new},
                                             {"exit_code", l_exit_code},
                                             {"worker_start", l_worker_start},
                                             {"wcall", l_wcall},
                                             {"spares", l_spares},
                                             {"process_child", l_process_child},
                                             {"process_policy", l_process_policy},
                                             {"wactive", l_wactive},
                                             {"wstop", l_wstop},
                                             {"wjoin", l_wjoin},
                                             {"wis_self", l_wis_self},
                                             {"wname", l_wname},
                                             {"pool_set", l_pool_set},
                                             {"pool_get", l_pool_get},
                                             {"inbox_take", l_inbox_take},
                                             {"stopping", l_stopping},
                                             {"worker_crash", l_worker_crash},
                                             {"call_start", l_call_start},
                                             {"call_suspend", l_call_suspend},
                                             {"call_resume", l_call_resume},
                                             {"call_result", l_call_result},
                                             {"call_info", l_call_info},
                                             {"call_args", l_call_args},
                                             {"call_deps", l_call_deps},
                                             {"call_carried", l_call_carried},
                                             {"call_finish", l_call_finish},
                                             {NULL, NULL}};
