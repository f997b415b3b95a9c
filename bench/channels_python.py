"""Peers of bench/channels.lua: asyncio.Queue ping-pong between two tasks,
queue.Queue ping-pong between two threads, and asyncio.Queue throughput of
small values. Prints one figure."""
import asyncio, queue, sys, threading, time

mode = sys.argv[1] if len(sys.argv) > 1 else "local"
N = int(sys.argv[2]) if len(sys.argv) > 2 else 100000

async def ping_pong():
    a, b = asyncio.Queue(1), asyncio.Queue(1)
    async def echo():
        for _ in range(N):
            await b.put(await a.get())
    t = asyncio.ensure_future(echo())
    t0 = time.perf_counter()
    for i in range(N):
        await a.put(i)
        assert await b.get() == i
    await t
    print("round_trip_us %.3f" % ((time.perf_counter() - t0) / N * 1e6))

async def throughput():
    q = asyncio.Queue(1024)
    async def produce():
        for i in range(N):
            await q.put(i)
        await q.put(None)
    t0 = time.perf_counter()
    t = asyncio.ensure_future(produce())
    n = 0
    while (await q.get()) is not None:
        n += 1
    await t
    print("values_per_s %.0f" % (N / (time.perf_counter() - t0)))

def threads():
    a, b = queue.Queue(1), queue.Queue(1)
    def echo():
        for _ in range(N):
            b.put(a.get())
    t = threading.Thread(target=echo)
    t.start()
    t0 = time.perf_counter()
    for i in range(N):
        a.put(i)
        assert b.get() == i
    t.join()
    print("round_trip_us %.3f" % ((time.perf_counter() - t0) / N * 1e6))

if mode == "local":
    asyncio.run(ping_pong())
elif mode == "threads":
    threads()
else:
    asyncio.run(throughput())
