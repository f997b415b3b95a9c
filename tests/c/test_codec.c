/* test_codec.c: the codec against forged and stale bytes in trusted mode
 * (handles, bytecode, dependencies, worker arrays, references) and against
 * what a C host settles a future with (decoded as foreign bytes). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "internal.h"
#include "tap.h"

/* Decode trusted bytes; returns the count, leaving the error message (or
 * nothing) in err. */
static int decode(lua_State *L, const char *data, size_t len, codec_deps *deps, int trust,
                  char *err, size_t errsz) {
  int top = lua_gettop(L);
  int n = corral__codec_decode(L, data, len, deps, trust);
  err[0] = '\0';
  if (n < 0) snprintf(err, errsz, "%s", lua_tostring(L, -1));
  lua_settop(L, top);
  return n;
}

static int fails_with(lua_State *L, const char *data, size_t len, codec_deps *deps, int trust,
                      const char *needle) {
  char err[600];
  int n = decode(L, data, len, deps, trust, err, sizeof err);
  if (n >= 0 || strstr(err, needle) == NULL) {
    printf("# decoded %d, error: %s (wanted: %s)\n", n, err, needle);
    return 0;
  }
  return 1;
}

/* ---- handles -------------------------------------------------------------- */

static void test_handles(lua_State *L, corral_runtime *rt) {
  char err[600];
  int live0 = corral__future_live();
  corral_future *f = corral_future_new(rt);
  corral_push_future(L, f);
  codec_opts o = {0};
  size_t len;
  char *p = corral__codec_encode(L, lua_gettop(L), 1, &len, &o);
  lua_pop(L, 1);
  CHECK(p != NULL && o.has_refs && len == 11 && (unsigned char)p[1] == 0xd7 && p[2] == 3,
        "a future travels as an 8-byte handle, not its address");
  char copy[11];
  memcpy(copy, p, sizeof copy);
  int n = corral__codec_decode(L, p, len, NULL, CODEC_TRUSTED);
  CHECK(n == 1 && corral_to_future(L, -1) == f, "a live handle resolves to its future");
  lua_settop(L, 0);

  /* the handle of a live future where a worker instance is expected */
  char w[2 + 3 + 1 + 10];
  memcpy(w, "\x91\x93\xc7\x00\x07\x80\xd7\x08", 8);
  memcpy(w + 8, copy + 3, 8);
  CHECK(fails_with(L, w, sizeof w, NULL, CODEC_TRUSTED, "stale or forged worker handle"),
        "a future's handle is not taken for a worker's");

  corral__codec_discard(p, len);
  free(p);
  corral_future_cancel(f); /* the loop's watch lets it go */
  corral_future_release(f);
  corral_step(rt);
  lua_gc(L, LUA_GCCOLLECT, 0);
  lua_gc(L, LUA_GCCOLLECT, 0);
  CHECK(corral__future_live() == live0, "the future is gone once the payload and Lua let it go");
  CHECK(fails_with(L, copy, sizeof copy, NULL, CODEC_TRUSTED, "stale or forged future handle"),
        "a stale handle is an error, not a dangling pointer");

  const char forged[] = "\x91\xd7\x03\x00\x00\x00\x05\x00\x00\x00\x01";
  CHECK(fails_with(L, forged, sizeof forged - 1, NULL, CODEC_TRUSTED, "stale or forged"),
        "a forged handle is an error");
  const char huge[] = "\x91\xd7\x03\xff\xff\xff\xff\xff\xff\xff\xff";
  CHECK(fails_with(L, huge, sizeof huge - 1, NULL, CODEC_TRUSTED, "stale or forged"),
        "a handle past every slot is an error");
  const char shortf[] = "\x91\xd6\x03\x00\x00\x00\x01";
  CHECK(fails_with(L, shortf, sizeof shortf - 1, NULL, CODEC_TRUSTED, "4-byte body"),
        "a future extension of the wrong size is an error");
  CHECK(fails_with(L, copy, sizeof copy, NULL, CODEC_FOREIGN, "cannot come from outside"),
        "foreign bytes carry no futures");
  (void)decode(L, "", 0, NULL, CODEC_TRUSTED, err, sizeof err);
  CHECK(strstr(err, "truncated") != NULL, "an empty payload is an error");
}

/* ---- worker arrays, dependencies, references ----------------------------- */

