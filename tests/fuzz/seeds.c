/* seeds.c: write the seed corpora of the fuzz targets: DIR/decode/seed-*
 * (payloads, and single values as corral.encode makes them) and
 * DIR/frames/seed-* (streams of frames, each after the harness's prefix).
 * Functions are encoded under the fuzz targets' fixed key (fuzz.h), so that
 * they authenticate there.   usage: seeds DIR */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#include "frame.h"
#include "fuzz.h"

static const char *dir;
static lua_State *L;

/* The values, by name: functions that return them. */
static const char *values_lua =
    "local shared = { 's' }\n"
    "local cyclic = { name = 'c' }; cyclic.self = cyclic\n"
    "local deep = {}; local cur = deep\n"
    "for _ = 1, 99 do cur.x = {}; cur = cur.x end\n"
    "local up, n = 5, 0\n"
    "local function rec(k) if k == 0 then return 0 end return rec(k - 1) end\n"
    "return {\n"
    "  { 'plain', function() return nil, true, false, 0, -1, 127, 128, 255, 65536, 2^32, 2^40,\n"
    "      -2^40, -129, -33000, 0.5, 1/0, -1/0, 2^53, ('x'):rep(40), ('y'):rep(300), '', 'text' "
    "end },\n"
    "  { 'table', function() return { 1, 2, 3, { a = 1, b = { true } }, [10] = 'hole', [-1] = 0.25 "
    "} end },\n"
    "  { 'shared', function() return { a = shared, b = shared }, cyclic end },\n"
    "  { 'deep', function() return deep end },\n"
    "  { 'cfunc', function() return print, string.format, math end },\n"
    "  { 'func', function() return function(x) return x + up end end },\n"
    "  { 'func_counter', function() return function() n = n + 1; return n, shared end end },\n"
    "  { 'func_rec', function() return rec end },\n"
    "  { 'func_env', function() return setfenv(function() return answer end, { answer = 42 }) end "
    "},\n"
    "  { 'func_overlay', function() return setfenv(function() return answer end,\n"
    "      setmetatable({ answer = 42 }, { __index = _G })) end },\n"
    "  { 'funcs', function() local f = function() return up end; return { f, f, g = f } end },\n"
    "  { 'error', function() return { kind = 'Boom', message = 'it broke', traceback = 'x' } end "
    "},\n"
    "}\n";

static void put(const char *target, const char *name, const char *p, size_t n) {
  char path[512];
  snprintf(path, sizeof path, "%s/%s", dir, target);
  if (mkdir(path, 0755) != 0 && errno != EEXIST) abort();
  snprintf(path, sizeof path, "%s/%s/seed-%s", dir, target, name);
  FILE *f = fopen(path, "wb");
  if (f == NULL || fwrite(p, 1, n, f) != n || fclose(f) != 0) {
    perror(path);
    exit(1);
  }
}

/* The bytes of b after those of to. */
static void append(wbuf *to, const wbuf *b) {
  for (size_t i = 0; i < b->len; i++)
    corral__w_uint(to, (unsigned char)b->p[i], 1);
}

/* A stream for the frames target: the prefix, then the frames in b. */
static void put_stream(const char *name, int child, unsigned seed, wbuf *b) {
  wbuf s = {0};
  corral__w_uint(&s, (uint64_t)child, 1);
  corral__w_uint(&s, seed, 2);
  append(&s, b);
  if (s.failed) abort();
  put("frames", name, s.p, s.len);
  free(s.p);
}

static void result_frame(wbuf *b, uint64_t id, int state, const char *p, size_t n) {
  wbuf f = {0};
  corral__frame_begin(&f, 4);
  corral__w_uint(&f, id, 8);
  corral__w_uint(&f, (uint64_t)state, 1);
  corral__w_bytes(&f, p, n);
  corral__frame_end(&f);
  append(b, &f);
  free(f.p);
}

static void boot_frame(wbuf *b, const char *p, size_t n) {
  wbuf f = {0};
  corral__frame_begin(&f, 1);
  corral__w_uint(&f, FUZZ_K0, 8);
  corral__w_uint(&f, FUZZ_K1, 8);
  corral__w_uint(&f, 64, 4);
  corral__w_uint(&f, 0, 4); /* (no ring of started calls) */
  corral__w_bytes(&f, "w", 1);
  corral__w_bytes(&f, p, n);
  corral__frame_end(&f);
  append(b, &f);
  free(f.p);
}

/* A CALL with two inputs: one succeeded with `in`, one failed. */
static void call_frame(wbuf *b, uint64_t id, const char *args, size_t alen, const char *in,
                       size_t inlen) {
  static const char failed[] = "\x91\x82\xa4kind\xa4"
                               "Boom\xa7message\xa4oops";
  wbuf f = {0};
  corral__frame_begin(&f, 2);
  corral__w_uint(&f, id, 8);
  corral__w_uint(&f, 0, 1); /* flags: no buffers in shared memory */
  corral__w_bytes(&f, "echo", 4);
  corral__w_bytes(&f, args, alen);
  corral__w_uint(&f, 2, 4);
  corral__w_uint(&f, CORRAL_DONE, 1);
  corral__w_bytes(&f, in, inlen);
  corral__w_uint(&f, CORRAL_FAILED, 1);
  corral__w_bytes(&f, failed, sizeof failed - 1);
  corral__frame_end(&f);
  append(b, &f);
  free(f.p);
}

