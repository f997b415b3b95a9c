-- A C host builds against a staged install (make install DESTDIR=...) with
-- pkg-config, shared and static.
local h = require "helper"

local HOST = [[
#include <stdio.h>
#include <corral.h>
#include <lua.h>

int main(void) {
  corral_runtime *rt = corral_open();
  if (rt == NULL) return 2;
  corral_dostring(rt, "local c = require 'corral'; c.sleep(0.01); answer = 6 * 7");
  corral_run(rt);
  lua_State *L = corral_lua(rt);
  lua_getglobal(L, "answer");
  printf("answer %d %s\n", (int)lua_tointeger(L, -1), corral_version());
  lua_pop(L, 1);
  corral_close(rt);
  return 0;
}
]]

describe("make install", function()
  -- (a sanitizer build's objects need its runtime in the host too)
  local it_plain = h.preload and pending or it

  it_plain("stages a tree with which a host links by pkg-config, shared and --static", function()
    local dest = os.tmpname()
    os.remove(dest)
    local _, err, code = h.sh("make -s install BUILD=" .. h.quote(h.build) .. " DESTDIR="
      .. h.quote(dest) .. " PREFIX=/usr/local >/dev/null")
    assert.are.equal(0, code, err)
    local lib = dest .. "/usr/local/lib"
    local f = assert(io.open(dest .. "/host.c", "w"))
    f:write(HOST)
    f:close()
    local pc = "PKG_CONFIG_PATH=" .. h.quote(lib .. "/pkgconfig") .. " pkg-config "
    -- shared: the soname, found at run time through the library path
    local out
    out, err, code = h.sh("cd " .. h.quote(dest) .. " && cc host.c -o host_shared $(" .. pc
      .. "--cflags --libs corral) && LD_LIBRARY_PATH=" .. h.quote(lib) .. " ./host_shared"
      .. " && readelf -d host_shared | grep NEEDED")
    assert.are.equal(0, code, err)
    assert.matches("^answer 42 ", out)
    assert.matches("libcorral.so.0", out, 1, true)
    -- static: libcorral.a and the private dependencies pkg-config lists
    out, err, code = h.sh("cd " .. h.quote(dest) .. " && cc host.c -o host_static $(" .. pc
      .. "--cflags corral) -Wl,-Bstatic -lcorral -Wl,-Bdynamic $(" .. pc
      .. "--static --libs corral | sed 's/-lcorral//') -L" .. h.quote(lib) .. " && ./host_static"
      .. " && ! readelf -d host_static | grep -q libcorral")
    assert.are.equal(0, code, err)
    assert.matches("^answer 42 ", out)
    os.execute("rm -rf " .. h.quote(dest))
  end)
end)
