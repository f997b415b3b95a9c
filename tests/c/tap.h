/* tap.h: what the C tests share: TAP output (CHECK) and running Lua code. */
#ifndef CORRAL_TEST_TAP_H
#define CORRAL_TEST_TAP_H

#include <stdio.h>

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

#endif
