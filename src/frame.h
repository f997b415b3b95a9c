/* frame.h: length-prefixed frames between a parent and its process workers. */
#ifndef CORRAL_FRAME_H
#define CORRAL_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define FRAME_MAX (1u << 30) /* a frame longer than this is refused */
#define RING_MAX  (1u << 20) /* slots of the ring of started calls, at most */
#define FRAME_SHM 0x80       /* a state's bit: the payload names buffers in shared memory */

/* The frames (process.c says what each carries). */
enum {
  F_BOOT = 1,
  F_CALL = 2,
  F_RESULT = 4,
  F_CANCEL = 5,
  F_SYNC = 6,
  F_SYNC_CANCEL = 7,
  F_SYNC_REPLY = 8
};
/* (the states, as corral.h numbers them: checked here without it) */
enum { FRAME_PENDING = 0, FRAME_DONE = 2, FRAME_FAILED = 3, FRAME_CANCELLED = 4 };

typedef struct {
  char *p;
  size_t len, cap;
  int failed;
} wbuf;

/* A frame being read: every read is checked against what is left. */
typedef struct {
  const unsigned char *p;
  size_t left;
  int bad;
} rcur;

/* Reassembly of frames from a stream. */
typedef struct {
  char *p;
  size_t len, cap;
} rbuf;

/* The fields of each frame, after its type byte, checked as far as a frame
 * alone can say: NULL, or why it is malformed. process.c and the fuzz
 * target read frames only through these. */
typedef struct {
  uint64_t id;
  int state, shm; /* FRAME_DONE, _FAILED, _CANCELLED or _PENDING (not started) */
  const char *payload;
  size_t len;
} frame_result;
const char *corral__frame_result(rcur *c, frame_result *out);

typedef struct {
  uint64_t k0, k1;
  int cap;
  uint64_t ring_n; /* 0, or a power of two up to RING_MAX */
  const char *name, *boot;
  size_t nlen, blen; /* nlen < 64 */
} frame_boot;
const char *corral__frame_boot(rcur *c, frame_boot *out);

/* A CALL up to its inputs: read each with corral__frame_input, then
 * corral__frame_done says whether the frame held exactly them. */
typedef struct {
  uint64_t id;
  int flags; /* bit 0: the arguments name buffers in shared memory */
  const char *method, *payload;
  size_t mlen, plen;
  uint32_t ndeps;
} frame_call;
const char *corral__frame_call(rcur *c, frame_call *out);
typedef struct {
  int state, shm; /* a final state (an unknown one reads as FAILED) */
  const char *bytes;
  size_t n;
} frame_input;
void corral__frame_input(rcur *c, frame_input *out);
const char *corral__frame_done(rcur *c, const char *why);

const char *corral__frame_cancel(rcur *c, uint64_t *id);

/* A value in a SYNC or SYNC_REPLY frame: a tag (1), then a number (8,
 * IEEE 754 big-endian) or bytes (a string, or an encoded payload). */
enum { FV_NONE = 0, FV_FALSE, FV_TRUE, FV_NUMBER, FV_STRING, FV_ENCODED };
typedef struct {
  int tag;
  double num;
  const char *bytes;
  size_t n;
} frame_value;
void corral__w_value(wbuf *b, const frame_value *v);
void corral__r_value(rcur *c, frame_value *out);

/* SYNC, child -> parent: an operation on a sync object of the parent's
 * (process.c): id (8), the object's handle (8), op (1), n (8, signed), value. */
typedef struct {
  uint64_t id, handle;
  int op;
  int64_t n;
  frame_value v;
} frame_sync;
const char *corral__frame_sync(rcur *c, frame_sync *out);

/* SYNC_REPLY, parent -> child: id (8), state (1), ival (8), then the
 * object's count (8), closed (1), unfinished, waiting, putting, cap (8
 * each, signed), value. */
typedef struct {
  uint64_t id;
  int state, closed;
  int64_t ival, count, unfinished, waiting, putting, cap;
  frame_value v;
} frame_sync_reply;
const char *corral__frame_sync_reply(rcur *c, frame_sync_reply *out);

void corral__w_uint(wbuf *b, uint64_t v, int n);
void corral__w_bytes(wbuf *b, const void *s, size_t n);
void corral__frame_begin(wbuf *b, int type);
void corral__frame_end(wbuf *b);
uint64_t corral__r_uint(rcur *c, int n);
const char *corral__r_bytes(rcur *c, size_t *n);
int corral__rbuf_add(rbuf *r, const char *s, size_t n);
const char *corral__rbuf_frames(rbuf *r, const char *(*fn)(void *ud, rcur *c), void *ud);

#endif
