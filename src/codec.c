/* codec.c: Lua values to and from MessagePack (msgpack-c): the wire format of
 * every value that crosses contexts, and of results settled from C.
 *
 * Plain values map to MessagePack types. What needs more is marked with an
 * extension type:
 *   REF n         a table seen before in this value (shared sub-tables, cycles)
 *   DEP i         a future to unwrap: the first result of the call's i-th input
 *   FUTURE p      a future by reference (a retained corral_future pointer)
 *   MODULE name   a loaded module, `require`d on the other side
 *   CFUNC path    a C function of a module ("string.format", "_G.print")
 *   [FUNC, bytecode, upvalues...]   a Lua function (an array led by the mark)
 *   [WORKER, opts, INST p...]       a worker handle (retained instance pointers)
 * Metatables do not travel. Tables nest at most CODEC_MAX_DEPTH deep.
 */
#include <math.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "internal.h"

enum { EXT_REF = 1, EXT_DEP, EXT_FUTURE, EXT_MODULE, EXT_CFUNC, EXT_FUNC, EXT_WORKER, EXT_INST };

#define CODEC_MAX_DEPTH 100
#define SEEN_KEY        "corral.codec.seen"
#define CFUNCS_KEY      "corral.codec.cfuncs"
#define FCACHE_KEY      "corral.codec.fcache"

/* Where the encoder is, for the path in an error; made into text only when
 * encoding fails. */
typedef struct {
  enum { AT_ARG, AT_INDEX, AT_KEY, AT_UPVALUE } kind;
  size_t i;         /* AT_ARG, AT_INDEX */
  int key;          /* AT_KEY: stack index of the key */
  const char *name; /* AT_ARG: what; AT_UPVALUE: its name */
} frame;

/* The output: a small buffer on the C stack, moved to the heap when it
 * outgrows it; the payload is allocated once at its final size. */
typedef struct {
  char *data;
  size_t size, alloc;
  char local[256];
} wbuf;

typedef struct {
  lua_State *L;
  wbuf out;
  msgpack_packer pk;
  codec_opts *o;
  int seen; /* stack index of the table -> id map */
  int nseen;
  int cfuncs; /* stack index of the C function -> path map (nil: not built) */
  int nframes;
  frame frames[CODEC_MAX_DEPTH * 2 + 8];
  /* references taken for the payload, given back if encoding fails */
  struct held {
    void *p;
    int kind; /* EXT_FUTURE or EXT_INST */
  } * held;
  int nheld, capheld;
} encoder;

/* Note a reference the payload will own (kind: EXT_FUTURE or EXT_INST). */
static int hold(encoder *e, void *p, int kind) {
  if (e->nheld == e->capheld) {
    int cap = e->capheld ? e->capheld * 2 : 8;
    struct held *h = realloc(e->held, sizeof *h * (size_t)cap);
    if (h == NULL) return -1;
    e->held = h;
    e->capheld = cap;
  }
  e->held[e->nheld].p = p;
  e->held[e->nheld].kind = kind;
  e->nheld++;
  return 0;
}

static void unhold(encoder *e, int release) {
  for (int i = 0; release && i < e->nheld; i++) {
    if (e->held[i].kind == EXT_FUTURE)
      corral_future_release(e->held[i].p);
    else
      worker_release(e->held[i].p);
  }
  free(e->held);
  e->held = NULL;
  e->nheld = e->capheld = 0;
}

static int wbuf_write(void *ud, const char *buf, size_t len) {
  wbuf *b = ud;
  if (len == 0) return 0;
  if (b->size + len > b->alloc) {
    size_t alloc = b->alloc * 2;
    while (alloc < b->size + len)
      alloc *= 2;
    char *d = b->data == b->local ? malloc(alloc) : realloc(b->data, alloc);
    if (d == NULL) return -1;
    if (b->data == b->local) memcpy(d, b->local, b->size);
    b->data = d;
    b->alloc = alloc;
  }
  memcpy(b->data + b->size, buf, len);
  b->size += len;
  return 0;
}

static void wbuf_free(wbuf *b) {
  if (b->data != b->local) free(b->data);
}

