/* tap.h: what the C tests share: TAP output (CHECK), running Lua code, a
 * monotonic clock and the count of this process's threads. */
#ifndef CORRAL_TEST_TAP_H
#define CORRAL_TEST_TAP_H

#include <dirent.h>
#include <stdio.h>
#include <time.h>

#include <lauxlib.h>
#include <lua.h>

static int failures, count;

#define CHECK(cond, what)                                                                          \
  do {                                                                                             \
    count++;                                                                                       \
    if (cond) {                                                                                    \
      printf("ok %d - %s\n", count, what);                                                         \
    } else {                                                                                       \
      printf("not ok %d - %s (%s:%d)\n", count, what, __FILE__, __LINE__);                         \
      failures++;                                                                                  \
    }                                                                                              \
  } while (0)

/* Run a chunk; on an error print it (as a TAP comment) and return -1. */
static inline int run_lua(lua_State *L, const char *code) {
  if (luaL_dostring(L, code) != 0) {
    lua_getglobal(L, "tostring");
    lua_insert(L, -2);
    lua_call(L, 1, 1);
    printf("# lua error: %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
    return -1;
  }
  return 0;
}

/* A monotonic clock, in seconds. */
static inline double mono_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The threads of this process now. */
static inline int thread_count(void) {
  DIR *d = opendir("/proc/self/task");
  int n = 0;
  if (d == NULL) return -1;
  for (struct dirent *e; (e = readdir(d)) != NULL;)
    if (e->d_name[0] != '.') n++;
  closedir(d);
  return n;
}

#endif
