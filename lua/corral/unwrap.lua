--- Automatic unwrapping for workers that run in the caller's context (async
-- and sync modes): futures among the arguments, at the top level or inside
-- plain tables, are replaced by their first results. (Thread workers do the
-- same in the codec, without decoding in the caller.)
-- @module corral.unwrap
local errors = require "corral.errors"
local future = require "corral.future"
local F = require "corral.fields"

local is_future, S = future.is_future, F.S
local DONE, CANCELLED = future.DONE, future.CANCELLED

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

--- Wait for the futures in args[1..n]; returns the arguments with their
-- values in place, or nil, the error that should fail the call (the
-- upstream error, or `CancelledError`) and the input's position.
function M.resolve(args, n)
  local fs = {}
  local seen = {}
  for i = 1, n do find(args[i], fs, seen, 0) end
  if #fs == 0 then return args end
  for i = 1, #fs do
    local f = fs[i]
    if f[S] < DONE then f:exception() end -- waits; raises only if we are cancelled
    if f[S] == CANCELLED then return nil, errors.cancelled("an input was cancelled") end
    if f[S] ~= DONE then return nil, f:exception(), i end
  end
  local out, memo = { n = n }, {}
  for i = 1, n do out[i] = replace(args[i], memo) end
  return out
end

return M
