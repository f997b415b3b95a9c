/* worker.c: the worker core: calls, an instance's bounded inbox and its
 * overflow, ordering, backpressure, stop, crash, handles and orphans, join.
 * How an instance's context is reached is its transport's (beneath: today
 * transport_thread.c).
 *
 * Lock order: rt->wlock, then a worker's ctx.qlock. Futures are never
 * settled under ctx.qlock (settling takes future->lock, then the watching
 * context's qlock): the callers' `accepted` futures are settled after it is
 * released.
 *
 * A call's life: pushed onto the inbox (queued); or, when the inbox is full,
 * onto the overflow, where it waits in order while its caller is suspended
 * until it moves into the inbox (`accepted`: backpressure; the call is the
 * worker's already, so a stop drains or cancels it like any other); taken
 * by the worker's Lua in batches (taken: still cancellable, the caller's
 * cancel settles its future and the worker skips it); started (RUNNING:
 * corral__future_start); finished by the worker settling its future. When the
 * context ends, what it had taken and what is left in the inbox and the
 * overflow is cancelled (a stop) or failed with the crash error (it died).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* ======================================================================== */
/* Calls                                                                     */
/* ======================================================================== */

/* Arguments up to this size travel inside the call's own block (one
 * allocation per call, freed by the worker, instead of two). */
#define CALL_INLINE_MAX 512

corral_call *corral__call_new(const char *method, size_t mlen, corral_future *result, char *payload,
                              size_t len, int refs, corral_future **deps, int ndeps) {
  int inl = len <= CALL_INLINE_MAX;
  corral_call *c = malloc(sizeof *c + mlen + 1 + (inl ? len : 0));
  if (c == NULL) return NULL;
  memcpy(c->method, method, mlen);
  c->method[mlen] = '\0';
  c->mlen = mlen;
  c->result = result;
  c->payload_inline = inl;
  if (inl) { /* (the references it holds are the copy's now) */
    c->payload = c->method + mlen + 1;
    memcpy(c->payload, payload, len);
    free(payload);
  } else {
    c->payload = payload;
  }
  c->len = len;
  c->payload_refs = refs;
  c->deps = deps;
  c->ndeps = ndeps;
  c->taken = 0;
  c->accepted = NULL;
  c->wire_id = 0;
  c->wire_state = 0;
  c->tries = 0;
  c->unsent = 0;
  queue_init(&c->node);
  return c;
}

void corral__call_drop_payload(corral_call *c) {
  if (c->payload_inline) {
    if (c->payload != NULL && c->payload_refs) corral__codec_discard(c->payload, c->len);
  } else {
    corral__codec_free(c->payload, c->len, c->payload_refs);
  }
  c->payload = NULL;
  c->len = 0;
  c->payload_refs = 0;
}

void corral__call_free(corral_call *c) {
  if (c == NULL) return;
  corral__call_drop_payload(c);
  for (int i = 0; i < c->ndeps; i++)
    corral__future_drop_dep(c->deps[i]);
  free(c->deps);
  corral_future_release(c->result);
  free(c);
}

/* ======================================================================== */
/* Life                                                                      */
/* ======================================================================== */

/* Settle every call of q: cancelled, or failed with a copy of `crash`; its
 * caller, if it still waits for room, is let go. */
