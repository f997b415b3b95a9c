/* sync.c: channels and sync primitives shared by every context: the state
 * and the FIFO queues of waiters, under one lock per object.
 *
 * One object type serves every kind (channel, queue, semaphore, lock, event,
 * condition, barrier): a counter or a ring of encoded values, and queues of
 * waiters. A waiter is a record its context's Lua side owns from the wait
 * to `corral__sync_finish`; a grant moves it out of its queue and wakes
 * its context (posted, or handed back to the caller when it is the
 * caller's own context, which wakes it without a round through the loop).
 *
 * Select: the records of one select share a `sel`; a grant to one of them
 * first claims the sel (once, lock-free), and a record whose sel another
 * case has won is skipped and dropped from its queue. A select locks every
 * object it names (in address order) while it looks for a ready case and
 * queues its records, so nobody sees a half-made select.
 *
 * Lock order: the objects' locks in address order (only a select holds more
 * than one), then a context's qlock (posting a grant). */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* ======================================================================== */
/* Objects                                                                   */
/* ======================================================================== */

static atomic_int live_objects;

corral_sync *corral__sync_new(int kind, long cap) {
  corral_sync *s = calloc(1, sizeof *s);
  if (s == NULL) return NULL;
  if (uv_mutex_init(&s->lock) != 0) {
    free(s);
    return NULL;
  }
  atomic_init(&s->refs, 1);
  s->kind = kind;
  s->cap = cap;
  queue_init(&s->waiters);
  queue_init(&s->putters);
  queue_init(&s->joiners);
  atomic_fetch_add(&live_objects, 1);
  return s;
}

void corral__sync_retain(corral_sync *s) { atomic_fetch_add(&s->refs, 1); }

static void item_free(sync_item *it) {
  it->tag = SYNC_ITEM_NONE;
  if (it->p == NULL) return;
  if (it->discard != NULL) it->discard(it->p, it->len);
  free(it->p);
  it->p = NULL;
}

static int item_held(const sync_item *it) { return it->p != NULL || it->tag != SYNC_ITEM_NONE; }

/* Lock-free until the last reference: a __gc may drop one. */
void corral__sync_release(corral_sync *s) {
  if (s == NULL || atomic_fetch_sub(&s->refs, 1) != 1) return;
  if (atomic_load(&s->handle) != 0) corral__handle_free(atomic_load(&s->handle));
  for (long i = 0; i < s->rcount; i++)
    item_free(&s->ring[(s->rhead + i) % s->rcap]);
  free(s->ring);
  corral_sync *lk = s->lock_of;
  uv_mutex_destroy(&s->lock);
  free(s);
  atomic_fetch_sub(&live_objects, 1);
  corral__sync_release(lk);
}

uint64_t corral__sync_handle(corral_sync *s) {
  return corral__handle_of(&s->handle, s, HANDLE_SYNC, &s->refs);
}

int corral__sync_live(void) { return atomic_load(&live_objects); }

/* ======================================================================== */
/* Waiters                                                                   */
/* ======================================================================== */

static atomic_int live_waiters;

static void sel_release(corral_sync_sel *sel) {
  if (sel != NULL && atomic_fetch_sub(&sel->refs, 1) == 1) free(sel);
}

static void waiter_drop(corral_post *p);

static corral_sync_waiter *waiter_new(corral_sync *s, corral_context *ctx, int op, long n,
                                      corral_sync_sel *sel, int idx) {
  corral_sync_waiter *w = calloc(1, sizeof *w);
  if (w == NULL) return NULL;
  w->post.drop = waiter_drop;
  w->s = s;
  corral__sync_retain(s);
  w->ctx = ctx;
  w->op = op;
  w->n = n;
  w->sel = sel;
  w->sel_idx = idx;
  if (sel != NULL) atomic_fetch_add(&sel->refs, 1);
  queue_insert_tail(&ctx->live, &w->post.live); /* (the caller runs on ctx's thread) */
  atomic_fetch_add(&live_waiters, 1);
  return w;
}

static void waiter_free(corral_sync_waiter *w) {
  item_free(&w->val);
  sel_release(w->sel);
  corral__sync_release(w->s);
  free(w);
  atomic_fetch_sub(&live_waiters, 1);
}

