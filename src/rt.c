/* rt.c: the runtime object's life: its home context, its workers, and how
 * it closes (below the binding, which makes one as corral loads). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

/* ======================================================================== */
/* Life                                                                      */
/* ======================================================================== */

corral_runtime *corral__rt_create(lua_State *L, int owns_L) {
  corral_runtime *rt = calloc(1, sizeof *rt);
  if (rt == NULL) return NULL;
  rt->owns_L = owns_L;
  queue_init(&rt->workers);
  atomic_init(&rt->nbusy, 0);
  atomic_init(&rt->nspin, 0);
  rt->spin_max = (int)uv_available_parallelism(); /* (workers: see context.c) */
  if (uv_mutex_init(&rt->wlock) != 0) {
    free(rt);
    return NULL;
  }
  if (corral__ctx_init(&rt->home, rt, L) != 0) {
    uv_mutex_destroy(&rt->wlock);
    free(rt);
    return NULL;
  }
  return rt;
}

void corral__rt_destroy(corral_runtime *rt) {
  fflush(stdout); /* what was printed is out, whatever ends the process now */
  /* the state is closing: what only its Lua could settle never will */
  corral__ctx_run_deferred(&rt->home, "CancelledError",
                           "abandoned: the runtime closed before it settled");
  /* no thread outlives the runtime, unless it runs code that never waits */
  uv_mutex_lock(&rt->wlock);
  corral_worker **pool = rt->pool;
  int npool = rt->npool;
  rt->pool = NULL;
  rt->npool = 0;
  uv_mutex_unlock(&rt->wlock);
  for (int i = 0; i < npool; i++)
    corral__worker_release(pool[i]);
  free(pool);
  int sig;
  int left = corral__worker_close_all(rt, rt->exit_fast, &sig);
  if (sig != 0) { /* the runner was told to end while it closed: end now */
    fprintf(stderr, "corral: %s\n", sig == SIGINT ? "interrupted" : "terminated");
    fflush(NULL);
    _exit(128 + sig);
  }
  corral__ctx_close(&rt->home, left == 0);
  if (left > 0) return; /* their threads still use it: leave it to the process */
  uv_mutex_destroy(&rt->wlock);
  free(rt);
}
