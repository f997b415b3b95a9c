/* lua_core.c: the C primitives under the Lua API (the `corral.core` table),
 * the future and reporter userdata, and `luaopen_corral`. */
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
#include "lua_modules.h" /* generated: the Lua half, as bytecode */

#define RUNTIME_KEY "corral.runtime"
#define WRAP_KEY    "corral.wrap"
#define DRIVE_KEY   "corral.drive"
#define CONTEXT_KEY "corral.context"
#define CALL_MT     "corral.call"

static corral_runtime *rt_of(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, RUNTIME_KEY);
  corral_runtime *rt = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return rt;
}

corral_runtime *corral_from_lua(lua_State *L) { return rt_of(L); }

corral_context *corral__ctx_of(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, CONTEXT_KEY);
  corral_context *c = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return c;
}

/* ======================================================================== */
/* C futures                                                                 */
/* ======================================================================== */

/* A C future held by Lua. The owner is the C half of a Lua future of this
 * context (made by fnew): that Lua future is the only thing that can settle
 * it, so when it is collected while pending, nothing ever will. */
typedef struct {
  corral_future *f; /* first: a cfref is also a corral_future ** */
  corral_context *owner;
} cfref;

static corral_future **cf_check(lua_State *L, int idx) {
  return (corral_future **)luaL_checkudata(L, idx, CFUTURE_MT);
}

static void cf_push_owned(lua_State *L, corral_future *f, corral_context *owner) {
  cfref *p = lua_newuserdata(L, sizeof *p);
  p->f = f;
  p->owner = owner;
  luaL_getmetatable(L, CFUTURE_MT);
  lua_setmetatable(L, -2);
}

static void cf_push(lua_State *L, corral_future *f) { cf_push_owned(L, f, NULL); }

static int cf_gc(lua_State *L) {
  cfref *p = lua_touserdata(L, 1);
  corral_future *f = p->f;
  p->f = NULL;
  if (f == NULL) return 0;
  /* No lock here: an abandoned future is settled at the next drain. */
  if (p->owner != NULL && corral_future_state(f) < CORRAL_DONE &&
      !(atomic_load(&f->flags) & FUTURE_HOST) && atomic_load(&f->refs) > 1)
    corral__ctx_defer(p->owner, f);
  else
    corral_future_release(f); /* atomic; frees without locking */
  return 0;
}

static int l_fnew(lua_State *L) {
  corral_future *f = corral__future_new();
  if (f == NULL) return luaL_error(L, "corral: out of memory");
  cf_push_owned(L, f, corral__ctx_of(L));
  return 1;
}

static int l_fstart(lua_State *L) {
  lua_pushboolean(L, corral__future_start(*cf_check(L, 1)) == 0);
  return 1;
}

static int l_fsettle(lua_State *L) {
  corral_future *f = *cf_check(L, 1);
  int state = (int)luaL_checkinteger(L, 2);
  atomic_fetch_or(&f->flags, FUTURE_SEEN);
  lua_pushboolean(L, corral__future_settle(f, (corral_state)state, NULL, 0) == 0);
  return 1;
}

/* fcancel(c): cancel under the cancel rule (pending, or running but
 * suspended at a wait): true when it took effect. */
static int l_fcancel(lua_State *L) {
  corral_future *f = *cf_check(L, 1);
  int ok = corral__future_cancel(f) == 0;
  if (ok) atomic_fetch_or(&f->flags, FUTURE_SEEN);
  lua_pushboolean(L, ok);
  return 1;
}

static int l_fstate(lua_State *L) {
  lua_pushinteger(L, corral_future_state(*cf_check(L, 1)));
  return 1;
}

/* The decoded payload of a settled C future: results as a table {n=...}; or
 * nil and why they cannot be decoded here (a CodecError's message). */
static int l_fvalues(lua_State *L) {
  corral_future *f = *cf_check(L, 1);
  const void *mp;
  size_t len;
  if (corral_future_payload(f, &mp, &len) != 0 || len == 0) {
    lua_createtable(L, 0, 1);
    lua_pushinteger(L, 0);
    lua_setfield(L, -2, "n");
    return 1;
  }
  int base = lua_gettop(L);
  int n = corral__codec_decode(L, mp, len, NULL, corral__future_trust(f) | CODEC_AS_RESULT);
  if (n < 0) {
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
  }
  atomic_fetch_add_explicit(&corral__ctx_of(L)->decodes, 1, memory_order_relaxed);
  lua_createtable(L, n, 1);
  lua_insert(L, base + 1);
  for (int i = n; i >= 1; i--)
    lua_rawseti(L, base + 1, i);
  lua_pushinteger(L, n);
  lua_setfield(L, -2, "n");
  return 1;
}

