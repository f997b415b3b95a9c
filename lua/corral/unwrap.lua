--- Automatic unwrapping for workers that run in the caller's context (async
-- and sync modes): futures among the arguments, at the top level or inside
-- plain tables (at any depth), are replaced by their first results. The
-- tables that lead to a future are copied (their cycles and shared
-- sub-tables kept, pointing at the copies); every other value is the
-- caller's own. (Thread workers do the same in the codec, without decoding
-- in the caller.)
-- @module corral.unwrap
local future = require "corral.future"

local is_future, first = future.is_future, future.first
local type, getmetatable, pairs, unpack = type, getmetatable, pairs, unpack

local M = {}

local NONE = {} -- (never written to)

-- A table y met in the walk of `find`: a future is noted, a plain table
-- not seen yet is pushed. Returns the new counts.
local function meet(y, fs, nf, seen, stack, top)
  if is_future(y) then
    nf = nf + 1
    fs[nf] = y
  elseif getmetatable(y) == nil and not seen[y] then
    seen[y] = true
    top = top + 1
    stack[top] = y
  end
  return nf, top
end

-- The futures among args[1..n] (inside plain tables too), in the order
-- found; nil when there are none. One walk, each table once, no recursion.
local function find(args, n)
  local fs, nf, seen, stack, top
  for i = 1, n do
    local v = args[i]
    if type(v) == "table" then
      fs, seen, stack = fs or {}, seen or {}, stack or {}
      nf, top = meet(v, fs, nf or 0, seen, stack, 0)
      while top > 0 do
        local t = stack[top]
        stack[top] = nil
        top = top - 1
        for k, x in pairs(t) do
          if type(k) == "table" then nf, top = meet(k, fs, nf, seen, stack, top) end
          if type(x) == "table" then nf, top = meet(x, fs, nf, seen, stack, top) end
        end
      end
    end
  end
  if nf and nf > 0 then return fs end
  return nil
end

-- The plain tables that lead to a future (reached from args[1..n]): a
-- walk that notes each table's parents, then marks the ancestors of every
-- table holding a future. Returns table -> its copy (empty yet).
local function leading(args, n)
  local parents, holders, seen = {}, {}, {}
  local stack, top = {}, 0
  local function edge(y, t)
    if is_future(y) then
      holders[#holders + 1] = t
    elseif type(y) == "table" and getmetatable(y) == nil then
      local ps = parents[y]
      if not ps then
        ps = {}
        parents[y] = ps
      end
      ps[#ps + 1] = t
      if not seen[y] then
        seen[y] = true
        top = top + 1
        stack[top] = y
      end
    end
  end
  for i = 1, n do
    local v = args[i]
    if type(v) == "table" and getmetatable(v) == nil and not seen[v] then
      seen[v] = true
      top = top + 1
      stack[top] = v
      while top > 0 do
        local t = stack[top]
        stack[top] = nil
        top = top - 1
        for k, x in pairs(t) do
          edge(k, t)
          edge(x, t)
        end
      end
    end
  end
  local marked = {}
  for i = 1, #holders do
    top = top + 1
    stack[top] = holders[i]
  end
  while top > 0 do
    local t = stack[top]
    stack[top] = nil
    top = top - 1
    if not marked[t] then
      marked[t] = {}
      local ps = parents[t]
      if ps then
        for i = 1, #ps do
          top = top + 1
          stack[top] = ps[i]
        end
      end
    end
  end
  return marked
end

--- The futures among args[1..n] (at the top level or inside plain tables,
-- at any depth), in the order found: a call's inputs.
function M.inputs(args, n)
  return find(args, n) or NONE
end

--- The arguments with the first results of their inputs (all done) in
-- place: the tables that lead to an input are copied (cycles and shared
-- sub-tables kept, pointing at the copies).
function M.values(args, n)
  local copies = leading(args, n) -- table -> its copy (empty yet)
  local function value(v)
    if is_future(v) then return first(v) end
    return copies[v] or v
  end
  for t, copy in pairs(copies) do
    for k, x in pairs(t) do
      local k2 = value(k)
      if k2 ~= nil and k2 == k2 then copy[k2] = value(x) end -- (a key that became nil or NaN stays out)
    end
  end
  local out = {}
  for i = 1, n do out[i] = value(args[i]) end
  return unpack(out, 1, n)
end

return M
