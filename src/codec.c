/* codec.c: Lua values to and from MessagePack (msgpack-c): the wire format of
 * every value that crosses contexts, and of results settled from C.
 *
 * A payload is a MessagePack array of values. Plain values map to MessagePack
 * types (integers up to 2^53 as integers, other numbers as doubles; strings
 * as str; tables as arrays when they are sequences, else maps). What needs
 * more is marked with an extension type (bodies big-endian):
 *   REF   (1)  u32 id    a table or function seen before in this payload,
 *                        numbered from 0 in the order they were first met
 *                        (shared sub-tables, cycles, recursive functions)
 *   DEP   (2)  u32 i     a future to unwrap: the first result of the call's
 *                        i-th input (the call holds the inputs)
 *   FUTURE (3) u64 h     a future by handle
 *   MODULE (4) name      a loaded module: package.loaded[name]
 *   CFUNC (5)  path      a C function of a loaded module ("string.format",
 *                        "_G.print"): module name, a dot, the key
 *   [FUNC (6) mac64 env8, bin bytecode, env?, upvalues...]   a Lua function:
 *                        an array led by the mark, whose body is a SipHash-2-4
 *                        of the bytecode under a key drawn at random by this
 *                        process, then how its environment travels: 0 the
 *                        globals (none follows), 1 a table (it follows the
 *                        bytecode), 2 a table with a metatable (it follows,
 *                        and falls back to the receiver's globals)
 *   [WORKER (7), opts, INST (8) u64 h...]  a thread worker handle
 *   timestamp (-1)       MessagePack's own (4, 8 or 12 bytes), read only:
 *                        it decodes to {sec = s, nsec = ns}
 * Metatables do not travel. Tables nest at most CODEC_MAX_DEPTH deep; with
 * the wrapping array, functions and worker handles a payload nests at most
 * CODEC_MAX_DEPTH + 2 deep, and the decoder (msgpack-c's unpacker template,
 * instantiated here with a stack that deep) takes exactly that. The template
 * builds msgpack objects in a zone, then they become Lua values: the FUNC
 * and WORKER arrays need to be seen whole (a function's cache key is its
 * bytecode and upvalue bytes), which a push parser with no end-of-container
 * callback does not give while it runs.
 *
 * Handles. Futures and worker instances cross as handles (handle.c): numbers
 * the runtime issued, with a generation, that the decoder resolves and checks
 * (kind, generation, object alive); a forged or stale one is an error, never
 * an address. A payload holds a reference on each object it names, given back
 * when the payload is freed (corral__codec_discard).
 *
 * Trust. Payloads made by this process's encoder are decoded trusted: every
 * length, type, reference id, dependency index and handle is still checked,
 * and bytecode is loaded only when its mark authenticates it, so bytes that
 * did not come from the encoder never reach luaL_loadbuffer (LuaJIT does not
 * verify bytecode). Foreign bytes (core.decode, results a C host settled) are
 * plain MessagePack: no functions, futures, workers or dependencies; modules
 * and C functions only when already loaded; timestamps; REF ids checked like
 * any other: a host's own extension of types 1-8 is read as corral's only
 * when it is valid as one, and then it can only name a table already decoded
 * or a module already loaded. Any other extension is an error naming its type.
 *
 * Failures are errors, never values: the decoder returns -1 with a message
 * naming where (`result[1].a[3]: ...`). Neither side raises except when Lua
 * runs out of memory, and then leaks nothing: the C memory and references an
 * encode or decode holds belong to a userdata whose __gc gives them back.
 */
#include <assert.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/random.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <msgpack.h>

#include "internal.h"

/* What the codec reaches above it (Lua futures, worker handles), handed to
 * it by the binding: it calls no layer above its own. */
static const corral__codec_iface *iface;

void corral__codec_init(const corral__codec_iface *i) { iface = i; }

enum {
  EXT_TIMESTAMP = -1,
  EXT_REF = 1,
  EXT_DEP,
  EXT_FUTURE,
  EXT_MODULE,
  EXT_CFUNC,
  EXT_FUNC,
  EXT_WORKER,
  EXT_INST,
  EXT_BUFFER,     /* a buffer shared by reference: its handle (8) */
  EXT_BYTES,      /* a buffer's bytes, for another process or for bytes out */
  EXT_SYNC = 13,  /* a channel or sync primitive shared by reference: its handle (8) */
  EXT_RSYNC = 14, /* one of the parent process's (in a child): its handle there (8), kind
                   * (1), and a condition's lock's handle (8, or 0) */
  /* a buffer in shared memory, to another process: its handle in the
   * process that encoded it (8) and its length (8), on the wire only; and
   * the same once its descriptor came over the socket (process.c): the
   * descriptor here (8), its length (8) */
  EXT_SHM = CODEC_SHM_REF,
  EXT_SHMFD = CODEC_SHM_FD
};

/* A function's environment, in its FUNC mark. */
enum { ENV_GLOBALS = 0, ENV_TABLE = 1, ENV_OVERLAY = 2 };

#define CODEC_MAX_DEPTH 100
/* Registry keys: addresses (a raw get with a light userdata key hashes no
 * string). */
static char SEEN_KEY, CFUNCS_KEY, FCACHE_KEY, DBOX_KEY;
#define EBOX_MT "corral.codec.ebox"
#define DBOX_MT "corral.codec.dbox"

/* registry[key] pushed; registry[key] = the value on top, popped */
static void reg_get(lua_State *L, void *key) {
  lua_pushlightuserdata(L, key);
  lua_rawget(L, LUA_REGISTRYINDEX);
}