/* Register the home context's interest; returns the future's key, or false
 * when it has settled already. */
static int l_fwatch(lua_State *L) {
  corral_future *f = *cf_check(L, 1);
  int rc = corral__future_watch(f, corral__ctx_of(L), corral__ctx_post);
  if (rc < 0) return luaL_error(L, "corral: out of memory");
  if (rc == 1)
    lua_pushboolean(L, 0);
  else
    lua_pushlightuserdata(L, f);
  return 1;
}

static int l_fkey(lua_State *L) {
  lua_pushlightuserdata(L, *cf_check(L, 1));
  return 1;
}

/* ======================================================================== */
/* The loop                                                                  */
/* ======================================================================== */

typedef struct {
  lua_State *L;
  int n;
} drain_ud;

static void drain_one(void *ud, corral_future *f) {
  drain_ud *d = ud;
  lua_pushlightuserdata(d->L, f);
  lua_rawseti(d->L, 1, ++d->n);
}

static void push_stopping(void *ud, corral_worker *w) {
  lua_State *L = ud;
  corral_future_retain(w->stopped);
  cf_push(L, w->stopped);
  lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
}

/* drain(t): settles what the collector left (abandoned futures, dropped
 * workers), fills t[1..n] with the keys of watched futures that settled;
 * returns n, the number of a SIGINT/SIGTERM that arrived (or 0), and the
 * C futures that settle when the dropped workers have ended (or nil). */
static int l_drain(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  corral_context *c = corral__ctx_of(L);
  int stopping = 0;
  if (c->deferred != NULL)
    corral__ctx_run_deferred(
        c, "CancelledError",
        "abandoned: the future was collected before it settled, so nothing can "
        "settle it");
  if (c->worker == NULL && atomic_exchange(&c->rt->orphans, 0)) {
    lua_newtable(L);
    corral__worker_stop_orphans(c->rt, push_stopping, L);
    stopping = lua_objlen(L, -1) > 0;
  }
  drain_ud d = {L, 0};
  corral__ctx_drain(c, drain_one, &d);
  lua_pushinteger(L, d.n);
  lua_pushinteger(L, c->worker == NULL ? corral__signal_take_stop() : 0);
  if (stopping)
    lua_pushvalue(L, 2);
  else
    lua_pushnil(L);
  return 3;
}

/* reap(): join the workers that ended after their last handle went. */
static int l_reap(lua_State *L) {
  corral__worker_reap(rt_of(L));
  return 0;
}

/* quiescent(): 1 nothing in the process can make progress any more; 2 only
 * workers asked to stop can; 0 otherwise. */
static int l_quiescent(lua_State *L) {
  lua_pushinteger(L, corral__ctx_quiescent(corral__ctx_of(L)));
  return 1;
}

static int l_poll(lua_State *L) {
  corral__ctx_poll(corral__ctx_of(L), (int)luaL_checkinteger(L, 1));
  return 0;
}

static int l_now(lua_State *L) {
  lua_pushnumber(L, (lua_Number)uv_hrtime() * 1e-9);
  return 1;
}

static int l_catch_signals(lua_State *L) {
  corral__signal_catch_stop(corral__ctx_of(L));
  return 0;
}

/* exit_fast(): the runner ends after an error or a signal: closing cancels
 * the workers' calls instead of draining them. */
static int l_exit_fast(lua_State *L) {
  rt_of(L)->exit_fast = 1;
  return 0;
}

static int l_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

/* exit(code): report unretrieved errors, flush, end the process at once. */
static int l_exit(lua_State *L) {
  int code = (int)luaL_optinteger(L, 1, 0);
  corral__reporter_all(corral__ctx_of(L));
  fflush(NULL);
  exit(code);
  return 0;
}

/* print(...): like Lua's, but the whole line goes out in one write to
 * stdout, so that lines printed by several threads never mix. */
static int l_print(lua_State *L) {
  int n = lua_gettop(L);
  luaL_Buffer b;
  lua_getglobal(L, "tostring");
  luaL_buffinit(L, &b);
  for (int i = 1; i <= n; i++) {
    lua_pushvalue(L, n + 1);
    lua_pushvalue(L, i);
    lua_call(L, 1, 1);
    if (!lua_isstring(L, -1)) return luaL_error(L, "'tostring' must return a string to 'print'");
    if (i > 1) luaL_addlstring(&b, "\t", 1);
    luaL_addvalue(&b);
  }
  luaL_addlstring(&b, "\n", 1);
  luaL_pushresult(&b);
  size_t len;
  const char *line = lua_tolstring(L, -1, &len);
  fwrite(line, 1, len, stdout);
  return 0;
}

