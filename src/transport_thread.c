/* transport_thread.c: the thread transport beneath the worker core: a
 * worker instance whose context runs on an OS thread of this process, the
 * calls crossing in memory (the core's inbox), wake-ups through the
 * context's uv_async_t.
 *
 * A transport is how the core reaches an instance's context (the vtable in
 * internal.h): today this one; next a framed pipe to a child process. It
 * calls nothing above it: the core hands it what to run.
 */
#include "internal.h"

/* Faults to inject, for tests: how many of the next thread starts fail. */
static atomic_int inject_threads;

void corral__thread_inject(int threads) { atomic_store(&inject_threads, threads); }

int corral__thread_inject_pending(void) { return atomic_load(&inject_threads) > 0; }

/* The thread: fatal signals name the worker while `run` (the core's) runs. */
static void thread_main(void *arg) {
  corral_worker *w = arg;
  void *altstack = corral__signal_enter_worker(w);
  w->tr_run(w);
  corral__signal_leave_worker(altstack);
  w->tr_done(w);
}

static int thread_start(corral_worker *w) {
  if (atomic_load(&inject_threads) > 0 && atomic_fetch_sub(&inject_threads, 1) > 0)
    return UV_EAGAIN;
  return uv_thread_create(&w->thread, thread_main, w);
}

/* Called under the context's qlock: work or a stop was posted to it. */
static void thread_wake(corral_worker *w, int pending) {
  if (!w->ctx.closed) corral__ctx_signal(&w->ctx, pending);
}

static void thread_join(corral_worker *w) { uv_thread_join(&w->thread); }

const corral__transport corral__thread_transport = {"thread", thread_start, thread_wake,
                                                    thread_join};