static void settle_all(corral_worker *w, queue *q, const char *crash, size_t crashlen) {
  while (!queue_empty(q)) {
    corral_call *c = queue_data(queue_head(q), corral_call, node);
    queue_remove(&c->node);
    if (c->accepted != NULL) {
      corral__future_settle(c->accepted, CORRAL_DONE, NULL, 0);
      corral_future_release(c->accepted);
      c->accepted = NULL;
    }
    /* in a process worker's child, a call that had not started when its
     * instance died is cancelled: the parent gives it to the next process */
    const char *why = crash;
    if (why != NULL && w->rt->child && corral_future_state(c->result) == CORRAL_PENDING) why = NULL;
    char *copy = why != NULL ? malloc(crashlen) : NULL;
    if (why != NULL) atomic_store(&w->crash_carried, 1);
    if (copy != NULL) {
      memcpy(copy, why, crashlen);
      corral__future_settle(c->result, CORRAL_FAILED, copy, crashlen);
    } else if (why != NULL) {
      corral_future_set_error(c->result, "WorkerCrashed", "the worker died (out of memory)");
    } else {
      corral__future_settle(c->result, CORRAL_CANCELLED, NULL, 0);
    }
    atomic_fetch_sub(&w->active, 1);
    corral__call_free(c);
  }
}

/* The instance's context has ended (its transport says so): whatever its
 * Lua left unfinished is cancelled (or failed, when it died), and so is what
 * is left in the inbox and the overflow (their callers are let go); what
 * comes is refused; it counts as busy no more. */
static void worker_ended(corral_worker *w) {
  corral__worker_stop(w, WORKER_CANCEL);
  queue left, over;
  uv_mutex_lock(&w->ctx.qlock);
  queue_move(&w->inbox, &left);
  queue_move(&w->overflow, &over);
  w->queued = 0;
  const char *crash = w->crash;
  size_t crashlen = w->crashlen;
  uv_mutex_unlock(&w->ctx.qlock);
  corral__worker_set_current(w, "", 0);
  settle_all(w, &w->taken, crash, crashlen);
  settle_all(w, &left, crash, crashlen);
  settle_all(w, &over, crash, crashlen);
  corral__ctx_close(&w->ctx, 0);
  /* Said stopped first, so that whoever waits for it has a completion
   * posted before this thread counts as busy no more (the home may then be
   * the last one awake). w may be freed as soon as it is settled. */
  corral_runtime *rt = w->rt;
  corral__future_settle(w->stopped, CORRAL_DONE, NULL, 0);
  if (atomic_fetch_sub(&rt->nbusy, 1) == 1) corral__ctx_wake_home(rt);
}

/* A worker's memory and context, its thread not started: one reference
 * (the caller's), no handle, not one of the runtime's workers yet. */
static corral_worker *worker_new(corral_runtime *rt, const char *name, int *err) {
  *err = CORRAL_ENOMEM;
  corral_worker *w = calloc(1, sizeof *w);
  if (w == NULL) return NULL;
  atomic_init(&w->refs, 1);
  atomic_init(&w->handles, 0);
  atomic_init(&w->stopping, WORKER_RUNNING);
  w->rt = rt;
  queue_init(&w->taken);
  w->cap = 1;
  queue_init(&w->inbox);
  queue_init(&w->overflow);
  snprintf(w->name, sizeof w->name, "%s", name);
  w->stopped = corral__future_new();
  int rc = w->stopped == NULL ? CORRAL_ENOMEM : uv_mutex_init(&w->curlock);
  if (rc == 0 && (rc = uv_cond_init(&w->spare_cond)) != 0) uv_mutex_destroy(&w->curlock);
  if (rc == 0 && (rc = corral__ctx_init(&w->ctx, rt, NULL)) != 0) {
    uv_cond_destroy(&w->spare_cond);
    uv_mutex_destroy(&w->curlock);
  }
  if (rc != 0) {
    corral_future_release(w->stopped);
    free(w);
    *err = rc;
    return NULL;
  }
  w->ctx.worker = w;
  w->tr = &corral__thread_transport;
  return w;
}

/* Free a worker whose thread never ran. */
static void worker_free_unstarted(corral_worker *w) {
  corral__ctx_close(&w->ctx, 1);
  uv_cond_destroy(&w->spare_cond);
  uv_mutex_destroy(&w->curlock);
  corral_future_release(w->stopped);
  free(w);
}

/* Make w one of the runtime's workers, with its class and init arguments
 * (`boot`) and its inbox bound: it counts as busy (it boots), the caller's
 * handle is counted from the start (an orphan sweep running meanwhile must
 * not take a worker being born for one), and the runtime holds a reference
 * until it is joined. */
