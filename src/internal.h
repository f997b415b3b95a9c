/* internal.h: declarations shared by the files of src/, private to corral. */
#ifndef CORRAL_INTERNAL_H
#define CORRAL_INTERNAL_H

#include <stdatomic.h>
#include <stdint.h>
#include <uv.h>

#include <lauxlib.h>
#include <lua.h>

#include "corral.h"
#include "queue.h"

typedef struct corral_context corral_context;

/* ---- future.c ---------------------------------------------------------- */

/* A context's interest in a future: posted to the context when it settles. */
typedef struct corral_watch {
  corral_context *ctx;
  void (*post)(struct corral_watch *w); /* called by a settle: the context's own */
  corral_future *f;                     /* holds a reference */
  struct corral_watch *next;            /* in f->watches, under f->lock */
  queue node; /* in ctx->watching until drained or withdrawn: the context's own thread only */
  queue done; /* in ctx->completed once its future settled, under ctx->qlock */
} corral_watch;

enum {
  FUTURE_HOST = 1,    /* host C code may settle it (see future.c) */
  FUTURE_CARRIED = 2, /* an input whose failure a call carried (a DependencyError) */
  FUTURE_SEEN = 4,    /* settled from Lua: that side reports an unretrieved failure */
  FUTURE_HARD = 8,    /* its work can be stopped while it runs (a process worker's call):
                       * a cancel takes effect while RUNNING too (see future.c) */
  FUTURE_OWNED = 16   /* a task's that the host holds (corral_spawn...): corral settles
                       * it; the host's corral_future_set_* refuse (CORRAL_ESTATE) */
};

typedef struct corral__host_count corral__host_count;
struct corral_future {
  atomic_int refs;
  atomic_int state; /* corral_state; written under lock, read anywhere */
  atomic_int flags; /* FUTURE_* */
  atomic_int deps;  /* calls that hold it as an input and have not ended */
  int suspended;    /* RUNNING, and its work waits: cancellable (under lock) */
  uv_mutex_t lock;
  corral_watch *watches;
  char *payload; /* encoded results or error (malloc'd), set once when settled */
  size_t len;
  void (*discard)(const char *payload, size_t len); /* gives back what the payload holds */
  int payload_trust; /* CODEC_*: how its payload is decoded (a C host's: foreign; a child's: peer)
                      */
  _Atomic(uint64_t) handle; /* its handle once it crossed contexts (handle.c), or 0 */
  int first_used;           /* `first` was given to a watch (under lock; once) */
  corral_watch first;       /* the first watch's memory: most futures have one */
  corral__host_count *hc;   /* FUTURE_HOST: the count it is in (set once, under lock) */
};

/* A new pending future that only corral settles. */
corral_future *corral__future_new(void);
/* corral_future_set_error for corral's own code (FUTURE_OWNED too). */
int corral__future_set_error(corral_future *f, const char *kind, const char *message);
/* A runtime's count of pending futures that host C code may settle (made by
 * corral_future_new, or handed to C by corral_push_future/corral_to_future):
 * while it is not 0 the runtime never concludes that nothing can progress.
 * Shared by the runtime and every future counted in it (futures outlive
 * their runtime): freed with the last of them. */
struct corral__host_count {
  atomic_long pending;
  atomic_int refs;
};
corral__host_count *corral__host_count_new(void);
void corral__host_count_release(corral__host_count *hc);
/* Host C code may settle f: count it in hc (the first runtime's that marks
 * it; NULL: in none) while pending. */
void corral__future_mark_host(corral_future *f, corral__host_count *hc);
/* Threads blocked in corral_future_wait now (for tests). */
int corral__future_sleepers(void);
/* A MessagePack map {kind=, message=}: the payload of a failed future. */
char *corral__future_error_payload(const char *kind, const char *message, size_t *len);
/* Settle f, taking ownership of payload (freed on failure). */
int corral__future_settle(corral_future *f, corral_state state, char *payload, size_t len);
/* The same, for a payload from corral__codec_encode that holds references. */
int corral__future_settle_refs(corral_future *f, corral_state state, char *payload, size_t len,
                               void (*discard)(const char *payload, size_t len));
/* Settle f as DONE with a host's payload (taken; checked by the caller:
 * corral_future_set_result), decoded as CODEC_FOREIGN. */
int corral__future_settle_foreign(corral_future *f, char *payload, size_t len);
/* Settle f with a payload decoded with `trust` (CODEC_*): corral's own, any state. */
int corral__future_settle_trust(corral_future *f, corral_state state, char *payload, size_t len,
                                int trust);
/* The trust to decode f's payload with (CODEC_TRUSTED, _FOREIGN or _PEER). */
int corral__future_trust(corral_future *f);
/* Settle f with a payload a process worker sent (decoded as CODEC_PEER). */
int corral__future_settle_peer(corral_future *f, corral_state state, char *payload, size_t len);
/* The same, for a payload whose SHM extensions this process rewrote with
 * descriptors of its own (CODEC_PEER | CODEC_SHM): `discard` (the codec's,
 * handed down: a lower layer) closes them with it. */
int corral__future_settle_peer_shm(corral_future *f, corral_state state, char *payload, size_t len,
                                   void (*discard)(const char *payload, size_t len));
/* f's handle, issued on first use (0 when the handle table is full). */
uint64_t corral__future_handle(corral_future *f);
/* Futures alive in the process (a debug counter for leak specs). */
int corral__future_live(void);
/* f becomes / is no more an input of a call (a reference comes / goes with
 * it). While calls hold it, its failure is theirs to report; once one
 * carried it (corral__future_carried), for good. */
void corral__future_add_dep(corral_future *f);
void corral__future_drop_dep(corral_future *f);
void corral__future_carried(corral_future *f);
/* Its failure is somebody else's to report (carried, or held by calls). */
int corral__future_reported_elsewhere(corral_future *f);
/* pending -> running; 0 when it took effect. */
int corral__future_start(corral_future *f);
/* The running work waits (cancellable) / goes on: 0 while still RUNNING,
 * CORRAL_ESTATE once it was cancelled (or settled). */
int corral__future_suspend(corral_future *f);
int corral__future_resume(corral_future *f);
/* Cancel under the cancel rule (future.c): 0 when it took effect. */
int corral__future_cancel(corral_future *f);
/* Register ctx's interest: 0 when registered, 1 when f is already settled.
 * Watch and unwatch run on ctx's own thread (its list of watches is its own). */
int corral__future_watch(corral_future *f, corral_context *ctx, void (*post)(corral_watch *w));
/* Drop ctx's watch on f if it is still registered: 1 when removed (the watch
 * is freed), 0 when a settle already took it. */
int corral__future_unwatch(corral_future *f, corral_watch *w);
/* Free a watch taken out of every list (before its future's reference goes:
 * the first watch lives in the future). */
void corral__watch_free(corral_watch *w);

/* ---- handle.c ---------------------------------------------------------- */

enum { HANDLE_FUTURE = 1, HANDLE_WORKER = 2, HANDLE_BUFFER = 3, HANDLE_SYNC = 4 };

/* The handle of obj (whose reference count is *refs), kept in *cell: issued
 * on first use, once even when threads race; 0 when no slot can be had. */