static void test_structure(lua_State *L, corral_runtime *rt) {
  /* [WORKER, {}, 5]: an instance that is not a handle */
  CHECK(fails_with(L, "\x91\x93\xc7\x00\x07\x80\x05", 7, NULL, CODEC_TRUSTED, "(instance 1)"),
        "a worker array holding a number is an error");
  CHECK(fails_with(L, "\x91\x93\xc7\x00\x07\x01\x05", 7, NULL, CODEC_TRUSTED, "malformed worker"),
        "a worker array without options is an error");
  CHECK(fails_with(L, "\x91\x92\xc7\x00\x07\x80", 6, NULL, CODEC_TRUSTED, "malformed worker"),
        "a worker array without instances is an error");
  CHECK(fails_with(L, "\x91\x93\xc7\x00\x07\x80\x05", 7, NULL, CODEC_FOREIGN, "outside"),
        "foreign bytes carry no workers");
  /* DEP 0 with no inputs, DEP 3 of 1 */
  CHECK(fails_with(L, "\x91\xd6\x02\x00\x00\x00\x00", 7, NULL, CODEC_TRUSTED, "of 0 inputs"),
        "a dependency without inputs is an error");
  corral_future *in = corral_future_new(rt);
  corral_future_set_result(in, "\x91\x2a", 2);
  corral_future *ins[1] = {in};
  codec_deps deps = {ins, 1};
  CHECK(fails_with(L, "\x91\xd6\x02\x00\x00\x00\x03", 7, &deps, CODEC_TRUSTED, "3, of 1 inputs"),
        "a dependency index past the inputs is an error");
  int n = corral__codec_decode(L, "\x91\xd6\x02\x00\x00\x00\x00", 7, &deps, CODEC_TRUSTED);
  CHECK(n == 1 && lua_tonumber(L, -1) == 42, "a dependency in range is its input's first value");
  lua_settop(L, 0);
  corral_future_release(in);
  CHECK(fails_with(L, "\x91\xd6\x01\x00\x00\x00\x00", 7, NULL, CODEC_TRUSTED, "of 0 seen"),
        "a reference to no table is an error (it crashed)");
  CHECK(fails_with(L, "\x91\xd4\x01\x00", 4, NULL, CODEC_TRUSTED, "1-byte body"),
        "a reference of the wrong size is an error");
  CHECK(fails_with(L, "\x91\x2a\x00", 3, NULL, CODEC_TRUSTED, "trailing bytes"),
        "trailing bytes are an error in trusted mode too");
  CHECK(fails_with(L, "\x91\xd4\x08\x00", 4, NULL, CODEC_TRUSTED, "out of its place"),
        "an instance mark outside a worker array is an error");
}

/* ---- bytecode ----------------------------------------------------------- */

static void test_bytecode(lua_State *L) {
  luaL_loadstring(L, "local a, b = ... return function(x) return x * 2 + #tostring(x) end");
  lua_call(L, 0, 1);
  codec_opts o = {0};
  size_t len;
  char *p = corral__codec_encode(L, lua_gettop(L), 1, &len, &o);
  lua_pop(L, 1);
  CHECK(p != NULL, "a function encodes");
  int n = corral__codec_decode(L, p, len, NULL, CODEC_TRUSTED);
  int works = 0;
  if (n == 1) {
    lua_pushinteger(L, 20);
    lua_call(L, 1, 1);
    works = lua_tonumber(L, -1) == 42;
  }
  lua_settop(L, 0);
  CHECK(works, "bytecode from this process's encoder loads and runs");
  CHECK(fails_with(L, p, len, NULL, CODEC_FOREIGN, "cannot come from outside the process"),
        "foreign bytes carry no functions");
  /* one byte of the bytecode changed: the mark no longer authenticates it */
  char *q = malloc(len);
  memcpy(q, p, len);
  q[len - 3] ^= 0x40;
  CHECK(fails_with(L, q, len, NULL, CODEC_TRUSTED, "did not make"),
        "altered bytecode never reaches the loader");
  free(q);
  free(p);
  /* a function never decoded before, its mark altered */
  luaL_loadstring(L, "return function(y) return y - 1 end");
  lua_call(L, 0, 1);
  p = corral__codec_encode(L, lua_gettop(L), 1, &len, &o);
  lua_pop(L, 1);
  p[6] ^= 0x01; /* inside the mark */
  CHECK(fails_with(L, p, len, NULL, CODEC_TRUSTED, "did not make"), "a forged mark is refused");
  free(p);
  /* a FUNC array whose second element is not bytecode */
  CHECK(fails_with(L, "\x91\x92\xc7\x09\x06\0\0\0\0\0\0\0\0\0\x01", 15, NULL, CODEC_TRUSTED,
                   "malformed function"),
        "a function array without bytecode is an error");
}

/* ---- what a C host settles ------------------------------------------------ */