static void worker_enlist(corral_worker *w, const char *name, char *boot, size_t len, int refs,
                          int cap) {
  corral_runtime *rt = w->rt;
  snprintf(w->name, sizeof w->name, "%s", name);
  w->boot = boot;
  w->bootlen = len;
  w->boot_refs = refs;
  w->cap = cap > 0 ? cap : 1;
  atomic_fetch_add(&w->refs, 1);
  atomic_store(&w->handles, 1);
  atomic_fetch_add(&rt->nbusy, 1);
  uv_mutex_lock(&rt->wlock);
  queue_insert_tail(&rt->workers, &w->rt_node);
  uv_mutex_unlock(&rt->wlock);
}

static corral_worker *take_spare(corral_runtime *rt);

corral_worker *corral__worker_start(corral_runtime *rt, const char *name, char *boot, size_t len,
                                    int refs, int cap, void (*body)(corral_worker *w), int spare,
                                    int process, int *err) {
  corral_worker *w = spare && !process ? take_spare(rt) : NULL;
  if (w != NULL) { /* booted ahead: it gets its class and goes on */
    worker_enlist(w, name, boot, len, refs, cap);
    uv_mutex_lock(&w->ctx.qlock);
    w->tr_done = worker_ended;
    w->spare = SPARE_TAKEN;
    uv_cond_signal(&w->spare_cond);
    uv_mutex_unlock(&w->ctx.qlock);
    return w;
  }
  if ((w = worker_new(rt, name, err)) == NULL) return NULL;
  worker_enlist(w, name, boot, len, refs, cap);
  w->process = process;
  w->tr_run = body;
  w->tr_done = worker_ended;
  int rc = w->tr->start(w);
  if (rc != 0) {
    uv_mutex_lock(&rt->wlock);
    queue_remove(&w->rt_node);
    w->joined = 1;
    uv_mutex_unlock(&rt->wlock);
    atomic_fetch_sub(&rt->nbusy, 1);
    w->boot = NULL; /* still the caller's */
    worker_free_unstarted(w);
    *err = rc;
    return NULL;
  }
  return w;
}

/* ======================================================================== */
/* The spare                                                                 */
/* ======================================================================== */

/* A runtime keeps one worker thread started ahead, its Lua state made and
 * corral loaded (the binding's main runs up to the class, then waits in
 * corral__worker_await): the next worker start takes it, and only the
 * class, the init arguments and the first call are left to do. It is not
 * one of the runtime's workers until taken (no handle, not busy, not in the
 * list the sweeps and the close walk); what it does meanwhile is its own.
 * Its state: SPARE_WAITING until taken (SPARE_TAKEN) or told to end
 * (SPARE_QUIT), under ctx.qlock. */

/* A spare's thread ends without having been taken; one let go (not to be
 * joined) gives the last reference itself. */
static void spare_ended(corral_worker *w) {
  corral__ctx_close(&w->ctx, 0);
  corral__future_settle(w->stopped, CORRAL_DONE, NULL, 0);
  uv_mutex_lock(&w->ctx.qlock);
  int let_go = w->spare_let_go;
  uv_mutex_unlock(&w->ctx.qlock);
  if (let_go) {
    free(w->crash); /* it never served: its failure is nobody's error */
    w->crash = NULL;
    corral__worker_release(w);
  }
}

int corral__worker_await(corral_worker *w) {
  uv_mutex_lock(&w->ctx.qlock);
  while (w->spare == SPARE_WAITING)
    uv_cond_wait(&w->spare_cond, &w->ctx.qlock);
  int taken = w->spare != SPARE_QUIT;
  uv_mutex_unlock(&w->ctx.qlock);
  return taken;
}

