/* fuzz.h: what the fuzz targets (decode.c, frames.c) and their seed writer
 * (seeds.c) share: the state they decode into, and a fixed key.
 *
 * The state is a real runtime with corral loaded, in which nothing can be
 * required from disk: a MODULE extension, even trusted, may name only what
 * is loaded already. The key for the marks on bytecode is fixed (a process
 * worker takes its parent's the same way), so that the seeds' functions
 * authenticate and the fuzzer mutates their upvalues and environments behind
 * a valid mark. Bytes the fuzzer makes up cannot carry a valid mark: those
 * are refused before luaL_loadbuffer, as any other process's would be. */
#ifndef CORRAL_FUZZ_H
#define CORRAL_FUZZ_H

#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>

#include "internal.h"

#define FUZZ_K0 0x0123456789abcdefULL
#define FUZZ_K1 0xfedcba9876543210ULL

/* The harness's prefix of a frames input: a mode byte (bit 0: the child's
 * side, BOOT then CALL frames; else the parent's, RESULT frames) and two
 * bytes that seed where the stream is cut into reads. */
#define FRAMES_PREFIX 3

static inline lua_State *fuzz_state(corral_runtime **rtp) {
  corral__codec_set_key(FUZZ_K0, FUZZ_K1);
  corral_runtime *rt = corral_open();
  if (rt == NULL) abort();
  lua_State *L = corral_lua(rt);
  if (luaL_dostring(L, "package.path, package.cpath = '', ''\n"
                       "for k in pairs(package.preload) do package.preload[k] = nil end\n"
                       "package.loaders = { package.loaders[1] }") != 0)
    abort();
  if (rtp != NULL) *rtp = rt;
  return L;
}

static inline void fuzz_fail(const char *what, int got, int want) {
  fprintf(stderr, "fuzz: %s: %d, expected %d\n", what, got, want);
  abort();
}

#endif
