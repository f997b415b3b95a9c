/* host.c: a C host with a fixed 60 Hz frame loop, the way a game embeds
 * corral. It runs frame.lua (two CPU-bound thread workers, their results
 * coming back every few frames), calls corral_step once a frame, and
 * measures the time spent in it. At the end it prints the distribution of
 * that time and how many frames corral made late.
 *
 *   host [script.lua [seconds]]    (CORRAL_HOST_SECONDS: the seconds, 10)
 *
 * Build: `make` here against an installed corral (pkg-config), or
 * `make example-host` at the top of the source tree. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lua.h>

#include <corral.h>

#define FPS 60

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sleep_until(double t) {
  struct timespec ts;
  ts.tv_sec = (time_t)t;
  ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) != 0) {
  }
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static long frame_no;

/* host_frame(): the frame the host is drawing (a host function the script
 * calls, from the home state here; thread workers could call it too). */
static int host_frame(lua_State *L) {
  lua_pushinteger(L, frame_no);
  return 1;
}

/* A number of the script's `stats` table. */
static double stat(lua_State *L, const char *field) {
  lua_getglobal(L, "stats");
  lua_getfield(L, -1, field);
  double v = lua_tonumber(L, -1);
  lua_pop(L, 2);
  return v;
}

int main(int argc, char **argv) {
  const char *script = argc > 1 ? argv[1] : "examples/host/frame.lua";
  const char *env = getenv("CORRAL_HOST_SECONDS");
  double seconds = argc > 2 ? atof(argv[2]) : env != NULL ? atof(env) : 10;
  long frames = (long)(seconds * FPS);
  if (frames < 1) frames = 1;
  double budget = 1.0 / FPS;

  corral_runtime *rt = corral_open();
  if (rt == NULL) return 1;
  lua_State *L = corral_lua(rt);
  corral_register(rt, "host_frame", host_frame);
  if (corral_dofile(rt, script) != 0) return 1;

  double *step = malloc(sizeof(double) * (size_t)frames);
  if (step == NULL) return 1;
  long n = 0, missed = 0, late = 0, warmup = 0;
  double start = 0;
  double next = now_s();
  for (frame_no = 0; n < frames; frame_no++) {
    double deadline = next + budget;
    double t0 = now_s();
    int rc = corral_step(rt); /* never blocks */
    double t1 = now_s();
    if (rc < 0) {
      fprintf(stderr, "host: corral_step: %s\n", corral_strerror(rc));
      return 1;
    }
    /* measured once the workers are busy (the first result came back);
     * the frames before start them */
    if (warmup == 0 && stat(L, "calls") > 0) warmup = frame_no;
    if (warmup == 0) {
      start += t1 - t0;
    } else {
      step[n++] = t1 - t0;
      if (t1 > deadline && t0 <= deadline) missed++; /* corral made this frame late */
    }
    /* ... the host would draw its frame here ... */
    next = deadline;
    if (now_s() > next)
      late++; /* (late for another reason: the machine was busy) */
    else
      sleep_until(next);
  }
  double calls = stat(L, "calls");
  qsort(step, (size_t)n, sizeof *step, cmp_double);
  printf("%ld frames at %d Hz (%.1f s) with 2 busy workers, after %ld frames (%.1f ms in "
         "corral_step) starting them; %.0f calls answered\n",
         n, FPS, (double)n / FPS, warmup, start * 1e3, calls);
  printf("corral_step per frame: p50 %.1f us, p99 %.1f us, max %.1f us\n", step[n / 2] * 1e6,
         step[n * 99 / 100] * 1e6, step[n - 1] * 1e6);
  printf("frames missed because corral_step overran the %.1f ms budget: %ld (late for other "
         "reasons: %ld)\n",
         budget * 1e3, missed, late);
  free(step);

  /* the end: the tasks stop asking, the workers finish, corral closes */
  lua_pushboolean(L, 0);
  lua_setglobal(L, "running");
  corral_run(rt);
  corral_close(rt);
  return calls > 0 ? 0 : 1;
}
