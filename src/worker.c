/* worker.c: thread worker instances: their threads, bounded inboxes, stop and join.
 *
 * Lock order: rt->wlock, then a worker's ctx.qlock. Futures are never
 * settled under ctx.qlock (settling takes future->lock, then the watching
 * context's qlock): space waiters are settled after it is released.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* ======================================================================== */
/* Calls                                                                     */
/* ======================================================================== */

corral_call *call_new(const char *method, corral_future *result, char *payload, size_t len,
                      int refs, corral_future **deps, int ndeps) {
  size_t mlen = strlen(method);
  corral_call *c = malloc(sizeof *c + mlen + 1);
  if (c == NULL) return NULL;
  memcpy(c->method, method, mlen + 1);
  c->result = result;
  c->payload = payload;
  c->len = len;
  c->payload_refs = refs;
  c->deps = deps;
  c->ndeps = ndeps;
  c->taken = 0;
  queue_init(&c->node);
  return c;
}

void call_free(corral_call *c) {
  if (c == NULL) return;
  if (c->payload_refs) codec_discard(c->payload, c->len);
  free(c->payload);
  for (int i = 0; i < c->ndeps; i++)
    corral_future_release(c->deps[i]);
  free(c->deps);
  corral_future_release(c->result);
  free(c);
}

/* ======================================================================== */
/* Life                                                                      */
/* ======================================================================== */

static void cancel_all(corral_worker *w, queue *q) {
  while (!queue_empty(q)) {
    corral_call *c = queue_data(queue_head(q), corral_call, node);
    queue_remove(&c->node);
    future_settle(c->result, CORRAL_CANCELLED, NULL, 0);
    atomic_fetch_sub(&w->active, 1);
    call_free(c);
  }
}

static void worker_thread(void *arg) {
  corral_worker *w = arg;
  lcore_worker_main(w); /* returns when the worker has stopped, or died */
  /* Whatever its Lua left unfinished is cancelled, and so is what is left in
   * the inbox; callers waiting for room are let go; what comes is refused. */
  cancel_all(w, &w->taken);
  worker_stop(w, WORKER_CANCEL);
  queue left;
  uv_mutex_lock(&w->ctx.qlock);
  queue_move(&w->inbox, &left);
  w->queued = 0;
  uv_mutex_unlock(&w->ctx.qlock);
  cancel_all(w, &left);
  ctx_close(&w->ctx, 0);
  future_settle(w->stopped, CORRAL_DONE, NULL, 0);
}

corral_worker *worker_start(corral_runtime *rt, const char *name, char *boot, size_t len, int refs,
                            int cap) {
  corral_worker *w = calloc(1, sizeof *w);
  if (w == NULL) return NULL;
  atomic_init(&w->refs, 2); /* the caller's and the runtime's (until joined) */
  w->rt = rt;
  w->boot = boot;
  w->bootlen = len;
  w->boot_refs = refs;
  queue_init(&w->taken);
  w->cap = cap > 0 ? cap : 1;
  queue_init(&w->inbox);
  snprintf(w->name, sizeof w->name, "%s", name);
  w->stopped = corral_future_new(rt);
  if (w->stopped == NULL || ctx_init(&w->ctx, rt, NULL) != 0) {
    corral_future_release(w->stopped);
    free(w);
    return NULL;
  }
  w->ctx.worker = w;
  uv_mutex_lock(&rt->wlock);
  queue_insert_tail(&rt->workers, &w->rt_node);
  uv_mutex_unlock(&rt->wlock);
  if (uv_thread_create(&w->thread, worker_thread, w) != 0) {
    uv_mutex_lock(&rt->wlock);
    queue_remove(&w->rt_node);
    w->joined = 1;
    uv_mutex_unlock(&rt->wlock);
    ctx_close(&w->ctx, 1);
    corral_future_release(w->stopped);
    free(w);
    return NULL;
  }
  return w;
}

void worker_retain(corral_worker *w) {
  atomic_fetch_add_explicit(&w->refs, 1, memory_order_relaxed);
}

uint64_t worker_handle(corral_worker *w) {
  uint64_t h = atomic_load_explicit(&w->handle, memory_order_acquire);
  if (h != 0) return h;
  h = handle_new(w, HANDLE_WORKER, &w->refs);
  uint64_t none = 0;
  if (h != 0 && !atomic_compare_exchange_strong(&w->handle, &none, h)) {
    handle_free(h); /* another thread issued one first */
    h = none;
  }
  return h;
}

void worker_release(corral_worker *w) {
  if (w == NULL || atomic_fetch_sub_explicit(&w->refs, 1, memory_order_acq_rel) != 1) return;
  /* The last reference: the thread was joined (the runtime holds one until
   * then). clang-analyzer cannot follow the count: */
  /* NOLINTBEGIN(clang-analyzer-unix.Malloc) */
  uint64_t h = atomic_load_explicit(&w->handle, memory_order_acquire);
  if (h != 0) handle_free(h); /* lock-free: a __gc may get here */
  uv_mutex_destroy(&w->ctx.qlock);
  for (int i = 0; i < w->nspace; i++)
    corral_future_release(w->space[i]);
  free(w->space);
  if (w->boot_refs) codec_discard(w->boot, w->bootlen);
  free(w->boot);
  corral_future_release(w->stopped);
  free(w);
  /* NOLINTEND(clang-analyzer-unix.Malloc) */
}