uint64_t corral__handle_of(_Atomic(uint64_t) *cell, void *obj, int kind, atomic_int *refs);
/* The object's last reference went: its handle stops resolving. Lock-free. */
void corral__handle_free(uint64_t h);
/* The object of a live handle of that kind, retained; NULL for a stale,
 * forged or mistyped handle. Lock-free. */
void *corral__handle_get(uint64_t h, int kind);
/* Slots in use (a debug counter). */
int corral__handle_live(void);

/* ---- buffer.c ---------------------------------------------------------- */

/* Bytes shared by reference (corral.buffer): writable until `shared`. */
typedef struct corral_buffer {
  atomic_int refs;
  atomic_int shared; /* it has crossed to another context: immutable */
  atomic_int sealed; /* its memfd: 0 not yet, 1 being sealed, 2 sealed, 3 could not be */
  _Atomic(uint64_t) handle;
  size_t len;
  unsigned char *data;
  int fd; /* the memfd it is mapped from (MAP_SHARED), or -1 (heap) */
} corral_buffer;

/* A zeroed buffer of len bytes (one reference), or NULL. */
corral_buffer *corral__buffer_new(size_t len);
/* A read-only buffer over len bytes of the memfd fd (taken; a peer's: the
 * file must hold len bytes), or NULL (fd left open). */
corral_buffer *corral__buffer_map(int fd, size_t len);
/* Seal its memfd (once; read-only from then on, in every process): 0, or
 * -1 (a heap buffer, or the seals failed). */
int corral__buffer_seal(corral_buffer *b);
void corral__buffer_retain(corral_buffer *b);
/* Lock-free: a __gc may drop the last reference. */
void corral__buffer_release(corral_buffer *b);
uint64_t corral__buffer_handle(corral_buffer *b);
int corral__buffer_live(void);
#define CORRAL_BUFFER_MT "corral.buffer"

/* ---- context.c --------------------------------------------------------- */

typedef struct corral_reporter corral_reporter;
typedef struct corral_worker corral_worker;

/* A future that a __gc found nothing can settle any more, left for the
 * next drain (a collector takes no lock). */
typedef struct corral_deferred {
  corral_future *f; /* holds a reference */
  struct corral_deferred *next;
} corral_deferred;

/* A wake-up posted to a context by something other than a future (a sync
 * primitive granting a waiter: sync.c). Its owner links it in the context's
 * `live` list while the context's Lua side holds it; `drop` gives it back
 * when the context closes with it still there. */
typedef struct corral_post {
  queue node;                          /* in ctx->posted while posted (under ctx->qlock) */
  queue live;                          /* in ctx->live (the loop's own thread only) */
  int posted;                          /* under ctx->qlock */
  void (*drop)(struct corral_post *p); /* the context closes: withdraw and free it */
} corral_post;

struct corral_context {
  corral_runtime *rt;
  lua_State *L;
  corral_worker *worker; /* NULL for the home context */
  uv_loop_t loop;
  uv_async_t async;
  uv_timer_t timer;
  uv_mutex_t qlock;
  queue watching;            /* watches registered (the loop's own thread only: no lock) */
  queue completed;           /* watches whose future settled, to drain (under qlock) */
  queue posted;              /* corral_posts to drain (under qlock) */
  queue live;                /* corral_posts its Lua side holds (loop thread only) */
  queue reporters;           /* unretrieved errors, loop thread only */
  int closed;                /* the loop is closed: no more wake-ups (under qlock) */
  int idle;                  /* a worker parked with nothing to do (under qlock; see context.c) */
  int io;                    /* I/O operations in flight on its loop (corral.fs, corral.exec) */
  corral_deferred *deferred; /* loop thread only */
  atomic_int signal;         /* work was posted since the last drain */
  atomic_int spinning;       /* the loop spins before parking: no need to wake it */
  /* statistics, read from any thread */
  atomic_long encodes, decodes, tasks;
};

int corral__ctx_init(corral_context *c, corral_runtime *rt, lua_State *L);
/* Close the loop (from the thread that ran it); the lock too when asked. */
void corral__ctx_close(corral_context *c, int destroy_lock);
/* Write `head` and the error in an encoded payload to stderr (no Lua, no
 * lock: a __gc may call it). */
void corral__report_payload(const char *head, const char *payload, size_t len);
/* Called by corral__future_settle with the watch already unlinked from its future. */
void corral__ctx_post(corral_watch *w);
/* Tell c that work was posted to it (call under c->qlock): wakes its loop
 * unless it is spinning, or `pending` says a wake-up is on its way. */
void corral__ctx_signal(corral_context *c, int pending);
/* Run the loop once; timeout in ms, 0 never blocks, -1 waits for an event. */
void corral__ctx_poll(corral_context *c, int timeout_ms);
/* Take every completed watch; calls fn for each, then frees the watch. */
int corral__ctx_drain(corral_context *c, void (*fn)(void *ud, corral_future *f), void *ud);
/* Post p to c (any thread): drained by corral__ctx_drain_posts. */
void corral__ctx_post_item(corral_context *c, corral_post *p);
/* Take p back if still posted (c's own thread). */
void corral__ctx_unpost(corral_context *c, corral_post *p);
/* Take every posted item: fn(ud, p) for each (c's own thread). */
int corral__ctx_drain_posts(corral_context *c, void (*fn)(void *ud, corral_post *p), void *ud);
/* An I/O operation on c's own loop (corral.fs, corral.exec), loop thread
 * only: `begin` links p in c->live and counts it in c->io (the context is not
 * idle while it runs); `wake` posts p unless it is posted already; `end`
 * takes it out of both and unposts it. */
void corral__ctx_io_begin(corral_context *c, corral_post *p);
void corral__ctx_io_wake(corral_context *c, corral_post *p);
void corral__ctx_io_end(corral_context *c, corral_post *p);
/* Wake the home loop (a worker may have been the last one awake). */
void corral__ctx_wake_home(corral_runtime *rt);
/* 1 when nothing in the process can make progress (every worker parked
 * idle, no host future pending, nothing posted to c); 2 when only workers
 * asked to stop can (they may never: a loop that never waits); else 0. */
int corral__ctx_quiescent(corral_context *c);
/* From a __gc (no lock): a future that nothing can settle any more (its
 * reference is taken). Outside the collector: settle them with an error of
 * `kind` and `message`. */
void corral__ctx_defer(corral_context *c, corral_future *f);
void corral__ctx_run_deferred(corral_context *c, const char *kind, const char *message);

/* ---- sync.c ------------------------------------------------------------ */

/* Kinds of sync object, and the operations that wait on one. */
enum {
  SYNC_CHANNEL = 1,
  SYNC_QUEUE,
  SYNC_SEMAPHORE,
  SYNC_LOCK,
  SYNC_EVENT,
  SYNC_CONDITION,
  SYNC_BARRIER
};
enum {
  SYNC_OP_PUT = 1,
  SYNC_OP_GET,
  SYNC_OP_ACQUIRE,
  SYNC_OP_EVENT,
  SYNC_OP_NOTIFY,
  SYNC_OP_BARRIER,
  SYNC_OP_JOIN
};
/* Where a wait is: queued, or granted (done), or failed (closed, broken),
 * or gone (withdrawn, or its select won elsewhere); NOMEM: no memory. */
