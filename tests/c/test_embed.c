/* test_embed.c: what a C host embeds corral with: host functions in every
 * state (corral_register), calling Lua functions as tasks (corral_spawn),
 * values without MessagePack (corral_future_set_* / _get_*), untrusted
 * payloads refused (corral_future_set_result), corral.exit returned to the
 * host (CORRAL_EEXIT, corral_exit_status), and corral_close reporting and
 * joining. Run under valgrind by embed_spec.
 *
 * CORRAL_EMBED_FUZZ: how many random payloads to try (20000). As a process
 * worker's child (argv: -e code, as corral starts one), it runs the code. */
#include <dirent.h>
#include <sys/stat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "corral.h"
#include "tap.h"

/* Run a chunk as a task until the runtime is idle: its future, DONE or
 * FAILED (printed when it failed). */
static corral_future *run_chunk(corral_runtime *rt, const char *code) {
  corral_future *f = corral_dostring_future(rt, code);
  if (f == NULL) return NULL;
  corral_run(rt);
  if (corral_future_state(f) == CORRAL_FAILED) {
    char msg[600];
    corral_future_error_message(f, msg, sizeof msg);
    printf("# chunk failed: %s\n", msg);
  }
  return f;
}

/* The chunk's first result as a string equals `want`. */
static int chunk_gives(corral_runtime *rt, const char *code, const char *want) {
  corral_future *f = run_chunk(rt, code);
  const char *s = NULL;
  size_t len = 0;
  int ok = f != NULL && corral_future_get_string(f, &s, &len) == 0 && len == strlen(want) &&
           memcmp(s, want, len) == 0;
  if (!ok && f != NULL && s != NULL) printf("# got '%.*s'\n", (int)len, s);
  if (f != NULL) corral_future_release(f);
  return ok;
}

/* ---- host functions ------------------------------------------------------ */

static int host_add(lua_State *L) {
  lua_pushnumber(L, luaL_checknumber(L, 1) + luaL_checknumber(L, 2));
  return 1;
}

static int host_late(lua_State *L) {
  lua_pushfstring(L, "late:%s", luaL_checkstring(L, 1));
  return 1;
}

static int host_other(lua_State *L) {
  (void)L;
  return 0;
}

static void test_register(void) {
  corral_runtime *rt = corral_open();
  CHECK(corral_register(rt, "host_add", host_add) == 0, "corral_register");
  CHECK(corral_register(NULL, "x", host_add) == CORRAL_EINVAL, "a NULL runtime: CORRAL_EINVAL");
  CHECK(corral_register(rt, NULL, host_add) == CORRAL_EINVAL, "a NULL name: CORRAL_EINVAL");
  CHECK(corral_register(rt, "", host_add) == CORRAL_EINVAL, "an empty name: CORRAL_EINVAL");
  CHECK(corral_register(rt, "host_x", NULL) == CORRAL_EINVAL, "a NULL function: CORRAL_EINVAL");
  CHECK(corral_register(rt, "host_add", host_add) == 0, "the same name and function again: 0");
  CHECK(corral_register(rt, "host_add", host_other) == CORRAL_EINVAL,
        "the same name with another function: CORRAL_EINVAL");
  /* a worker started after the first register, before the second */
  CHECK(chunk_gives(rt,
                    "local c = require 'corral'\n"
                    "W = c.worker { add = function(_, a, b) return host_add(a, b) end,\n"
                    "  late = function(_, s) return host_late(s) end,\n"
                    "  missing = function() return type(host_never) end }\n"
                    "w = W:options { mode = 'thread' }:init()\n"
                    "return tostring(w:add(2, 3):result()) .. ' ' .. tostring(host_add(1, 1))",
                    "5 2"),
        "a host function registered before the worker started: the worker and the script call it");
  CHECK(chunk_gives(rt, "return w:missing():result()", "nil"),
        "a name nobody registered is a nil global in a worker");
  CHECK(corral_register(rt, "host_late", host_late) == 0,
        "corral_register after the worker started");
  CHECK(chunk_gives(rt, "return w:late('x'):result()", "late:x"),
        "a worker started before the register call calls it");
  CHECK(chunk_gives(rt,
                    "local w2 = W:options { mode = 'thread', workers = 2 }:init()\n"
                    "local r = w2:late('y'):result() .. ' ' .. host_late('home')\n"
                    "w2:stop(); return r",
                    "late:y late:home"),
        "workers started after it and the home state call it");
  CHECK(chunk_gives(rt, "w:stop(); return 'stopped'", "stopped"), "the workers stop");
  corral_close(rt);
}

