-- The build as a host sees it: what corral.so and the corral binary export.
local h = require "helper"

local function exported(path)
  local out, err, code = h.sh("nm -D --defined-only " .. h.quote(path))
  assert.are.equal(0, code, err)
  local names = {}
  for kind, name in out:gmatch("%x+ (%a) ([%w_]+)\n") do
    if kind:match("[TDB]") then names[#names + 1] = name end
  end
  return names
end

describe("the build", function()
  it("exports from corral.so only corral_* and luaopen_corral", function()
    local names = exported(h.build .. "/lib/corral.so")
    local ours = 0
    for _, name in ipairs(names) do
      if name:match("^corral_") or name == "luaopen_corral" then
        ours = ours + 1
      elseif not name:match("^_") then
        error("corral.so exports an internal name: " .. name)
      end
      assert.not_matches("^corral__", name)
    end
    assert.is_true(ours >= 20, ours .. " public names")
  end)

  it("exports from the corral binary no internal name of corral", function()
    local public = {}
    for _, name in ipairs(exported(h.bin)) do
      assert.not_matches("^corral__", name)
      public[name] = true
    end
    -- (the list is read: the public names are in it)
    assert.is_true(public.corral_open and public.luaopen_corral or false, "corral_open, luaopen_corral")
  end)
end)