enum {
  SYNC_QUEUED = 0,
  SYNC_GRANTED,
  SYNC_CLOSED,
  SYNC_BROKEN,
  SYNC_GONE,
  SYNC_NOMEM,
  SYNC_UNREADABLE /* (to Lua: a value got that cannot be decoded here) */
};
#define SYNC_SELECT_MAX 64
#define SYNC_WOKEN_MAX  32

/* A value in a channel: encoded (p, len, and how to give back what it
 * holds: NULL for nothing), or, p NULL, a scalar held as it is (`tag`: a
 * boolean, a number, a string of up to SYNC_SMALL bytes): most values
 * sent through channels cost no codec and no allocation. */
#define SYNC_SMALL 22
enum { SYNC_ITEM_NONE = 0, SYNC_ITEM_FALSE, SYNC_ITEM_TRUE, SYNC_ITEM_NUMBER, SYNC_ITEM_STRING };
typedef struct {
  char *p;
  size_t len;
  void (*discard)(const char *p, size_t len);
  double num;
  int trust; /* how its bytes decode: CODEC_TRUSTED, or CODEC_PEER (a child's) */
  unsigned char tag, slen;
  char small[SYNC_SMALL];
} sync_item;

typedef struct corral_sync {
  atomic_int refs;
  _Atomic(uint64_t) handle;
  uv_mutex_t lock;
  int kind;
  long cap;   /* channel/queue: capacity (-1 none); barrier: parties */
  long value; /* semaphore/lock: permits; event: set; barrier: arrived */
  int closed; /* channel: closed; barrier: broken */
  long unfinished, generation;
  sync_item *ring; /* channel/queue values, rhead.. (rcount of rcap) */
  long rhead, rcount, rcap;
  queue waiters, putters, joiners; /* FIFO, of corral_sync_waiter */
  struct corral_sync *lock_of;     /* a condition's lock (retained) */
  uint64_t remote; /* in a process worker: the parent's object, its handle there (0: ours) */
  int lua_local;   /* a channel still kept by the Lua side of the context that made it (never
                    * shared: its values and waiters are there); the encoder hands it over */
} corral_sync;

typedef struct {
  atomic_int won; /* the index (from 1) of the case that won, or 0 */
  atomic_int refs;
} corral_sync_sel;

typedef struct corral_sync_waiter {
  corral_post post; /* first: its context's wake-up */
  queue node;       /* in a queue of s while `queued` (under s->lock) */
  int queued;
  corral_sync *s; /* retained */
  corral_context *ctx;
  corral_sync_sel *sel; /* of a select (retained), or NULL */
  int sel_idx;
  int op, state;
  long n, ival, gen;
  sync_item val; /* a putter's value; a granted getter's */
  /* a wait on a parent's object (s->remote): its request, carried by the
   * child's pump (process.c), under s->lock */
  int rstate;       /* SYNC_R_* */
  int abandoned;    /* its context dropped it: the pump frees it */
  int cancel_asked; /* its task gave up before it was sent: the pump answers GONE */
  uint64_t wire_id;
  long info[6]; /* the reply's count, closed, unfinished, waiting, putting, cap */
} corral_sync_waiter;

/* Where a remote wait is: posted to the pump, sent, answered; or given up
 * once sent (a CANCEL to send: the answer still comes). */
enum { SYNC_R_NONE = 0, SYNC_R_TO_PUMP, SYNC_R_SENT, SYNC_R_DONE, SYNC_R_CANCEL };
/* Operations of a child on a parent's object, beside the waiting ones. */
enum {
  SYNC_OP_TRY_PUT = 16,
  SYNC_OP_TRY_GET,
  SYNC_OP_CLOSE,
  SYNC_OP_RELEASE,
  SYNC_OP_SET,
  SYNC_OP_NOTIFY_N,
  SYNC_OP_TASK_DONE,
  SYNC_OP_RESET,
  SYNC_OP_INFO
};

/* One case of a wait: the object, the operation, its value (a put's:
 * taken when done; a get's: filled) and count (an acquire's). */
typedef struct {
  corral_sync *s;
  int op;
  long n, ival;
  sync_item val;
} sync_case;

/* Waiters of the caller's own context (`self`) that a grant woke: the
 * caller wakes them (more than fit are posted). */
typedef struct {
  corral_context *self;
  int n;
  corral_sync_waiter *w[SYNC_WOKEN_MAX];
} sync_woken;

typedef struct {
  long count, unfinished, waiting, putting, cap;
  int closed;
} sync_info;

corral_sync *corral__sync_new(int kind, long cap);
void corral__sync_retain(corral_sync *s);
/* Lock-free until the last reference goes: a __gc may call it. */
void corral__sync_release(corral_sync *s);
uint64_t corral__sync_handle(corral_sync *s);
int corral__sync_live(void);
int corral__sync_waiters_live(void);
/* Do one of n cases now (the first ready, in the order given; `wait` 2: the
 * records are one select even when n is 1): returns its
 * state (GRANTED, CLOSED, BROKEN) with *which its index; or, none ready,
 * SYNC_QUEUED: with `wait`, recs[i] is the waiter queued for each case
 * (one select), which the caller must finish; or SYNC_NOMEM. */
int corral__sync_select(sync_case *cases, int n, int wait, corral_context *ctx, sync_woken *k,
                        int *which, corral_sync_waiter **recs);
/* End w's wait (its context's thread): its state (GRANTED, CLOSED, BROKEN,
 * GONE: withdrawn if it was still queued). A granted value goes to *out,
 * or, `abandon`, back to where it came from (a value to the channel's head,
 * permits to the semaphore). w is freed. */
int corral__sync_finish(corral_sync_waiter *w, int abandon, sync_item *out, long *ival, long *info,
                        sync_woken *k);
/* In a process worker: start op on the parent's object s (the value v is
 * taken): a record posted to the pump (ctx's runtime's home), or NULL. */
corral_sync_waiter *corral__sync_remote_start(corral_sync *s, corral_context *ctx, int op, long n,
                                              sync_item *v);
/* Its task gives up a remote wait (a timeout, a cancel): the pump asks the
 * parent to withdraw it; the answer (GONE, or a grant that came first)
 * still comes and wakes it. 1 when it is answered already. */
int corral__sync_remote_cancel(corral_sync_waiter *w);
/* Free a record the pump owns (its context dropped it). */
void corral__sync_waiter_free(corral_sync_waiter *w);
/* Put a value back at the head of a channel (a get that could not be
 * delivered): to its first waiting getter, or into the ring. */
void corral__sync_putback(corral_sync *s, sync_item *v);
/* Put v at the tail of the ring whatever the capacity (a channel's values
 * moving from its Lua side): 0, or -1 (no memory: v is kept). */
