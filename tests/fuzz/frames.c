/* frames.c: a libFuzzer target: the frame reader of process workers
 * (frame.c) on an arbitrary stream, cut into reads where the input says, and
 * each frame's fields read as process.c reads them.
 *
 * An input is a prefix (fuzz.h: FRAMES_PREFIX bytes: which side reads, and a
 * seed for where reads end) and the stream. The parent's side reads RESULT
 * frames as on_result does: id (8), state (1), bytes; a PENDING result's
 * bytes are an error whose message is read; the others are a payload that
 * the caller decodes as CODEC_PEER (here, at once). The child's side reads a
 * BOOT frame, then CALL and CANCEL frames, as on_boot, on_call and on_cancel
 * do: the inputs of a call are settled as a peer's, and its arguments
 * decoded trusted with them (the parent is the child's trusted side; DEP
 * reaches the inputs' peer bytes). The fields of a frame are read by
 * frame.c's corral__frame_* functions, the ones process.c reads them with
 * (that file runs a loop and a worker, not to be fuzzed whole). Descriptors
 * of shared buffers (a flag in a state) are not fuzzed here: a flagged
 * payload is decoded as the reader would before taking them (SHM
 * extensions refused).
 *
 * Checked: the reader gives the same frames, and the same verdict, whether
 * the stream arrives whole or in pieces; nothing reads past a frame (ASan);
 * each decode leaves what it says on the stack; after each input the codec
 * holds no more C memory, and no future is left alive. */
#include <stdint.h>
#include <string.h>

#include "frame.h"
#include "fuzz.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define SENT_CALLS 8 /* ids 1..8 are calls "given" to the child */

static lua_State *L;
static int codec_base, futures_base;

typedef struct {
  int child;    /* the child's side */
  int booted;   /* (the child's) a BOOT frame came */
  int decode;   /* decode what frames carry (the second reading only records) */
  uint64_t sum; /* the frames seen, in order: a hash of their bodies */
  unsigned frames;
} reader;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  L = fuzz_state(NULL);
  /* (the codec makes its zone with the first decode, and keeps it) */
  if (corral__codec_decode(L, "\x90", 1, NULL, CODEC_PEER) != 0) abort();
  codec_base = corral__codec_live();
  futures_base = corral__future_live();
  return 0;
}

static void decode(const char *s, size_t n, codec_deps *deps, int trust) {
  int top = lua_gettop(L);
  int k = corral__codec_decode(L, s, n, deps, trust);
  if (lua_gettop(L) != top + (k < 0 ? 1 : k))
    fuzz_fail("values left by decode", lua_gettop(L) - top, k < 0 ? 1 : k);
  if (k < 0 && !lua_isstring(L, -1)) fuzz_fail("decode failed without a message", 0, 1);
  lua_settop(L, top);
}

/* process.c's on_result, but for settling a call: its payload decoded as the
 * caller would. */
static const char *on_result(reader *r, rcur *c) {
  frame_result fr;
  const char *bad = corral__frame_result(c, &fr);
  if (bad != NULL) return bad;
  uint64_t id = fr.id;
  int state = fr.state;
  size_t n = fr.len;
  const char *s = fr.payload;
  if (id == 0 || id > SENT_CALLS) return "a RESULT frame for no call it was given";
  if (state == CORRAL_PENDING) {
    char died[300];
    if (n > 0 && !corral__codec_error_message(s, n, died, sizeof died))
      return "a RESULT frame with a bad state";
    if (n > 0 && strlen(died) >= sizeof died) fuzz_fail("message length", (int)strlen(died), 299);
    return NULL;
  }
  if (r->decode && n > 0) decode(s, n, NULL, CODEC_PEER | CODEC_AS_RESULT);
  return NULL;
}

/* process.c's on_boot, without starting the worker (nor taking the key). */
static const char *on_boot(reader *r, rcur *c) {
  frame_boot fb;
  const char *bad = corral__frame_boot(c, &fb);
  if (bad != NULL) return bad;
  size_t nlen = fb.nlen, blen = fb.blen;
  const char *name = fb.name, *boot = fb.boot;
  char nm[64];
  memcpy(nm, name, nlen);
  nm[nlen] = '\0';
  if (r->decode) decode(boot, blen, NULL, CODEC_TRUSTED | CODEC_AS_INIT);
  r->booted = 1;
  return NULL;
}