static char *wbuf_release(wbuf *b) {
  if (b->data != b->local) return b->data;
  char *d = malloc(b->size ? b->size : 1);
  if (d != NULL) memcpy(d, b->local, b->size);
  return d;
}

static void at(encoder *e, frame f) {
  if (e->nframes < (int)(sizeof e->frames / sizeof e->frames[0])) e->frames[e->nframes] = f;
  e->nframes++;
}

/* ======================================================================== */
/* Encode                                                                    */
/* ======================================================================== */

static int enc_value(encoder *e, int idx, int depth);

static int enc_fail(encoder *e, const char *why) {
  char path[256];
  size_t n = 0;
  int nf = e->nframes < (int)(sizeof e->frames / sizeof e->frames[0])
               ? e->nframes
               : (int)(sizeof e->frames / sizeof e->frames[0]);
  for (int i = 0; i < nf && n < sizeof path - 1; i++) {
    frame *f = &e->frames[i];
    lua_State *L = e->L;
    size_t room = sizeof path - n;
    int w = 0;
    switch (f->kind) {
    case AT_ARG: w = snprintf(path + n, room, "%s[%zu]", f->name, f->i); break;
    case AT_INDEX: w = snprintf(path + n, room, "[%zu]", f->i); break;
    case AT_UPVALUE: w = snprintf(path + n, room, "<upvalue %s>", f->name); break;
    case AT_KEY:
      if (lua_type(L, f->key) == LUA_TSTRING)
        w = snprintf(path + n, room, ".%s", lua_tostring(L, f->key));
      else if (lua_type(L, f->key) == LUA_TNUMBER)
        w = snprintf(path + n, room, "[%.14g]", lua_tonumber(L, f->key));
      else
        w = snprintf(path + n, room, "[%s]", luaL_typename(L, f->key));
      break;
    }
    n += w > 0 ? (size_t)w : 0;
  }
  if (n >= sizeof path) n = sizeof path - 1;
  path[n] = '\0';
  if (n > 120) /* keep the innermost part of a long path */
    snprintf(e->o->err, sizeof e->o->err, "...%s: %s", path + n - 100, why);
  else
    snprintf(e->o->err, sizeof e->o->err, "%s: %s", path, why);
  return -1;
}

static void pack_ext(encoder *e, int type, const void *data, size_t len) {
  msgpack_pack_ext(&e->pk, len, (int8_t)type);
  if (len > 0) msgpack_pack_ext_body(&e->pk, data, len);
}

/* An extension whose body is the string at stack index idx (a name). */
static void pack_ext_string(encoder *e, int type, int idx) {
  size_t len;
  const char *s = lua_tolstring(e->L, idx, &len);
  pack_ext(e, type, s, len);
}

static int enc_number(encoder *e, lua_Number x) {
  if (x == floor(x) && fabs(x) <= 9007199254740992.0 && !(x == 0 && signbit(x)))
    return msgpack_pack_int64(&e->pk, (int64_t)x);
  return msgpack_pack_double(&e->pk, x);
}

/* The table at idx was seen before: emit a REF. Otherwise give it an id. */
static int enc_seen(encoder *e, int idx) {
  lua_State *L = e->L;
  if (lua_isnil(L, e->seen)) {
    /* The first table of this encode: take the map out of the registry, so
     * that an encode nested in this one (settling a future's C half) or one
     * cut short by an error never sees this one's tables. */
    lua_getfield(L, LUA_REGISTRYINDEX, SEEN_KEY);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_newtable(L);
    } else {
      lua_pushnil(L);
      lua_setfield(L, LUA_REGISTRYINDEX, SEEN_KEY);
    }
    lua_replace(L, e->seen);
  }
  lua_pushvalue(L, idx);
  lua_rawget(L, e->seen);
  if (!lua_isnil(L, -1)) {
    uint32_t id = (uint32_t)lua_tointeger(L, -1);
    lua_pop(L, 1);
    pack_ext(e, EXT_REF, &id, sizeof id);
    return 1;
  }
  lua_pop(L, 1);
  lua_pushvalue(L, idx);
  lua_pushinteger(L, e->nseen++);
  lua_rawset(L, e->seen);
  return 0;
}

