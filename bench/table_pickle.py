"""The peer of table.lua: a list of 100,000 small numbers through pickle
dumps+loads twice (there and back, as a process pool would): the median of
20, in ms."""
import pickle, statistics, sys, time

n = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
t = [i % 1000 for i in range(n)]
d = []
for _ in range(20):
    t0 = time.perf_counter()
    r = pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(t))))
    d.append(time.perf_counter() - t0)
    assert len(r) == n
print("table_round_trip_ms %.2f" % (statistics.median(d) * 1e3))
