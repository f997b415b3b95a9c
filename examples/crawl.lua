-- crawl.lua: a crawler-like pipeline over local files. A made-up site of
-- pages (files that link to each other) is fetched under a rate limit with
-- retries (a fetch fails now and then, as a network would), parsed on
-- thread workers, and the results stored as they come. Run it with
-- `bin/corral examples/crawl.lua [PAGES]`.
local corral = require "corral"

local pages = tonumber(arg[1]) or 200
local site = os.tmpname() .. ".site"

-- The site: page i has some words and links to three other pages.
corral.fs.mkdir(site)
for i = 1, pages do
  local links = {}
  for k = 1, 3 do links[k] = ("-> page-%d"):format((i * k * k) % math.ceil(pages / 4) + 1) end
  corral.fs.write(("%s/page-%d.txt"):format(site, i),
    ("page %d says hello %s\n%s\n"):format(i, ("word "):rep(i % 17), table.concat(links, "\n")))
end

local rate = corral.limiter { rate = 500, per = 1, burst = 20 } -- 500 fetches a second at most
local attempts = 0

-- Fetch: rate-limited, retried on the (made-up) connection resets.
local function fetch(path)
  return corral.retry(function()
    rate:acquire()
    attempts = attempts + 1
    if attempts % 9 == 0 then error("connection reset fetching " .. path, 0) end
    return { path = path, body = corral.fs.read(path) }
  end, { max_retries = 4, delay = 0.01, backoff = "exponential" })
end

-- Parse (on a thread worker): count the words, pick out the links.
local function parse(page)
  local words, links = 0, {}
  for _ in page.body:gmatch("%a+") do words = words + 1 end
  for link in page.body:gmatch("%-> (page%-%d+)") do links[#links + 1] = link end
  return { path = page.path, words = words, links = links }
end

-- Store: one line per page, appended as results come.
local out = site .. "/index.txt"
local function store(info)
  corral.fs.write(out, ("%s %d %s\n"):format(info.path, info.words, table.concat(info.links, ",")),
    { append = true })
  return info
end

local p = corral.pipeline {
  { fetch, workers = 8 },
  { parse, workers = 2, mode = "thread" },
  { store },
  buffer = 16, on_error = "collect", progress = { desc = "crawling" },
}

local input = {}
for i = 1, pages do input[i] = ("%s/page-%d.txt"):format(site, i) end

local t0 = corral.now()
local words, linked = 0, {}
for info in p:run(input) do
  words = words + info.words
  for _, l in ipairs(info.links) do linked[l] = (linked[l] or 0) + 1 end
end
local top, most = nil, 0
for l, c in pairs(linked) do
  if c > most or (c == most and l < top) then top, most = l, c end
end
print(("%d pages crawled (%d fetch attempts, %d failed for good), %d words, in %.2f s")
  :format(pages - #p:errors(), attempts, #p:errors(), words, corral.now() - t0))
local _, lines = corral.fs.read(out):gsub("\n", "")
print(("most linked: %s (%d links); the index has %d lines"):format(top, most, lines))
os.execute("rm -rf '" .. site .. "'")
