#!/usr/bin/env python3
"""Run each corral benchmark beside its peer, several times, and print the
medians with the ratio to the peer. Usage: bench/run.py BUILD [RUNS]"""
import os, re, shutil, statistics, subprocess, sys

build = sys.argv[1] if len(sys.argv) > 1 else "."
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
corral = os.path.join(build, "bin", "corral")
here = os.path.dirname(os.path.abspath(__file__))

def measure(cmd, env=None):
    vals = []
    for _ in range(runs):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        vals.append(float(out.split()[-1]))
    return statistics.median(vals)

def row(name, ours, peer, peer_name, unit, higher_is_better):
    ratio = (ours / peer if higher_is_better else peer / ours) if ours and peer else float("nan")
    print(f"{name:<34} {ours:>14,.2f} {unit:<10} {peer_name:<26} {peer:>14,.2f}   x{ratio:,.1f}")

B = lambda f: os.path.join(here, f)
print(f"median of {runs} runs; x = how many times better corral is than the peer")
print(f"{'benchmark':<34} {'corral':>14} {'unit':<10} {'peer':<26} {'peer value':>14}   ratio")
ours = measure([corral, B("tasks.lua"), "1000000"])
peer = measure([sys.executable, B("tasks_asyncio.py"), "200000"])
row("spawn+finish 1M trivial tasks", ours, peer, "asyncio create_task", "tasks/s", True)
if shutil.which("tarantool"):
    t = measure(["tarantool", B("tarantool_fibers.lua"), "1000000"])
    row("  same, against Tarantool fibers", ours, t, "tarantool fiber.create", "tasks/s", True)
else:
    print("  (tarantool not installed: no fiber comparison)")
ours = measure([corral, B("gather.lua"), "100000"])
peer = measure([sys.executable, B("gather_asyncio.py"), "100000"])
row("gather overhead, 100k futures", ours, peer, "asyncio.gather", "ns/future", False)
ours = measure([corral, B("idle.lua"), "10000"])
peer = measure([sys.executable, B("idle_futures.py"), "10000"])
row("CPU while waiting 1 s, 10k futures", ours, peer, "concurrent.futures.wait", "ms", False)
ours = measure([corral, B("calls.lua"), "throughput", "200000"])
peer = measure([sys.executable, B("calls_threadpool.py"), "throughput", "50000"])
row("tiny calls to a pool of 2 threads", ours, peer, "ThreadPoolExecutor(2)", "calls/s", True)
have_luv = subprocess.run(["luajit", "-e", "require 'luv'"], capture_output=True).returncode == 0
# luv's pool gets the same 2 threads as corral's (its default is 4)
luv_env = dict(os.environ, UV_THREADPOOL_SIZE="2")
if have_luv:
    luv = measure(["luajit", B("luv_queue_work.lua"), "200000"], luv_env)
    row("  same, against luv (2 threads)", ours, luv, "luv uv.queue_work", "calls/s", True)
else:
    print("  (lua-luv not installed: no queue_work comparison)")
for k in (16, 256, 4096):
    ours = measure([corral, B("window.lua"), str(k), "100000"])
    if have_luv:
        luv = measure(["luajit", B("luv_window.lua"), str(k), "100000"], luv_env)
        row(f"  at most {k} in flight, in order", ours, luv, "luv queue_work, 2 threads", "calls/s", True)
    else:
        row(f"  at most {k} in flight, in order", ours, float("nan"), "(no luv)", "calls/s", True)
