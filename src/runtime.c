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

/* Spawn the function on top of the stack as a task. */
static int spawn_top(lua_State *L) {
  lua_getglobal(L, "require");
  lua_pushliteral(L, "corral");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "spawn");
  lua_remove(L, -2);
  lua_insert(L, -2);
  if (lua_pcall(L, 1, 0, 0) != 0) {
    fprintf(stderr, "corral: %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
    return CORRAL_ELUA;
  }
  return 0;
}

int corral_dofile(corral_runtime *rt, const char *path) {
  lua_State *L = rt->home.L;
  if (luaL_loadfile(L, path) != 0) {
    fprintf(stderr, "corral: %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
    return CORRAL_ELUA;
  }
  return spawn_top(L);
}

int corral_dostring(corral_runtime *rt, const char *code) {
  lua_State *L = rt->home.L;
  if (luaL_loadstring(L, code) != 0) {
    fprintf(stderr, "corral: %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
    return CORRAL_ELUA;
  }
  return spawn_top(L);
}

int corral_step(corral_runtime *rt) { return corral__lcore_drive(rt->home.L, 0); }

int corral_run(corral_runtime *rt) {
  int rc = corral__lcore_drive(rt->home.L, 1);
  return rc < 0 ? rc : 0;
}
