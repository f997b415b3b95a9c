/* future.c: the thread-safe future: state machine, payload, watches, foreign waits.
 *
 * Lock order: future->lock, then context->qlock (taken by the watch's post), then
 * the foreign-wait lock. A future's state is written only under its lock and
 * may be read anywhere with an acquire load.
 *
 * Cancel rule: a PENDING future can always be cancelled; a RUNNING one only
 * while its work is suspended at a wait (`corral__future_suspend`), where the worker
 * will see the cancel when it resumes (`corral__future_resume`), or when its work
 * can be stopped from outside (FUTURE_HARD: a process worker's call, whose process
 * is ended if it does not stop by itself). Cancelling other work that is executing
 * is refused (CORRAL_ESTATE), as uv_cancel refuses with EBUSY.
 *
 * Host futures: a future that C code outside corral may settle (made by
 * corral_future_new, or handed to C through corral_to_future /
 * corral_push_future) counts in its runtime's host count while it is pending,
 * so that that runtime never concludes that nothing can settle what it waits
 * on.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

/* Foreign threads that block in corral_future_wait share one condition;
 * settles broadcast it only when someone waits. */
static pthread_mutex_t wait_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wait_cond;
static pthread_once_t wait_once = PTHREAD_ONCE_INIT;
static atomic_int wait_count;
static int sleepers;    /* threads inside pthread_cond_wait (under wait_lock) */
static atomic_int live; /* futures alive, for leak specs */

static void wait_init(void) {
  pthread_condattr_t a;
  pthread_condattr_init(&a);
  pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
  pthread_cond_init(&wait_cond, &a);
  pthread_condattr_destroy(&a);
}

/* ======================================================================== */
/* Life                                                                      */
/* ======================================================================== */

corral_future *corral__future_new(void) {
  corral_future *f = calloc(1, sizeof *f);
  if (f == NULL) return NULL;
  atomic_init(&f->refs, 1);
  atomic_init(&f->state, CORRAL_PENDING);
  atomic_init(&f->flags, 0);
  if (uv_mutex_init(&f->lock) != 0) {
    free(f);
    return NULL;
  }
  atomic_fetch_add_explicit(&live, 1, memory_order_relaxed);
  return f;
}

corral_future *corral_future_new(corral_runtime *rt) {
  /* (futures are independent of their runtime's life: the count is not) */
  corral_future *f = corral__future_new();
  if (f != NULL) corral__future_mark_host(f, rt != NULL ? rt->hc : NULL);
  return f;
}

corral__host_count *corral__host_count_new(void) {
  corral__host_count *hc = malloc(sizeof *hc);
  if (hc == NULL) return NULL;
  atomic_init(&hc->pending, 0);
  atomic_init(&hc->refs, 1);
  return hc;
}

void corral__host_count_release(corral__host_count *hc) {
  if (hc != NULL && atomic_fetch_sub_explicit(&hc->refs, 1, memory_order_acq_rel) == 1) free(hc);
}

void corral__future_mark_host(corral_future *f, corral__host_count *hc) {
  uv_mutex_lock(&f->lock);
  if (!(atomic_load_explicit(&f->flags, memory_order_relaxed) & FUTURE_HOST)) {
    atomic_fetch_or(&f->flags, FUTURE_HOST);
    if (hc != NULL) {
      atomic_fetch_add(&hc->refs, 1);
      f->hc = hc;
    }
    if (f->hc != NULL && atomic_load_explicit(&f->state, memory_order_relaxed) < CORRAL_DONE)
      atomic_fetch_add(&f->hc->pending, 1);
  }
  uv_mutex_unlock(&f->lock);
}

void corral_future_retain(corral_future *f) {
  atomic_fetch_add_explicit(&f->refs, 1, memory_order_relaxed);
}

void corral__future_add_dep(corral_future *f) {
  corral_future_retain(f);
  atomic_fetch_add(&f->deps, 1);
}

void corral__future_drop_dep(corral_future *f) {
  if (f == NULL) return;
  atomic_fetch_sub(&f->deps, 1);
  corral_future_release(f);
}