static int enc_future(encoder *e, int idx) {
  corral_future *f = lcore_to_future(e->L, idx);
  if (f == NULL) return enc_fail(e, "future without a C half");
  codec_opts *o = e->o;
  if (o->unwrap) {
    /* an input of a call: its failure is reported through that call */
    lua_pushboolean(e->L, 1);
    lua_setfield(e->L, idx, "_dep");
    if (o->ndeps == o->capdeps) {
      int cap = o->capdeps ? o->capdeps * 2 : 4;
      corral_future **d = realloc(o->deps, sizeof(corral_future *) * (size_t)cap);
      if (d == NULL) return enc_fail(e, "out of memory");
      o->deps = d;
      o->capdeps = cap;
    }
    corral_future_retain(f);
    uint32_t i = (uint32_t)o->ndeps;
    o->deps[o->ndeps++] = f;
    pack_ext(e, EXT_DEP, &i, sizeof i);
  } else {
    if (hold(e, f, EXT_FUTURE) != 0) return enc_fail(e, "out of memory");
    corral_future_retain(f); /* owned by the payload: see codec_discard */
    o->has_refs = 1;
    pack_ext(e, EXT_FUTURE, &f, sizeof(corral_future *));
  }
  return 0;
}

/* A worker handle's `_export` gives its options and an array of its
 * instances (lightuserdata); they travel by reference. */
static int enc_worker(encoder *e, int idx, int depth) {
  lua_State *L = e->L;
  int top = lua_gettop(L);
  lua_getfield(L, idx, "_export");
  lua_pushvalue(L, idx);
  lua_call(L, 1, 2);
  if (!lua_istable(L, top + 1) || !lua_istable(L, top + 2))
    return enc_fail(e, "an async or sync worker lives in its context and cannot travel");
  int n = (int)lua_objlen(L, top + 2);
  msgpack_pack_array(&e->pk, (size_t)2 + (size_t)n);
  pack_ext(e, EXT_WORKER, NULL, 0);
  if (enc_value(e, top + 1, depth + 1) != 0) return -1;
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, top + 2, i);
    void *p = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (hold(e, p, EXT_INST) != 0) return enc_fail(e, "out of memory");
    worker_retain(p);
    e->o->has_refs = 1;
    pack_ext(e, EXT_INST, &p, sizeof p);
  }
  lua_settop(L, top);
  return 0;
}

static int enc_table(encoder *e, int idx, int depth) {
  lua_State *L = e->L;
  if (depth >= CODEC_MAX_DEPTH) return enc_fail(e, "table nested too deeply (limit 100)");
  if (!lua_checkstack(L, 8)) return enc_fail(e, "Lua stack exhausted");
  if (lua_getmetatable(L, idx)) {
    lua_getfield(L, -1, "__future");
    int is_future = lua_toboolean(L, -1);
    lua_getfield(L, -2, "__worker");
    int is_worker = lua_toboolean(L, -1);
    lua_pop(L, 3);
    if (is_future) return enc_future(e, idx);
    if (is_worker) return enc_worker(e, idx, depth);
  }
  if (enc_seen(e, idx)) return 0;
  size_t n = lua_objlen(L, idx), count = 0;
  int array = 1;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    count++;
    if (array) {
      lua_Number k = lua_type(L, -2) == LUA_TNUMBER ? lua_tonumber(L, -2) : 0;
      if (k < 1 || k > (lua_Number)n || k != floor(k)) array = 0;
    }
    lua_pop(L, 1);
  }
  if (array && count == n) {
    msgpack_pack_array(&e->pk, n);
    for (size_t i = 1; i <= n; i++) {
      lua_rawgeti(L, idx, (int)i);
      at(e, (frame){.kind = AT_INDEX, .i = i});
      int rc = enc_value(e, lua_gettop(L), depth + 1);
      lua_pop(L, 1);
      if (rc != 0) return rc;
      e->nframes--;
    }
    return 0;
  }
  msgpack_pack_map(&e->pk, count);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int top = lua_gettop(L);
    at(e, (frame){.kind = AT_KEY, .key = top - 1});
    if (enc_value(e, top - 1, depth + 1) != 0 || enc_value(e, top, depth + 1) != 0) return -1;
    e->nframes--;
    lua_pop(L, 1);
  }
  return 0;
}