w2 = measure([corral, B("threads.lua"), "2"])
w64 = measure([corral, B("threads.lua"), "64"])
row("  a pool of 64 threads on these cores", w64, w2, "the same pool of 2", "calls/s", True)
ours = measure([corral, B("start.lua")])
cold = measure([corral, B("start.lua"), "50", "cold"])
peer = measure(["luajit", B("luv_start.lua")]) if have_luv else float("nan")
peer_name = "luv new_thread + async" if have_luv else "(no luv)"
row("worker start until its first answer", ours, peer, peer_name, "us", False)
row("  same, without the spare (cold)", cold, peer, peer_name, "us", False)
ours = measure([corral, B("calls.lua"), "latency", "5000"])
peer = measure([sys.executable, B("calls_threadpool.py"), "latency", "5000"])
row("one call's round trip (median)", ours, peer, "ThreadPoolExecutor(2)", "us", False)
ours = measure([corral, B("table.lua")])
peer = measure([sys.executable, B("table_pickle.py")])
row("100k-number table there and back", ours, peer, "pickle dumps+loads x2", "ms", False)
ours = measure([corral, B("process.lua"), "throughput", "20000"])
peer = measure([sys.executable, B("process_pool.py"), "throughput", "5000"])
row("tiny calls to 2 process workers", ours, peer, "ProcessPoolExecutor(2)", "calls/s", True)
ours = measure([corral, B("process.lua"), "latency", "2000"])
peer = measure([sys.executable, B("process_pool.py"), "latency", "500"])
row("  one call's round trip (median)", ours, peer, "ProcessPoolExecutor(2)", "us", False)
ours = measure([corral, B("process.lua"), "start", "20"])
peer = measure([sys.executable, B("process_pool.py"), "start", "10"])
row("  a process worker's start", ours, peer, "ProcessPoolExecutor(1)", "ms", False)
ours = measure([corral, B("process.lua"), "big", "20"])
peer = measure([sys.executable, B("process_pool.py"), "big", "5"])
row("  64 MiB there and back (buffer / bytes)", ours, peer, "ProcessPoolExecutor(1)", "ms", False)
ours = measure([corral, B("bigstring.lua")])
peer = measure([sys.executable, B("bigstring_threadpool.py")])
row("16 MiB string to a worker and back", ours, peer, "ThreadPool (no copy)", "MB/s", True)
ours = measure([corral, B("channels.lua"), "local", "200000"])
peer = measure([sys.executable, B("channels_python.py"), "local", "50000"])
row("channel ping-pong, 2 tasks", ours, peer, "asyncio.Queue(1)", "us/trip", False)
go = shutil.which("go")
if go:
    g = measure([go, "run", B("channels.go"), "1000000"])
    row("  same, against Go", ours, g, "Go unbuffered chan", "us/trip", False)
else:
    print("  (go not installed: no Go channel comparison)")
ours = measure([corral, B("channels.lua"), "threads", "50000"])
peer = measure([sys.executable, B("channels_python.py"), "threads", "20000"])
row("channel ping-pong, 2 threads", ours, peer, "queue.Queue(1), 2 threads", "us/trip", False)
ours = measure([corral, B("channels.lua"), "throughput", "1000000"])
peer = measure([sys.executable, B("channels_python.py"), "throughput", "300000"])
row("1M small values through a channel", ours, peer, "asyncio.Queue(1024)", "values/s", True)
ours = measure([corral, B("orchestration.lua"), "exec", "300"])
peer = measure([sys.executable, B("orchestration_python.py"), "exec", "300"])
row("300 commands (`true`), 8 at a time", ours, peer, "create_subprocess_exec", "cmds/s", True)
ours = measure([corral, B("orchestration.lua"), "pipeline", "200000"])
peer = measure([sys.executable, B("orchestration_python.py"), "pipeline", "100000"])
row("3-stage pipeline, 200k items", ours, peer, "asyncio.Queue(64) stages", "items/s", True)
ours = measure([corral, B("orchestration.lua"), "fs", "20000"])
peer = measure([sys.executable, B("orchestration_python.py"), "fs", "20000"])
row("4 KiB file reads from 64 tasks", ours, peer, "run_in_executor(open)", "reads/s", True)

