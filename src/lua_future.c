/* lua_future.c: C futures in Lua (the `corral.cfuture` userdata and the
 * `f*` primitives of corral.core), unretrieved-error reporters, and the
 * public bridges corral_push_future / corral_to_future. */
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

/* ======================================================================== */
/* C futures                                                                 */
/* ======================================================================== */

/* A C future held by Lua: a box whose second word is its owner, the context
 * of the Lua future whose C half it is (made by fnew): that Lua future is
 * the only thing that can settle it, so when it is collected while pending,
 * nothing ever will. */
corral_future **corral__lua_cf_check(lua_State *L, int idx) {
  return (corral_future **)&corral__box_check(L, idx, CFUTURE_MT)->p;
}

static void cf_push_owned(lua_State *L, corral_future *f, corral_context *owner) {
  corral__box_push(L, f, owner, CFUTURE_MT);
}

void corral__lua_cf_push(lua_State *L, corral_future *f) { cf_push_owned(L, f, NULL); }

static int cf_gc(lua_State *L) {
  corral__box *b = lua_touserdata(L, 1);
  corral_future *f = b->p;
  corral_context *owner = b->aux;
  b->p = NULL;
  if (f == NULL) return 0;
  /* No lock here: an abandoned future is settled at the next drain. */
  if (owner != NULL && corral_future_state(f) < CORRAL_DONE &&
      !(atomic_load(&f->flags) & FUTURE_HOST) && atomic_load(&f->refs) > 1)
    corral__ctx_defer(owner, f);
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
  lua_pushboolean(L, corral__future_start(*corral__lua_cf_check(L, 1)) == 0);
  return 1;
}

static int l_fsettle(lua_State *L) {
  corral_future *f = *corral__lua_cf_check(L, 1);
  int state = (int)luaL_checkinteger(L, 2);
  atomic_fetch_or(&f->flags, FUTURE_SEEN);
  lua_pushboolean(L, corral__future_settle(f, (corral_state)state, NULL, 0) == 0);
  return 1;
}

/* fcancel(c): cancel under the cancel rule (pending, or running but
 * suspended at a wait): true when it took effect. */
static int l_fcancel(lua_State *L) {
  corral_future *f = *corral__lua_cf_check(L, 1);
  int ok = corral__future_cancel(f) == 0;
  if (ok) atomic_fetch_or(&f->flags, FUTURE_SEEN);
  lua_pushboolean(L, ok);
  return 1;
}

/* fexpire(c, message): a call's time limit passed: fail it with a
 * TimeoutError unless it has settled, even while it runs (its worker sees
 * a settled call as a cancelled one at its next wait; a process worker's
 * proxy stops it, see process.c). True when it took effect. */
static int l_fexpire(lua_State *L) {
  corral_future *f = *corral__lua_cf_check(L, 1);
  const char *msg = luaL_checkstring(L, 2);
  size_t n;
  char *payload = corral__future_error_payload("TimeoutError", msg, &n);
  if (payload == NULL) return luaL_error(L, "out of memory");
  int ok = corral__future_settle(f, CORRAL_FAILED, payload, n) == 0;
  if (ok) atomic_fetch_or(&f->flags, FUTURE_SEEN);
  lua_pushboolean(L, ok);
  return 1;
}

static int l_fstate(lua_State *L) {
  lua_pushinteger(L, corral_future_state(*corral__lua_cf_check(L, 1)));
  return 1;
}

/* The decoded payload of a settled C future: the number of results and
 * the result itself (one), false (none) or a table {n=...} (more: the one
 * case that makes a table); or nil and why they cannot be decoded here (a
 * CodecError's message). */
static int l_fvalues(lua_State *L) {
  corral_future *f = *corral__lua_cf_check(L, 1);
  const void *mp;
  size_t len;
  if (corral_future_payload(f, &mp, &len) != 0 || len == 0) {
    lua_pushinteger(L, 0);
    lua_pushboolean(L, 0);
    return 2;
  }
  int base = lua_gettop(L);
  int n = corral__codec_decode(L, mp, len, NULL, corral__future_trust(f) | CODEC_AS_RESULT);
  if (n < 0) {
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
  }
  atomic_fetch_add_explicit(&corral__ctx_of(L)->decodes, 1, memory_order_relaxed);
  if (n <= 1) {
    lua_pushinteger(L, n);
    if (n == 1)
      lua_insert(L, -2);
    else
      lua_pushboolean(L, 0);
    return 2;
  }
  lua_createtable(L, n, 1);
  lua_insert(L, base + 1);
  for (int i = n; i >= 1; i--)
    lua_rawseti(L, base + 1, i);
  lua_pushinteger(L, n);
  lua_setfield(L, -2, "n");
  lua_pushinteger(L, n);
  lua_insert(L, base + 1);
  return 2;
}

/* Register the home context's interest; returns the future's key, or false
 * when it has settled already. */
static int l_fwatch(lua_State *L) {
  corral_future *f = *corral__lua_cf_check(L, 1);
  int rc = corral__future_watch(f, corral__ctx_of(L), corral__ctx_post);
  if (rc < 0) return luaL_error(L, "corral: out of memory");
  if (rc == 1)
    lua_pushboolean(L, 0);
  else
    lua_pushlightuserdata(L, f);
  return 1;
}

static int l_fkey(lua_State *L) {
  lua_pushlightuserdata(L, *corral__lua_cf_check(L, 1));
  return 1;
}

/* ======================================================================== */
/* Reporters of unretrieved errors                                           */
/* ======================================================================== */