int corral__sync_waiters_live(void) { return atomic_load(&live_waiters); }

/* May w be granted? A select's record first claims its select. */
static int claim(corral_sync_waiter *w) {
  if (w->sel == NULL) return 1;
  int none = 0;
  return atomic_compare_exchange_strong(&w->sel->won, &none, w->sel_idx);
}

static void unqueue(corral_sync_waiter *w) {
  if (w->queued) {
    queue_remove(&w->node);
    w->queued = 0;
  }
}

/* Grant w (already out of its queue) with `state`: wake its context. */
static void wake(corral_sync_waiter *w, int state, sync_woken *k) {
  w->state = state;
  if (k != NULL && w->ctx == k->self && k->n < SYNC_WOKEN_MAX)
    k->w[k->n++] = w;
  else
    corral__ctx_post_item(w->ctx, &w->post);
}

/* The first waiter of q that may be granted (claimed), out of q; records
 * of selects won elsewhere are dropped on the way. */
static corral_sync_waiter *first_claimed(queue *q) {
  while (!queue_empty(q)) {
    corral_sync_waiter *w = queue_data(queue_head(q), corral_sync_waiter, node);
    unqueue(w);
    if (claim(w)) return w;
    w->state = SYNC_GONE;
  }
  return NULL;
}

static void enqueue(queue *q, corral_sync_waiter *w) {
  queue_insert_tail(q, &w->node);
  w->queued = 1;
}

/* Fail every waiter of q with `state` (closed, broken). */
static void fail_all(queue *q, int state, sync_woken *k) {
  corral_sync_waiter *w;
  while ((w = first_claimed(q)) != NULL)
    wake(w, state, k);
}

/* ======================================================================== */
/* Channels and queues: a ring of encoded values                             */
/* ======================================================================== */

static int ring_full(corral_sync *s) { return s->cap >= 0 && s->rcount >= s->cap; }

static int ring_grow(corral_sync *s) {
  if (s->rcount < s->rcap) return 0;
  long cap = s->rcap ? s->rcap * 2 : 8;
  sync_item *r = malloc(sizeof *r * (size_t)cap);
  if (r == NULL) return -1;
  for (long i = 0; i < s->rcount && s->rcap > 0; i++)
    r[i] = s->ring[(s->rhead + i) % s->rcap];
  free(s->ring);
  s->ring = r;
  s->rhead = 0;
  s->rcap = cap;
  return 0;
}

static int ring_push(corral_sync *s, sync_item *v, int front) {
  if (ring_grow(s) != 0) return -1;
  if (front) {
    s->rhead = (s->rhead + s->rcap - 1) % s->rcap;
    s->ring[s->rhead] = *v;
  } else {
    s->ring[(s->rhead + s->rcount) % s->rcap] = *v;
  }
  s->rcount++;
  memset(v, 0, sizeof *v);
  return 0;
}

static void ring_pop(corral_sync *s, sync_item *out) {
  *out = s->ring[s->rhead];
  memset(&s->ring[s->rhead], 0, sizeof *out);
  s->rhead = (s->rhead + 1) % s->rcap;
  s->rcount--;
}

/* Values wait in the ring: the first waiting putter's moves in. */
static void refill(corral_sync *s, sync_woken *k) {
  while (!ring_full(s) && !queue_empty(&s->putters)) {
    corral_sync_waiter *p = first_claimed(&s->putters);
    if (p == NULL) break;
    if (s->kind == SYNC_QUEUE) s->unfinished++;
    if (ring_push(s, &p->val, 0) != 0) { /* no memory: it stays first */
      queue_insert_head(&s->putters, &p->node);
      p->queued = 1;
      if (s->kind == SYNC_QUEUE) s->unfinished--;
      if (p->sel) atomic_store(&p->sel->won, 0);
      break;
    }
    wake(p, SYNC_GRANTED, k);
  }
}

/* A put that can happen now (lock held): 1 done (v taken), 0 not now. */
static int try_put(corral_sync *s, sync_item *v, sync_woken *k) {
  corral_sync_waiter *g = first_claimed(&s->waiters);
  if (g != NULL) {
    g->val = *v;
    memset(v, 0, sizeof *v);
    wake(g, SYNC_GRANTED, k);
    return 1;
  }
  if (ring_full(s)) return 0;
  if (ring_push(s, v, 0) != 0) return -1;
  return 1;
}