/* A process worker cannot call a host function: it says so. (The child is
 * this program: see main.) */
static void test_register_process(void) {
  corral_runtime *rt = corral_open();
  corral_register(rt, "host_add", host_add);
  corral_future *f =
      run_chunk(rt, "local c = require 'corral'\n"
                    "local w = c.worker { add = function(_, a, b) return host_add(a, b) end }"
                    ":options { mode = 'process' }:init()\n"
                    "local ok, e = pcall(function() return w:add(1, 2):result(20) end)\n"
                    "w:stop()\n"
                    "return tostring(ok) .. ' ' .. tostring(e)");
  const char *s = NULL;
  size_t len = 0;
  int got = f != NULL && corral_future_get_string(f, &s, &len) == 0;
  if (got) printf("# %.*s\n", (int)len, s);
  CHECK(got && len > 6 && memcmp(s, "false ", 6) == 0 && strstr(s, "corral_register") != NULL &&
            strstr(s, "host_add") != NULL,
        "a process worker that uses a host function gets an error naming it and corral_register");
  if (f != NULL) corral_future_release(f);
  corral_close(rt);
}

/* ---- corral_spawn ---------------------------------------------------------- */

static void write_file(const char *path, const char *text) {
  FILE *fp = fopen(path, "w");
  if (fp == NULL) return;
  fputs(text, fp);
  fclose(fp);
}