static void reg_set(lua_State *L, void *key) {
  lua_pushlightuserdata(L, key);
  lua_insert(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

/* ======================================================================== */
/* C memory: counted, and failing on demand in tests                         */
/* ======================================================================== */

static atomic_int fail_countdown; /* the nth allocation from now fails; 0: none */
static atomic_int live_allocs;    /* blocks the codec owns (handed-off ones leave) */

void corral__codec_fail_alloc(int nth) { atomic_store(&fail_countdown, nth > 0 ? nth : 0); }
int corral__codec_live(void) { return atomic_load(&live_allocs); }

static int should_fail(void) {
  int n = atomic_load_explicit(&fail_countdown, memory_order_relaxed);
  return n > 0 && atomic_fetch_sub(&fail_countdown, 1) == 1;
}

static void *cmalloc(size_t n) {
  if (should_fail()) return NULL;
  void *p = malloc(n);
  if (p != NULL) atomic_fetch_add_explicit(&live_allocs, 1, memory_order_relaxed);
  return p;
}

static void *crealloc(void *p, size_t n) {
  if (should_fail()) return NULL;
  void *q = realloc(p, n);
  if (q != NULL && p == NULL) atomic_fetch_add_explicit(&live_allocs, 1, memory_order_relaxed);
  return q;
}

static void cfree(void *p) {
  if (p == NULL) return;
  atomic_fetch_sub_explicit(&live_allocs, 1, memory_order_relaxed);
  free(p);
}

/* A block leaves the codec (the caller frees it with free()). */
static void *handed(void *p) {
  if (p != NULL) atomic_fetch_sub_explicit(&live_allocs, 1, memory_order_relaxed);
  return p;
}

/* ======================================================================== */
/* Bytes                                                                     */
/* ======================================================================== */

static void put_be(unsigned char *p, uint64_t v, int n) {
  for (int i = n - 1; i >= 0; i--, v >>= 8)
    p[i] = (unsigned char)v;
}

static uint64_t get_be(const char *s, int n) {
  const unsigned char *p = (const unsigned char *)s;
  uint64_t v = 0;
  for (int i = 0; i < n; i++)
    v = v << 8 | p[i];
  return v;
}

/* SipHash-2-4 (Aumasson and Bernstein): the mark that authenticates bytecode. */
#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                   \
  do {                                                                                             \
    v0 += v1;                                                                                      \
    v1 = ROTL(v1, 13);                                                                             \
    v1 ^= v0;                                                                                      \
    v0 = ROTL(v0, 32);                                                                             \
    v2 += v3;                                                                                      \
    v3 = ROTL(v3, 16);                                                                             \
    v3 ^= v2;                                                                                      \
    v0 += v3;                                                                                      \
    v3 = ROTL(v3, 21);                                                                             \
    v3 ^= v0;                                                                                      \
    v2 += v1;                                                                                      \
    v1 = ROTL(v1, 17);                                                                             \
    v1 ^= v2;                                                                                      \
    v2 = ROTL(v2, 32);                                                                             \
  } while (0)

static uint64_t mac_k0, mac_k1;
static uv_once_t mac_once = UV_ONCE_INIT;

static uint64_t siphash(uint64_t k0, uint64_t k1, const char *data, size_t len);

/* The key: drawn at random, or made from CORRAL_TRUST_KEY (a secret shared
 * with the remote hosts that run this process's functions: docs/remote.md). */
static void mac_init(void) {
  const char *secret = getenv("CORRAL_TRUST_KEY");
  if (secret != NULL && strlen(secret) >= 16) {
    size_t n = strlen(secret);
    mac_k0 = siphash(0x636f7272616c2d31ULL, 0, secret, n);
    mac_k1 = siphash(0x636f7272616c2d32ULL, 0, secret, n);
    return;
  }
  unsigned char k[16];
  if (getrandom(k, sizeof k, 0) != (ssize_t)sizeof k) abort(); /* no key, no bytecode */
  uint64_t a = 0, b = 0;
  for (int i = 0; i < 8; i++) {
    a |= (uint64_t)k[i] << (8 * i);
    b |= (uint64_t)k[8 + i] << (8 * i);
  }
  mac_k0 = a;
  mac_k1 = b;
}

void corral__codec_key(uint64_t *k0, uint64_t *k1) {
  uv_once(&mac_once, mac_init);
  *k0 = mac_k0;
  *k1 = mac_k1;
}

void corral__codec_set_key(uint64_t k0, uint64_t k1) {
  uv_once(&mac_once, mac_init);
  mac_k0 = k0;
  mac_k1 = k1;
}

static uint64_t mac(const char *data, size_t len) {
  uv_once(&mac_once, mac_init);
  return siphash(mac_k0, mac_k1, data, len);
}

static uint64_t siphash(uint64_t k0, uint64_t k1, const char *data, size_t len) {
  const unsigned char *in = (const unsigned char *)data;
  uint64_t v0 = 0x736f6d6570736575ULL ^ k0, v1 = 0x646f72616e646f6dULL ^ k1;
  uint64_t v2 = 0x6c7967656e657261ULL ^ k0, v3 = 0x7465646279746573ULL ^ k1;
  size_t whole = len - len % 8;
  for (size_t i = 0; i < whole; i += 8) {
    uint64_t m = 0;
    for (int j = 0; j < 8; j++)
      m |= (uint64_t)in[i + (size_t)j] << (8 * j);
    v3 ^= m;
    SIPROUND;
    SIPROUND;
    v0 ^= m;
  }
  uint64_t b = (uint64_t)len << 56;
  for (size_t j = 0; j < len % 8; j++)
    b |= (uint64_t)in[whole + j] << (8 * j);
  v3 ^= b;
  SIPROUND;
  SIPROUND;
  v0 ^= b;
  v2 ^= 0xff;
  SIPROUND;
  SIPROUND;
  SIPROUND;
  SIPROUND;
  return v0 ^ v1 ^ v2 ^ v3;
}

/* ======================================================================== */
/* Paths in errors                                                           */
/* ======================================================================== */

/* A value's path, built segment by segment; a long one keeps its start and
 * its end and drops the middle. */
typedef struct {
  char buf[2048];
  size_t n;
  int nseg;
  unsigned short end[CODEC_MAX_DEPTH * 2 + 16]; /* where each segment ends */
} pathbuf;

static void pb_add(pathbuf *pb, const char *fmt, ...) {
  if (pb->nseg >= (int)(sizeof pb->end / sizeof pb->end[0]) || pb->n >= sizeof pb->buf - 1) return;
  va_list ap;
  va_start(ap, fmt);
  // NOLINTNEXTLINE(clang-analyzer-valist.Uninitialized): va_start is just above
  int w = vsnprintf(pb->buf + pb->n, sizeof pb->buf - pb->n, fmt, ap);
  va_end(ap);
  if (w < 0) w = 0;
  pb->n += (size_t)w;
  if (pb->n >= sizeof pb->buf) pb->n = sizeof pb->buf - 1;
  pb->end[pb->nseg++] = (unsigned short)pb->n;
}

/* A key as a path segment: .name, [12] or ["a b"]. */
static void pb_key(pathbuf *pb, const char *s, size_t len) {
  int ident = len > 0 && len <= 40 && !(s[0] >= '0' && s[0] <= '9');
  for (size_t i = 0; i < len && ident; i++)
    ident = s[i] == '_' || (s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
            (s[i] >= '0' && s[i] <= '9');
  if (ident)
    pb_add(pb, ".%.*s", (int)len, s);
  else
    pb_add(pb, "[\"%.*s%s\"]", (int)(len > 24 ? 24 : len), s, len > 24 ? "..." : "");
}

/* "path: why" into out; paths over 160 characters lose their middle. */
static void pb_finish(pathbuf *pb, char *out, size_t outsz, const char *why) {
  const char *p = pb->buf;
  size_t n = pb->n;
  if (n <= 160) {
    snprintf(out, outsz, "%.*s: %s", (int)n, p, why);
    return;
  }
  /* the first segments up to 70 characters, the last ones within 70 */
  size_t head = 0, tail = n;
  for (int i = 0; i < pb->nseg && pb->end[i] <= 70; i++)
    head = pb->end[i];
  if (head == 0) head = 70;
  for (int i = pb->nseg - 1; i > 0 && n - pb->end[i - 1] <= 70; i--)
    tail = pb->end[i - 1];
  if (tail == n || tail < head) tail = n - 70;
  snprintf(out, outsz, "%.*s...%.*s: %s", (int)head, p, (int)(n - tail), p + tail, why);
}

/* ======================================================================== */
/* Encode                                                                    */
/* ======================================================================== */

/* The C side of an encode that outgrew the C stack: the output buffer, the
 * references taken for the payload and the dependencies found. A userdata
 * owns it, so that Lua running out of memory mid-encode leaks nothing: its
 * __gc frees and releases (atomically, no lock, no Lua). Made only when the
 * encoder first needs the heap. */
typedef struct {
  char *buf;
  struct held {
    void *p;
    int kind; /* HANDLE_FUTURE, HANDLE_WORKER or HANDLE_BUFFER */
  } * held;
  int nheld, capheld;
  corral_future **deps;
  int ndeps, capdeps;
} ebox;

static void ebox_release(ebox *b, int drop_refs) {
  cfree(b->buf);
  b->buf = NULL;
  for (int i = 0; drop_refs && i < b->nheld; i++) {
    if (b->held[i].kind == HANDLE_FUTURE)
      corral_future_release(b->held[i].p);
    else if (b->held[i].kind == HANDLE_BUFFER)
      corral__buffer_release(b->held[i].p);
    else if (b->held[i].kind == HANDLE_SYNC)
      corral__sync_release(b->held[i].p);
    else
      iface->worker_drop(b->held[i].p);
  }
  cfree(b->held);
  b->held = NULL;
  b->nheld = b->capheld = 0;
  for (int i = 0; i < b->ndeps; i++)
    corral__future_drop_dep(b->deps[i]);
  cfree(b->deps);
  b->deps = NULL;
  b->ndeps = b->capdeps = 0;
}

static int ebox_gc(lua_State *L) {
  ebox_release(lua_touserdata(L, 1), 1);
  return 0;
}

/* Where the encoder is, for the path in an error; made into text only when
 * encoding fails. */
typedef struct {
  enum { AT_ARG, AT_INDEX, AT_KEY, AT_UPVALUE } kind;
  size_t i;         /* AT_ARG (the value's number), AT_INDEX */
  int key;          /* AT_KEY: stack index of the key */
  const char *name; /* AT_ARG: what; AT_UPVALUE: its name */
} frame;

typedef struct {
  lua_State *L;
  msgpack_packer pk;
  codec_opts *o;
  /* the output: on the C stack until it outgrows it, then in the box */
  char *data;
  size_t size, alloc;
  ebox *box;
  int boxslot;  /* stack index of the box (nil until made) */
  int deferred; /* futures whose C half this encode made wait to be settled */
  int seen;     /* stack index of the table -> id map (nil until the first table) */
  int nseen;
  int cfuncs; /* stack index of the C function -> path map (nil: not built) */
  int loaded; /* stack index of package.loaded (nil: not read yet) */
  int nframes;
  frame frames[CODEC_MAX_DEPTH * 2 + 8];
  char local[256];
} encoder;

static ebox *need_box(encoder *e) {
  if (e->box != NULL) return e->box;
  lua_State *L = e->L;
  ebox *b = lua_newuserdata(L, sizeof *b); /* may raise: nothing is held yet */
  memset(b, 0, sizeof *b);
  if (luaL_newmetatable(L, EBOX_MT)) {
    lua_pushcfunction(L, ebox_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  lua_replace(L, e->boxslot);
  e->box = b;
  return b;
}

static int enc_write(void *ud, const char *buf, size_t len) {
  encoder *e = ud;
  if (len == 0) return 0;
  if (e->size + len > e->alloc) {
    size_t alloc = e->alloc * 2;
    while (alloc < e->size + len)
      alloc *= 2;
    ebox *b = need_box(e);
    char *d = e->data == e->local ? cmalloc(alloc) : crealloc(e->data, alloc);
    if (d == NULL) return -1;
    if (e->data == e->local) memcpy(d, e->local, e->size);
    b->buf = e->data = d;
    e->alloc = alloc;
  }
  memcpy(e->data + e->size, buf, len);
  e->size += len;
  return 0;
}

/* Note a reference the payload will own. */
static int hold(encoder *e, void *p, int kind) {
  ebox *b = need_box(e);
  if (b->nheld == b->capheld) {
    int cap = b->capheld ? b->capheld * 2 : 8;
    struct held *h = crealloc(b->held, sizeof *h * (size_t)cap);
    if (h == NULL) return -1;
    b->held = h;
    b->capheld = cap;
  }
  b->held[b->nheld].p = p;
  b->held[b->nheld].kind = kind;
  b->nheld++;
  return 0;
}

static void at(encoder *e, frame f) {
  if (e->nframes < (int)(sizeof e->frames / sizeof e->frames[0])) e->frames[e->nframes] = f;
  e->nframes++;
}

static int enc_value(encoder *e, int idx, int depth);

static int enc_fail(encoder *e, const char *why) {
  pathbuf *pb = &(pathbuf){.n = 0};
  int nf = e->nframes < (int)(sizeof e->frames / sizeof e->frames[0])
               ? e->nframes
               : (int)(sizeof e->frames / sizeof e->frames[0]);
  lua_State *L = e->L;
  for (int i = 0; i < nf; i++) {
    frame *f = &e->frames[i];
    switch (f->kind) {
    case AT_ARG:
      if (f->name[0] == '\0') /* a lead name: the value has no index */
        pb_add(pb, "%s", e->o->lead[f->i]);
      else
        pb_add(pb, "%s[%zu]", f->name, f->i);
      break;
    case AT_INDEX: pb_add(pb, "[%zu]", f->i); break;
    case AT_UPVALUE: pb_add(pb, "<upvalue %s>", f->name); break;
    case AT_KEY:
      if (lua_type(L, f->key) == LUA_TSTRING) {
        size_t len;
        const char *s = lua_tolstring(L, f->key, &len);
        pb_key(pb, s, len);
      } else if (lua_type(L, f->key) == LUA_TNUMBER) {
        pb_add(pb, "[%.14g]", lua_tonumber(L, f->key));
      } else {
        pb_add(pb, "[%s]", luaL_typename(L, f->key));
      }
      break;
    }
  }
  pb_finish(pb, e->o->err, sizeof e->o->err, why);
  return -1;
}

static int enc_oom(encoder *e) { return enc_fail(e, "out of memory"); }

#define PK(call)                                                                                   \
  do {                                                                                             \
    if ((call) != 0) return enc_oom(e);                                                            \
  } while (0)

static int pack_ext(encoder *e, int type, const void *data, size_t len) {
  if (msgpack_pack_ext(&e->pk, len, (int8_t)type) != 0) return -1;
  if (len > 0 && msgpack_pack_ext_body(&e->pk, data, len) != 0) return -1;
  return 0;
}

static int pack_ext_u(encoder *e, int type, uint64_t v, int n) {
  unsigned char b[8];
  put_be(b, v, n);
  return pack_ext(e, type, b, (size_t)n);
}

/* Whether x is an integer that a double holds exactly (|x| <= 2^53, not
 * -0), and which: no floor(), no undefined conversion (NaN and the large
 * fail the range test first). */
static inline int exact_int(lua_Number x, int64_t *i) {
  if (!(x >= -9007199254740992.0 && x <= 9007199254740992.0)) return 0;
  int64_t v = (int64_t)x;
  if ((lua_Number)v != x || (v == 0 && signbit(x))) return 0;
  *i = v;
  return 1;
}

static int enc_string(encoder *e, int idx) {
  size_t len;
  const char *s = lua_tolstring(e->L, idx, &len);
  PK(msgpack_pack_str(&e->pk, len));
  PK(msgpack_pack_str_body(&e->pk, s, len));
  return 0;
}

static int enc_number(encoder *e, lua_Number x) {
  int64_t i;
  if (exact_int(x, &i)) return msgpack_pack_int64(&e->pk, i);
  return msgpack_pack_double(&e->pk, x);
}

/* The table or function at idx was seen before: emit a REF (returns 1).
 * Otherwise give it the next id (returns 0); -1 when out of memory. */
static int enc_seen(encoder *e, int idx) {
  lua_State *L = e->L;
  if (lua_isnil(L, e->seen)) {
    /* The first of this encode: take the map out of the registry, so that
     * an encode cut short by an error leaves no table of its own in the map
     * the next one takes (encodes do not nest: see future_of). */
    reg_get(L, &SEEN_KEY);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_newtable(L);
    } else {
      lua_pushnil(L);
      reg_set(L, &SEEN_KEY);
    }
    lua_replace(L, e->seen);
  }
  lua_pushvalue(L, idx);
  lua_rawget(L, e->seen);
  if (!lua_isnil(L, -1)) {
    uint32_t id = (uint32_t)lua_tointeger(L, -1);
    lua_pop(L, 1);
    return pack_ext_u(e, EXT_REF, id, 4) != 0 ? -1 : 1;
  }
  lua_pop(L, 1);
  lua_pushvalue(L, idx);
  lua_pushinteger(L, e->nseen++);
  lua_rawset(L, e->seen);
  return 0;
}

/* package.loaded, read raw (the registry's _LOADED: _G may be strict). */
static int loaded_index(encoder *e) {
  if (lua_isnil(e->L, e->loaded)) {
    lua_getfield(e->L, LUA_REGISTRYINDEX, "_LOADED");
    lua_replace(e->L, e->loaded);
  }
  return lua_istable(e->L, e->loaded) ? e->loaded : 0;
}

/* The C half of a table whose metatable says __future: given by the
 * scheduler's cref, called protected (a table that only claims to be a
 * future may raise there). A settled future whose C half is made here is
 * settled after this encode (cref says so), never by an encode nested in
 * this one. */
static corral_future *future_of(encoder *e, int idx) {
  int deferred = 0;
  corral_future *f = iface->future_of(e->L, idx, &deferred);
  if (deferred) e->deferred = 1;
  return f;
}

static int enc_future(encoder *e, int idx) {
  if (e->o->no_handles && !e->o->unwrap)
    return enc_fail(e, "a future cannot be an init argument of a process worker (pass it to a "
                       "method: it is then an input)");
  /* (before its C half is made: a future that stays in Lua makes none) */
  if (e->o->no_refs)
    return enc_fail(e, "a future cannot be encoded into bytes (it lives in this process)");
  corral_future *f = future_of(e, idx);
  if (f == NULL)
    return enc_fail(e, "a table with a __future metatable that is not a corral future");
  codec_opts *o = e->o;
  if (o->unwrap) {
    /* an input of a call */
    ebox *b = need_box(e);
    if (b->ndeps == b->capdeps) {
      int cap = b->capdeps ? b->capdeps * 2 : 4;
      corral_future **d = crealloc(b->deps, sizeof(corral_future *) * (size_t)cap);
      if (d == NULL) return enc_oom(e);
      b->deps = d;
      b->capdeps = cap;
    }
    /* while the call holds it, its failure is the call's to report: its own
     * reporter, tied to its C half, says nothing */
    corral__future_add_dep(f);
    uint32_t i = (uint32_t)b->ndeps;
    b->deps[b->ndeps++] = f;
    PK(pack_ext_u(e, EXT_DEP, i, 4));
  } else {
    uint64_t h = corral__future_handle(f);
    if (h == 0) return enc_fail(e, "too many futures have crossed contexts (handle table full)");
    if (hold(e, f, HANDLE_FUTURE) != 0) return enc_oom(e);
    corral_future_retain(f); /* owned by the payload: see corral__codec_discard */
    o->has_refs = 1;
    PK(pack_ext_u(e, EXT_FUTURE, h, 8));
  }
  return 0;
}

/* A string field of a map being packed. */
static int pack_kv_str(encoder *e, const char *k, const char *v) {
  size_t kl = strlen(k), vl = strlen(v);
  return msgpack_pack_str(&e->pk, kl) || msgpack_pack_str_body(&e->pk, k, kl) ||
         msgpack_pack_str(&e->pk, vl) || msgpack_pack_str_body(&e->pk, v, vl);
}

/* A worker handle: [WORKER, {name, balance, blocking, timeout}, INST...], read off
 * its C half (`_c`, a corral.handle userdata) with no call into Lua; its
 * instances travel as handles. */
static int enc_worker(encoder *e, int idx) {
  const corral__handle *h;
  int kind = iface->handle_of(e->L, idx, &h);
  if (kind <= 0)
    return enc_fail(e, kind == 0 ? "an async or sync worker lives in its context and cannot travel"
                                 : "a table with a __worker metatable that is not a worker handle");
  if (e->o->no_refs)
    return enc_fail(e, "a worker cannot be encoded into bytes (it lives in this process)");
  if (e->o->no_handles)
    return enc_fail(e, "a worker handle cannot be sent to a process worker (not yet)");
  PK(msgpack_pack_array(&e->pk, (size_t)2 + (size_t)h->n));
  PK(pack_ext(e, EXT_WORKER, NULL, 0));
  PK(msgpack_pack_map(&e->pk, h->timeout > 0 ? 4 : 3));
  PK(pack_kv_str(e, "name", h->name));
  if (h->timeout > 0) {
    PK(msgpack_pack_str(&e->pk, 7));
    PK(msgpack_pack_str_body(&e->pk, "timeout", 7));
    PK(msgpack_pack_double(&e->pk, h->timeout));
  }
  PK(pack_kv_str(e, "balance", h->balance));
  PK(msgpack_pack_str(&e->pk, 8));
  PK(msgpack_pack_str_body(&e->pk, "blocking", 8));
  PK(h->blocking ? msgpack_pack_true(&e->pk) : msgpack_pack_false(&e->pk));
  for (int i = 0; i < h->n; i++) {
    uint64_t hd = iface->worker_handle(h->insts[i]);
    if (hd == 0) return enc_fail(e, "too many workers have crossed contexts (handle table full)");
    if (hold(e, h->insts[i], HANDLE_WORKER) != 0) return enc_oom(e);
    iface->worker_hold(h->insts[i]); /* a handle in flight: it keeps the worker running */
    e->o->has_refs = 1;
    PK(pack_ext_u(e, EXT_INST, hd, 8));
  }
  return 0;
}

static int enc_table(encoder *e, int idx, int depth) {
  lua_State *L = e->L;
  if (depth >= CODEC_MAX_DEPTH) return enc_fail(e, "table nested too deeply (limit 100)");
  if (!lua_checkstack(L, 8)) return enc_fail(e, "Lua stack exhausted");
  if (lua_getmetatable(L, idx)) {
    /* raw: a metatable's __index may raise (a strict class) */
    lua_pushliteral(L, "__future");
    lua_rawget(L, -2);
    int is_future = lua_toboolean(L, -1);
    lua_pushliteral(L, "__worker");
    lua_rawget(L, -3);
    int is_worker = lua_toboolean(L, -1);
    lua_pop(L, 3);
    if (is_future) return enc_future(e, idx);
    if (is_worker) return enc_worker(e, idx);
  }
  int seen = enc_seen(e, idx);
  if (seen != 0) return seen < 0 ? enc_oom(e) : 0;
  size_t n = lua_objlen(L, idx), count = 0;
  int array = 1;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    count++;
    if (array) {
      int64_t k;
      if (lua_type(L, -2) != LUA_TNUMBER || !exact_int(lua_tonumber(L, -2), &k) || k < 1 ||
          (uint64_t)k > n)
        array = 0;
    }
    lua_pop(L, 1);
  }
  if (array && count == n) {
    PK(msgpack_pack_array(&e->pk, n));
    for (size_t i = 1; i <= n; i++) {
      lua_rawgeti(L, idx, (int)i);
      int rc;
      /* numbers and strings, most of what arrays hold, go straight */
      int t = lua_type(L, -1);
      if (t == LUA_TNUMBER) {
        rc = enc_number(e, lua_tonumber(L, -1)) != 0 ? enc_oom(e) : 0;
      } else if (t == LUA_TSTRING) {
        rc = enc_string(e, lua_gettop(L));
      } else {
        at(e, (frame){.kind = AT_INDEX, .i = i});
        rc = enc_value(e, lua_gettop(L), depth + 1);
        if (rc == 0) e->nframes--;
      }
      lua_pop(L, 1);
      if (rc != 0) return rc;
    }
    return 0;
  }
  PK(msgpack_pack_map(&e->pk, count));
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
  return enc_write(ud, p, sz);
}

/* Push a new map from the C functions that loaded modules hold to their
 * paths ("string.format", "_G.print"), and keep it in the registry. */
static void cfunc_map(lua_State *L, int loaded) {
  lua_newtable(L);
  int map = lua_gettop(L);
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
  lua_pushvalue(L, map);
  reg_set(L, &CFUNCS_KEY);
}

/* A C function travels as its path in a loaded module. The map is built
 * once, and again when a function is not in it (a module loaded since). */
static int cfunc_path(encoder *e, int idx) {
  lua_State *L = e->L;
  int loaded = loaded_index(e);
  if (loaded == 0) return enc_fail(e, "package.loaded is missing: a C function cannot travel");
  if (lua_isnil(L, e->cfuncs)) {
    reg_get(L, &CFUNCS_KEY);
    lua_replace(L, e->cfuncs);
  }
  int built = 0;
  for (;;) {
    if (lua_isnil(L, e->cfuncs)) {
      cfunc_map(L, loaded);
      lua_replace(L, e->cfuncs);
      built = 1;
    }
    lua_pushvalue(L, idx);
    lua_rawget(L, e->cfuncs);
    if (lua_isstring(L, -1)) {
      size_t len;
      const char *s = lua_tolstring(L, -1, &len);
      int rc = pack_ext(e, EXT_CFUNC, s, len);
      lua_pop(L, 1);
      return rc != 0 ? enc_oom(e) : 0;
    }
    lua_pop(L, 1);
    if (built) return enc_fail(e, "a C function that no loaded module holds cannot travel");
    lua_pushnil(L);
    lua_replace(L, e->cfuncs); /* rebuild, once */
  }
}

/* A loaded module travels as its name: package.loaded[name] == value.
 * Returns 1 when it was one (and was packed), 0 when not, -1 out of memory. */
static int module_name(encoder *e, int idx) {
  lua_State *L = e->L;
  int loaded = loaded_index(e);
  if (loaded == 0) return 0;
  lua_pushnil(L);
  while (lua_next(L, loaded)) {
    if (lua_rawequal(L, -1, idx) && lua_type(L, -2) == LUA_TSTRING) {
      size_t len;
      const char *s = lua_tolstring(L, -2, &len);
      int rc = pack_ext(e, EXT_MODULE, s, len);
      lua_pop(L, 2);
      return rc != 0 ? -1 : 1;
    }
    lua_pop(L, 1);
  }
  return 0;
}

static int enc_function(encoder *e, int idx, int depth) {
  lua_State *L = e->L;
  if (lua_iscfunction(L, idx)) return cfunc_path(e, idx);
  if (depth >= CODEC_MAX_DEPTH) return enc_fail(e, "functions nested too deeply (limit 100)");
  if (!lua_checkstack(L, 8)) return enc_fail(e, "Lua stack exhausted");
  /* numbered like tables: a recursive local function refers to itself */
  int seen = enc_seen(e, idx);
  if (seen != 0) return seen < 0 ? enc_oom(e) : 0;
  int nup = 0;
  while (lua_getupvalue(L, idx, nup + 1) != NULL) {
    lua_pop(L, 1);
    nup++;
  }
  /* Its environment, when not the globals table (setfenv): carried by value;
   * one with a metatable (an overlay of the globals, as test runners make)
   * falls back to the receiver's globals. */
  lua_getfenv(L, idx);
  int env = lua_gettop(L);
  int envkind = ENV_GLOBALS;
  if (!lua_rawequal(L, env, LUA_GLOBALSINDEX) && lua_istable(L, env)) {
    envkind = ENV_TABLE;
    if (lua_getmetatable(L, env)) {
      lua_pop(L, 1);
      envkind = ENV_OVERLAY;
    }
  }
  /* [FUNC (mac, envkind), bin32 bytecode, env?, upvalues...]: the bytecode is
   * dumped straight into the output, then its length and mark filled in. */
  need_box(e); /* the dump's writer must not make it: it calls no Lua */
  PK(msgpack_pack_array(&e->pk, (size_t)2 + (envkind != ENV_GLOBALS) + (size_t)nup));
  unsigned char head[17] = {0xc7, 9, (unsigned char)EXT_FUNC};
  head[11] = (unsigned char)envkind;
  head[12] = 0xc6;
  size_t at_head = e->size;
  PK(enc_write(e, (const char *)head, sizeof head));
  lua_pushvalue(L, idx);
  int rc = lua_dump(L, dump_writer, e);
  lua_pop(L, 1);
  if (rc != 0) return enc_oom(e);
  size_t clen = e->size - at_head - sizeof head;
  if (clen > 0xffffffffu) return enc_fail(e, "function too large");
  const char *code = e->data + at_head + sizeof head;
  put_be((unsigned char *)e->data + at_head + 3, mac(code, clen), 8);
  put_be((unsigned char *)e->data + at_head + 13, clen, 4);
  if (envkind != ENV_GLOBALS) {
    at(e, (frame){.kind = AT_UPVALUE, .name = "_ENV"});
    if (enc_value(e, env, depth + 1) != 0) return -1;
    e->nframes--;
  }
  lua_pop(L, 1);
  for (int i = 1; i <= nup; i++) {
    const char *name = lua_getupvalue(L, idx, i);
    int top = lua_gettop(L);
    at(e, (frame){.kind = AT_UPVALUE, .name = name && *name ? name : "?"});
    int r = 0;
    if (lua_type(L, top) == LUA_TTABLE) r = module_name(e, top);
    if (r < 0) return enc_oom(e);
    if (r == 0 && enc_value(e, top, depth + 1) != 0) return -1;
    lua_pop(L, 1);
    e->nframes--;
  }
  return 0;
}

/* A buffer: by reference (its handle) within the process, from then on
 * immutable; its bytes for another process or for bytes out. */
static int enc_buffer(encoder *e, corral_buffer *b) {
  codec_opts *o = e->o;
  int other = o->no_handles; /* for another process */
  if (other && !o->no_refs && !o->no_shm && corral__buffer_seal(b) == 0) {
    /* in shared memory: its descriptor goes over the socket (process.c) */
    uint64_t h = corral__buffer_handle(b);
    if (h == 0) return enc_fail(e, "too many buffers have crossed contexts (handle table full)");
    if (hold(e, b, HANDLE_BUFFER) != 0) return enc_oom(e);
    atomic_store(&b->shared, 1);
    corral__buffer_retain(b); /* owned by the payload: see corral__codec_discard */
    o->has_refs = 1;
    unsigned char body[16];
    for (int i = 0; i < 8; i++) {
      body[i] = (unsigned char)(h >> (56 - 8 * i));
      body[8 + i] = (unsigned char)((uint64_t)b->len >> (56 - 8 * i));
    }
    PK(pack_ext(e, EXT_SHM, body, sizeof body));
    return 0;
  }
  if (o->no_refs || other) {
    if (b->len > 0xffffffffu) return enc_fail(e, "a buffer over 4 GiB cannot travel as bytes");
    PK(msgpack_pack_ext(&e->pk, b->len, EXT_BYTES));
    PK(msgpack_pack_ext_body(&e->pk, b->data, b->len));
    return 0;
  }
  uint64_t h = corral__buffer_handle(b);
  if (h == 0) return enc_fail(e, "too many buffers have crossed contexts (handle table full)");
  if (hold(e, b, HANDLE_BUFFER) != 0) return enc_oom(e);
  atomic_store(&b->shared, 1);
  corral__buffer_retain(b); /* owned by the payload: see corral__codec_discard */
  o->has_refs = 1;
  PK(pack_ext_u(e, EXT_BUFFER, h, 8));
  return 0;
}

/* A channel or sync primitive: by reference (its handle) within the process. */
static int enc_sync(encoder *e, corral_sync *s, int idx) {
  codec_opts *o = e->o;
  if (o->no_refs)
    return enc_fail(e, "a channel or sync primitive cannot be encoded as bytes (it lives in this "
                       "process)");
  /* (for a process worker too: its proxy makes it an RSYNC, see
   * corral__codec_syncs_for_child; one of a parent's cannot go further) */
  if (s->remote != 0 && o->no_handles)
    return enc_fail(e, "a channel or sync primitive of the parent process cannot leave this "
                       "process worker (its thread workers may have it)");
  if (s->lua_local && iface->sync_share != NULL)
    iface->sync_share(e->L, idx); /* (its values move to the C object: no encode in it) */
  uint64_t h = corral__sync_handle(s);
  if (h == 0) return enc_fail(e, "too many sync objects have crossed contexts (handle table full)");
  if (hold(e, s, HANDLE_SYNC) != 0) return enc_oom(e);
  corral__sync_retain(s); /* owned by the payload: see corral__codec_discard */
  o->has_refs = 1;
  PK(pack_ext_u(e, EXT_SYNC, h, 8));
  return 0;
}

static int enc_value(encoder *e, int idx, int depth) {
  lua_State *L = e->L;
  switch (lua_type(L, idx)) {
  case LUA_TNIL: PK(msgpack_pack_nil(&e->pk)); return 0;
  case LUA_TBOOLEAN:
    PK(lua_toboolean(L, idx) ? msgpack_pack_true(&e->pk) : msgpack_pack_false(&e->pk));
    return 0;
  case LUA_TNUMBER: PK(enc_number(e, lua_tonumber(L, idx))); return 0;
  case LUA_TSTRING: return enc_string(e, idx);
  case LUA_TTABLE: return enc_table(e, idx, depth);
  case LUA_TFUNCTION: return enc_function(e, idx, depth);
  case LUA_TTHREAD: return enc_fail(e, "thread (a coroutine) cannot travel");
  case LUA_TLIGHTUSERDATA: return enc_fail(e, "lightuserdata cannot travel");
  case LUA_TUSERDATA: {
    corral_buffer **u = luaL_testudata(L, idx, CORRAL_BUFFER_MT);
    if (u != NULL && *u != NULL) return enc_buffer(e, *u);
    corral_sync *s = iface->sync_of != NULL ? iface->sync_of(L, idx) : NULL;
    if (s != NULL) return enc_sync(e, s, idx);
    return enc_fail(e, "userdata that is not corral's cannot travel");
  }
  default: {
    char why[64];
    snprintf(why, sizeof why, "%s cannot travel", luaL_typename(L, idx));
    return enc_fail(e, why);
  }
  }
}

char *corral__codec_encode(lua_State *L, int from, int n, size_t *len, codec_opts *o) {
  encoder e;
  e.L = L;
  e.o = o;
  e.box = NULL;
  e.deferred = 0;
  e.nseen = 0;
  e.nframes = 0;
  e.data = e.local;
  e.size = 0;
  e.alloc = sizeof e.local;
  o->has_refs = 0;
  if (!lua_checkstack(L, 24)) {
    snprintf(o->err, sizeof o->err,
             "%d values are too many to send at once (the Lua stack is full): pass a table", n);
    return NULL;
  }
  int top = lua_gettop(L);
  /* slots below everything the encoder pushes, filled when needed: the box,
   * the map of tables seen (shared sub-tables, cycles), the map of C
   * functions, package.loaded */
  lua_pushnil(L);
  e.boxslot = top + 1;
  lua_pushnil(L);
  e.seen = top + 2;
  lua_pushnil(L);
  e.cfuncs = top + 3;
  lua_pushnil(L);
  e.loaded = top + 4;
  msgpack_packer_init(&e.pk, &e, enc_write);
  int rc = 0;
  /* a large string first (a payload, a file's bytes): one allocation */
  size_t first = n > 0 && lua_type(L, from) == LUA_TSTRING ? lua_objlen(L, from) : 0;
  if (first > 4096) {
    ebox *b = need_box(&e);
    char *d = cmalloc(first + 64);
    if (d != NULL) {
      b->buf = e.data = d;
      e.alloc = first + 64;
    }
  }
  if (!o->bare && msgpack_pack_array(&e.pk, (size_t)n) != 0) rc = enc_oom(&e);
  const char *what = o->what ? o->what : "args";
  for (int i = 0; i < n && rc == 0; i++) {
    e.nframes = 0;
    int num = i + 1 - o->offset;
    if (num < 1 && o->lead != NULL)
      at(&e, (frame){.kind = AT_ARG, .i = (size_t)i, .name = ""});
    else
      at(&e, (frame){.kind = AT_ARG, .i = (size_t)num, .name = what});
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
    reg_set(L, &SEEN_KEY);
  }
  lua_settop(L, top);
  /* No Lua from here on: the box, off the stack now, is not collected. */
  char *out = NULL;
  if (rc == 0) {
    if (e.data != e.local) {
      out = e.data;
      e.box->buf = NULL;
    } else if ((out = cmalloc(e.size ? e.size : 1)) != NULL) {
      memcpy(out, e.local, e.size);
    } else {
      rc = enc_oom(&e);
    }
  }
  if (e.box != NULL) {
    ebox *b = e.box;
    if (rc == 0) {
      /* the payload owns the references now; the caller the dependencies */
      b->nheld = 0;
      o->deps = handed(b->deps);
      o->ndeps = o->capdeps = b->ndeps;
      b->deps = NULL;
      b->ndeps = b->capdeps = 0;
    }
    ebox_release(b, 1);
  }
  if (e.deferred) {
    /* now, with this encode done and nothing of it held, settle the C
     * halves it made (each settle is an encode of its own, not nested) */
    iface->flush(L);
  }
  if (rc != 0) {
    o->has_refs = 0;
    return NULL;
  }
  *len = e.size;
  return handed(out);
}

/* ======================================================================== */
/* Unpack: msgpack-c's unpacker template, with a deeper stack                */
/* ======================================================================== */

/* msgpack-c stops at 32 levels; a payload nests CODEC_MAX_DEPTH + 2. */
#define MSGPACK_EMBED_STACK_SIZE (CODEC_MAX_DEPTH + 2)
#include <msgpack/unpack_define.h>

/* Objects go to a zone. `budget`: a container of n elements needs at least n
 * more bytes, so the counts declared in a payload add up to at most its
 * length: a forged count is refused before it is allocated. */
typedef struct {
  msgpack_zone *z;
  size_t budget;
  const char *why;
  int may_fail; /* allocations obey corral__codec_fail_alloc */
} unpack_user;

#define msgpack_unpack_struct(name)    struct codec_unpack##name
#define msgpack_unpack_func(ret, name) static ret codec_unpack##name
#define msgpack_unpack_callback(name)  codec_cb##name
#define msgpack_unpack_object          msgpack_object
#define msgpack_unpack_user            unpack_user

static msgpack_object codec_cb_root(unpack_user *u) {
  (void)u;
  msgpack_object o = {.type = MSGPACK_OBJECT_NIL};
  return o;
}

static int uint_obj(uint64_t d, msgpack_object *o) {
  o->type = MSGPACK_OBJECT_POSITIVE_INTEGER;
  o->via.u64 = d;
  return 0;
}

static int int_obj(int64_t d, msgpack_object *o) {
  if (d >= 0) return uint_obj((uint64_t)d, o);
  o->type = MSGPACK_OBJECT_NEGATIVE_INTEGER;
  o->via.i64 = d;
  return 0;
}

#define UINT_CB(t)                                                                                 \
  static int codec_cb_##t(unpack_user *u, t##_t d, msgpack_object *o) {                            \
    (void)u;                                                                                       \
    return uint_obj(d, o);                                                                         \
  }
#define INT_CB(t)                                                                                  \
  static int codec_cb_##t(unpack_user *u, t##_t d, msgpack_object *o) {                            \
    (void)u;                                                                                       \
    return int_obj(d, o);                                                                          \
  }
UINT_CB(uint8)
UINT_CB(uint16)
UINT_CB(uint32)
UINT_CB(uint64)
INT_CB(int8)
INT_CB(int16)
INT_CB(int32)
INT_CB(int64)

static int codec_cb_float(unpack_user *u, float d, msgpack_object *o) {
  (void)u;
  o->type = MSGPACK_OBJECT_FLOAT32;
  o->via.f64 = d;
  return 0;
}

static int codec_cb_double(unpack_user *u, double d, msgpack_object *o) {
  (void)u;
  o->type = MSGPACK_OBJECT_FLOAT64;
  o->via.f64 = d;
  return 0;
}

static int codec_cb_nil(unpack_user *u, msgpack_object *o) {
  (void)u;
  o->type = MSGPACK_OBJECT_NIL;
  return 0;
}

static int codec_cb_true(unpack_user *u, msgpack_object *o) {
  (void)u;
  o->type = MSGPACK_OBJECT_BOOLEAN;
  o->via.boolean = true;
  return 0;
}

static int codec_cb_false(unpack_user *u, msgpack_object *o) {
  (void)u;
  o->type = MSGPACK_OBJECT_BOOLEAN;
  o->via.boolean = false;
  return 0;
}

static void *zone_alloc(unpack_user *u, size_t n) {
  if (u->may_fail && should_fail()) return NULL;
  return msgpack_zone_malloc(u->z, n);
}

static int codec_cb_array(unpack_user *u, unsigned int n, msgpack_object *o) {
  o->type = MSGPACK_OBJECT_ARRAY;
  o->via.array.size = 0;
  o->via.array.ptr = NULL;
  if (n == 0) return 0;
  if (n > u->budget) {
    u->why = "an array claims more elements than the payload has bytes";
    return MSGPACK_UNPACK_PARSE_ERROR;
  }
  u->budget -= n;
  o->via.array.ptr = zone_alloc(u, n * sizeof(msgpack_object));
  if (o->via.array.ptr == NULL) {
    u->why = "out of memory";
    return MSGPACK_UNPACK_NOMEM_ERROR;
  }
  return 0;
}

static int codec_cb_array_item(unpack_user *u, msgpack_object *c, msgpack_object o) {
  (void)u;
  c->via.array.ptr[c->via.array.size++] = o;
  return 0;
}

static int codec_cb_map(unpack_user *u, unsigned int n, msgpack_object *o) {
  o->type = MSGPACK_OBJECT_MAP;
  o->via.map.size = 0;
  o->via.map.ptr = NULL;
  if (n == 0) return 0;
  if (n > u->budget / 2) {
    u->why = "a map claims more pairs than the payload has bytes";
    return MSGPACK_UNPACK_PARSE_ERROR;
  }
  u->budget -= (size_t)n * 2;
  o->via.map.ptr = zone_alloc(u, n * sizeof(msgpack_object_kv));
  if (o->via.map.ptr == NULL) {
    u->why = "out of memory";
    return MSGPACK_UNPACK_NOMEM_ERROR;
  }
  return 0;
}

static int codec_cb_map_item(unpack_user *u, msgpack_object *c, msgpack_object k,
                             msgpack_object v) {
  (void)u;
  c->via.map.ptr[c->via.map.size].key = k;
  c->via.map.ptr[c->via.map.size].val = v;
  c->via.map.size++;
  return 0;
}

static int codec_cb_str(unpack_user *u, const char *b, const char *p, unsigned int l,
                        msgpack_object *o) {
  (void)u;
  (void)b;
  o->type = MSGPACK_OBJECT_STR;
  o->via.str.ptr = p;
  o->via.str.size = l;
  return 0;
}

static int codec_cb_bin(unpack_user *u, const char *b, const char *p, unsigned int l,
                        msgpack_object *o) {
  (void)u;
  (void)b;
  o->type = MSGPACK_OBJECT_BIN;
  o->via.bin.ptr = p;
  o->via.bin.size = l;
  return 0;
}

/* p points at the type byte; l counts it. */
static int codec_cb_ext(unpack_user *u, const char *b, const char *p, unsigned int l,
                        msgpack_object *o) {
  (void)u;
  (void)b;
  o->type = MSGPACK_OBJECT_EXT;
  o->via.ext.type = (int8_t)*p;
  o->via.ext.ptr = p + 1;
  o->via.ext.size = l - 1;
  return 0;
}

#include <msgpack/unpack_template.h>

/* Unpack one whole value from data into objects in z; NULL and *why when the
 * bytes are not exactly one well-formed value. */
static const char *unpack_one(msgpack_zone *z, const char *data, size_t len, msgpack_object *out,
                              int may_fail) {
  struct codec_unpack_context ctx;
  codec_unpack_init(&ctx);
  ctx.user.z = z;
  ctx.user.budget = len;
  ctx.user.why = NULL;
  ctx.user.may_fail = may_fail;
  size_t off = 0;
  int rc = data == NULL || len == 0 ? 0 : codec_unpack_execute(&ctx, data, len, &off);
  if (rc == 0) return "truncated MessagePack payload";
  if (rc < 0) {
    if (ctx.user.why != NULL) return ctx.user.why;
    if (rc == MSGPACK_UNPACK_NOMEM_ERROR) return "nested too deeply (limit 100)";
    return "malformed MessagePack payload";
  }
  if (off != len) return "trailing bytes after the MessagePack value";
  *out = codec_unpack_data(&ctx);
  return NULL;
}

/* ======================================================================== */
/* Decode                                                                    */
/* ======================================================================== */

/* The C side of a decode: the zone its objects live in, and a reference in
 * transit to a Lua object. A userdata owns it (kept in the registry between
 * decodes), so that Lua running out of memory mid-decode leaks nothing. */
typedef struct {
  msgpack_zone *zone;
  corral_future *held_f;
  corral_worker *held_w;
  int busy; /* a decode uses it */
} dbox;

static int dbox_gc(lua_State *L) {
  dbox *b = lua_touserdata(L, 1);
  if (b->zone != NULL) {
    msgpack_zone_free(b->zone);
    atomic_fetch_sub_explicit(&live_allocs, 1, memory_order_relaxed);
  }
  b->zone = NULL;
  corral_future_release(b->held_f);
  b->held_f = NULL;
  if (b->held_w != NULL) iface->worker_release(b->held_w);
  b->held_w = NULL;
  return 0;
}

typedef struct decoder {
  lua_State *L;
  dbox *box;
  int refs; /* stack index: id + 1 -> table or function */
  int nrefs;
  codec_deps *deps;
  int trust;
  int shm; /* SHMFD extensions may be read (CODEC_SHM) */
  int failed;
  int marked;         /* CODEC_MARKED: code named (MODULE, CFUNC) only inside a marked function */
  int in_func;        /* how deep in such a function's environment and upvalues */
  struct dpath *path; /* where the decoder is, made into text on failure */
  char *err;          /* the message, when failed */
  size_t errsz;
} decoder;

static int dec_value(decoder *d, const msgpack_object *o);

/* Where the decoder is: frames pushed and popped as it goes (no text is
 * made unless it fails). */
typedef struct {
  enum { DF_ARG, DF_INDEX, DF_KEY, DF_UPVALUE } kind;
  uint32_t i;                /* DF_ARG, DF_INDEX */
  const msgpack_object *key; /* DF_KEY */
  const char *name;          /* DF_ARG: what; DF_UPVALUE: the upvalue's name */
} dframe;

typedef struct dpath {
  int n;
  dframe f[2 * MSGPACK_EMBED_STACK_SIZE + 16];
} dpath;

static void at_dec(decoder *d, dframe f) {
  if (d->path->n < (int)(sizeof d->path->f / sizeof d->path->f[0])) d->path->f[d->path->n] = f;
  d->path->n++;
}

static void up_dec(decoder *d) { d->path->n--; }

/* A map key in the path: its text when it is one. */
static void pb_object_key(pathbuf *pb, const msgpack_object *k) {
  switch (k->type) {
  case MSGPACK_OBJECT_STR: pb_key(pb, k->via.str.ptr, k->via.str.size); break;
  case MSGPACK_OBJECT_POSITIVE_INTEGER: pb_add(pb, "[%llu]", (unsigned long long)k->via.u64); break;
  case MSGPACK_OBJECT_NEGATIVE_INTEGER: pb_add(pb, "[%lld]", (long long)k->via.i64); break;
  default: pb_add(pb, "[?]"); break;
  }
}

static int dec_fail(decoder *d, const char *fmt, ...) {
  char why[256];
  va_list ap;
  va_start(ap, fmt);
  // NOLINTNEXTLINE(clang-analyzer-valist.Uninitialized): va_start is just above
  vsnprintf(why, sizeof why, fmt, ap);
  va_end(ap);
  pathbuf *pb = &(pathbuf){.n = 0};
  int n = d->path->n < (int)(sizeof d->path->f / sizeof d->path->f[0])
              ? d->path->n
              : (int)(sizeof d->path->f / sizeof d->path->f[0]);
  for (int i = 0; i < n; i++) {
    dframe *f = &d->path->f[i];
    switch (f->kind) {
    case DF_ARG:
      if (f->i == 0)
        pb_add(pb, "%s", f->name);
      else
        pb_add(pb, "%s[%u]", f->name, f->i);
      break;
    case DF_INDEX: pb_add(pb, "[%u]", f->i); break;
    case DF_KEY: pb_object_key(pb, f->key); break;
    case DF_UPVALUE: pb_add(pb, "<upvalue %s>", f->name); break;
    }
  }
  pb_finish(pb, d->err, d->errsz, why);
  d->failed = 1;
  return -1;
}

static const char *ext_name(int type) {
  switch (type) {
  case EXT_REF: return "REF";
  case EXT_DEP: return "DEP";
  case EXT_FUTURE: return "FUTURE";
  case EXT_MODULE: return "MODULE";
  case EXT_CFUNC: return "CFUNC";
  case EXT_FUNC: return "FUNC";
  case EXT_WORKER: return "WORKER";
  case EXT_INST: return "INST";
  case EXT_BUFFER: return "BUFFER";
  case EXT_BYTES: return "BYTES";
  case EXT_SHM: return "SHM";
  case EXT_SHMFD: return "SHMFD";
  case EXT_SYNC: return "SYNC";
  case EXT_RSYNC: return "RSYNC";
  default: return "unknown";
  }
}

/* Number the table or function on top of the stack, for later REFs to it. */
static void dec_ref(decoder *d) {
  lua_State *L = d->L;
  if (lua_isnil(L, d->refs)) {
    lua_newtable(L);
    lua_replace(L, d->refs);
  }
  lua_pushvalue(L, -1);
  lua_rawseti(L, d->refs, ++d->nrefs);
}

/* package.loaded[name] pushed, required first when trusted; 0, or -1 (failed).
 * `ext` names the extension in errors. */
static int push_module(decoder *d, const char *name, size_t len, const char *ext) {
  lua_State *L = d->L;
  if (len == 0 || memchr(name, '\0', len) != NULL)
    return dec_fail(d, "%s: a module name that is not one", ext);
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  if (lua_istable(L, -1)) {
    lua_pushlstring(L, name, len);
    lua_rawget(L, -2);
    lua_remove(L, -2);
  }
  if (!lua_isnil(L, -1) && !lua_isboolean(L, -1)) return 0;
  lua_pop(L, 1);
  if (d->trust != CODEC_TRUSTED)
    return dec_fail(d, "%s: module '%.*s' is not loaded (bytes from outside cannot load modules)",
                    ext, (int)(len > 60 ? 60 : len), name);
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  lua_pushliteral(L, "_G");
  lua_rawget(L, -2);
  lua_pushliteral(L, "require");
  lua_rawget(L, -2);
  lua_replace(L, -3);
  lua_pop(L, 1);
  lua_pushlstring(L, name, len);
  if (lua_pcall(L, 1, 1, 0) != 0) {
    const char *msg = lua_tostring(L, -1);
    dec_fail(d, "%s: module '%.*s' cannot be loaded here: %s", ext, (int)(len > 60 ? 60 : len),
             name, msg ? msg : "(error)");
    lua_pop(L, 1);
    return -1;
  }
  return 0;
}

static int dec_timestamp(decoder *d, const char *p, uint32_t n) {
  lua_State *L = d->L;
  double sec;
  uint64_t nsec;
  if (n == 4) {
    sec = (double)get_be(p, 4);
    nsec = 0;
  } else if (n == 8) {
    uint64_t v = get_be(p, 8);
    nsec = v >> 34;
    sec = (double)(v & 0x3ffffffffULL);
  } else if (n == 12) {
    nsec = get_be(p, 4);
    sec = (double)(int64_t)get_be(p + 4, 8);
  } else {
    return dec_fail(d, "a timestamp of %u bytes (4, 8 or 12)", n);
  }
  if (nsec > 999999999)
    return dec_fail(d, "a timestamp with %llu nanoseconds", (unsigned long long)nsec);
  lua_createtable(L, 0, 2);
  lua_pushnumber(L, sec);
  lua_setfield(L, -2, "sec");
  lua_pushnumber(L, (lua_Number)nsec);
  lua_setfield(L, -2, "nsec");
  return 0;
}

static int dec_first_of(decoder *d, corral_future *f);

/* Where untrusted bytes came from, for errors. */
static const char *elsewhere(const decoder *d) {
  return d->trust == CODEC_PEER ? "another process" : "outside the process";
}

static int dec_ext(decoder *d, const msgpack_object *o) {
  lua_State *L = d->L;
  const char *p = o->via.ext.ptr;
  uint32_t n = o->via.ext.size;
  const int8_t type = o->via.ext.type;
  int trusted = d->trust == CODEC_TRUSTED;
  switch (type) {
  case EXT_TIMESTAMP: return dec_timestamp(d, p, n);
  case EXT_REF: {
    if (n != 4) return dec_fail(d, "extension 1 (REF) with a %u-byte body", n);
    uint64_t id = get_be(p, 4);
    if (id >= (uint64_t)d->nrefs)
      return dec_fail(d, "extension 1 (REF) to table %llu, of %d seen", (unsigned long long)id,
                      d->nrefs);
    lua_rawgeti(L, d->refs, (int)id + 1);
    return 0;
  }
  case EXT_DEP: {
    if (!trusted)
      return dec_fail(d, "extension 2 (DEP): a dependency cannot come from %s", elsewhere(d));
    if (n != 4) return dec_fail(d, "extension 2 (DEP) with a %u-byte body", n);
    uint64_t i = get_be(p, 4);
    if (d->deps == NULL || i >= (uint64_t)d->deps->n)
      return dec_fail(d, "extension 2 (DEP) %llu, of %d inputs", (unsigned long long)i,
                      d->deps ? d->deps->n : 0);
    return dec_first_of(d, d->deps->f[i]);
  }
  case EXT_FUTURE: {
    if (!trusted)
      return dec_fail(d, "extension 3 (FUTURE): a future cannot come from %s", elsewhere(d));
    if (n != 8) return dec_fail(d, "extension 3 (FUTURE) with a %u-byte body", n);
    corral_future *f = corral__handle_get(get_be(p, 8), HANDLE_FUTURE);
    if (f == NULL) return dec_fail(d, "extension 3 (FUTURE): a stale or forged future handle");
    d->box->held_f = f;       /* released by the box if pushing it raises */
    iface->push_future(L, f); /* takes a reference of its own */
    d->box->held_f = NULL;
    corral_future_release(f);
    return 0;
  }
  case EXT_MODULE:
    if (d->marked && d->in_func == 0)
      return dec_fail(d, "extension 4 (MODULE): a module named outside a function the key "
                         "vouches for");
    return push_module(d, p, n, "extension 4 (MODULE)");
  case EXT_BUFFER: {
    if (!trusted)
      return dec_fail(d, "extension 9 (BUFFER): a buffer reference cannot come from %s",
                      elsewhere(d));
    if (n != 8) return dec_fail(d, "extension 9 (BUFFER) with a %u-byte body", n);
    if (iface->push_buffer_slot == NULL)
      return dec_fail(d, "extension 9 (BUFFER): no buffers here");
    corral_buffer **slot = iface->push_buffer_slot(L);
    *slot = corral__handle_get(get_be(p, 8), HANDLE_BUFFER); /* the lookup's reference */
    if (*slot == NULL) return dec_fail(d, "extension 9 (BUFFER): a stale or forged buffer handle");
    return 0;
  }
  case EXT_SYNC: {
    if (!trusted)
      return dec_fail(d, "extension 13 (SYNC): a channel or sync primitive cannot come from %s",
                      elsewhere(d));
    if (n != 8) return dec_fail(d, "extension 13 (SYNC) with a %u-byte body", n);
    if (iface->push_sync == NULL) return dec_fail(d, "extension 13 (SYNC): none here");
    corral_sync *s = corral__handle_get(get_be(p, 8), HANDLE_SYNC); /* the lookup's reference */
    if (s == NULL) return dec_fail(d, "extension 13 (SYNC): a stale or forged handle");
    iface->push_sync(L, s);
    return 0;
  }
  case EXT_RSYNC: {
    if (!trusted)
      return dec_fail(d, "extension 14 (RSYNC): a channel or sync primitive cannot come from %s",
                      elsewhere(d));
    if (n != 17) return dec_fail(d, "extension 14 (RSYNC) with a %u-byte body", n);
    if (iface->push_sync == NULL) return dec_fail(d, "extension 14 (RSYNC): none here");
    uint64_t h = get_be(p, 8), lh = get_be(p + 9, 8);
    int kind = (unsigned char)p[8];
    if (h == 0 || kind < SYNC_CHANNEL || kind > SYNC_BARRIER ||
        (kind == SYNC_CONDITION) != (lh != 0))
      return dec_fail(d, "extension 14 (RSYNC): a malformed body");
    corral_sync *s = corral__sync_new(kind, 0);
    corral_sync *lk = lh != 0 ? corral__sync_new(SYNC_LOCK, 0) : NULL;
    if (s == NULL || (lh != 0 && lk == NULL)) {
      corral__sync_release(s);
      corral__sync_release(lk);
      return dec_fail(d, "extension 14 (RSYNC): no memory");
    }
    s->remote = h;
    if (lk != NULL) lk->remote = lh;
    s->lock_of = lk;
    iface->push_sync(L, s);
    return 0;
  }
  case EXT_SHM: return dec_fail(d, "extension 11 (SHM) out of its place");
  case EXT_SHMFD: {
    if (!trusted && !d->shm)
      return dec_fail(d, "extension 12 (SHMFD) cannot come from %s", elsewhere(d));
    if (n != 16) return dec_fail(d, "extension 12 (SHMFD) with a %u-byte body", n);
    if (iface->push_buffer_slot == NULL)
      return dec_fail(d, "extension 12 (SHMFD): no buffers here");
    uint64_t fd = get_be(p, 8), blen = get_be(p + 8, 8);
    corral_buffer **slot = iface->push_buffer_slot(L);
    int dfd = fd <= INT32_MAX ? fcntl((int)fd, F_DUPFD_CLOEXEC, 0) : -1;
    if (fd <= INT32_MAX && dfd < 0 && (errno == EMFILE || errno == ENFILE))
      return dec_fail(d, "extension 12 (SHMFD): this process is at its limit of open descriptors"
                         " (ulimit -n)");
    if (dfd < 0 || blen > SIZE_MAX) {
      if (dfd >= 0) close(dfd);
      return dec_fail(d, "extension 12 (SHMFD): no such descriptor");
    }
    *slot = corral__buffer_map(dfd, (size_t)blen); /* (a descriptor of its own) */
    if (*slot == NULL) {
      close(dfd);
      return dec_fail(d, "extension 12 (SHMFD): cannot map %llu bytes of shared memory",
                      (unsigned long long)blen);
    }
    return 0;
  }
  case EXT_BYTES: {
    /* bytes: from anywhere, a new buffer holding a copy */
    if (iface->push_buffer_slot == NULL)
      return dec_fail(d, "extension 10 (BYTES): no buffers here");
    corral_buffer **slot = iface->push_buffer_slot(L);
    *slot = corral__buffer_new(n);
    if (*slot == NULL) return dec_fail(d, "extension 10 (BYTES): no memory for %u bytes", n);
    if (n > 0) memcpy((*slot)->data, p, n);
    return 0;
  }
  case EXT_CFUNC: {
    if (d->marked && d->in_func == 0)
      return dec_fail(d, "extension 5 (CFUNC): a C function named outside a function the key "
                         "vouches for");
    const char *dot = NULL;
    for (uint32_t i = 0; i < n; i++)
      if (p[i] == '.') dot = p + i;
    if (dot == NULL || dot == p + n - 1)
      return dec_fail(d, "extension 5 (CFUNC) without a module and a name");
    if (push_module(d, p, (size_t)(dot - p), "extension 5 (CFUNC)") != 0) return -1;
    if (!lua_istable(L, -1))
      return dec_fail(d, "extension 5 (CFUNC): module '%.*s' is not a table", (int)(dot - p), p);
    lua_pushlstring(L, dot + 1, n - (size_t)(dot - p) - 1);
    lua_rawget(L, -2);
    lua_remove(L, -2);
    /* what the module holds under that name here (a worker's os.exit is
     * corral's own, a Lua function) */
    if (!lua_isfunction(L, -1))
      return dec_fail(d, "extension 5 (CFUNC): '%.*s' is not a function here",
                      (int)(n > 80 ? 80 : n), p);
    return 0;
  }
  case EXT_FUNC:
  case EXT_WORKER:
  case EXT_INST:
    if (!trusted)
      return dec_fail(d, "extension %d (%s) cannot come from outside the process", type,
                      ext_name(type));
    return dec_fail(d, "extension %d (%s) out of its place", type, ext_name(type));
  default: return dec_fail(d, "extension type %d is not one corral reads", type);
  }
}

static int lbuf_write(void *ud, const char *buf, size_t len) {
  luaL_addlstring(ud, buf, len);
  return 0;
}

static int dec_function_rest(decoder *d, const msgpack_object *a, uint32_t n, int envkind,
                             uint32_t up0, int fn);

/* [FUNC mac, bytecode, upvalues...]: authenticate the bytecode, load it (once
 * per context for the same bytecode and plain upvalues), set its upvalues. */
static int dec_function(decoder *d, const msgpack_object *o) {
  lua_State *L = d->L;
  const msgpack_object *a = o->via.array.ptr;
  uint32_t n = o->via.array.size;
  if (d->trust == CODEC_FOREIGN)
    return dec_fail(d, "a function cannot come from outside the process (no bytecode from bytes "
                       "the runtime did not make)");
  if (n < 2 || a[0].via.ext.size != 9 || a[1].type != MSGPACK_OBJECT_BIN)
    return dec_fail(d, "a malformed function (FUNC array)");
  int envkind = (unsigned char)a[0].via.ext.ptr[8];
  uint32_t up0 = envkind == ENV_GLOBALS ? 2 : 3; /* where the upvalues start */
  if (envkind > ENV_OVERLAY || n < up0) return dec_fail(d, "a malformed function (FUNC array)");
  const char *code = a[1].via.bin.ptr;
  size_t clen = a[1].via.bin.size;
  /* cached only when every upvalue is a module or a C function, and the
   * environment the globals: such a closure is the same whatever call it
   * came with. (Not with a plain value: the closure may assign it, and
   * each decode must give a closure of its own, as a copy would be.) */
  int cacheable = envkind == ENV_GLOBALS;
  for (uint32_t i = up0; i < n && cacheable; i++) {
    if (a[i].type != MSGPACK_OBJECT_EXT ||
        (a[i].via.ext.type != EXT_MODULE && a[i].via.ext.type != EXT_CFUNC))
      cacheable = 0;
  }
  int key = 0;
  if (cacheable) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addlstring(&b, code, clen);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &b, lbuf_write);
    for (uint32_t i = up0; i < n; i++)
      msgpack_pack_object(&pk, a[i]);
    luaL_pushresult(&b);
    key = lua_gettop(L);
    reg_get(L, &FCACHE_KEY);
    if (lua_isnil(L, -1)) { /* weak values: closures no one uses go */
      lua_pop(L, 1);
      lua_newtable(L);
      lua_createtable(L, 0, 1);
      lua_pushliteral(L, "v");
      lua_setfield(L, -2, "__mode");
      lua_setmetatable(L, -2);
      lua_pushvalue(L, -1);
      reg_set(L, &FCACHE_KEY);
    }
    lua_pushvalue(L, key);
    lua_rawget(L, -2);
    if (!lua_isnil(L, -1)) { /* the same bytecode was authenticated before */
      lua_replace(L, key);
      lua_pop(L, 1);
      dec_ref(d);
      return 0;
    }
    lua_pop(L, 2);
  }
  if (get_be(a[0].via.ext.ptr, 8) != mac(code, clen))
    return dec_fail(d, "a function whose bytecode this process did not make");
  if (luaL_loadbuffer(L, code, clen, "=(function from another context)") != 0) {
    dec_fail(d, "a function that does not load: %s", lua_tostring(L, -1));
    lua_pop(L, 1);
    return -1;
  }
  int fn = lua_gettop(L);
  dec_ref(d); /* before its upvalues, which may refer to it */
  d->in_func++;
  int rc = dec_function_rest(d, a, n, envkind, up0, fn);
  d->in_func--;
  if (rc != 0) return rc;
  if (key != 0) {
    reg_get(L, &FCACHE_KEY);
    lua_pushvalue(L, key);
    lua_pushvalue(L, fn);
    lua_rawset(L, -3);
    lua_pop(L, 1);
    lua_replace(L, key); /* the function where the key was */
  }
  return 0;
}

