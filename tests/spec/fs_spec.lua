-- corral.fs: files on libuv's asynchronous operations (src/lua_fs.c,
-- lua/corral/fs.lua).
local corral = require "corral"
local h = require "helper"

local kind_of = h.kind_of

local function tmpdir()
  local d = h.tmpname() .. ".d"
  assert(os.execute("mkdir -p " .. d) == 0)
  return d
end

describe("corral.fs", function()
  it("writes and reads back any bytes, large files included", function()
    local d = tmpdir()
    local data = {}
    for i = 0, 255 do data[#data + 1] = string.char(i) end
    local bytes = table.concat(data):rep(12000) -- ~3 MB, NULs included
    assert.equal(#bytes, corral.fs.write(d .. "/a.bin", bytes))
    assert.equal(bytes, corral.fs.read(d .. "/a.bin"))
    assert.equal(0, corral.fs.write(d .. "/empty", ""))
    assert.equal("", corral.fs.read(d .. "/empty"))
    -- write truncates; append adds
    corral.fs.write(d .. "/a.bin", "short")
    corral.fs.write(d .. "/a.bin", "+more", { append = true })
    assert.equal("short+more", corral.fs.read(d .. "/a.bin"))
    os.execute("rm -rf " .. d)
  end)

  it("lists a directory sorted, with the type of each entry", function()
    local d = tmpdir()
    corral.fs.write(d .. "/b.txt", "b")
    corral.fs.write(d .. "/a.txt", "a")
    corral.fs.mkdir(d .. "/sub")
    local names, types = corral.fs.list(d)
    assert.same({ "a.txt", "b.txt", "sub" }, names)
    assert.equal("file", types["a.txt"])
    assert.equal("directory", types.sub)
    os.execute("rm -rf " .. d)
  end)

  it("stats a path and says whether one exists", function()
    local d = tmpdir()
    corral.fs.write(d .. "/f", "12345", { mode = 384 }) -- 0600
    local st = corral.fs.stat(d .. "/f")
    assert.equal("file", st.type)
    assert.equal(5, st.size)
    assert.equal(384, st.mode)
    assert.is_true(math.abs(st.mtime - os.time()) < 60)
    assert.equal("directory", corral.fs.stat(d).type)
    assert.is_true(corral.fs.exists(d .. "/f"))
    assert.is_false(corral.fs.exists(d .. "/nope"))
    assert.is_false(corral.fs.exists(d .. "/f/under-a-file"))
    os.execute("rm -rf " .. d)
  end)

  it("makes directories, with their parents when asked", function()
    local d = tmpdir()
    assert.is_true(corral.fs.mkdir(d .. "/x/y/z", { parents = true }))
    assert.equal("directory", corral.fs.stat(d .. "/x/y/z").type)
    assert.is_true(corral.fs.mkdir(d .. "/x/y/z", { parents = true })) -- exists: fine
    local k, e = kind_of(function() corral.fs.mkdir(d .. "/x") end)
    assert.equal("OSError", k)
    assert.equal("EEXIST", e.code)
    os.execute("rm -rf " .. d)
  end)

  it("raises OSError naming the path, the OS error and the call", function()
    local d = tmpdir()
    local k, e = kind_of(function() corral.fs.read(d .. "/missing") end)
    assert.equal("OSError", k)
    assert.truthy(corral.is_error(e, "OSError"))
    assert.equal(d .. "/missing", e.path)
    assert.equal("ENOENT", e.code)
    assert.equal("open", e.call)
    assert.matches(d .. "/missing: no such file or directory (ENOENT)", e.message, 1, true)
    local _, e2 = kind_of(function() corral.fs.read(d) end)
    assert.equal("EISDIR", e2.code)
    assert.equal("read", e2.call)
    local _, e3 = kind_of(function() corral.fs.list(d .. "/missing") end)
    assert.equal("ENOENT", e3.code)
    local _, e4 = kind_of(function() corral.fs.write(d .. "/no/dir/f", "x") end)
    assert.equal("ENOENT", e4.code)
    local _, e5 = kind_of(function() corral.fs.stat(d .. "/missing") end)
    assert.equal("stat", e5.call)
    os.execute("rm -rf " .. d)
  end)

  it("checks its arguments", function()
    assert.equal("UsageError", kind_of(function() corral.fs.read() end))
    assert.equal("UsageError", kind_of(function() corral.fs.read("") end))
    assert.equal("UsageError", kind_of(function() corral.fs.read("a\0b") end))
    assert.equal("UsageError", kind_of(function() corral.fs.write("/tmp/x", 5) end))
    assert.equal("UsageError", kind_of(function() corral.fs.write("/tmp/x", "", { apend = 1 }) end))
    assert.equal("UsageError", kind_of(function() corral.fs.list({}) end))
  end)

  it("suspends only its task: the call returns later, other tasks run meanwhile", function()
    local d = tmpdir()
    corral.fs.write(d .. "/f", ("x"):rep(1048576))
    local f = corral.spawn(corral.fs.read, d .. "/f")
    local other = corral.spawn(function() return "ran" end)
    assert.equal("ran", other:result())
    assert.equal(1048576, #f:result())
    -- many at once, from tasks
    local fs = {}
    for i = 1, 50 do
      fs[i] = corral.spawn(function()
        corral.fs.write(d .. "/n" .. i, tostring(i))
        return corral.fs.read(d .. "/n" .. i)
      end)
    end
    local rs = corral.gather(fs)
    for i = 1, 50 do assert.equal(tostring(i), rs[i]) end
    os.execute("rm -rf " .. d)
  end)

  it("a task cancelled while its open waits gets CancelledError at once", function()
    local d = tmpdir()
    local fifo = d .. "/fifo"
    assert(os.execute("mkfifo " .. fifo) == 0)
    -- opening a FIFO for reading waits for a writer (in libuv's threadpool)
    local t = corral.spawn(corral.fs.read, fifo)
    h.wait_until(function() return h.fifo_opens(fifo) >= 1 end, 10) -- its open has started
    assert.is_true(t:cancel())
    assert.equal("CancelledError", kind_of(function() return t:result(5) end))
    -- the abandoned open ends once a writer comes; the writer gives up after 2 s when none was left
    pcall(function()
      return corral.exec({ "sh", "-c", "printf late > " .. fifo }, { timeout = 2 }):result()
    end)
    -- a FIFO read to its end by a task that waits for its writer
    local fifo2 = d .. "/fifo2"
    assert(os.execute("mkfifo " .. fifo2) == 0)
    local t2 = corral.spawn(corral.fs.read, fifo2)
    local writer = corral.exec({ "sh", "-c", "printf hello > " .. fifo2 })
    assert.equal("hello", t2:result(10))
    assert.equal(0, writer:result(10).code)
    os.execute("rm -rf " .. d)
  end)

  it("works in a thread worker", function()
    local d = tmpdir()
    local W = corral.worker {
      rw = function(_, path, s)
        local c = require "corral"
        c.fs.write(path, s)
        return c.fs.read(path), c.fs.stat(path).size
      end,
    }
    local w = W:options({ mode = "thread" }):init()
    local f = w:rw(d .. "/t", "from a thread")
    local text, size = f:result(10)
    assert.equal("from a thread", text)
    assert.equal(13, size)
    w:stop()
    os.execute("rm -rf " .. d)
  end)
end)
