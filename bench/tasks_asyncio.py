# Peer of tasks.lua: asyncio create_task + gather of N trivial tasks.
import asyncio, sys, time
N = int(sys.argv[1]) if len(sys.argv) > 1 else 200000
async def nop(i): return i
async def main():
    t0 = time.perf_counter()
    ts = [asyncio.create_task(nop(i)) for i in range(N)]
    r = await asyncio.gather(*ts)
    dt = time.perf_counter() - t0
    assert r[-1] == N - 1
    print("tasks_per_s %.0f" % (N / dt))
asyncio.run(main())
