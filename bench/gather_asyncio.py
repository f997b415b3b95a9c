# Peer of gather.lua: asyncio.gather over N futures settled in random order.
import asyncio, random, sys, time
N = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
random.seed(42)
order = list(range(N)); random.shuffle(order)
async def run(with_gather):
    loop = asyncio.get_running_loop()
    fs = [loop.create_future() for _ in range(N)]
    t0 = time.process_time()
    async def setter():
        for i in order: fs[i].set_result(i)
    s = asyncio.ensure_future(setter())
    if with_gather:
        r = await asyncio.gather(*fs)
        assert r[-1] == N - 1
    await s
    return time.process_time() - t0
async def main():
    d = []
    for _ in range(7):
        base = await run(False); w = await run(True)
        d.append((w - base) / N)
    d.sort()
    print("gather_ns_per_future %.0f" % (max(d[3], 0) * 1e9))
asyncio.run(main())
