/* frame.h: length-prefixed frames between a parent and its process workers. */
#ifndef CORRAL_FRAME_H
#define CORRAL_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define FRAME_MAX (1u << 30) /* a frame longer than this is refused */

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

void corral__w_uint(wbuf *b, uint64_t v, int n);
void corral__w_bytes(wbuf *b, const void *s, size_t n);
void corral__frame_begin(wbuf *b, int type);
void corral__frame_end(wbuf *b);
uint64_t corral__r_uint(rcur *c, int n);
const char *corral__r_bytes(rcur *c, size_t *n);
int corral__rbuf_add(rbuf *r, const char *s, size_t n);
const char *corral__rbuf_frames(rbuf *r, const char *(*fn)(void *ud, rcur *c), void *ud);

#endif