void corral__future_carried(corral_future *f) { atomic_fetch_or(&f->flags, FUTURE_CARRIED); }

int corral__future_reported_elsewhere(corral_future *f) {
  return (atomic_load(&f->flags) & FUTURE_CARRIED) || atomic_load(&f->deps) > 0;
}

void corral_future_release(corral_future *f) {
  if (f == NULL || atomic_fetch_sub_explicit(&f->refs, 1, memory_order_acq_rel) != 1) return;
  /* a host future dropped unsettled: no one can settle it any more */
  if ((atomic_load(&f->flags) & FUTURE_HOST) && f->hc != NULL &&
      atomic_load(&f->state) < CORRAL_DONE)
    atomic_fetch_sub(&f->hc->pending, 1);
  corral__host_count_release(f->hc);
  uint64_t h = atomic_load_explicit(&f->handle, memory_order_acquire);
  if (h != 0) corral__handle_free(h); /* lock-free: a __gc may get here */
  atomic_fetch_sub_explicit(&live, 1, memory_order_relaxed);
  uv_mutex_destroy(&f->lock);
  if (f->discard != NULL) f->discard(f->payload, f->len);
  free(f->payload);
  free(f);
}

uint64_t corral__future_handle(corral_future *f) {
  return corral__handle_of(&f->handle, f, HANDLE_FUTURE, &f->refs);
}

int corral__future_live(void) { return atomic_load_explicit(&live, memory_order_relaxed); }

corral_state corral_future_state(corral_future *f) {
  return (corral_state)atomic_load_explicit(&f->state, memory_order_acquire);
}

/* ======================================================================== */
/* State changes                                                             */
/* ======================================================================== */

int corral__future_start(corral_future *f) {
  int rc = CORRAL_ESTATE;
  uv_mutex_lock(&f->lock);
  if (atomic_load_explicit(&f->state, memory_order_relaxed) == CORRAL_PENDING) {
    atomic_store_explicit(&f->state, CORRAL_RUNNING, memory_order_release);
    rc = 0;
  }
  uv_mutex_unlock(&f->lock);
  return rc;
}

int corral__future_suspend(corral_future *f) {
  int rc = CORRAL_ESTATE;
  uv_mutex_lock(&f->lock);
  if (atomic_load_explicit(&f->state, memory_order_relaxed) == CORRAL_RUNNING) {
    f->suspended = 1;
    rc = 0;
  }
  uv_mutex_unlock(&f->lock);
  return rc;
}

int corral__future_resume(corral_future *f) {
  uv_mutex_lock(&f->lock);
  f->suspended = 0;
  int rc =
      atomic_load_explicit(&f->state, memory_order_relaxed) == CORRAL_RUNNING ? 0 : CORRAL_ESTATE;
  uv_mutex_unlock(&f->lock);
  return rc;
}

/* Settle f unless it is already final (or, with `cancel`, unless the cancel
 * rule at the top of this file allows it). `foreign`: the payload comes from
 * host code, not from corral's encoder. */
static int settle(corral_future *f, int state, char *payload, size_t len,
                  void (*discard)(const char *, size_t), int cancel, int foreign) {
  uv_mutex_lock(&f->lock);
  int s = atomic_load_explicit(&f->state, memory_order_relaxed);
  if (s >= CORRAL_DONE ||
      (cancel && s == CORRAL_RUNNING && !f->suspended &&
       !(atomic_load_explicit(&f->flags, memory_order_relaxed) & FUTURE_HARD))) {
    uv_mutex_unlock(&f->lock);
    if (discard != NULL) discard(payload, len);
    free(payload);
    return CORRAL_ESTATE;
  }
  f->payload = payload;
  f->len = len;
  f->discard = discard;
  if ((atomic_load_explicit(&f->flags, memory_order_relaxed) & FUTURE_HOST) && f->hc != NULL)
    atomic_fetch_sub(&f->hc->pending, 1);
  f->payload_trust = foreign;
  corral_watch *w = f->watches;
  f->watches = NULL;
  atomic_store_explicit(&f->state, state, memory_order_seq_cst);
  /* Post under the future's lock so that corral__future_unwatch, which also takes
   * it, sees every watch either still linked or already posted. */
  while (w != NULL) {
    corral_watch *next = w->next;
    w->post(w);
    w = next;
  }
  uv_mutex_unlock(&f->lock);
  if (atomic_load_explicit(&wait_count, memory_order_seq_cst) > 0) {
    pthread_mutex_lock(&wait_lock);
    pthread_cond_broadcast(&wait_cond);
    pthread_mutex_unlock(&wait_lock);
  }
  return 0;
}