/* The runtime's spare, if it has one (the caller's reference now). */
static corral_worker *take_spare(corral_runtime *rt) {
  uv_mutex_lock(&rt->wlock);
  corral_worker *w = rt->spare;
  rt->spare = NULL;
  if (w != NULL && rt->spare_pid != getpid()) w = NULL; /* a forked child's: not there */
  uv_mutex_unlock(&rt->wlock);
  return w;
}

void corral__worker_make_spare(corral_runtime *rt, void (*body)(corral_worker *w)) {
  uv_mutex_lock(&rt->wlock);
  int wanted = rt->spare == NULL && !rt->no_spare && !rt->closing;
  uv_mutex_unlock(&rt->wlock);
  if (!wanted) return;
  int err;
  corral_worker *w = worker_new(rt, "spare", &err);
  if (w == NULL) return; /* none: the next start is a cold one */
  w->spare = SPARE_WAITING;
  w->tr_run = body;
  w->tr_done = spare_ended;
  if (w->tr->start(w) != 0) {
    worker_free_unstarted(w);
    return;
  }
  uv_mutex_lock(&rt->wlock);
  corral_worker *old = rt->spare;
  if (old == NULL && !rt->no_spare && !rt->closing) {
    rt->spare = w;
    rt->spare_pid = getpid();
    w = NULL;
  }
  uv_mutex_unlock(&rt->wlock);
  if (w != NULL) corral__worker_end_spare(w, 0); /* another was made meanwhile */
}

void corral__worker_end_spare(corral_worker *w, int let_go) {
  uv_thread_t thread = w->thread; /* (a spare let go may be freed at once) */
  uv_mutex_lock(&w->ctx.qlock);
  w->spare = SPARE_QUIT;
  w->spare_let_go = let_go;
  uv_cond_signal(&w->spare_cond);
  uv_mutex_unlock(&w->ctx.qlock);
  if (let_go) {
    pthread_detach(thread);
    return;
  }
  w->tr->join(w);
  /* it never served: a failure of its own start is nobody's error */
  free(w->crash);
  w->crash = NULL;
  corral__worker_release(w);
}

void corral__worker_drop_spare(corral_runtime *rt, int for_good) {
  uv_mutex_lock(&rt->wlock);
  corral_worker *w = rt->spare;
  rt->spare = NULL;
  if (for_good) rt->closing = 1;
  /* in a child forked since, the spare's thread is not there: forgotten */
  int here = w != NULL && rt->spare_pid == getpid();
  /* a runner ending after a signal or an error does not wait for it: a
   * second Ctrl-C ends the process at once, even while it would join */
  int let_go = for_good && rt->exit_fast;
  uv_mutex_unlock(&rt->wlock);
  if (here) corral__worker_end_spare(w, let_go);
}

void corral__worker_spares(corral_runtime *rt, int on) {
  uv_mutex_lock(&rt->wlock);
  rt->no_spare = !on;
  uv_mutex_unlock(&rt->wlock);
  if (!on) corral__worker_drop_spare(rt, 0);
}

void corral__worker_hold_handle(corral_worker *w) {
  corral__worker_retain(w);
  atomic_fetch_add(&w->handles, 1);
}

void corral__worker_drop_handle(corral_worker *w) {
  if (atomic_fetch_sub(&w->handles, 1) == 1) atomic_store(&w->rt->orphans, 1);
  corral__worker_release(w); /* the runtime holds one until it is joined: not the last */
}

