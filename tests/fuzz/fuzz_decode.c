/* fuzz_decode.c: a libFuzzer target: the codec's decoder on arbitrary bytes,
 * as trusted (built with -DFUZZ_FOREIGN=0) or foreign (=1) payloads.
 *
 * The state is a real runtime with corral loaded, in which nothing can be
 * required from disk: in trusted mode a MODULE may name only what is loaded
 * already. Bytes cannot become pointers (futures and workers are handles the
 * table validates; one live future is issued, so that its handle is there to
 * find) nor code (bytecode loads only with a mark made under this process's
 * random key, which fuzzed bytes cannot forge). After each input: the stack is
 * as it should be, and the codec holds no C memory it did not hold before. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>

#include "internal.h"

#ifndef FUZZ_FOREIGN
#define FUZZ_FOREIGN 0
#endif

static lua_State *L;
static int live = -1;
static char *kept; /* the payload that holds the live future */

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  corral_runtime *rt = corral_open();
  if (rt == NULL) abort();
  L = corral_lua(rt);
  if (luaL_dostring(L, "package.path, package.cpath = '', ''\n"
                       "for k in pairs(package.preload) do package.preload[k] = nil end\n"
                       "package.loaders = { package.loaders[1] }") != 0)
    abort();
  /* one live future with a handle (slot 1, generation 0), its payload kept */
  corral_future *f = corral_future_new(rt);
  corral_push_future(L, f);
  codec_opts o = {0};
  size_t len;
  kept = corral__codec_encode(L, lua_gettop(L), 1, &len, &o);
  if (kept == NULL) abort();
  lua_settop(L, 0);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  int top = lua_gettop(L);
  int n = corral__codec_decode(L, (const char *)data, size, NULL,
                               FUZZ_FOREIGN ? CODEC_FOREIGN : CODEC_TRUSTED);
  if (lua_gettop(L) != top + (n < 0 ? 1 : n)) {
    fprintf(stderr, "decode left %d values for %d\n", lua_gettop(L) - top, n);
    abort();
  }
  if (n < 0 && !lua_isstring(L, -1)) abort();
  lua_settop(L, top);
  if (live < 0) live = corral__codec_live(); /* the zone kept between decodes */
  if (corral__codec_live() != live) {
    fprintf(stderr, "the codec holds %d blocks, %d before\n", corral__codec_live(), live);
    abort();
  }
  static unsigned runs;
  if (++runs % 4096 == 0) lua_gc(L, LUA_GCCOLLECT, 0);
  return 0;
}