/* process.c's on_call, with its arguments decoded as the worker would. */
static const char *on_call(reader *r, rcur *c) {
  frame_call fc;
  const char *bad = corral__frame_call(c, &fc);
  if (bad != NULL) return bad;
  size_t plen = fc.plen;
  const char *payload = fc.payload;
  uint32_t ndeps = fc.ndeps;
  corral_future **deps = ndeps ? calloc(ndeps, sizeof *deps) : NULL;
  if (ndeps && deps == NULL) return "out of memory";
  uint32_t made = 0;
  for (uint32_t i = 0; i < ndeps; i++) {
    frame_input in;
    corral__frame_input(c, &in);
    int st = in.state;
    size_t n = in.n;
    const char *s = in.bytes;
    deps[i] = corral__future_new();
    if (deps[i] == NULL) abort();
    made++;
    if (c->bad) continue;
    char *p = NULL;
    if (n > 0) {
      p = malloc(n);
      if (p == NULL) abort();
      memcpy(p, s, n);
    }
    corral__future_settle_peer(deps[i], st, p, n);
  }
  const char *why = NULL;
  if (corral__frame_done(c, "a malformed CALL frame") != NULL) {
    why = "a malformed CALL frame";
  } else if (r->decode) {
    codec_deps d = {deps, (int)ndeps};
    decode(payload, plen, &d, CODEC_TRUSTED | CODEC_AS_ARGS);
  }
  for (uint32_t i = 0; i < made; i++)
    corral_future_release(deps[i]);
  free(deps);
  return why;
}

static const char *on_frame(void *ud, rcur *c) {
  reader *r = ud;
  /* (the frame, whole: what both readings must agree on) */
  for (size_t i = 0; i < c->left; i++)
    r->sum = (r->sum ^ c->p[i]) * 0x100000001b3ULL;
  r->sum = (r->sum ^ c->left) * 0x100000001b3ULL;
  r->frames++;
  int type = (int)corral__r_uint(c, 1);
  if (!r->child) {
    if (type == F_SYNC) {
      frame_sync fs;
      return corral__frame_sync(c, &fs);
    }
    if (type == F_SYNC_CANCEL) {
      uint64_t id;
      return corral__frame_cancel(c, &id);
    }
    return type == F_RESULT ? on_result(r, c) : "a frame of an unknown type";
  }
  if (!r->booted) return type == F_BOOT ? on_boot(r, c) : "a first frame that is not BOOT";
  if (type == F_CALL) return on_call(r, c);
  if (type == F_CANCEL) {
    uint64_t id;
    return corral__frame_cancel(c, &id);
  }
  if (type == F_SYNC_REPLY) {
    frame_sync_reply fr;
    return corral__frame_sync_reply(c, &fr);
  }
  return "a frame of an unknown type";
}

/* Read the stream in reads of the sizes the seed gives (0: whole); as the
 * proxy and the pump do, each read is added and its whole frames handled,
 * and the first refusal ends the stream. */
static const char *read_stream(reader *r, const char *s, size_t n, unsigned seed, size_t *left) {
  rbuf in = {0};
  const char *why = NULL;
  uint32_t x = seed * 2654435761u + 1;
  size_t off = 0;
  while (off < n && why == NULL) {
    size_t k = n - off;
    if (seed != 0) {
      x ^= x << 13;
      x ^= x >> 17;
      x ^= x << 5;
      size_t cut = (x >> 8) % (x & 0x80 ? 7 : 300) + 1; /* short reads, and longer ones */
      if (cut < k) k = cut;
    }
    if (corral__rbuf_add(&in, s + off, k) != 0) abort();
    off += k;
    why = corral__rbuf_frames(&in, on_frame, r);
  }
  if (in.len > in.cap) fuzz_fail("rbuf length over its capacity", (int)in.len, (int)in.cap);
  *left = in.len;
  free(in.p);
  return why;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < FRAMES_PREFIX) return 0;
  int child = data[0] & 1;
  unsigned seed = (unsigned)data[1] << 8 | data[2];
  const char *s = (const char *)data + FRAMES_PREFIX;
  size_t n = size - FRAMES_PREFIX;
  int top = lua_gettop(L);

  reader cut = {.child = child, .decode = 1}, whole = {.child = child};
  size_t left_cut, left_whole;
  const char *why_cut = read_stream(&cut, s, n, seed, &left_cut);
  const char *why_whole = read_stream(&whole, s, n, 0, &left_whole);
  if (cut.frames != whole.frames)
    fuzz_fail("frames, in pieces and whole", cut.frames, whole.frames);
  if (cut.sum != whole.sum) fuzz_fail("frames differ, in pieces and whole", 0, 1);
  if ((why_cut == NULL) != (why_whole == NULL) ||
      (why_cut != NULL && strcmp(why_cut, why_whole) != 0)) {
    fprintf(stderr, "fuzz: in pieces: %s; whole: %s\n", why_cut ? why_cut : "(fine)",
            why_whole ? why_whole : "(fine)");
    abort();
  }
  /* (a stream that ended well keeps the same unfinished frame) */
  if (why_cut == NULL && left_cut != left_whole)
    fuzz_fail("bytes kept, in pieces and whole", (int)left_cut, (int)left_whole);
  if (lua_gettop(L) != top) fuzz_fail("stack after the stream", lua_gettop(L), top);

  if (corral__codec_live() != codec_base)
    fuzz_fail("blocks the codec holds", corral__codec_live(), codec_base);
  if (corral__future_live() != futures_base)
    fuzz_fail("futures alive", corral__future_live(), futures_base);
  static unsigned runs;
  if (++runs % 4096 == 0) lua_gc(L, LUA_GCCOLLECT, 0);
  return 0;
}
