/* frame.c: writing and reading the length-prefixed frames of process workers.
 *
 * A frame is a 4-byte big-endian length, then its body. Writing grows a
 * buffer (a failed allocation marks it failed, checked once at the end);
 * reading checks every field against what is left of the frame, so a
 * frame from an untrusted peer never reads past its end.
 */
#include <stdlib.h>
#include <string.h>

#include "frame.h"

/* ======================================================================== */
/* Frames                                                                    */
/* ======================================================================== */

static void w_need(wbuf *b, size_t n) {
  if (b->failed || b->len + n <= b->cap) return;
  size_t cap = b->cap ? b->cap : 64;
  while (cap < b->len + n)
    cap *= 2;
  char *p = realloc(b->p, cap);
  if (p == NULL) {
    b->failed = 1;
    return;
  }
  b->p = p;
  b->cap = cap;
}

void corral__w_uint(wbuf *b, uint64_t v, int n) {
  w_need(b, (size_t)n);
  if (b->failed) return;
  for (int i = n - 1; i >= 0; i--)
    b->p[b->len++] = (char)((v >> (8 * i)) & 0xff);
}

void corral__w_bytes(wbuf *b, const void *s, size_t n) {
  corral__w_uint(b, n, 4);
  w_need(b, n);
  if (b->failed || n == 0) return;
  memcpy(b->p + b->len, s, n);
  b->len += n;
}

/* Start a frame of `type`; frame_end writes its length. */
void corral__frame_begin(wbuf *b, int type) {
  corral__w_uint(b, 0, 4);
  corral__w_uint(b, (uint64_t)type, 1);
}

void corral__frame_end(wbuf *b) {
  if (b->failed) return;
  size_t n = b->len - 4;
  for (int i = 0; i < 4; i++)
    b->p[i] = (char)((n >> (8 * (3 - i))) & 0xff);
}

uint64_t corral__r_uint(rcur *c, int n) {
  if (c->bad || c->left < (size_t)n) {
    c->bad = 1;
    return 0;
  }
  uint64_t v = 0;
  for (int i = 0; i < n; i++)
    v = v << 8 | c->p[i];
  c->p += n;
  c->left -= (size_t)n;
  return v;
}

const char *corral__r_bytes(rcur *c, size_t *n) {
  *n = (size_t)corral__r_uint(c, 4);
  if (c->bad || c->left < *n) {
    c->bad = 1;
    *n = 0;
    return NULL;
  }
  const char *s = (const char *)c->p;
  c->p += *n;
  c->left -= *n;
  return s;
}

/* Append what was read; returns -1 when out of memory. */
int corral__rbuf_add(rbuf *r, const char *s, size_t n) {
  if (r->len + n > r->cap) {
    size_t cap = r->cap ? r->cap : 4096;
    while (cap < r->len + n)
      cap *= 2;
    char *p = realloc(r->p, cap);
    if (p == NULL) return -1;
    r->p = p;
    r->cap = cap;
  }
  memcpy(r->p + r->len, s, n);
  r->len += n;
  return 0;
}

/* Call fn on each whole frame in r (its body, after the length); keeps
 * what is left. Returns 0, or why the stream is bad (a length over the
 * bound), or fn's refusal. */
const char *corral__rbuf_frames(rbuf *r, const char *(*fn)(void *ud, rcur *c), void *ud) {
  size_t off = 0;
  const char *why = NULL;
  while (why == NULL && r->len - off >= 4) {
    const unsigned char *h = (const unsigned char *)r->p + off;
    uint32_t n = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
    if (n == 0 || n > FRAME_MAX) {
      why = "a frame with a bad length";
      break;
    }
    if (r->len - off - 4 < n) break;
    rcur c = {h + 4, n, 0};
    why = fn(ud, &c);
    off += 4 + (size_t)n;
  }
  if (off > 0) memmove(r->p, r->p + off, r->len - off);
  r->len -= off;
  return why;
}

/* ======================================================================== */
/* The fields of each frame                                                  */
/* ======================================================================== */

const char *corral__frame_result(rcur *c, frame_result *out) {
  out->id = corral__r_uint(c, 8);
  int state = (int)corral__r_uint(c, 1);
  out->shm = (state & FRAME_SHM) != 0;
  out->state = state & ~FRAME_SHM;
  out->payload = corral__r_bytes(c, &out->len);
  if (c->bad || c->left != 0) return "a malformed RESULT frame";
  if (out->shm && (out->state == FRAME_PENDING || out->len == 0))
    return "a RESULT frame with a bad state";
  if (out->state != FRAME_DONE && out->state != FRAME_FAILED && out->state != FRAME_CANCELLED &&
      out->state != FRAME_PENDING)
    return "a RESULT frame with a bad state";
  return NULL;
}

