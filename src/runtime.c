/* runtime.c: the embedding entry points of corral.h (above the binding). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "internal.h"

const char *corral_version(void) { return CORRAL_VERSION; }

const char *corral_strerror(int err) {
  switch (err) {
  case CORRAL_OK: return "ok";
  case CORRAL_EINVAL: return "invalid argument";
  case CORRAL_ESTATE: return "future already settled";
  case CORRAL_ETIMEDOUT: return "timed out";
  case CORRAL_ENOMEM: return "out of memory";
  case CORRAL_ELUA: return "Lua error";
  case CORRAL_EEXIT: return "corral.exit was called: the runtime has stopped";
  default: return "unknown error";
  }
}

corral_runtime *corral_open(void) {
  lua_State *L = luaL_newstate();
  if (L == NULL) return NULL;
  luaL_openlibs(L);
  if (lua_cpcall(L, corral__lcore_load, NULL) != 0) {
    fprintf(stderr, "corral: %s\n", corral__lua_errtext(L));
    lua_close(L);
    return NULL;
  }
  corral_runtime *rt = corral_from_lua(L);
  rt->owns_L = 1;
  return rt;
}

void corral_close(corral_runtime *rt) {
  if (rt == NULL) return;
  lua_Debug ar;
  if (rt->owns_L && lua_getstack(rt->home.L, 0, &ar)) {
    /* Lua code of the runtime is running (a host function that a script
     * called): closing its state under it would crash */
    fprintf(stderr, "corral: corral_close called while the runtime runs Lua code (from a host "
                    "function?): ignored; close it from the host's own code\n");
    return;
  }
  if (rt->owns_L) {
    lua_close(rt->home.L); /* its finalizers report errors, then free rt */
  } else {
    /* The host owns the state: it will close it; just run until idle. */
    corral__lcore_drive(rt->home.L, 1);
  }
}

lua_State *corral_lua(corral_runtime *rt) { return rt == NULL ? NULL : rt->home.L; }

/* corral.exit was called in the home state: the runtime has stopped. */
static int exited(corral_runtime *rt) { return atomic_load(&rt->exit_status) >= 0; }

int corral_exit_status(corral_runtime *rt) {
  return rt == NULL ? -1 : atomic_load(&rt->exit_status);
}

/* ======================================================================== */
/* Host functions                                                            */
/* ======================================================================== */

int corral_register(corral_runtime *rt, const char *name, int (*fn)(lua_State *L)) {
  if (rt == NULL || name == NULL || name[0] == '\0' || fn == NULL) return CORRAL_EINVAL;
  /* the runtime's registry, where worker states look (lua_host.c) */
  int rc = corral__rt_host_add(rt, name, fn);
  if (rc != 0) return rc;
  lua_State *L = rt->home.L;
  lua_pushcfunction(L, fn);
  lua_setfield(L, LUA_GLOBALSINDEX, name);
  return 0;
}

int corral_backend_fd(corral_runtime *rt) {
  return rt == NULL ? CORRAL_EINVAL : uv_backend_fd(&rt->home.loop);
}

int corral_backend_timeout(corral_runtime *rt) {
  if (rt == NULL) return CORRAL_EINVAL;
  lua_State *L = rt->home.L;
  int top = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, TIMEOUT_KEY);
  int ms = 0; /* (an error: the host steps at once, and sees it there) */
  if (lua_pcall(L, 0, 1, 0) == 0) ms = (int)lua_tointeger(L, -1);
  lua_settop(L, top);
  return ms;
}

/* ======================================================================== */
/* Running code                                                              */
/* ======================================================================== */

/* Spawn the function below the nargs values on top of the stack as a task
 * with them as its arguments (all popped); with `out`, its future's C half
 * (a reference of the caller's). */
static int spawn_n(lua_State *L, int nargs, corral_future **out) {
  lua_getfield(L, LUA_REGISTRYINDEX, REQUIRE_KEY);
  lua_pushliteral(L, "corral");
  if (lua_pcall(L, 1, 1, 0) != 0) {
    fprintf(stderr, "corral: %s\n", corral__lua_errtext(L));
    lua_pop(L, nargs + 2);
    return CORRAL_ELUA;
  }
  lua_getfield(L, -1, "spawn");
  lua_remove(L, -2);
  lua_insert(L, -(nargs + 2));
  if (lua_pcall(L, nargs + 1, 1, 0) != 0) {
    fprintf(stderr, "corral: %s\n", corral__lua_errtext(L));
    lua_pop(L, 1);
    return CORRAL_ELUA;
  }
  if (out != NULL) {
    *out = corral__lcore_to_future(L, -1);
    /* the host holds it: its failure is the host's to read, not reported
     * (by its Lua side, nor at close: abandoned when the runtime closes) */
    if (*out != NULL) {
      corral_future_retain(*out);
      atomic_fetch_or(&(*out)->flags, FUTURE_SEEN | FUTURE_OWNED);
    }
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "_quiet");
  }
  lua_pop(L, 1);
  return out != NULL && *out == NULL ? CORRAL_ENOMEM : 0;
}