int corral__sync_adopt(corral_sync *s, sync_item *v);
/* The case (from 1) that won w's select, or 1 for a lone wait (0: none yet). */
int corral__sync_won(corral_sync_waiter *w);
/* Win w's select for something else (a future): 1 when it did. */
int corral__sync_claim_other(corral_sync_waiter *w, int idx);
/* Close a channel (break a barrier): 1 when it was open. */
int corral__sync_close(corral_sync *s, sync_woken *k);
/* Give back n permits: -1 for a lock that is not held. */
int corral__sync_release_permits(corral_sync *s, long n, sync_woken *k);
/* Set (waking every waiter) or clear an event. */
void corral__sync_set(corral_sync *s, int on, sync_woken *k);
/* Wake up to n waiters of a condition: how many. */
long corral__sync_notify(corral_sync *s, long n, sync_woken *k);
/* A queue's task is done: -1 when none was unfinished. */
int corral__sync_task_done(corral_sync *s, sync_woken *k);
/* A barrier back to its first state (its waiters fail as broken). */
void corral__sync_reset(corral_sync *s, sync_woken *k);
void corral__sync_state(corral_sync *s, sync_info *out);

/* ---- reporter.c -------------------------------------------------------- */

/* An unretrieved-error reporter (the binding makes it a Lua userdata of
 * sizeof(corral_reporter) + len bytes) armed with `text`, in c's list. */
void corral__reporter_init(corral_reporter *r, corral_context *c, const char *text, size_t len);
/* Tie r to its future's C half (retained). */
void corral__reporter_attach(corral_reporter *r, corral_future *f);
/* Its error was retrieved or handed on: it will say nothing. */
void corral__reporter_disarm(corral_reporter *r);
/* It is collected: it writes its text if still armed (from a __gc). */
void corral__reporter_collected(corral_reporter *r);
/* Write every armed reporter of c (the process is ending). */
void corral__reporter_all(corral_context *c);
/* Report c's armed reporters when the process exits (an atexit hook, set
 * once per process), until removed: for a host that may never close its
 * Lua state. Lock-free; -1 when it cannot (c is then reported at close only). */
int corral__reporter_at_exit(corral_context *c);
void corral__reporter_at_exit_remove(corral_context *c);

/* ---- signal.c ---------------------------------------------------------- */

/* SIGINT and SIGTERM for the runner: the first is recorded and wakes c's
 * loop, the second ends the process with 128 + the signal. */
void corral__signal_catch_stop(corral_context *c);
/* The signal number received since the last call, or 0. */
int corral__signal_take_stop(void);
void corral__signal_rearm(void);
void corral__signal_release(corral_context *c);
/* A worker thread starts / ends: fatal signals name it (returns the
 * alternate signal stack to give back). */
void *corral__signal_enter_worker(corral_worker *w);
void corral__signal_leave_worker(void *altstack);

struct corral_reporter {
  queue node;
  int armed;
  corral_future *f; /* its future's C half, if any (retained): an input of a
                       call by now says nothing (the call reports it) */
  size_t len;
  char text[];
};

/* ---- runtime.c --------------------------------------------------------- */

struct corral_runtime {
  corral_context home;
  int owns_L;
  atomic_int nbusy;     /* worker contexts not parked idle (see context.c) */
  atomic_int nspin;     /* worker loops spinning before they park (context.c) */
  int spin_max;         /* at most this many workers at once: the CPUs */
  atomic_int orphans;   /* a worker lost its last handle: the home stops it */
  corral_worker **pool; /* the default pool, shared by every context (under wlock) */
  int npool;
  /* its pending host futures (future.c) */
  corral__host_count *hc;
  int exit_fast;        /* closing after an error or a signal: cancel, do not drain */
  uv_mutex_t wlock;     /* guards workers, spare, no_spare, closing */
  queue workers;        /* every worker instance started, until joined */
  corral_worker *spare; /* a worker started ahead, for the next start (worker.c) */
  int spare_pid;        /* the process that made it (a forked child has not its thread) */
  int no_spare;         /* spares are off */
  int child;            /* this runtime serves a process worker's parent (process.c) */
  atomic_int exit_code; /* a worker's os.exit(n) here: n + 1, or 0 (the child exits with n) */
  /* in a process worker's child: the ring the parent reads to learn which
   * calls started (shared memory; see process.c), and its size - 1 */
  _Atomic(uint64_t) *start_ring;
  uint64_t ring_mask;
  int closing; /* no more spares: the runtime closes */
  /* Host functions (corral_register), for every Lua state of the runtime:
   * kept in rt.c, under hostlock; nhost is read without it (0: none, no
   * lock taken). A NULL function is a name a process worker's child knows
   * it cannot call (the parent's host function). */
  uv_mutex_t hostlock;
  struct corral__hostfn *hostfns;
  int caphost;
  atomic_int nhost;
  atomic_int exit_status; /* corral.exit(n) in the home state of an embedded runtime: n, or -1 */
  int exit_ends_process;  /* the `corral` command runs a script: corral.exit ends the process */
};

corral_runtime *corral__rt_create(lua_State *L, int owns_L);
/* Host functions: add name -> fn (0; CORRAL_EINVAL when the name has
 * another function already; CORRAL_ENOMEM); find one (1 found, its function
 * in *fn, NULL for a name known to be out of reach; 0 not found); each
 * name in turn, fn(ud, name, f). Any thread. */
int corral__rt_host_add(corral_runtime *rt, const char *name, lua_CFunction fn);
int corral__rt_host_find(corral_runtime *rt, const char *name, lua_CFunction *fn);
void corral__rt_host_each(corral_runtime *rt,
                          void (*fn)(void *ud, const char *name, lua_CFunction f), void *ud);
/* corral.exit(status) in an embedded runtime (the home's thread): the
 * status is kept (the first one), the workers are asked to stop (their
 * calls cancelled, as closing after an error does) and no spare is made;
 * nothing is freed or joined (corral_close does that). */
void corral__rt_halt(corral_runtime *rt, int status);
/* The CPUs this process may use: its affinity, capped by its cgroup's
 * quota (cpu.max); read once. */
int corral__cpu_count(void);
void corral__rt_destroy(corral_runtime *rt);

/* ---- codec.c ----------------------------------------------------------- */

typedef struct {
  const char *what;        /* names the values in errors: "args" (default), "result" */
  int offset;              /* values before the named ones: the first is what[1 - offset] */
  const char *const *lead; /* with offset: the names of those values ("class", ...) */
  int unwrap;              /* futures become dependencies (DEP) rather than references */
  corral_future **deps;    /* with unwrap: the futures found, retained (malloc'd) */
  int ndeps, capdeps;
  int bare;       /* one value, no array around it (corral.encode: plain MessagePack) */
  int no_refs;    /* bytes for outside the process: a future or a worker is an error */
  int no_handles; /* for another process: a worker handle is an error (futures are inputs) */
  int no_shm;     /* buffers as their bytes, never by descriptor (a boot payload) */
  int has_refs;   /* out: the payload holds references (futures, workers) */
  char err[512];  /* out: why encoding failed, with the value's path */
} codec_opts;

typedef struct {
  corral_future **f;
  int n;
} codec_deps;

/* How far decoded bytes are believed. Trusted: made by this process's encoder
 * (call arguments, results, worker boot payloads): functions, handles and
 * dependencies are taken, after checking. Foreign: from anywhere else (a
 * string given to core.decode, a result a C host settled): plain values,
 * loaded modules and timestamps only. */
enum { CODEC_TRUSTED = 0, CODEC_FOREIGN = 1, CODEC_PEER = 2 };
/* CODEC_PEER: bytes from a process worker of this program (the same key):
 * functions it made load, but no reference to a live object (futures,
 * workers, inputs) is followed: those are the other process's. */
