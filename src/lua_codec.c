/* lua_codec.c: the codec in Lua: encode, decode, and its test hooks. */
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

static int l_encode(lua_State *L) {
  codec_opts o = {0};
  o.no_refs = 1; /* a string cannot hold references */
  size_t len;
  char *buf = corral__codec_encode(L, 1, lua_gettop(L), &len, &o);
  if (buf == NULL) return corral__lua_codec_error(L, o.err);
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

/* decode(s[, how]): the values of a MessagePack array from outside the
 * process (foreign bytes: plain values, loaded modules and C functions by
 * name). how = "plain": no module or C function either (CODEC_MARKED: a
 * remote host's arguments); how = true: also functions marked with this
 * process's key, and modules and C functions by name only inside those
 * (CODEC_PEER | CODEC_MARKED: a host with --trust). Raises a CodecError
 * when they cannot be decoded. */
static int l_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  int trust = CODEC_FOREIGN;
  if (lua_isstring(L, 2) && strcmp(lua_tostring(L, 2), "plain") == 0)
    trust = CODEC_FOREIGN | CODEC_MARKED;
  else if (lua_toboolean(L, 2))
    trust = CODEC_PEER | CODEC_MARKED;
  lua_settop(L, 1);
  /* (a host's arguments are an array, as every payload the encoder makes) */
  unsigned char b0 = len > 0 ? (unsigned char)s[0] : 0;
  if ((trust & CODEC_MARKED) && !((b0 & 0xf0) == 0x90 || b0 == 0xdc || b0 == 0xdd)) {
    lua_pushliteral(L, "not a MessagePack array of values");
    return raise_codec_error(L);
  }
  int n = corral__codec_decode(L, s, len, NULL, trust);
  if (n < 0) return raise_codec_error(L);
  return n;
}

/* encode_value(v): plain MessagePack of one value (corral.encode), or nil
 * and why (its path named "value"). */
static int l_encode_value(lua_State *L) {
  static const char *const lead[] = {"value"};
  lua_settop(L, 1);
  codec_opts o = {0};
  o.bare = 1;
  o.no_refs = 1;
  o.offset = 1;
  o.lead = lead;
  size_t len;
  char *buf = corral__codec_encode(L, 1, 1, &len, &o);
  if (buf == NULL) return corral__lua_codec_error(L, o.err);
  lua_pushlstring(L, buf, len);
  free(buf);
  return 1;
}

/* decode_value(s, code): the one value of s (corral.decode), bytes from
 * outside the process: plain values, shared and cyclic tables, loaded
 * modules and timestamps; with `code`, also functions this process encoded
 * (CODEC_PEER: each one's mark is checked against the process's key; no
 * reference to a live object is followed).
 * Raises a CodecError naming where. */
static int l_decode_value(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  int code = lua_toboolean(L, 2);
  lua_settop(L, 1);
  int n = corral__codec_decode(L, s, len, NULL, (code ? CODEC_PEER : CODEC_FOREIGN) | CODEC_ONE);
  if (n < 0) return raise_codec_error(L);
  return n;
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

const luaL_Reg corral__lua_codec_funcs[] = {{"encode", l_encode},
                                            {"decode", l_decode},
                                            {"encode_value", l_encode_value},
                                            {"decode_value", l_decode_value},
                                            {"debug_counts", l_debug_counts},
                                            {"codec_fail_alloc", l_codec_fail_alloc},
                                            {NULL, NULL}};
