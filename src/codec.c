/* codec.c: Lua values to and from MessagePack (msgpack-c), the wire format
 * of values that cross contexts and of results settled from C. */
#include <math.h>
#include <msgpack.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "internal.h"

#define CODEC_MAX_DEPTH 100

typedef struct {
  lua_State *L;
  msgpack_packer pk;
  char *err;
  size_t errlen;
} encoder;

/* ======================================================================== */
/* Encode                                                                    */
/* ======================================================================== */

static int enc_value(encoder *e, int idx, int depth, const char *path);

static int enc_fail(encoder *e, const char *path, const char *why) {
  size_t n = strlen(path);
  if (n > 120) /* keep the innermost part of a long path */
    snprintf(e->err, e->errlen, "...%s: %s", path + n - 100, why);
  else
    snprintf(e->err, e->errlen, "%s: %s", path, why);
  return -1;
}

static int enc_number(encoder *e, lua_Number x) {
  if (x == floor(x) && fabs(x) < 9007199254740992.0 && !(x == 0 && signbit(x)))
    return msgpack_pack_int64(&e->pk, (int64_t)x);
  return msgpack_pack_double(&e->pk, x);
}

static int enc_table(encoder *e, int idx, int depth, const char *path) {
  lua_State *L = e->L;
  if (depth >= CODEC_MAX_DEPTH) return enc_fail(e, path, "table nested too deeply (or a cycle)");
  if (!lua_checkstack(L, 4)) return enc_fail(e, path, "Lua stack exhausted");
  size_t n = lua_objlen(L, idx), count = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    count++;
    lua_pop(L, 1);
  }
  char sub[256];
  if (count == n) {
    msgpack_pack_array(&e->pk, n);
    for (size_t i = 1; i <= n; i++) {
      lua_rawgeti(L, idx, (int)i);
      snprintf(sub, sizeof sub, "%s[%zu]", path, i);
      int rc = enc_value(e, lua_gettop(L), depth + 1, sub);
      lua_pop(L, 1);
      if (rc != 0) return rc;
    }
    return 0;
  }
  msgpack_pack_map(&e->pk, count);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int top = lua_gettop(L);
    if (lua_type(L, top - 1) == LUA_TSTRING)
      snprintf(sub, sizeof sub, "%s.%s", path, lua_tostring(L, top - 1));
    else
      snprintf(sub, sizeof sub, "%s[?]", path);
    if (enc_value(e, top - 1, depth + 1, sub) != 0 || enc_value(e, top, depth + 1, sub) != 0) {
      lua_pop(L, 2);
      return -1;
    }
    lua_pop(L, 1);
  }
  return 0;
}

static int enc_value(encoder *e, int idx, int depth, const char *path) {
  lua_State *L = e->L;
  switch (lua_type(L, idx)) {
  case LUA_TNIL: return msgpack_pack_nil(&e->pk);
  case LUA_TBOOLEAN:
    return lua_toboolean(L, idx) ? msgpack_pack_true(&e->pk) : msgpack_pack_false(&e->pk);
  case LUA_TNUMBER: return enc_number(e, lua_tonumber(L, idx));
  case LUA_TSTRING: {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    msgpack_pack_str(&e->pk, len);
    return msgpack_pack_str_body(&e->pk, s, len);
  }
  case LUA_TTABLE: return enc_table(e, idx, depth, path);
  default: {
    char why[64];
    snprintf(why, sizeof why, "%s cannot travel", luaL_typename(L, idx));
    return enc_fail(e, path, why);
  }
  }
}

char *codec_encode(lua_State *L, int from, int n, size_t *len, char *err, size_t errlen) {
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  encoder e = {L, {0}, err, errlen};
  msgpack_packer_init(&e.pk, &sb, msgpack_sbuffer_write);
  msgpack_pack_array(&e.pk, (size_t)n);
  char path[32];
  for (int i = 0; i < n; i++) {
    snprintf(path, sizeof path, "args[%d]", i + 1);
    if (enc_value(&e, from + i, 0, path) != 0) {
      msgpack_sbuffer_destroy(&sb);
      return NULL;
    }
  }
  *len = sb.size;
  return msgpack_sbuffer_release(&sb);
}

/* ======================================================================== */
/* Decode                                                                    */
/* ======================================================================== */

static void dec_object(lua_State *L, const msgpack_object *o) {
  luaL_checkstack(L, 4, "corral codec");
  switch (o->type) {
  case MSGPACK_OBJECT_NIL: lua_pushnil(L); break;
  case MSGPACK_OBJECT_BOOLEAN: lua_pushboolean(L, o->via.boolean); break;
  case MSGPACK_OBJECT_POSITIVE_INTEGER: lua_pushnumber(L, (lua_Number)o->via.u64); break;
  case MSGPACK_OBJECT_NEGATIVE_INTEGER: lua_pushnumber(L, (lua_Number)o->via.i64); break;
  case MSGPACK_OBJECT_FLOAT32:
  case MSGPACK_OBJECT_FLOAT64: lua_pushnumber(L, o->via.f64); break;
  case MSGPACK_OBJECT_STR: lua_pushlstring(L, o->via.str.ptr, o->via.str.size); break;
  case MSGPACK_OBJECT_BIN: lua_pushlstring(L, o->via.bin.ptr, o->via.bin.size); break;
  case MSGPACK_OBJECT_ARRAY:
    lua_createtable(L, (int)o->via.array.size, 0);
    for (uint32_t i = 0; i < o->via.array.size; i++) {
      dec_object(L, &o->via.array.ptr[i]);
      lua_rawseti(L, -2, (int)i + 1);
    }
    break;
  case MSGPACK_OBJECT_MAP:
    lua_createtable(L, 0, (int)o->via.map.size);
    for (uint32_t i = 0; i < o->via.map.size; i++) {
      dec_object(L, &o->via.map.ptr[i].key);
      dec_object(L, &o->via.map.ptr[i].val);
      if (lua_isnil(L, -2))
        lua_pop(L, 2);
      else
        lua_rawset(L, -3);
    }
    break;
  default: lua_pushnil(L); break;
  }
}

int codec_decode(lua_State *L, const char *data, size_t len) {
  msgpack_unpacked u;
  msgpack_unpacked_init(&u);
  size_t off = 0;
  if (msgpack_unpack_next(&u, data, len, &off) != MSGPACK_UNPACK_SUCCESS) {
    msgpack_unpacked_destroy(&u);
    lua_pushliteral(L, "malformed MessagePack payload");
    return -1;
  }
  int n;
  if (u.data.type == MSGPACK_OBJECT_ARRAY) {
    n = (int)u.data.via.array.size;
    luaL_checkstack(L, n + 4, "corral codec: too many values");
    for (int i = 0; i < n; i++)
      dec_object(L, &u.data.via.array.ptr[i]);
  } else {
    n = 1;
    dec_object(L, &u.data);
  }
  msgpack_unpacked_destroy(&u);
  return n;
}
