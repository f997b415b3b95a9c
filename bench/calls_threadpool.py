# Peer of calls.lua: ThreadPoolExecutor(2) with tiny calls.
import concurrent.futures as cf, statistics, sys, time
mode = sys.argv[1] if len(sys.argv) > 1 else "throughput"
N = int(sys.argv[2]) if len(sys.argv) > 2 else 50000
def inc(x): return x + 1
with cf.ThreadPoolExecutor(2) as ex:
    ex.submit(inc, 0).result()
    if mode == "throughput":
        t0 = time.perf_counter()
        fs = [ex.submit(inc, i) for i in range(N)]
        r = [f.result() for f in fs]
        dt = time.perf_counter() - t0
        print("calls_per_s %.0f" % (N / dt))
    else:
        d = []
        for i in range(N):
            t0 = time.perf_counter()
            ex.submit(inc, i).result()
            d.append(time.perf_counter() - t0)
        print("round_trip_us %.1f" % (statistics.median(d) * 1e6))