static int dump_writer(lua_State *L, const void *p, size_t sz, void *ud) {
  (void)L;
  return wbuf_write(ud, p, sz);
}

/* Push a new map from the C functions that loaded modules hold to their
 * paths ("string.format", "_G.print"), and keep it in the registry. */
static void cfunc_map(lua_State *L) {
  lua_newtable(L);
  int map = lua_gettop(L);
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "loaded");
  int loaded = lua_gettop(L);
  lua_pushnil(L);
  while (lua_next(L, loaded)) {
    if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TTABLE) {
      int mod = lua_gettop(L);
      lua_pushnil(L);
      while (lua_next(L, mod)) {
        if (lua_iscfunction(L, -1) && lua_type(L, -2) == LUA_TSTRING) {
          lua_pushvalue(L, -1);
          lua_rawget(L, map);
          int known = !lua_isnil(L, -1);
          lua_pop(L, 1);
          if (!known) { /* the first name found wins */
            lua_pushvalue(L, -1);
            lua_pushfstring(L, "%s.%s", lua_tostring(L, mod - 1), lua_tostring(L, -3));
            lua_rawset(L, map);
          }
        }
        lua_pop(L, 1);
      }
    }
    lua_pop(L, 1);
  }
  lua_settop(L, map);
  lua_pushvalue(L, map);
  lua_setfield(L, LUA_REGISTRYINDEX, CFUNCS_KEY);
}

/* A C function travels as its path in a loaded module. The map is built
 * once, and again when a function is not in it (a module loaded since). */
static int cfunc_path(encoder *e, int idx) {
  lua_State *L = e->L;
  if (lua_isnil(L, e->cfuncs)) {
    lua_getfield(L, LUA_REGISTRYINDEX, CFUNCS_KEY);
    lua_replace(L, e->cfuncs);
  }
  int built = 0;
  for (;;) {
    if (lua_isnil(L, e->cfuncs)) {
      cfunc_map(L);
      lua_replace(L, e->cfuncs);
      built = 1;
    }
    lua_pushvalue(L, idx);
    lua_rawget(L, e->cfuncs);
    if (lua_isstring(L, -1)) {
      pack_ext_string(e, EXT_CFUNC, -1);
      lua_pop(L, 1);
      return 0;
    }
    lua_pop(L, 1);
    if (built) return enc_fail(e, "a C function that no loaded module holds cannot travel");
    lua_pushnil(L);
    lua_replace(L, e->cfuncs); /* rebuild, once */
  }
}

/* A loaded module travels as its name: package.loaded[name] == value. */
static int module_name(encoder *e, int idx) {
  lua_State *L = e->L;
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "loaded");
  lua_remove(L, -2);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    if (lua_rawequal(L, -1, idx) && lua_type(L, -2) == LUA_TSTRING) {
      pack_ext_string(e, EXT_MODULE, -2);
      lua_pop(L, 3);
      return 1;
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return 0;
}

static int enc_function(encoder *e, int idx, int depth) {
  lua_State *L = e->L;
  if (lua_iscfunction(L, idx)) return cfunc_path(e, idx);
  if (depth >= CODEC_MAX_DEPTH) return enc_fail(e, "functions nested too deeply");
  /* numbered like tables: a recursive local function refers to itself */
  if (enc_seen(e, idx)) return 0;
  int nup = 0;
  while (lua_getupvalue(L, idx, nup + 1) != NULL) {
    lua_pop(L, 1);
    nup++;
  }
  msgpack_pack_array(&e->pk, (size_t)2 + (size_t)nup);
  pack_ext(e, EXT_FUNC, NULL, 0);
  wbuf code;
  code.data = code.local;
  code.size = 0;
  code.alloc = sizeof code.local;
  lua_pushvalue(L, idx);
  lua_dump(L, dump_writer, &code);
  lua_pop(L, 1);
  msgpack_pack_bin(&e->pk, code.size);
  msgpack_pack_bin_body(&e->pk, code.data, code.size);
  wbuf_free(&code);
  for (int i = 1; i <= nup; i++) {
    const char *name = lua_getupvalue(L, idx, i);
    int top = lua_gettop(L);
    at(e, (frame){.kind = AT_UPVALUE, .name = name && *name ? name : "?"});
    int rc = 0;
    if (lua_type(L, top) == LUA_TTABLE && module_name(e, top))
      rc = 0;
    else
      rc = enc_value(e, top, depth + 1);
    if (rc != 0) return rc;
    lua_pop(L, 1);
    e->nframes--;
  }
  return 0;
}

