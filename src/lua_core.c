/* lua_core.c: the C primitives under the Lua API (the `corral.core` table),
 * the future and reporter userdata, and `luaopen_corral`. */
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

#define CFUTURE_MT  "corral.cfuture"
#define REPORTER_MT "corral.reporter"
#define RUNTIME_KEY "corral.runtime"
#define WRAP_KEY    "corral.wrap"
#define DRIVE_KEY   "corral.drive"
#define CREF_KEY    "corral.cref"

static corral_runtime *rt_of(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, RUNTIME_KEY);
  corral_runtime *rt = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return rt;
}

corral_runtime *corral_from_lua(lua_State *L) { return rt_of(L); }

/* ======================================================================== */
/* C futures                                                                 */
/* ======================================================================== */

static corral_future **cf_check(lua_State *L, int idx) {
  return (corral_future **)luaL_checkudata(L, idx, CFUTURE_MT);
}

static void cf_push(lua_State *L, corral_future *f) {
  corral_future **p = lua_newuserdata(L, sizeof(corral_future *));
  *p = f;
  luaL_getmetatable(L, CFUTURE_MT);
  lua_setmetatable(L, -2);
}

static int cf_gc(lua_State *L) {
  corral_future **p = lua_touserdata(L, 1);
  corral_future_release(*p); /* atomic; frees without locking */
  *p = NULL;
  return 0;
}

static int l_fnew(lua_State *L) {
  corral_future *f = corral_future_new(rt_of(L));
  if (f == NULL) return luaL_error(L, "corral: out of memory");
  cf_push(L, f);
  return 1;
}

static int l_fstart(lua_State *L) {
  lua_pushboolean(L, future_start(*cf_check(L, 1)) == 0);
  return 1;
}

static int l_fsettle(lua_State *L) {
  corral_future *f = *cf_check(L, 1);
  int state = (int)luaL_checkinteger(L, 2);
  lua_pushboolean(L, future_settle(f, (corral_state)state, NULL, 0) == 0);
  return 1;
}

static int l_fstate(lua_State *L) {
  lua_pushinteger(L, corral_future_state(*cf_check(L, 1)));
  return 1;
}

/* The decoded payload of a settled C future: results as a table {n=...}. */
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
  int n = codec_decode(L, mp, len);
  if (n < 0) return lua_error(L);
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
  int rc = future_watch(f, &rt_of(L)->home);
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

/* drain(t): fills t[1..n] with the keys of watched futures that settled;
 * returns n and whether a SIGINT arrived. */
static int l_drain(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  drain_ud d = {L, 0};
  ctx_drain(&rt_of(L)->home, drain_one, &d);
  lua_pushinteger(L, d.n);
  lua_pushboolean(L, ctx_take_sigint());
  return 2;
}

static int l_poll(lua_State *L) {
  ctx_poll(&rt_of(L)->home, (int)luaL_checkinteger(L, 1));
  return 0;
}

static int l_now(lua_State *L) {
  lua_pushnumber(L, (lua_Number)uv_hrtime() * 1e-9);
  return 1;
}

static int l_catch_sigint(lua_State *L) {
  ctx_catch_sigint(&rt_of(L)->home);
  return 0;
}

static int l_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

/* exit(code): report unretrieved errors, flush, end the process at once. */
static int l_exit(lua_State *L) {
  int code = (int)luaL_optinteger(L, 1, 0);
  ctx_report_all(&rt_of(L)->home);
  fflush(NULL);
  exit(code);
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
  r->armed = 1;
  r->len = len;
  memcpy(r->text, s, len);
  queue_insert_tail(&rt_of(L)->home.reporters, &r->node);
  luaL_getmetatable(L, REPORTER_MT);
  lua_setmetatable(L, -2);
  return 1;
}

static int l_disarm(lua_State *L) {
  corral_reporter *r = luaL_checkudata(L, 1, REPORTER_MT);
  r->armed = 0;
  queue_remove(&r->node);
  return 0;
}

