/* context.c: a context's loop: its uv loop, wake-up handle, completion queue.
 *
 * Lock order: future->lock (held by callers of corral__ctx_post), then ctx->qlock,
 * then the home context's qlock (a worker parking tells the home it may be
 * the last one awake; it takes the home's lock only after releasing its own).
 * The completion queue is the only state other threads touch; everything
 * else belongs to the loop's thread, the list of watches included (a watch
 * is posted through its own `done` node, so posting never touches it).
 *
 * Idle accounting: a worker's context that parks with nothing to do (no
 * timer, nothing posted) counts itself out of rt->nbusy; whoever posts to it
 * counts it back in, under its qlock, before signalling. When nbusy is 0 and
 * no host code may settle a future, nothing in the process can make progress
 * any more: the home loop concludes that what it waits on can never settle.
 */
#include <stdlib.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>

#include <msgpack.h>

#include "internal.h"

static void on_async(uv_async_t *h) { (void)h; /* the drain runs after uv_run */ }
/* The poll timeout. uv_run(UV_RUN_ONCE) runs due timers before it polls;
 * when this one fires there, uv_stop keeps the poll from blocking with no
 * timer left to end it. */
static void on_timer(uv_timer_t *h) { uv_stop(h->loop); }

/* The queue lock is held for a few list operations at a time, by a loop and
 * the threads posting to it: where glibc offers it, a contended lock spins a
 * little before it sleeps in the kernel (a futex round trip costs more than
 * the wait). */
static int qlock_init(uv_mutex_t *m) {
#if defined(__GLIBC__) && defined(PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP)
  pthread_mutexattr_t a;
  if (pthread_mutexattr_init(&a) != 0) return UV_ENOMEM;
  pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ADAPTIVE_NP);
  int rc = pthread_mutex_init(m, &a);
  pthread_mutexattr_destroy(&a);
  return -rc; /* (libuv's convention: a negated errno) */
#else
  return uv_mutex_init(m);
#endif
}