static int l_versions(lua_State *L) {
  lua_createtable(L, 0, 4);
  lua_pushstring(L, CORRAL_VERSION);
  lua_setfield(L, -2, "corral");
  lua_pushstring(L, LUAJIT_VERSION);
  lua_setfield(L, -2, "luajit");
  lua_pushstring(L, uv_version_string());
  lua_setfield(L, -2, "libuv");
  lua_pushstring(L, msgpack_version());
  lua_setfield(L, -2, "msgpack");
  return 1;
}

/* ======================================================================== */
/* Reporters of unretrieved errors                                           */
/* ======================================================================== */

/* reporter(text): a userdata that writes text to stderr when it is
 * collected (or at exit) unless disarmed first. Its __gc runs no Lua and
 * takes no lock: it writes with write(2). */
static int l_reporter(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  corral_reporter *r = lua_newuserdata(L, sizeof *r + len);
  corral__reporter_init(r, corral__ctx_of(L), s, len);
  luaL_getmetatable(L, REPORTER_MT);
  lua_setmetatable(L, -2);
  return 1;
}

static int l_disarm(lua_State *L) {
  corral__reporter_disarm(luaL_checkudata(L, 1, REPORTER_MT));
  return 0;
}

static int reporter_gc(lua_State *L) {
  corral__reporter_collected(lua_touserdata(L, 1));
  return 0;
}

/* ======================================================================== */
/* Codec                                                                     */
/* ======================================================================== */

static int codec_error(lua_State *L, const char *err) {
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

static int l_encode(lua_State *L) {
  codec_opts o = {0};
  size_t len;
  char *buf = corral__codec_encode(L, 1, lua_gettop(L), &len, &o);
  if (buf == NULL) return codec_error(L, o.err);
  if (o.has_refs) { /* a string cannot hold references */
    corral__codec_discard(buf, len);
    free(buf);
    return codec_error(L, "futures and workers cannot be encoded into a string");
  }
  lua_pushlstring(L, buf, len);
  free(buf);
  return 1;
}

/* Raise a CodecError (corral.errors) with the message on top of the stack. */
static int raise_codec_error(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  lua_getfield(L, -1, "corral.errors");
  if (lua_istable(L, -1)) {
    lua_getfield(L, -1, "new");
    lua_pushliteral(L, "CodecError");
    lua_pushvalue(L, -5);
    lua_pushnil(L);
    lua_pushinteger(L, 2);
    lua_call(L, 4, 1);
  } else {
    lua_pushvalue(L, -3);
  }
  return lua_error(L);
}

/* decode(s): the values of a MessagePack array from outside the process
 * (foreign bytes); raises a CodecError when they cannot be decoded. */
static int l_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  lua_settop(L, 1);
  int n = corral__codec_decode(L, s, len, NULL, CODEC_FOREIGN);
  if (n < 0) return raise_codec_error(L);
  return n;
}

/* fsettle_encode(c, state, ...): encode the values (or, for a failure, the
 * error) and settle the C future with them. Returns true, false when it
 * was settled already, or nil and the reason they cannot travel. */
static int l_fsettle_encode(lua_State *L) {
  corral_future *f = *cf_check(L, 1);
  int state = (int)luaL_checkinteger(L, 2);
  codec_opts o = {0};
  o.what = state == CORRAL_DONE ? "result" : "error";
  if (lua_type(L, 3) == LUA_TSTRING && lua_objlen(L, 3) > 4096) o.size_hint = lua_objlen(L, 3) + 64;
  size_t len;
  char *buf = corral__codec_encode(L, 3, lua_gettop(L) - 2, &len, &o);
  if (buf == NULL) return codec_error(L, o.err);
  atomic_fetch_add_explicit(&corral__ctx_of(L)->encodes, 1, memory_order_relaxed);
  atomic_fetch_or(&f->flags, FUTURE_SEEN);
  lua_pushboolean(L, corral__future_settle_refs(f, (corral_state)state, buf, len,
                                                o.has_refs ? corral__codec_discard : NULL) == 0);
  return 1;
}

static int l_fset_error(lua_State *L) {
  corral_future *f = *cf_check(L, 1);
  atomic_fetch_or(&f->flags, FUTURE_SEEN);
  lua_pushboolean(L,
                  corral_future_set_error(f, luaL_checkstring(L, 2), luaL_checkstring(L, 3)) == 0);
  return 1;
}

/* ======================================================================== */
/* Workers                                                                   */
/* ======================================================================== */

static corral_worker *w_check(lua_State *L, int idx) {
  return *(corral_worker **)luaL_checkudata(L, idx, WORKER_MT);
}

static void w_push(lua_State *L, corral_worker *w) {
  corral_worker **p = lua_newuserdata(L, sizeof(corral_worker *));
  *p = w;
  luaL_getmetatable(L, WORKER_MT);
  lua_setmetatable(L, -2);
}

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
static void w_push_handle(lua_State *L, corral_worker *w) {
  atomic_fetch_add(&w->handles, 1);
  w_push(L, w);
}