/* A CANCEL of the call `id` (parent -> child). */
static void cancel_frame(wbuf *b, uint64_t id) {
  wbuf f = {0};
  corral__frame_begin(&f, 5);
  corral__w_uint(&f, id, 8);
  corral__frame_end(&f);
  append(b, &f);
  free(f.p);
}

static char *encode(int from, int n, int bare, size_t *len) {
  codec_opts o = {0};
  o.bare = bare;
  o.no_refs = 1;
  char *p = corral__codec_encode(L, from, n, len, &o);
  if (p == NULL) {
    fprintf(stderr, "seeds: %s\n", o.err);
    exit(1);
  }
  return p;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: seeds DIR\n");
    return 2;
  }
  dir = argv[1];
  if (mkdir(dir, 0755) != 0 && errno != EEXIST) abort();
  corral_runtime *rt;
  L = fuzz_state(&rt);
  if (luaL_loadbuffer(L, values_lua, strlen(values_lua), "=seeds") != 0 ||
      lua_pcall(L, 0, 1, 0) != 0) {
    fprintf(stderr, "seeds: %s\n", lua_tostring(L, -1));
    return 1;
  }
  int list = lua_gettop(L);
  wbuf all = {0}; /* every payload, as RESULT frames in one stream */
  size_t first_len = 0;
  char *first = NULL;
  for (int i = 1; i <= (int)lua_objlen(L, list); i++) {
    lua_rawgeti(L, list, i);
    lua_rawgeti(L, -1, 1);
    const char *name = lua_tostring(L, -1);
    char nm[64];
    snprintf(nm, sizeof nm, "%s", name);
    lua_pop(L, 1);
    lua_rawgeti(L, -1, 2);
    int base = lua_gettop(L) - 1;
    lua_call(L, 0, LUA_MULTRET);
    int n = lua_gettop(L) - base;
    size_t len, blen;
    char *p = encode(base + 1, n, 0, &len);
    char *one = encode(base + 1, 1, 1, &blen);
    put("decode", nm, p, len);
    char nm1[80];
    snprintf(nm1, sizeof nm1, "%s-one", nm);
    put("decode", nm1, one, blen);

    wbuf b = {0};
    result_frame(&b, 1, CORRAL_DONE, p, len);
    put_stream(nm, 0, (unsigned)i * 77u, &b);
    free(b.p);
    b = (wbuf){0};
    boot_frame(&b, p, len);
    call_frame(&b, 1, p, len, one, blen);
    cancel_frame(&b, 1);
    snprintf(nm1, sizeof nm1, "%s-call", nm);
    put_stream(nm1, 1, (unsigned)i * 131u, &b);
    free(b.p);

    result_frame(&all, (uint64_t)(i % 8) + 1, i % 3 ? CORRAL_DONE : CORRAL_FAILED, p, len);
    if (first == NULL) {
      first = p;
      first_len = len;
    } else {
      free(p);
    }
    free(one);
    lua_settop(L, list);
  }
  put_stream("results", 0, 4242, &all);
  put_stream("results-whole", 0, 0, &all);
  free(all.p);

  /* corral's extensions and MessagePack's own, by hand */
  static const struct {
    const char *name;
    const char *p;
    size_t n;
  } raw[] = {
#define RAW(name, s) {name, s, sizeof s - 1}
      RAW("module", "\x91\xc7\x06\x04string"),
      RAW("timestamps", "\x93\xd6\xff\x5a\x4a\xf6\xa5\xd7\xff\xa1\xdc\xd7\xc8\x5a\x4a\xf6\xa5"
                        "\xc7\x0c\xff\x00\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff"),
      RAW("ref", "\x92\x91\x01\xd6\x01\x00\x00\x00\x00"),
      RAW("dep", "\x92\xd6\x02\x00\x00\x00\x00\xd6\x02\x00\x00\x00\x01"),
      RAW("future", "\x91\xd7\x03\x00\x00\x00\x00\x00\x00\x00\x01"),
      RAW("worker",
          "\x91\x93\xc7\x00\x07\x81\xa4name\xa1w\xd7\x08\x00\x00\x00\x00\x00\x00\x00\x02"),
      RAW("map", "\x91\x83\xa1\x61\x01\x02\x92\x03\x04\xc3\xc0"),
      RAW("bin", "\x91\xc4\x03\x61\x62\x63"),
      RAW("ext", "\x91\xd4\x2a\x00"),
      RAW("wide", "\xdc\x00\x03\x01\x02\x03"),
      RAW("float32", "\x91\xca\x3f\xc0\x00\x00"),
  };
  for (size_t i = 0; i < sizeof raw / sizeof raw[0]; i++) {
    put("decode", raw[i].name, raw[i].p, raw[i].n);
    wbuf b = {0};
    boot_frame(&b, first, first_len);
    call_frame(&b, 7, raw[i].p, raw[i].n, "\x91\x2a", 2);
    char nm[80];
    snprintf(nm, sizeof nm, "%s-call", raw[i].name);
    put_stream(nm, 1, (unsigned)i + 1, &b);
    free(b.p);
  }
  /* a result that never ran (PENDING), with why its instance died */
  static const char died[] = "\x91\x82\xa4kind\xadWorkerCrashed\xa7message\xa9it exited";
  wbuf b = {0};
  result_frame(&b, 2, CORRAL_PENDING, died, sizeof died - 1);
  result_frame(&b, 3, CORRAL_PENDING, NULL, 0);
  result_frame(&b, 4, CORRAL_CANCELLED, NULL, 0);
  put_stream("pending", 0, 9, &b);
  free(b.p);
  free(first);
  corral_close(rt);
  return 0;
}
