/* lua_host.c: what an embedding host gives the Lua side: host functions
 * (corral_register) in every Lua state of the runtime, and corral.exit in
 * an embedded runtime (it stops the runtime and is returned to the host). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "internal.h"

/* ======================================================================== */
/* Host functions                                                            */
/* ======================================================================== */

/* _G's __index in a worker's state: a global it lacks may be a host
 * function, registered before or after the worker started: found in the
 * runtime's registry, it is kept as the state's global from then on. A name
 * a process worker's child knows but cannot reach (its parent's function)
 * raises, naming corral_register. */
static int host_index(lua_State *L) {
  if (lua_type(L, 2) != LUA_TSTRING) return 0;
  corral_runtime *rt = corral__lua_rt(L);
  lua_CFunction fn = NULL;
  if (rt == NULL || !corral__rt_host_find(rt, lua_tostring(L, 2), &fn)) return 0;
  if (fn == NULL) {
    return luaL_error(L,
                      "%s is a host function (corral_register) of the parent process: a process "
                      "worker cannot call it (call it from a thread worker or the home state)",
                      lua_tostring(L, 2));
  }
  lua_pushcfunction(L, fn);
  lua_pushvalue(L, 2);
  lua_pushvalue(L, -2);
  lua_rawset(L, 1);
  return 1;
}

void corral__lua_host_open(lua_State *L) {
  if (lua_getmetatable(L, LUA_GLOBALSINDEX)) { /* (a fresh state has none) */
    lua_pop(L, 1);
    return;
  }
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, host_index);
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, LUA_GLOBALSINDEX);
}

/* The host functions registered so far, copied under the registry's lock
 * (Lua, which may raise, runs only once it is let go). */
typedef struct {
  char **names;
  lua_CFunction *fns;
  int n, cap, failed;
} host_snap;

static void snap_add(void *ud, const char *name, lua_CFunction f) {
  host_snap *sn = ud;
  if (sn->failed) return;
  if (sn->n == sn->cap) {
    int cap = sn->cap ? 2 * sn->cap : 8;
    char **names = realloc(sn->names, sizeof *names * (size_t)cap);
    if (names != NULL) sn->names = names;
    lua_CFunction *fns = realloc(sn->fns, sizeof *fns * (size_t)cap);
    if (fns != NULL) sn->fns = fns;
    if (names == NULL || fns == NULL) {
      sn->failed = 1;
      return;
    }
    sn->cap = cap;
  }
  if ((sn->names[sn->n] = strdup(name)) == NULL) {
    sn->failed = 1;
    return;
  }
  sn->fns[sn->n++] = f;
}

static void snap_free(host_snap *sn) {
  for (int i = 0; i < sn->n; i++)
    free(sn->names[i]);
  free(sn->names);
  free(sn->fns);
}

/* snap(L): the snapshot, in a userdata whose __gc frees it (a Lua error
 * while it is used leaks nothing); or a raised error. */
static int snap_gc(lua_State *L) {
  host_snap *sn = lua_touserdata(L, 1);
  snap_free(sn);
  memset(sn, 0, sizeof *sn);
  return 0;
}

static host_snap *snap(lua_State *L, corral_runtime *rt) {
  host_snap *sn = lua_newuserdata(L, sizeof *sn);
  memset(sn, 0, sizeof *sn);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, snap_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  corral__rt_host_each(rt, snap_add, sn);
  if (sn->failed) luaL_error(L, "corral: out of memory copying the host functions");
  return sn;
}

/* host_names(): the names of the host functions registered so far (for a
 * process worker's child, which cannot call them), or nil when none. */
static int l_host_names(lua_State *L) {
  corral_runtime *rt = corral__lua_rt(L);
  if (atomic_load(&rt->nhost) == 0) return 0;
  host_snap *sn = snap(L, rt);
  lua_newtable(L);
  for (int i = 0, k = 0; i < sn->n; i++) {
    if (sn->fns[i] == NULL) continue; /* (not this process's) */
    lua_pushstring(L, sn->names[i]);
    lua_rawseti(L, -2, ++k);
  }
  return 1;
}

/* host_install(): a thread worker starting: the host functions registered
 * so far become its globals now, a name its state already has (a standard
 * one, such as print) included, as in the home state. (Names registered
 * later are found through _G's __index.) */
static int l_host_install(lua_State *L) {
  corral_runtime *rt = corral__lua_rt(L);
  if (rt == NULL || atomic_load(&rt->nhost) == 0) return 0;
  host_snap *sn = snap(L, rt);
  for (int i = 0; i < sn->n; i++) {
    if (sn->fns[i] == NULL) continue;
    lua_pushcfunction(L, sn->fns[i]);
    lua_setfield(L, LUA_GLOBALSINDEX, sn->names[i]);
  }
  return 0;
}

/* host_unreachable(names): in a process worker's child, the parent's host
 * functions: using one raises, naming corral_register. */
static int l_host_unreachable(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  corral_runtime *rt = corral__lua_rt(L);
  int n = (int)lua_objlen(L, 1);
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 1, i);
    const char *name = lua_tostring(L, -1);
    lua_CFunction fn;
    if (name != NULL && name[0] != '\0' && !corral__rt_host_find(rt, name, &fn))
      corral__rt_host_add(rt, name, NULL);
    lua_pop(L, 1);
  }
  return 0;
}

/* ======================================================================== */
/* corral.exit in an embedded runtime                                        */
/* ======================================================================== */

/* exit_ends_process([on]): whether corral.exit ends the process (the
 * `corral` command running a script says so) or stops the runtime and is
 * returned to its host (the default: an embedded runtime). */
static int l_exit_ends_process(lua_State *L) {
  corral_runtime *rt = corral__lua_rt(L);
  if (lua_gettop(L) > 0) rt->exit_ends_process = lua_toboolean(L, 1);
  lua_pushboolean(L, rt->exit_ends_process);
  return 1;
}

/* halt(status): corral.exit(status) in the home state of an embedded
 * runtime: kept for the host, the workers asked to stop. */
static int l_halt(lua_State *L) {
  corral__rt_halt(corral__lua_rt(L), (int)luaL_checkinteger(L, 1));
  return 0;
}

/* exit_status(): the status corral.exit gave the runtime, or nil. */
static int l_exit_status(lua_State *L) {
  int n = atomic_load(&corral__lua_rt(L)->exit_status);
  if (n < 0)
    lua_pushnil(L); /* (one value: tostring(corral.exit_status()) works) */
  else
    lua_pushinteger(L, n);
  return 1;
}

const luaL_Reg corral__lua_host_funcs[] = {{"host_names", l_host_names},
                                           {"host_unreachable", l_host_unreachable},
                                           {"host_install", l_host_install},
                                           {"exit_ends_process", l_exit_ends_process},
                                           {"halt", l_halt},
                                           {"exit_status", l_exit_status},
                                           {NULL, NULL}};