const char *corral__frame_boot(rcur *c, frame_boot *out) {
  out->k0 = corral__r_uint(c, 8);
  out->k1 = corral__r_uint(c, 8);
  out->cap = (int)corral__r_uint(c, 4);
  out->ring_n = corral__r_uint(c, 4);
  out->name = corral__r_bytes(c, &out->nlen);
  out->boot = corral__r_bytes(c, &out->blen);
  if (c->bad || c->left != 0 || out->nlen >= 64 || out->ring_n > RING_MAX ||
      (out->ring_n & (out->ring_n - 1)))
    return "a malformed BOOT frame";
  return NULL;
}

const char *corral__frame_call(rcur *c, frame_call *out) {
  out->id = corral__r_uint(c, 8);
  out->flags = (int)corral__r_uint(c, 1);
  out->method = corral__r_bytes(c, &out->mlen);
  out->payload = corral__r_bytes(c, &out->plen);
  out->ndeps = (uint32_t)corral__r_uint(c, 4);
  /* (each input takes 5 bytes at least: a bound on their count) */
  if (c->bad || out->ndeps > c->left / 5 || (out->flags & ~1)) return "a malformed CALL frame";
  return NULL;
}

void corral__frame_input(rcur *c, frame_input *out) {
  int st = (int)corral__r_uint(c, 1);
  out->bytes = corral__r_bytes(c, &out->n);
  out->shm = (st & FRAME_SHM) != 0;
  st &= ~FRAME_SHM;
  out->state = st >= FRAME_DONE && st <= FRAME_CANCELLED ? st : FRAME_FAILED;
}

const char *corral__frame_done(rcur *c, const char *why) {
  return c->bad || c->left != 0 ? why : NULL;
}

const char *corral__frame_cancel(rcur *c, uint64_t *id) {
  *id = corral__r_uint(c, 8);
  return corral__frame_done(c, "a malformed CANCEL frame");
}

/* ======================================================================== */
/* Sync operations of a child on its parent's objects                       */
/* ======================================================================== */

void corral__w_value(wbuf *b, const frame_value *v) {
  corral__w_uint(b, (uint64_t)v->tag, 1);
  if (v->tag == FV_NUMBER) {
    uint64_t u;
    memcpy(&u, &v->num, sizeof u);
    corral__w_uint(b, u, 8);
  } else if (v->tag == FV_STRING || v->tag == FV_ENCODED) {
    corral__w_bytes(b, v->bytes, v->n);
  }
}

void corral__r_value(rcur *c, frame_value *out) {
  memset(out, 0, sizeof *out);
  out->tag = (int)corral__r_uint(c, 1);
  if (out->tag == FV_NUMBER) {
    uint64_t u = corral__r_uint(c, 8);
    memcpy(&out->num, &u, sizeof u);
  } else if (out->tag == FV_STRING || out->tag == FV_ENCODED) {
    out->bytes = corral__r_bytes(c, &out->n);
  } else if (out->tag > FV_ENCODED) {
    c->bad = 1;
  }
}

const char *corral__frame_sync(rcur *c, frame_sync *out) {
  out->id = corral__r_uint(c, 8);
  out->handle = corral__r_uint(c, 8);
  out->op = (int)corral__r_uint(c, 1);
  out->n = (int64_t)corral__r_uint(c, 8);
  corral__r_value(c, &out->v);
  return corral__frame_done(c, "a malformed SYNC frame");
}

const char *corral__frame_sync_reply(rcur *c, frame_sync_reply *out) {
  out->id = corral__r_uint(c, 8);
  out->state = (int)corral__r_uint(c, 1);
  out->ival = (int64_t)corral__r_uint(c, 8);
  out->count = (int64_t)corral__r_uint(c, 8);
  out->closed = (int)corral__r_uint(c, 1);
  out->unfinished = (int64_t)corral__r_uint(c, 8);
  out->waiting = (int64_t)corral__r_uint(c, 8);
  out->putting = (int64_t)corral__r_uint(c, 8);
  out->cap = (int64_t)corral__r_uint(c, 8);
  corral__r_value(c, &out->v);
  return corral__frame_done(c, "a malformed SYNC_REPLY frame");
}
