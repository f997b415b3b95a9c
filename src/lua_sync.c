/* lua_sync.c: channels and sync primitives as Lua sees them: a userdata
 * holding one reference to a C object (sync.c), and the raw operations the
 * Lua half (corral.sync) builds its waits on. Values cross encoded, as the
 * arguments of a call do.
 *
 * A waiting operation returns its waiter records as light userdata: the
 * Lua half blocks its task until a grant wakes it (posted to this
 * context's loop, or handed back here when the granter runs in this very
 * context: the keys of those go into the `woken` table), then finishes
 * each record. */
#include <string.h>

#include <msgpack.h>

#include "internal.h"

/* Metatables by kind: ours, then (from 8 on) a parent's, in a process worker. */
static const char *const kind_mt[] = {NULL,
                                      "corral.channel",
                                      "corral.queue",
                                      "corral.semaphore",
                                      "corral.lock",
                                      "corral.event",
                                      "corral.condition",
                                      "corral.barrier",
                                      "corral.rchannel",
                                      "corral.rqueue",
                                      "corral.rsemaphore",
                                      "corral.rlock",
                                      "corral.revent",
                                      "corral.rcondition",
                                      "corral.rbarrier"};
#define NKINDS    ((int)(sizeof kind_mt / sizeof kind_mt[0]))
#define REMOTE_MT 7 /* kind_mt[kind + REMOTE_MT]: a parent's object */

/* A sync userdata: the object and a mark. Only C makes userdata with
 * contents, and only this file makes ones of this size with this mark. */
#define SYNC_MARK 0x636f7272616c5359ull /* "corralSY" */
typedef struct {
  corral_sync *s;
  uint64_t mark;
} sync_box;

/* The C object of a sync userdata at idx of any kind, or NULL. */
corral_sync *corral__lua_sync_of(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TUSERDATA || lua_objlen(L, idx) != sizeof(sync_box)) return NULL;
  sync_box *b = lua_touserdata(L, idx);
  return b->mark == SYNC_MARK ? b->s : NULL;
}

static corral_sync *check(lua_State *L, int idx) {
  corral_sync *s = corral__lua_sync_of(L, idx);
  if (s == NULL) luaL_typerror(L, idx, "corral sync object");
  return s;
}

/* Push a new userdata on s (taking a reference the caller holds). */
void corral__lua_sync_push(lua_State *L, corral_sync *s) {
  sync_box *u = lua_newuserdata(L, sizeof(sync_box));
  u->s = s;
  u->mark = SYNC_MARK;
  luaL_getmetatable(L, kind_mt[s->kind + (s->remote != 0 ? REMOTE_MT : 0)]);
  lua_setmetatable(L, -2);
  if (s->remote != 0) {
    /* a parent's object: its methods wait (a request to the parent), also
     * # and tostring: corral.sync is loaded now, so that none of them is
     * first reached through a C function (a wait cannot yield across one) */
    luaL_getmetatable(L, kind_mt[s->kind + REMOTE_MT]);
    lua_getfield(L, -1, "__index");
    int lazy = lua_iscfunction(L, -1);
    lua_pop(L, 2);
    if (lazy) {
      lua_getfield(L, LUA_REGISTRYINDEX, REQUIRE_KEY);
      lua_pushliteral(L, "corral.sync");
      lua_call(L, 1, 0);
    }
  }
}

/* (no lock, no Lua: an atomic release, perhaps a free) */
static int sync_gc(lua_State *L) {
  sync_box *u = lua_touserdata(L, 1);
  corral__sync_release(u->s);
  u->s = NULL;
  u->mark = 0;
  return 0;
}