void corral__worker_stop_orphans(corral_runtime *rt, void (*stopping)(void *ud, corral_worker *w),
                                 void *ud) {
  corral_worker *found[32];
  int n;
  do {
    n = 0;
    uv_mutex_lock(&rt->wlock);
    for (queue *q = queue_head(&rt->workers); q != &rt->workers && n < 32; q = q->next) {
      corral_worker *w = queue_data(q, corral_worker, rt_node);
      if (atomic_load(&w->handles) != 0 || w->orphan_seen) continue;
      /* once: it stops (if it runs still) and is joined when it has ended,
       * whether it was running, stopping or dead */
      w->orphan_seen = 1;
      uv_mutex_lock(&w->ctx.qlock);
      if (atomic_load(&w->stopping) == WORKER_RUNNING) {
        w->orphan_stop = 1;
        atomic_store(&w->stopping, WORKER_DRAIN);
        w->tr->wake(w, 0);
      }
      uv_mutex_unlock(&w->ctx.qlock);
      corral__worker_retain(w);
      found[n++] = w;
    }
    uv_mutex_unlock(&rt->wlock);
    for (int i = 0; i < n; i++) {
      if (stopping != NULL) stopping(ud, found[i]);
      corral__worker_release(found[i]);
    }
  } while (n == 32);
}

void corral__worker_retain(corral_worker *w) {
  atomic_fetch_add_explicit(&w->refs, 1, memory_order_relaxed);
}

uint64_t corral__worker_handle(corral_worker *w) {
  return corral__handle_of(&w->handle, w, HANDLE_WORKER, &w->refs);
}

void corral__worker_release(corral_worker *w) {
  if (w == NULL || atomic_fetch_sub_explicit(&w->refs, 1, memory_order_acq_rel) != 1) return;
  /* The last reference: the thread was joined (the runtime holds one until
   * then). clang-analyzer cannot follow the count: */
  /* NOLINTBEGIN(clang-analyzer-unix.Malloc) */
  uint64_t h = atomic_load_explicit(&w->handle, memory_order_acquire);
  if (h != 0) corral__handle_free(h); /* lock-free: a __gc may get here */
  uv_mutex_destroy(&w->ctx.qlock);
  uv_mutex_destroy(&w->curlock);
  uv_cond_destroy(&w->spare_cond);
  corral__codec_free(w->boot, w->bootlen, w->boot_refs);
  /* a crash no call carried (an init that failed before any call): nobody
   * else will say it */
  if (w->crash != NULL && !atomic_load(&w->crash_carried))
    corral__report_payload("corral: unretrieved error: ", w->crash, w->crashlen);
  free(w->crash);
  corral_future_release(w->stopped);
  free(w);
  /* NOLINTEND(clang-analyzer-unix.Malloc) */
}

/* ======================================================================== */
/* The inbox                                                                 */
/* ======================================================================== */

int corral__worker_push(corral_worker *w, corral_call *c, corral_future **accepted) {
  *accepted = NULL;
  uv_mutex_lock(&w->ctx.qlock);
  int st = atomic_load_explicit(&w->stopping, memory_order_relaxed);
  if (st != WORKER_RUNNING) {
    uv_mutex_unlock(&w->ctx.qlock);
    return st == WORKER_CRASHED ? CORRAL_ECRASHED : CORRAL_ECLOSED;
  }
  c->taken = 1; /* the worker's now, wherever it waits */
  atomic_fetch_add(&w->active, 1);
  if (w->queued >= w->cap || !queue_empty(&w->overflow)) {
    /* Full (or others wait already): it waits in order, and its caller
     * until it moves into the inbox. */
    c->accepted = corral__future_new();
    if (c->accepted != NULL) {
      corral_future_retain(c->accepted);
      *accepted = c->accepted;
    }
    queue_insert_tail(&w->overflow, &c->node);
    uv_mutex_unlock(&w->ctx.qlock);
    return *accepted != NULL ? CORRAL_EAGAIN : 0;
  }
  int pending = !queue_empty(&w->inbox);
  queue_insert_tail(&w->inbox, &c->node);
  w->queued++;
  /* one wake-up per batch: a non-empty inbox has one on the way */
  w->tr->wake(w, pending);
  uv_mutex_unlock(&w->ctx.qlock);
  return 0;
}

