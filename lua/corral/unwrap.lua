--- Automatic unwrapping for workers that run in the caller's context (async
-- and sync modes): futures among the arguments, at the top level or inside
-- plain tables, are replaced by their first results. (Thread workers do the
-- same in the codec, without decoding in the caller.)
-- @module corral.unwrap
local future = require "corral.future"

local is_future = future.is_future
local unpack = unpack

local M = {}

-- Collect the futures in v (plain tables only, each table once).
local function find(v, out, seen, depth)
  if is_future(v) then
    out[#out + 1] = v
  elseif type(v) == "table" and getmetatable(v) == nil and not seen[v] and depth < 100 then
    seen[v] = true
    for k, x in pairs(v) do
      find(k, out, seen, depth + 1)
      find(x, out, seen, depth + 1)
    end
  end
end

-- A copy of v with futures replaced by their first results; tables without
-- futures are shared, not copied.
local function replace(v, seen)
  if is_future(v) then return future.first(v) end
  if type(v) ~= "table" or getmetatable(v) ~= nil then return v end
  if seen[v] ~= nil then return seen[v] end
  seen[v] = v
  local copy, replaced
  for k, x in pairs(v) do
    local k2, x2 = replace(k, seen), replace(x, seen)
    if k2 ~= k or x2 ~= x then
      copy, replaced = copy or {}, replaced or {}
      replaced[k] = true
      if k2 ~= nil then copy[k2] = x2 end -- a value that became nil stays out
    end
  end
  if not copy then return v end
  for k, x in pairs(v) do
    if not replaced[k] and copy[k] == nil then copy[k] = x end
  end
  seen[v] = copy
  return copy
end

--- The futures among args[1..n] (at the top level or inside plain
-- tables), in order: a call's inputs.
local NONE = {} -- (never written to)
function M.inputs(args, n)
  for i = 1, n do
    local v = args[i]
    if type(v) == "table" and (getmetatable(v) == nil or is_future(v)) then
      local fs, seen = {}, {}
      for j = i, n do find(args[j], fs, seen, 0) end
      return fs
    end
  end
  return NONE -- no table, no future: the common case allocates nothing
end

--- The arguments with the first results of their inputs (all done) in
-- place.
function M.values(args, n)
  local memo = {}
  local out = {}
  for i = 1, n do out[i] = replace(args[i], memo) end
  return unpack(out, 1, n)
end

return M