/* A loaded function's environment and upvalues. */
static int dec_function_rest(decoder *d, const msgpack_object *a, uint32_t n, int envkind,
                             uint32_t up0, int fn) {
  lua_State *L = d->L;
  if (envkind != ENV_GLOBALS) {
    at_dec(d, (dframe){.kind = DF_UPVALUE, .name = "_ENV"});
    if (dec_value(d, &a[2]) != 0) return -1;
    if (!lua_istable(L, -1)) return dec_fail(d, "a function environment that is not a table");
    up_dec(d);
    if (envkind == ENV_OVERLAY) {
      lua_createtable(L, 0, 1);
      lua_pushvalue(L, LUA_GLOBALSINDEX);
      lua_setfield(L, -2, "__index");
      lua_setmetatable(L, -2);
    }
    lua_setfenv(L, fn);
  }
  for (uint32_t i = up0; i < n; i++) {
    const char *name = lua_getupvalue(L, fn, (int)(i - up0) + 1);
    if (name == NULL) return dec_fail(d, "a function with more upvalues than its bytecode has");
    lua_pop(L, 1);
    at_dec(d, (dframe){.kind = DF_UPVALUE, .name = *name ? name : "?"});
    if (dec_value(d, &a[i]) != 0) return -1;
    up_dec(d);
    lua_setupvalue(L, fn, (int)(i - up0) + 1);
  }
  if (lua_getupvalue(L, fn, (int)(n - up0) + 1) != NULL) {
    lua_pop(L, 1);
    return dec_fail(d, "a function with fewer upvalues than its bytecode has");
  }
  return 0;
}

