# Peer of idle.lua: concurrent.futures.wait on N pending futures for 1 s.
import concurrent.futures as cf, sys, time
N = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
fs = [cf.Future() for _ in range(N)]
t0 = time.process_time()
done, not_done = cf.wait(fs, timeout=1)
cpu = time.process_time() - t0
assert len(not_done) == N
print("idle_wait_cpu_ms %.2f" % (cpu * 1000))