int corral__future_cancel(corral_future *f) {
  return settle(f, CORRAL_CANCELLED, NULL, 0, NULL, 1, 0);
}

int corral__future_settle(corral_future *f, corral_state state, char *payload, size_t len) {
  return settle(f, (int)state, payload, len, NULL, 0, 0);
}

int corral__future_settle_refs(corral_future *f, corral_state state, char *payload, size_t len,
                               void (*discard)(const char *payload, size_t len)) {
  return settle(f, (int)state, payload, len, discard, 0, 0);
}

/* A task's future the host holds is settled by its task (and by corral
 * when the runtime closes), not by the host. */
static int owned(corral_future *f) { return (atomic_load(&f->flags) & FUTURE_OWNED) != 0; }

int corral__future_settle_foreign(corral_future *f, char *payload, size_t len) {
  if (owned(f)) {
    free(payload);
    return CORRAL_ESTATE;
  }
  /* the host's own MessagePack: decoded as foreign bytes */
  return settle(f, CORRAL_DONE, payload, len, NULL, 0, CODEC_FOREIGN);
}

int corral__future_settle_trust(corral_future *f, corral_state state, char *payload, size_t len,
                                int trust) {
  return settle(f, (int)state, payload, len, NULL, 0, trust);
}

/* An error travels as a MessagePack map {kind=..., message=...}. */
static size_t put_str(char *p, const char *s, size_t n) {
  size_t h;
  if (n < 32) {
    p[0] = (char)(0xa0 | n);
    h = 1;
  } else {
    p[0] = (char)0xdb;
    p[1] = (char)(n >> 24);
    p[2] = (char)(n >> 16);
    p[3] = (char)(n >> 8);
    p[4] = (char)n;
    h = 5;
  }
  memcpy(p + h, s, n);
  return h + n;
}

char *corral__future_error_payload(const char *kind, const char *message, size_t *len) {
  size_t kn = strlen(kind), mn = strlen(message);
  char *buf = malloc(1 + 5 + 4 + 5 + kn + 5 + 7 + 5 + mn);
  if (buf == NULL) return NULL;
  size_t n = 0;
  buf[n++] = (char)0x82; /* fixmap of 2 */
  n += put_str(buf + n, "kind", 4);
  n += put_str(buf + n, kind, kn);
  n += put_str(buf + n, "message", 7);
  n += put_str(buf + n, message, mn);
  *len = n;
  return buf;
}

int corral_future_set_error(corral_future *f, const char *kind, const char *message) {
  if (f != NULL && owned(f)) return CORRAL_ESTATE;
  return corral__future_set_error(f, kind, message);
}

int corral__future_set_error(corral_future *f, const char *kind, const char *message) {
  if (f == NULL || kind == NULL || message == NULL) return CORRAL_EINVAL;
  size_t n;
  char *buf = corral__future_error_payload(kind, message, &n);
  if (buf == NULL) return CORRAL_ENOMEM;
  return corral__future_settle(f, CORRAL_FAILED, buf, n);
}

int corral_future_cancel(corral_future *f) {
  if (f == NULL) return CORRAL_EINVAL;
  return corral__future_cancel(f);
}

int corral__future_trust(corral_future *f) { return f->payload_trust; }

int corral__future_settle_peer(corral_future *f, corral_state state, char *payload, size_t len) {
  return settle(f, state, payload, len, NULL, 0, CODEC_PEER);
}

