/* handle.c: handles for the shared objects that cross contexts (futures, worker
 * instances): 64-bit numbers that the runtime issues and validates, so that no
 * address ever travels in a payload.
 *
 * A handle is (generation << 32 | slot + 1). A slot holds the object, its kind
 * and a pointer to its reference count; it is taken when an object first
 * crosses, and freed when the object's last reference goes, which bumps the
 * slot's generation: a stale handle (its object gone, perhaps its slot reused)
 * or a forged one (a slot never issued, a wrong kind or generation) finds
 * nothing.
 *
 * Threads: issuing takes a mutex (encoders, on first crossing). Lookups and
 * frees take no lock, so that a __gc may drop an object's last reference. A
 * lookup pins its slot while it tries to retain the object; a free bumps the
 * generation, then waits for the pins to go before its caller frees the
 * object. Slots live in chunks that are never moved or freed.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define CHUNK_BITS 10
#define CHUNK_SIZE (1u << CHUNK_BITS)
#define MAX_CHUNKS 4096 /* 4M live objects that crossed */

typedef struct {
  _Atomic(void *) obj;
  atomic_int *refs; /* the object's reference count */
  atomic_uint gen;  /* bumped when the slot is freed */
  atomic_int pins;  /* lookups in progress */
  atomic_int kind;  /* HANDLE_*, 0 when free */
} slot;

static slot *chunks[MAX_CHUNKS];
static unsigned nchunks;  /* under lock */
static unsigned cursor;   /* where the next search for a free slot starts (under lock) */
static atomic_uint nlive; /* slots in use */
static uv_mutex_t lock;
static uv_once_t once = UV_ONCE_INIT;

static void handle_init(void) {
  if (uv_mutex_init(&lock) != 0) abort();
}

static slot *slot_at(uint32_t i) {
  unsigned c = i >> CHUNK_BITS;
  if (c >= MAX_CHUNKS) return NULL;
  slot *chunk = atomic_load_explicit((_Atomic(slot *) *)&chunks[c], memory_order_acquire);
  return chunk ? &chunk[i & (CHUNK_SIZE - 1)] : NULL;
}

/* ======================================================================== */
/* Issue and free                                                            */
/* ======================================================================== */

static uint64_t issue(void *obj, int kind, atomic_int *refs) {
  uv_once(&once, handle_init);
  uv_mutex_lock(&lock);
  unsigned total = nchunks * CHUNK_SIZE;
  slot *s = NULL;
  uint32_t i = 0;
  /* Grow when more than half is in use, so that the search stays short. */
  if (atomic_load(&nlive) * 2 >= total && nchunks < MAX_CHUNKS) {
    slot *chunk = calloc(CHUNK_SIZE, sizeof *chunk);
    if (chunk != NULL) {
      atomic_store_explicit((_Atomic(slot *) *)&chunks[nchunks], chunk, memory_order_release);
      cursor = nchunks * CHUNK_SIZE;
      nchunks++;
      total += CHUNK_SIZE;
    }
  }
  for (unsigned n = 0; n < total; n++) {
    uint32_t j = (cursor + n) % total;
    slot *t = slot_at(j);
    if (atomic_load_explicit(&t->kind, memory_order_acquire) == 0 &&
        atomic_load_explicit(&t->pins, memory_order_acquire) == 0) {
      s = t;
      i = j;
      break;
    }
  }
  if (s == NULL) {
    uv_mutex_unlock(&lock);
    return 0;
  }
  cursor = (i + 1) % total;
  s->refs = refs;
  atomic_store_explicit(&s->obj, obj, memory_order_relaxed);
  atomic_store_explicit(&s->kind, kind, memory_order_release);
  atomic_fetch_add(&nlive, 1);
  uint32_t gen = atomic_load(&s->gen);
  uv_mutex_unlock(&lock);
  return (uint64_t)gen << 32 | (uint64_t)(i + 1);
}

uint64_t corral__handle_of(_Atomic(uint64_t) *cell, void *obj, int kind, atomic_int *refs) {
  uint64_t h = atomic_load_explicit(cell, memory_order_acquire);
  if (h != 0) return h;
  h = issue(obj, kind, refs);
  uint64_t none = 0;
  if (h != 0 && !atomic_compare_exchange_strong(cell, &none, h)) {
    corral__handle_free(h); /* another thread issued one first */
    h = none;
  }
  return h;
}

void corral__handle_free(uint64_t h) {
  uint32_t i = (uint32_t)h - 1;
  slot *s = slot_at(i);
  if (h == 0 || s == NULL) return;
  /* A new generation first: lookups that start from now on fail. */
  atomic_fetch_add_explicit(&s->gen, 1, memory_order_seq_cst);
  /* Lookups that pinned the slot before may still be reading the object's
   * count: they end in a few instructions. */
  while (atomic_load_explicit(&s->pins, memory_order_seq_cst) != 0) {
  }
  atomic_store_explicit(&s->obj, NULL, memory_order_relaxed);
  atomic_store_explicit(&s->kind, 0, memory_order_release); /* issuable again */
  atomic_fetch_sub(&nlive, 1);
}

/* ======================================================================== */
/* Lookup                                                                    */
/* ======================================================================== */

void *corral__handle_get(uint64_t h, int kind) {
  uint32_t i = (uint32_t)h - 1;
  slot *s = (uint32_t)h == 0 ? NULL : slot_at(i);
  if (s == NULL) return NULL;
  void *obj = NULL;
  atomic_fetch_add_explicit(&s->pins, 1, memory_order_seq_cst);
  if (atomic_load_explicit(&s->gen, memory_order_seq_cst) == (uint32_t)(h >> 32) &&
      atomic_load_explicit(&s->kind, memory_order_acquire) == kind) {
    /* Retain unless the count already reached zero (its free is under way). */
    atomic_int *refs = s->refs;
    int r = atomic_load_explicit(refs, memory_order_relaxed);
    while (r > 0 && !atomic_compare_exchange_weak(refs, &r, r + 1)) {
    }
    if (r > 0) obj = atomic_load_explicit(&s->obj, memory_order_relaxed);
  }
  atomic_fetch_sub_explicit(&s->pins, 1, memory_order_seq_cst);
  return obj;
}

int corral__handle_live(void) { return (int)atomic_load(&nlive); }