/* worker_start(name, cap, ...): a thread worker whose Lua main receives
 * the other arguments (class, options, init arguments). Returns it, or nil
 * and why it cannot start. */
static int l_worker_start(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  lua_Number cap = luaL_checknumber(L, 2);
  luaL_argcheck(L, cap >= 1 && cap <= 0x7fffffff, 2, "inbox bound out of range");
  static const char *const lead[] = {"class", "options"};
  codec_opts o = {0};
  o.what = "init";
  o.offset = 2;
  o.lead = lead;
  size_t len;
  char *boot = corral__codec_encode(L, 3, lua_gettop(L) - 2, &len, &o);
  if (boot == NULL) return codec_error(L, o.err);
  int err;
  corral_worker *w = corral__worker_start(rt_of(L), name, boot, len, o.has_refs, (int)cap,
                                          corral__lcore_worker_main, &err);
  if (w == NULL) {
    if (o.has_refs) corral__codec_discard(boot, len);
    free(boot);
    lua_pushnil(L);
    lua_pushfstring(L, "cannot start a thread for worker %s: %s", name,
                    err == CORRAL_ENOMEM ? "out of memory" : uv_strerror(err));
    return 2;
  }
  w_push(L, w); /* its handle was counted at birth */
  return 1;
}

static corral_call *call_check(lua_State *L, int idx) {
  corral_call *c = *(corral_call **)luaL_checkudata(L, idx, CALL_MT);
  if (c == NULL) luaL_error(L, "corral: call already finished");
  return c;
}

static void call_push(lua_State *L, corral_call *c) {
  corral_call **p = lua_newuserdata(L, sizeof(corral_call *));
  *p = c;
  luaL_getmetatable(L, CALL_MT);
  lua_setmetatable(L, -2);
}

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
  if (lua_type(L, 3) == LUA_TSTRING && lua_objlen(L, 3) > 4096) o.size_hint = lua_objlen(L, 3) + 64;
  size_t len;
  char *payload = corral__codec_encode(L, 3, lua_gettop(L) - 2, &len, &o);
  if (payload == NULL) {
    for (int i = 0; i < o.ndeps; i++)
      corral_future_release(o.deps[i]);
    free(o.deps);
    lua_pushnil(L);
    lua_pushliteral(L, "codec");
    lua_pushstring(L, o.err);
    return 3;
  }
  atomic_fetch_add_explicit(&corral__ctx_of(L)->encodes, 1, memory_order_relaxed);
  /* an input's failure is reported through this call */
  for (int i = 0; i < o.ndeps; i++)
    atomic_fetch_or(&o.deps[i]->flags, FUTURE_DEP);
  corral_future *result = corral__future_new();
  corral_call *c =
      result ? corral__call_new(method, mlen, result, payload, len, o.has_refs, o.deps, o.ndeps)
             : NULL;
  if (c == NULL) {
    if (o.has_refs) corral__codec_discard(payload, len);
    free(payload);
    for (int i = 0; i < o.ndeps; i++)
      corral_future_release(o.deps[i]);
    free(o.deps);
    corral_future_release(result);
    return luaL_error(L, "corral: out of memory");
  }
  corral_future_retain(result);
  /* the caller's loop hears of the result through a watch made here */
  if (corral__future_watch(result, corral__ctx_of(L), corral__ctx_post) < 0) {
    corral__call_free(c);
    return luaL_error(L, "corral: out of memory");
  }
  corral_future *accepted;
  int rc = corral__worker_push(w, c, &accepted);
  if (rc == 0) {
    cf_push(L, result);
    lua_pushlightuserdata(L, result);
    return 2;
  }
  lua_pushnil(L);
  if (rc == CORRAL_EAGAIN) { /* the worker holds it; the caller waits for room */
    lua_pushliteral(L, "full");
    cf_push(L, result);
    cf_push(L, accepted);
    lua_pushlightuserdata(L, result);
    return 5;
  }
  corral__call_free(c); /* refused: still the caller's */
  if (rc == CORRAL_ECRASHED) fail_crashed(w, result);
  push_status(L, rc);
  cf_push(L, result); /* its watch still waits: it fails */
  lua_pushnil(L);
  lua_pushlightuserdata(L, result);
  return 5;
}

static int l_wactive(lua_State *L) {
  lua_pushinteger(L, atomic_load(&w_check(L, 1)->active));
  return 1;
}

/* wstop(w, drain): ask it to stop; returns the C future settled when its
 * thread has ended. */
