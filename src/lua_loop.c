/* lua_loop.c: a context's loop in Lua: a turn's drain and poll, time,
 * signals, exit, whole-line print, statistics, and driving the loop from C. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <luajit.h>
#include <lualib.h>
#include <msgpack.h>

#include "internal.h"

/* ======================================================================== */
/* The loop                                                                  */
/* ======================================================================== */

typedef struct {
  lua_State *L;
  int n;
} drain_ud;

static void drain_one(void *ud, corral_future *f) {
  drain_ud *d = ud;
  lua_pushlightuserdata(d->L, f);
  lua_rawseti(d->L, 1, ++d->n);
}

static void drain_post(void *ud, corral_post *p) {
  drain_ud *d = ud;
  lua_pushlightuserdata(d->L, p);
  lua_rawseti(d->L, 1, ++d->n);
}

static void push_stopping(void *ud, corral_worker *w) {
  lua_State *L = ud;
  corral_future_retain(w->stopped);
  corral__lua_cf_push(L, w->stopped);
  lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
}

/* drain(t): settles what the collector left (abandoned futures, dropped
 * workers), fills t[1..n] with the keys of watched futures that settled;
 * returns n, the number of a SIGINT/SIGTERM that arrived (or 0), and the
 * C futures that settle when the dropped workers have ended (or nil). */
static int l_drain(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  corral_context *c = corral__ctx_of(L);
  int stopping = 0;
  if (c->deferred != NULL)
    corral__ctx_run_deferred(
        c, "CancelledError",
        "abandoned: the future was collected before it settled, so nothing can "
        "settle it");
  if (c->worker == NULL && atomic_exchange(&c->rt->orphans, 0)) {
    lua_newtable(L);
    corral__worker_stop_orphans(c->rt, push_stopping, L);
    stopping = lua_objlen(L, -1) > 0;
  }
  drain_ud d = {L, 0};
  corral__ctx_drain(c, drain_one, &d);
  corral__ctx_drain_posts(c, drain_post, &d);
  lua_pushinteger(L, d.n);
  lua_pushinteger(L, c->worker == NULL ? corral__signal_take_stop() : 0);
  if (stopping)
    lua_pushvalue(L, 2);
  else
    lua_pushnil(L);
  return 3;
}

/* reap(): join the workers that ended after their last handle went. */
static int l_reap(lua_State *L) {
  corral__worker_reap(corral__lua_rt(L));
  return 0;
}

/* quiescent(): 1 nothing in the process can make progress any more; 2 only
 * workers asked to stop can; 0 otherwise. */
static int l_quiescent(lua_State *L) {
  lua_pushinteger(L, corral__ctx_quiescent(corral__ctx_of(L)));
  return 1;
}

static int l_poll(lua_State *L) {
  corral__ctx_poll(corral__ctx_of(L), (int)luaL_checkinteger(L, 1));
  return 0;
}

/* backend_timeout(): 0 when completions are posted to this loop, else -1
 * (the Lua scheduler adds its ready tasks and timers). */
static int l_backend_timeout(lua_State *L) {
  corral_context *c = corral__ctx_of(L);
  uv_mutex_lock(&c->qlock);
  int posted = !queue_empty(&c->completed) || !queue_empty(&c->posted);
  uv_mutex_unlock(&c->qlock);
  /* (this loop runs no libuv timer of its own but the poll's, stopped
   * after each poll: the Lua scheduler's timers are the ones due) */
  lua_pushinteger(L, posted || atomic_load(&c->signal) ? 0 : -1);
  return 1;
}

/* backend_fd(): the loop's epoll descriptor: readable when it has events. */
static int l_backend_fd(lua_State *L) {
  lua_pushinteger(L, uv_backend_fd(&corral__ctx_of(L)->loop));
  return 1;
}

static int l_now(lua_State *L) {
  lua_pushnumber(L, (lua_Number)uv_hrtime() * 1e-9);
  return 1;
}

static int l_catch_signals(lua_State *L) {
  corral__signal_catch_stop(corral__ctx_of(L));
  return 0;
}

static int l_signal_rearm(lua_State *L) {
  (void)L;
  corral__signal_rearm();
  return 0;
}

/* exit_fast(): the runner ends after an error or a signal: closing cancels
 * the workers' calls instead of draining them. */
static int l_exit_fast(lua_State *L) {
  corral__lua_rt(L)->exit_fast = 1;
  return 0;
}

static int l_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

/* exit(code): report unretrieved errors, flush, end the process at once. */
static int l_exit(lua_State *L) {
  int code = (int)luaL_optinteger(L, 1, 0);
  corral__reporter_all(corral__ctx_of(L));
  fflush(NULL);
  exit(code);
  return 0;
}

/* print(...): like Lua's, but the whole line goes out in one write to
 * stdout, so that lines printed by several threads never mix. */