/* [WORKER, opts, INST h...]: a worker handle, rebuilt by worker.import. */
static int dec_worker(decoder *d, const msgpack_object *o) {
  lua_State *L = d->L;
  const msgpack_object *a = o->via.array.ptr;
  uint32_t n = o->via.array.size;
  if (d->trust != CODEC_TRUSTED)
    return dec_fail(d, "a worker handle cannot come from outside the process");
  if (n < 3 || a[0].via.ext.size != 0 || a[1].type != MSGPACK_OBJECT_MAP)
    return dec_fail(d, "a malformed worker handle (WORKER array)");
  if (!lua_checkstack(L, (int)n + 4)) return dec_fail(d, "a worker handle with too many instances");
  int top = lua_gettop(L);
  if (!iface->push_import(L)) return dec_fail(d, "worker handles cannot be rebuilt in this state");
  if (dec_value(d, &a[1]) != 0) return -1;
  for (uint32_t i = 2; i < n; i++) {
    if (a[i].type != MSGPACK_OBJECT_EXT || a[i].via.ext.type != EXT_INST || a[i].via.ext.size != 8)
      return dec_fail(d, "a malformed worker handle (instance %u)", i - 1);
    corral_worker *w = corral__handle_get(get_be(a[i].via.ext.ptr, 8), HANDLE_WORKER);
    if (w == NULL) return dec_fail(d, "a stale or forged worker handle");
    d->box->held_w = w;       /* released by the box if the userdata cannot be made */
    iface->push_worker(L, w); /* a handle now, with the lookup's reference */
    d->box->held_w = NULL;
  }
  if (lua_pcall(L, (int)n - 1, 1, 0) != 0) {
    dec_fail(d, "a worker handle that cannot be rebuilt: %s", lua_tostring(L, -1));
    lua_settop(L, top);
    return -1;
  }
  return 0;
}

