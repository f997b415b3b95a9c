/* rt.c: the runtime object's life: its home context, its workers, and how
 * it closes (below the binding, which makes one as corral loads). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* ======================================================================== */
/* Life                                                                      */
/* ======================================================================== */

/* The CPU quota of this process's cgroup (v2 `cpu.max`, rounded up), or 0
 * when there is none or it cannot be read. */
static int cgroup_cpus(void) {
  char path[600] = "/sys/fs/cgroup/cpu.max", line[512];
  FILE *f = fopen("/proc/self/cgroup", "r");
  if (f != NULL) {
    while (fgets(line, sizeof line, f) != NULL) {
      if (strncmp(line, "0::/", 4) != 0) continue;
      line[strcspn(line, "\n")] = '\0';
      if (line[4] != '\0') snprintf(path, sizeof path, "/sys/fs/cgroup%s/cpu.max", line + 3);
    }
    fclose(f);
  }
  if ((f = fopen(path, "r")) == NULL && (f = fopen("/sys/fs/cgroup/cpu.max", "r")) == NULL)
    return 0;
  long quota = 0, period = 0;
  int got = fscanf(f, "%ld %ld", &quota, &period);
  fclose(f);
  if (got != 2 || quota <= 0 || period <= 0) return 0; /* "max": no quota */
  return (int)((quota + period - 1) / period);
}

/* Read once, by the first runtime made (the home state's, before any worker
 * thread runs: files opened here had better not race with the descriptors
 * libuv closes behind ThreadSanitizer). */
static atomic_int ncpu;

int corral__cpu_count(void) {
  int n = atomic_load(&ncpu);
  if (n > 0) return n;
  n = (int)uv_available_parallelism(); /* the CPUs this process may run on */
  int quota = cgroup_cpus();           /* and how much of them it may use */
  if (quota > 0 && quota < n) n = quota;
  if (n < 1) n = 1;
  atomic_store(&ncpu, n);
  return n;
}

corral_runtime *corral__rt_create(lua_State *L, int owns_L) {
  corral_runtime *rt = calloc(1, sizeof *rt);
  if (rt == NULL) return NULL;
  rt->owns_L = owns_L;
  queue_init(&rt->workers);
  atomic_init(&rt->nbusy, 0);
  atomic_init(&rt->nspin, 0);
  rt->spin_max = corral__cpu_count(); /* (workers: see context.c) */
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
  corral__worker_drop_spare(rt, 1);
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