/* Load a file (code NULL) or a string as a chunk and spawn it. */
static int load_and_spawn(corral_runtime *rt, const char *path, const char *code,
                          corral_future **out) {
  if (out != NULL) *out = NULL;
  if (rt == NULL || (path == NULL && code == NULL)) return CORRAL_EINVAL;
  lua_State *L = rt->home.L;
  if (exited(rt)) return CORRAL_EEXIT;
  if ((code != NULL ? luaL_loadstring(L, code) : luaL_loadfile(L, path)) != 0) {
    fprintf(stderr, "corral: %s\n", corral__lua_errtext(L));
    lua_pop(L, 1);
    return CORRAL_ELUA;
  }
  return spawn_n(L, 0, out);
}

int corral_dofile(corral_runtime *rt, const char *path) {
  return load_and_spawn(rt, path, NULL, NULL);
}

int corral_dostring(corral_runtime *rt, const char *code) {
  return load_and_spawn(rt, NULL, code, NULL);
}

corral_future *corral_dofile_future(corral_runtime *rt, const char *path) {
  corral_future *f;
  return load_and_spawn(rt, path, NULL, &f) == 0 ? f : NULL;
}

corral_future *corral_dostring_future(corral_runtime *rt, const char *code) {
  corral_future *f;
  return load_and_spawn(rt, NULL, code, &f) == 0 ? f : NULL;
}

int corral_future_error_message(corral_future *f, char *buf, size_t size) {
  const void *mp;
  size_t len;
  if (f == NULL || buf == NULL || size == 0) return CORRAL_EINVAL;
  buf[0] = '\0';
  if (corral_future_state(f) != CORRAL_FAILED) return CORRAL_ESTATE;
  if (corral_future_payload(f, &mp, &len) != 0 || !corral__codec_error_message(mp, len, buf, size))
    snprintf(buf, size, "(an error without a message)");
  return 0;
}

/* ======================================================================== */
/* Calling a Lua function                                                    */
/* ======================================================================== */

/* Does `err` (a require's error) say that module `name` is not found? */
static int not_found(const char *err, const char *name, size_t len) {
  char head[300];
  snprintf(head, sizeof head, "module '%.*s' not found", (int)(len > 200 ? 200 : len), name);
  return err != NULL && strstr(err, head) != NULL;
}

/* resolve(name): the function `name` names: a global, or a field of one
 * ("a.b.c": a.b.c), or of a module that `require` finds (the longest
 * prefix that is one: "pkg.mod.fn" is require("pkg.mod").fn). */
static int resolve(lua_State *L) {
  size_t len;
  const char *name = lua_tolstring(L, 1, &len);
  const char *dot = memchr(name, '.', len);
  size_t first = dot != NULL ? (size_t)(dot - name) : len;
  size_t at = first; /* where the fields to walk start */
  lua_pushlstring(L, name, first);
  lua_gettable(L, LUA_GLOBALSINDEX);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    /* a module: the longest prefix that `require` finds */
    int found = 0;
    for (size_t end = len;;) {
      lua_getfield(L, LUA_REGISTRYINDEX, REQUIRE_KEY);
      lua_pushlstring(L, name, end);
      if (lua_pcall(L, 1, 1, 0) == 0) {
        found = 1;
        at = end;
        break;
      }
      if (!not_found(lua_tostring(L, -1), name, end)) return lua_error(L);
      lua_pop(L, 1);
      if (end == first) break;
      do { /* the prefix before the last dot */
        end--;
      } while (end > first && name[end] != '.');
    }
    if (!found) {
      lua_pushlstring(L, name, first);
      return luaL_error(L, "no function '%s': '%s' is neither a global nor a module", name,
                        lua_tostring(L, -1));
    }
  }
  /* the fields after it */
  while (at < len) {
    size_t from = at + 1;
    const char *next = memchr(name + from, '.', len - from);
    size_t end = next != NULL ? (size_t)(next - name) : len;
    if (!lua_istable(L, -1) && !lua_isuserdata(L, -1)) {
      const char *type = luaL_typename(L, -1);
      lua_pushlstring(L, name, at);
      return luaL_error(L, "no function '%s': '%s' is a %s", name, lua_tostring(L, -1), type);
    }
    lua_pushlstring(L, name + from, end - from);
    lua_gettable(L, -2);
    lua_remove(L, -2);
    at = end;
  }
  int callable = lua_isfunction(L, -1);
  if (!callable && luaL_getmetafield(L, -1, "__call")) {
    lua_pop(L, 1);
    callable = 1;
  }
  if (!callable) return luaL_error(L, "'%s' is not a function (a %s)", name, luaL_typename(L, -1));
  return 1;
}

