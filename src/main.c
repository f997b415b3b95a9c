/* main.c: the `corral` command: runs a script, a string, or a script from
 * standard input (the REPL is not built yet). */
#include <stdio.h>

#include <lauxlib.h>
#include <lua.h>

#include "corral.h"

int main(int argc, char **argv) {
  corral_runtime *rt = corral_open();
  if (rt == NULL) return 1;
  lua_State *L = corral_lua(rt);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "corral.cli");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "main");
  lua_createtable(L, argc, 0);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  int code = 1;
  if (lua_pcall(L, 1, 1, 0) != 0) {
    fprintf(stderr, "corral: %s\n", lua_tostring(L, -1));
  } else {
    code = (int)lua_tointeger(L, -1);
  }
  lua_settop(L, 0);
  corral_close(rt);
  return code;
}