/* Or'ed into corral__codec_decode's trust: how errors name the values. */
enum {
  CODEC_AS_VALUES = 0,
  CODEC_AS_ARGS = 1 << 4,
  CODEC_AS_RESULT = 2 << 4,
  CODEC_AS_INIT = 3 << 4,
  CODEC_ONE = 1 << 6,   /* the payload is one value, an array too (corral.decode) */
  CODEC_SHM = 1 << 7,   /* it may hold SHMFD extensions: descriptors that came over a process
                         * worker's socket, put there by this process (see process.c) */
  CODEC_MARKED = 1 << 8 /* modules and C functions by name only inside a function whose
                         * mark authenticated it (a remote host with --trust) */
};
/* The SHM extensions of a payload (buffers in shared memory, to or from a
 * process worker), in order: fn(ud, body, type) for each, `body` the 16
 * bytes of it (writable: the caller owns the bytes) and body[-1] its type.
 * 0, -1 when the bytes do not parse, or fn's nonzero answer. */
enum { CODEC_SHM_REF = 11, CODEC_SHM_FD = 12 };
int corral__codec_shm_each(char *data, size_t len,
                           int (*fn)(void *ud, unsigned char *body, int type), void *ud);

/* Encode the n values at L[from..] as a MessagePack array into a malloc'd
 * buffer. On failure returns NULL (o->err says why). Raises only when Lua
 * runs out of memory, and leaks nothing then. */
char *corral__codec_encode(lua_State *L, int from, int n, size_t *len, codec_opts *o);
/* Decode a MessagePack array and push its elements (a payload that is not an
 * array is one value); returns how many, or -1 with an error message pushed
 * that names where (`result[1].a[3]: ...`). `deps` resolves unwrapped
 * futures; `trust` is CODEC_TRUSTED or CODEC_FOREIGN, or'ed with a
 * CODEC_AS_* name. Raises only when Lua runs out of memory. */
int corral__codec_decode(lua_State *L, const char *data, size_t len, codec_deps *deps, int trust);
/* The process's key for the marks on bytecode; a process worker takes its
 * parent's (set before any thread encodes or decodes). */
void corral__codec_key(uint64_t *k0, uint64_t *k1);
void corral__codec_set_key(uint64_t k0, uint64_t k1);
/* A thread worker handle as C sees it (the `_c` of a Lua handle): what the
 * codec sends of it, with no call into Lua. Each instance is a counted
 * handle on its worker. */
typedef struct {
  char name[64];
  char balance[16];
  int blocking;
  double timeout; /* each call's time limit in seconds, or 0 */
  int n;
  corral_worker *insts[];
} corral__handle;

/* What the codec needs of the layers above it, handed to it once (the
 * binding does, as it opens): making a Lua future of a C future, and the
 * handles and references of worker instances. */
typedef struct {
  void (*push_future)(lua_State *L, corral_future *f);
  void (*push_worker)(lua_State *L, corral_worker *w); /* takes a reference */
  /* The C half of the Lua future at idx (NULL: not one); *deferred when it
   * was made settled, to settle by flush once the encode is done. */
  corral_future *(*future_of)(lua_State *L, int idx, int *deferred);
  void (*flush)(lua_State *L);
  /* The C half of the worker handle at idx: 1, or 0 for an async or sync
   * worker (no C half), -1 for a table that only claims to be one. */
  int (*handle_of)(lua_State *L, int idx, const corral__handle **h);
  /* Push the function that rebuilds a handle (options, instances...): 0
   * when there is none. */
  int (*push_import)(lua_State *L);
  uint64_t (*worker_handle)(corral_worker *w);
  void (*worker_hold)(corral_worker *w);
  void (*worker_drop)(corral_worker *w);
  void (*worker_release)(corral_worker *w);
  /* Push an empty buffer userdata (may raise: nothing is held yet) and
   * return its slot, for the decoder to fill with a reference. NULL in
   * the iface: this state decodes no buffers. */
  corral_buffer **(*push_buffer_slot)(lua_State *L);
  /* The C object of the sync userdata at idx (NULL: not one); push a new
   * userdata on s (taking a reference). */
  corral_sync *(*sync_of)(lua_State *L, int idx);
  void (*push_sync)(lua_State *L, corral_sync *s);
  /* A channel of this context's Lua side (lua_local) leaves it: its values
   * and waiters move to the C object (runs corral's Lua; encodes nothing). */
  void (*sync_share)(lua_State *L, int idx);
} corral__codec_iface;
void corral__codec_init(const corral__codec_iface *iface);
/* A copy of the payload p (n bytes, encoded here) fit for another process:
 * each BUFFER extension becomes SHM (a buffer in shared memory, sealed,
 * retained by the copy: release with corral__codec_discard) or BYTES.
 * NULL when p holds no buffer (send it as it is), or on failure (*failed). */
char *corral__codec_for_process(const char *p, size_t n, size_t *out, int *failed);
/* A copy of the payload p (encoded here) for a child process: each SYNC
 * extension becomes RSYNC (the object's handle here, which the child sends
 * back in its SYNC frames), after keep(ud, s) took a reference to it (0,
 * or -1: refused). NULL when p holds none (send it as it is), or on
 * failure (*failed). */
char *corral__codec_syncs_for_child(const char *p, size_t n, size_t *out,
                                    int (*keep)(void *ud, corral_sync *s), void *ud, int *failed);
/* Release the references an encoded payload holds. Takes no lock, runs no Lua. */
void corral__codec_discard(const char *data, size_t len);
/* Free an encoded payload, first releasing its references when it holds
 * some (`refs`, the encoder's has_refs). */
void corral__codec_free(char *data, size_t len, int refs);
/* The `message` of an encoded error (a map), as text: 1 when found. Reads
 * untrusted bytes: nothing else of them is used. */
int corral__codec_error_message(const char *data, size_t len, char *out, size_t size);
/* Bytes a C host settles a future with (corral_future_set_result): NULL when
 * they are one MessagePack array of values that the decoder takes from
 * outside the process (CODEC_FOREIGN: no functions, handles or
 * dependencies; timestamps, REFs to tables before them, modules and C
 * functions by name, bytes), or why not. No Lua: any thread. */
const char *corral__codec_check_foreign(const char *data, size_t len);
/* The one value of corral_future_set_string and the others, as a payload
 * ([v], malloc'd), or NULL; and the first value of a payload, of that
 * type: 1 found (a string points into data), 0 none or another type, -1
 * no memory. */
enum { CODEC_VALUE_NIL = 0, CODEC_VALUE_BOOLEAN, CODEC_VALUE_NUMBER, CODEC_VALUE_STRING };
char *corral__codec_pack_one(int type, const char *s, size_t slen, double num, size_t *len);
int corral__codec_first(const char *data, size_t len, int type, const char **s, size_t *slen,
                        double *num);
/* Test hooks: make the nth C allocation of the codec from now fail (0: none);
 * count the codec's live C allocations. */
void corral__codec_fail_alloc(int nth);
int corral__codec_live(void);

/* ---- transport_thread.c ------------------------------------------------ */

