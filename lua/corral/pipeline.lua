--- Pipelines: stages joined by bounded channels.
--
--     local p = corral.pipeline {
--       { fetch, workers = 8 },                      -- tasks here (mode "async")
--       { parse, workers = 4, mode = "thread" },     -- thread workers
--       { store },
--       buffer = 64, ordered = true, on_error = "collect",
--     }
--     for result in p:run(urls) do print(result) end
--
-- Each stage takes an item and returns the next stage's item (a stage that
-- returns nil drops it: a filter). A stage runs `workers` copies at once
-- (default 1), as tasks of this context (`mode = "async"`, the default) or
-- on a pool of `workers` thread or process workers (its function then
-- travels as bytecode, and items travel as call arguments do).
--
-- The input is a table (its items 1..n) or an iterator function, called for
-- the next item until it returns nil; an endless one is fine. At most
-- `buffer` items wait between two stages, and at most (stages + 1) x
-- `buffer` + the stages' workers items are in the pipeline at once, however
-- slow a stage or the consumer is: a slow stage slows the producer
-- (backpressure) and memory stays bounded.
--
-- `on_error`: `"stop"` (the default) cancels the pipeline at the first error
-- and raises it from the iterator (or `collect`); `"skip"` drops the item
-- whose stage failed; `"collect"` drops it too and keeps
-- `{ index =, item =, error = }` in `p:errors()` (and `collect`'s second
-- result). `ordered = true` gives the results in input order, otherwise in
-- the order they finish. `progress` is as in `corral.gather`.
-- @module corral.pipeline
local errors = require "corral.errors"
local task = require "corral.task"
local sync = require "corral.sync"
local sched = require "corral.sched"

local type, pcall, error, setmetatable, floor = type, pcall, error, setmetatable, math.floor

local M = {}
local Pipeline = {}
Pipeline.__index = Pipeline

local MODES = { async = true, thread = true, process = true }
local ON_ERROR = { stop = true, skip = true, collect = true }
local OPTIONS = { buffer = true, ordered = true, on_error = true, progress = true }
local STAGE_OPTIONS = { workers = true, mode = true, name = true }

local function is_callable(fn)
  local mt = getmetatable(fn)
  return type(fn) == "function" or (type(mt) == "table" and mt.__call ~= nil)
end

-- The options of a table that also holds a list: its keys that are not 1..n.
local function named(t)
  local o = {}
  for k, v in pairs(t) do
    if type(k) ~= "number" or k < 1 or k > #t or k ~= floor(k) then o[k] = v end
  end
  return o
end

local function whole(n, min)
  return type(n) == "number" and n >= min and n == floor(n)
end

--- A pipeline of stages.
-- @tparam table spec its stages (`{ fn, workers =, mode =, name = }`, in order) and options
--  `buffer` (items that wait between two stages, default 64), `ordered` (default false),
--  `on_error` (`"stop"`, `"skip"` or `"collect"`), `progress`
-- @return the pipeline: `run`, `collect`, `errors`, `cancel`
function M.pipeline(spec)
  local fname = "corral.pipeline"
  errors.check(type(spec) == "table" and #spec >= 1, fname, "spec",
    "a table of stages ({ fn, workers =, mode = }, ...) and options", spec)
  errors.check_options(fname, named(spec), OPTIONS)
  local stages = {}
  for i = 1, #spec do
    local s, where = spec[i], "stage " .. i
    if is_callable(s) then s = { s } end
    errors.check(type(s) == "table" and is_callable(s[1]), fname, where,
      "a function or a table { fn, workers =, mode = }", s)
    errors.check_options(fname .. " (" .. where .. ")", named(s), STAGE_OPTIONS)
    local mode = s.mode or "async"
    errors.check(MODES[mode] ~= nil, fname, where .. ".mode", '"async", "thread" or "process"',
      s.mode)
    errors.check(s.workers == nil or whole(s.workers, 1), fname, where .. ".workers",
      "a whole number >= 1", s.workers)
    if mode ~= "async" then
      errors.check(type(s[1]) == "function", fname, where,
        "a Lua function (it travels to its workers)", s[1])
    end
    stages[i] = { fn = s[1], workers = s.workers or 1, mode = mode, name = s.name or where }
  end
  local buffer = spec.buffer or 64
  errors.check(whole(buffer, 1), fname, "buffer", "a whole number >= 1", spec.buffer)
  errors.check(spec.ordered == nil or type(spec.ordered) == "boolean", fname, "ordered",
    "a boolean", spec.ordered)
  local on_error = spec.on_error or "stop"
  errors.check(ON_ERROR[on_error] ~= nil, fname, "on_error", '"stop", "skip" or "collect"',
    spec.on_error)
  return setmetatable({ _stages = stages, _buffer = buffer, _ordered = spec.ordered == true,
    _on_error = on_error, _progress = spec.progress, _errors = {}, _run = false }, Pipeline)
end

-- ======================================================================== --
-- A run                                                                    --
-- ======================================================================== --

