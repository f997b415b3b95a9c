-- LÖVE (love 11, LuaJIT) as a Lua host: examples/love steps corral from
-- love.update while two thread workers compute. LÖVE starts without a
-- display here (conf.lua: t.window = false and no graphics module, with
-- CORRAL_LOVE_HEADLESS=1).
local h = require "helper"

local has_love = os.execute("command -v love >/dev/null 2>&1") == 0

describe("LÖVE drives corral", function()
  if not has_love then
    io.stderr:write("love_spec: love is not installed (scripts/install-deps installs it): skipped\n")
    pending("love is not installed (scripts/install-deps installs it)")
    return
  end

  it("love.update steps corral: the workers' results arrive while frames go on", function()
    local xdg = h.tmpname() -- (SDL wants a runtime dir: one of ours, not the user's)
    os.remove(xdg)
    os.execute("mkdir -m 700 " .. h.quote(xdg))
    local out, err, code = h.sh((h.preload and "LD_PRELOAD=" .. h.quote(h.preload) .. " " or "")
      .. "LUA_CPATH=" .. h.quote(h.build .. "/lib/?.so;;") .. " XDG_RUNTIME_DIR=" .. h.quote(xdg)
      .. " CORRAL_LOVE_HEADLESS=1 timeout -s KILL 60 love examples/love")
    os.execute("rm -rf " .. h.quote(xdg))
    assert.are.equal(0, code, err)
    assert.matches("primes below 6000000: 412849", out, 1, true)
    local took, frames, longest = out:match("computed in ([%d.]+) s on 2 thread workers; "
      .. "(%d+) frames meanwhile, longest ([%d.]+) s")
    took, frames, longest = tonumber(took), tonumber(frames), tonumber(longest)
    assert.is_truthy(took, out)
    assert.is_true(took > 0.2, "the computation was too short to tell: " .. took)
    -- a wait at top level would have held one frame for the whole computation
    assert.is_true(frames >= 5, out)
    assert.is_true(longest < took / 2, out)
  end)
end)
