/* context.c: a context's loop: its uv loop, wake-up handle, completion queue.
 *
 * Lock order: future->lock (held by callers of ctx_post), then ctx->qlock.
 * The completion queue is the only state other threads touch; everything
 * else belongs to the loop's thread.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <msgpack.h>

#include "internal.h"

static void on_async(uv_async_t *h) { (void)h; /* the drain runs after uv_run */ }
/* The poll timeout. uv_run(UV_RUN_ONCE) runs due timers before it polls;
 * when this one fires there, uv_stop keeps the poll from blocking with no
 * timer left to end it. */
static void on_timer(uv_timer_t *h) { uv_stop(h->loop); }

int ctx_init(corral_context *c, corral_runtime *rt, lua_State *L) {
  memset(c, 0, sizeof *c);
  c->rt = rt;
  c->L = L;
  queue_init(&c->watching);
  queue_init(&c->completed);
  queue_init(&c->reporters);
  int rc = uv_loop_init(&c->loop);
  if (rc != 0) return rc;
  if ((rc = uv_mutex_init(&c->qlock)) != 0) goto fail_loop;
  if ((rc = uv_async_init(&c->loop, &c->async, on_async)) != 0) goto fail_lock;
  uv_timer_init(&c->loop, &c->timer);
  uv_unref((uv_handle_t *)&c->timer);
  return 0;
fail_lock:
  uv_mutex_destroy(&c->qlock);
fail_loop:
  uv_loop_close(&c->loop);
  return rc;
}

/* ======================================================================== */
/* Completions                                                               */
/* ======================================================================== */

/* How long a loop spins, watching for work, before it parks in the kernel:
 * waking a parked thread costs tens of microseconds; a short spin answers a
 * quick reply at once. */
#define SPIN_NS 30000

void ctx_signal(corral_context *c, int pending) {
  atomic_store(&c->signal, 1);
  /* Sent under qlock so that ctx_close cannot free the handle meanwhile. */
  if (!pending && !c->closed && !atomic_load(&c->spinning)) uv_async_send(&c->async);
}

void ctx_post(corral_watch *w) {
  corral_context *c = w->ctx;
  uv_mutex_lock(&c->qlock);
  /* one wake-up per batch: a non-empty queue already has one on the way */
  int pending = !queue_empty(&c->completed);
  queue_remove(&w->node);
  queue_insert_tail(&c->completed, &w->node);
  ctx_signal(c, pending);
  uv_mutex_unlock(&c->qlock);
}

int ctx_drain(corral_context *c, void (*fn)(void *ud, corral_future *f), void *ud) {
  queue done;
  atomic_store(&c->signal, 0);
  uv_mutex_lock(&c->qlock);
  queue_move(&c->completed, &done);
  uv_mutex_unlock(&c->qlock);
  int n = 0;
  while (!queue_empty(&done)) {
    queue *q = queue_head(&done);
    queue_remove(q);
    corral_watch *w = queue_data(q, corral_watch, node);
    if (fn != NULL) fn(ud, w->f);
    corral_future_release(w->f);
    free(w);
    n++;
  }
  return n;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

/* Spin up to SPIN_NS (less when the timeout is shorter) for posted work.
 * Returns 1 when work came. */
static int spin(corral_context *c, int timeout_ms) {
  uint64_t ns = SPIN_NS;
  if (timeout_ms > 0 && (uint64_t)timeout_ms * 1000000 < ns) ns = (uint64_t)timeout_ms * 1000000;
  atomic_store(&c->spinning, 1);
  uint64_t end = uv_hrtime() + ns;
  int n = 0;
  while (!atomic_load_explicit(&c->signal, memory_order_relaxed)) {
    cpu_relax();
    if (++n % 64 == 0 && uv_hrtime() >= end) break;
  }
  atomic_store(&c->spinning, 0);
  /* a poster that saw us spinning did not wake us: look once more */
  return atomic_load(&c->signal) != 0;
}

void ctx_poll(corral_context *c, int timeout_ms) {
  if (timeout_ms == 0) {
    uv_run(&c->loop, UV_RUN_NOWAIT);
    return;
  }
  if (spin(c, timeout_ms)) {
    uv_run(&c->loop, UV_RUN_NOWAIT); /* other events, without waiting */
    return;
  }
  if (timeout_ms > 0) {
    uv_update_time(&c->loop); /* the cached time may be long stale */
    uv_timer_start(&c->timer, on_timer, (uint64_t)timeout_ms, 0);
  }
  uv_run(&c->loop, UV_RUN_ONCE);
  if (timeout_ms > 0) uv_timer_stop(&c->timer);
}

/* ======================================================================== */
/* SIGINT                                                                    */
/* ======================================================================== */

static atomic_int sigint_count;
static atomic_int sigint_pending;
static _Atomic(uv_async_t *) sigint_async; /* read by the handler, on any thread */

static void on_sigint(int sig) {
  (void)sig;
  if (atomic_fetch_add(&sigint_count, 1) >= 1) _exit(130);
  atomic_store(&sigint_pending, 1);
  if (sigint_async != NULL) uv_async_send(sigint_async); /* async-signal-safe */
}

void ctx_catch_sigint(corral_context *c) {
  sigint_async = &c->async;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigint;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
}

int ctx_take_sigint(void) { return atomic_exchange(&sigint_pending, 0); }

/* ======================================================================== */
/* Reporters and close                                                       */
/* ======================================================================== */

void ctx_report_all(corral_context *c) {
  for (queue *q = queue_head(&c->reporters); q != &c->reporters; q = q->next) {
    corral_reporter *r = queue_data(q, corral_reporter, node);
    if (r->armed) {
      r->armed = 0;
      ssize_t rc = write(2, r->text, r->len);
      (void)rc;
    }
  }
}

static void on_close_walk(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

void ctx_close(corral_context *c, int destroy_lock) {
  if (sigint_async == &c->async) {
    signal(SIGINT, SIG_DFL);
    sigint_async = NULL;
  }
  /* Withdraw every watch; one that a settle already took is being posted
   * and shows up in `completed`, which the drain frees. */
  for (;;) {
    uv_mutex_lock(&c->qlock);
    if (queue_empty(&c->watching)) {
      uv_mutex_unlock(&c->qlock);
      break;
    }
    corral_watch *w = queue_data(queue_head(&c->watching), corral_watch, node);
    corral_future *f = w->f;
    corral_future_retain(f);
    uv_mutex_unlock(&c->qlock);
    future_unwatch(f, w);
    corral_future_release(f);
  }
  ctx_drain(c, NULL, NULL);
  while (!queue_empty(&c->reporters))
    queue_remove(queue_head(&c->reporters));
  uv_mutex_lock(&c->qlock);
  c->closed = 1;
  uv_mutex_unlock(&c->qlock);
  uv_walk(&c->loop, on_close_walk, NULL);
  uv_run(&c->loop, UV_RUN_DEFAULT);
  uv_loop_close(&c->loop);
  if (destroy_lock) uv_mutex_destroy(&c->qlock);
}