-- The results of a stage's function for one item: ok and the value.
local function call_async(st, x)
  local ok, v = pcall(st.fn, x)
  if not ok then v = errors.raised(v) end -- (an error object, as a worker stage's)
  return ok, v
end

local function call_pool(st, x)
  local f = st.pool:call(st.fn, x)
  return pcall(f.result, f)
end

-- Stop everything of run `r` (its tasks, its pools); the first error is kept.
local function stop(r, e)
  if r.stopped then return end
  r.stopped = true
  if e ~= nil and r.err == nil then r.err = e end
  for i = 1, #r.tasks do
    if r.tasks[i] ~= sched.current() then r.tasks[i]:cancel() end
  end
  for i = 1, #r.pools do r.pools[i]:stop() end
  r.chans[#r.chans]:close()
end

local function feeder(r, nexti)
  local seq = 0
  while true do
    r.window:acquire()
    local ok, x = pcall(nexti)
    if not ok then
      r.window:release()
      stop(r, x)
      return
    end
    if x == nil then
      r.window:release()
      break
    end
    seq = seq + 1
    r.vals[seq], r.items[seq] = x, x
    r.chans[1]:put(seq)
  end
  r.total = seq
  if r.prog then r.prog.total = seq end
  r.chans[1]:close()
end

-- Put seq in ch: false when the run was stopped meanwhile (ch is closed).
local function put(r, ch, seq)
  local ok, e = pcall(ch.put, ch, seq)
  if ok then return true end
  if r.stopped then return false end
  error(e, 0)
end

local function runner(p, r, i)
  local st, inp, out, last = p._stages[i], r.chans[i], r.chans[i + 1], r.chans[#r.chans]
  local call = st.mode == "async" and call_async or call_pool
  while true do
    local seq = inp:get()
    if seq == nil then break end
    local ok, v = call(st, r.vals[seq])
    if r.stopped then return end
    if ok and v ~= nil then
      r.vals[seq] = v
      if not put(r, out, seq) then return end
    else
      r.vals[seq] = nil
      if not ok then
        if p._on_error == "stop" then
          stop(r, v)
          return
        end
        r.failed[seq] = true
        if p._on_error == "collect" then
          p._errors[#p._errors + 1] = { index = seq, item = r.items[seq], error = v, stage = i }
        end
      end
      r.dropped[seq] = true
      -- (straight to the output: later stages skip it)
      if not put(r, last, seq) then return end
    end
  end
  r.left[i] = r.left[i] - 1
  if r.left[i] == 0 then out:close() end
end

local function input_iter(fname, input)
  if type(input) == "table" then
    local i, n = 0, #input
    return function()
      if i >= n then return nil end
      i = i + 1
      return input[i]
    end, n
  end
  errors.check(is_callable(input), fname, "input", "a table or an iterator function", input)
  return input, nil
end

--- Run the pipeline over `input` (a table, or an iterator function called
-- for the next item until it returns nil). Returns an iterator of the
-- results (input order when `ordered`). Breaking out of the loop early
-- leaves the pipeline waiting: call `p:cancel()` then.
function Pipeline:run(input)
  local fname = "pipeline:run"
  if self._run and not self._run.finished then
    errors.usage(fname, "this pipeline is already running (one run at a time)")
  end
  local nexti, total = input_iter(fname, input)
  local nst, buffer = #self._stages, self._buffer
  local inflight = (nst + 1) * buffer
  for i = 1, nst do inflight = inflight + self._stages[i].workers end
  local r = { tasks = {}, pools = {}, chans = {}, vals = {}, items = {}, dropped = {}, failed = {},
    left = {}, window = sync.semaphore(inflight), total = total,
    prog = require("corral.progress").new(self._progress, total) }
  self._run, self._errors = r, {}
  for i = 1, nst + 1 do r.chans[i] = sync.channel(buffer) end
  for i = 1, nst do
    local st = self._stages[i]
    if st.mode ~= "async" then
      st.pool = require("corral.worker").pool_for({ workers = st.workers, mode = st.mode })
      r.pools[#r.pools + 1] = st.pool
    end
    r.left[i] = st.workers
    for _ = 1, st.workers do r.tasks[#r.tasks + 1] = task.spawn(runner, self, r, i) end
  end
  r.tasks[#r.tasks + 1] = task.spawn(feeder, r, nexti)
  local out, ordered, nextseq, ready = r.chans[nst + 1], self._ordered, 1, {}
  local function finish()
    r.finished = true
    if r.prog then r.prog:finish() end
    for i = 1, #r.pools do r.pools[i]:stop() end
    if r.err ~= nil then error(r.err, 0) end
  end
  -- take one seq off the output: true when it is a result (not dropped)
  local function take(seq)
    r.window:release()
    if r.prog then r.prog:tick(r.failed[seq]) end
    local v = r.vals[seq]
    r.vals[seq], r.items[seq] = nil, nil
    if r.dropped[seq] then
      r.dropped[seq], r.failed[seq] = nil, nil
      return false
    end
    return true, v
  end
  return function()
    while true do
      if r.finished then return nil end
      if ordered and ready[nextseq] ~= nil then
        local seq = nextseq
        ready[seq] = nil
        nextseq = nextseq + 1
        local is, v = take(seq)
        if is then return v end
      else
        local seq = r.err == nil and out:get() or nil
        if seq == nil then
          finish()
          return nil
        end
        if ordered then
          ready[seq] = true
        else
          local is, v = take(seq)
          if is then return v end
        end
      end
    end
  end
end

--- Run the pipeline over `input` and return the list of results, and the
-- list of errors (with `on_error = "collect"`), in input order.
function Pipeline:collect(input)
  local res = {}
  for v in self:run(input) do res[#res + 1] = v end
  table.sort(self._errors, function(a, b) return a.index < b.index end)
  return res, self._errors
end

--- The errors kept (`on_error = "collect"`): `{ index =, item =, error =,
-- stage = }` each, `index` the item's place in the input.
function Pipeline:errors() return self._errors end

--- Cancel a run: its tasks are cancelled, its workers stopped, and its
-- iterator ends. Returns true when a run was going.
function Pipeline:cancel()
  local r = self._run
  if not r or r.finished or r.stopped then return false end
  stop(r, nil)
  r.finished = true
  if r.prog then r.prog:finish() end
  return true
end

return M
