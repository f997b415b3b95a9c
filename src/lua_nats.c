/* lua_nats.c: the NATS bridge (nats.c) in Lua: connections and mailboxes
 * as userdata, and the `nats_*` / `mbox_*` functions of corral.core that
 * lua/corral/remote.lua builds remote workers on.
 *
 * Every future made here may be settled by a libnats thread: each is
 * counted in the runtime's host futures, so a loop waiting on one is never
 * taken for stuck. A userdata's __gc only drops its reference (an atomic):
 * closing is explicit, or done for all when the runtime closes.
 */
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "internal.h"

#define NATS_MT "corral.nats"
#define MBOX_MT "corral.mbox"

/* ======================================================================== */
/* Userdata                                                                  */
/* ======================================================================== */

static corral_nats *check_conn(lua_State *L, int idx) {
  corral__box *b = corral__box_check(L, idx, NATS_MT);
  if (b->p == NULL) luaL_argerror(L, idx, "a released NATS connection");
  return b->p;
}

static corral_mbox *check_mbox(lua_State *L, int idx) {
  corral__box *b = corral__box_check(L, idx, MBOX_MT);
  if (b->p == NULL) luaL_argerror(L, idx, "a released mailbox");
  return b->p;
}

static int conn_gc(lua_State *L) {
  corral__box *b = lua_touserdata(L, 1);
  if (b->p) corral__nats_release(b->p);
  b->p = NULL;
  return 0;
}

static int mbox_gc(lua_State *L) {
  corral__box *b = lua_touserdata(L, 1);
  if (b->p) corral__mbox_release(b->p);
  b->p = NULL;
  return 0;
}

/* Push a future (taking the reference) that a libnats thread may settle. */
static void push_ext_future(lua_State *L, corral_future *f) {
  corral__future_mark_host(f, corral__lua_rt(L)->hc);
  corral__lua_cf_push(L, f);
}

static const char *opt_field(lua_State *L, int t, const char *k) {
  lua_getfield(L, t, k);
  const char *s = lua_isstring(L, -1) ? lua_tostring(L, -1) : NULL;
  lua_pop(L, 1); /* (the table keeps the string) */
  return s;
}

/* ======================================================================== */
/* Connections                                                               */
/* ======================================================================== */

/* nats_connect(t): a connection and the future of its connecting, or nil
 * and why (a bad option). t: url, user, password, token, ca, cert, key,
 * name (strings), timeout (seconds), send_asap. */