static int l_wstop(lua_State *L) {
  corral_worker *w = w_check(L, 1);
  corral__worker_stop(w, lua_toboolean(L, 2) ? WORKER_DRAIN : WORKER_CANCEL);
  corral_future_retain(w->stopped);
  cf_push(L, w->stopped);
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
  corral_runtime *rt = rt_of(L);
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
  corral_runtime *rt = rt_of(L);
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
    w_push_handle(L, ws[i]);
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
    if (buf != NULL) corral__codec_discard(buf, len);
    free(buf);
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
  if (ok) corral__worker_set_current(self_worker(L), c->method, c->mlen);
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
  cf_push(L, c->result);
  return 1;
}

/* call_deps(call): its inputs, as C futures. */
static int l_call_deps(lua_State *L) {
  corral_call *c = call_check(L, 1);
  lua_createtable(L, c->ndeps, 0);
  for (int i = 0; i < c->ndeps; i++) {
    corral_future_retain(c->deps[i]);
    cf_push(L, c->deps[i]);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
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
  if (c->payload_refs) corral__codec_discard(c->payload, c->len);
  free(c->payload);
  c->payload = NULL;
  c->len = 0;
  c->payload_refs = 0;
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
  corral_call **p = (corral_call **)luaL_checkudata(L, 1, CALL_MT);
  if (*p == NULL) return luaL_error(L, "corral: call already finished");
  corral_future *f = (*p)->result;
  if (lua_isnoneornil(L, 2)) {
    /* nothing to settle */
  } else if (lua_tointeger(L, 2) == CORRAL_CANCELLED) {
    corral__future_settle(f, CORRAL_CANCELLED, NULL, 0);
  } else {
    int state = (int)luaL_checkinteger(L, 2);
    codec_opts o = {0};
    o.what = state == CORRAL_DONE ? "result" : "error";
    if (lua_type(L, 3) == LUA_TSTRING && lua_objlen(L, 3) > 4096)
      o.size_hint = lua_objlen(L, 3) + 64;
    size_t len;
    char *buf = corral__codec_encode(L, 3, lua_gettop(L) - 2, &len, &o);
    if (buf == NULL) return codec_error(L, o.err);
    atomic_fetch_add_explicit(&corral__ctx_of(L)->encodes, 1, memory_order_relaxed);
    corral__future_settle_refs(f, (corral_state)state, buf, len,
                               o.has_refs ? corral__codec_discard : NULL);
  }
  call_done(L, p);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_set_tasks(lua_State *L) {
  atomic_store(&corral__ctx_of(L)->tasks, (long)luaL_checkinteger(L, 1));
  return 0;
}

static void stats_row(lua_State *L, corral_context *c, const char *name, int queued, int active,
                      const char *running) {
  lua_createtable(L, 0, 7);
  if (running != NULL && running[0] != '\0') {
    lua_pushstring(L, running);
    lua_setfield(L, -2, "running");
  }
  lua_pushstring(L, name);
  lua_setfield(L, -2, "name");
  lua_pushnumber(L, (lua_Number)atomic_load(&c->tasks));
  lua_setfield(L, -2, "tasks");
  lua_pushnumber(L, (lua_Number)atomic_load(&c->encodes));
  lua_setfield(L, -2, "encodes");
  lua_pushnumber(L, (lua_Number)atomic_load(&c->decodes));
  lua_setfield(L, -2, "decodes");
  lua_pushinteger(L, queued);
  lua_setfield(L, -2, "queued");
  lua_pushinteger(L, active);
  lua_setfield(L, -2, "active");
}

/* stats(): one row per context, the home context first. */
static int l_stats(lua_State *L) {
  corral_runtime *rt = rt_of(L);
  lua_newtable(L);
  stats_row(L, &rt->home, "home", 0, 0, NULL);
  lua_rawseti(L, -2, 1);
  int i = 2;
  uv_mutex_lock(&rt->wlock);
  for (queue *q = queue_head(&rt->workers); q != &rt->workers; q = q->next) {
    corral_worker *w = queue_data(q, corral_worker, rt_node);
    char running[64];
    uv_mutex_lock(&w->ctx.qlock);
    int queued = w->queued;
    snprintf(running, sizeof running, "%s", w->current);
    uv_mutex_unlock(&w->ctx.qlock);
    stats_row(L, &w->ctx, w->name, queued, atomic_load(&w->active), running);
    lua_pushinteger(L, atomic_load(&w->handles));
    lua_setfield(L, -2, "handles");
    lua_rawseti(L, -2, i++);
  }
  uv_mutex_unlock(&rt->wlock);
  return 1;
}

/* The number of CPUs, read once (by the first state that loads corral, the
 * home one): uv_cpu_info opens files under /proc, which worker threads had
 * better not race with the descriptors libuv closes behind ThreadSanitizer. */
static atomic_int ncpu_cached;

static int ncpu(void) {
  int n = atomic_load(&ncpu_cached);
  if (n > 0) return n;
  uv_cpu_info_t *info;
  int count;
  n = 1;
  if (uv_cpu_info(&info, &count) == 0) {
    if (count > 0) n = count;
    uv_free_cpu_info(info, count);
  }
  atomic_store(&ncpu_cached, n);
  return n;
}

static int l_ncpu(lua_State *L) {
  lua_pushinteger(L, ncpu());
  return 1;
}

/* debug_counts(): live C objects, for leak specs: the codec's own blocks,
 * futures, and handles issued. */
static int l_debug_counts(lua_State *L) {
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, corral__codec_live());
  lua_setfield(L, -2, "codec");
  lua_pushinteger(L, corral__future_live());
  lua_setfield(L, -2, "futures");
  lua_pushinteger(L, corral__handle_live());
  lua_setfield(L, -2, "handles");
  return 1;
}

/* codec_fail_alloc(n): the codec's nth C allocation from now fails (0: none). */
static int l_codec_fail_alloc(lua_State *L) {
  corral__codec_fail_alloc((int)luaL_checkinteger(L, 1));
  return 0;
}

static int l_is_worker(lua_State *L) {
  corral_context *c = corral__ctx_of(L);
  if (c->worker == NULL) return 0;
  lua_pushstring(L, c->worker->name);
  return 1;
}

/* ======================================================================== */
/* Module                                                                    */
/* ======================================================================== */

static int l_inject_fault(lua_State *L);

static const luaL_Reg core_funcs[] = {{"fnew", l_fnew},
                                      {"fstart", l_fstart},
                                      {"fsettle", l_fsettle},
                                      {"fstate", l_fstate},
                                      {"fvalues", l_fvalues},
                                      {"fwatch", l_fwatch},
                                      {"fkey", l_fkey},
                                      {"fsettle_encode", l_fsettle_encode},
                                      {"fset_error", l_fset_error},
                                      {"fcancel", l_fcancel},
                                      {"drain", l_drain},
                                      {"poll", l_poll},
                                      {"now", l_now},
                                      {"catch_signals", l_catch_signals},
                                      {"exit_fast", l_exit_fast},
                                      {"quiescent", l_quiescent},
                                      {"reap", l_reap},
                                      {"inject_fault", l_inject_fault},
                                      {"print", l_print},
                                      {"isatty", l_isatty},
                                      {"exit", l_exit},
                                      {"versions", l_versions},
                                      {"reporter", l_reporter},
                                      {"disarm", l_disarm},
                                      {"encode", l_encode},
                                      {"decode", l_decode},
                                      {"worker_start", l_worker_start},
                                      {"wcall", l_wcall},
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
                                      {"call_finish", l_call_finish},
                                      {"set_tasks", l_set_tasks},
                                      {"stats", l_stats},
                                      {"ncpu", l_ncpu},
                                      {"is_worker", l_is_worker},
                                      {"debug_counts", l_debug_counts},
                                      {"codec_fail_alloc", l_codec_fail_alloc},
                                      {NULL, NULL}};

static int runtime_gc(lua_State *L) {
  corral_runtime **p = lua_touserdata(L, 1);
  /* The runtime's finalizer runs as the state closes, after every other
   * corral object's. It is the one __gc that takes locks: withdrawing the
   * loop's watches from futures that other threads may still settle. */
  if (*p != NULL) corral__rt_destroy(*p);
  *p = NULL;
  return 0;
}

static int preload_module(lua_State *L) {
  const char *name = lua_tostring(L, 1);
  for (const corral_lua_module *m = corral_lua_modules; m->name != NULL; m++) {
    if (strcmp(m->name, name) == 0) {
      if (luaL_loadbuffer(L, (const char *)m->code, m->size, m->name) != 0) return lua_error(L);
      lua_pushstring(L, name);
      lua_call(L, 1, 1);
      return 1;
    }
  }
  return luaL_error(L, "corral: no embedded module %s", name);
}

static const corral__codec_iface codec_iface = {corral__lcore_push_future, corral__worker_handle,
                                                corral__worker_hold_handle,
                                                corral__worker_drop_handle, corral__worker_release};

int luaopen_corral(lua_State *L) {
  corral__codec_init(&codec_iface);
  corral_runtime *rt = rt_of(L);
  if (rt == NULL) {
    /* A sentinel userdata owns the runtime and closes it with the state. */
    corral_runtime **p = lua_newuserdata(L, sizeof(corral_runtime *));
    *p = NULL;
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, runtime_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_setfield(L, LUA_REGISTRYINDEX, "corral.sentinel");
    rt = corral__rt_create(L, 0);
    if (rt == NULL) return luaL_error(L, "corral: cannot start the runtime");
    ncpu(); /* read here, before any worker thread runs */
    lua_getfield(L, LUA_REGISTRYINDEX, "corral.sentinel");
    *(corral_runtime **)lua_touserdata(L, -1) = rt;
    lua_pop(L, 1);
    lua_pushlightuserdata(L, rt);
    lua_setfield(L, LUA_REGISTRYINDEX, RUNTIME_KEY);
    lua_pushlightuserdata(L, &rt->home);
    lua_setfield(L, LUA_REGISTRYINDEX, CONTEXT_KEY);
  }

  luaL_newmetatable(L, CFUTURE_MT);
  lua_pushcfunction(L, cf_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, REPORTER_MT);
  lua_pushcfunction(L, reporter_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, WORKER_MT);
  lua_pushcfunction(L, w_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, CALL_MT);
  lua_pushcfunction(L, call_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);

  /* package.preload[name] for each embedded Lua module */
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  for (const corral_lua_module *m = corral_lua_modules; m->name != NULL; m++) {
    lua_pushcfunction(L, preload_module);
    lua_setfield(L, -2, m->name);
  }
  lua_pop(L, 1);
  lua_getfield(L, -1, "loaded");
  lua_newtable(L);
  luaL_register(L, NULL, core_funcs);
  lua_setfield(L, -2, "corral.core");
  lua_pop(L, 2);

  lua_getglobal(L, "require");
  lua_pushliteral(L, "corral.init");
  lua_call(L, 1, 1);
  /* The scheduler publishes its hooks for the C side. */
  lua_getfield(L, -1, "_wrap");
  lua_setfield(L, LUA_REGISTRYINDEX, WRAP_KEY);
  lua_getfield(L, -1, "_drive");
  lua_setfield(L, LUA_REGISTRYINDEX, DRIVE_KEY);
  lua_getfield(L, -1, "_cref");
  lua_setfield(L, LUA_REGISTRYINDEX, CREF_KEY);
  lua_getfield(L, -1, "_import_worker");
  lua_setfield(L, LUA_REGISTRYINDEX, IMPORT_KEY);
  return 1;
}

/* ======================================================================== */
/* Bridges for the C API                                                     */
/* ======================================================================== */

void corral__lcore_push_future(lua_State *L, corral_future *f) {
  lua_getfield(L, LUA_REGISTRYINDEX, WRAP_KEY);
  corral_future_retain(f);
  cf_push(L, f);
  lua_call(L, 1, 1);
}

/* The public bridges hand a future to host code, which may settle it. */
void corral_push_future(lua_State *L, corral_future *f) {
  corral__future_mark_host(f);
  corral__lcore_push_future(L, f);
}

corral_future *corral_to_future(lua_State *L, int idx) {
  corral_future *f = corral__lcore_to_future(L, idx);
  if (f != NULL) corral__future_mark_host(f);
  return f;
}

corral_future *corral__lcore_to_future(lua_State *L, int idx) {
  if (idx < 0 && idx > LUA_REGISTRYINDEX) idx = lua_gettop(L) + idx + 1;
  if (lua_type(L, idx) != LUA_TTABLE || !lua_getmetatable(L, idx)) return NULL;
  lua_getfield(L, -1, "__future");
  int is_future = lua_toboolean(L, -1);
  lua_pop(L, 2);
  if (!is_future) return NULL;
  /* cref gives the C half, making it when the future was local so far */
  lua_getfield(L, LUA_REGISTRYINDEX, CREF_KEY);
  lua_pushvalue(L, idx);
  lua_call(L, 1, 1);
  corral_future **p = luaL_testudata(L, -1, CFUTURE_MT);
  lua_pop(L, 1);
  return p ? *p : NULL;
}

int corral__lcore_drive(lua_State *L, int block) {
  lua_getfield(L, LUA_REGISTRYINDEX, DRIVE_KEY);
  lua_pushboolean(L, block);
  if (lua_pcall(L, 1, 1, 0) != 0) {
    fprintf(stderr, "corral: %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
    return CORRAL_ELUA;
  }
  int pending = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return pending;
}

/* The worker's Lua main, under lua_cpcall from the very first allocation:
 * a failure (no memory, a value of the boot payload that cannot be rebuilt
 * here) is an error, not a panic. */
static int worker_boot(lua_State *L) {
  corral_worker *w = lua_touserdata(L, 1);
  lua_settop(L, 0);
  luaL_openlibs(L);
  lua_pushlightuserdata(L, w->rt);
  lua_setfield(L, LUA_REGISTRYINDEX, RUNTIME_KEY);
  lua_pushlightuserdata(L, &w->ctx);
  lua_setfield(L, LUA_REGISTRYINDEX, CONTEXT_KEY);
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, luaopen_corral);
  lua_setfield(L, -2, "corral");
  lua_settop(L, 0);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "corral");
  lua_call(L, 1, 0);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "corral.worker_main");
  lua_call(L, 1, 1);
  /* what its code sees (os.exit ending the worker) is in place before the
   * class, options and init arguments are rebuilt here */
  lua_getfield(L, -1, "prepare");
  lua_call(L, 0, 0);
  lua_getfield(L, -1, "run");
  lua_pushstring(L, w->name);
  int n = corral__codec_decode(L, w->boot, w->bootlen, NULL, CODEC_TRUSTED | CODEC_AS_INIT);
  if (n < 0) return lua_error(L);
  /* rebuilt: the payload's references (workers it names) go now */
  if (w->boot_refs) corral__codec_discard(w->boot, w->bootlen);
  free(w->boot);
  w->boot = NULL;
  w->bootlen = 0;
  w->boot_refs = 0;
  w->booted = 1;
  lua_call(L, n + 1, 0);
  return 0;
}

