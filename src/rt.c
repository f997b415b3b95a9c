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

/* A name a host registered and its function (corral_register). The array
 * only grows: a name stays as long as the runtime. */
struct corral__hostfn {
  char *name;
  lua_CFunction fn;
};

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
  atomic_init(&rt->nhost, 0);
  atomic_init(&rt->exit_status, -1);
  if ((rt->hc = corral__host_count_new()) == NULL) {
    free(rt);
    return NULL;
  }
  if (uv_mutex_init(&rt->wlock) != 0) {
    corral__host_count_release(rt->hc);
    free(rt);
    return NULL;
  }
  if (uv_mutex_init(&rt->hostlock) != 0) {
    uv_mutex_destroy(&rt->wlock);
    corral__host_count_release(rt->hc);
    free(rt);
    return NULL;
  }
  if (corral__ctx_init(&rt->home, rt, L) != 0) {
    uv_mutex_destroy(&rt->hostlock);
    uv_mutex_destroy(&rt->wlock);
    corral__host_count_release(rt->hc);
    free(rt);
    return NULL;
  }
  return rt;
}

void corral__rt_destroy(corral_runtime *rt) {
  fflush(stdout); /* what was printed is out, whatever ends the process now */
  /* the state is closing: what only its Lua could settle never will. (After
   * corral.exit, once the workers have ended: the calls they were told to
   * cancel are cancelled, not abandoned.) */
  int halted = atomic_load(&rt->exit_status) >= 0;
  if (!halted)
    corral__ctx_run_deferred(&rt->home, "CancelledError",
                             "abandoned: the runtime closed before it settled");
  /* its NATS connections close: what waits on them fails */
  corral__nats_close_all(rt);
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
  if (halted)
    corral__ctx_run_deferred(&rt->home, "CancelledError",
                             "abandoned: corral.exit stopped the runtime before it settled");
  corral__ctx_close(&rt->home, left == 0);
  if (left > 0) return; /* their threads still use it: leave it to the process */
  for (int i = 0; i < atomic_load(&rt->nhost); i++)
    free(rt->hostfns[i].name);
  free(rt->hostfns);
  uv_mutex_destroy(&rt->hostlock);
  uv_mutex_destroy(&rt->wlock);
  corral__host_count_release(rt->hc);
  free(rt);
}

/* ======================================================================== */
/* Host functions                                                            */
/* ======================================================================== */

static int host_index(corral_runtime *rt, const char *name) {
  int n = atomic_load(&rt->nhost);
  for (int i = 0; i < n; i++)
    if (strcmp(rt->hostfns[i].name, name) == 0) return i;
  return -1;
}

int corral__rt_host_add(corral_runtime *rt, const char *name, lua_CFunction fn) {
  int rc = 0;
  uv_mutex_lock(&rt->hostlock);
  int i = host_index(rt, name);
  if (i >= 0) {
    if (rt->hostfns[i].fn != fn) rc = CORRAL_EINVAL;
    uv_mutex_unlock(&rt->hostlock);
    return rc;
  }
  int n = atomic_load(&rt->nhost);
  if (n == rt->caphost) {
    int cap = rt->caphost ? rt->caphost * 2 : 8;
    struct corral__hostfn *a = realloc(rt->hostfns, sizeof *a * (size_t)cap);
    if (a == NULL) {
      uv_mutex_unlock(&rt->hostlock);
      return CORRAL_ENOMEM;
    }
    rt->hostfns = a;
    rt->caphost = cap;
  }
  char *copy = strdup(name);
  if (copy == NULL) {
    uv_mutex_unlock(&rt->hostlock);
    return CORRAL_ENOMEM;
  }
  rt->hostfns[n].name = copy;
  rt->hostfns[n].fn = fn;
  atomic_store(&rt->nhost, n + 1);
  uv_mutex_unlock(&rt->hostlock);
  return 0;
}

int corral__rt_host_find(corral_runtime *rt, const char *name, lua_CFunction *fn) {
  if (atomic_load(&rt->nhost) == 0) return 0; /* (most runtimes: no lock) */
  uv_mutex_lock(&rt->hostlock);
  int i = host_index(rt, name);
  if (i >= 0) *fn = rt->hostfns[i].fn;
  uv_mutex_unlock(&rt->hostlock);
  return i >= 0;
}

void corral__rt_host_each(corral_runtime *rt,
                          void (*fn)(void *ud, const char *name, lua_CFunction f), void *ud) {
  uv_mutex_lock(&rt->hostlock);
  int n = atomic_load(&rt->nhost);
  for (int i = 0; i < n; i++)
    fn(ud, rt->hostfns[i].name, rt->hostfns[i].fn);
  uv_mutex_unlock(&rt->hostlock);
}

/* ======================================================================== */
/* corral.exit in an embedded runtime                                        */
/* ======================================================================== */

void corral__rt_halt(corral_runtime *rt, int status) {
  int none = -1;
  if (!atomic_compare_exchange_strong(&rt->exit_status, &none, status)) return;
  /* the spare is joined (before exit_fast, which would let it go: the host
   * goes on, and corral_close joins every thread the runtime started) */
  corral__worker_drop_spare(rt, 1);
  rt->exit_fast = 1; /* closing cancels the workers' calls: it does not drain them */
  uv_mutex_lock(&rt->wlock);
  for (queue *q = queue_head(&rt->workers); q != &rt->workers; q = q->next)
    corral__worker_stop(queue_data(q, corral_worker, rt_node), WORKER_CANCEL);
  uv_mutex_unlock(&rt->wlock);
}