/* A get that can happen now (lock held): 1 done (*out filled), 0 not now. */
static int try_get(corral_sync *s, sync_item *out, sync_woken *k) {
  if (s->rcount > 0) {
    ring_pop(s, out);
    refill(s, k);
    return 1;
  }
  corral_sync_waiter *p = first_claimed(&s->putters);
  if (p == NULL) return 0;
  if (s->kind == SYNC_QUEUE) s->unfinished++;
  *out = p->val;
  memset(&p->val, 0, sizeof p->val);
  wake(p, SYNC_GRANTED, k);
  return 1;
}

/* ======================================================================== */
/* One case, the lock held                                                   */
/* ======================================================================== */

/* Try the operation of case c now: SYNC_GRANTED (done), SYNC_CLOSED,
 * SYNC_BROKEN, SYNC_NOMEM, or SYNC_QUEUED (it would wait). */
static int try_case(sync_case *c, sync_woken *k) {
  corral_sync *s = c->s;
  switch (c->op) {
  case SYNC_OP_PUT: {
    if (s->closed) return SYNC_CLOSED;
    int rc = try_put(s, &c->val, k);
    if (rc < 0) return SYNC_NOMEM;
    if (rc == 0) return SYNC_QUEUED;
    if (s->kind == SYNC_QUEUE) s->unfinished++;
    return SYNC_GRANTED;
  }
  case SYNC_OP_GET:
    if (try_get(s, &c->val, k)) return SYNC_GRANTED;
    return s->closed ? SYNC_CLOSED : SYNC_QUEUED;
  case SYNC_OP_ACQUIRE:
    if (queue_empty(&s->waiters) && s->value >= c->n) {
      s->value -= c->n;
      return SYNC_GRANTED;
    }
    return SYNC_QUEUED;
  case SYNC_OP_EVENT: return s->value ? SYNC_GRANTED : SYNC_QUEUED;
  case SYNC_OP_JOIN: return s->unfinished == 0 ? SYNC_GRANTED : SYNC_QUEUED;
  case SYNC_OP_NOTIFY: return SYNC_QUEUED; /* a condition's wait always waits */
  case SYNC_OP_BARRIER: {
    if (s->closed) return SYNC_BROKEN;
    if (s->value + 1 < s->cap) return SYNC_QUEUED;
    /* the last to arrive: every waiter passes, numbered in arrival order */
    corral_sync_waiter *w;
    long i = 0;
    while ((w = first_claimed(&s->waiters)) != NULL) {
      w->ival = i++;
      wake(w, SYNC_GRANTED, k);
    }
    c->ival = i;
    s->value = 0;
    s->generation++;
    return SYNC_GRANTED;
  }
  }
  return SYNC_NOMEM;
}

/* Queue a waiter for case c (lock held). */
static int queue_case(sync_case *c, corral_context *ctx, corral_sync_sel *sel, int idx,
                      corral_sync_waiter **out) {
  corral_sync *s = c->s;
  corral_sync_waiter *w = waiter_new(s, ctx, c->op, c->n, sel, idx);
  if (w == NULL) return SYNC_NOMEM;
  if (c->op == SYNC_OP_PUT) {
    w->val = c->val;
    memset(&c->val, 0, sizeof c->val);
    enqueue(&s->putters, w);
  } else if (c->op == SYNC_OP_JOIN) {
    enqueue(&s->joiners, w);
  } else {
    if (c->op == SYNC_OP_BARRIER) {
      w->ival = s->value;
      s->value++;
      w->gen = s->generation;
    }
    enqueue(&s->waiters, w);
  }
  *out = w;
  return SYNC_QUEUED;
}

static int addr_cmp(const void *a, const void *b) {
  uintptr_t x = (uintptr_t)(*(corral_sync *const *)a), y = (uintptr_t)(*(corral_sync *const *)b);
  return x < y ? -1 : x > y;
}