static void test_spawn(void) {
  corral_runtime *rt = corral_open();
  lua_State *L = corral_lua(rt);
  /* modules in a directory of their own */
  char dir[] = "/tmp/corral-embed-XXXXXX", path[200];
  if (mkdtemp(dir) == NULL) return;
  snprintf(path, sizeof path, "%s/embed_mod.lua", dir);
  write_file(path, "return { greet = function(s) require('corral').sleep(0.01); "
                   "return 'hello ' .. s end }");
  snprintf(path, sizeof path, "%s/embed_pkg", dir);
  mkdir(path, 0700);
  snprintf(path, sizeof path, "%s/embed_pkg/inner.lua", dir);
  write_file(path, "return { twice = function(x) return 2 * x end }");
  snprintf(path, sizeof path, "%s/embed_bad.lua", dir);
  write_file(path, "error('embed_bad cannot load')");
  char code[400];
  snprintf(code, sizeof code,
           "package.path = '%s/?.lua;' .. package.path\n"
           "function add(a, b) require('corral').sleep(0.01); return a + b end\n"
           "game = { title = function(s) return 'T:' .. s end, n = 3 }\n"
           "function boom() error('boom from Lua') end",
           dir);
  CHECK(luaL_dostring(L, code) == 0, "the host defines functions");
  int top = lua_gettop(L);

  lua_pushnumber(L, 2);
  lua_pushnumber(L, 3);
  corral_future *f = corral_spawn(rt, "add", 2);
  CHECK(f != NULL && lua_gettop(L) == top,
        "corral_spawn of a global: a future, the arguments popped");
  double d = 0;
  CHECK(corral_future_get_number(f, &d) == CORRAL_ESTATE,
        "get_number while it runs: CORRAL_ESTATE");
  corral_run(rt);
  CHECK(corral_future_get_number(f, &d) == 0 && d == 5, "it ran as a task: 5");
  const char *s;
  size_t len;
  CHECK(corral_future_get_string(f, &s, &len) == CORRAL_EINVAL,
        "get_string of a number: CORRAL_EINVAL");
  corral_future_release(f);

  lua_pushliteral(L, "x");
  f = corral_spawn(rt, "game.title", 1);
  corral_run(rt);
  CHECK(f != NULL && corral_future_get_string(f, &s, &len) == 0 && len == 3 &&
            memcmp(s, "T:x", 3) == 0,
        "a field of a global: game.title");
  corral_future_release(f);

  lua_pushliteral(L, "you");
  f = corral_spawn(rt, "embed_mod.greet", 1);
  corral_run(rt);
  CHECK(f != NULL && corral_future_get_string(f, &s, &len) == 0 && len == 9 &&
            memcmp(s, "hello you", 9) == 0,
        "a function of a module that require finds: embed_mod.greet");
  corral_future_release(f);

  lua_pushnumber(L, 21);
  f = corral_spawn(rt, "embed_pkg.inner.twice", 1);
  corral_run(rt);
  CHECK(f != NULL && corral_future_get_number(f, &d) == 0 && d == 42,
        "the longest prefix that is a module: embed_pkg.inner.twice");
  corral_future_release(f);

  f = corral_spawn(rt, "boom", 0);
  corral_run(rt);
  char msg[200];
  CHECK(f != NULL && corral_future_state(f) == CORRAL_FAILED &&
            corral_future_error_message(f, msg, sizeof msg) == 0 &&
            strstr(msg, "boom from Lua") != NULL,
        "a function that raises: its future FAILED with the error");
  CHECK(corral_future_get_number(f, &d) == CORRAL_ESTATE, "get_number of a failure: CORRAL_ESTATE");
  corral_future_release(f);

  printf("# the errors below are corral_spawn's, as documented\n");
  fflush(stdout);
  lua_pushnumber(L, 1);
  CHECK(corral_spawn(rt, "no_such_fn", 1) == NULL && lua_gettop(L) == top,
        "no such function: NULL, the arguments popped");
  CHECK(corral_spawn(rt, "game.nope", 0) == NULL, "no such field: NULL");
  CHECK(corral_spawn(rt, "game.n", 0) == NULL, "not a function: NULL");
  CHECK(corral_spawn(rt, "game.n.x", 0) == NULL, "a field of a number: NULL");
  CHECK(corral_spawn(rt, "nomodule_here.fn", 0) == NULL, "no such module: NULL");
  CHECK(corral_spawn(rt, "embed_bad.fn", 0) == NULL, "a module that fails to load: NULL");
  CHECK(corral_spawn(rt, "", 0) == NULL && corral_spawn(rt, NULL, 0) == NULL, "no name: NULL");
  lua_pushnumber(L, 1);
  CHECK(corral_spawn(rt, "add", 2) == NULL && lua_gettop(L) == top + 1,
        "more arguments than the stack holds: NULL, nothing popped");
  CHECK(corral_spawn(rt, "add", -1) == NULL && lua_gettop(L) == top + 1, "nargs < 0: NULL");
  lua_settop(L, top);
  corral_close(rt);
  snprintf(code, sizeof code, "rm -rf '%s'", dir);
  if (system(code) != 0) printf("# could not remove %s\n", dir);
}

/* ---- values without MessagePack ------------------------------------------ */