/* Hand the keys of this context's woken waiters to Lua: woken[1..n]. */
static int push_woken(lua_State *L, sync_woken *k) {
  if (k->n == 0) return 0;
  lua_getfield(L, LUA_REGISTRYINDEX, "corral.sync_woken");
  for (int i = 0; i < k->n; i++) {
    lua_pushlightuserdata(L, k->w[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_pop(L, 1);
  return k->n;
}

static void woken_init(lua_State *L, sync_woken *k) {
  k->self = corral__ctx_of(L);
  k->n = 0;
}

/* Encode the value at idx as a channel's item (`bytes`: for another
 * process, as bytes: no references): 1, or 0 with nil, why pushed. */
static int encode_item_as(lua_State *L, int idx, sync_item *it, int bytes) {
  switch (lua_type(L, idx)) {
  case LUA_TBOOLEAN: it->tag = lua_toboolean(L, idx) ? SYNC_ITEM_TRUE : SYNC_ITEM_FALSE; return 1;
  case LUA_TNUMBER:
    it->tag = SYNC_ITEM_NUMBER;
    it->num = lua_tonumber(L, idx);
    return 1;
  case LUA_TSTRING: {
    size_t n;
    const char *str = lua_tolstring(L, idx, &n);
    if (n > SYNC_SMALL) break;
    memcpy(it->small, str, n);
    it->slen = (unsigned char)n;
    it->tag = SYNC_ITEM_STRING;
    return 1;
  }
  }
  codec_opts o;
  memset(&o, 0, sizeof o);
  o.what = "value";
  o.no_refs = bytes;
  it->p = corral__codec_encode(L, idx, 1, &it->len, &o);
  if (it->p == NULL) {
    lua_pushnil(L);
    lua_pushstring(L, o.err);
    return 0;
  }
  it->discard = o.has_refs ? corral__codec_discard : NULL;
  return 1;
}

static int encode_item(lua_State *L, int idx, sync_item *it) {
  return encode_item_as(L, idx, it, 0);
}

static void item_drop(sync_item *it) {
  it->tag = SYNC_ITEM_NONE;
  if (it->p == NULL) return;
  corral__codec_free(it->p, it->len, it->discard != NULL);
  it->p = NULL;
}

/* Push the value of an item and free it (it is ours): 1, or 0 with why it
 * cannot be decoded here pushed instead (the value is dropped). */
static int push_item(lua_State *L, sync_item *it) {
  if (it->p == NULL) {
    switch (it->tag) {
    case SYNC_ITEM_FALSE: lua_pushboolean(L, 0); break;
    case SYNC_ITEM_TRUE: lua_pushboolean(L, 1); break;
    case SYNC_ITEM_NUMBER: lua_pushnumber(L, it->num); break;
    case SYNC_ITEM_STRING: lua_pushlstring(L, it->small, it->slen); break;
    default: lua_pushnil(L);
    }
    it->tag = SYNC_ITEM_NONE;
    return 1;
  }
  int n = corral__codec_decode(L, it->p, it->len, NULL, it->trust | CODEC_AS_VALUES);
  item_drop(it);
  if (n < 0) return 0;
  if (n == 0)
    lua_pushnil(L);
  else if (n > 1)
    lua_pop(L, n - 1);
  return 1;
}

/* ======================================================================== */
/* A channel on its context's Lua side                                       */
/* ======================================================================== */

/* While a channel is its context's alone (lua_local), its values stay on
 * the Lua side: numbers, booleans and strings as they are, other values
 * encoded (a copy, checked as a call's arguments are) in an item box. When
 * the channel is first encoded, corral.sync's share function (registry)
 * moves them into the C object, in order: no encode happens then. */
#define ITEM_MT "corral.sync_item"

/* (no lock, no Lua: the codec's discard is lock-free) */
static int item_gc(lua_State *L) {
  sync_item *it = lua_touserdata(L, 1);
  item_drop(it);
  return 0;
}

/* sync_box(v): v encoded into an item box, or nil, why. */
static int l_sync_box(lua_State *L) {
  lua_settop(L, 1);
  sync_item *it = lua_newuserdata(L, sizeof *it);
  memset(it, 0, sizeof *it);
  luaL_getmetatable(L, ITEM_MT);
  lua_setmetatable(L, -2);
  codec_opts o;
  memset(&o, 0, sizeof o);
  o.what = "value";
  it->p = corral__codec_encode(L, 1, 1, &it->len, &o);
  if (it->p == NULL) {
    lua_pushnil(L);
    lua_pushstring(L, o.err);
    return 2;
  }
  it->discard = o.has_refs ? corral__codec_discard : NULL;
  return 1;
}

/* sync_unbox(box): its value (the box is emptied), or nil, why. */
static int l_sync_unbox(lua_State *L) {
  sync_item *it = luaL_checkudata(L, 1, ITEM_MT);
  if (it->p == NULL) return luaL_argerror(L, 1, "an item box taken already");
  if (!push_item(L, it)) {
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
  }
  return 1;
}

void corral__lua_sync_share(lua_State *L, int idx) {
  if (idx < 0 && idx > LUA_REGISTRYINDEX) idx = lua_gettop(L) + idx + 1;
  lua_getfield(L, LUA_REGISTRYINDEX, "corral.sync_share");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return;
  }
  lua_pushvalue(L, idx);
  lua_call(L, 1, 0);
}

/* sync_adopt(ch, x): the value x (a number, boolean or string, or an item
 * box, emptied) goes to the channel's C ring, whatever its capacity; true,
 * or false when there was no memory. */
static int l_sync_adopt(lua_State *L) {
  corral_sync *s = check(L, 1);
  sync_item it;
  memset(&it, 0, sizeof it);
  sync_item *box = luaL_testudata(L, 2, ITEM_MT);
  if (box != NULL) {
    it = *box;
    memset(box, 0, sizeof *box);
  } else if (lua_type(L, 2) == LUA_TSTRING && lua_objlen(L, 2) > SYNC_SMALL) {
    /* a long string, packed here: [string] */
    size_t n;
    const char *str = lua_tolstring(L, 2, &n);
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    if (msgpack_pack_array(&pk, 1) != 0 || msgpack_pack_str(&pk, n) != 0 ||
        msgpack_pack_str_body(&pk, str, n) != 0) {
      msgpack_sbuffer_destroy(&sb);
      lua_pushboolean(L, 0);
      return 1;
    }
    it.p = sb.data;
    it.len = sb.size;
  } else if (!encode_item(L, 2, &it)) { /* (a scalar: never fails) */
    lua_pushboolean(L, 0);
    return 1;
  }
  int rc = corral__sync_adopt(s, &it);
  item_drop(&it);
  lua_pushboolean(L, rc == 0);
  return 1;
}

/* sync_set_local(ch, on): it is (no more) kept on the Lua side. */
static int l_sync_set_local(lua_State *L) {
  check(L, 1)->lua_local = lua_toboolean(L, 2);
  return 0;
}

/* ======================================================================== */
/* Objects                                                                   */
/* ======================================================================== */

/* sync_new(kind, cap[, lock]): a new object (a condition takes its lock). */
static int l_sync_new(lua_State *L) {
  int kind = (int)luaL_checkinteger(L, 1);
  if (kind < SYNC_CHANNEL || kind > SYNC_BARRIER) return luaL_argerror(L, 1, "no such kind");
  corral_sync *lk = NULL;
  if (kind == SYNC_CONDITION) {
    lk = check(L, 3);
    if (lk->kind != SYNC_LOCK) return luaL_argerror(L, 3, "a lock");
  }
  corral_sync *s = corral__sync_new(kind, (long)luaL_checknumber(L, 2));
  if (s == NULL) return luaL_error(L, "corral: not enough memory");
  /* a channel lives on this context's Lua side until it is first shared */
  s->lua_local = kind == SYNC_CHANNEL && lua_toboolean(L, 4);
  if (kind == SYNC_SEMAPHORE || kind == SYNC_LOCK) s->value = s->cap;
  if (lk != NULL) {
    corral__sync_retain(lk);
    s->lock_of = lk;
  }
  corral__lua_sync_push(L, s);
  return 1;
}

/* sync_lock_of(cond): the lock of a condition. */
static int l_sync_lock_of(lua_State *L) {
  corral_sync *s = check(L, 1);
  if (s->lock_of == NULL) return 0;
  corral__sync_retain(s->lock_of);
  corral__lua_sync_push(L, s->lock_of);
  return 1;
}

/* sync_kind(x): the kind of a sync object (or nil), and whether it is the
 * parent process's. */
static int l_sync_kind(lua_State *L) {
  corral_sync *s = corral__lua_sync_of(L, 1);
  if (s == NULL) return 0;
  lua_pushinteger(L, s->kind);
  lua_pushboolean(L, s->remote != 0);
  return 2;
}

/* sync_info(s): count, closed, unfinished, waiters, putters. */
static int l_sync_info(lua_State *L) {
  sync_info i;
  corral__sync_state(check(L, 1), &i);
  lua_pushnumber(L, (lua_Number)i.count);
  lua_pushboolean(L, i.closed);
  lua_pushnumber(L, (lua_Number)i.unfinished);
  lua_pushnumber(L, (lua_Number)i.waiting);
  lua_pushnumber(L, (lua_Number)i.putting);
  lua_pushnumber(L, (lua_Number)i.cap);
  lua_pushinteger(L, atomic_load(&check(L, 1)->refs)); /* (for leak specs) */
  return 7;
}

/* sync_count(s): a channel's values, a semaphore's permits. */
static int l_sync_count(lua_State *L) {
  corral_sync *s = check(L, 1);
  uv_mutex_lock(&s->lock);
  long n = s->kind == SYNC_CHANNEL || s->kind == SYNC_QUEUE ? s->rcount : s->value;
  uv_mutex_unlock(&s->lock);
  lua_pushnumber(L, (lua_Number)n);
  return 1;
}

/* ======================================================================== */
/* Waits                                                                     */
/* ======================================================================== */

/* sync_select(wait, n, s1, op1, x1, s2, op2, x2, ...): do the first ready
 * case, in the order given (x: a put's value, an acquire's count).
 * Returns state, the case's index, its value (a get's) or ival, and the
 * number of woken keys; or, none ready and `wait`, SYNC_QUEUED, then the
 * records (light userdata) in order; or nil, why (a put's value cannot
 * travel). */
static int l_sync_select(lua_State *L) {
  /* (wait 2: make it a select even for one case: a future may win it) */
  int wait = lua_type(L, 1) == LUA_TNUMBER ? (int)lua_tointeger(L, 1) : lua_toboolean(L, 1);
  int n = (int)luaL_checkinteger(L, 2);
  if (n < 1 || n > SYNC_SELECT_MAX) return luaL_argerror(L, 2, "1 to 64 cases");
  sync_case cases[SYNC_SELECT_MAX];
  memset(cases, 0, sizeof cases[0] * (size_t)n);
  for (int i = 0; i < n; i++) {
    int b = 3 + 3 * i;
    cases[i].s = check(L, b);
    if (cases[i].s->remote != 0) return luaL_argerror(L, b, "an object of this process");
    cases[i].op = (int)luaL_checkinteger(L, b + 1);
    if (cases[i].op == SYNC_OP_ACQUIRE) cases[i].n = (long)luaL_checknumber(L, b + 2);
  }
  for (int i = 0; i < n; i++) {
    if (cases[i].op != SYNC_OP_PUT) continue;
    if (!encode_item(L, 3 + 3 * i + 2, &cases[i].val)) {
      for (int j = 0; j < i; j++)
        item_drop(&cases[j].val);
      return 2;
    }
  }
  sync_woken k;
  woken_init(L, &k);
  corral_sync_waiter *recs[SYNC_SELECT_MAX];
  int which = -1;
  int rc = corral__sync_select(cases, n, wait, k.self, &k, &which, recs);
  for (int i = 0; i < n; i++)
    if (i != which || cases[i].op != SYNC_OP_GET) item_drop(&cases[i].val);
  int nk = push_woken(L, &k);
  if (rc == SYNC_NOMEM) return luaL_error(L, "corral: not enough memory");
  if (rc == SYNC_QUEUED && wait) {
    lua_pushinteger(L, rc);
    luaL_checkstack(L, n, "too many cases");
    for (int i = 0; i < n; i++)
      lua_pushlightuserdata(L, recs[i]);
    return 1 + n;
  }
  int ok = 1;
  if (which >= 0 && cases[which].op == SYNC_OP_GET && rc == SYNC_GRANTED)
    ok = push_item(L, &cases[which].val);
  else
    lua_pushnumber(L, which >= 0 ? (lua_Number)cases[which].ival : 0);
  /* (a value that cannot be decoded: SYNC_UNREADABLE, and why) */
  lua_pushinteger(L, ok ? rc : SYNC_UNREADABLE);
  lua_pushinteger(L, which + 1);
  lua_pushvalue(L, -3);
  lua_pushinteger(L, nk);
  return 4;
}

/* sync_finish(rec, abandon): end a wait: state, value (a granted get's) or
 * ival, the case that won its select (0 none), the woken count; for a
 * parent's object also the reply's count, closed, unfinished, waiting,
 * putting and cap. */
static int l_sync_finish(lua_State *L) {
  corral_sync_waiter *w = lua_touserdata(L, 1);
  if (w == NULL) return luaL_argerror(L, 1, "a waiter record");
  int abandon = lua_toboolean(L, 2);
  sync_woken k;
  woken_init(L, &k);
  sync_item it;
  memset(&it, 0, sizeof it);
  long ival = 0, info[6];
  int op = w->op, remote = w->s->remote != 0;
  int won = corral__sync_won(w);
  int st = corral__sync_finish(w, abandon, &it, &ival, info, &k);
  int nk = push_woken(L, &k);
  int ok = 1;
  if ((op == SYNC_OP_GET || op == SYNC_OP_TRY_GET) && st == SYNC_GRANTED && !abandon)
    ok = push_item(L, &it);
  else
    lua_pushnumber(L, (lua_Number)ival);
  item_drop(&it);
  lua_pushinteger(L, ok ? st : SYNC_UNREADABLE);
  lua_insert(L, -2);
  lua_pushinteger(L, won);
  lua_pushinteger(L, nk);
  if (!remote) return 4;
  lua_pushnumber(L, (lua_Number)info[0]);
  lua_pushboolean(L, info[1] != 0);
  for (int i = 2; i < 6; i++)
    lua_pushnumber(L, (lua_Number)info[i]);
  return 10;
}

/* sync_remote(s, op, n, value): start op on a parent's object (in a
 * process worker): its record, or nil, why (the value cannot travel). */
static int l_sync_remote(lua_State *L) {
  corral_sync *s = check(L, 1);
  if (s->remote == 0) return luaL_argerror(L, 1, "an object of the parent process");
  int op = (int)luaL_checkinteger(L, 2);
  long n = (long)luaL_optnumber(L, 3, 0);
  sync_item it;
  memset(&it, 0, sizeof it);
  if (!lua_isnoneornil(L, 4) && !encode_item_as(L, 4, &it, 1)) return 2;
  corral_sync_waiter *w = corral__sync_remote_start(s, corral__ctx_of(L), op, n, &it);
  item_drop(&it);
  if (w == NULL) return luaL_error(L, "corral: not enough memory");
  lua_pushlightuserdata(L, w);
  return 1;
}

/* sync_rcancel(rec): give up a wait on a parent's object: true when it is
 * answered already, else its answer is on its way (wait for it). */
static int l_sync_rcancel(lua_State *L) {
  corral_sync_waiter *w = lua_touserdata(L, 1);
  if (w == NULL || w->s->remote == 0) return luaL_argerror(L, 1, "a remote waiter record");
  lua_pushboolean(L, corral__sync_remote_cancel(w));
  return 1;
}

/* sync_claim(rec, idx): win rec's select for case idx (a future): bool. */
static int l_sync_claim(lua_State *L) {
  corral_sync_waiter *w = lua_touserdata(L, 1);
  if (w == NULL) return luaL_argerror(L, 1, "a waiter record");
  lua_pushboolean(L, corral__sync_claim_other(w, (int)luaL_checkinteger(L, 2)));
  return 1;
}

/* sync_won(rec): the case that won rec's select (0: none yet). */
static int l_sync_won(lua_State *L) {
  corral_sync_waiter *w = lua_touserdata(L, 1);
  if (w == NULL) return luaL_argerror(L, 1, "a waiter record");
  lua_pushinteger(L, corral__sync_won(w));
  return 1;
}

/* ======================================================================== */
/* Operations that never wait: each returns its answer and the woken count   */
/* ======================================================================== */

static int l_sync_close(lua_State *L) {
  sync_woken k;
  woken_init(L, &k);
  int was_open = corral__sync_close(check(L, 1), &k);
  lua_pushboolean(L, was_open);
  lua_pushinteger(L, push_woken(L, &k));
  return 2;
}

static int l_sync_release(lua_State *L) {
  sync_woken k;
  woken_init(L, &k);
  int rc = corral__sync_release_permits(check(L, 1), (long)luaL_optnumber(L, 2, 1), &k);
  lua_pushboolean(L, rc == 0);
  lua_pushinteger(L, push_woken(L, &k));
  return 2;
}

static int l_sync_set(lua_State *L) {
  sync_woken k;
  woken_init(L, &k);
  corral__sync_set(check(L, 1), lua_toboolean(L, 2), &k);
  lua_pushboolean(L, 1);
  lua_pushinteger(L, push_woken(L, &k));
  return 2;
}

static int l_sync_notify(lua_State *L) {
  sync_woken k;
  woken_init(L, &k);
  long n = corral__sync_notify(check(L, 1), (long)luaL_checknumber(L, 2), &k);
  lua_pushnumber(L, (lua_Number)n);
  lua_pushinteger(L, push_woken(L, &k));
  return 2;
}

static int l_sync_task_done(lua_State *L) {
  sync_woken k;
  woken_init(L, &k);
  int rc = corral__sync_task_done(check(L, 1), &k);
  lua_pushboolean(L, rc == 0);
  lua_pushinteger(L, push_woken(L, &k));
  return 2;
}

static int l_sync_reset(lua_State *L) {
  sync_woken k;
  woken_init(L, &k);
  corral__sync_reset(check(L, 1), &k);
  lua_pushboolean(L, 1);
  lua_pushinteger(L, push_woken(L, &k));
  return 2;
}

static int l_sync_live(lua_State *L) {
  lua_pushinteger(L, corral__sync_live());
  lua_pushinteger(L, corral__sync_waiters_live());
  return 2;
}

/* sync_open(methods, woken): the metatables' __index tables (by kind
 * name) and the table where woken keys go. */
static int l_sync_open(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checktype(L, 2, LUA_TTABLE);
  for (int k = 1; k < NKINDS; k++) {
    luaL_getmetatable(L, kind_mt[k]);
    lua_getfield(L, 1, kind_mt[k] + 7); /* (after "corral.") */
    lua_setfield(L, -2, "__index");
    lua_getfield(L, 1, k > REMOTE_MT ? "__rtostring" : "__tostring");
    lua_setfield(L, -2, "__tostring");
    lua_getfield(L, 1, k > REMOTE_MT ? "__rlen" : "__len");
    lua_setfield(L, -2, "__len");
    lua_pop(L, 1);
  }
  lua_pushvalue(L, 2);
  lua_setfield(L, LUA_REGISTRYINDEX, "corral.sync_woken");
  lua_pushvalue(L, 3);
  lua_setfield(L, LUA_REGISTRYINDEX, "corral.sync_share");
  return 0;
}

/* Before corral.sync is loaded in a state, the first method looked up on
 * a sync object (one that came from another context) loads it. */
static int lazy_index(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, REQUIRE_KEY);
  lua_pushliteral(L, "corral.sync");
  lua_call(L, 1, 0);
  if (!lua_getmetatable(L, 1)) return 0;
  lua_getfield(L, -1, "__index");
  if (lua_iscfunction(L, -1)) return 0; /* (not replaced: no methods) */
  lua_pushvalue(L, 2);
  lua_gettable(L, -2);
  return 1;
}

/* The same for # and tostring: load, then call the metamethod set now. */
static int lazy_meta(lua_State *L, const char *name) {
  lua_getfield(L, LUA_REGISTRYINDEX, REQUIRE_KEY);
  lua_pushliteral(L, "corral.sync");
  lua_call(L, 1, 0);
  if (!lua_getmetatable(L, 1)) return 0;
  lua_getfield(L, -1, name);
  if (lua_iscfunction(L, -1)) return 0; /* (not replaced) */
  lua_pushvalue(L, 1);
  lua_call(L, 1, 1);
  return 1;
}
static int lazy_len(lua_State *L) { return lazy_meta(L, "__len"); }
static int lazy_tostring(lua_State *L) { return lazy_meta(L, "__tostring"); }

void corral__lua_sync_open(lua_State *L) {
  luaL_newmetatable(L, ITEM_MT);
  lua_pushcfunction(L, item_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  for (int k = 1; k < NKINDS; k++) {
    luaL_newmetatable(L, kind_mt[k]);
    lua_pushcfunction(L, sync_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushstring(L, kind_mt[k]);
    lua_setfield(L, -2, "__name");
    lua_pushinteger(L, k);
    lua_setfield(L, -2, "__kind");
    lua_pushcfunction(L, lazy_index);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, lazy_len);
    lua_setfield(L, -2, "__len");
    lua_pushcfunction(L, lazy_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);
  }
}

const luaL_Reg corral__lua_sync_funcs[] = {{"sync_new", l_sync_new},
                                           {"sync_lock_of", l_sync_lock_of},
                                           {"sync_kind", l_sync_kind},
                                           {"sync_info", l_sync_info},
                                           {"sync_count", l_sync_count},
                                           {"sync_select", l_sync_select},
                                           {"sync_finish", l_sync_finish},
                                           {"sync_remote", l_sync_remote},
                                           {"sync_rcancel", l_sync_rcancel},
                                           {"sync_box", l_sync_box},
                                           {"sync_unbox", l_sync_unbox},
                                           {"sync_adopt", l_sync_adopt},
                                           {"sync_set_local", l_sync_set_local},
                                           {"sync_claim", l_sync_claim},
                                           {"sync_won", l_sync_won},
                                           {"sync_close", l_sync_close},
                                           {"sync_release", l_sync_release},
                                           {"sync_set", l_sync_set},
                                           {"sync_notify", l_sync_notify},
                                           {"sync_task_done", l_sync_task_done},
                                           {"sync_reset", l_sync_reset},
                                           {"sync_live", l_sync_live},
                                           {"sync_open", l_sync_open},
                                           {NULL, NULL}};
