/* decode.c: a libFuzzer target: the codec's decoder on arbitrary bytes, at
 * every trust that takes bytes from outside the process, and trusted.
 *
 * Each input is decoded as
 *   - foreign values (core.decode, a result a C host settled),
 *   - one foreign value (corral.decode),
 *   - a process worker's result (CODEC_PEER: what process.c's on_result
 *     settles a call with, decoded when the caller reads it),
 *   - one peer value (corral.decode(bytes, {code = true})),
 *   - trusted call arguments with two inputs (DEP) and one live future
 *     (FUTURE by handle) to find: the encoder's own bytes, still checked,
 *   - the message of an error (what on_result reads of a PENDING result).
 * After each decode: it returned values and left exactly them on the stack,
 * or -1 and a message; values that decoded and encode again decode again
 * (what the decoder accepts, the encoder's output for it is accepted too);
 * and after each input the codec holds no C memory it did not hold before,
 * and no future was made or lost. */
#include <stdint.h>
#include <string.h>

#include "fuzz.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static lua_State *L;
static int live, futures; /* the codec's blocks (its zone) and the futures alive */
static char *kept;        /* the payload that holds the live future (its reference) */
static corral_future *inputs[2];
static codec_deps deps = {inputs, 2};

static corral_future *settled(int state, const char *mp, size_t len) {
  corral_future *f = corral__future_new();
  char *p = malloc(len);
  if (f == NULL || p == NULL) abort();
  memcpy(p, mp, len);
  corral__future_settle_peer(f, state, p, len);
  return f;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  corral_runtime *rt;
  L = fuzz_state(&rt);
  /* one live future with a handle (slot 1, generation 0), its payload kept */
  corral_future *f = corral_future_new(rt);
  corral_push_future(L, f);
  codec_opts o = {0};
  size_t len;
  kept = corral__codec_encode(L, lua_gettop(L), 1, &len, &o);
  if (kept == NULL) abort();
  lua_settop(L, 0);
  /* the inputs of the trusted call: one succeeded ([{a = 1}]), one failed */
  static const char done[] = "\x91\x81\xa1\x61\x01", failed[] = "\x91\x81\xa7message\xa4oops";
  inputs[0] = settled(CORRAL_DONE, done, sizeof done - 1);
  inputs[1] = settled(CORRAL_FAILED, failed, sizeof failed - 1);
  /* (the codec makes its zone with the first decode, and keeps it) */
  if (corral__codec_decode(L, "\x90", 1, NULL, CODEC_PEER) != 0) abort();
  live = corral__codec_live();
  futures = corral__future_live();
  return 0;
}

/* What decoded at top+1.. encodes again, as a payload or one bare value;
 * then it decodes again, trusted (it is the encoder's own output). */
static void again(int top, int n, int one) {
  codec_opts o = {0};
  o.no_refs = 1;
  o.bare = one;
  size_t len;
  char *p = corral__codec_encode(L, top + 1, n, &len, &o);
  if (p == NULL) return; /* (a value that cannot travel into bytes: a live future...) */
  int mid = lua_gettop(L);
  int m = corral__codec_decode(L, p, len, NULL, CODEC_TRUSTED | (one ? CODEC_ONE : 0));
  if (m < 0) {
    fprintf(stderr, "fuzz: decoded, encoded, and then refused: %s\n", lua_tostring(L, -1));
    abort();
  }
  if (m != n) fuzz_fail("values decoded again", m, n);
  if (lua_gettop(L) != mid + m) fuzz_fail("stack after decoding again", lua_gettop(L) - mid, m);
  free(p);
}

static void decode_as(const uint8_t *data, size_t size, codec_deps *d, int trust) {
  int top = lua_gettop(L);
  int n = corral__codec_decode(L, (const char *)data, size, d, trust);
  if (lua_gettop(L) != top + (n < 0 ? 1 : n))
    fuzz_fail("values left by decode", lua_gettop(L) - top, n < 0 ? 1 : n);
  if (n < 0 && !lua_isstring(L, -1)) fuzz_fail("decode failed without a message", 0, 1);
  if ((trust & CODEC_ONE) && n >= 0 && n != 1) fuzz_fail("values of one", n, 1);
  if (n > 0) again(top, n, (trust & CODEC_ONE) != 0);
  lua_settop(L, top);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  decode_as(data, size, NULL, CODEC_FOREIGN);
  decode_as(data, size, NULL, CODEC_FOREIGN | CODEC_ONE);
  decode_as(data, size, NULL, CODEC_PEER | CODEC_AS_RESULT);
  decode_as(data, size, NULL, CODEC_PEER | CODEC_ONE);
  decode_as(data, size, &deps, CODEC_TRUSTED | CODEC_AS_ARGS);
  char msg[300], tiny[1];
  if (corral__codec_error_message((const char *)data, size, msg, sizeof msg) &&
      strlen(msg) >= sizeof msg)
    fuzz_fail("error message length", (int)strlen(msg), (int)sizeof msg - 1);
  if (corral__codec_error_message((const char *)data, size, tiny, sizeof tiny) && tiny[0] != '\0')
    fuzz_fail("error message in one byte", tiny[0], 0);
  if (corral__codec_live() != live) fuzz_fail("blocks the codec holds", corral__codec_live(), live);
  if (corral__future_live() != futures) fuzz_fail("futures alive", corral__future_live(), futures);
  static unsigned runs;
  if (++runs % 4096 == 0) lua_gc(L, LUA_GCCOLLECT, 0);
  return 0;
}