static void test_values(void) {
  corral_runtime *rt = corral_open();
  lua_State *L = corral_lua(rt);
  corral_future *fs[6];
  lua_createtable(L, 6, 0);
  for (int i = 0; i < 6; i++) {
    fs[i] = corral_future_new(rt);
    corral_push_future(L, fs[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setglobal(L, "fs");
  CHECK(corral_future_set_string(fs[0], "a\0b", 3) == 0, "set_string (a NUL inside)");
  CHECK(corral_future_set_number(fs[1], 42) == 0, "set_number, a whole number");
  CHECK(corral_future_set_number(fs[2], -1.5) == 0, "set_number, a fraction");
  CHECK(corral_future_set_nil(fs[3]) == 0, "set_nil");
  CHECK(corral_future_set_bool(fs[4], 7) == 0, "set_bool");
  CHECK(corral_future_set_string(fs[5], NULL, 0) == 0, "set_string, empty");
  CHECK(corral_future_set_nil(fs[3]) == CORRAL_ESTATE, "settling twice: CORRAL_ESTATE");
  CHECK(corral_future_set_string(NULL, "x", 1) == CORRAL_EINVAL, "a NULL future: CORRAL_EINVAL");
  corral_future *g = corral_future_new(rt);
  CHECK(corral_future_set_string(g, NULL, 3) == CORRAL_EINVAL &&
            corral_future_state(g) == CORRAL_PENDING,
        "set_string(NULL, 3): CORRAL_EINVAL");
  const char *s;
  size_t len;
  CHECK(corral_future_get_string(g, &s, &len) == CORRAL_ESTATE, "get_string while pending: ESTATE");
  corral_future_cancel(g);
  CHECK(corral_future_get_string(g, &s, &len) == CORRAL_ESTATE,
        "get_string when cancelled: ESTATE");
  corral_future_release(g);
  CHECK(run_lua(L, "local a = fs[1]:result(); assert(a == 'a\\0b', a)\n"
                   "assert(fs[2]:result() == 42 and fs[3]:result() == -1.5)\n"
                   "assert(select('#', fs[4]:result()) == 1 and fs[4]:result() == nil)\n"
                   "assert(fs[5]:result() == true and fs[6]:result() == '')") == 0,
        "Lua reads each as one value of its type");
  CHECK(corral_future_get_string(fs[0], &s, &len) == 0 && len == 3 && memcmp(s, "a\0b", 3) == 0,
        "get_string gives the bytes and their length");
  double d;
  CHECK(corral_future_get_number(fs[1], &d) == 0 && d == 42, "get_number, a whole number");
  CHECK(corral_future_get_number(fs[2], &d) == 0 && d == -1.5, "get_number, a fraction");
  CHECK(corral_future_get_number(fs[3], &d) == CORRAL_EINVAL, "get_number of nil: CORRAL_EINVAL");
  CHECK(corral_future_get_number(fs[4], &d) == CORRAL_EINVAL, "get_number of true: CORRAL_EINVAL");
  CHECK(corral_future_get_string(fs[5], &s, &len) == 0 && len == 0, "get_string, empty");
  CHECK(corral_future_get_string(fs[0], NULL, &len) == CORRAL_EINVAL, "get_string(NULL): EINVAL");
  corral_future *e = corral_future_new(rt);
  corral_future_set_result(e, "\x90", 1);
  CHECK(corral_future_get_number(e, &d) == CORRAL_EINVAL, "no results: CORRAL_EINVAL");
  corral_future_release(e);
  /* results a Lua task gave */
  corral_future *t = corral_dostring_future(rt, "return 'first', 2");
  corral_run(rt);
  CHECK(corral_future_get_string(t, &s, &len) == 0 && len == 5 && memcmp(s, "first", 5) == 0,
        "get_string reads the first of a task's results");
  corral_future_release(t);
  for (int i = 0; i < 6; i++)
    corral_future_release(fs[i]);
  corral_close(rt);
}

/* ---- untrusted payloads -------------------------------------------------- */

/* set_result's answer for these bytes (a new future each time). */
static int set_rc(corral_runtime *rt, const char *p, size_t n) {
  corral_future *f = corral_future_new(rt);
  int rc = corral_future_set_result(f, p, n);
  if (rc != 0) {
    if (corral_future_state(f) != CORRAL_PENDING) rc = 99; /* refused, yet settled */
    corral_future_cancel(f);
  }
  corral_future_release(f);
  return rc;
}

#define SET(p) set_rc(rt, p, sizeof p - 1)

static unsigned rng_state = 12345;
static unsigned rnd(void) {
  rng_state = rng_state * 1103515245u + 12345u;
  return rng_state >> 8;
}

static void test_payloads(void) {
  corral_runtime *rt = corral_open();
  lua_State *L = corral_lua(rt);
  CHECK(SET("\x91\x2a") == 0, "[42] is taken");
  CHECK(SET("\x90") == 0, "[] is taken");
  CHECK(set_rc(rt, NULL, 0) == 0, "NULL, 0 (no values) is taken");
  CHECK(SET("\x92\x81\xa1k\xc0\xd7\xff\0\0\0\0\0\0\0\x01") == 0, "a map and a timestamp are taken");
  CHECK(SET("\x92\x91\x01\xd6\x01\0\0\0\0") == 0, "a REF to a table before it is taken");
  CHECK(SET("\x91\xc7\x03\x0a\x61\x62\x63") == 0, "BYTES is taken");
  CHECK(SET("\x2a") == CORRAL_EINVAL, "one value that is not an array: CORRAL_EINVAL");
  CHECK(SET("\x92\x01") == CORRAL_EINVAL, "a truncated array: CORRAL_EINVAL");
  CHECK(SET("\x91\x01\x02") == CORRAL_EINVAL, "trailing bytes: CORRAL_EINVAL");
  CHECK(SET("\x91\x2a\x91\x2a") == CORRAL_EINVAL, "two arrays: CORRAL_EINVAL");
  CHECK(SET("\x91\xd7\x03\0\0\0\0\0\0\0\x01") == CORRAL_EINVAL, "a FUTURE handle: CORRAL_EINVAL");
  CHECK(SET("\x91\xd6\x02\0\0\0\0") == CORRAL_EINVAL, "a DEP: CORRAL_EINVAL");
  CHECK(SET("\x91\xd6\x01\0\0\0\0") == CORRAL_EINVAL, "a REF to no table: CORRAL_EINVAL");
  CHECK(SET("\x91\xd4\x42\x00") == CORRAL_EINVAL, "an unknown extension: CORRAL_EINVAL");
  CHECK(SET("\x91\xd7\x09\0\0\0\0\0\0\0\x01") == CORRAL_EINVAL, "a BUFFER handle: CORRAL_EINVAL");
  CHECK(SET("\x91\x92\xc7\x09\x06\0\0\0\0\0\0\0\0\0\xc4\x01\x1b") == CORRAL_EINVAL,
        "a FUNC array: CORRAL_EINVAL");
  CHECK(SET("\x91\x81\xc0\x01") == CORRAL_EINVAL, "a nil map key: CORRAL_EINVAL");
  CHECK(SET("\x91\x81\xcb\x7f\xf8\0\0\0\0\0\0\x01") == CORRAL_EINVAL,
        "a NaN map key: CORRAL_EINVAL");
  CHECK(SET("\x91\xd6\xff\x00\x00\x00\x00") == 0 &&
            SET("\x91\xd7\xff\xff\xff\xff\xff\0\0\0\0") == CORRAL_EINVAL,
        "a timestamp with more than 999999999 ns: CORRAL_EINVAL");
  CHECK(SET("\x91\xdd\xff\xff\xff\xff") == CORRAL_EINVAL,
        "an array that claims more elements than there are bytes: CORRAL_EINVAL");
  /* nesting: 50 deep is taken, 200 deep is not */
  char deep[256];
  for (int depth = 50; depth <= 200; depth += 150) {
    int i;
    for (i = 0; i < depth; i++)
      deep[i] = (char)0x91;
    deep[i++] = 0x2a;
    int rc = set_rc(rt, deep, (size_t)i);
    CHECK(depth == 50 ? rc == 0 : rc == CORRAL_EINVAL,
          depth == 50 ? "50 arrays deep is taken" : "200 arrays deep: CORRAL_EINVAL");
  }
  /* every proper prefix of a valid payload is refused */
  static const char good[] = "\x93\xa5hello\x82\xa1\x61\x01\xa1\x62\x92\xc3\xcb\x3f\xf8\0\0\0\0\0\0"
                             "\xd7\xff\0\0\0\0\0\0\0\x01";
  int prefixes_ok = set_rc(rt, good, sizeof good - 1) == 0;
  for (size_t n = 1; n < sizeof good - 1; n++)
    if (set_rc(rt, good, n) != CORRAL_EINVAL) prefixes_ok = 0;
  CHECK(prefixes_ok, "every truncation of a valid payload is CORRAL_EINVAL");

  /* Random bytes and mutations of valid payloads: nothing crashes, and what
   * set_result takes, Lua decodes. */
  const char *env = getenv("CORRAL_EMBED_FUZZ");
  int rounds = env != NULL ? atoi(env) : 20000;
  int taken = 0, consistent = 1;
  char buf[96];
  for (int r = 0; r < rounds; r++) {
    size_t n;
    if (r % 2 == 0) {
      n = 1 + rnd() % 48;
      for (size_t i = 0; i < n; i++)
        buf[i] = (char)(r % 4 == 0 ? 0x90 + rnd() % 16 : rnd());
      buf[0] = (char)(0x90 | (rnd() % 4)); /* (an array: more get past the first check) */
    } else {
      n = sizeof good - 1;
      memcpy(buf, good, n);
      for (int k = 1 + (int)(rnd() % 3); k > 0; k--)
        buf[rnd() % n] = (char)rnd();
      if (rnd() % 4 == 0) n = 1 + rnd() % n;
    }
    corral_future *f = corral_future_new(rt);
    if (corral_future_set_result(f, buf, n) == 0) {
      taken++;
      corral_push_future(L, f);
      lua_setglobal(L, "fz");
      if (run_lua(L, "local ok, e = pcall(fz.result, fz)\n"
                     "assert(ok or (e.kind == 'CodecError' and e.message:find('not loaded')),\n"
                     "  tostring(e))\n"
                     "fz = nil") != 0) {
        consistent = 0;
        printf("# taken but not decoded:");
        for (size_t i = 0; i < n; i++)
          printf(" %02x", (unsigned char)buf[i]);
        printf("\n");
      }
    } else if (corral_future_state(f) != CORRAL_PENDING) {
      consistent = 0;
    } else {
      corral_future_cancel(f);
    }
    corral_future_release(f);
  }
  printf("# %d random payloads, %d taken\n", rounds, taken);
  CHECK(consistent, "random payloads: no crash, and what set_result takes Lua decodes");
  corral_close(rt);
}

/* ---- corral.exit in an embedded runtime ------------------------------------ */

static void test_exit(void) {
  int threads0 = thread_count();
  corral_runtime *rt = corral_open();
  lua_State *L = corral_lua(rt);
  CHECK(corral_exit_status(rt) == -1, "corral_exit_status is -1 before corral.exit");
  CHECK(strstr(corral_strerror(CORRAL_EEXIT), "corral.exit") != NULL, "corral_strerror names it");
  corral_future *main = corral_dostring_future(
      rt, "local c = require 'corral'\n"
          "local W = c.worker { nap = function(_, d) c.sleep(d) return 'woke' end,\n"
          "  bye = function() c.exit(9) end }\n"
          "local w = W:options { mode = 'thread', workers = 2 }:init()\n"
          "assert(w:nap(0):result() == 'woke')\n"
          "-- corral.exit in a thread worker ends that worker only\n"
          "local ok, e = pcall(function() return w:bye():result() end)\n"
          "assert(not ok and c.is_error(e, 'WorkerCrashed'), tostring(e))\n"
          "napping = w:nap(30)\n"
          "c.spawn(function() c.sleep(0.02); late_task_ran = true end)\n"
          "c.sleep(0.01)\n"
          "pcall(c.exit, 7)\n"
          "after_exit = true\n");
  double t0 = mono_s();
  int rc = corral_run(rt);
  CHECK(rc == CORRAL_EEXIT, "corral_run returns CORRAL_EEXIT once corral.exit was called");
  CHECK(mono_s() - t0 < 10, "it returned at once, the workers busy");
  CHECK(corral_exit_status(rt) == 7, "corral_exit_status gives the status");
  CHECK(corral_step(rt) == CORRAL_EEXIT, "corral_step returns CORRAL_EEXIT from then on");
  CHECK(corral_backend_timeout(rt) == -1, "nothing is due any more: the timeout is -1");
  lua_getglobal(L, "after_exit");
  CHECK(lua_isnil(L, -1), "the task that called corral.exit went no further, pcall or not");
  lua_getglobal(L, "late_task_ran");
  CHECK(lua_isnil(L, -1), "no other task runs after it");
  lua_pop(L, 2);
  CHECK(corral_future_state(main) < CORRAL_DONE, "the calling task never ends");
  CHECK(corral_dostring(rt, "x = 1") == CORRAL_EEXIT, "corral_dostring: CORRAL_EEXIT");
  CHECK(corral_spawn(rt, "print", 0) == NULL, "corral_spawn: NULL");
  t0 = mono_s();
  corral_close(rt);
  printf("# corral_close took %.3f s\n", mono_s() - t0);
  CHECK(mono_s() - t0 < 5, "corral_close stops the cancelled workers promptly");
  char msg[200] = "";
  corral_future_error_message(main, msg, sizeof msg);
  CHECK(corral_future_state(main) == CORRAL_FAILED && strstr(msg, "corral.exit") != NULL,
        "closing settles the task's future: abandoned, saying why");
  corral_future_release(main);
  CHECK(thread_count() == threads0, "every thread was joined");

  /* from a callback and from a coroutine of the script's own */
  const char *where[] = {
      "c.after(0.01, function() c.exit(3); after_exit = true end)",
      "c.spawn(function() local co = coroutine.wrap(function()\n"
      "  pcall(c.exit, 3); after_exit = true end); co(); after_exit = true end)"};
  for (int i = 0; i < 2; i++) {
    rt = corral_open();
    L = corral_lua(rt);
    char code[300];
    snprintf(code, sizeof code, "local c = require 'corral'\n%s", where[i]);
    corral_dostring(rt, code);
    int steps = 0;
    while ((rc = corral_step(rt)) == 1 && steps++ < 100000)
      usleep(100);
    lua_getglobal(L, "after_exit");
    CHECK(rc == CORRAL_EEXIT && corral_exit_status(rt) == 3 && lua_isnil(L, -1),
          i == 0 ? "corral.exit in a callback: stopped, nothing after it ran"
                 : "corral.exit in a coroutine of the script's own: nothing after it ran");
    lua_pop(L, 1);
    corral_close(rt);
  }
}

/* ---- corral_close reports and joins ---------------------------------------- */

static void test_close(void) {
  int threads0 = thread_count();
  corral_runtime *rt = corral_open();
  corral_dostring(rt, "local c = require 'corral'\n"
                      "local w = c.worker { fail = function() error('nobody looked at this') end }"
                      ":options { mode = 'thread', workers = 3 }:init()\n"
                      "w:fail()\n"
                      "c.spawn(function() error('a task failed unseen') end)\n"
                      "keep = w");
  corral_step(rt); /* the chunk runs: the workers start; close does the rest */
  CHECK(thread_count() > threads0, "the workers run on threads");
  /* stderr into a file while the runtime closes */
  char path[] = "/tmp/corral-embed-err-XXXXXX";
  int fd = mkstemp(path);
  fflush(stderr);
  int saved = dup(2);
  dup2(fd, 2);
  corral_close(rt);
  fflush(stderr);
  dup2(saved, 2);
  close(saved);
  char text[4096] = "";
  lseek(fd, 0, SEEK_SET);
  ssize_t n = read(fd, text, sizeof text - 1);
  text[n > 0 ? n : 0] = '\0';
  close(fd);
  unlink(path);
  CHECK(strstr(text, "nobody looked at this") != NULL,
        "corral_close reports a call's unretrieved error");
  CHECK(strstr(text, "a task failed unseen") != NULL, "and a task's");
  CHECK(thread_count() == threads0, "corral_close stopped and joined every thread");
}

int main(int argc, char **argv) {
  if (argc >= 3 && strcmp(argv[1], "-e") == 0) {
    /* a process worker's child: corral starts this program with -e code */
    corral_runtime *rt = corral_open();
    if (rt == NULL) return 1;
    int rc = luaL_dostring(corral_lua(rt), argv[2]);
    if (rc != 0) fprintf(stderr, "%s\n", lua_tostring(corral_lua(rt), -1));
    corral_close(rt);
    return rc != 0;
  }
  test_register();
  test_register_process();
  test_spawn();
  test_values();
  test_payloads();
  test_exit();
  test_close();
  printf("1..%d\n", count);
  return failures != 0;
}
