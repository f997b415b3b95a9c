"""The peer of process.lua: ProcessPoolExecutor(2) with the same tiny calls:
throughput (calls/s), round trip (median, us), or start until the first
answer (median, ms), or 64 MiB of bytes to a worker and back (median, ms).
Usage: process_pool.py throughput|latency|start|big [N]"""
import statistics, sys, time
from concurrent.futures import ProcessPoolExecutor

def inc(x):
    return x + 1

def echo(b):
    return b

def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "throughput"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else None
    if mode == "big":
        n = n or 5
        data = bytes(range(256)) * (64 * 1024 * 4)
        d = []
        with ProcessPoolExecutor(1) as ex:
            ex.submit(inc, 1).result()
            for _ in range(n):
                t0 = time.perf_counter()
                assert len(ex.submit(echo, data).result()) == len(data)
                d.append(time.perf_counter() - t0)
        print("big_ms %.3f" % (statistics.median(d) * 1e3))
        return
    if mode == "start":
        n = n or 10
        d = []
        for _ in range(n):
            t0 = time.perf_counter()
            with ProcessPoolExecutor(1) as ex:
                assert ex.submit(inc, 1).result() == 2
                d.append(time.perf_counter() - t0)
        print("start_ms %.2f" % (statistics.median(d) * 1e3))
        return
    with ProcessPoolExecutor(2) as ex:
        list(ex.map(inc, range(4)))  # started
        if mode == "throughput":
            n = n or 5000
            t0 = time.perf_counter()
            fs = [ex.submit(inc, i) for i in range(n)]
            assert [f.result() for f in fs][-1] == n
            print("calls_per_s %.0f" % (n / (time.perf_counter() - t0)))
        else:
            n = n or 500
            d = []
            for i in range(n):
                t0 = time.perf_counter()
                ex.submit(inc, i).result()
                d.append(time.perf_counter() - t0)
            print("round_trip_us %.1f" % (statistics.median(d) * 1e6))

if __name__ == "__main__":
    main()
