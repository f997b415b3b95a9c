/* lua_util.c: what every file of the binding shares: the runtime and
 * context a lua_State belongs to, codec errors as Lua results, the CPU count. */
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

/* The registry keys of the runtime and the context a state belongs to:
 * addresses (a light userdata key is found without hashing a string, and
 * these are read on every call). */
static const char rt_key, ctx_key;

static int errtext(lua_State *L) {
  if (!luaL_callmeta(L, 1, "__tostring")) lua_pushfstring(L, "(a %s error)", luaL_typename(L, 1));
  return 1;
}

const char *corral__lua_errtext(lua_State *L) {
  if (lua_type(L, -1) == LUA_TSTRING || lua_type(L, -1) == LUA_TNUMBER) return lua_tostring(L, -1);
  lua_pushcfunction(L, errtext);
  lua_insert(L, -2);
  if (lua_pcall(L, 1, 1, 0) != 0 || !lua_isstring(L, -1)) {
    lua_pop(L, 1);
    lua_pushliteral(L, "(an error that cannot be shown)");
  }
  return lua_tostring(L, -1);
}

void corral__lua_set_home(lua_State *L, corral_runtime *rt, corral_context *c) {
  lua_pushlightuserdata(L, (void *)&rt_key);
  lua_pushlightuserdata(L, rt);
  lua_rawset(L, LUA_REGISTRYINDEX);
  lua_pushlightuserdata(L, (void *)&ctx_key);
  lua_pushlightuserdata(L, c);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

static void *reg_ptr(lua_State *L, const char *key) {
  lua_pushlightuserdata(L, (void *)key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  void *p = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return p;
}

corral_runtime *corral__lua_rt(lua_State *L) { return reg_ptr(L, &rt_key); }

corral_runtime *corral_from_lua(lua_State *L) { return corral__lua_rt(L); }

corral_context *corral__ctx_of(lua_State *L) { return reg_ptr(L, &ctx_key); }

/* ======================================================================== */
/* Codec                                                                     */
/* ======================================================================== */

int corral__lua_codec_error(lua_State *L, const char *err) {
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

/* Push the metatable named mt, found under the address of the name (a
 * boxed value is made and checked on every call: no string is interned and
 * hashed for it). The first use of an address copies the registry's entry
 * under the name. */
static void push_mt(lua_State *L, const char *mt) {
  lua_pushlightuserdata(L, (void *)mt);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (lua_istable(L, -1)) return;
  lua_pop(L, 1);
  luaL_getmetatable(L, mt);
  if (!lua_istable(L, -1)) return;
  lua_pushlightuserdata(L, (void *)mt);
  lua_pushvalue(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

corral__box *corral__box_push(lua_State *L, void *p, void *aux, const char *mt) {
  corral__box *b = lua_newuserdata(L, sizeof *b);
  b->p = p;
  b->aux = aux;
  push_mt(L, mt);
  lua_setmetatable(L, -2);
  return b;
}

corral__box *corral__box_check(lua_State *L, int idx, const char *mt) {
  void *p = lua_touserdata(L, idx);
  if (p != NULL && lua_getmetatable(L, idx)) {
    push_mt(L, mt);
    int same = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    if (same) return p;
  }
  return luaL_checkudata(L, idx, mt); /* raises, naming what it wanted */
}

void corral__box_kind(lua_State *L, const char *mt, lua_CFunction gc) {
  luaL_newmetatable(L, mt);
  lua_pushcfunction(L, gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
}