static int enc_value(encoder *e, int idx, int depth) {
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
  case LUA_TTABLE: return enc_table(e, idx, depth);
  case LUA_TFUNCTION: return enc_function(e, idx, depth);
  case LUA_TTHREAD: return enc_fail(e, "thread (a coroutine) cannot travel");
  case LUA_TLIGHTUSERDATA: return enc_fail(e, "lightuserdata cannot travel");
  case LUA_TUSERDATA: return enc_fail(e, "userdata that is not corral's cannot travel");
  default: {
    char why[64];
    snprintf(why, sizeof why, "%s cannot travel", luaL_typename(L, idx));
    return enc_fail(e, why);
  }
  }
}

char *codec_encode(lua_State *L, int from, int n, size_t *len, codec_opts *o) {
  encoder e;
  memset(&e, 0, sizeof e);
  e.L = L;
  e.o = o;
  int top = lua_gettop(L);
  /* two slots below everything the encoder pushes: the map of tables seen
   * (for shared sub-tables and cycles) and the map of C functions */
  luaL_checkstack(L, 16, "corral codec");
  lua_pushnil(L); /* filled when the first table comes */
  e.seen = top + 1;
  lua_pushnil(L); /* filled when the first C function comes */
  e.cfuncs = top + 2;
  e.out.data = e.out.local;
  e.out.alloc = sizeof e.out.local;
  if (o->size_hint > sizeof e.out.local) { /* one allocation for a large string */
    char *d = malloc(o->size_hint);
    if (d != NULL) {
      e.out.data = d;
      e.out.alloc = o->size_hint;
    }
  }
  msgpack_packer_init(&e.pk, &e.out, wbuf_write);
  msgpack_pack_array(&e.pk, (size_t)n);
  int rc = 0;
  for (int i = 0; i < n && rc == 0; i++) {
    e.nframes = 0;
    at(&e, (frame){.kind = AT_ARG, .i = (size_t)i + 1, .name = o->what ? o->what : "args"});
    rc = enc_value(&e, from + i, 0);
  }
  if (!lua_isnil(L, e.seen)) { /* empty the map and give it back */
    lua_pushnil(L);
    while (lua_next(L, e.seen)) {
      lua_pop(L, 1);
      lua_pushvalue(L, -1);
      lua_pushnil(L);
      lua_rawset(L, e.seen);
    }
    lua_pushvalue(L, e.seen);
    lua_setfield(L, LUA_REGISTRYINDEX, SEEN_KEY);
  }
  lua_settop(L, top);
  unhold(&e, rc != 0);
  if (rc != 0) {
    wbuf_free(&e.out);
    o->has_refs = 0;
    return NULL;
  }
  *len = e.out.size;
  return wbuf_release(&e.out);
}

/* ======================================================================== */
/* Decode                                                                    */
/* ======================================================================== */

typedef struct {
  lua_State *L;
  int refs; /* stack index: id -> table */
  int nrefs;
  codec_deps *deps;
} decoder;

static void dec_object(decoder *d, const msgpack_object *o);

static int unpacked_gc(lua_State *L) {
  msgpack_unpacked_destroy(lua_touserdata(L, 1));
  return 0;
}

/* The unpacked objects live in a userdata on the stack, so that a Lua error
 * while decoding (a module that cannot be required, say) leaks nothing:
 * its __gc frees them. Callers destroy it eagerly when they are done. */