int corral__worker_take(corral_worker *w, corral_call **out, int max) {
  int n = 0, nacc = 0;
  corral_future *acc[64];
  uv_mutex_lock(&w->ctx.qlock);
  while (n < max && !queue_empty(&w->inbox)) {
    corral_call *c = queue_data(queue_head(&w->inbox), corral_call, node);
    queue_remove(&c->node);
    queue_insert_tail(&w->taken, &c->node); /* the worker's thread owns it now */
    out[n++] = c;
  }
  w->queued -= n;
  /* room made: calls waiting in the overflow move in, their callers go on */
  while (w->queued < w->cap && !queue_empty(&w->overflow) && nacc < 64) {
    corral_call *c = queue_data(queue_head(&w->overflow), corral_call, node);
    queue_remove(&c->node);
    queue_insert_tail(&w->inbox, &c->node);
    w->queued++;
    if (c->accepted != NULL) acc[nacc++] = c->accepted;
    c->accepted = NULL;
  }
  uv_mutex_unlock(&w->ctx.qlock);
  for (int i = 0; i < nacc; i++) {
    corral__future_settle(acc[i], CORRAL_DONE, NULL, 0);
    corral_future_release(acc[i]);
  }
  return n;
}

void corral__worker_stop(corral_worker *w, int how) {
  uv_mutex_lock(&w->ctx.qlock);
  if (atomic_load_explicit(&w->stopping, memory_order_relaxed) < how) {
    atomic_store(&w->stopping, how);
    w->tr->wake(w, 0);
  }
  uv_mutex_unlock(&w->ctx.qlock);
}

void corral__worker_crash(corral_worker *w, char *payload, size_t len) {
  uv_mutex_lock(&w->ctx.qlock);
  if (w->crash == NULL) {
    w->crash = payload;
    w->crashlen = len;
    payload = NULL;
  }
  uv_mutex_unlock(&w->ctx.qlock);
  free(payload);
  corral__worker_stop(w, WORKER_CRASHED);
}

void corral__worker_crash_text(corral_worker *w, const char *message) {
  size_t len;
  char *payload = corral__future_error_payload("WorkerCrashed", message, &len);
  if (payload != NULL) corral__worker_crash(w, payload, len);
}

char *corral__worker_crash_copy(corral_worker *w, size_t *len) {
  char *copy = NULL;
  uv_mutex_lock(&w->ctx.qlock);
  if (w->crash != NULL && (copy = malloc(w->crashlen)) != NULL) {
    memcpy(copy, w->crash, w->crashlen);
    *len = w->crashlen;
    atomic_store(&w->crash_carried, 1);
  }
  uv_mutex_unlock(&w->ctx.qlock);
  return copy;
}

void corral__worker_set_current(corral_worker *w, const char *method, size_t len) {
  if (len >= sizeof w->current) len = sizeof w->current - 1;
  uv_mutex_lock(&w->curlock);
  memcpy(w->current, method, len);
  w->current[len] = '\0';
  uv_mutex_unlock(&w->curlock);
}

void corral__worker_current(corral_worker *w, char *out, size_t size) {
  uv_mutex_lock(&w->curlock);
  snprintf(out, size, "%s", w->current);
  uv_mutex_unlock(&w->curlock);
}

/* ======================================================================== */
/* Join                                                                      */
/* ======================================================================== */

void corral__worker_join(corral_worker *w) {
  corral_runtime *rt = w->rt;
  uv_mutex_lock(&rt->wlock);
  int joined = w->joined;
  w->joined = 1;
  if (!joined) queue_remove(&w->rt_node);
  uv_mutex_unlock(&rt->wlock);
  if (joined) return;
  w->tr->join(w);
  corral__worker_release(w); /* the runtime's reference */
}

void corral__worker_reap(corral_runtime *rt) {
  for (;;) {
    corral_worker *done = NULL;
    uv_mutex_lock(&rt->wlock);
    for (queue *q = queue_head(&rt->workers); q != &rt->workers; q = q->next) {
      corral_worker *w = queue_data(q, corral_worker, rt_node);
      if (atomic_load(&w->handles) == 0 && corral_future_state(w->stopped) == CORRAL_DONE) {
        done = w;
        corral__worker_retain(w);
        break;
      }
    }
    uv_mutex_unlock(&rt->wlock);
    if (done == NULL) return;
    corral__worker_join(done); /* its thread has ended: this does not wait */
    corral__worker_release(done);
  }
}

