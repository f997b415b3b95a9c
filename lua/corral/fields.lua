--- The slots of a future's (and a task's) hot fields. They live in the
-- table's array part: a task is then one small allocation, less than half
-- the size of the same fields as named keys, which matters at a million
-- tasks a second. Rarely used fields keep names (`_c`, `_e`, `_w`, ...).
-- @module corral.fields
return {
  S = 1,  -- state: 0 pending, 1 running, 2 done, 3 failed, 4 cancelled
  N = 2,  -- number of results
  V = 3,  -- the result (N == 1) or a table {n=...} of them
  W1 = 4, -- the first waiter (false: none)
  FN = 5, -- a task's function, until it runs
  NA = 6, -- a task's number of arguments
  A = 7,  -- a task's argument (NA == 1) or a table {n=...} of them
  CO = 8, -- a task's coroutine while it runs (false otherwise)
}