/* How the worker core reaches an instance's context. start: begin running
 * w->tr_run in it, then w->tr_done (0, or an error code); wake: work or a
 * stop was posted (called under the context's qlock); join: wait for its
 * end. */
typedef struct corral__transport {
  const char *kind;
  int (*start)(corral_worker *w);
  void (*wake)(corral_worker *w, int pending);
  void (*join)(corral_worker *w);
} corral__transport;

/* The context on a thread of this process. */
extern const corral__transport corral__thread_transport;
/* Tests: the next `threads` thread starts fail. */
void corral__thread_inject(int threads);
int corral__thread_inject_pending(void);

/* ---- process.c --------------------------------------------------------- */

/* A process worker's body (its transport thread runs it): the proxy
 * between its inbox and its child process. */
void corral__process_main(corral_worker *w);
/* A process worker's policy when its child dies: start another up to
 * restart_limit times (after `backoff` seconds, doubling), and run the
 * calls it had again up to `retries` times each. */
void corral__process_policy(corral_worker *w, int restart_limit, double backoff, int retries,
                            double cancel_grace);
/* The program a child is started with (argv, NULL-terminated; copied). */
void corral__process_program(const char *const *argv);
/* In a child started so: serve the parent on descriptor fd, the instance
 * running as a thread worker (`body`) of rt. Never returns. */
int corral__process_child(corral_runtime *rt, int fd, void (*body)(corral_worker *w));

/* ---- nats.c ----------------------------------------------------------- */

/* A connection to a NATS server (remote workers) and a mailbox of the
 * messages one of its subscriptions received. Both are counted; a Lua
 * userdata holds a reference; closing is explicit (and at the end:
 * corral__nats_close_all). */
typedef struct corral_nats corral_nats;
typedef struct corral_mbox corral_mbox;
typedef struct {
  const char *url, *user, *password, *token, *ca, *cert, *key, *name;
  double timeout; /* seconds to connect */
  int send_asap;  /* publish at once, not through libnats' flusher */
} corral_nats_opts;
/* A call: published on `subject` (through JetStream when js) with the
 * payload and Corral-* headers; `what` names it in errors. */
typedef struct {
  const char *subject, *method, *kind, *refs, *what;
  const char *payload;
  size_t len;
  int js, tries;
} corral_nats_call;
/* A received message, copied (headers: Corral-Method, -Call, -Reply,
 * -Tries, -Kind, -Refs, -Status; "" when absent). */
enum { CORRAL_NATS_NHDR = 7 };
typedef struct corral__nats_msg {
  struct corral__nats_msg *next;
  const char *subject, *reply, *data;
  size_t len;
  uint64_t delivered;                /* JetStream: the times it was delivered (1 the first) */
  const char *hdr[CORRAL_NATS_NHDR]; /* (in buf) */
  char buf[];
} corral__nats_msg;
corral_nats *corral__nats_new(void *owner); /* owner: its runtime */
void corral__nats_retain(corral_nats *c);
void corral__nats_release(corral_nats *c);
/* Connect on the connection's thread: the future (a new reference) says
 * how it went. NULL: a bad option (err says which) or no memory. */
corral_future *corral__nats_connect(corral_nats *c, const corral_nats_opts *o, char *err,
                                    size_t errsz);
int corral__nats_close(corral_nats *c);
void corral__nats_close_all(void *owner);
/* 0 connecting, 1 connected, 2 reconnecting, 3 closed; its id; reconnects. */
int corral__nats_state(corral_nats *c, char *id, size_t idsz, int *reconnects);
/* in msgs, out msgs, in bytes, out bytes: 0, or -1 (not connected). */
int corral__nats_stats(corral_nats *c, uint64_t out[4]);
/* Send a call: 0 with its future (a new reference) and number, or why
 * not: CORRAL_NATS_CLOSED (the connection is closed), CORRAL_NATS_TOO_BIG
 * (over the server's max_payload), -1 (anything else). */
enum { CORRAL_NATS_CLOSED = -2, CORRAL_NATS_TOO_BIG = -3 };
int corral__nats_call(corral_nats *c, const corral_nats_call *k, corral_future **out, uint64_t *num,
                      char *err, size_t errsz);
/* The call n's reply is no longer awaited (it settled otherwise). */
void corral__nats_forget(corral_nats *c, uint64_t n);
int corral__nats_pending(corral_nats *c);
/* Publish a reply (a Corral-Status header when status): 0, or -1 and why. */
int corral__nats_publish(corral_nats *c, const char *subject, const char *status, const char *data,
                         size_t len, char *err, size_t errsz);
int corral__nats_ack(corral_nats *c, const char *reply, const char *what);
/* The pool's stream, made when missing (on the connection's thread). */
corral_future *corral__nats_ensure_pool(corral_nats *c, const char *pool);
/* The result bucket (JetStream key-value "corral_results", made when
 * missing): keep a result under key; read one (the future settles with it,
 * decoded as foreign bytes). On the connection's thread; NULL: no memory. */
corral_future *corral__nats_kv_put(corral_nats *c, const char *key, const char *data, size_t len);
corral_future *corral__nats_kv_get(corral_nats *c, const char *key);
/* A mailbox of a subscription (a queue group when `group`). */
corral_mbox *corral__nats_subscribe(corral_nats *c, const char *subject, const char *group,
                                    char *err, size_t errsz);
/* A mailbox of the pool's durable pull consumer (made when missing); its
 * thread fetches as many as corral__mbox_want says; *ready settles once
 * attached. */
corral_mbox *corral__nats_pull(corral_nats *c, const char *pool, int64_t ack_wait_ms,
                               int64_t max_ack_pending, corral_future **ready, char *err,
                               size_t errsz);
/* A future (new reference) settled when the mailbox holds a message or closes. */
corral_future *corral__mbox_wait(corral_mbox *mb);
/* Take up to max messages (the caller frees them); *closed: closed and empty. */
int corral__mbox_take(corral_mbox *mb, corral__nats_msg **out, int max, int *closed);
void corral__mbox_want(corral_mbox *mb, int n);
void corral__mbox_close(corral_mbox *mb);
void corral__mbox_release(corral_mbox *mb);

/* ---- worker.c ---------------------------------------------------------- */

/* A call on its way to a worker instance. */
typedef struct corral_call {
  queue node;            /* in the inbox, then in the worker's `taken` until finished */
  int taken;             /* owned by its worker's `taken` list, not by a userdata */
  corral_future *result; /* retained */
  char *payload;         /* encoded arguments (inside this block when payload_inline) */
  int payload_inline;
  uint64_t wire_id;   /* a process worker's: its number on the wire, and */
  int wire_state;     /* WIRE_*: where it is (the proxy's thread only) */
  int tries;          /* times it was run again after its process died */
  int unsent;         /* handed to a process that died before it started: sent again as new */
  uint64_t cancel_at; /* a process worker's call cancelled while handed over: when its
                       * grace ends (uv_hrtime), or 0 */
  size_t len;
  int payload_refs;
  int ndeps;
  corral_future **deps;    /* inputs to unwrap, retained */
  corral_future *accepted; /* in the overflow: settled as it moves into the inbox */
  size_t mlen;
  char method[]; /* mlen bytes (a name may hold any byte) and a NUL */
} corral_call;