/* The first worker of rt not joined yet (retained), or NULL. */
static corral_worker *first_worker(corral_runtime *rt, queue *after) {
  corral_worker *w = NULL;
  uv_mutex_lock(&rt->wlock);
  /* `after` is a worker left running: never freed (the analyzer cannot tell) */
  /* NOLINTBEGIN(clang-analyzer-unix.Malloc) */
  queue *q = after != NULL ? after->next : queue_head(&rt->workers);
  if (q != &rt->workers) {
    w = queue_data(q, corral_worker, rt_node);
    corral__worker_retain(w);
  }
  uv_mutex_unlock(&rt->wlock);
  return w;
  /* NOLINTEND(clang-analyzer-unix.Malloc) */
}

static void stop_every(corral_runtime *rt, int how) {
  uv_mutex_lock(&rt->wlock);
  for (queue *q = queue_head(&rt->workers); q != &rt->workers; q = q->next)
    corral__worker_stop(queue_data(q, corral_worker, rt_node), how);
  uv_mutex_unlock(&rt->wlock);
}

static double now_s(void) { return (double)uv_hrtime() * 1e-9; }

/* Name a worker that will not stop and is left running. */
static void left_behind(corral_worker *w) {
  char method[64];
  corral__worker_current(w, method, sizeof method);
  if (method[0] != '\0')
    fprintf(stderr,
            "corral: worker %s is still running method %s (code that never waits cannot be "
            "interrupted); leaving it behind\n",
            w->name, method);
  else
    fprintf(stderr,
            "corral: worker %s is still running code of its own that never waits (a task, not a "
            "call); leaving it behind\n",
            w->name);
}

int corral__worker_close_all(corral_runtime *rt, int fast, int *sig) {
  stop_every(rt, fast ? WORKER_CANCEL : WORKER_DRAIN);
  /* Fast: every worker gets one second in all. Draining goes on while
   * anything can progress (when every worker left is parked with nothing
   * to do, what they wait on can never come: their calls are cancelled); a
   * worker with no call left that still does not stop runs code of its own
   * that never waits: it gets a second too. Workers left behind stay in the
   * list before `after` (they are never joined, nor freed). */
  double deadline = now_s() + 1.0, quiet_since = -1;
  queue *after = NULL;
  int left = 0;
  corral_worker *w;
  *sig = 0;
  while ((w = first_worker(rt, after)) != NULL) {
    /* Ctrl-C or SIGTERM while draining (the runner's): cancel, a second */
    int s = fast ? 0 : corral__signal_take_stop();
    if (s != 0) {
      *sig = s;
      fast = 1;
      deadline = now_s() + 1.0;
      stop_every(rt, WORKER_CANCEL);
    }
    double wait = fast ? deadline - now_s() : 0.1;
    if (corral_future_wait(w->stopped, wait > 0 ? wait : 0) == 0) {
      corral__worker_join(w);
      corral__worker_release(w);
      quiet_since = -1;
      continue;
    }
    int give_up = 0;
    if (fast) {
      give_up = now_s() >= deadline;
    } else if (atomic_load(&rt->nbusy) == 0) {
      stop_every(rt, WORKER_CANCEL);
    } else if (atomic_load(&w->active) == 0) {
      if (quiet_since < 0) quiet_since = now_s();
      give_up = now_s() - quiet_since >= 1.0;
    } else {
      quiet_since = -1;
    }
    if (give_up) {
      left_behind(w);
      left++;
      after = &w->rt_node;
      quiet_since = -1;
    }
    corral__worker_release(w);
  }
  return left;
}