static msgpack_unpacked *unpacked_push(lua_State *L) {
  msgpack_unpacked *u = lua_newuserdata(L, sizeof *u);
  msgpack_unpacked_init(u);
  if (luaL_newmetatable(L, "corral.unpacked")) {
    lua_pushcfunction(L, unpacked_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  return u;
}

static void dec_first_of(decoder *d, const char *data, size_t len) {
  /* the first value of an encoded result array (nil when it has none) */
  lua_State *L = d->L;
  msgpack_unpacked *u = unpacked_push(L);
  int slot = lua_gettop(L);
  size_t off = 0;
  if (data != NULL && msgpack_unpack_next(u, data, len, &off) == MSGPACK_UNPACK_SUCCESS &&
      u->data.type == MSGPACK_OBJECT_ARRAY && u->data.via.array.size > 0) {
    decoder sub = {L, 0, 0, NULL};
    lua_pushnil(L);
    sub.refs = lua_gettop(L);
    dec_object(&sub, &u->data.via.array.ptr[0]);
    lua_remove(L, sub.refs);
  } else {
    lua_pushnil(L);
  }
  msgpack_unpacked_destroy(u);
  lua_remove(L, slot);
}

static void dec_ext(decoder *d, const msgpack_object *o) {
  lua_State *L = d->L;
  const char *p = o->via.ext.ptr;
  uint32_t n = o->via.ext.size;
  switch (o->via.ext.type) {
  case EXT_REF: {
    uint32_t id;
    memcpy(&id, p, sizeof id);
    lua_rawgeti(L, d->refs, (int)id + 1);
    break;
  }
  case EXT_DEP: {
    uint32_t i;
    memcpy(&i, p, sizeof i);
    if (d->deps != NULL && (int)i < d->deps->n) {
      const void *mp;
      size_t len;
      corral_future_payload(d->deps->f[i], &mp, &len);
      dec_first_of(d, mp, len);
    } else {
      lua_pushnil(L);
    }
    break;
  }
  case EXT_FUTURE: {
    corral_future *f;
    memcpy(&f, p, sizeof(corral_future *));
    lcore_push_future(L, f); /* takes a reference of its own */
    break;
  }
  case EXT_MODULE:
    lua_getglobal(L, "require");
    lua_pushlstring(L, p, n);
    lua_call(L, 1, 1);
    break;
  case EXT_CFUNC: {
    const char *dot = memchr(p, '.', n);
    if (dot == NULL) {
      lua_pushnil(L);
      break;
    }
    lua_getglobal(L, "require");
    lua_pushlstring(L, p, (size_t)(dot - p));
    lua_call(L, 1, 1);
    lua_pushlstring(L, dot + 1, n - (size_t)(dot - p) - 1);
    lua_gettable(L, -2);
    lua_remove(L, -2);
    break;
  }
  default: lua_pushnil(L); break;
  }
}

/* Number the table (or function) on top of the stack, for later REFs to it. */
static void dec_ref(decoder *d) {
  lua_State *L = d->L;
  if (lua_isnil(L, d->refs)) {
    lua_newtable(L);
    lua_replace(L, d->refs);
  }
  lua_pushvalue(L, -1);
  lua_rawseti(L, d->refs, ++d->nrefs);
}

static int lbuf_write(void *ud, const char *buf, size_t len) {
  luaL_addlstring(ud, buf, len);
  return 0;
}

/* [FUNC, bytecode, upvalues...]: load it (once per context for the same
 * bytecode and scalar upvalues) and set its upvalues. Holds no C memory
 * while Lua may raise. */
static void dec_function(decoder *d, const msgpack_object *o) {
  lua_State *L = d->L;
  const msgpack_object *a = o->via.array.ptr;
  uint32_t n = o->via.array.size;
  const char *code = a[1].via.bin.ptr;
  size_t clen = a[1].via.bin.size;
  /* cached only when every upvalue is a plain value, a module or a C
   * function: such a closure is the same whatever call it came with */
  int cacheable = 1;
  for (uint32_t i = 2; i < n && cacheable; i++) {
    if (a[i].type == MSGPACK_OBJECT_ARRAY || a[i].type == MSGPACK_OBJECT_MAP) cacheable = 0;
    if (a[i].type == MSGPACK_OBJECT_EXT && a[i].via.ext.type != EXT_MODULE &&
        a[i].via.ext.type != EXT_CFUNC)
      cacheable = 0;
  }
  int key = 0;
  if (cacheable) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addlstring(&b, code, clen);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &b, lbuf_write);
    for (uint32_t i = 2; i < n; i++)
      msgpack_pack_object(&pk, a[i]);
    luaL_pushresult(&b);
    key = lua_gettop(L);
    lua_getfield(L, LUA_REGISTRYINDEX, FCACHE_KEY);
    if (lua_isnil(L, -1)) { /* weak values: closures no one uses go */
      lua_pop(L, 1);
      lua_newtable(L);
      lua_createtable(L, 0, 1);
      lua_pushliteral(L, "v");
      lua_setfield(L, -2, "__mode");
      lua_setmetatable(L, -2);
      lua_pushvalue(L, -1);
      lua_setfield(L, LUA_REGISTRYINDEX, FCACHE_KEY);
    }
    lua_pushvalue(L, key);
    lua_rawget(L, -2);
    if (!lua_isnil(L, -1)) {
      lua_replace(L, key);
      lua_pop(L, 1);
      dec_ref(d);
      return;
    }
    lua_pop(L, 2);
  }
  if (luaL_loadbuffer(L, code, clen, "=(function from another context)") != 0) lua_error(L);
  int fn = lua_gettop(L);
  dec_ref(d); /* before its upvalues, which may refer to it */
  for (uint32_t i = 2; i < n; i++) {
    dec_object(d, &a[i]);
    if (lua_setupvalue(L, fn, (int)i - 1) == NULL) lua_pop(L, 1);
  }
  if (key != 0) {
    lua_getfield(L, LUA_REGISTRYINDEX, FCACHE_KEY);
    lua_pushvalue(L, key);
    lua_pushvalue(L, fn);
    lua_rawset(L, -3);
    lua_pop(L, 1);
    lua_replace(L, key); /* the function where the key was */
  }
}