/* How a worker stops; ordered: a later mode overrides an earlier one. */
enum { WORKER_RUNNING = 0, WORKER_DRAIN = 1, WORKER_CANCEL = 2, WORKER_CRASHED = 3 };

struct corral_worker {
  atomic_int refs;
  atomic_int handles; /* Lua handles on it, in every context: at 0 it stops */
  corral_runtime *rt;
  corral_context ctx;                 /* its loop runs on `thread` */
  const struct corral__transport *tr; /* how the core reaches its context */
  void (*tr_run)(corral_worker *w);   /* what its transport runs (the binding's main) */
  void (*tr_done)(corral_worker *w);  /* the core's, when that has ended */
  uv_thread_t thread;
  int joined; /* under rt->wlock */
  char *boot; /* encoded {class, init args}: read once by the thread */
  size_t bootlen;
  int boot_refs;
  queue taken; /* calls taken by the worker's Lua, not finished (its thread only) */
  /* under ctx.qlock */
  queue inbox;
  int queued, cap;
  queue overflow;      /* calls whose callers wait for room, in order */
  atomic_int stopping; /* WORKER_*: written under ctx.qlock, read anywhere */
  int orphan_stop;     /* stopped because its last handle went (under ctx.qlock) */
  int orphan_seen;     /* the home's orphan sweep took it (under rt->wlock) */
  int booted;          /* its Lua main runs (the worker's thread only) */
  int spare;           /* SPARE_*: a worker started ahead (see worker.c), under ctx.qlock */
  int spare_let_go;    /* told to end and not joined: it frees itself (under ctx.qlock) */
  int process;         /* its instance runs in a child process (process.c): how many of its calls it
                        * runs at once (max_concurrency); 0 for a thread worker. Set at start. */
  int restart_limit, retries;  /* a process worker's restarts and re-runs (under ctx.qlock) */
  uint64_t restart_backoff_ms; /* the wait before the first restart (doubling; ctx.qlock) */
  uint64_t cancel_grace_ms;    /* how long a cancelled call may run on (process; ctx.qlock) */
  uv_cond_t spare_cond;        /* a spare waits on it, under ctx.qlock */
  char *crash;                 /* why it died (an encoded error), set before CRASHED */
  size_t crashlen;
  atomic_int crash_carried; /* a call failed with it: its report is that call's */
  uv_mutex_t curlock;       /* guards current only: never held with another lock */
  char current[64];         /* the method running now ("" when none), under curlock */
  atomic_int active;        /* calls queued or running */
  corral_future *stopped;   /* settled as the thread ends */
  queue rt_node;            /* in rt->workers, under rt->wlock */
  _Atomic(uint64_t) handle; /* its handle once it crossed contexts, or 0 */
  char name[64];
};

corral_call *corral__call_new(const char *method, size_t mlen, corral_future *result, char *payload,
                              size_t len, int refs, corral_future **deps, int ndeps);
void corral__call_free(corral_call *c);
/* The arguments are decoded: give back their bytes and what they hold. */
void corral__call_drop_payload(corral_call *c);
/* Start a thread worker (the runtime's spare when it has one and `spare`);
 * NULL with *err set (a CORRAL_E* or libuv code). */
corral_worker *corral__worker_start(corral_runtime *rt, const char *name, char *boot, size_t len,
                                    int refs, int cap, void (*body)(corral_worker *w), int spare,
                                    int process, int *err);
/* A worker's state: 0 a worker; SPARE_* one started ahead (worker.c). */
enum { SPARE_NONE = 0, SPARE_WAITING, SPARE_TAKEN, SPARE_QUIT };
/* Start the runtime's spare (running `body`) unless it has one, or spares
 * are off, or it closes. */
void corral__worker_make_spare(corral_runtime *rt, void (*body)(corral_worker *w));
/* On a worker's thread, once its Lua state is ready: wait until this spare
 * is taken (1; at once for a worker started cold) or told to end (0). */
int corral__worker_await(corral_worker *w);
/* End the spare w: told, then joined and released; or, `let_go`, left to
 * end and free itself (detached: a process ending at once). */
void corral__worker_end_spare(corral_worker *w, int let_go);
/* End the runtime's spare if it has one; `for_good`: it will make no more. */
void corral__worker_drop_spare(corral_runtime *rt, int for_good);
/* Spares on (the default) or off (the one there is ends). */
void corral__worker_spares(corral_runtime *rt, int on);
void corral__worker_retain(corral_worker *w);
void corral__worker_release(corral_worker *w);
/* w's handle, issued on first use (0 when the handle table is full). */
uint64_t corral__worker_handle(corral_worker *w);
/* Queue a call (the worker owns it from here): 0 queued; CORRAL_EAGAIN
 * full: it waits in the overflow, and *accepted (a new reference) settles
 * when it moves into the inbox (the caller waits for that: backpressure);
 * CORRAL_ECLOSED stopping; CORRAL_ECRASHED dead (the caller keeps it). */
int corral__worker_push(corral_worker *w, corral_call *c, corral_future **accepted);
/* Take up to max calls from the inbox (the worker's own thread). */
int corral__worker_take(corral_worker *w, corral_call **out, int max);
void corral__worker_stop(corral_worker *w, int how);
/* The worker's thread is about to end because it died: `payload` (an
 * encoded error, taken) fails what it had and what comes. */
void corral__worker_crash(corral_worker *w, char *payload, size_t len);
/* The same, with a WorkerCrashed saying `message`. */
void corral__worker_crash_text(corral_worker *w, const char *message);
/* A copy of the crash payload (NULL when it did not crash). */
char *corral__worker_crash_copy(corral_worker *w, size_t *len);
/* The method the worker runs now, for reports ("" when none). */
void corral__worker_set_current(corral_worker *w, const char *method, size_t len);
void corral__worker_current(corral_worker *w, char *out, size_t size);
/* Stop every worker and join their threads: `fast` cancels and gives them a
 * second; otherwise they drain what is queued while anything can progress
 * (a SIGINT or SIGTERM meanwhile makes it fast, and is given in *sig).
 * Returns how many are still running (their threads are left behind). */
int corral__worker_close_all(corral_runtime *rt, int fast, int *sig);
void corral__worker_join(corral_worker *w);

/* A handle on w (a Lua userdata or an encoded payload) is made / goes. When
 * the last goes the worker is an orphan: no lock is taken (this may run in
 * a __gc); the home stops it at its next drain (corral__worker_stop_orphans). */
void corral__worker_hold_handle(corral_worker *w);
void corral__worker_drop_handle(corral_worker *w);
/* Stop (draining) the workers with no handle left; tells `stopping` of each. */
void corral__worker_stop_orphans(corral_runtime *rt, void (*stopping)(void *ud, corral_worker *w),
                                 void *ud);
/* Join the workers that stopped after their last handle went. */
void corral__worker_reap(corral_runtime *rt);

/* ---- the Lua binding: lua_util.c, lua_future.c, lua_codec.c,
 *      lua_worker.c, lua_loop.c, lua_core.c (bottom-up) ---------------- */

/* Registry keys and metatables of the binding (the codec knows none of
 * them: what it needs comes through its interface). */