int corral__ctx_init(corral_context *c, corral_runtime *rt, lua_State *L) {
  memset(c, 0, sizeof *c);
  c->rt = rt;
  c->L = L;
  queue_init(&c->watching);
  queue_init(&c->completed);
  queue_init(&c->posted);
  queue_init(&c->live);
  queue_init(&c->reporters);
  c->deferred = NULL;
  int rc = uv_loop_init(&c->loop);
  if (rc != 0) return rc;
  if ((rc = qlock_init(&c->qlock)) != 0) goto fail_loop;
  if ((rc = uv_async_init(&c->loop, &c->async, on_async)) != 0) goto fail_lock;
  uv_timer_init(&c->loop, &c->timer);
  uv_unref((uv_handle_t *)&c->timer);
  /* libuv adds a watcher to the epoll set on the loop's next poll: one poll
   * now, so the backend fd becomes readable for a post from the start (a
   * host polls it before its first step) */
  uv_run(&c->loop, UV_RUN_NOWAIT);
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

void corral__ctx_signal(corral_context *c, int pending) {
  atomic_store(&c->signal, 1);
  if (c->idle) { /* counted back in before the poster can park itself */
    c->idle = 0;
    atomic_fetch_add(&c->rt->nbusy, 1);
  }
  /* Sent under qlock so that corral__ctx_close cannot free the handle meanwhile. */
  if (!pending && !c->closed && !atomic_load(&c->spinning)) uv_async_send(&c->async);
}

void corral__ctx_post(corral_watch *w) {
  corral_context *c = w->ctx;
  uv_mutex_lock(&c->qlock);
  /* one wake-up per batch: a non-empty queue already has one on the way */
  int pending = !queue_empty(&c->completed);
  queue_insert_tail(&c->completed, &w->done);
  corral__ctx_signal(c, pending);
  uv_mutex_unlock(&c->qlock);
}

int corral__ctx_drain(corral_context *c, void (*fn)(void *ud, corral_future *f), void *ud) {
  queue done;
  atomic_store(&c->signal, 0);
  uv_mutex_lock(&c->qlock);
  queue_move(&c->completed, &done);
  uv_mutex_unlock(&c->qlock);
  int n = 0;
  while (!queue_empty(&done)) {
    queue *q = queue_head(&done);
    queue_remove(q);
    corral_watch *w = queue_data(q, corral_watch, done);
    queue_remove(&w->node); /* out of `watching` (this thread's own) */
    corral_future *f = w->f;
    if (fn != NULL) fn(ud, f);
    corral__watch_free(w); /* (it may live in f: freed first) */
    corral_future_release(f);
    n++;
  }
  return n;
}

void corral__ctx_post_item(corral_context *c, corral_post *p) {
  uv_mutex_lock(&c->qlock);
  int pending = !queue_empty(&c->completed) || !queue_empty(&c->posted);
  queue_insert_tail(&c->posted, &p->node);
  p->posted = 1;
  corral__ctx_signal(c, pending);
  uv_mutex_unlock(&c->qlock);
}

void corral__ctx_unpost(corral_context *c, corral_post *p) {
  uv_mutex_lock(&c->qlock);
  if (p->posted) {
    queue_remove(&p->node);
    p->posted = 0;
  }
  uv_mutex_unlock(&c->qlock);
}

void corral__ctx_io_begin(corral_context *c, corral_post *p) {
  queue_insert_tail(&c->live, &p->live);
  c->io++;
}

void corral__ctx_io_wake(corral_context *c, corral_post *p) {
  uv_mutex_lock(&c->qlock);
  int posted = p->posted;
  uv_mutex_unlock(&c->qlock);
  if (!posted) corral__ctx_post_item(c, p);
}

void corral__ctx_io_end(corral_context *c, corral_post *p) {
  corral__ctx_unpost(c, p);
  queue_remove(&p->live);
  c->io--;
}

int corral__ctx_drain_posts(corral_context *c, void (*fn)(void *ud, corral_post *p), void *ud) {
  queue done;
  uv_mutex_lock(&c->qlock);
  queue_move(&c->posted, &done);
  for (queue *q = queue_head(&done); q != &done; q = q->next)
    queue_data(q, corral_post, node)->posted = 0;
  uv_mutex_unlock(&c->qlock);
  int n = 0;
  while (!queue_empty(&done)) {
    queue *q = queue_head(&done);
    queue_remove(q);
    fn(ud, queue_data(q, corral_post, node));
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
 * The home loop always does (it waits for replies); a worker only while
 * fewer workers spin than there are CPUs (more would only take the CPUs
 * from the threads that have work). Returns 1 when work came. */
static int spin(corral_context *c, int timeout_ms) {
  atomic_int *nspin = c->worker != NULL ? &c->rt->nspin : NULL;
  if (nspin != NULL &&
      atomic_fetch_add_explicit(nspin, 1, memory_order_relaxed) >= c->rt->spin_max) {
    atomic_fetch_sub_explicit(nspin, 1, memory_order_relaxed);
    return atomic_load(&c->signal) != 0;
  }
  uint64_t ns = SPIN_NS;
  if (timeout_ms > 0 && (uint64_t)timeout_ms * 1000000 < ns) ns = (uint64_t)timeout_ms * 1000000;
  atomic_store(&c->spinning, 1);
  uint64_t end = uv_hrtime() + ns;
  int n = 0;
  while (!atomic_load_explicit(&c->signal, memory_order_relaxed)) {
    cpu_relax();
    if (++n % 64 == 0) {
      if (uv_hrtime() >= end) break;
      /* a thread with work to do, if any waits for this CPU, gets it */
      sched_yield();
    }
  }
  atomic_store(&c->spinning, 0);
  if (nspin != NULL) atomic_fetch_sub_explicit(nspin, 1, memory_order_relaxed);
  /* a poster that saw us spinning did not wake us: look once more */
  return atomic_load(&c->signal) != 0;
}

void corral__ctx_wake_home(corral_runtime *rt) {
  corral_context *h = &rt->home;
  uv_mutex_lock(&h->qlock);
  if (!h->closed) uv_async_send(&h->async);
  uv_mutex_unlock(&h->qlock);
}

/* A worker parks with nothing to do: count it out of rt->nbusy (unless work
 * was posted meanwhile: returns 0, do not block). */
static int park_idle(corral_context *c) {
  uv_mutex_lock(&c->qlock);
  if (atomic_load(&c->signal)) {
    uv_mutex_unlock(&c->qlock);
    return 0;
  }
  c->idle = 1;
  int left = atomic_fetch_sub(&c->rt->nbusy, 1) - 1;
  uv_mutex_unlock(&c->qlock);
  if (left == 0) corral__ctx_wake_home(c->rt); /* it may be waiting on us all */
  return 1;
}

static void unpark_idle(corral_context *c) {
  uv_mutex_lock(&c->qlock);
  if (c->idle) {
    c->idle = 0;
    atomic_fetch_add(&c->rt->nbusy, 1);
  }
  uv_mutex_unlock(&c->qlock);
}

void corral__ctx_poll(corral_context *c, int timeout_ms) {
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
  int idle = timeout_ms < 0 && c->worker != NULL && c->io == 0;
  if (idle && !park_idle(c)) {
    uv_run(&c->loop, UV_RUN_NOWAIT);
    return;
  }
  uv_run(&c->loop, UV_RUN_ONCE);
  if (idle) unpark_idle(c);
  if (timeout_ms > 0) uv_timer_stop(&c->timer);
}

/* Whether a worker that is not parked idle was not asked to stop. */
static int busy_running_worker(corral_runtime *rt) {
  int found = 0;
  uv_mutex_lock(&rt->wlock);
  for (queue *q = queue_head(&rt->workers); q != &rt->workers && !found; q = q->next) {
    corral_worker *w = queue_data(q, corral_worker, rt_node);
    if (corral_future_state(w->stopped) >= CORRAL_DONE) continue;
    uv_mutex_lock(&w->ctx.qlock);
    int st = atomic_load(&w->stopping);
    /* a worker stopped because its handles went still runs its calls */
    found = !w->ctx.idle && (st == WORKER_RUNNING || (st == WORKER_DRAIN && w->orphan_stop));
    uv_mutex_unlock(&w->ctx.qlock);
  }
  uv_mutex_unlock(&rt->wlock);
  return found;
}

int corral__ctx_quiescent(corral_context *c) {
  corral_runtime *rt = c->rt;
  if (rt->hc != NULL && atomic_load(&rt->hc->pending) != 0) return 0;
  uv_mutex_lock(&c->qlock);
  int empty = queue_empty(&c->completed) && queue_empty(&c->posted);
  uv_mutex_unlock(&c->qlock);
  if (!empty || c->deferred != NULL || c->io > 0) return 0;
  if (atomic_load(&rt->nbusy) == 0) return 1;
  return busy_running_worker(rt) ? 0 : 2;
}

/* ======================================================================== */
/* Work deferred by the collector                                            */
/* ======================================================================== */

void corral__ctx_defer(corral_context *c, corral_future *f) {
  corral_deferred *d = malloc(sizeof *d);
  if (d == NULL) { /* cannot record it: at least give the reference back */
    corral_future_release(f);
    return;
  }
  d->f = f;
  d->next = c->deferred;
  c->deferred = d;
}

void corral__ctx_run_deferred(corral_context *c, const char *kind, const char *message) {
  while (c->deferred != NULL) {
    corral_deferred *d = c->deferred;
    c->deferred = d->next;
    if (corral_future_state(d->f) < CORRAL_DONE) corral__future_set_error(d->f, kind, message);
    corral_future_release(d->f);
    free(d);
  }
}

/* ======================================================================== */
/* Reporters and close                                                       */
/* ======================================================================== */

/* A string field of a MessagePack map, or NULL. */
static const msgpack_object *map_get(const msgpack_object *m, const char *key) {
  if (m->type != MSGPACK_OBJECT_MAP) return NULL;
  size_t kl = strlen(key);
  for (uint32_t i = 0; i < m->via.map.size; i++) {
    const msgpack_object *k = &m->via.map.ptr[i].key;
    if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == kl &&
        memcmp(k->via.str.ptr, key, kl) == 0)
      return &m->via.map.ptr[i].val;
  }
  return NULL;
}

static void say(const char *s, size_t n) {
  ssize_t rc = write(2, s, n);
  (void)rc;
}

static void put_field(const msgpack_object *o, const char *after) {
  if (o == NULL || o->type != MSGPACK_OBJECT_STR) return;
  say(o->via.str.ptr, o->via.str.size);
  say(after, strlen(after));
}

/* Write `head` and the error in an encoded payload (kind, message,
 * traceback) to stderr. No Lua, no lock: a __gc may call it. */
void corral__report_payload(const char *head, const char *payload, size_t len) {
  msgpack_unpacked u;
  msgpack_unpacked_init(&u);
  size_t off = 0;
  say(head, strlen(head));
  if (payload != NULL && msgpack_unpack_next(&u, payload, len, &off) == MSGPACK_UNPACK_SUCCESS) {
    const msgpack_object *e = &u.data;
    if (e->type == MSGPACK_OBJECT_ARRAY && e->via.array.size > 0) e = &e->via.array.ptr[0];
    if (e->type == MSGPACK_OBJECT_STR) {
      put_field(e, "\n");
    } else {
      put_field(map_get(e, "kind"), ": ");
      put_field(map_get(e, "message"), "\n");
      put_field(map_get(e, "traceback"), "\n");
    }
  } else {
    say("(unreadable)\n", 13);
  }
  msgpack_unpacked_destroy(&u);
}

/* At close, with no Lua left to see it: a failed future that no Lua side
 * ever saw is reported from its payload. */
static void report_unseen(void *ud, corral_future *f) {
  (void)ud;
  if (corral_future_state(f) != CORRAL_FAILED || (atomic_load(&f->flags) & FUTURE_SEEN) ||
      corral__future_reported_elsewhere(f))
    return;
  corral__report_payload("corral: unretrieved error in a call: ", f->payload, f->len);
}

static void on_close_walk(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

void corral__ctx_close(corral_context *c, int destroy_lock) {
  corral__signal_release(c);
  /* Withdraw every watch; one that a settle already took is being posted
   * and shows up in `completed`, which the drain frees. */
  while (!queue_empty(&c->watching)) {
    corral_watch *w = queue_data(queue_head(&c->watching), corral_watch, node);
    corral_future *f = w->f;
    corral_future_retain(f);
    corral__future_unwatch(f, w); /* takes it out of `watching` */
    corral_future_release(f);
  }
  corral__ctx_drain(c, c->worker == NULL ? report_unseen : NULL, NULL);
  /* what its Lua side held of sync primitives: withdrawn, grants given back */
  while (!queue_empty(&c->live)) {
    corral_post *p = queue_data(queue_head(&c->live), corral_post, live);
    p->drop(p); /* (takes it out of `live` and `posted`) */
  }
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
