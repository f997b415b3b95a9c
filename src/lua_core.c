/* lua_core.c: `require "corral"`: luaopen_corral (the runtime, the
 * `corral.core` table, the embedded Lua half), and the Lua main of a worker
 * thread. The primitives of corral.core live in the other lua_*.c files, one
 * per kind of object they bind. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "internal.h"
#include "lua_modules.h" /* generated: the Lua half, as bytecode */

/* ======================================================================== */
/* Module                                                                    */
/* ======================================================================== */

static int runtime_gc(lua_State *L) {
  corral_runtime **p = lua_touserdata(L, 1);
  /* The runtime's finalizer runs as the state closes, after every other
   * corral object's. It is the one __gc that takes locks: withdrawing the
   * loop's watches from futures that other threads may still settle. */
  if (*p != NULL) {
    corral__reporter_at_exit_remove(&(*p)->home);
    corral__rt_destroy(*p);
  }
  *p = NULL;
  return 0;
}

static int preload_module(lua_State *L) {
  const char *name = lua_tostring(L, 1);
  for (const corral_lua_module *m = corral_lua_modules; m->name != NULL; m++) {
    if (strcmp(m->name, name) == 0) {
      if (luaL_loadbuffer(L, (const char *)m->code, m->size, m->name) != 0) return lua_error(L);
      lua_pushstring(L, name);
      lua_call(L, 1, 1);
      return 1;
    }
  }
  return luaL_error(L, "corral: no embedded module %s", name);
}

static const corral__codec_iface codec_iface = {
    corral__lcore_push_future, corral__lua_worker_push,    corral__lua_future_of,
    corral__lua_flush_crefs,   corral__lua_handle_of,      corral__lua_push_import,
    corral__worker_handle,     corral__worker_hold_handle, corral__worker_drop_handle,
    corral__worker_release,    corral__lua_buffer_slot,    corral__lua_sync_of,
    corral__lua_sync_push,     corral__lua_sync_share};

/* registry[key] = package.loaded[module][field] */
static void hook(lua_State *L, const char *module, const char *field, const char *key) {
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  lua_getfield(L, -1, module);
  lua_getfield(L, -1, field);
  lua_setfield(L, LUA_REGISTRYINDEX, key);
  lua_pop(L, 2);
}

static int l_inject_fault(lua_State *L);
static const luaL_Reg core_funcs[] = {{"inject_fault", l_inject_fault}, {NULL, NULL}};

/* The runtime and `corral.core` in this state, once: what a worker's main
 * needs (the public `corral` table is loaded when its code asks for it). */