/* Tables are made with room for at most this many elements (they grow):
 * LuaJIT raises on a table too large to make. */
#define PREALLOC_MAX (1 << 20)

/* A value that cannot fail (nil, a boolean, a number, a string): pushed,
 * and 1; 0 for the others. The caller made room for it. */
static inline int dec_scalar(lua_State *L, const msgpack_object *o) {
  switch (o->type) {
  case MSGPACK_OBJECT_NIL: lua_pushnil(L); return 1;
  case MSGPACK_OBJECT_BOOLEAN: lua_pushboolean(L, o->via.boolean); return 1;
  case MSGPACK_OBJECT_POSITIVE_INTEGER: lua_pushnumber(L, (lua_Number)o->via.u64); return 1;
  case MSGPACK_OBJECT_NEGATIVE_INTEGER: lua_pushnumber(L, (lua_Number)o->via.i64); return 1;
  case MSGPACK_OBJECT_FLOAT32:
  case MSGPACK_OBJECT_FLOAT64: lua_pushnumber(L, o->via.f64); return 1;
  case MSGPACK_OBJECT_STR: lua_pushlstring(L, o->via.str.ptr, o->via.str.size); return 1;
  case MSGPACK_OBJECT_BIN: lua_pushlstring(L, o->via.bin.ptr, o->via.bin.size); return 1;
  default: return 0;
  }
}

