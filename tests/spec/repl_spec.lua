-- The interactive REPL, driven through a pseudo-terminal as a person would:
-- what is typed, and what appears on the screen.
local pty = require "pty"

local BIN = (os.getenv("CORRAL_BUILD") or ".") .. "/bin/corral"

describe("the REPL", function()
  local home, p

  before_each(function()
    home = os.tmpname()
    os.remove(home)
    assert(os.execute("mkdir -p " .. home) == 0)
  end)

  after_each(function()
    if p then p:close() end
    p = nil
    os.execute("rm -rf " .. home)
  end)

  local function start(args)
    local argv = { BIN }
    for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
    p = pty.spawn(argv, { HOME = home })
    p:expect("Ctrl-D to leave", 20, true)
    p:expect("> ", 20, true)
    return p
  end

  -- Type a line and wait for the next prompt; returns what came between.
  local function line(s, prompt)
    p:send(s .. "\r")
    p:expect(s, 20, true) -- the echo
    local m = p.mark
    local pr = "\n" .. (prompt or "> ")
    p:expect(pr, 30, true)
    return p:screen(true):sub(m, p.mark - 1 - #pr) .. "\n"
  end

  it("prints the value of an expression, =expr, and tables, strings and futures as values", function()
    start()
    assert.matches("^%s*2%s*\n$", line("1+1"))
    assert.matches("^%s*3%s*\n$", line("=1+2"))
    assert.matches('{ 1, 2, a = 3, b = { c = "x" } }', line("({ 1, 2, a = 3, b = { c = 'x' } })"), 1, true)
    assert.matches('"hi\\n"', line("'hi\\n'"), 1, true)
    assert.matches("1\t2\tnil", line("1, 2, nil"), 1, true)
    assert.matches("{ { { {...} } } }", line("({ { { { { 1 } } } } })"), 1, true)
    line("t = {}; t.self = t")
    assert.matches("<cycle>", line("t"), 1, true)
    line("f = corral.spawn(function() return 15 end)")
    assert.matches("<future done: 15>", line("f"), 1, true)
    assert.matches("<future pending>", line("corral.future()"), 1, true)
    line("g = corral.spawn(function() error(corral.error('WorkerError', 'no')) end)")
    assert.matches("<future failed: WorkerError: no>", line("g"), 1, true)
    line("h = corral.spawn(function() error('plain') end)")
    assert.matches("^%s*<future failed: stdin:1: plain>%s*$", line("h")) -- (one line: no traceback)
    assert.matches("corral.worker(", line("corral.worker{ sq = function(_, x) return x * x end }:init()"),
      1, true)
    assert.matches("<channel", line("corral.channel(2)"), 1, true)
    -- a statement prints nothing
    assert.matches("^%s*$", line("local x = 1"))
  end)

  it("asks for more with >> until the chunk is complete", function()
    start()
    line("function double(x)", ">> ")
    line("  return x * 2", ">> ")
    line("end")
    assert.matches("42", line("double(21)"), 1, true)
    -- an error does not end the REPL, and earlier lines are kept
    local out = line("error('boom')")
    assert.matches("error: stdin:1: boom", out, 1, true)
    assert.matches("42", line("double(21)"), 1, true)
    assert.matches("error: stdin:1: unexpected symbol near '='", line("x = = 1"), 1, true)
  end)

  it("runs each line as a task: result() waits without stopping the loop, and Ctrl-C cancels it",
    function()
      start()
      line("w = corral.worker{ sq = function(_, x) return x * x end }:init()")
      -- a line waits for a worker, the loop running meanwhile
      assert.matches("49", line("w:sq(7):result()"), 1, true)
      -- a line that waits for ever, cancelled with Ctrl-C
      -- (Ctrl-C once the line runs: it prints first; sent with the line, the
      -- signal would come while the line is still being read, and clear it)
      p:send("print('run' .. 'ning'); corral.future():result()\r")
      p:expect("running", 20, true)
      p:send("\3")
      p:expect("cancelled", 20, true)
      p:expect("\n> ", 20, true)
      -- the REPL goes on, and so do the workers
      assert.matches("81", line("w:sq(9):result()"), 1, true)
      -- a second Ctrl-C is handled too, not the end of the process
      p:send("print('sleep' .. 'ing'); corral.sleep(60)\r")
      p:expect("sleeping", 20, true)
      p:send("\3")
      p:expect("cancelled", 20, true)
      p:expect("\n> ", 20, true)
      assert.matches("3", line("1+2"), 1, true)
    end)

  it("prints a task's output above the prompt, and the line being typed is drawn again", function()
    start()
    line("corral.spawn(function() for i = 1, 6 do corral.sleep(0.25) print('tick ' .. i) end end)")
    p:expect("tick 1", 20, true)
    p:send("abc")
    p:expect("abc", 20, true)
    local n = tonumber(p:expect("tick (%d)", 20))
    assert.is_true(n >= 2)
    -- the typed text comes back below the output
    p:expect("> abc", 20, true)
    -- a thread worker's print goes above the prompt too
    p:send("\21") -- Ctrl-U: clear the typed text
    line("wk = corral.worker{ hello = function() print('hello from a worker') end }:init()")
    p:send("wk:hello()\r")
    p:expect("hello from a worker", 20, true)
    p:expect("> ", 20, true)
    p:expect("tick 6", 20, true)
  end)

  it("Ctrl-C at the prompt clears the line, and an unfinished chunk", function()
    start()
    p:send("for i = 1, 3 do")
    p:send("\r")
    p:expect(">> ", 20, true)
    p:send("\3")
    p:expect("^C", 20, true)
    p:expect("\n> ", 20, true)
    assert.matches("^%s*7%s*\n$", line("3 + 4"))
  end)

  it("recalls history (Ctrl-P) and keeps it in ~/.corral_history", function()
    start()
    line("n = (n or 0) + 1")
    p:send("\16") -- Ctrl-P: the line before
    p:expect("n = (n or 0) + 1", 20, true)
    p:send("\r")
    p:expect("\n> ", 20, true)
    assert.matches("2", line("n"), 1, true)
    p:send("\4")
    p:expect("[exit 0]", 20, true)
    local f = assert(io.open(home .. "/.corral_history"))
    local text = f:read("*a"):gsub("\\040", " ") -- (libedit's encoding of a space)
    f:close()
    assert.matches("n = (n or 0) + 1", text, 1, true)
    -- a new REPL has it
    p:close()
    start()
    p:send("\16")
    p:expect("n", 20, true)
  end)

  it("completes globals, fields and methods with Tab", function()
    start()
    p:send("corral.spa\t")
    p:expect("corral.spawn", 20, true)
    p:send("\21")
    line("fut = corral.future()")
    p:send("fut:resu\t")
    p:expect("fut:result", 20, true)
    p:send("\21")
    line("wrk = corral.worker{ square = function(_, x) return x * x end }:init()")
    p:send("wrk:squ\t")
    p:expect("wrk:square", 20, true)
    p:send("(5):result()\r")
    p:expect("25", 20, true)
  end)

  it(":help, :stats and :workers", function()
    start()
    assert.matches("Ctrl-C", line(":help"), 1, true)
    assert.matches("home", line(":stats"), 1, true)
    assert.matches("no workers", line(":workers"), 1, true)
    line("w = corral.worker{ sq = function(_, x) return x * x end }:options{ name = 'squarer' }:init()")
    assert.matches("squarer", line(":workers"), 1, true)
    assert.matches("unknown command :nope", line(":nope"), 1, true)
  end)

  it("Ctrl-D stops the workers and leaves with status 0", function()
    start()
    line("w = corral.worker{ sq = function(_, x) return x * x end }:init()")
    line("f = w:sq(3)")
    p:send("\4")
    p:expect("[exit 0]", 30, true)
  end)

  it("corral.exit() leaves with status 0, corral.exit(3) with 3, and output is not lost", function()
    start()
    p:send("print('bye'); corral.exit()\r")
    p:expect("bye", 20, true)
    p:expect("[exit 0]", 30, true)
    p:close()
    start()
    p:send("corral.exit(3)\r")
    p:expect("[exit 3]", 30, true)
  end)

  it("corral -i script runs the script, then the REPL with its globals", function()
    local script = home .. "/s.lua"
    local f = assert(io.open(script, "w"))
    f:write("answer = 6 * 7\nprint('script ran')\n")
    f:close()
    start({ "-i", script })
    assert.matches("script ran", p:screen(true), 1, true)
    assert.matches("42", line("answer"), 1, true)
  end)
end)