static int open_core(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, REQUIRE_KEY);
  int done = !lua_isnil(L, -1);
  lua_pop(L, 1);
  if (done) return 0;
  corral__codec_init(&codec_iface);
  corral_runtime *rt = corral__lua_rt(L);
  if (rt == NULL) {
    /* A sentinel userdata owns the runtime and closes it with the state. */
    corral_runtime **p = lua_newuserdata(L, sizeof(corral_runtime *));
    *p = NULL;
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, runtime_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_setfield(L, LUA_REGISTRYINDEX, "corral.sentinel");
    rt = corral__rt_create(L, 0);
    if (rt == NULL) return luaL_error(L, "corral: cannot start the runtime");
    lua_getfield(L, LUA_REGISTRYINDEX, "corral.sentinel");
    *(corral_runtime **)lua_touserdata(L, -1) = rt;
    lua_pop(L, 1);
    corral__lua_set_home(L, rt, &rt->home);
    /* a host that never closes its state (Neovim) still hears of an
     * error nobody retrieved, at exit */
    (void)corral__reporter_at_exit(&rt->home);
  }

  corral__lua_future_open(L);
  corral__lua_buffer_open(L);
  corral__lua_sync_open(L);
  corral__lua_nats_open(L);
  corral__lua_worker_open(L, corral__lcore_worker_main);

  /* package.preload[name] for each embedded Lua module */
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  for (const corral_lua_module *m = corral_lua_modules; m->name != NULL; m++) {
    lua_pushcfunction(L, preload_module);
    lua_setfield(L, -2, m->name);
  }
  lua_pop(L, 1);
  lua_getfield(L, -1, "loaded");
  lua_newtable(L);
  luaL_register(L, NULL, corral__lua_future_funcs);
  luaL_register(L, NULL, corral__lua_buffer_funcs);
  luaL_register(L, NULL, corral__lua_sync_funcs);
  luaL_register(L, NULL, corral__lua_fs_funcs);
  luaL_register(L, NULL, corral__lua_exec_funcs);
  luaL_register(L, NULL, corral__lua_nats_funcs);
  luaL_register(L, NULL, corral__lua_codec_funcs);
  luaL_register(L, NULL, corral__lua_worker_funcs);
  luaL_register(L, NULL, corral__lua_loop_funcs);
  luaL_register(L, NULL, corral__lua_trace_funcs);
  luaL_register(L, NULL, corral__lua_host_funcs);
  luaL_register(L, NULL, core_funcs);
  /* the constants the Lua half shares with C, from their one source */
  static const struct {
    const char *name;
    int value;
  } consts[] = {{"PENDING", CORRAL_PENDING},     {"RUNNING", CORRAL_RUNNING},
                {"DONE", CORRAL_DONE},           {"FAILED", CORRAL_FAILED},
                {"CANCELLED", CORRAL_CANCELLED}, {"STOP_DRAIN", WORKER_DRAIN},
                {"STOP_CANCEL", WORKER_CANCEL},  {"STOP_CRASHED", WORKER_CRASHED}};
  for (size_t i = 0; i < sizeof consts / sizeof consts[0]; i++) {
    lua_pushinteger(L, consts[i].value);
    lua_setfield(L, -2, consts[i].name);
  }
  /* Every Lua state corral runs prints whole lines: several threads
   * printing at once never mix their lines. (A print of the script's own,
   * a Lua function, is left alone.) */
  lua_pushliteral(L, "print");
  lua_rawget(L, LUA_GLOBALSINDEX);
  if (lua_iscfunction(L, -1)) {
    lua_pushliteral(L, "print");
    lua_getfield(L, -3, "print");
    lua_rawset(L, LUA_GLOBALSINDEX);
  }
  lua_pop(L, 1);
  lua_setfield(L, -2, "corral.core");
  lua_pop(L, 2);

  /* the require the runtime was loaded with: a script may replace the
   * global (a sandbox), and the codec still loads what it needs */
  lua_getglobal(L, "require");
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, REQUIRE_KEY);
  lua_pushliteral(L, "corral.future"); /* (and the scheduler) */
  lua_call(L, 1, 0);
  lua_getfield(L, LUA_REGISTRYINDEX, REQUIRE_KEY);
  lua_pushliteral(L, "corral.buffer"); /* (the methods of buffers, in every state) */
  lua_call(L, 1, 0);
  /* What the C side calls of the Lua half, from its private modules (the
   * public corral table carries none of it). */
  hook(L, "corral.future", "wrap", WRAP_KEY);
  hook(L, "corral.sched", "drive", DRIVE_KEY);
  hook(L, "corral.sched", "backend_timeout", TIMEOUT_KEY);
  hook(L, "corral.future", "cref", CREF_KEY);
  hook(L, "corral.future", "flush_crefs", FLUSH_KEY);
  return 0;
}

int luaopen_corral(lua_State *L) {
  open_core(L);
  lua_getfield(L, LUA_REGISTRYINDEX, REQUIRE_KEY);
  lua_pushliteral(L, "corral.init");
  lua_call(L, 1, 1);
  return 1;
}

/* package.preload.corral, for a state made by corral (the runner's, a
 * worker's): its code requires "corral" as any other. */
static void preload_corral(lua_State *L) {
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, luaopen_corral);
  lua_setfield(L, -2, "corral");
  lua_pop(L, 2);
}

int corral__lcore_load(lua_State *L) {
  preload_corral(L);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "corral");
  lua_call(L, 1, 0);
  return 0;
}

/* The worker's Lua main, in two steps under lua_cpcall from the very first
 * allocation (a failure, no memory or a value of the boot payload that
 * cannot be rebuilt here, is an error, not a panic): the state made ready
 * for any class (a spare stops there until a start takes it), then the
 * class and its init arguments rebuilt and run. */
static int worker_prepare(lua_State *L) {
  corral_worker *w = lua_touserdata(L, 1);
  lua_settop(L, 0);
  luaL_openlibs(L);
  corral__lua_set_home(L, w->rt, &w->ctx);
  preload_corral(L);
  open_core(L);             /* not the public table: loaded if its code asks */
  corral__lua_host_open(L); /* the host's functions, as globals */
  lua_settop(L, 0);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "corral.worker_main");
  lua_call(L, 1, 1);
  /* what its code sees (os.exit ending the worker) is in place before the
   * class, options and init arguments are rebuilt here */
  lua_getfield(L, -1, "prepare");
  lua_call(L, 0, 0);
  return 0;
}