typedef struct {
  corral_worker *w;
  const char *why;
} boot_failure;

/* corral.worker_main.died(name, why), protected (it may run out of memory
 * too). */
static int boot_died(lua_State *L) {
  boot_failure *b = lua_touserdata(L, 1);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "corral.worker_main");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "died");
  lua_pushstring(L, b->w->name);
  lua_pushstring(L, b->why);
  lua_pushboolean(L, b->w->booted);
  lua_call(L, 3, 0);
  return 0;
}

/* The worker died before or outside its Lua main: a WorkerCrashed built by
 * the errors module when it can be loaded, by C otherwise. */
static void boot_failed(lua_State *L, corral_worker *w) {
  char why[400];
  snprintf(why, sizeof why, "%s",
           lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "(an error object)");
  lua_pop(L, 1);
  boot_failure b = {w, why};
  if (lua_cpcall(L, boot_died, &b) == 0) return;
  char msg[512];
  snprintf(msg, sizeof msg, "worker %s crashed: %s: %s", w->name,
           w->booted ? "it failed" : "it could not start", why);
  size_t len;
  char *payload = corral__future_error_payload("WorkerCrashed", msg, &len);
  if (payload != NULL) corral__worker_crash(w, payload, len);
}

/* Tests: how many of the next worker Lua states cannot be made, and after
 * how many allocations the next one runs out of memory. */
