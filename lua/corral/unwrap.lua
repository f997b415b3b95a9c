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

local function plain(v) return type(v) == "table" and getmetatable(v) == nil end

-- Mark t, and every table it is reached from, as leading to a future.
local function mark(t, marked, parents)
  local stack, n = { t }, 1
  while n > 0 do
    local x = stack[n]
    stack[n] = nil
    n = n - 1
    if not marked[x] then
      marked[x] = true
      local ps = parents[x]
      if ps then
        for i = 1, #ps do
          n = n + 1
          stack[n] = ps[i]
        end
      end
    end
  end
end

local NONE = {} -- (never written to)

--- The futures among args[1..n] (at the top level or inside plain tables),
-- in the order found: a call's inputs. Returns them, and what `values`
-- needs to rebuild the arguments.
function M.inputs(args, n)
  local any = false
  for i = 1, n do
    local v = args[i]
    if type(v) == "table" and (getmetatable(v) == nil or is_future(v)) then
      any = true
      break
    end
  end
  if not any then return NONE end -- no table, no future: nothing allocated
  local fs, nf = {}, 0
  local seen, marked, parents = {}, {}, {}
  local stack, top = {}, 0
  -- v, found inside table `parent` (nil: an argument)
  local function visit(v, parent)
    if is_future(v) then
      nf = nf + 1
      fs[nf] = v
      if parent then mark(parent, marked, parents) end
    elseif plain(v) then
      if parent then
        if marked[v] then mark(parent, marked, parents) end
        local ps = parents[v]
        if not ps then
          ps = {}
          parents[v] = ps
        end
        ps[#ps + 1] = parent
      end
      if not seen[v] then
        seen[v] = true
        top = top + 1
        stack[top] = v
      end
    end
  end
  for i = 1, n do
    visit(args[i], nil)
    while top > 0 do
      local t = stack[top]
      stack[top] = nil
      top = top - 1
      for k, x in pairs(t) do
        visit(k, t)
        visit(x, t)
      end
    end
  end
  if nf == 0 then return NONE end
  fs.marked = marked
  return fs
end

-- v with its inputs (all done) replaced; tables that lead to one copied.
local function replace(v, marked, memo)
  if is_future(v) then return first(v) end
  if not marked[v] then return v end
  local copy = memo[v]
  if copy then return copy end
  copy = {}
  memo[v] = copy
  for k, x in pairs(v) do
    local k2 = replace(k, marked, memo)
    if k2 ~= nil then copy[k2] = replace(x, marked, memo) end -- a key that became nil stays out
  end
  return copy
end

--- The arguments with the first results of their inputs (all done, as
-- found by `inputs`) in place.
function M.values(args, n, fs)
  local out, marked, memo = {}, fs.marked, {}
  for i = 1, n do out[i] = replace(args[i], marked, memo) end
  return unpack(out, 1, n)
end

return M