static int l_print(lua_State *L) {
  int n = lua_gettop(L);
  luaL_Buffer b;
  lua_getglobal(L, "tostring");
  luaL_buffinit(L, &b);
  for (int i = 1; i <= n; i++) {
    lua_pushvalue(L, n + 1);
    lua_pushvalue(L, i);
    lua_call(L, 1, 1);
    if (!lua_isstring(L, -1)) return luaL_error(L, "'tostring' must return a string to 'print'");
    if (i > 1) luaL_addlstring(&b, "\t", 1);
    luaL_addvalue(&b);
  }
  luaL_addlstring(&b, "\n", 1);
  luaL_pushresult(&b);
  size_t len;
  const char *line = lua_tolstring(L, -1, &len);
  fwrite(line, 1, len, stdout);
  return 0;
}

static int l_versions(lua_State *L) {
  lua_createtable(L, 0, 4);
  lua_pushstring(L, CORRAL_VERSION);
  lua_setfield(L, -2, "corral");
  lua_pushstring(L, LUAJIT_VERSION);
  lua_setfield(L, -2, "luajit");
  lua_pushstring(L, uv_version_string());
  lua_setfield(L, -2, "libuv");
  lua_pushstring(L, msgpack_version());
  lua_setfield(L, -2, "msgpack");
  return 1;
}

static int l_set_tasks(lua_State *L) {
  atomic_store(&corral__ctx_of(L)->tasks, (long)luaL_checkinteger(L, 1));
  return 0;
}

static void stats_row(lua_State *L, corral_context *c, const char *name, int queued, int active,
                      const char *running) {
  lua_createtable(L, 0, 7);
  if (running != NULL && running[0] != '\0') {
    lua_pushstring(L, running);
    lua_setfield(L, -2, "running");
  }
  lua_pushstring(L, name);
  lua_setfield(L, -2, "name");
  lua_pushnumber(L, (lua_Number)atomic_load(&c->tasks));
  lua_setfield(L, -2, "tasks");
  lua_pushnumber(L, (lua_Number)atomic_load(&c->encodes));
  lua_setfield(L, -2, "encodes");
  lua_pushnumber(L, (lua_Number)atomic_load(&c->decodes));
  lua_setfield(L, -2, "decodes");
  lua_pushinteger(L, queued);
  lua_setfield(L, -2, "queued");
  lua_pushinteger(L, active);
  lua_setfield(L, -2, "active");
}

/* stats(): one row per context, the home context first. */
static int l_stats(lua_State *L) {
  corral_runtime *rt = corral__lua_rt(L);
  lua_newtable(L);
  stats_row(L, &rt->home, "home", 0, 0, NULL);
  lua_rawseti(L, -2, 1);
  int i = 2;
  uv_mutex_lock(&rt->wlock);
  for (queue *q = queue_head(&rt->workers); q != &rt->workers; q = q->next) {
    corral_worker *w = queue_data(q, corral_worker, rt_node);
    char running[64];
    uv_mutex_lock(&w->ctx.qlock);
    int queued = w->queued;
    uv_mutex_unlock(&w->ctx.qlock);
    corral__worker_current(w, running, sizeof running);
    stats_row(L, &w->ctx, w->name, queued, atomic_load(&w->active), running);
    lua_pushinteger(L, atomic_load(&w->handles));
    lua_setfield(L, -2, "handles");
    lua_rawseti(L, -2, i++);
  }
  uv_mutex_unlock(&rt->wlock);
  return 1;
}

static int l_ncpu(lua_State *L) {
  lua_pushinteger(L, corral__cpu_count());
  return 1;
}

static int l_is_worker(lua_State *L) {
  corral_context *c = corral__ctx_of(L);
  if (c->worker == NULL) return 0;
  lua_pushstring(L, c->worker->name);
  return 1;
}

int corral__lcore_drive(lua_State *L, int block) {
  lua_getfield(L, LUA_REGISTRYINDEX, DRIVE_KEY);
  lua_pushboolean(L, block);
  if (lua_pcall(L, 1, 1, 0) != 0) {
    fprintf(stderr, "corral: %s\n", corral__lua_errtext(L));
    lua_pop(L, 1);
    return CORRAL_ELUA;
  }
  int pending = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return pending;
}

const luaL_Reg corral__lua_loop_funcs[] = {{"drain", l_drain},
                                           {"poll", l_poll},
                                           {"backend_timeout", l_backend_timeout},
                                           {"backend_fd", l_backend_fd},
                                           {"now", l_now},
                                           {"catch_signals", l_catch_signals},
                                           {"exit_fast", l_exit_fast},
                                           {"signal_rearm", l_signal_rearm},
                                           {"quiescent", l_quiescent},
                                           {"reap", l_reap},
                                           {"print", l_print},
                                           {"isatty", l_isatty},
                                           {"exit", l_exit},
                                           {"versions", l_versions},
                                           {"set_tasks", l_set_tasks},
                                           {"stats", l_stats},
                                           {"ncpu", l_ncpu},
                                           {"is_worker", l_is_worker},
                                           {NULL, NULL}};