static int dec_value(decoder *d, const msgpack_object *o) {
  lua_State *L = d->L;
  if (dec_scalar(L, o)) return 0;
  if (!lua_checkstack(L, 8)) return dec_fail(d, "Lua stack exhausted");
  switch (o->type) {
  case MSGPACK_OBJECT_EXT: return dec_ext(d, o);
  case MSGPACK_OBJECT_ARRAY: {
    uint32_t n = o->via.array.size;
    const msgpack_object *a = o->via.array.ptr;
    if (n > 0 && a[0].type == MSGPACK_OBJECT_EXT && a[0].via.ext.type == EXT_FUNC)
      return dec_function(d, o);
    if (n > 0 && a[0].type == MSGPACK_OBJECT_EXT && a[0].via.ext.type == EXT_WORKER)
      return dec_worker(d, o);
    lua_createtable(L, (int)(n < PREALLOC_MAX ? n : PREALLOC_MAX), 0);
    dec_ref(d);
    for (uint32_t i = 0; i < n; i++) {
      if (!dec_scalar(L, &a[i])) {
        at_dec(d, (dframe){.kind = DF_INDEX, .i = i + 1});
        if (dec_value(d, &a[i]) != 0) return -1;
        up_dec(d);
      }
      lua_rawseti(L, -2, (int)i + 1);
    }
    return 0;
  }
  case MSGPACK_OBJECT_MAP: {
    uint32_t n = o->via.map.size;
    lua_createtable(L, 0, (int)(n < PREALLOC_MAX ? n : PREALLOC_MAX));
    dec_ref(d);
    for (uint32_t i = 0; i < n; i++) {
      const msgpack_object_kv *kv = &o->via.map.ptr[i];
      at_dec(d, (dframe){.kind = DF_KEY, .key = &kv->key});
      if (dec_value(d, &kv->key) != 0) return -1;
      if (lua_isnil(L, -1)) return dec_fail(d, "a map key is nil");
      if (lua_type(L, -1) == LUA_TNUMBER && lua_tonumber(L, -1) != lua_tonumber(L, -1))
        return dec_fail(d, "a map key is NaN");
      if (dec_value(d, &kv->val) != 0) return -1;
      up_dec(d);
      lua_rawset(L, -3);
    }
    return 0;
  }
  default: return dec_fail(d, "an unknown MessagePack type");
  }
}