static int l_nats_connect(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  corral_nats_opts o = {0};
  o.url = opt_field(L, 1, "url");
  o.user = opt_field(L, 1, "user");
  o.password = opt_field(L, 1, "password");
  o.token = opt_field(L, 1, "token");
  o.ca = opt_field(L, 1, "ca");
  o.cert = opt_field(L, 1, "cert");
  o.key = opt_field(L, 1, "key");
  o.name = opt_field(L, 1, "name");
  lua_getfield(L, 1, "timeout");
  o.timeout = lua_isnumber(L, -1) ? lua_tonumber(L, -1) : 5;
  lua_getfield(L, 1, "send_asap");
  o.send_asap = lua_toboolean(L, -1);
  lua_pop(L, 2);
  if (o.url == NULL) return luaL_argerror(L, 1, "no url");
  corral_nats *c = corral__nats_new(corral__lua_rt(L));
  if (c == NULL) return luaL_error(L, "corral: out of memory");
  char err[512];
  corral_future *f = corral__nats_connect(c, &o, err, sizeof err);
  if (f == NULL) {
    corral__nats_close(c);
    corral__nats_release(c);
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  corral__box_push(L, c, NULL, NATS_MT);
  push_ext_future(L, f);
  return 2;
}

static int l_nats_close(lua_State *L) {
  corral__nats_close(check_conn(L, 1));
  return 0;
}

/* nats_state(c): "connecting", "connected", "reconnecting" or "closed";
 * the connection's id; how many times it reconnected. */
static int l_nats_state(lua_State *L) {
  static const char *const names[] = {"connecting", "connected", "reconnecting", "closed"};
  char id[32];
  int reconnects;
  int st = corral__nats_state(check_conn(L, 1), id, sizeof id, &reconnects);
  lua_pushstring(L, names[st]);
  lua_pushstring(L, id);
  lua_pushinteger(L, reconnects);
  return 3;
}

static int l_nats_stats(lua_State *L) {
  uint64_t v[4];
  corral_nats *c = check_conn(L, 1);
  if (corral__nats_stats(c, v) != 0) return 0;
  lua_createtable(L, 0, 5);
  static const char *const names[] = {"in_msgs", "out_msgs", "in_bytes", "out_bytes"};
  for (int i = 0; i < 4; i++) {
    lua_pushnumber(L, (lua_Number)v[i]);
    lua_setfield(L, -2, names[i]);
  }
  lua_pushinteger(L, corral__nats_pending(c));
  lua_setfield(L, -2, "pending");
  return 1;
}

/* nats_call(c, subject, method, payload, js, tries, kind, refs, what): the
 * call's C future and number, or nil, why and the error kind it makes. */
static int l_nats_call(lua_State *L) {
  corral_nats *c = check_conn(L, 1);
  corral_nats_call k = {0};
  k.subject = luaL_checkstring(L, 2);
  k.method = luaL_checkstring(L, 3);
  k.payload = luaL_checklstring(L, 4, &k.len);
  k.js = lua_toboolean(L, 5);
  k.tries = (int)luaL_optinteger(L, 6, 1);
  k.kind = luaL_optstring(L, 7, NULL);
  k.refs = luaL_optstring(L, 8, NULL);
  k.what = luaL_optstring(L, 9, k.subject);
  corral_future *f;
  uint64_t n = 0;
  char err[512];
  int rc = corral__nats_call(c, &k, &f, &n, err, sizeof err);
  if (rc != 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    lua_pushstring(L, rc == CORRAL_NATS_CLOSED    ? "ClosedError"
                      : rc == CORRAL_NATS_TOO_BIG ? "CodecError"
                                                  : "ConnectionError");
    return 3;
  }
  push_ext_future(L, f);
  lua_pushnumber(L, (lua_Number)n);
  return 2;
}

static int l_nats_forget(lua_State *L) {
  corral__nats_forget(check_conn(L, 1), (uint64_t)luaL_checknumber(L, 2));
  return 0;
}

/* nats_publish(c, subject, status, data): true, or nil and why. */
static int l_nats_publish(lua_State *L) {
  size_t len;
  corral_nats *c = check_conn(L, 1);
  const char *subject = luaL_checkstring(L, 2);
  const char *status = luaL_optstring(L, 3, NULL);
  const char *data = luaL_checklstring(L, 4, &len);
  char err[512];
  if (corral__nats_publish(c, subject, status, data, len, err, sizeof err) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* nats_ack(c, reply, "+ACK" | "+WPI" | "+TERM"): true when sent. */
static int l_nats_ack(lua_State *L) {
  corral_nats *c = check_conn(L, 1);
  lua_pushboolean(L, corral__nats_ack(c, luaL_checkstring(L, 2), luaL_checkstring(L, 3)) == 0);
  return 1;
}

static int l_nats_ensure_pool(lua_State *L) {
  corral_future *f = corral__nats_ensure_pool(check_conn(L, 1), luaL_checkstring(L, 2));
  if (f == NULL) return luaL_error(L, "corral: out of memory");
  push_ext_future(L, f);
  return 1;
}

/* nats_kv_put(c, key, bytes) / nats_kv_get(c, key): the future of keeping
 * a result in the result bucket / of reading one (its values). */
static int l_nats_kv_put(lua_State *L) {
  size_t len;
  corral_nats *c = check_conn(L, 1);
  const char *key = luaL_checkstring(L, 2);
  const char *data = luaL_checklstring(L, 3, &len);
  corral_future *f = corral__nats_kv_put(c, key, data, len);
  if (f == NULL) return luaL_error(L, "corral: out of memory");
  push_ext_future(L, f);
  return 1;
}

static int l_nats_kv_get(lua_State *L) {
  corral_future *f = corral__nats_kv_get(check_conn(L, 1), luaL_checkstring(L, 2));
  if (f == NULL) return luaL_error(L, "corral: out of memory");
  push_ext_future(L, f);
  return 1;
}

/* ======================================================================== */
/* Mailboxes                                                                 */
/* ======================================================================== */

/* nats_subscribe(c, subject[, group]): a mailbox, or nil and why. */
static int l_nats_subscribe(lua_State *L) {
  corral_nats *c = check_conn(L, 1);
  char err[512];
  corral_mbox *mb = corral__nats_subscribe(c, luaL_checkstring(L, 2), luaL_optstring(L, 3, NULL),
                                           err, sizeof err);
  if (mb == NULL) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  corral__box_push(L, mb, NULL, MBOX_MT);
  return 1;
}

/* nats_pull(c, pool, ack_wait_ms, max_ack_pending): a mailbox and the
 * future of its attaching, or nil and why. */
static int l_nats_pull(lua_State *L) {
  corral_nats *c = check_conn(L, 1);
  char err[512];
  corral_future *ready = NULL;
  corral_mbox *mb = corral__nats_pull(c, luaL_checkstring(L, 2), (int64_t)luaL_checknumber(L, 3),
                                      (int64_t)luaL_checknumber(L, 4), &ready, err, sizeof err);
  if (mb == NULL) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  corral__box_push(L, mb, NULL, MBOX_MT);
  if (ready == NULL) {
    corral__mbox_close(mb);
    return luaL_error(L, "corral: out of memory");
  }
  push_ext_future(L, ready);
  return 2;
}

static int l_mbox_wait(lua_State *L) {
  corral_future *f = corral__mbox_wait(check_mbox(L, 1));
  if (f == NULL) return luaL_error(L, "corral: out of memory");
  push_ext_future(L, f);
  return 1;
}

static const char *const hdr_names[CORRAL_NATS_NHDR] = {"method", "call", "reply_to", "tries",
                                                        "kind",   "refs", "status"};

/* mbox_take(mb, max): an array of messages (tables: subject, reply, data,
 * delivered, and the Corral-* headers by their short names), and whether
 * the mailbox is closed and empty. */
static int l_mbox_take(lua_State *L) {
  corral_mbox *mb = check_mbox(L, 1);
  int max = (int)luaL_optinteger(L, 2, 64);
  if (max < 1) max = 1;
  if (max > 1024) max = 1024;
  corral__nats_msg *got[1024];
  int closed;
  int n = corral__mbox_take(mb, got, max, &closed);
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    corral__nats_msg *x = got[i];
    /* (a message is freed whatever happens: built in a protected way
     * would cost more than the memory error it guards against) */
    lua_createtable(L, 0, 12);
    lua_pushstring(L, x->subject);
    lua_setfield(L, -2, "subject");
    lua_pushstring(L, x->reply);
    lua_setfield(L, -2, "reply");
    lua_pushlstring(L, x->data, x->len);
    lua_setfield(L, -2, "data");
    lua_pushnumber(L, (lua_Number)x->delivered);
    lua_setfield(L, -2, "delivered");
    for (int h = 0; h < CORRAL_NATS_NHDR; h++) {
      lua_pushstring(L, x->hdr[h]);
      lua_setfield(L, -2, hdr_names[h]);
    }
    lua_rawseti(L, -2, i + 1);
    free(x);
    got[i] = NULL;
  }
  lua_pushboolean(L, closed);
  return 2;
}

static int l_mbox_want(lua_State *L) {
  corral__mbox_want(check_mbox(L, 1), (int)luaL_checkinteger(L, 2));
  return 0;
}

static int l_mbox_close(lua_State *L) {
  corral__mbox_close(check_mbox(L, 1));
  return 0;
}

const luaL_Reg corral__lua_nats_funcs[] = {{"nats_connect", l_nats_connect},
                                           {"nats_close", l_nats_close},
                                           {"nats_state", l_nats_state},
                                           {"nats_stats", l_nats_stats},
                                           {"nats_call", l_nats_call},
                                           {"nats_forget", l_nats_forget},
                                           {"nats_publish", l_nats_publish},
                                           {"nats_ack", l_nats_ack},
                                           {"nats_ensure_pool", l_nats_ensure_pool},
                                           {"nats_kv_put", l_nats_kv_put},
                                           {"nats_kv_get", l_nats_kv_get},
                                           {"nats_subscribe", l_nats_subscribe},
                                           {"nats_pull", l_nats_pull},
                                           {"mbox_wait", l_mbox_wait},
                                           {"mbox_take", l_mbox_take},
                                           {"mbox_want", l_mbox_want},
                                           {"mbox_close", l_mbox_close},
                                           {NULL, NULL}};

void corral__lua_nats_open(lua_State *L) {
  corral__box_kind(L, NATS_MT, conn_gc);
  corral__box_kind(L, MBOX_MT, mbox_gc);
}