# Raw NATS figures (issue 13, remote workers): the same loopback nats-server
# measured with libnats directly (bench/nats_raw.c), and corral's remote
# calls (bench/remote.lua) beside the JetStream figures. The server is
# started here as tests/nats.lua starts it: -js on a random port in a
# temporary directory.
def nats_server():
    import json, tempfile, time
    d = tempfile.mkdtemp(prefix="corral-nats-bench-")
    p = subprocess.Popen(["nats-server", "-js", "-a", "127.0.0.1", "-p", "-1",
                          "--ports_file_dir", d, "-sd", os.path.join(d, "js")],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ports = os.path.join(d, f"nats-server_{p.pid}.ports")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and p.poll() is None:
        try:
            with open(ports) as f:
                return p, d, json.load(f)["nats"][0]
        except (OSError, ValueError, KeyError, IndexError):
            time.sleep(0.01)
    p.kill(); p.wait(); shutil.rmtree(d, ignore_errors=True)
    return None, None, None

def raw_row(name, value, unit, what):
    print(f"{name:<34} {value:>14,.2f} {unit:<10} {what}")

raw = os.path.join(build, "obj", "bench", "nats_raw")
srv, sdir, url = nats_server() if shutil.which("nats-server") and os.path.exists(raw) else (None, None, None)
if srv:
    try:
        buffered = dict(os.environ, NATS_BUFFERED="1")
        raw_row("raw NATS request/reply (median)", measure([raw, "rtt", url, "5000"]), "us",
                "libnats, 1 in flight (core NATS)")
        raw_row("  same, libnats' default flusher", measure([raw, "rtt", url, "5000"], buffered), "us",
                "publishes held up to ~1 ms")
        raw_row("  256 in flight", measure([raw, "throughput", url, "100000"]), "req/s", "libnats")
        raw_row("  256 in flight, default flusher", measure([raw, "throughput", url, "100000"], buffered),
                "req/s", "libnats (batched writes)")
        js_rtt = measure([raw, "js", url, "2000"])
        raw_row("raw JetStream pub+fetch+ack", js_rtt, "us", "work queue, durable pull consumer, AckSync")
        js_tput = measure([raw, "js-throughput", url, "100000"])
        raw_row("  256 in flight", js_tput, "msgs/s", "js_PublishAsync, batched Fetch, Ack")
        # corral's remote calls (bench/remote.lua) on the same server: a
        # `corral serve --workers 2` host in its own process, a 16-byte echo
        ours = measure([corral, B("remote.lua"), url, "rtt", "2000"])
        row("remote call round trip, 1 in flight", ours, js_rtt, "raw JetStream pub+fetch+ack", "us", False)
        print(f"{'':<34} target: within 1.5x of raw JetStream (ratio >= x0.67): "
              f"{'met' if ours <= 1.5 * js_rtt else 'MISSED'}")
        ours = measure([corral, B("remote.lua"), url, "throughput", "20000"])
        row("remote calls, 256 in flight", ours, js_tput, "raw JetStream, 256 in flight", "calls/s", True)
        print(f"{'':<34} target: at least 70% of raw JetStream (ratio >= x0.7): "
              f"{'met' if ours >= 0.7 * js_tput else 'MISSED'}")
    finally:
        srv.terminate()
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill(); srv.wait()
        shutil.rmtree(sdir, ignore_errors=True)
else:
    print("  (nats-server or obj/bench/nats_raw missing: no raw NATS figures)")

# A C host's frame loop (examples/host): 60 Hz, corral_step once a frame,
# two CPU-bound thread workers busy all along. No peer: the target is a p99
# under 0.2 ms and no frame made late by corral. BENCH_HOST_SECONDS shortens
# the run (10 s).
host = os.path.join(build, "obj", "examples", "host")
secs = os.environ.get("BENCH_HOST_SECONDS", "10")
out = subprocess.run([host, os.path.join(here, "..", "examples", "host", "frame.lua"), secs],
                     capture_output=True, text=True, check=True).stdout
m = re.search(r"p50 ([\d.]+) us, p99 ([\d.]+) us, max ([\d.]+) us", out)
missed = re.search(r"budget: (\d+)", out)
frames = re.search(r"^(\d+) frames", out)
print(f"{'C host, 60 Hz, 2 busy workers':<34} corral_step per frame over {secs} s "
      f"({frames.group(1)} frames): p50 {m.group(1)} us, p99 {m.group(2)} us, "
      f"max {m.group(3)} us; frames made late by corral: {missed.group(1)}")
