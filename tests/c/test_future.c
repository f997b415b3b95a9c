/* test_future.c: the C API and the thread-safety of futures: threads settle
 * futures while the loop waits on them; foreign threads wait on futures the
 * loop settles; stepping from a host; closing with futures still out. */
#include <msgpack.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lua.h>

#include "corral.h"
#include "tap.h"

/* internal, from libcorral.a: threads blocked in corral_future_wait now */
int corral__future_sleepers(void);

/* ---- many threads settle futures while the loop gathers them ------------ */

#define NFUT     4000
#define NTHREADS 4

typedef struct {
  corral_future **fs;
  int from, step;
} settler;

static void *settle_some(void *arg) {
  settler *s = arg;
  int last = s->from + ((NFUT - 1 - s->from) / s->step) * s->step;
  /* each thread settles its share from the end: the completions interleave */
  for (int j = last; j >= s->from; j -= s->step) {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_int(&pk, j);
    msgpack_pack_str_with_body(&pk, "x", 1);
    corral_future_set_result(s->fs[j], sb.data, sb.size);
    msgpack_sbuffer_destroy(&sb);
  }
  return NULL;
}

static void test_threads_settle(void) {
  corral_runtime *rt = corral_open();
  lua_State *L = corral_lua(rt);
  corral_future *fs[NFUT];
  lua_createtable(L, NFUT, 0);
  for (int i = 0; i < NFUT; i++) {
    fs[i] = corral_future_new(rt);
    corral_push_future(L, fs[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setglobal(L, "fs");
  pthread_t th[NTHREADS];
  settler ss[NTHREADS];
  for (int t = 0; t < NTHREADS; t++) {
    ss[t] = (settler){fs, t, NTHREADS};
    pthread_create(&th[t], NULL, settle_some, &ss[t]);
  }
  /* The loop sleeps in epoll until the threads' settles wake it. */
  int rc = run_lua(L, "local corral = require 'corral'\n"
                      "local r = corral.gather(fs, {timeout = 60})\n"
                      "for i = 1, #fs do assert(r[i] ~= nil) end\n"
                      "local a, b = fs[7]:result(); assert(b == 'x')\n"
                      "ok_count = #r");
  for (int t = 0; t < NTHREADS; t++)
    pthread_join(th[t], NULL);
  CHECK(rc == 0, "gather over futures settled by 4 threads");
  lua_getglobal(L, "ok_count");
  CHECK(lua_tointeger(L, -1) == NFUT, "every result arrived");
  lua_pop(L, 1);
  int all_done = 1;
  for (int i = 0; i < NFUT; i++) {
    if (corral_future_state(fs[i]) != CORRAL_DONE) all_done = 0;
    corral_future_release(fs[i]);
  }
  CHECK(all_done, "every future is DONE in C");
  corral_close(rt);
}

/* ---- a foreign thread waits on a future that Lua settles ----------------- */

/* A Lua future in the global f; its C half, retained (NULL when none). */
static corral_future *global_lua_future(lua_State *L) {
  run_lua(L, "f = require('corral').future()");
  lua_getglobal(L, "f");
  corral_future *f = corral_to_future(L, -1);
  lua_pop(L, 1);
  if (f != NULL) corral_future_retain(f);
  return f;
}

typedef struct {
  corral_future *f;
  int rc;
  corral_state state;
} waiter_arg;

static void *wait_foreign(void *arg) {
  waiter_arg *w = arg;
  w->rc = corral_future_wait(w->f, 30);
  w->state = corral_future_state(w->f);
  return NULL;
}

static void test_foreign_wait(void) {
  corral_runtime *rt = corral_open();
  lua_State *L = corral_lua(rt);
  corral_future *f = global_lua_future(L);
  CHECK(f != NULL, "corral_to_future gives the C half of a Lua future");
  waiter_arg w = {f, -99, CORRAL_PENDING};
  pthread_t th;
  pthread_create(&th, NULL, wait_foreign, &w);
  /* settle only once the thread is blocked in the wait (bounded: 10 s) */
  for (int i = 0; i < 10000 && corral__future_sleepers() == 0; i++) {
    struct timespec ms = {0, 1000000};
    nanosleep(&ms, NULL);
  }
  CHECK(corral__future_sleepers() == 1, "the foreign thread blocks in corral_future_wait");
  run_lua(L, "f:set_result(42)");
  pthread_join(th, NULL);
  CHECK(w.rc == 0 && w.state == CORRAL_DONE,
        "a blocked foreign thread's wait returns when Lua settles");
  CHECK(corral_future_set_result(f, NULL, 0) == CORRAL_ESTATE, "settling twice is CORRAL_ESTATE");
  corral_future *g = corral_future_new(rt);
  CHECK(corral_future_wait(g, 0.01) == CORRAL_ETIMEDOUT, "a wait times out");
  CHECK(corral_future_cancel(g) == 0 && corral_future_state(g) == CORRAL_CANCELLED, "cancel");
  CHECK(corral_future_cancel(g) == CORRAL_ESTATE, "cancel twice is CORRAL_ESTATE");
  corral_future_release(g);
  corral_future_release(f);
  corral_close(rt);
}

/* ---- errors from C ------------------------------------------------------- */

static void test_error_from_c(void) {
  corral_runtime *rt = corral_open();
  lua_State *L = corral_lua(rt);
  corral_future *f = corral_future_new(rt);
  corral_push_future(L, f);
  lua_setglobal(L, "f");
  corral_future_set_error(f, "WorkerError", "disk on fire");
  int rc = run_lua(L, "local corral = require 'corral'\n"
                      "local ok, e = pcall(f.result, f)\n"
                      "assert(not ok and corral.is_error(e, 'WorkerError'), tostring(e))\n"
                      "assert(e.message == 'disk on fire')");
  CHECK(rc == 0, "an error set from C is raised in Lua as an error object");
  corral_future_release(f);
  corral_close(rt);
}

/* ---- a host settles a Lua future ----------------------------------------- */

static void *settle_from_thread(void *arg) {
  static const char one_result[] = {(char)0x91, 0x2a}; /* [42] */
  corral_future_set_result(arg, one_result, sizeof one_result);
  return NULL;
}

static void test_host_settles_lua_future(void) {
  corral_runtime *rt = corral_open();
  lua_State *L = corral_lua(rt);
  corral_future *f = global_lua_future(L);
  pthread_t th;
  pthread_create(&th, NULL, settle_from_thread, f);
  int rc = run_lua(L, "assert(f:result(10) == 42)");
  pthread_join(th, NULL);
  CHECK(rc == 0, "a Lua future settled by host C code through corral_to_future gives its result");
  corral_future_release(f);
  corral_close(rt);
}

/* ---- a host steps the runtime ------------------------------------------- */

static void test_step(void) {
  corral_runtime *rt = corral_open();
  lua_State *L = corral_lua(rt);
  CHECK(corral_dostring(rt, "local c = require 'corral'; c.sleep(0.02); stepped = c.now()") == 0,
        "corral_dostring starts a task");
  int steps = 0;
  while (corral_step(rt) == 1)
    steps++;
  lua_getglobal(L, "stepped");
  CHECK(lua_isnumber(L, -1), "corral_step drove the task to its end");
  CHECK(steps > 1, "the task took more than one step (corral_step never blocks)");
  lua_pop(L, 1);
  CHECK(corral_backend_fd(rt) >= 0, "corral_backend_fd");
  CHECK(corral_dostring(rt, "this is not lua") == CORRAL_ELUA, "a syntax error is CORRAL_ELUA");
  corral_close(rt);
}

/* ---- the loop contract: poll the fd with the timeout, then step --------- */

static void test_loop_contract(void) {
  corral_runtime *rt = corral_open();
  lua_State *L = corral_lua(rt);
  CHECK(corral_backend_timeout(rt) == -1, "an idle runtime's backend timeout is -1");
  /* a timer, then a result from a thread worker (it comes through the fd) */
  CHECK(corral_dostring(rt, "local c = require 'corral'; c.sleep(0.3); "
                            "local w = c.worker { sq = function(_, x) return x * x end }"
                            ":options { mode = 'thread' }:init(); "
                            "done = w:sq(7):result(); w:stop()") == 0,
        "corral_dostring starts a task");
  CHECK(corral_backend_timeout(rt) == 0, "a ready task makes the timeout 0");
  corral_step(rt);
  int t = corral_backend_timeout(rt);
  printf("# timeout with a 0.3 s sleep pending: %d ms\n", t);
  CHECK(t > 100 && t <= 300, "with a 0.3 s sleep pending the timeout is that sleep's");
  double t0 = mono_s();
  int polls = 0;
  struct pollfd pfd = {corral_backend_fd(rt), POLLIN, 0};
  for (;;) {
    int ms = corral_backend_timeout(rt);
    if (ms != 0) {
      polls++;
      poll(&pfd, 1, ms < 0 ? 5000 : ms); /* (-1: only the fd; bounded here) */
    }
    if (corral_step(rt) != 1) break;
    if (mono_s() - t0 > 10) break;
  }
  double took = mono_s() - t0;
  lua_getglobal(L, "done");
  CHECK(lua_tointeger(L, -1) == 49, "the host loop drove the script to its end");
  lua_pop(L, 1);
  printf("# the host loop took %.3f s and %d polls\n", took, polls);
  CHECK(took >= 0.2 && took < 3.0, "it took about the sleep, not a poll's full bound");
  CHECK(polls < 200, "it polled a bounded number of times, not spinning");
  CHECK(corral_backend_timeout(rt) == -1, "idle again: -1");
  corral_close(rt);
}

/* ---- the host gets the chunk's future ----------------------------------- */

static void test_chunk_future(void) {
  corral_runtime *rt = corral_open();
  corral_future *ok = corral_dostring_future(rt, "require 'corral'.sleep(0.01); return 42");
  corral_future *bad =
      corral_dostring_future(rt, "require 'corral'.sleep(0.01); error('boom here')");
  CHECK(ok != NULL && bad != NULL, "corral_dostring_future gives the chunks' futures");
  CHECK(corral_dostring_future(rt, "this is not lua") == NULL, "a chunk that does not load: NULL");
  CHECK(corral_dofile_future(rt, "/nonexistent/x.lua") == NULL, "a file that does not load: NULL");
  char msg[200];
  CHECK(corral_future_error_message(bad, msg, sizeof msg) == CORRAL_ESTATE,
        "no error message while it runs");
  corral_run(rt);
  CHECK(corral_future_state(ok) == CORRAL_DONE, "the chunk that returned is DONE");
  const void *mp;
  size_t len;
  corral_future_payload(ok, &mp, &len);
  CHECK(len == 2 && memcmp(mp, "\x91\x2a", 2) == 0, "its payload is the results: [42]");
  CHECK(corral_future_state(bad) == CORRAL_FAILED, "the chunk that raised FAILED");
  CHECK(corral_future_error_message(bad, msg, sizeof msg) == 0 && strstr(msg, "boom here") != NULL,
        "the host reads the run-time error's message");
  printf("# %s\n", msg);
  CHECK(corral_future_error_message(ok, msg, sizeof msg) == CORRAL_ESTATE,
        "a DONE future has no error message");
  corral_future_release(ok);
  corral_future_release(bad);
  corral_close(rt);
}

/* ---- closing with futures still held by other threads ------------------- */

static int late_rc = -99;

static void *settle_late(void *arg) {
  corral_future *f = arg;
  late_rc = corral_future_set_result(f, NULL, 0);
  return NULL;
}

static void test_close_with_watches(void) {
  corral_runtime *rt = corral_open();
  lua_State *L = corral_lua(rt);
  corral_future *f = corral_future_new(rt);
  corral_push_future(L, f); /* the loop watches it */
  lua_pop(L, 1);
  corral_close(rt);
  pthread_t th;
  pthread_create(&th, NULL, settle_late, f);
  pthread_join(th, NULL);
  /* the closed loop's watch was withdrawn: settling posts nowhere (ASan
   * would report a use of the freed context) */
  CHECK(late_rc == 0 && corral_future_state(f) == CORRAL_DONE,
        "a future settled after its runtime closed settles, touching nothing freed");
  corral_future_release(f);
}

int main(void) {
  test_threads_settle();
  test_foreign_wait();
  test_error_from_c();
  test_host_settles_lua_future();
  test_step();
  test_loop_contract();
  test_chunk_future();
  test_close_with_watches();
  printf("1..%d\n", count);
  return failures != 0;
}