int corral__sync_select(sync_case *cases, int n, int wait, corral_context *ctx, sync_woken *k,
                        int *which, corral_sync_waiter **recs) {
  corral_sync *locks[SYNC_SELECT_MAX];
  int nl = 0;
  if (n < 1 || n > SYNC_SELECT_MAX) return SYNC_NOMEM;
  for (int i = 0; i < n; i++)
    locks[nl++] = cases[i].s;
  if (nl > 1) qsort(locks, (size_t)nl, sizeof(corral_sync *), addr_cmp);
  int u = 0;
  for (int i = 0; i < nl; i++)
    if (u == 0 || locks[u - 1] != locks[i]) locks[u++] = locks[i];
  nl = u;
  for (int i = 0; i < nl; i++)
    uv_mutex_lock(&locks[i]->lock);
  int rc = SYNC_QUEUED;
  *which = -1;
  for (int i = 0; i < n && rc == SYNC_QUEUED; i++) {
    rc = try_case(&cases[i], k);
    if (rc != SYNC_QUEUED) *which = i;
  }
  if (rc == SYNC_QUEUED && wait) {
    corral_sync_sel *sel = NULL;
    if (n > 1 || wait == 2) {
      sel = calloc(1, sizeof *sel);
      if (sel == NULL)
        rc = SYNC_NOMEM;
      else
        atomic_init(&sel->refs, 1);
    }
    for (int i = 0; i < n && rc == SYNC_QUEUED; i++) {
      recs[i] = NULL;
      if (queue_case(&cases[i], ctx, sel, i + 1, &recs[i]) != SYNC_QUEUED) rc = SYNC_NOMEM;
    }
    if (rc == SYNC_NOMEM) { /* take back what was queued */
      for (int i = 0; i < n; i++)
        if (recs[i] != NULL) {
          unqueue(recs[i]);
          if (recs[i]->op == SYNC_OP_BARRIER) recs[i]->s->value--;
          cases[i].val = recs[i]->val;
          memset(&recs[i]->val, 0, sizeof recs[i]->val);
          queue_remove(&recs[i]->post.live);
          waiter_free(recs[i]);
          recs[i] = NULL;
        }
    }
    sel_release(sel);
  }
  for (int i = nl - 1; i >= 0; i--)
    uv_mutex_unlock(&locks[i]->lock);
  return rc;
}

/* ======================================================================== */
/* Operations that never wait                                                */
/* ======================================================================== */

int corral__sync_close(corral_sync *s, sync_woken *k) {
  uv_mutex_lock(&s->lock);
  int was = s->closed;
  s->closed = 1;
  if (s->kind == SYNC_BARRIER) {
    fail_all(&s->waiters, SYNC_BROKEN, k);
    s->value = 0;
  } else {
    fail_all(&s->waiters, SYNC_CLOSED, k);
    fail_all(&s->putters, SYNC_CLOSED, k);
  }
  uv_mutex_unlock(&s->lock);
  return !was;
}

int corral__sync_release_permits(corral_sync *s, long n, sync_woken *k) {
  uv_mutex_lock(&s->lock);
  if (s->kind == SYNC_LOCK && s->value + n > 1) {
    uv_mutex_unlock(&s->lock);
    return -1;
  }
  s->value += n;
  while (!queue_empty(&s->waiters)) {
    corral_sync_waiter *w = queue_data(queue_head(&s->waiters), corral_sync_waiter, node);
    if (w->n > s->value) break;
    unqueue(w);
    if (!claim(w)) {
      w->state = SYNC_GONE;
      continue;
    }
    s->value -= w->n;
    wake(w, SYNC_GRANTED, k);
  }
  uv_mutex_unlock(&s->lock);
  return 0;
}

void corral__sync_set(corral_sync *s, int on, sync_woken *k) {
  uv_mutex_lock(&s->lock);
  s->value = on;
  if (on) {
    corral_sync_waiter *w;
    while ((w = first_claimed(&s->waiters)) != NULL)
      wake(w, SYNC_GRANTED, k);
  }
  uv_mutex_unlock(&s->lock);
}