static void dec_worker(decoder *d, const msgpack_object *o) {
  lua_State *L = d->L;
  lua_getfield(L, LUA_REGISTRYINDEX, "corral.import_worker");
  dec_object(d, &o->via.array.ptr[1]);
  for (uint32_t i = 2; i < o->via.array.size; i++) {
    void *p;
    memcpy(&p, o->via.array.ptr[i].via.ext.ptr, sizeof p);
    lua_pushlightuserdata(L, p);
  }
  /* the importer takes references of its own */
  lua_call(L, (int)o->via.array.size - 1, 1);
}

static int is_mark(const msgpack_object *o, int type) {
  return o->type == MSGPACK_OBJECT_ARRAY && o->via.array.size >= 2 &&
         o->via.array.ptr[0].type == MSGPACK_OBJECT_EXT && o->via.array.ptr[0].via.ext.type == type;
}

static void dec_object(decoder *d, const msgpack_object *o) {
  lua_State *L = d->L;
  luaL_checkstack(L, 8, "corral codec");
  switch (o->type) {
  case MSGPACK_OBJECT_NIL: lua_pushnil(L); break;
  case MSGPACK_OBJECT_BOOLEAN: lua_pushboolean(L, o->via.boolean); break;
  case MSGPACK_OBJECT_POSITIVE_INTEGER: lua_pushnumber(L, (lua_Number)o->via.u64); break;
  case MSGPACK_OBJECT_NEGATIVE_INTEGER: lua_pushnumber(L, (lua_Number)o->via.i64); break;
  case MSGPACK_OBJECT_FLOAT32:
  case MSGPACK_OBJECT_FLOAT64: lua_pushnumber(L, o->via.f64); break;
  case MSGPACK_OBJECT_STR: lua_pushlstring(L, o->via.str.ptr, o->via.str.size); break;
  case MSGPACK_OBJECT_BIN: lua_pushlstring(L, o->via.bin.ptr, o->via.bin.size); break;
  case MSGPACK_OBJECT_EXT: dec_ext(d, o); break;
  case MSGPACK_OBJECT_ARRAY:
    if (is_mark(o, EXT_FUNC)) {
      dec_function(d, o);
      break;
    }
    if (is_mark(o, EXT_WORKER)) {
      dec_worker(d, o);
      break;
    }
    lua_createtable(L, (int)o->via.array.size, 0);
    dec_ref(d);
    for (uint32_t i = 0; i < o->via.array.size; i++) {
      dec_object(d, &o->via.array.ptr[i]);
      lua_rawseti(L, -2, (int)i + 1);
    }
    break;
  case MSGPACK_OBJECT_MAP:
    lua_createtable(L, 0, (int)o->via.map.size);
    dec_ref(d);
    for (uint32_t i = 0; i < o->via.map.size; i++) {
      dec_object(d, &o->via.map.ptr[i].key);
      dec_object(d, &o->via.map.ptr[i].val);
      if (lua_isnil(L, -2))
        lua_pop(L, 2);
      else
        lua_rawset(L, -3);
    }
    break;
  default: lua_pushnil(L); break;
  }
}