#define CFUTURE_MT  "corral.cfuture"
#define REPORTER_MT "corral.reporter"
#define WORKER_MT   "corral.worker"
#define CREF_KEY    "corral.cref"
#define IMPORT_KEY  "corral.import_worker"
#define REQUIRE_KEY "corral.require" /* the require corral was loaded with */
#define FLUSH_KEY   "corral.flush_crefs"
#define HANDLE_MT   "corral.handle"

#define WRAP_KEY    "corral.wrap"
#define DRIVE_KEY   "corral.drive"
#define TIMEOUT_KEY "corral.backend_timeout"
#define CALL_MT     "corral.call"

/* lua_util.c: the runtime and context a lua_State runs in; a codec error as
 * Lua results (nil, why). (The CPU count is corral__cpu_count, in rt.c.) */
corral_runtime *corral__lua_rt(lua_State *L);
corral_context *corral__ctx_of(lua_State *L);
/* Note the runtime and the context the state L belongs to (its registry). */
void corral__lua_set_home(lua_State *L, corral_runtime *rt, corral_context *c);
int corral__lua_codec_error(lua_State *L, const char *err);
/* The error on top of the stack as text, for C to print (replaced there by
 * its text: an error object's __tostring, run protected; never NULL). */
const char *corral__lua_errtext(lua_State *L);
/* A C object boxed in a Lua userdata with metatable `mt`: the pointer
 * first (a box is also a `T **`), and a second word for its kind's use.
 * Every corral userdata that holds a C object is one (futures, workers,
 * calls). */
typedef struct {
  void *p;
  void *aux;
} corral__box;
corral__box *corral__box_push(lua_State *L, void *p, void *aux, const char *mt);
corral__box *corral__box_check(lua_State *L, int idx, const char *mt);
/* Register the metatable `mt` of a box kind, its __gc being `gc`. */
void corral__box_kind(lua_State *L, const char *mt, lua_CFunction gc);

/* lua_future.c: C futures as Lua userdata; corral_push_future and
 * corral_to_future for corral's own use (the public ones mark the future as
 * one that host code may settle). */
corral_future **corral__lua_cf_check(lua_State *L, int idx);
void corral__lua_cf_push(lua_State *L, corral_future *f);
/* Encode the values from stack index 3 on (the error, for a failure) and
 * settle f in `state` with them: 1 settled, 0 settled already; -1, with nil
 * and why they cannot travel pushed, when they cannot. */
int corral__lua_settle_encoded(lua_State *L, corral_future *f, int state);
void corral__lcore_push_future(lua_State *L, corral_future *f);
corral_future *corral__lcore_to_future(lua_State *L, int idx);
void corral__lua_future_open(lua_State *L);
corral_future *corral__lua_future_of(lua_State *L, int idx, int *deferred);
void corral__lua_flush_crefs(lua_State *L);
extern const luaL_Reg corral__lua_future_funcs[];
extern const luaL_Reg corral__lua_buffer_funcs[];
void corral__lua_buffer_open(lua_State *L);
extern const luaL_Reg corral__lua_sync_funcs[];
extern const luaL_Reg corral__lua_fs_funcs[];
extern const luaL_Reg corral__lua_exec_funcs[];
/* lua_nats.c: remote workers' NATS bridge (nats.c) in Lua. */
extern const luaL_Reg corral__lua_nats_funcs[];
void corral__lua_nats_open(lua_State *L);
void corral__lua_sync_open(lua_State *L);
corral_sync *corral__lua_sync_of(lua_State *L, int idx);
void corral__lua_sync_push(lua_State *L, corral_sync *s);
void corral__lua_sync_share(lua_State *L, int idx);
corral_buffer **corral__lua_buffer_slot(lua_State *L);

/* lua_codec.c, lua_worker.c, lua_loop.c: their corral.core functions. */
extern const luaL_Reg corral__lua_codec_funcs[];
void corral__lua_worker_open(lua_State *L, void (*body)(corral_worker *w));
/* A new Lua handle on w (counted), taking a reference the caller holds. */
void corral__lua_worker_push(lua_State *L, corral_worker *w);
int corral__lua_handle_of(lua_State *L, int idx, const corral__handle **h);
int corral__lua_push_import(lua_State *L);
extern const luaL_Reg corral__lua_worker_funcs[];
extern const luaL_Reg corral__lua_loop_funcs[];
/* lua_host.c: host functions and corral.exit for embedded runtimes: their
 * corral.core functions, and _G's __index of a worker's state, through
 * which it finds the host functions (registered before or after it
 * started). */
extern const luaL_Reg corral__lua_host_funcs[];
void corral__lua_host_open(lua_State *L);
/* Run the Lua scheduler for one turn (block=0) or until idle (block=1). */
int corral__lcore_drive(lua_State *L, int block);

/* lua_core.c: the body of a worker thread: its own lua_State on its own
 * loop. */
void corral__lcore_worker_main(corral_worker *w);
/* Tests: worker Lua states that cannot be made, and after how many
 * allocations the next one runs out of memory (set by inject_fault). */
extern atomic_int corral__inject_state, corral__inject_alloc;
/* A lua_CFunction: make corral loadable in this state (package.preload)
 * and load it. */
int corral__lcore_load(lua_State *L);

/* ---- trace.c (the lowest layer: calls no other file) and lua_trace.c -- */

/* The trace timeline (docs/trace.md): events of every context, written at
 * stop as a Chrome trace-event file. Timestamps in microseconds since the
 * start; tracks (tid) named by corral__trace_thread. */
int corral__trace_start(const char *path, char *err, size_t errlen);
/* 0: written (*count events); 1: no trace ran; -1: the file could not be
 * written (err says why). */
int corral__trace_stop(char *err, size_t errlen, long *count);
int corral__trace_on(void);
double corral__trace_now(void);
uint64_t corral__trace_newid(void);
int corral__trace_thread(const char *name);
/* A complete slice; id 0 and bytes < 0 are left out of its args. */
void corral__trace_slice(int tid, const char *name, size_t nlen, const char *cat, double ts,
                         double dur, uint64_t id, long bytes);
void corral__trace_flow(int tid, char ph, double ts, uint64_t id, const char *name);
/* The future `id` settled on track tid at ts; a later unwrap of it into a
 * call (on tid at ts) draws a flow from there (0 when it is not known). */
void corral__trace_settled(uint64_t id, int tid, double ts);
int corral__trace_unwrap(uint64_t from, int tid, double ts);
/* Process workers: the environment entry a child started now gets while a
 * trace runs (1: written into buf; 0: none), and, in the child, its trace
 * started from that entry's value (0) and written by corral__trace_stop. */
int corral__trace_child_env(char *buf, size_t n);
int corral__trace_start_child(const char *spec);
/* A process worker's call: sent (in the caller: its future's id, where),
 * handed to the child (by the proxy: its future, the child's pid, its
 * number on the wire), and the id of the flow into it (in the child). */
void corral__trace_sent(uint64_t id, int tid, double ts);
void corral__trace_wire(const void *result, long child, uint64_t wire);
uint64_t corral__trace_wire_id(long child, uint64_t wire);
extern const luaL_Reg corral__lua_trace_funcs[];

/* Private error codes, beside those of corral.h. */
#define CORRAL_EAGAIN   (-10)
#define CORRAL_ECLOSED  (-11)
#define CORRAL_ECRASHED (-12)

#endif