corral_future *corral_spawn(corral_runtime *rt, const char *fn, int nargs) {
  if (rt == NULL) return NULL;
  lua_State *L = rt->home.L;
  int top = lua_gettop(L);
  if (nargs < 0 || nargs > top) {
    fprintf(stderr, "corral: corral_spawn: %d arguments, with %d values on the stack\n", nargs,
            top);
    return NULL;
  }
  int base = top - nargs;
  if (fn == NULL || fn[0] == '\0' || exited(rt)) {
    fprintf(stderr, "corral: corral_spawn: %s\n",
            exited(rt) ? "corral.exit stopped the runtime" : "no function name");
    lua_settop(L, base);
    return NULL;
  }
  lua_pushcfunction(L, resolve);
  lua_pushstring(L, fn);
  if (lua_pcall(L, 1, 1, 0) != 0) {
    fprintf(stderr, "corral: corral_spawn: %s\n", corral__lua_errtext(L));
    lua_settop(L, base);
    return NULL;
  }
  lua_insert(L, base + 1); /* the function, then its arguments */
  corral_future *f;
  if (spawn_n(L, nargs, &f) != 0) {
    lua_settop(L, base);
    return NULL;
  }
  return f;
}

/* ======================================================================== */
/* Values without MessagePack                                                */
/* ======================================================================== */

int corral_future_set_result(corral_future *f, const void *mp, size_t len) {
  if (f == NULL || (mp == NULL && len > 0)) return CORRAL_EINVAL;
  char *copy = NULL;
  if (len > 0) {
    /* bytes from outside: exactly one array of values the decoder takes */
    if (corral__codec_check_foreign(mp, len) != NULL) return CORRAL_EINVAL;
    copy = malloc(len);
    if (copy == NULL) return CORRAL_ENOMEM;
    memcpy(copy, mp, len);
  }
  return corral__future_settle_foreign(f, copy, len);
}

static int set_one(corral_future *f, int type, const char *s, size_t slen, double num) {
  if (f == NULL) return CORRAL_EINVAL;
  size_t len;
  char *p = corral__codec_pack_one(type, s, slen, num, &len);
  if (p == NULL)
    return type == CODEC_VALUE_STRING && slen > 0xffffffffu ? CORRAL_EINVAL : CORRAL_ENOMEM;
  return corral__future_settle_foreign(f, p, len);
}

int corral_future_set_string(corral_future *f, const char *s, size_t len) {
  if (s == NULL && len > 0) return CORRAL_EINVAL;
  return set_one(f, CODEC_VALUE_STRING, s != NULL ? s : "", len, 0);
}

int corral_future_set_number(corral_future *f, double value) {
  return set_one(f, CODEC_VALUE_NUMBER, NULL, 0, value);
}

int corral_future_set_bool(corral_future *f, int value) {
  return set_one(f, CODEC_VALUE_BOOLEAN, NULL, 0, value != 0);
}

int corral_future_set_nil(corral_future *f) { return set_one(f, CODEC_VALUE_NIL, NULL, 0, 0); }

static int get_first(corral_future *f, int type, const char **s, size_t *slen, double *num) {
  if (f == NULL) return CORRAL_EINVAL;
  const void *mp;
  size_t len;
  if (corral_future_state(f) != CORRAL_DONE || corral_future_payload(f, &mp, &len) != 0)
    return CORRAL_ESTATE;
  int rc = corral__codec_first(mp, len, type, s, slen, num);
  return rc > 0 ? 0 : rc < 0 ? CORRAL_ENOMEM : CORRAL_EINVAL;
}

int corral_future_get_string(corral_future *f, const char **s, size_t *len) {
  if (s == NULL || len == NULL) return CORRAL_EINVAL;
  return get_first(f, CODEC_VALUE_STRING, s, len, NULL);
}

int corral_future_get_number(corral_future *f, double *out) {
  if (out == NULL) return CORRAL_EINVAL;
  return get_first(f, CODEC_VALUE_NUMBER, NULL, NULL, out);
}

/* ======================================================================== */
/* Driving                                                                   */
/* ======================================================================== */

int corral_step(corral_runtime *rt) {
  if (rt == NULL) return CORRAL_EINVAL;
  if (exited(rt)) {
    /* (runs nothing: takes the loop's events, so that the backend fd does
     * not stay readable for a host that polls it) */
    corral__lcore_drive(rt->home.L, 0);
    return CORRAL_EEXIT;
  }
  int rc = corral__lcore_drive(rt->home.L, 0);
  return exited(rt) ? CORRAL_EEXIT : rc;
}

int corral_run(corral_runtime *rt) {
  if (rt == NULL) return CORRAL_EINVAL;
  if (exited(rt)) return CORRAL_EEXIT;
  int rc = corral__lcore_drive(rt->home.L, 1);
  if (exited(rt)) return CORRAL_EEXIT;
  return rc < 0 ? rc : 0;
}