/* Decode all the values of `o` (an array: each element; else the value). */
static int decode_all(lua_State *L, const msgpack_object *o, codec_deps *deps) {
  int n = o->type == MSGPACK_OBJECT_ARRAY ? (int)o->via.array.size : 1;
  luaL_checkstack(L, n + 8, "corral codec: too many values");
  decoder d = {L, 0, 0, deps};
  lua_pushnil(L); /* the refs table, made with the first table */
  d.refs = lua_gettop(L);
  if (o->type == MSGPACK_OBJECT_ARRAY) {
    for (int i = 0; i < n; i++)
      dec_object(&d, &o->via.array.ptr[i]);
  } else {
    dec_object(&d, o);
  }
  lua_remove(L, d.refs);
  return n;
}

int codec_decode(lua_State *L, const char *data, size_t len, codec_deps *deps) {
  corral_context *c = ctx_of(L);
  if (c != NULL && !c->zone_busy) {
    /* the common case: the context's own zone, kept between decodes */
    if (c->zone == NULL) c->zone = msgpack_zone_new(2048);
    if (c->zone != NULL) {
      msgpack_object o;
      size_t off = 0;
      if (msgpack_unpack(data, len, &off, c->zone, &o) < MSGPACK_UNPACK_SUCCESS) {
        msgpack_zone_clear(c->zone);
        lua_pushliteral(L, "malformed MessagePack payload");
        return -1;
      }
      c->zone_busy = 1;
      int n = decode_all(L, &o, deps);
      c->zone_busy = 0;
      msgpack_zone_clear(c->zone);
      return n;
    }
  }
  /* nested in another decode: a zone of its own, freed by __gc on error */
  msgpack_unpacked *up = unpacked_push(L);
  int slot = lua_gettop(L);
  size_t off = 0;
  if (msgpack_unpack_next(up, data, len, &off) != MSGPACK_UNPACK_SUCCESS) {
    lua_pop(L, 1);
    lua_pushliteral(L, "malformed MessagePack payload");
    return -1;
  }
  int n = decode_all(L, &up->data, deps);
  msgpack_unpacked_destroy(up);
  lua_remove(L, slot);
  return n;
}

/* Release the references held by an encoded payload that will never be
 * decoded (futures and worker instances passed by reference). */
static void release_refs(const msgpack_object *o) {
  switch (o->type) {
  case MSGPACK_OBJECT_EXT:
    if (o->via.ext.type == EXT_FUTURE) {
      corral_future *f;
      memcpy(&f, o->via.ext.ptr, sizeof(corral_future *));
      corral_future_release(f);
    } else if (o->via.ext.type == EXT_INST) {
      void *p;
      memcpy(&p, o->via.ext.ptr, sizeof p);
      worker_release(p);
    }
    break;
  case MSGPACK_OBJECT_ARRAY:
    for (uint32_t i = 0; i < o->via.array.size; i++)
      release_refs(&o->via.array.ptr[i]);
    break;
  case MSGPACK_OBJECT_MAP:
    for (uint32_t i = 0; i < o->via.map.size; i++) {
      release_refs(&o->via.map.ptr[i].key);
      release_refs(&o->via.map.ptr[i].val);
    }
    break;
  default: break;
  }
}

void codec_discard(const char *data, size_t len) {
  if (data == NULL || len == 0) return;
  msgpack_unpacked u;
  msgpack_unpacked_init(&u);
  size_t off = 0;
  if (msgpack_unpack_next(&u, data, len, &off) == MSGPACK_UNPACK_SUCCESS) release_refs(&u.data);
  msgpack_unpacked_destroy(&u);
}
