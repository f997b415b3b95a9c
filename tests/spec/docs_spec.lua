-- The guide's promises against the code and the specs: every error kind the
-- guide names exists in the errors module, and some spec makes it happen and
-- asserts it.
require "corral"
local errors = require "corral.errors"

local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

-- The kinds in the first column of the table under "## Errors".
local function guide_kinds()
  local guide = slurp("docs/guide.md")
  local section = guide:match("\n## Errors\n(.-)\n## ")
  assert(section, "the guide has an Errors section")
  local kinds = {}
  for kind in section:gmatch("\n| `(%u%a+)` |") do kinds[#kinds + 1] = kind end
  return kinds
end

describe("the guide", function()
  it("names every error kind corral has, and only those", function()
    local named = {}
    for _, k in ipairs(guide_kinds()) do named[k] = true end
    for k in pairs(errors.KINDS) do assert.is_true(named[k], k .. " is not in the guide") end
    for k in pairs(named) do assert.is_true(errors.KINDS[k], k .. " is in the guide only") end
  end)

  it("names only error kinds that some spec raises and asserts", function()
    local specs = {}
    for name in io.popen("ls tests/spec/*_spec.lua"):lines() do
      if not name:find("docs_spec") then specs[#specs + 1] = slurp(name) end
    end
    local all = table.concat(specs, "\n")
    for _, kind in ipairs(guide_kinds()) do
      local asserted = all:find('is_error%([^\n]-, "' .. kind .. '"%)')
      assert.is_truthy(asserted, "no spec asserts a " .. kind)
    end
  end)
end)