int corral__future_settle_peer_shm(corral_future *f, corral_state state, char *payload, size_t len,
                                   void (*discard)(const char *payload, size_t len)) {
  return settle(f, state, payload, len, discard, 0, CODEC_PEER | CODEC_SHM);
}

int corral_future_payload(corral_future *f, const void **mp, size_t *len) {
  if (f == NULL || mp == NULL || len == NULL) return CORRAL_EINVAL;
  if (corral_future_state(f) < CORRAL_DONE) return CORRAL_ESTATE;
  *mp = f->payload;
  *len = f->len;
  return 0;
}

/* ======================================================================== */
/* Watches and waits                                                         */
/* ======================================================================== */

int corral__future_watch(corral_future *f, corral_context *ctx, void (*post)(corral_watch *w)) {
  uv_mutex_lock(&f->lock);
  if (atomic_load_explicit(&f->state, memory_order_relaxed) >= CORRAL_DONE) {
    uv_mutex_unlock(&f->lock);
    return 1;
  }
  /* the first watch is the future's own slot (most futures have one
   * watcher: no allocation); it serves once */
  corral_watch *w = &f->first;
  if (f->first_used) {
    w = malloc(sizeof *w);
  } else {
    f->first_used = 1;
  }
  if (w == NULL) {
    uv_mutex_unlock(&f->lock);
    return CORRAL_ENOMEM;
  }
  corral_future_retain(f);
  w->ctx = ctx;
  w->post = post;
  w->f = f;
  w->next = f->watches;
  f->watches = w;
  uv_mutex_unlock(&f->lock);
  /* the context's own list: only its thread (this one) touches it, so a
   * settle on another thread never waits for this loop's lock to post */
  queue_insert_tail(&ctx->watching, &w->node);
  return 0;
}

int corral__future_unwatch(corral_future *f, corral_watch *w) {
  int found = 0;
  uv_mutex_lock(&f->lock);
  for (corral_watch **p = &f->watches; *p != NULL; p = &(*p)->next) {
    if (*p == w) {
      *p = w->next;
      found = 1;
      break;
    }
  }
  uv_mutex_unlock(&f->lock);
  /* withdrawn either way (one a settle took is in `completed`: the drain
   * frees it) */
  queue_remove(&w->node);
  if (found) {
    corral__watch_free(w);
    corral_future_release(f);
  }
  return found;
}

void corral__watch_free(corral_watch *w) {
  if (w != &w->f->first) free(w);
}

int corral_future_wait(corral_future *f, double timeout) {
  if (f == NULL) return CORRAL_EINVAL;
  if (corral_future_state(f) >= CORRAL_DONE) return 0;
  pthread_once(&wait_once, wait_init);
  struct timespec until;
  if (timeout >= 0) {
    clock_gettime(CLOCK_MONOTONIC, &until);
    long long ns = until.tv_nsec + (long long)(timeout * 1e9);
    until.tv_sec += (time_t)(ns / 1000000000LL);
    until.tv_nsec = (long)(ns % 1000000000LL);
  }
  int rc = 0;
  atomic_fetch_add_explicit(&wait_count, 1, memory_order_seq_cst);
  pthread_mutex_lock(&wait_lock);
  while (corral_future_state(f) < CORRAL_DONE) {
    sleepers++;
    int w = timeout < 0 ? pthread_cond_wait(&wait_cond, &wait_lock)
                        : pthread_cond_timedwait(&wait_cond, &wait_lock, &until);
    sleepers--;
    if (w == ETIMEDOUT) {
      if (corral_future_state(f) < CORRAL_DONE) rc = CORRAL_ETIMEDOUT;
      break;
    }
  }
  pthread_mutex_unlock(&wait_lock);
  atomic_fetch_sub_explicit(&wait_count, 1, memory_order_seq_cst);
  return rc;
}

int corral__future_sleepers(void) {
  pthread_once(&wait_once, wait_init);
  pthread_mutex_lock(&wait_lock);
  int n = sleepers;
  pthread_mutex_unlock(&wait_lock);
  return n;
}