/* reporter(text[, c]): a userdata that writes text to stderr when it is
 * collected (or at exit) unless disarmed first (or c, its future's C half,
 * has become an input of a call, which reports the failure instead). Its __gc runs no Lua and
 * takes no lock: it writes with write(2). */
static int l_reporter(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  corral_future *f = lua_isnoneornil(L, 2) ? NULL : *corral__lua_cf_check(L, 2);
  corral_reporter *r = lua_newuserdata(L, sizeof *r + len);
  corral__reporter_init(r, corral__ctx_of(L), s, len);
  if (f != NULL) corral__reporter_attach(r, f);
  luaL_getmetatable(L, REPORTER_MT);
  lua_setmetatable(L, -2);
  return 1;
}

/* reporter_attach(r, c): r reports the failure of the Lua future whose C
 * half c was made after it failed. */
static int l_reporter_attach(lua_State *L) {
  corral_reporter *r = luaL_checkudata(L, 1, REPORTER_MT);
  corral__reporter_attach(r, *corral__lua_cf_check(L, 2));
  return 0;
}

static int l_disarm(lua_State *L) {
  corral__reporter_disarm(luaL_checkudata(L, 1, REPORTER_MT));
  return 0;
}

static int reporter_gc(lua_State *L) {
  corral__reporter_collected(lua_touserdata(L, 1));
  return 0;
}

int corral__lua_settle_encoded(lua_State *L, corral_future *f, int state) {
  codec_opts o = {0};
  o.what = state == CORRAL_DONE ? "result" : "error";
  size_t len;
  char *buf = corral__codec_encode(L, 3, lua_gettop(L) - 2, &len, &o);
  if (buf == NULL) {
    corral__lua_codec_error(L, o.err);
    return -1;
  }
  atomic_fetch_add_explicit(&corral__ctx_of(L)->encodes, 1, memory_order_relaxed);
  return corral__future_settle_refs(f, (corral_state)state, buf, len,
                                    o.has_refs ? corral__codec_discard : NULL) == 0;
}

/* fsettle_encode(c, state, ...): encode the values (or, for a failure, the
 * error) and settle the C future with them. Returns true, false when it
 * was settled already, or nil and the reason they cannot travel. */
static int l_fsettle_encode(lua_State *L) {
  corral_future *f = *corral__lua_cf_check(L, 1);
  int state = (int)luaL_checkinteger(L, 2);
  atomic_fetch_or(&f->flags, FUTURE_SEEN);
  int rc = corral__lua_settle_encoded(L, f, state);
  if (rc < 0) return 2;
  lua_pushboolean(L, rc);
  return 1;
}

static int l_fset_error(lua_State *L) {
  corral_future *f = *corral__lua_cf_check(L, 1);
  atomic_fetch_or(&f->flags, FUTURE_SEEN);
  lua_pushboolean(L,
                  corral__future_set_error(f, luaL_checkstring(L, 2), luaL_checkstring(L, 3)) == 0);
  return 1;
}

/* ======================================================================== */
/* Bridges for the C API                                                     */
/* ======================================================================== */

void corral__lcore_push_future(lua_State *L, corral_future *f) {
  lua_getfield(L, LUA_REGISTRYINDEX, WRAP_KEY);
  corral_future_retain(f);
  corral__lua_cf_push(L, f);
  lua_call(L, 1, 1);
}

/* The public bridges hand a future to host code, which may settle it. */
void corral_push_future(lua_State *L, corral_future *f) {
  corral_runtime *rt = corral__lua_rt(L);
  corral__future_mark_host(f, rt != NULL ? rt->hc : NULL);
  corral__lcore_push_future(L, f);
}

corral_future *corral_to_future(lua_State *L, int idx) {
  corral_future *f = corral__lcore_to_future(L, idx);
  corral_runtime *rt = corral__lua_rt(L);
  if (f != NULL) corral__future_mark_host(f, rt != NULL ? rt->hc : NULL);
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

/* For the codec: the C half of the Lua future at idx (cref, protected: a
 * table that only claims to be a future may raise there). */
corral_future *corral__lua_future_of(lua_State *L, int idx, int *deferred) {
  lua_getfield(L, LUA_REGISTRYINDEX, CREF_KEY);
  lua_pushvalue(L, idx);
  lua_pushboolean(L, 1);
  if (lua_pcall(L, 2, 2, 0) != 0) {
    lua_pop(L, 1);
    return NULL;
  }
  *deferred = lua_toboolean(L, -1);
  corral__box *b = luaL_testudata(L, -2, CFUTURE_MT);
  lua_pop(L, 2);
  return b != NULL ? b->p : NULL;
}

/* For the codec: settle the C halves an encode made of settled futures. */
void corral__lua_flush_crefs(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, FLUSH_KEY);
  if (lua_pcall(L, 0, 0, 0) != 0) lua_pop(L, 1);
}

void corral__lua_future_open(lua_State *L) {
  corral__box_kind(L, CFUTURE_MT, cf_gc);
  corral__box_kind(L, REPORTER_MT, reporter_gc);
}

const luaL_Reg corral__lua_future_funcs[] = {{"fnew", l_fnew},
                                             {"fstart", l_fstart},
                                             {"fsettle", l_fsettle},
                                             {"fstate", l_fstate},
                                             {"fvalues", l_fvalues},
                                             {"fwatch", l_fwatch},
                                             {"fkey", l_fkey},
                                             {"fsettle_encode", l_fsettle_encode},
                                             {"fset_error", l_fset_error},
                                             {"fcancel", l_fcancel},
                                             {"fexpire", l_fexpire},
                                             {"reporter", l_reporter},
                                             {"reporter_attach", l_reporter_attach},
                                             {"disarm", l_disarm},
                                             {NULL, NULL}};
