/* lua_trace.c: the primitives of corral.core for the trace timeline
 * (src/trace.c; the Lua half is lua/corral/trace.lua): start and stop, the
 * clock, tracks, slices and flows, and the ids of futures and calls (the
 * address of a future's C half, the same in every context that holds it). */
#include <stdint.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "internal.h"

static int l_trace_start(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  char err[512];
  if (corral__trace_start(path, err, sizeof err) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* trace_stop(): true and the number of events written; false when no trace
 * runs; nil and why when the file could not be written. */
static int l_trace_stop(lua_State *L) {
  char err[512];
  long n = 0;
  int rc = corral__trace_stop(err, sizeof err, &n);
  if (rc < 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_pushboolean(L, rc == 0);
  lua_pushnumber(L, (lua_Number)n);
  return 2;
}

static int l_trace_on(lua_State *L) {
  lua_pushboolean(L, corral__trace_on());
  return 1;
}

static int l_trace_now(lua_State *L) {
  lua_pushnumber(L, corral__trace_now());
  return 1;
}

static int l_trace_thread(lua_State *L) {
  lua_pushinteger(L, corral__trace_thread(luaL_checkstring(L, 1)));
  return 1;
}

static uint64_t opt_id(lua_State *L, int idx) {
  return lua_isnumber(L, idx) ? (uint64_t)lua_tonumber(L, idx) : 0;
}

/* trace_slice(tid, name, cat, ts, dur[, id[, bytes]]) */
static int l_trace_slice(lua_State *L) {
  size_t n;
  const char *name = luaL_checklstring(L, 2, &n);
  long bytes = lua_isnumber(L, 7) ? (long)lua_tonumber(L, 7) : -1;
  corral__trace_slice((int)luaL_checkinteger(L, 1), name, n, luaL_checkstring(L, 3),
                      luaL_checknumber(L, 4), luaL_checknumber(L, 5), opt_id(L, 6), bytes);
  return 0;
}

/* trace_flow(tid, "s" | "f", ts, id) */
static int l_trace_flow(lua_State *L) {
  const char *ph = luaL_checkstring(L, 2);
  corral__trace_flow((int)luaL_checkinteger(L, 1), ph[0], luaL_checknumber(L, 3), opt_id(L, 4),
                     "call");
  return 0;
}

/* trace_sent(id, tid, ts): a process worker's call was sent there (its
 * flow starts there once its proxy hands it to a child). */
static int l_trace_sent(lua_State *L) {
  corral__trace_sent(opt_id(L, 1), (int)luaL_checkinteger(L, 2), luaL_checknumber(L, 3));
  return 0;
}

/* trace_settled(id, tid, ts): the future `id` settled there (an unwrap flow
 * into a call that takes it starts there). */
static int l_trace_settled(lua_State *L) {
  corral__trace_settled(opt_id(L, 1), (int)luaL_checkinteger(L, 2), luaL_checknumber(L, 3));
  return 0;
}

/* trace_unwrap(from, tid, ts): a flow from where future `from` settled to
 * (tid, ts); false when that is not known. */
static int l_trace_unwrap(lua_State *L) {
  lua_pushboolean(
      L, corral__trace_unwrap(opt_id(L, 1), (int)luaL_checkinteger(L, 2), luaL_checknumber(L, 3)));
  return 1;
}

/* trace_claim_env(): true the first time in the process (CORRAL_TRACE is
 * read once, by the first state that loads corral, not by each worker's). */
static int l_trace_claim_env(lua_State *L) {
  static atomic_int claimed;
  lua_pushboolean(L, atomic_exchange(&claimed, 1) == 0);
  return 1;
}

/* trace_start_child(spec): in a process worker's child, the trace its
 * parent asked for (CORRAL_TRACE_CHILD); false when that has ended. */
static int l_trace_start_child(lua_State *L) {
  lua_pushboolean(L, corral__trace_start_child(luaL_checkstring(L, 1)) == 0);
  return 1;
}

static int l_trace_newid(lua_State *L) {
  lua_pushnumber(L, (lua_Number)corral__trace_newid());
  return 1;
}

/* trace_fid(cfuture): the id of a future's C half (its address). */
static int l_trace_fid(lua_State *L) {
  corral__box *b = luaL_testudata(L, 1, CFUTURE_MT);
  if (b == NULL || b->p == NULL) return 0;
  lua_pushnumber(L, (lua_Number)(uintptr_t)b->p);
  return 1;
}

/* trace_call(call): the id of a thread or process call (its future's), the
 * size of its encoded arguments, and the ids of its inputs (a table; nil
 * when it has none). */
static int l_trace_call(lua_State *L) {
  corral__box *b = luaL_testudata(L, 1, CALL_MT);
  corral_call *c = b ? b->p : NULL;
  if (c == NULL) return 0;
  /* (in a process worker's child: the id its parent's flow has) */
  lua_pushnumber(L, c->wire_id != 0 ? (lua_Number)corral__trace_wire_id((long)getpid(), c->wire_id)
                                    : (lua_Number)(uintptr_t)c->result);
  lua_pushnumber(L, (lua_Number)c->len);
  if (c->ndeps == 0) return 2;
  lua_createtable(L, c->ndeps, 0);
  for (int i = 0; i < c->ndeps; i++) {
    lua_pushnumber(L, (lua_Number)(uintptr_t)c->deps[i]);
    lua_rawseti(L, -2, i + 1);
  }
  return 3;
}

const luaL_Reg corral__lua_trace_funcs[] = {{"trace_start", l_trace_start},
                                            {"trace_stop", l_trace_stop},
                                            {"trace_on", l_trace_on},
                                            {"trace_now", l_trace_now},
                                            {"trace_thread", l_trace_thread},
                                            {"trace_slice", l_trace_slice},
                                            {"trace_flow", l_trace_flow},
                                            {"trace_settled", l_trace_settled},
                                            {"trace_sent", l_trace_sent},
                                            {"trace_unwrap", l_trace_unwrap},
                                            {"trace_newid", l_trace_newid},
                                            {"trace_claim_env", l_trace_claim_env},
                                            {"trace_start_child", l_trace_start_child},
                                            {"trace_fid", l_trace_fid},
                                            {"trace_call", l_trace_call},
                                            {NULL, NULL}};