long corral__sync_notify(corral_sync *s, long n, sync_woken *k) {
  uv_mutex_lock(&s->lock);
  long done = 0;
  corral_sync_waiter *w;
  while (done < n && (w = first_claimed(&s->waiters)) != NULL) {
    wake(w, SYNC_GRANTED, k);
    done++;
  }
  uv_mutex_unlock(&s->lock);
  return done;
}

int corral__sync_task_done(corral_sync *s, sync_woken *k) {
  uv_mutex_lock(&s->lock);
  if (s->unfinished <= 0) {
    uv_mutex_unlock(&s->lock);
    return -1;
  }
  if (--s->unfinished == 0) {
    corral_sync_waiter *w;
    while ((w = first_claimed(&s->joiners)) != NULL)
      wake(w, SYNC_GRANTED, k);
  }
  uv_mutex_unlock(&s->lock);
  return 0;
}

void corral__sync_reset(corral_sync *s, sync_woken *k) {
  uv_mutex_lock(&s->lock);
  fail_all(&s->waiters, SYNC_BROKEN, k);
  s->value = 0;
  s->closed = 0;
  s->generation++;
  uv_mutex_unlock(&s->lock);
}

void corral__sync_state(corral_sync *s, sync_info *out) {
  uv_mutex_lock(&s->lock);
  out->count = s->kind == SYNC_CHANNEL || s->kind == SYNC_QUEUE ? s->rcount : s->value;
  out->closed = s->closed;
  out->unfinished = s->unfinished;
  out->cap = s->cap;
  out->waiting = 0;
  for (queue *q = queue_head(&s->waiters); q != &s->waiters; q = q->next)
    out->waiting++;
  out->putting = 0;
  for (queue *q = queue_head(&s->putters); q != &s->putters; q = q->next)
    out->putting++;
  uv_mutex_unlock(&s->lock);
}

/* ======================================================================== */
/* The end of a wait                                                         */
/* ======================================================================== */

/* Give back what a grant to w gave it (its task will not use it): a value
 * goes back to the head of the channel, permits to the semaphore (lock
 * held). */
static void undo(corral_sync_waiter *w, sync_woken *k) {
  corral_sync *s = w->s;
  if (w->op == SYNC_OP_GET && item_held(&w->val)) {
    corral_sync_waiter *g = first_claimed(&s->waiters);
    if (g != NULL) {
      g->val = w->val;
      memset(&w->val, 0, sizeof w->val);
      wake(g, SYNC_GRANTED, k);
    } else if (ring_push(s, &w->val, 1) != 0) {
      item_free(&w->val); /* no memory to keep it: it is lost */
    }
  } else if (w->op == SYNC_OP_ACQUIRE) {
    s->value += w->n;
    while (!queue_empty(&s->waiters)) {
      corral_sync_waiter *x = queue_data(queue_head(&s->waiters), corral_sync_waiter, node);
      if (x->n > s->value) break;
      unqueue(x);
      if (!claim(x)) {
        x->state = SYNC_GONE;
        continue;
      }
      s->value -= x->n;
      wake(x, SYNC_GRANTED, k);
    }
  }
}

/* The end of a wait on a parent's object (see corral__sync_remote_start).
 * Its task waits for the pump's final answer (a cancel too: see
 * corral__sync_remote_cancel), so a record is freed here once answered;
 * one its context drops before that (abandoned: the context closes) the
 * pump frees when the answer comes, and what it was granted is lost with
 * it, as in a crash. */
static int finish_remote(corral_sync_waiter *w, int abandon, sync_item *out, long *ival,
                         long *info) {
  corral_sync *s = w->s;
  uv_mutex_lock(&s->lock);
  queue_remove(&w->post.live); /* (the context's own list: it runs this) */
  if (ival != NULL) *ival = w->ival;
  if (info != NULL) memcpy(info, w->info, sizeof w->info);
  if (w->rstate != SYNC_R_DONE) {
    w->abandoned = 1; /* (from here on, the pump's) */
    if (w->rstate == SYNC_R_SENT) {
      w->rstate = SYNC_R_CANCEL;
      corral__ctx_post_item(&w->ctx->rt->home, &w->post);
    }
    uv_mutex_unlock(&s->lock);
    return SYNC_GONE;
  }
  corral__ctx_unpost(w->ctx, &w->post); /* (the answer's wake-up, if not drained) */
  int st = w->state;
  uv_mutex_unlock(&s->lock);
  if (st == SYNC_GRANTED && !abandon && out != NULL) {
    *out = w->val;
    memset(&w->val, 0, sizeof w->val);
  }
  waiter_free(w);
  return st;
}