/* The first value of an input's results, decoded from its own payload (with
 * its own trust and numbering) into this decode's zone. */
static int dec_first_of(decoder *d, corral_future *f) {
  lua_State *L = d->L;
  const void *mp;
  size_t len;
  if (corral_future_payload(f, &mp, &len) != 0 || corral_future_state(f) != CORRAL_DONE)
    return dec_fail(d, "an input that has not succeeded");
  if (len == 0) {
    lua_pushnil(L);
    return 0;
  }
  msgpack_object root;
  const char *why = unpack_one(d->box->zone, mp, len, &root, 1);
  if (why != NULL) return dec_fail(d, "the input's payload: %s", why);
  decoder sub = *d;
  sub.deps = NULL;
  sub.trust = corral__future_trust(f) & 15;
  sub.shm = (corral__future_trust(f) & CODEC_SHM) != 0;
  sub.nrefs = 0;
  lua_pushnil(L);
  sub.refs = lua_gettop(L);
  int rc;
  if (root.type != MSGPACK_OBJECT_ARRAY) {
    rc = dec_value(&sub, &root);
  } else if (root.via.array.size == 0) {
    lua_pushnil(L);
    rc = 0;
  } else {
    rc = dec_value(&sub, &root.via.array.ptr[0]);
  }
  d->failed = sub.failed;
  if (rc != 0) return -1;
  lua_remove(L, sub.refs);
  return 0;
}