static void test_host_results(lua_State *L, corral_runtime *rt) {
  corral_future *f = corral_future_new(rt);
  /* the host's own MessagePack holding corral's FUNC mark: foreign, refused
   * as it is set (the decoder refuses it too: see test_bytecode) */
  CHECK(corral_future_set_result(f, "\x91\x92\xc7\x09\x06\0\0\0\0\0\0\0\0\0\xc4\x01\x1b", 17) ==
                CORRAL_EINVAL &&
            corral_future_state(f) == CORRAL_PENDING,
        "a host's result holding a function mark is CORRAL_EINVAL, the future left pending");
  corral_future_cancel(f);
  corral_future_release(f);
  corral_future *g = corral_future_new(rt);
  corral_push_future(L, g);
  lua_setglobal(L, "hostg");
  /* [timestamp 2018-01-02T03:04:05.678901234Z, ext 9 "x"] */
  corral_future_set_result(g, "\x91\xd7\xff\xa1\xdc\xd7\xc8\x5a\x4a\xf6\xa5", 11);
  corral_future_release(g);
  CHECK(run_lua(L, "local t = hostg:result()\n"
                   "assert(t.sec == 1514862245 and t.nsec == 678901234)") == 0,
        "a host's timestamp arrives as {sec, nsec}");
  corral_future *h = corral_future_new(rt);
  CHECK(corral_future_set_result(h, "\x91\x01\x02", 3) == CORRAL_EINVAL &&
            corral_future_state(h) == CORRAL_PENDING,
        "a host's result with trailing bytes is CORRAL_EINVAL");
  corral_future_cancel(h);
  corral_future_release(h);
}

/* ---- Lua out of memory in the middle of an encode or a decode -------------
 * Debian's LuaJIT is built with GC64, where lua_newstate takes a custom
 * allocator: this one fails the nth allocation that grows something. The
 * codec raises then (it cannot go on without Lua memory); what it held in C
 * (buffers, references, dependencies, its zone) must come back once the
 * state collects its garbage. */

static long alloc_count, alloc_fail_at = -1;

static void *failing_alloc(void *ud, void *p, size_t osize, size_t nsize) {
  (void)ud;
  if (nsize == 0) {
    free(p);
    return NULL;
  }
  if (alloc_fail_at >= 0 && nsize > osize && ++alloc_count == alloc_fail_at) return NULL;
  return realloc(p, nsize);
}

static void test_lua_oom(void) {
  lua_State *L = lua_newstate(failing_alloc, NULL);
  CHECK(L != NULL, "LuaJIT (GC64) takes a custom allocator");
  if (L == NULL) return;
  luaL_openlibs(L);
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, luaopen_corral);
  lua_setfield(L, -2, "corral");
  lua_pop(L, 2);
  CHECK(run_lua(
            L, "corral = require 'corral'\n"
               "core = require 'corral.core'\n"
               "local shared = { 'x' }\n"
               "value = { list = {}, s = ('y'):rep(600), f = function(x) return x + #shared end }\n"
               "for i = 1, 100 do value.list[i] = { i, tostring(i), shared } end\n"
               "fut = corral.future(); fut:set_result(1)\n"
               "bytes = assert(core.encode(value.list, value.s))\n"
               "function step()\n"
               "  core.encode(value)\n"
               "  core.encode(value, fut)\n"
               "  core.decode(bytes)\n"
               "end\n"
               "step()") == 0,
        "a state with corral on the failing allocator");
  lua_gc(L, LUA_GCCOLLECT, 0);
  int codec0 = corral__codec_live(), handles0 = corral__handle_live(),
      futures0 = corral__future_live();
  int raised = 0, clean = 1;
  for (long n = 1; n < 100000; n++) {
    lua_getglobal(L, "step");
    alloc_count = 0;
    alloc_fail_at = n;
    int rc = lua_pcall(L, 0, 0, 0);
    int hit = alloc_count >= n;
    alloc_fail_at = -1;
    if (rc != 0) {
      raised++;
      if (strstr(lua_tostring(L, -1), "not enough memory") == NULL) {
        printf("# allocation %ld: %s\n", n, lua_tostring(L, -1));
        clean = 0;
      }
      lua_pop(L, 1);
    }
    lua_gc(L, LUA_GCCOLLECT, 0);
    lua_gc(L, LUA_GCCOLLECT, 0);
    /* (the zone a decode keeps between decodes may have gone with its box) */
    if (corral__codec_live() > codec0 || corral__handle_live() != handles0 ||
        corral__future_live() != futures0) {
      printf("# allocation %ld: codec %d/%d handles %d/%d futures %d/%d\n", n, corral__codec_live(),
             codec0, corral__handle_live(), handles0, corral__future_live(), futures0);
      clean = 0;
    }
    if (!hit) break;
  }
  printf("# Lua ran out of memory at %d points\n", raised);
  CHECK(raised > 100, "Lua ran out of memory at every allocation of an encode and a decode");
  CHECK(clean, "each time: a Lua error, and the codec's C memory and references came back");
  lua_close(L);
}

int main(void) {
  corral_runtime *rt = corral_open();
  lua_State *L = corral_lua(rt);
  test_handles(L, rt);
  test_structure(L, rt);
  test_bytecode(L);
  test_host_results(L, rt);
  corral_close(rt);
  test_lua_oom();
  printf("1..%d\n", count);
  return failures != 0;
}