static atomic_int inject_state, inject_alloc;

/* inject_fault(what, n): the next n thread starts ("thread") or worker Lua
 * states ("state") fail, or the next worker's Lua state runs out of memory
 * after n allocations ("alloc"), as when memory or threads run out. For
 * tests. */
static int l_inject_fault(lua_State *L) {
  const char *what = luaL_checkstring(L, 1);
  int n = (int)luaL_checkinteger(L, 2);
  if (strcmp(what, "thread") == 0)
    corral__worker_inject(n);
  else if (strcmp(what, "state") == 0)
    atomic_store(&inject_state, n);
  else if (strcmp(what, "alloc") == 0)
    atomic_store(&inject_alloc, n);
  else
    return luaL_argerror(L, 1, "\"thread\", \"state\" or \"alloc\"");
  return 0;
}

/* An allocator that refuses to grow after `*left` more allocations. */
static void *failing_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  int *left = ud;
  if (nsize == 0) {
    free(ptr);
    return NULL;
  }
  if (nsize > osize && (*left)-- <= 0) return NULL;
  return realloc(ptr, nsize);
}

void corral__lcore_worker_main(corral_worker *w) {
  int fail = atomic_load(&inject_state) > 0 && atomic_fetch_sub(&inject_state, 1) > 0;
  int after = atomic_exchange(&inject_alloc, 0), left = INT_MAX;
  lua_State *L = fail ? NULL : after > 0 ? lua_newstate(failing_alloc, &left) : luaL_newstate();
  left = after; /* LuaJIT cannot fail inside lua_newstate itself: count from here */
  if (L == NULL) {
    size_t len;
    char *payload = corral__future_error_payload(
        "WorkerCrashed", "the worker died: no memory for its Lua state", &len);
    if (payload != NULL) corral__worker_crash(w, payload, len);
    return;
  }
  w->ctx.L = L;
  if (lua_cpcall(L, worker_boot, w) != 0) boot_failed(L, w);
  lua_close(L);
  w->ctx.L = NULL;
  /* its Lua futures that were still pending can never settle now */
  char msg[128];
  snprintf(msg, sizeof msg, "worker %s stopped before this future settled", w->name);
  corral__ctx_run_deferred(&w->ctx, "ClosedError", msg);
}
