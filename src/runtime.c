/* runtime.c: the embedding entry points of corral.h (above the binding). */
#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "internal.h"

const char *corral_version(void) { return CORRAL_VERSION; }

const char *corral_strerror(int err) {
  switch (err) {
  case CORRAL_OK: return "ok";
  case CORRAL_EINVAL: return "invalid argument";
  case CORRAL_ESTATE: return "future already settled";
  case CORRAL_ETIMEDOUT: return "timed out";
  case CORRAL_ENOMEM: return "out of memory";
  case CORRAL_ELUA: return "Lua error";
  default: return "unknown error";
  }
}

corral_runtime *corral_open(void) {
  lua_State *L = luaL_newstate();
  if (L == NULL) return NULL;
  luaL_openlibs(L);
  if (lua_cpcall(L, corral__lcore_load, NULL) != 0) {
    fprintf(stderr, "corral: %s\n", lua_tostring(L, -1));
    lua_close(L);
    return NULL;
  }
  corral_runtime *rt = corral_from_lua(L);
  rt->owns_L = 1;
  return rt;
}

void corral_close(corral_runtime *rt) {
  if (rt == NULL) return;
  if (rt->owns_L) {
    lua_close(rt->home.L); /* its finalizers report errors, then free rt */
  } else {
    /* The host owns the state: it will close it; just run until idle. */
    corral__lcore_drive(rt->home.L, 1);
  }
}

lua_State *corral_lua(corral_runtime *rt) { return rt->home.L; }

int corral_backend_fd(corral_runtime *rt) { return uv_backend_fd(&rt->home.loop); }

int corral_backend_timeout(corral_runtime *rt) {
  lua_State *L = rt->home.L;
  int top = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, TIMEOUT_KEY);
  int ms = 0; /* (an error: the host steps at once, and sees it there) */
  if (lua_pcall(L, 0, 1, 0) == 0) ms = (int)lua_tointeger(L, -1);
  lua_settop(L, top);
  return ms;
}

/* ======================================================================== */
/* Running code                                                              */
/* ======================================================================== */

/* Spawn the function on top of the stack as a task; with `out`, its
 * future's C half (a reference of the caller's). */
static int spawn_top(lua_State *L, corral_future **out) {
  lua_getglobal(L, "require");
  lua_pushliteral(L, "corral");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "spawn");
  lua_remove(L, -2);
  lua_insert(L, -2);
  if (lua_pcall(L, 1, 1, 0) != 0) {
    fprintf(stderr, "corral: %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
    return CORRAL_ELUA;
  }
  if (out != NULL) {
    *out = corral__lcore_to_future(L, -1);
    if (*out != NULL) corral_future_retain(*out);
    /* the host holds it: its failure is the host's to read, not reported */
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "_quiet");
  }
  lua_pop(L, 1);
  return out != NULL && *out == NULL ? CORRAL_ENOMEM : 0;
}

/* Load a file (code NULL) or a string as a chunk and spawn it. */
static int load_and_spawn(corral_runtime *rt, const char *path, const char *code,
                          corral_future **out) {
  lua_State *L = rt->home.L;
  if (out != NULL) *out = NULL;
  if ((code != NULL ? luaL_loadstring(L, code) : luaL_loadfile(L, path)) != 0) {
    fprintf(stderr, "corral: %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
    return CORRAL_ELUA;
  }
  return spawn_top(L, out);
}

int corral_dofile(corral_runtime *rt, const char *path) {
  return load_and_spawn(rt, path, NULL, NULL);
}

int corral_dostring(corral_runtime *rt, const char *code) {
  return load_and_spawn(rt, NULL, code, NULL);
}

corral_future *corral_dofile_future(corral_runtime *rt, const char *path) {
  corral_future *f;
  return load_and_spawn(rt, path, NULL, &f) == 0 ? f : NULL;
}

corral_future *corral_dostring_future(corral_runtime *rt, const char *code) {
  corral_future *f;
  return load_and_spawn(rt, NULL, code, &f) == 0 ? f : NULL;
}

int corral_future_error_message(corral_future *f, char *buf, size_t size) {
  const void *mp;
  size_t len;
  if (f == NULL || buf == NULL || size == 0) return CORRAL_EINVAL;
  buf[0] = '\0';
  if (corral_future_state(f) != CORRAL_FAILED) return CORRAL_ESTATE;
  if (corral_future_payload(f, &mp, &len) != 0 || !corral__codec_error_message(mp, len, buf, size))
    snprintf(buf, size, "(an error without a message)");
  return 0;
}

int corral_step(corral_runtime *rt) { return corral__lcore_drive(rt->home.L, 0); }

int corral_run(corral_runtime *rt) {
  int rc = corral__lcore_drive(rt->home.L, 1);
  return rc < 0 ? rc : 0;
}
