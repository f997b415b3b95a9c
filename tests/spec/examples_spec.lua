-- The scripts of examples/ run as the docs say.
local h = require "helper"

local function run_example(name, args)
  return h.sh("timeout -s KILL 60 " .. h.quote(h.bin) .. " examples/" .. name .. " " .. (args or ""))
end

describe("examples", function()
  it("fanout.lua fetches with a progress line and keeps errors apart", function()
    local out, _, code = run_example("fanout.lua", "22")
    assert.equal(0, code)
    assert.matches("20 fetched, 2 failed", out, 1, true)
  end)

  it("commands.lua runs its commands at most 8 at a time; a failure and a hang are reported", function()
    local out, err, code = run_example("commands.lua", "80")
    assert.equal(0, code)
    assert.matches("78 commands ran, 2 failed, at most 8 at once", out, 1, true)
    assert.matches("job 42 exited with 3: job 42 cannot", out, 1, true)
    assert.matches("TimeoutError: corral.exec: 'sh -c sleep 60' timed out after 2 s", out, 1, true)
    assert.matches("commands  80/80", err, 1, true) -- the progress line
  end)

  it("crawl.lua crawls every page through the rate limit and its retries", function()
    local out, _, code = run_example("crawl.lua", "60")
    assert.equal(0, code)
    local crawled, attempts, failed = out:match("(%d+) pages crawled %((%d+) fetch attempts, (%d+) failed")
    assert.equal("60", crawled)
    assert.equal("0", failed)
    assert.is_true(tonumber(attempts) > 60, "no retry happened")
    assert.matches("the index has 60 lines", out, 1, true)
  end)

  it("map_process.lua maps on process workers, in input order", function()
    local out, _, code = run_example("map_process.lua", "200")
    assert.equal(0, code)
    -- primes below 5000 + 200 * 5 = 6000: 783
    assert.matches("200 items on %d+ process workers", out)
    assert.matches("primes below 6000: 783", out, 1, true)
  end)
end)
