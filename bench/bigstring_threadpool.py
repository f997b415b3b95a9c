# Peer of bigstring.lua: ThreadPoolExecutor passes the object by reference
# (no copy at all), so it is a ceiling rather than a like-for-like peer.
import concurrent.futures as cf, statistics, time
s = b"0123456789abcdef" * (1024 * 1024)
with cf.ThreadPoolExecutor(1) as ex:
    ex.submit(len, s).result()
    t = []
    for _ in range(7):
        t0 = time.perf_counter()
        r = ex.submit(lambda x: x, s).result()
        t.append(time.perf_counter() - t0)
    print("round_trip_MB_per_s %.0f" % (len(s) / statistics.median(t) / 1e6))
