"""Peers of bench/orchestration.lua in asyncio: create_subprocess_exec with
a Semaphore(8), a pipeline of three stages joined by asyncio.Queue(64), and
file reads through run_in_executor from 64 tasks. Prints one figure."""
import asyncio, os, sys, tempfile, time

mode = sys.argv[1] if len(sys.argv) > 1 else "exec"
N = int(sys.argv[2]) if len(sys.argv) > 2 else 200

async def run_exec():
    sem = asyncio.Semaphore(8)
    async def one():
        async with sem:
            p = await asyncio.create_subprocess_exec("true")
            assert await p.wait() == 0
    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(N)))
    print("commands_per_s %.1f" % (N / (time.perf_counter() - t0)))

async def run_pipeline():
    fns = [lambda x: x + 1, lambda x: x * 2, lambda x: x - 1]
    qs = [asyncio.Queue(64) for _ in range(len(fns) + 1)]
    async def stage(fn, qin, qout):
        while True:
            x = await qin.get()
            if x is None:
                await qout.put(None)
                return
            await qout.put(fn(x))
    async def feed():
        for i in range(1, N + 1):
            await qs[0].put(i)
        await qs[0].put(None)
    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(stage(f, qs[i], qs[i + 1])) for i, f in enumerate(fns)]
    tasks.append(asyncio.ensure_future(feed()))
    while await qs[-1].get() is not None:
        pass
    await asyncio.gather(*tasks)
    print("items_per_s %.1f" % (N / (time.perf_counter() - t0)))

async def run_fs():
    fd, path = tempfile.mkstemp()
    os.write(fd, b"x" * 4096)
    os.close(fd)
    loop = asyncio.get_running_loop()
    def read():
        with open(path, "rb") as f:
            return f.read()
    per = -(-N // 64)
    async def reader():
        for _ in range(per):
            assert len(await loop.run_in_executor(None, read)) == 4096
    t0 = time.perf_counter()
    await asyncio.gather(*(reader() for _ in range(64)))
    print("reads_per_s %.1f" % (64 * per / (time.perf_counter() - t0)))
    os.remove(path)

asyncio.run({"exec": run_exec, "pipeline": run_pipeline, "fs": run_fs}[mode]())