/* ======================================================================== */
/* The inbox                                                                 */
/* ======================================================================== */

int worker_push(corral_worker *w, corral_call *c) {
  uv_mutex_lock(&w->ctx.qlock);
  if (w->stopping) {
    uv_mutex_unlock(&w->ctx.qlock);
    return CORRAL_ECLOSED;
  }
  if (w->queued >= w->cap) {
    uv_mutex_unlock(&w->ctx.qlock);
    return CORRAL_EAGAIN;
  }
  int pending = !queue_empty(&w->inbox);
  queue_insert_tail(&w->inbox, &c->node);
  w->queued++;
  atomic_fetch_add(&w->active, 1);
  /* one wake-up per batch: a non-empty inbox has one on the way */
  ctx_signal(&w->ctx, pending);
  uv_mutex_unlock(&w->ctx.qlock);
  return 0;
}

int worker_wait_space(corral_worker *w, corral_future *f) {
  int rc = 1;
  uv_mutex_lock(&w->ctx.qlock);
  if (!w->stopping && w->queued >= w->cap) {
    if (w->nspace == w->capspace) {
      int cap = w->capspace ? w->capspace * 2 : 4;
      corral_future **s = realloc(w->space, sizeof(corral_future *) * (size_t)cap);
      if (s == NULL) {
        uv_mutex_unlock(&w->ctx.qlock);
        return 1;
      }
      w->space = s;
      w->capspace = cap;
    }
    corral_future_retain(f);
    w->space[w->nspace++] = f;
    rc = 0;
  }
  uv_mutex_unlock(&w->ctx.qlock);
  return rc;
}

int worker_take(corral_worker *w, corral_call **out, int max, int *stopping) {
  int n = 0, nspace = 0;
  corral_future *stack_space[16], **space = stack_space;
  uv_mutex_lock(&w->ctx.qlock);
  while (n < max && !queue_empty(&w->inbox)) {
    corral_call *c = queue_data(queue_head(&w->inbox), corral_call, node);
    queue_remove(&c->node);
    queue_insert_tail(&w->taken, &c->node); /* the worker's thread owns it now */
    c->taken = 1;
    out[n++] = c;
  }
  w->queued -= n;
  *stopping = w->stopping;
  if (n > 0 && w->nspace > 0) {
    /* hand the waiters over; settled below, outside the lock */
    if (w->nspace <= 16) {
      memcpy(stack_space, w->space, sizeof(corral_future *) * (size_t)w->nspace);
    } else {
      space = w->space;
      w->space = NULL;
      w->capspace = 0;
    }
    nspace = w->nspace;
    w->nspace = 0;
  }
  uv_mutex_unlock(&w->ctx.qlock);
  for (int i = 0; i < nspace; i++) {
    future_settle(space[i], CORRAL_DONE, NULL, 0);
    corral_future_release(space[i]);
  }
  if (space != stack_space) free(space);
  return n;
}

void worker_stop(corral_worker *w, int how) {
  uv_mutex_lock(&w->ctx.qlock);
  if (w->stopping < how) {
    w->stopping = how;
    ctx_signal(&w->ctx, 0);
  }
  /* callers waiting for room will find the worker closed */
  int nspace = w->nspace;
  corral_future **space = w->space;
  w->space = NULL;
  w->nspace = w->capspace = 0;
  uv_mutex_unlock(&w->ctx.qlock);
  for (int i = 0; i < nspace; i++) {
    future_settle(space[i], CORRAL_DONE, NULL, 0);
    corral_future_release(space[i]);
  }
  free(space);
}

void worker_join(corral_worker *w) {
  corral_runtime *rt = w->rt;
  uv_mutex_lock(&rt->wlock);
  int joined = w->joined;
  w->joined = 1;
  if (!joined) queue_remove(&w->rt_node);
  uv_mutex_unlock(&rt->wlock);
  if (joined) return;
  uv_thread_join(&w->thread);
  worker_release(w); /* the runtime's reference */
}

void worker_close_all(corral_runtime *rt) {
  for (;;) {
    uv_mutex_lock(&rt->wlock);
    if (queue_empty(&rt->workers)) {
      uv_mutex_unlock(&rt->wlock);
      return;
    }
    corral_worker *w = queue_data(queue_head(&rt->workers), corral_worker, rt_node);
    worker_retain(w);
    uv_mutex_unlock(&rt->wlock);
    worker_stop(w, WORKER_CANCEL);
    worker_join(w);
    worker_release(w);
  }
}