static int worker_boot(lua_State *L) {
  corral_worker *w = lua_touserdata(L, 1);
  lua_settop(L, 0);
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  lua_getfield(L, -1, "corral.worker_main");
  lua_getfield(L, -1, "run");
  lua_pushstring(L, w->name);
  int n = corral__codec_decode(L, w->boot, w->bootlen, NULL, CODEC_TRUSTED | CODEC_AS_INIT);
  if (n < 0) return lua_error(L);
  /* rebuilt: the payload's references (workers it names) go now */
  corral__codec_free(w->boot, w->bootlen, w->boot_refs);
  w->boot = NULL;
  w->bootlen = 0;
  w->boot_refs = 0;
  w->booted = 1;
  if (lua_pcall(L, n + 1, 0, 0) != 0) {
    /* what it raised, as text (an error object, a table, says what it is
     * through tostring), while this is still protected */
    if (lua_type(L, -1) != LUA_TSTRING) {
      lua_getglobal(L, "tostring");
      lua_insert(L, -2);
      lua_call(L, 1, 1);
    }
    return lua_error(L);
  }
  return 0;
}

typedef struct {
  corral_worker *w;
  const char *why;
} boot_failure;

/* corral.worker_main.died(name, why), protected (it may run out of memory
 * too). */
static int boot_died(lua_State *L) {
  boot_failure *b = lua_touserdata(L, 1);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "corral.worker_main");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "died");
  lua_pushstring(L, b->w->name);
  lua_pushstring(L, b->why);
  lua_pushboolean(L, b->w->booted);
  lua_call(L, 3, 0);
  return 0;
}

/* The worker died before or outside its Lua main: a WorkerCrashed built by
 * the errors module when it can be loaded, by C otherwise. (What was raised
 * is text here: see worker_boot.) */
static void boot_failed(lua_State *L, corral_worker *w) {
  char why[400];
  snprintf(why, sizeof why, "%s",
           lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "(an error object)");
  lua_pop(L, 1);
  boot_failure b = {w, why};
  if (lua_cpcall(L, boot_died, &b) == 0) return;
  char msg[512];
  snprintf(msg, sizeof msg, "worker %s crashed: %s: %s", w->name,
           w->booted ? "it failed" : "it could not start", why);
  corral__worker_crash_text(w, msg);
}

/* Tests: how many of the next worker Lua states cannot be made, and after
 * how many allocations the next one runs out of memory. */

/* inject_fault(what, n): the next n thread starts ("thread") or worker Lua
 * states ("state") fail, or the next worker's Lua state runs out of memory
 * after n allocations ("alloc"), as when memory or threads run out. For
 * tests. */
static int l_inject_fault(lua_State *L) {
  const char *what = luaL_checkstring(L, 1);
  int n = (int)luaL_checkinteger(L, 2);
  /* a spare made before would meet none of them: it goes */
  corral__worker_drop_spare(corral__lua_rt(L), 0);
  if (strcmp(what, "thread") == 0)
    corral__thread_inject(n);
  else if (strcmp(what, "state") == 0)
    atomic_store(&corral__inject_state, n);
  else if (strcmp(what, "alloc") == 0)
    atomic_store(&corral__inject_alloc, n);
  else
    return luaL_argerror(L, 1, "\"thread\", \"state\" or \"alloc\"");
  return 0;
}

/* An allocator that refuses to grow after `*left` more allocations. */
static void *failing_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  int *left = ud;
  if (nsize == 0) {
    free(ptr);
    return NULL;
  }
  if (nsize > osize && (*left)-- <= 0) return NULL;
  return realloc(ptr, nsize);
}

void corral__lcore_worker_main(corral_worker *w) {
  int fail =
      atomic_load(&corral__inject_state) > 0 && atomic_fetch_sub(&corral__inject_state, 1) > 0;
  int after = atomic_exchange(&corral__inject_alloc, 0), left = INT_MAX;
  lua_State *L = fail ? NULL : after > 0 ? lua_newstate(failing_alloc, &left) : luaL_newstate();
  left = after; /* LuaJIT cannot fail inside lua_newstate itself: count from here */
  if (L == NULL) {
    if (!corral__worker_await(w)) return; /* a spare no start took */
    corral__worker_crash_text(w, "the worker died: no memory for its Lua state");
    return;
  }
  w->ctx.L = L;
  int failed = lua_cpcall(L, worker_prepare, w) != 0;
  /* a spare waits here for a start; what failed is said when one takes it */
  if (corral__worker_await(w) && (failed || lua_cpcall(L, worker_boot, w) != 0)) boot_failed(L, w);
  lua_close(L);
  w->ctx.L = NULL;
  /* its Lua futures that were still pending can never settle now */
  char msg[128];
  snprintf(msg, sizeof msg, "worker %s stopped before this future settled", w->name);
  corral__ctx_run_deferred(&w->ctx, "ClosedError", msg);
}