int corral__sync_remote_cancel(corral_sync_waiter *w) {
  corral_sync *s = w->s;
  uv_mutex_lock(&s->lock);
  int done = w->rstate == SYNC_R_DONE;
  if (w->rstate == SYNC_R_TO_PUMP) {
    w->cancel_asked = 1; /* (the pump answers it GONE instead of sending it) */
  } else if (w->rstate == SYNC_R_SENT) {
    w->rstate = SYNC_R_CANCEL;
    corral__ctx_post_item(&w->ctx->rt->home, &w->post);
  }
  uv_mutex_unlock(&s->lock);
  return done;
}

int corral__sync_finish(corral_sync_waiter *w, int abandon, sync_item *out, long *ival, long *info,
                        sync_woken *k) {
  corral_sync *s = w->s;
  if (s->remote != 0) return finish_remote(w, abandon, out, ival, info);
  uv_mutex_lock(&s->lock);
  int state = w->state;
  if (w->queued) {
    unqueue(w);
    state = SYNC_GONE;
    if (w->op == SYNC_OP_BARRIER && w->gen == s->generation && s->value > 0) s->value--;
  } else if (state == SYNC_GRANTED && w->sel != NULL && atomic_load(&w->sel->won) != w->sel_idx) {
    state = SYNC_GONE; /* (never: a grant claims first) */
  }
  if (state == SYNC_GRANTED && abandon) undo(w, k);
  uv_mutex_unlock(&s->lock);
  corral__ctx_unpost(w->ctx, &w->post);
  queue_remove(&w->post.live);
  if (state == SYNC_GRANTED && !abandon && out != NULL) {
    *out = w->val;
    memset(&w->val, 0, sizeof w->val);
  }
  if (ival != NULL) *ival = w->ival;
  if (info != NULL) memset(info, 0, sizeof w->info);
  waiter_free(w);
  return state;
}

corral_sync_waiter *corral__sync_remote_start(corral_sync *s, corral_context *ctx, int op, long n,
                                              sync_item *v) {
  corral_sync_waiter *w = waiter_new(s, ctx, op, n, NULL, 0);
  if (w == NULL) return NULL;
  if (v != NULL) {
    w->val = *v;
    memset(v, 0, sizeof *v);
  }
  uv_mutex_lock(&s->lock);
  w->rstate = SYNC_R_TO_PUMP;
  corral__ctx_post_item(&ctx->rt->home, &w->post);
  uv_mutex_unlock(&s->lock);
  return w;
}

void corral__sync_waiter_free(corral_sync_waiter *w) { waiter_free(w); }

int corral__sync_adopt(corral_sync *s, sync_item *v) {
  uv_mutex_lock(&s->lock);
  int rc = ring_push(s, v, 0);
  uv_mutex_unlock(&s->lock);
  return rc;
}

void corral__sync_putback(corral_sync *s, sync_item *v) {
  uv_mutex_lock(&s->lock);
  corral_sync_waiter *g = first_claimed(&s->waiters);
  if (g != NULL) {
    g->val = *v;
    memset(v, 0, sizeof *v);
    wake(g, SYNC_GRANTED, NULL);
  } else if (ring_push(s, v, 1) != 0) {
    item_free(v);
  }
  uv_mutex_unlock(&s->lock);
}

/* The context closes with w alive: withdrawn, or its grant given back. */
static void waiter_drop(corral_post *p) {
  corral__sync_finish((corral_sync_waiter *)p, 1, NULL, NULL, NULL, NULL);
}

int corral__sync_won(corral_sync_waiter *w) {
  return w->sel == NULL ? 1 : atomic_load(&w->sel->won);
}

int corral__sync_claim_other(corral_sync_waiter *w, int idx) {
  if (w->sel == NULL) return 0;
  int none = 0;
  return atomic_compare_exchange_strong(&w->sel->won, &none, idx);
}