int corral__codec_decode(lua_State *L, const char *data, size_t len, codec_deps *deps, int trust) {
  static const char *const names[] = {"value", "args", "result", "init"};
  const char *what = names[(trust >> 4) & 3];
  int one = (trust & CODEC_ONE) != 0;
  int shm = (trust & CODEC_SHM) != 0;
  int marked = (trust & CODEC_MARKED) != 0;
  trust &= 15;
  int base = lua_gettop(L);
  lua_checkstack(L, 8);
  /* The box: the one kept in the registry, unless it is busy (a decode
   * nested in another, or one a Lua error cut short): then a new one, kept
   * from now on. It stays on the stack while it is used: a nested decode may
   * take its place in the registry. */
  reg_get(L, &DBOX_KEY);
  dbox *box = lua_touserdata(L, -1);
  if (box == NULL || box->busy) {
    lua_pop(L, 1);
    box = lua_newuserdata(L, sizeof *box);
    memset(box, 0, sizeof *box);
    if (luaL_newmetatable(L, DBOX_MT)) {
      lua_pushcfunction(L, dbox_gc);
      lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    reg_set(L, &DBOX_KEY);
  }
  box->busy = 1;
  const char *why = NULL;
  if (box->zone == NULL && !should_fail()) {
    box->zone = msgpack_zone_new(2048);
    if (box->zone != NULL) atomic_fetch_add_explicit(&live_allocs, 1, memory_order_relaxed);
  }
  msgpack_object root;
  if (box->zone == NULL)
    why = "out of memory";
  else
    why = unpack_one(box->zone, data, len, &root, 1);
  dpath path;
  path.n = 0;
  char err[512];
  int n = 0;
  if (why == NULL) {
    int several = root.type == MSGPACK_OBJECT_ARRAY && !one;
    uint32_t count = several ? root.via.array.size : 1;
    n = count > 1000000 ? 1000000 : (int)count;
    if (several && (count > 1000000 || !lua_checkstack(L, n + 16))) {
      snprintf(err, sizeof err, "%u values are too many to receive at once (the Lua stack is full)",
               count);
      why = err;
    }
  }
  if (why == NULL) {
    decoder d = {.L = L,
                 .box = box,
                 .deps = deps,
                 .trust = trust,
                 .shm = shm,
                 .path = &path,
                 .err = err,
                 .errsz = sizeof err,
                 .marked = marked};
    lua_pushnil(L); /* the refs table, made with the first table */
    d.refs = lua_gettop(L);
    int several = root.type == MSGPACK_OBJECT_ARRAY && !one;
    for (int i = 0; i < n; i++) {
      /* (one value is named alone: "value.a[2]") */
      at_dec(&d, (dframe){.kind = DF_ARG, .i = one ? 0 : (uint32_t)i + 1, .name = what});
      if (dec_value(&d, several ? &root.via.array.ptr[i] : &root) != 0) {
        why = err;
        break;
      }
      up_dec(&d);
    }
    if (why == NULL) lua_remove(L, d.refs);
  }
  if (box->zone != NULL) msgpack_zone_clear(box->zone);
  box->busy = 0;
  if (why != NULL) {
    lua_settop(L, base + 1);
    if (why == err)
      lua_pushstring(L, err);
    else
      lua_pushfstring(L, "%s: %s", what, why);
    lua_replace(L, base + 1);
    return -1;
  }
  lua_remove(L, base + 1);
  return n;
}

/* Release the references held by an encoded payload that will never be
 * decoded (futures and worker instances it names). Runs no Lua and takes no
 * lock: the payload's own reference keeps each handle alive until here. */
static void release_refs(const msgpack_object *o) {
  switch (o->type) {
  case MSGPACK_OBJECT_EXT:
    if (o->via.ext.size == 16 && o->via.ext.type == EXT_SHMFD) {
      uint64_t fd = get_be(o->via.ext.ptr, 8); /* (a descriptor this process put there) */
      if (fd <= INT32_MAX) close((int)fd);
      break;
    }
    if (o->via.ext.size == 16 && o->via.ext.type == EXT_SHM) {
      /* (a payload this process encoded: the handle is its own) */
      corral_buffer *b = corral__handle_get(get_be(o->via.ext.ptr, 8), HANDLE_BUFFER);
      corral__buffer_release(b); /* the lookup's */
      corral__buffer_release(b); /* the payload's */
      break;
    }
    if (o->via.ext.size != 8) break;
    if (o->via.ext.type == EXT_FUTURE) {
      corral_future *f = corral__handle_get(get_be(o->via.ext.ptr, 8), HANDLE_FUTURE);
      corral_future_release(f); /* the lookup's */
      corral_future_release(f); /* the payload's */
    } else if (o->via.ext.type == EXT_BUFFER) {
      corral_buffer *b = corral__handle_get(get_be(o->via.ext.ptr, 8), HANDLE_BUFFER);
      corral__buffer_release(b); /* the lookup's */
      corral__buffer_release(b); /* the payload's */
    } else if (o->via.ext.type == EXT_SYNC) {
      corral_sync *s = corral__handle_get(get_be(o->via.ext.ptr, 8), HANDLE_SYNC);
      corral__sync_release(s); /* the lookup's */
      corral__sync_release(s); /* the payload's */
    } else if (o->via.ext.type == EXT_INST) {
      corral_worker *w = corral__handle_get(get_be(o->via.ext.ptr, 8), HANDLE_WORKER);
      if (w != NULL) {
        iface->worker_release(w); /* the lookup's */
        iface->worker_drop(w);    /* the payload's */
      }
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

static int shm_walk(const msgpack_object *o, int (*fn)(void *, unsigned char *, int), void *ud) {
  switch (o->type) {
  case MSGPACK_OBJECT_EXT:
    if (o->via.ext.type == EXT_SHM || o->via.ext.type == EXT_SHMFD) {
      if (o->via.ext.size != 16) return -1;
      return fn(ud, (unsigned char *)o->via.ext.ptr, o->via.ext.type);
    }
    return 0;
  case MSGPACK_OBJECT_ARRAY:
    for (uint32_t i = 0; i < o->via.array.size; i++) {
      int rc = shm_walk(&o->via.array.ptr[i], fn, ud);
      if (rc != 0) return rc;
    }
    return 0;
  case MSGPACK_OBJECT_MAP:
    for (uint32_t i = 0; i < o->via.map.size; i++) {
      int rc = shm_walk(&o->via.map.ptr[i].key, fn, ud);
      if (rc == 0) rc = shm_walk(&o->via.map.ptr[i].val, fn, ud);
      if (rc != 0) return rc;
    }
    return 0;
  default: return 0;
  }
}

/* ---- copies of a payload for another process ------------------------- */

/* Whether o holds an extension of `type`. */
static int has_ext(const msgpack_object *o, int type) {
  switch (o->type) {
  case MSGPACK_OBJECT_EXT: return o->via.ext.type == type;
  case MSGPACK_OBJECT_ARRAY:
    for (uint32_t i = 0; i < o->via.array.size; i++)
      if (has_ext(&o->via.array.ptr[i], type)) return 1;
    return 0;
  case MSGPACK_OBJECT_MAP:
    for (uint32_t i = 0; i < o->via.map.size; i++)
      if (has_ext(&o->via.map.ptr[i].key, type) || has_ext(&o->via.map.ptr[i].val, type)) return 1;
    return 0;
  default: return 0;
  }
}

/* Pack o again, each extension through ext (which packs it, changed or
 * not): 0, or -1. */
typedef int (*repack_ext)(msgpack_packer *pk, const msgpack_object *o, void *ud);
static int repack(msgpack_packer *pk, const msgpack_object *o, repack_ext ext, void *ud) {
  switch (o->type) {
  case MSGPACK_OBJECT_ARRAY:
    if (msgpack_pack_array(pk, o->via.array.size) != 0) return -1;
    for (uint32_t i = 0; i < o->via.array.size; i++)
      if (repack(pk, &o->via.array.ptr[i], ext, ud) != 0) return -1;
    return 0;
  case MSGPACK_OBJECT_MAP:
    if (msgpack_pack_map(pk, o->via.map.size) != 0) return -1;
    for (uint32_t i = 0; i < o->via.map.size; i++)
      if (repack(pk, &o->via.map.ptr[i].key, ext, ud) != 0 ||
          repack(pk, &o->via.map.ptr[i].val, ext, ud) != 0)
        return -1;
    return 0;
  case MSGPACK_OBJECT_EXT: return ext(pk, o, ud);
  default: return msgpack_pack_object(pk, *o);
  }
}

/* A copy of the payload p with its extensions of `type` repacked by ext;
 * NULL when it holds none, or on failure (*failed). */
static char *repack_payload(const char *p, size_t n, size_t *out, int *failed, int type,
                            repack_ext ext, void *ud) {
  *failed = 0;
  *out = 0;
  if (p == NULL || n == 0) return NULL;
  msgpack_zone *z = msgpack_zone_new(2048);
  if (z == NULL) {
    *failed = 1;
    return NULL;
  }
  msgpack_object o;
  char *copy = NULL;
  if (unpack_one(z, p, n, &o, 0) != NULL) {
    *failed = 1;
  } else if (has_ext(&o, type)) {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    if (repack(&pk, &o, ext, ud) != 0) {
      msgpack_sbuffer_destroy(&sb);
      *failed = 1;
    } else {
      copy = sb.data;
      *out = sb.size;
    }
  }
  msgpack_zone_free(z);
  return copy;
}

/* A repack's buffers in shared memory, retained for the copy (released if
 * it fails). */
typedef struct {
  corral_buffer **held;
  int n, cap;
} repacked;

static int repack_buffer(msgpack_packer *pk, const msgpack_object *o, void *ud) {
  repacked *r = ud;
  if (o->via.ext.type != EXT_BUFFER || o->via.ext.size != 8) return msgpack_pack_object(pk, *o);
  uint64_t h = get_be(o->via.ext.ptr, 8);
  corral_buffer *b = corral__handle_get(h, HANDLE_BUFFER);
  if (b == NULL) return -1;
  int rc;
  if (corral__buffer_seal(b) == 0) {
    if (r->n == r->cap) {
      int cap = r->cap ? r->cap * 2 : 8;
      corral_buffer **held = realloc(r->held, sizeof(corral_buffer *) * (size_t)cap);
      if (held == NULL) {
        corral__buffer_release(b);
        return -1;
      }
      r->held = held;
      r->cap = cap;
    }
    r->held[r->n++] = b; /* the lookup's reference is the copy's */
    unsigned char body[16];
    put_be(body, h, 8);
    put_be(body + 8, (uint64_t)b->len, 8);
    return msgpack_pack_ext(pk, 16, EXT_SHM) || msgpack_pack_ext_body(pk, body, 16) ? -1 : 0;
  }
  rc = b->len > 0xffffffffu || msgpack_pack_ext(pk, b->len, EXT_BYTES) ||
       msgpack_pack_ext_body(pk, b->data, b->len);
  corral__buffer_release(b);
  return rc ? -1 : 0;
}

char *corral__codec_for_process(const char *p, size_t n, size_t *out, int *failed) {
  repacked r = {NULL, 0, 0};
  char *copy = repack_payload(p, n, out, failed, EXT_BUFFER, repack_buffer, &r);
  if (*failed)
    for (int i = 0; i < r.n; i++)
      corral__buffer_release(r.held[i]);
  free(r.held);
  return copy;
}

/* Sync objects for a child process: SYNC -> RSYNC, each kept by the caller. */
typedef struct {
  int (*keep)(void *ud, corral_sync *s);
  void *ud;
} rsync_ctx;

static int repack_sync(msgpack_packer *pk, const msgpack_object *o, void *ud) {
  rsync_ctx *r = ud;
  if (o->via.ext.type != EXT_SYNC || o->via.ext.size != 8) return msgpack_pack_object(pk, *o);
  uint64_t h = get_be(o->via.ext.ptr, 8);
  corral_sync *s = corral__handle_get(h, HANDLE_SYNC);
  if (s == NULL) return -1;
  uint64_t lh = 0;
  if (s->lock_of != NULL) {
    lh = corral__sync_handle(s->lock_of);
    if (lh == 0) {
      corral__sync_release(s);
      return -1;
    }
    corral__sync_retain(s->lock_of);
    if (r->keep(r->ud, s->lock_of) != 0) { /* (keep let go of it) */
      corral__sync_release(s);
      return -1;
    }
  }
  int kind = s->kind;
  if (r->keep(r->ud, s) != 0) return -1; /* (it takes the lookup's reference) */
  unsigned char body[17];
  put_be(body, h, 8);
  body[8] = (unsigned char)kind;
  put_be(body + 9, lh, 8);
  return msgpack_pack_ext(pk, 17, EXT_RSYNC) || msgpack_pack_ext_body(pk, body, 17) ? -1 : 0;
}

char *corral__codec_syncs_for_child(const char *p, size_t n, size_t *out,
                                    int (*keep)(void *ud, corral_sync *s), void *ud, int *failed) {
  rsync_ctx r = {keep, ud};
  return repack_payload(p, n, out, failed, EXT_SYNC, repack_sync, &r);
}

int corral__codec_shm_each(char *data, size_t len,
                           int (*fn)(void *ud, unsigned char *body, int type), void *ud) {
  if (data == NULL || len == 0) return 0;
  msgpack_zone *z = msgpack_zone_new(2048);
  if (z == NULL) return -1;
  msgpack_object o;
  int rc = unpack_one(z, data, len, &o, 0) == NULL ? shm_walk(&o, fn, ud) : -1;
  msgpack_zone_free(z);
  return rc;
}

void corral__codec_discard(const char *data, size_t len) {
  if (data == NULL || len == 0) return;
  msgpack_zone *z = msgpack_zone_new(2048);
  if (z == NULL) return;
  msgpack_object o;
  if (unpack_one(z, data, len, &o, 0) == NULL) release_refs(&o);
  msgpack_zone_free(z);
}

int corral__codec_error_message(const char *data, size_t len, char *out, size_t size) {
  if (data == NULL || len == 0 || size == 0) return 0;
  msgpack_zone *z = msgpack_zone_new(2048);
  if (z == NULL) return 0;
  msgpack_object o;
  int found = 0;
  int ok = unpack_one(z, data, len, &o, 0) == NULL;
  /* (an error a worker raised travels as the values of a payload: [map]) */
  if (ok && o.type == MSGPACK_OBJECT_ARRAY && o.via.array.size == 1) o = o.via.array.ptr[0];
  if (ok && o.type == MSGPACK_OBJECT_MAP) {
    for (uint32_t i = 0; i < o.via.map.size && !found; i++) {
      const msgpack_object *k = &o.via.map.ptr[i].key, *v = &o.via.map.ptr[i].val;
      if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == 7 &&
          memcmp(k->via.str.ptr, "message", 7) == 0 && v->type == MSGPACK_OBJECT_STR) {
        size_t n = v->via.str.size < size - 1 ? v->via.str.size : size - 1;
        memcpy(out, v->via.str.ptr, n);
        out[n] = '\0';
        found = 1;
      }
    }
  }
  msgpack_zone_free(z);
  return found;
}

void corral__codec_free(char *data, size_t len, int refs) {
  if (refs) corral__codec_discard(data, len);
  free(data);
}

/* ======================================================================== */
/* Values for a C host                                                       */
/* ======================================================================== */

/* What the decoder takes from outside (CODEC_FOREIGN), checked without a
 * Lua state: the structure was checked by unpack_one; this walks the values
 * as dec_value would, numbering the tables as it does (for REF ids). */
typedef struct {
  uint32_t tables; /* numbered so far */
  const char *why;
} fcheck;

static int fc_value(fcheck *c, const msgpack_object *o) {
  switch (o->type) {
  case MSGPACK_OBJECT_NIL:
  case MSGPACK_OBJECT_BOOLEAN:
  case MSGPACK_OBJECT_POSITIVE_INTEGER:
  case MSGPACK_OBJECT_NEGATIVE_INTEGER:
  case MSGPACK_OBJECT_FLOAT32:
  case MSGPACK_OBJECT_FLOAT64:
  case MSGPACK_OBJECT_STR:
  case MSGPACK_OBJECT_BIN: return 0;
  case MSGPACK_OBJECT_ARRAY: {
    const msgpack_object *a = o->via.array.ptr;
    if (o->via.array.size > 0 && a[0].type == MSGPACK_OBJECT_EXT &&
        (a[0].via.ext.type == EXT_FUNC || a[0].via.ext.type == EXT_WORKER)) {
      c->why = "a function or a worker handle cannot come from outside the process";
      return -1;
    }
    c->tables++;
    for (uint32_t i = 0; i < o->via.array.size; i++)
      if (fc_value(c, &a[i]) != 0) return -1;
    return 0;
  }
  case MSGPACK_OBJECT_MAP:
    c->tables++;
    for (uint32_t i = 0; i < o->via.map.size; i++) {
      const msgpack_object *k = &o->via.map.ptr[i].key;
      if (k->type == MSGPACK_OBJECT_NIL ||
          ((k->type == MSGPACK_OBJECT_FLOAT32 || k->type == MSGPACK_OBJECT_FLOAT64) &&
           k->via.f64 != k->via.f64)) {
        c->why = "a map key is nil or NaN";
        return -1;
      }
      if (fc_value(c, k) != 0 || fc_value(c, &o->via.map.ptr[i].val) != 0) return -1;
    }
    return 0;
  case MSGPACK_OBJECT_EXT: {
    const char *p = o->via.ext.ptr;
    uint32_t n = o->via.ext.size;
    switch (o->via.ext.type) {
    case EXT_TIMESTAMP:
      if ((n == 4) || (n == 8 && (get_be(p, 8) >> 34) <= 999999999) ||
          (n == 12 && get_be(p, 4) <= 999999999))
        return 0;
      c->why = "a malformed timestamp";
      return -1;
    case EXT_REF:
      if (n == 4 && get_be(p, 4) < c->tables) return 0;
      c->why = "a REF extension to no table decoded before it";
      return -1;
    case EXT_MODULE:
    case EXT_CFUNC:
      /* decoding one would `require` a module: code, never from outside */
      c->why = "a module or C function reference (decoding it would load code) cannot come "
               "from outside the process";
      return -1;
    case EXT_BYTES: return 0;
    default: c->why = "an extension type corral does not take from outside the process"; return -1;
    }
  }
  default: c->why = "an unknown MessagePack type"; return -1;
  }
}

const char *corral__codec_check_foreign(const char *data, size_t len) {
  if (data == NULL || len == 0) return "no bytes (an empty array is 0x90)";
  msgpack_zone *z = msgpack_zone_new(2048);
  if (z == NULL) return "out of memory";
  msgpack_object o;
  const char *why = unpack_one(z, data, len, &o, 0);
  if (why == NULL && o.type != MSGPACK_OBJECT_ARRAY) why = "not a MessagePack array of values";
  if (why == NULL && o.via.array.size > 1000000) why = "more than 1000000 values";
  if (why == NULL) {
    fcheck c = {0, NULL}; /* (the array around the values is not a table) */
    for (uint32_t i = 0; i < o.via.array.size && why == NULL; i++)
      if (fc_value(&c, &o.via.array.ptr[i]) != 0) why = c.why;
  }
  msgpack_zone_free(z);
  return why;
}

char *corral__codec_pack_one(int type, const char *s, size_t slen, double num, size_t *len) {
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  int rc = msgpack_pack_array(&pk, 1);
  int64_t i;
  switch (type) {
  case CODEC_VALUE_STRING:
    if (slen > 0xffffffffu) {
      rc = -1;
      break;
    }
    rc = rc || msgpack_pack_str_with_body(&pk, s, slen);
    break;
  case CODEC_VALUE_NUMBER: /* as a Lua number is encoded */
    rc = rc || (exact_int(num, &i) ? msgpack_pack_int64(&pk, i) : msgpack_pack_double(&pk, num));
    break;
  case CODEC_VALUE_BOOLEAN:
    rc = rc || (num != 0 ? msgpack_pack_true(&pk) : msgpack_pack_false(&pk));
    break;
  default: rc = rc || msgpack_pack_nil(&pk); break;
  }
  if (rc != 0) {
    msgpack_sbuffer_destroy(&sb);
    return NULL;
  }
  *len = sb.size;
  return sb.data;
}

int corral__codec_first(const char *data, size_t len, int type, const char **s, size_t *slen,
                        double *num) {
  if (data == NULL || len == 0) return 0;
  msgpack_zone *z = msgpack_zone_new(2048);
  if (z == NULL) return -1;
  msgpack_object o;
  int found = 0;
  if (unpack_one(z, data, len, &o, 0) == NULL) {
    /* (a payload that is not an array is one value) */
    if (o.type == MSGPACK_OBJECT_ARRAY) {
      if (o.via.array.size == 0)
        o.type = MSGPACK_OBJECT_NIL;
      else
        o = o.via.array.ptr[0];
    }
    if (type == CODEC_VALUE_STRING &&
        (o.type == MSGPACK_OBJECT_STR || o.type == MSGPACK_OBJECT_BIN)) {
      /* (the object points into data) */
      *s = o.type == MSGPACK_OBJECT_STR ? o.via.str.ptr : o.via.bin.ptr;
      *slen = o.type == MSGPACK_OBJECT_STR ? o.via.str.size : o.via.bin.size;
      found = 1;
    } else if (type == CODEC_VALUE_NUMBER) {
      found = 1;
      if (o.type == MSGPACK_OBJECT_POSITIVE_INTEGER)
        *num = (double)o.via.u64;
      else if (o.type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
        *num = (double)o.via.i64;
      else if (o.type == MSGPACK_OBJECT_FLOAT32 || o.type == MSGPACK_OBJECT_FLOAT64)
        *num = o.via.f64;
      else
        found = 0;
    }
  }
  msgpack_zone_free(z);
  return found;
}