static int reporter_gc(lua_State *L) {
  corral_reporter *r = lua_touserdata(L, 1);
  if (r->armed) {
    r->armed = 0;
    ssize_t rc = write(2, r->text, r->len);
    (void)rc;
  }
  queue_remove(&r->node);
  return 0;
}

/* ======================================================================== */
/* Codec, for tests and tools                                                */
/* ======================================================================== */

static int l_encode(lua_State *L) {
  char err[256];
  size_t len;
  char *buf = codec_encode(L, 1, lua_gettop(L), &len, err, sizeof err);
  if (buf == NULL) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_pushlstring(L, buf, len);
  free(buf);
  return 1;
}

static int l_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  lua_settop(L, 1);
  int n = codec_decode(L, s, len);
  if (n < 0) return lua_error(L);
  return n;
}

/* Settle a C future with encoded values, as C code would (tests). */
static int l_fsettle_encoded(lua_State *L) {
  corral_future *f = *cf_check(L, 1);
  char err[256];
  size_t len;
  char *buf = codec_encode(L, 2, lua_gettop(L) - 1, &len, err, sizeof err);
  if (buf == NULL) return luaL_error(L, "%s", err);
  lua_pushboolean(L, future_settle(f, CORRAL_DONE, buf, len) == 0);
  return 1;
}

static int l_fset_error(lua_State *L) {
  corral_future *f = *cf_check(L, 1);
  lua_pushboolean(L,
                  corral_future_set_error(f, luaL_checkstring(L, 2), luaL_checkstring(L, 3)) == 0);
  return 1;
}

/* ======================================================================== */
/* Module                                                                    */
/* ======================================================================== */

static const luaL_Reg core_funcs[] = {{"fnew", l_fnew},
                                      {"fstart", l_fstart},
                                      {"fsettle", l_fsettle},
                                      {"fstate", l_fstate},
                                      {"fvalues", l_fvalues},
                                      {"fwatch", l_fwatch},
                                      {"fkey", l_fkey},
                                      {"fsettle_encoded", l_fsettle_encoded},
                                      {"fset_error", l_fset_error},
                                      {"drain", l_drain},
                                      {"poll", l_poll},
                                      {"now", l_now},
                                      {"catch_sigint", l_catch_sigint},
                                      {"isatty", l_isatty},
                                      {"exit", l_exit},
                                      {"versions", l_versions},
                                      {"reporter", l_reporter},
                                      {"disarm", l_disarm},
                                      {"encode", l_encode},
                                      {"decode", l_decode},
                                      {NULL, NULL}};

static int runtime_gc(lua_State *L) {
  corral_runtime **p = lua_touserdata(L, 1);
  /* The runtime's finalizer runs as the state closes, after every other
   * corral object's. It is the one __gc that takes locks: withdrawing the
   * loop's watches from futures that other threads may still settle. */
  if (*p != NULL) rt_destroy(*p);
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

int luaopen_corral(lua_State *L) {
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
    rt = rt_create(L, 0);
    if (rt == NULL) return luaL_error(L, "corral: cannot start the runtime");
    lua_getfield(L, LUA_REGISTRYINDEX, "corral.sentinel");
    *(corral_runtime **)lua_touserdata(L, -1) = rt;
    lua_pop(L, 1);
    lua_pushlightuserdata(L, rt);
    lua_setfield(L, LUA_REGISTRYINDEX, RUNTIME_KEY);
  }

  luaL_newmetatable(L, CFUTURE_MT);
  lua_pushcfunction(L, cf_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, REPORTER_MT);
  lua_pushcfunction(L, reporter_gc);
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
  return 1;
}

/* ======================================================================== */
/* Bridges for the C API                                                     */
/* ======================================================================== */

void corral_push_future(lua_State *L, corral_future *f) {
  lua_getfield(L, LUA_REGISTRYINDEX, WRAP_KEY);
  corral_future_retain(f);
  cf_push(L, f);
  lua_call(L, 1, 1);
}

corral_future *corral_to_future(lua_State *L, int idx) {
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

int lcore_drive(lua_State *L, int block) {
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
