/* internal.h: declarations shared by the files of src/, private to corral. */
#ifndef CORRAL_INTERNAL_H
#define CORRAL_INTERNAL_H

#include <stdatomic.h>
#include <uv.h>

#include "corral.h"
#include "queue.h"

typedef struct corral_context corral_context;

/* ---- future.c ---------------------------------------------------------- */

/* A context's interest in a future: posted to the context when it settles. */
typedef struct corral_watch {
  corral_context *ctx;
  corral_future *f;          /* holds a reference */
  struct corral_watch *next; /* in f->watches, under f->lock */
  queue node;                /* in ctx->watching or ctx->completed, under ctx->qlock */
} corral_watch;

struct corral_future {
  atomic_int refs;
  atomic_int state; /* corral_state; written under lock, read anywhere */
  uv_mutex_t lock;
  corral_watch *watches;
  char *payload; /* encoded results or error (malloc'd), set once when settled */
  size_t len;
};

/* Settle f, taking ownership of payload (freed on failure). */
int future_settle(corral_future *f, corral_state state, char *payload, size_t len);
/* pending -> running; 0 when it took effect. */
int future_start(corral_future *f);
/* Register ctx's interest: 0 when registered, 1 when f is already settled. */
int future_watch(corral_future *f, corral_context *ctx);
/* Drop ctx's watch on f if it is still registered: 1 when removed (the watch
 * is freed), 0 when a settle already took it. */
int future_unwatch(corral_future *f, corral_watch *w);

/* ---- context.c --------------------------------------------------------- */

typedef struct corral_reporter corral_reporter;

struct corral_context {
  corral_runtime *rt;
  lua_State *L;
  uv_loop_t loop;
  uv_async_t async;
  uv_timer_t timer;
  uv_mutex_t qlock;
  queue watching;  /* watches registered, future pending (under qlock) */
  queue completed; /* watches whose future settled, to drain (under qlock) */
  queue reporters; /* unretrieved errors, loop thread only */
};

int ctx_init(corral_context *c, corral_runtime *rt, lua_State *L);
void ctx_close(corral_context *c);
/* Called by future_settle with the watch already unlinked from its future. */
void ctx_post(corral_watch *w);
/* Run the loop once; timeout in ms, 0 never blocks, -1 waits for an event. */
void ctx_poll(corral_context *c, int timeout_ms);
/* Take every completed watch; calls fn for each, then frees the watch. */
int ctx_drain(corral_context *c, void (*fn)(void *ud, corral_future *f), void *ud);
/* SIGINT handling for the runner: the first Ctrl-C is counted and wakes the
 * loop, the second ends the process. */
void ctx_catch_sigint(corral_context *c);
int ctx_take_sigint(void);
/* Unretrieved-error reporters (lua_core.c makes them Lua userdata). */
void ctx_report_all(corral_context *c);

struct corral_reporter {
  queue node;
  int armed;
  size_t len;
  char text[];
};

/* ---- runtime.c --------------------------------------------------------- */

struct corral_runtime {
  corral_context home;
  int owns_L;
};

corral_runtime *rt_create(lua_State *L, int owns_L);
void rt_destroy(corral_runtime *rt);

/* ---- codec.c ----------------------------------------------------------- */

/* Encode the n values at L[from..] as a MessagePack array into a malloc'd
 * buffer. On failure returns NULL and pushes nothing, leaving a message in
 * err (size errlen). */
char *codec_encode(lua_State *L, int from, int n, size_t *len, char *err, size_t errlen);
/* Decode a MessagePack array and push its elements; returns how many, or -1
 * with an error message pushed. */
int codec_decode(lua_State *L, const char *data, size_t len);

/* ---- lua_core.c -------------------------------------------------------- */

int lcore_open(lua_State *L, corral_runtime *rt);
/* Run the Lua scheduler for one turn (block=0) or until idle (block=1). */
int lcore_drive(lua_State *L, int block);

#endif
