/* lua_buffer.c: corral.buffer as Lua sees it: a userdata holding one
 * reference to a C buffer (buffer.c). The checks and the FFI pointer are
 * the Lua half's (corral.buffer); these are the raw operations. */
#include <string.h>

#include "internal.h"

static corral_buffer *check(lua_State *L, int idx) {
  corral_buffer **u = luaL_checkudata(L, idx, CORRAL_BUFFER_MT);
  return *u;
}

/* (no lock, no Lua: an atomic release, and perhaps munmap or free) */
static int buffer_gc(lua_State *L) {
  corral_buffer **u = lua_touserdata(L, 1);
  corral__buffer_release(*u);
  *u = NULL;
  return 0;
}

static int buffer_len(lua_State *L) {
  lua_pushnumber(L, (lua_Number)check(L, 1)->len);
  return 1;
}

static int buffer_tostring(lua_State *L) {
  corral_buffer *b = check(L, 1);
  lua_pushlstring(L, (const char *)b->data, b->len);
  return 1;
}

/* For the codec: an empty buffer userdata on the stack, its slot. */
corral_buffer **corral__lua_buffer_slot(lua_State *L) {
  corral_buffer **u = lua_newuserdata(L, sizeof(corral_buffer *));
  *u = NULL;
  luaL_getmetatable(L, CORRAL_BUFFER_MT);
  lua_setmetatable(L, -2);
  return u;
}

/* buffer_new(string or size): a buffer holding a copy of the string, or
 * size zero bytes; nil when there is no memory for it. */
static int l_buffer_new(lua_State *L) {
  size_t n;
  const char *s = NULL;
  if (lua_type(L, 1) == LUA_TSTRING)
    s = lua_tolstring(L, 1, &n);
  else
    n = (size_t)luaL_checknumber(L, 1);
  corral_buffer **u = corral__lua_buffer_slot(L);
  *u = corral__buffer_new(n);
  if (*u == NULL) return 0;
  if (s != NULL && n > 0) memcpy((*u)->data, s, n);
  return 1;
}

/* buffer_sub(b, i, j): bytes i..j (1-based, inclusive, already in range)
 * as a string. */
static int l_buffer_sub(lua_State *L) {
  corral_buffer *b = check(L, 1);
  size_t i = (size_t)luaL_checknumber(L, 2), j = (size_t)luaL_checknumber(L, 3);
  if (i < 1 || j > b->len || i > j) {
    lua_pushliteral(L, "");
    return 1;
  }
  lua_pushlstring(L, (const char *)b->data + i - 1, j - i + 1);
  return 1;
}

/* buffer_addr(b): its bytes' address, for an FFI cast (the buffer must be
 * kept alive while it is used). */
static int l_buffer_addr(lua_State *L) {
  lua_pushlightuserdata(L, check(L, 1)->data);
  return 1;
}

/* buffer_write(b, offset, s): copy s at offset (0-based, in range); false
 * when it is shared already (immutable). */
static int l_buffer_write(lua_State *L) {
  corral_buffer *b = check(L, 1);
  size_t off = (size_t)luaL_checknumber(L, 2), n;
  const char *s = luaL_checklstring(L, 3, &n);
  if (atomic_load(&b->shared) || off > b->len || n > b->len - off) {
    lua_pushboolean(L, 0);
    return 1;
  }
  memcpy(b->data + off, s, n);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_buffer_shared(lua_State *L) {
  lua_pushboolean(L, atomic_load(&check(L, 1)->shared));
  return 1;
}

static int l_buffer_is(lua_State *L) {
  lua_pushboolean(L, luaL_testudata(L, 1, CORRAL_BUFFER_MT) != NULL);
  return 1;
}

static int l_buffer_live(lua_State *L) {
  lua_pushinteger(L, corral__buffer_live());
  return 1;
}

/* buffer_index(t): the table the buffers' __index looks in (the Lua half
 * puts the methods there). */
static int l_buffer_index(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_getmetatable(L, CORRAL_BUFFER_MT);
  lua_pushvalue(L, 1);
  lua_setfield(L, -2, "__index");
  return 0;
}

void corral__lua_buffer_open(lua_State *L) {
  luaL_newmetatable(L, CORRAL_BUFFER_MT);
  lua_pushcfunction(L, buffer_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, buffer_len);
  lua_setfield(L, -2, "__len");
  lua_pushcfunction(L, buffer_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushliteral(L, "corral.buffer");
  lua_setfield(L, -2, "__name");
  lua_pop(L, 1);
}

const luaL_Reg corral__lua_buffer_funcs[] = {{"buffer_new", l_buffer_new},
                                             {"buffer_sub", l_buffer_sub},
                                             {"buffer_addr", l_buffer_addr},
                                             {"buffer_write", l_buffer_write},
                                             {"buffer_shared", l_buffer_shared},
                                             {"buffer_is", l_buffer_is},
                                             {"buffer_live", l_buffer_live},
                                             {"buffer_index", l_buffer_index},
                                             {NULL, NULL}};
