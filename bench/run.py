#!/usr/bin/env python3
"""Orchestrates the benchmark of chat-delete-worker; started by `scripts/bench`.

Everything runs on one broker in one go, each part in its own namespace, so every goal is a
ratio measured in the same run:

  ceiling   the bare lapin loop (bench/src/main.rs `ceiling`) on N preloaded commands
  worker    the worker on N preloaded commands: one simulated instance, zero latency; after an
            uncounted warm-up, worker and ceiling drains alternate (--pairs) and the median of
            each worker drain's ratio to the ceilings around it is reported
  replays   the same N commands (same ids, same bodies) again, after a restart
  redis     the worker with the Redis store: N fresh, then the same N replayed after a restart
  latency   publish -> result at a steady rate, against the running worker, in turn with the bare
            loop (--latency-pairs; the median probe is reported)
  aiopika   the Python peer (bench/peer_aiopika.py) on N preloaded commands
  many      K instances x M commands: start -> ready (cold and with a backlog), throughput, RSS
  floors    the bare loop with one step of the worker added: a Redis look per command (after
            the Redis drains), a synced append before each publish (in the latency probe);
            what those steps cost any implementation, printed on the line before the last

Drains are detected by counting (the ceiling and the peer count their acks, the worker's
/metrics counts answered commands); every wait is a bounded poll. Child processes are killed
and the namespaces deleted on any exit.
"""

import argparse
import atexit
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKEN = "bench-token"
TOKEN_SHA256 = hashlib.sha256(TOKEN.encode()).hexdigest()

CHILDREN = []      # Popen objects still to kill
NAMESPACES = []    # (ns, instance args) still to delete
RUN_COUNT = {}     # drains per namespace, to name the saved /metrics
ARGS = None
OUT = None
RUN_ID = None      # names every namespace of the run: bench<RUN_ID>...
RESULTS = None     # what the finished parts measured, for the figures line if a later one fails
FIGURES = ("ratio_to_ceiling", "ratio_to_aiopika", "rss_1000_mib", "ready_1000_s", "replay_ratio",
           "latency_p99_ratio", "many_queue_ratio")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --- processes ------------------------------------------------------------------------------

def spawn(cmd, log_name, env=None, stdout_to_log=False):
    """Starts a child in its own process group; stderr (and stdout for long-lived children whose
    output nobody reads) goes to a log file in the output folder."""
    path = os.path.join(OUT, log_name)
    f = open(path, "ab")
    out = f if stdout_to_log else subprocess.PIPE
    proc = subprocess.Popen(cmd, stdout=out, stderr=f, env=env, start_new_session=True)
    proc.log_path = path
    CHILDREN.append(proc)
    return proc


def stop(proc, timeout=30.0, sig=signal.SIGTERM):
    """SIGTERM, wait (bounded), then SIGKILL; only the process we started (its own group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"pid {proc.pid} ignored SIGTERM for {timeout}s; killing it")
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    if proc in CHILDREN:
        CHILDREN.remove(proc)
    return proc.returncode


def run_tool(args, timeout, log_name="tools.log"):
    """Runs a cdw-bench subcommand (or any tool) to completion; returns its RESULT json if any."""
    proc = spawn(args, log_name)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc, 5)
        raise BenchError(f"{' '.join(args[:2])} did not finish in {timeout}s")
    CHILDREN.remove(proc)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(args[:2])} failed (exit {proc.returncode}); see {proc.log_path}")
    return parse_result(out)


def parse_result(out):
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return None


def bench_tool(*args):
    return [os.path.join(ARGS.bin_dir, "cdw-bench"), args[0], "--url", ARGS.url, *args[1:]]


def cleanup_all():
    for proc in list(CHILDREN):
        try:
            stop(proc, 10)
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            log(f"could not stop pid {proc.pid}: {e}")
    for ns, inst_args in list(NAMESPACES):
        try:
            delete_namespace(ns, inst_args)
        except Exception as e:  # noqa: BLE001
            log(f"could not delete namespace {ns}: {e}")
    sweep_run_queues()


def sweep_run_queues():
    """Deletes any queue of this run the namespace clean-up did not know of (a queue a newer
    worker declares), so that no run leaves file handles behind on the broker."""
    if RUN_ID is None:
        return
    try:
        out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "--no-table-headers"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    left = [q.strip() for q in out.splitlines() if q.strip().startswith(f"bench{RUN_ID}")]
    for queue in left:
        subprocess.run(["rabbitmqctl", "-q", "delete_queue", queue], capture_output=True, timeout=60)
    if left:
        log(f"deleted {len(left)} queue(s) of this run the clean-up missed: {', '.join(left[:5])}")


def on_signal(signum, _frame):
    raise SystemExit(f"interrupted by signal {signum}")


# --- /proc and the broker ---------------------------------------------------------------------

CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK
    except (OSError, IndexError, ValueError):
        return 0.0


def proc_status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def thread_cpu_s(pid):
    """CPU seconds of each thread of a process, summed by thread name."""
    out = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    raw = f.read()
            except OSError:
                continue
            name = raw[raw.index("(") + 1:raw.rindex(")")]
            fields = raw.rsplit(")", 1)[1].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK
    except OSError:
        pass
    return out


def box_busy_s():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / CLK


def broker_pid():
    try:
        out = subprocess.run(["pgrep", "-o", "-x", "beam.smp"], capture_output=True, text=True, timeout=5).stdout.split()
        return int(out[0]) if out else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


class CpuWindow:
    """CPU seconds of the broker, of one process and of the whole box over a window."""

    def __init__(self, pid=None):
        self.broker = broker_pid()
        self.pid = pid
        self.t0 = time.monotonic()
        self.b0 = proc_cpu_s(self.broker) if self.broker else 0.0
        self.p0 = proc_cpu_s(pid) if pid else 0.0
        self.box0 = box_busy_s()

    def close(self, own_cpu_s=None):
        wall = time.monotonic() - self.t0
        broker = (proc_cpu_s(self.broker) - self.b0) if self.broker else 0.0
        own = own_cpu_s if own_cpu_s is not None else (proc_cpu_s(self.pid) - self.p0 if self.pid else 0.0)
        box = box_busy_s() - self.box0
        return {"wall_s": wall, "broker_cpu_s": broker, "proc_cpu_s": own, "box_cpu_s": box,
                "other_cpu_s": max(0.0, box - broker - own)}


def amqp_reachable():
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


# --- namespaces -------------------------------------------------------------------------------

NS_COUNT = itertools.count()


def new_ns(kind):
    """A namespace (queues and store folder) of its own for each part: a worker drain must
    never find the ids of an earlier one in its store (it would replay them)."""
    return f"bench{RUN_ID}{kind}{next(NS_COUNT)}"


def delete_namespace(ns, inst_args):
    run_tool(bench_tool("cleanup", "--ns", ns, *inst_args), timeout=300)
    NAMESPACES[:] = [x for x in NAMESPACES if x[0] != ns]


def instances_args(count, prefix=None, names=None):
    if names:
        return ["--instances", ",".join(names)]
    return ["--instance-count", str(count), "--instance-prefix", prefix]


def preload(ns, inst_args, per_instance, id_prefix):
    r = run_tool(bench_tool("preload", "--ns", ns, *inst_args, "--per-instance", str(per_instance),
                            "--token", TOKEN, "--id-prefix", id_prefix), timeout=900)
    log(f"preloaded {r['n']} commands into {ns} at {r['rate']:.0f}/s")
    return r


# --- the worker -------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Pacing off and the embedded idempotency store on, when this build knows those settings.
OPTIONAL_SECTIONS = ["[pacing]", 'deletes_per_minute = "unlimited"', "[idempotency]", 'backend = "embedded"']
FEATURES = {"optional_sections": True}


def worker_config(ns, store, port, instances, prefetch, concurrency, redis=False, tag="", pacing=None,
                  ownership=False):
    lines = [
        "[broker]", f'url = "{ARGS.url}"', f'namespace = "{ns}"', f"prefetch = {prefetch}",
        'queue_type = "quorum"',
        "[worker]", f"concurrency_per_instance = {concurrency}",
        "[http]", 'bind = "127.0.0.1"', f"port = {port}",
        "[store]", f'path = "{store}"',
    ]
    if FEATURES["optional_sections"]:
        lines += OPTIONAL_SECTIONS
    if pacing is not None:
        lines = [f"deletes_per_minute = {pacing}" if l.startswith("deletes_per_minute") else l for l in lines]
        lines.insert(lines.index("[idempotency]"), f'redis_key_prefix = "{ns}:pacing:"')
    if redis:
        lines = [l for l in lines if l != 'backend = "embedded"']
        lines += ['backend = "redis"', f'redis_url = "{ARGS.redis_url}"', f'key_prefix = "{ns}:"']
    if ownership:
        lines += ["[ownership]", "enabled = true", f'key_prefix = "{ns}:own:"']
    extra = os.environ.get("BENCH_WORKER_EXTRA_TOML", "")
    if extra:
        lines.append(extra)
    for name in instances:
        lines += [f"[instances.{name}]", 'kind = "simulated"', f'token_sha256 = "{TOKEN_SHA256}"',
                  f"[instances.{name}.simulated]", "latency_ms = 0"]
    path = os.path.join(OUT, f"{ns}{tag}.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class Worker:
    def __init__(self, ns, instances, prefetch, concurrency, store=None, redis=False, tag="", pacing=None,
                 ownership=False):
        self.ns = ns
        self.instances = instances
        self.port = free_port()
        self.store = store or os.path.join(OUT, f"{ns}{tag}-store")
        os.makedirs(self.store, exist_ok=True)
        self.prefetch = prefetch
        self.concurrency = concurrency
        self.config = worker_config(ns, self.store, self.port, instances, prefetch, concurrency, redis, tag,
                                    pacing, ownership)
        self.proc = None

    def binary(self):
        return os.path.join(ARGS.bin_dir, "chat-delete-worker")

    def check(self):
        r = subprocess.run([self.binary(), "--config", self.config, "check-config"], capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0 and FEATURES["optional_sections"] and "unknown field" in r.stderr:
            # An older build without [pacing]/[idempotency]: run it without them, and say so.
            log(f"this worker build rejects [pacing]/[idempotency] ({r.stderr.strip()}); running without them")
            FEATURES["optional_sections"] = False
            self.config = worker_config(self.ns, self.store, self.port, self.instances, self.prefetch,
                                        self.concurrency)
            return self.check()
        if r.returncode != 0:
            raise BenchError(f"worker rejects the bench config {self.config}: {r.stderr.strip()}")

    def topology(self):
        r = subprocess.run([self.binary(), "--config", self.config, "topology"], capture_output=True,
                           text=True, timeout=600)
        if r.returncode != 0:
            raise BenchError(f"worker topology failed: {r.stderr.strip()[-2000:]}")

    def start(self):
        env = dict(os.environ, RUST_LOG=ARGS.worker_log)
        self.proc = spawn([self.binary(), "--config", self.config, "run"], f"{self.ns}-worker.log", env=env,
                          stdout_to_log=True)
        self.started = time.monotonic()
        return self.proc

    def get(self, path, timeout=2.0):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()

    def wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"worker exited ({self.proc.returncode}) before ready; see {self.proc.log_path}")
            try:
                status, _ = self.get("/readyz", 1.0)
                if status == 200:
                    return time.monotonic()
            except OSError:
                pass
            time.sleep(0.01)
        raise BenchError(f"worker not ready after {timeout}s; see {self.proc.log_path}")

    def metrics(self):
        self.last_metrics = self.get("/metrics", 10.0)[1]
        return parse_prometheus(self.last_metrics)

    def rss_kb(self):
        return proc_status_kb(self.proc.pid, "VmRSS:")

    def hwm_kb(self):
        return proc_status_kb(self.proc.pid, "VmHWM:")

    def stop(self):
        if self.proc is not None:
            rc = stop(self.proc, 60)
            if rc not in (0, None):
                log(f"worker {self.ns} exited with {rc} on SIGTERM; see {self.proc.log_path}")
            self.proc = None


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text):
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            try:
                samples.append((m.group(1), labels, float(m.group(3))))
            except ValueError:
                pass
    return samples


def total(samples, name, **match):
    return sum(v for n, l, v in samples if n == name and all(l.get(k) == x for k, x in match.items()))


def histogram_quantile(samples, name, q, **match):
    """Prometheus-style quantile from cumulative buckets, linear inside the bucket."""
    buckets = sorted(((float(l["le"]), v) for n, l, v in samples
                      if n == f"{name}_bucket" and "le" in l and all(l.get(k) == x for k, x in match.items())),
                     key=lambda b: b[0])
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def stages(samples):
    """Where a command's time went: mean and p99 of each pipeline stage, in ms."""
    name = "chat_delete_stage_duration_seconds"
    out = {}
    for stage in ("claim", "session_delete", "remember", "publish_confirm"):
        count = total(samples, f"{name}_count", stage=stage)
        if count:
            p99 = histogram_quantile(samples, name, 0.99, stage=stage)
            out[stage] = (round(total(samples, f"{name}_sum", stage=stage) / count * 1000, 2),
                          round(p99 * 1000, 2) if p99 is not None else None)
    return out


# How often a drain's end is looked for, once it is near.
FINE_POLL = 0.025


def next_poll(done, target, t_from, c_from, now, cap):
    """The pause before the next scrape of a draining worker: sparse mid-drain (each scrape costs
    the worker and this script CPU that the broker would otherwise have; at 40 scrapes a second
    that was 4-5 us per command), tight near the end, which the scrape that sees it times."""
    if t_from is None or done <= c_from:
        return FINE_POLL
    left = (target - done) * (now - t_from) / (done - c_from)
    return min(cap, max(FINE_POLL, left / 2))


def drain_run(worker, n, ready_timeout, drain_timeout, poll, perf_name=None):
    """Starts the worker on a preloaded backlog; measures ready, drain, CPU and memory.

    /metrics is polled from the start (the HTTP port is up before the broker connection), so
    the drain is timed from the first answered command to the last, even when the worker starts
    answering before it reports ready (many queues with a backlog); `poll` is the longest pause
    between scrapes (`next_poll`). With `--perf`, the worker is sampled with `perf record`
    (cpu-clock) during the drain."""
    worker.start()
    pid = worker.proc.pid
    t_ready = t_first = t_done = None
    c_first = 0
    cpu = cpu_first = None
    perf = None
    m = []
    deadline = worker.started + ready_timeout + drain_timeout
    try:
        while t_done is None:
            now = time.monotonic()
            if now > deadline:
                raise BenchError(f"worker answered {total(m, 'chat_delete_commands_completed_total'):.0f} of {n} "
                                 f"commands in time; see {worker.proc.log_path}")
            if t_ready is None and now > worker.started + ready_timeout:
                raise BenchError(f"worker not ready after {ready_timeout}s; see {worker.proc.log_path}")
            if worker.proc.poll() is not None:
                raise BenchError(f"worker exited ({worker.proc.returncode}); see {worker.proc.log_path}")
            if t_ready is None:
                try:
                    if worker.get("/readyz", 1.0)[0] == 200:
                        t_ready = time.monotonic()
                except OSError:
                    pass
            try:
                m = worker.metrics()
            except OSError:
                m = []
            c = total(m, "chat_delete_commands_completed_total")
            seen = time.monotonic()
            if c > 0 and t_first is None:
                t_first, c_first = seen, c
                cpu, cpu_first = CpuWindow(pid), proc_cpu_s(pid)
                threads_first = thread_cpu_s(pid)
                if ARGS.perf and perf_name:
                    data = os.path.join(OUT, f"{perf_name}.perf.data")
                    perf = spawn(["perf", "record", "-e", "cpu-clock", "-F", "499", "--call-graph", "dwarf,16384", "-p", str(pid),
                                  "-o", data], f"{perf_name}.perf.log", stdout_to_log=True)
            if c >= n:
                t_done = seen
                break
            time.sleep(next_poll(c, n, t_first, c_first, seen, poll) if t_first is not None else 0.01)
    finally:
        if perf is not None:
            stop(perf, 30, signal.SIGINT)
            log(f"perf profile in {data} (perf report -i {data} --no-children)")
    if t_ready is None:
        t_ready = worker.wait_ready(ready_timeout)
    RUN_COUNT[worker.ns] = RUN_COUNT.get(worker.ns, 0) + 1
    with open(os.path.join(OUT, f"{worker.ns}-run{RUN_COUNT[worker.ns]}.metrics"), "w") as f:
        f.write(worker.last_metrics)
    own = proc_cpu_s(pid) - cpu_first
    threads = {k: v - threads_first.get(k, 0.0) for k, v in thread_cpu_s(pid).items()}
    window = cpu.close(own_cpu_s=own)
    secs = max(t_done - t_first, 1e-3)
    done_n = n - c_first
    p50 = histogram_quantile(m, "chat_delete_command_duration_seconds", 0.50)
    p99 = histogram_quantile(m, "chat_delete_command_duration_seconds", 0.99)
    res = {
        "n": n, "secs": secs, "rate": done_n / secs, "ready_s": t_ready - worker.started,
        "first_answer_s": t_first - worker.started,
        "svc_p50_ms": p50 * 1000 if p50 is not None else None,
        "svc_p99_ms": p99 * 1000 if p99 is not None else None,
        "peak_rss_kb": worker.hwm_kb(), "rss_after_kb": worker.rss_kb(),
        "cpu_us_per_cmd": own * 1e6 / done_n,
        "completed": total(m, "chat_delete_commands_completed_total"),
        "ok_200": total(m, "chat_delete_commands_completed_total", status="200"),
        "replays": total(m, "chat_delete_replays_total"),
        "cpu": window,
        "threads_us_per_cmd": {k: round(v * 1e6 / done_n, 1) for k, v in sorted(threads.items()) if v > 0},
        "stages_ms": stages(m),
    }
    return res


# --- the parts --------------------------------------------------------------------------------

def one_queue(kind):
    """A namespace with one instance queue, `bench`, and a results sink."""
    ns = new_ns(kind)
    inst = instances_args(1, names=["bench"])
    NAMESPACES.append((ns, inst))
    run_tool(bench_tool("declare", "--ns", ns, *inst, "--sink", "1"), timeout=120)
    return ns, inst


def run_ceiling(ns, inst, prefetch, n, log_name, before=()):
    """The bare loop over the preloaded queues of `inst`, each with `prefetch`; `before`: a step
    before each publish (`--sync-file F` or `--redis-url U`)."""
    proc = spawn(bench_tool("ceiling", "--ns", ns, *inst, "--prefetch", str(prefetch), "--n", str(n),
                            "--token", TOKEN, "--timeout-s", str(ARGS.drain_timeout), *before), log_name)
    cpu = CpuWindow(proc.pid)
    try:
        out, _ = proc.communicate(timeout=ARGS.drain_timeout + 30)
    except subprocess.TimeoutExpired:
        stop(proc, 5)
        raise BenchError("ceiling loop did not finish")
    CHILDREN.remove(proc)
    res = parse_result(out)
    if proc.returncode != 0 or res is None:
        raise BenchError(f"ceiling loop failed; see {proc.log_path}")
    res["cpu"] = cpu.close(own_cpu_s=res["cpu_s"])
    return res


def part_ceiling(n, prefetch, label, look=False):
    """The bare loop's drain; with `look`, each command first reads a record from Redis."""
    ns, inst = one_queue("c")
    preload(ns, inst, n, "c")
    before = ("--redis-url", ARGS.redis_url) if look else ()
    res = run_ceiling(ns, inst, prefetch, n, "ceiling.log", before)
    delete_namespace(ns, inst)
    if look:
        forget_redis_keys(ns)
    log(f"{label}: {res['rate']:.0f} cmd/s (prefetch {prefetch}, svc p50 {res['svc_p50_ms']:.1f} ms)")
    return res


def part_ceiling_latency(prefetch, seconds, rate, sync=False):
    """The same steady-rate probe against the bare loop: what the broker alone adds; with
    `sync`, each command is first appended to a file and synced, as the worker remembers it."""
    ns, inst = one_queue("l")
    n = int(round(rate * seconds))
    before = ("--sync-file", os.path.join(OUT, f"{ns}.sync")) if sync else ()
    loop = spawn(bench_tool("ceiling", "--ns", ns, "--instance", "bench", "--prefetch", str(prefetch),
                            "--n", str(n), "--token", TOKEN, "--timeout-s", str(int(seconds) + 120), *before),
                 "ceiling-latency.log")
    try:
        res = run_tool(bench_tool("latency", "--ns", ns, "--instance", "bench", "--rate", str(rate),
                                  "--seconds", str(seconds), "--token", TOKEN, "--id-prefix", f"lat{RUN_ID}"),
                       timeout=seconds + 120, log_name="latency.log")
    finally:
        # Only the probe's figures matter here; the loop has answered everything it was sent.
        stop(loop, 10)
    delete_namespace(ns, inst)
    if sync:
        os.remove(os.path.join(OUT, f"{ns}.sync"))
    log(f"latency of the bare loop{' with a synced append' if sync else ''} at {rate}/s: p50 {res['p50_ms']:.1f} ms, "
        f"p99 {res['p99_ms']:.1f} ms, p999 {res['p999_ms']:.1f} ms")
    return res


def part_aiopika(n, prefetch):
    ns, inst = one_queue("p")
    preload(ns, inst, n, "p")
    proc = spawn([sys.executable, os.path.join(HERE, "peer_aiopika.py"), "--url", ARGS.url, "--ns", ns,
                  "--instance", "bench", "--prefetch", str(prefetch), "--n", str(n), "--token", TOKEN,
                  "--timeout-s", str(ARGS.drain_timeout)], "aiopika.log")
    cpu = CpuWindow(proc.pid)
    try:
        out, _ = proc.communicate(timeout=ARGS.drain_timeout + 30)
    except subprocess.TimeoutExpired:
        stop(proc, 5)
        raise BenchError("aio-pika peer did not finish")
    CHILDREN.remove(proc)
    res = parse_result(out)
    if proc.returncode != 0 or res is None:
        raise BenchError(f"aio-pika peer failed; see {proc.log_path}")
    res["cpu"] = cpu.close(own_cpu_s=res["cpu_s"])
    delete_namespace(ns, inst)
    log(f"aio-pika: {res['rate']:.0f} cmd/s (prefetch {prefetch})")
    return res


def part_worker(n, prefetch, concurrency, lat_seconds, lat_rate, label="worker", more=True):
    """The worker on N preloaded; with `more`, the same N replayed after a restart, then
    steady-rate latency."""
    ns = new_ns("w")
    inst = instances_args(1, names=["bench"])
    NAMESPACES.append((ns, inst))
    w = Worker(ns, ["bench"], prefetch, concurrency)
    w.check()
    w.topology()
    run_tool(bench_tool("sink", "--ns", ns), timeout=60)
    preload(ns, inst, n, "w")
    try:
        first = drain_run(w, n, 60, ARGS.drain_timeout, 0.25, perf_name="worker" if more else None)
    finally:
        w.stop()
    log(f"{label}: {first['rate']:.0f} cmd/s (prefetch {prefetch}, concurrency {concurrency}); "
        f"{first['cpu_us_per_cmd']:.0f} us CPU/cmd by thread: {first['threads_us_per_cmd']}; "
        f"stages (mean, p99 ms): {first['stages_ms']}")
    if not more:
        delete_namespace(ns, inst)
        return first

    store_files = sorted(os.listdir(w.store))

    replay = None
    if not ARGS.skip_replays:
        preload(ns, inst, n, "w")  # the very same ids and bodies
        try:
            replay = drain_run(w, n, 60, ARGS.drain_timeout, 0.25, perf_name="replays")
        finally:
            w.stop()
        log(f"replays: {replay['rate']:.0f} cmd/s, {replay['replays']:.0f} answered from the store; "
            f"{replay['cpu_us_per_cmd']:.0f} us CPU/cmd by thread: {replay['threads_us_per_cmd']}")

    latency = None
    if lat_seconds > 0:
        latency = latency_pairs(w, ns, prefetch, lat_seconds, lat_rate)
    delete_namespace(ns, inst)
    return first, replay, latency, store_files


def latency_pairs(w, ns, prefetch, seconds, rate):
    """The worker's steady-rate probe, alternated with the bare loop's (`--latency-pairs`): the
    bare loop's own p99 moves several-fold within minutes here, so each worker probe is set
    against the bare-loop probes just before and after it, and the median probe is reported,
    as the throughput drains are."""
    bare, probes, synced = [part_ceiling_latency(prefetch, seconds, rate)], [], None
    for i in range(max(1, ARGS.latency_pairs)):
        w.start()
        try:
            w.wait_ready(60)
            probe = run_tool(bench_tool("latency", "--ns", ns, "--instance", "bench", "--rate", str(rate),
                                        "--seconds", str(seconds), "--token", TOKEN, "--id-prefix",
                                        f"lat{RUN_ID}-{i}"), timeout=seconds + 120, log_name="latency.log")
            probe["stages_ms"] = stages(w.metrics())
        finally:
            w.stop()
        log(f"latency at {rate}/s: p50 {probe['p50_ms']:.1f} ms, p99 {probe['p99_ms']:.1f} ms, "
            f"p999 {probe['p999_ms']:.1f} ms; stages (mean, p99 ms): {probe['stages_ms']}")
        if i == 0 and not ARGS.skip_floors:
            # The floor's probe between the worker's and the next bare loop's.
            synced = part_ceiling_latency(prefetch, seconds, rate, sync=True)
        bare.append(part_ceiling_latency(prefetch, seconds, rate))
        around = (bare[-2]["p99_ms"] + bare[-1]["p99_ms"]) / 2
        if i == 0 and synced:
            synced["p99_ratio"] = synced["p99_ms"] / around
        probe["bare"] = bare[-2:]
        probe["p99_ratio"] = probe["p99_ms"] / around
        probes.append(probe)
        log(f"latency pair {i + 1}: p99 {probe['p99_ratio']:.2f}x the bare loop's around it ({around:.1f} ms)")
    # The lower median when there are two.
    latency = sorted(probes, key=lambda p: p["p99_ratio"])[(len(probes) - 1) // 2]
    latency["ratios"] = [p["p99_ratio"] for p in probes]
    latency["synced"] = synced
    return latency


def forget_redis_keys(ns):
    """Deletes a part's keys, which would otherwise stay in Redis until they expire."""
    subprocess.run(f"redis-cli -u '{ARGS.redis_url}' --scan --pattern '{ns}:*' | "
                   f"xargs -r -n 1000 redis-cli -u '{ARGS.redis_url}' unlink >/dev/null",
                   shell=True, timeout=300)


def part_redis_replays(n, prefetch, concurrency):
    """The worker with the Redis store: N fresh, then the same N again after a restart."""
    ns = new_ns("r")
    inst = instances_args(1, names=["bench"])
    NAMESPACES.append((ns, inst))
    w = Worker(ns, ["bench"], prefetch, concurrency, redis=True)
    w.check()
    w.topology()
    run_tool(bench_tool("sink", "--ns", ns), timeout=60)
    runs = []
    for name in ("redis-fresh", "redis-replays"):
        preload(ns, inst, n, "w")
        try:
            runs.append(drain_run(w, n, 60, ARGS.drain_timeout, 0.25, perf_name=name))
        finally:
            w.stop()
    delete_namespace(ns, inst)
    forget_redis_keys(ns)
    log(f"redis store: {runs[0]['rate']:.0f} cmd/s fresh, {runs[1]['rate']:.0f} cmd/s replayed "
        f"({runs[1]['replays']:.0f} from the store); threads {runs[1]['threads_us_per_cmd']}; "
        f"fresh stages (mean, p99 ms): {runs[0]['stages_ms']}")
    return {"fresh": runs[0], "replay": runs[1]}


def retire(workers, ns, inst):
    """Stops the workers of a Redis-store part and removes its queues and keys."""
    for w in workers:
        w.stop()
    delete_namespace(ns, inst)
    forget_redis_keys(ns)


def part_shared_pacing(workers, per_minute, n):
    """Several workers with the Redis store, each hosting one instance of the same token, paced
    at `per_minute` for that token: the observed rate after the first minute's burst, against
    the budget."""
    ns = new_ns("g")
    names = [f"paced{i}" for i in range(workers)]
    inst = instances_args(workers, names=names)
    NAMESPACES.append((ns, inst))
    ws = [Worker(ns, [name], 50, 50, redis=True, tag=f"-{i}", pacing=per_minute) for i, name in enumerate(names)]
    per = -(-n // workers)
    try:
        for w in ws:
            w.check()
            w.topology()
        run_tool(bench_tool("sink", "--ns", ns), timeout=60)
        preload(ns, inst, per, "g")
        total_n = per * workers
        for w in ws:
            w.start()
        for w in ws:
            w.wait_ready(60)
        burst = 1  # a quiet token starts one at once (pacing.burst = 0), then one per interval
        t_from = c_from = None
        deadline = time.monotonic() + 60 + 1.5 * total_n * 60 / per_minute
        def answered(w):
            try:
                return total(w.metrics(), "chat_delete_commands_completed_total")
            except OSError:  # not listening yet
                return 0

        while True:
            done = sum(answered(w) for w in ws)
            now = time.monotonic()
            if t_from is None and done >= burst + per_minute / 60:
                t_from, c_from = now, done
            if done >= total_n:
                break
            if now > deadline:
                raise BenchError(f"shared pacing: {done:.0f} of {total_n} answered in time")
            time.sleep(0.2)
        shares = [total(w.metrics(), "chat_delete_commands_completed_total") for w in ws]
    finally:
        retire(ws, ns, inst)
    rate = (total_n - c_from) / (now - t_from) * 60
    log(f"shared pacing: {workers} workers, one token at {per_minute}/min: {rate:.0f}/min after the burst "
        f"({rate / per_minute:.3f}x the budget); answered per worker {[int(x) for x in shares]}")
    return {"workers": workers, "per_minute": per_minute, "n": total_n, "rate_per_minute": rate,
            "ratio": rate / per_minute, "per_worker": shares}


def part_scale_out(n, prefetch, concurrency, workers=3, instances=6):
    """Several workers with the Redis store sharing the instances (ownership on), started
    together on a preloaded backlog that all of them drain."""
    ns = new_ns("s")
    names = [f"shared{i}" for i in range(instances)]
    inst = instances_args(instances, names=names)
    NAMESPACES.append((ns, inst))
    ws = [Worker(ns, names, prefetch, concurrency, redis=True, tag=f"-{i}", ownership=True) for i in range(workers)]
    per = -(-n // instances)
    total_n = per * instances
    try:
        for w in ws:
            w.check()
        ws[0].topology()
        run_tool(bench_tool("sink", "--ns", ns), timeout=60)
        # The backlog first: preloading while three workers drain it is slower than they are,
        # so the drain would measure the publisher. The workers then start together; the first
        # one's leases are handed over to the others as they join, within the drain.
        preload(ns, inst, per, "s")
        for w in ws:
            w.start()
        cpu = t_first = c_first = t_even = c_even = None
        deadline = time.monotonic() + ARGS.drain_timeout
        def scrape(w):
            try:
                m = w.metrics()
            except OSError:  # not listening yet
                return 0, 0
            return total(m, "chat_delete_commands_completed_total"), total(m, "chat_delete_owned_instances")

        while True:
            seen = [scrape(w) for w in ws]
            done = sum(c for c, _ in seen)
            now = time.monotonic()
            if t_first is None and done > 0:
                t_first, c_first = now, done
            # Until the last worker has joined and the leases are spread, the first one drains
            # alone: the steady pace of three is timed from the moment each owns its share.
            if t_even is None and all(o == instances // workers for _, o in seen):
                t_even, c_even, cpu = now, done, CpuWindow()
                workers_cpu0 = sum(proc_cpu_s(w.proc.pid) for w in ws)
            if done >= total_n:
                break
            if now > deadline:
                raise BenchError(f"scale-out: {done:.0f} of {total_n} answered in time")
            time.sleep(next_poll(done, total_n, t_first, c_first, now, 0.25))
        window = cpu.close(sum(proc_cpu_s(w.proc.pid) for w in ws) - workers_cpu0) if cpu else None
        shares = [total(w.metrics(), "chat_delete_commands_completed_total") for w in ws]
    finally:
        retire(ws, ns, inst)
    whole = (total_n - c_first) / max(now - t_first, 1e-3)
    if t_even is None or total_n - c_even < total_n / 5:
        raise BenchError(f"scale-out: the instances were spread over the workers too late to time "
                         f"their steady pace ({'never' if t_even is None else f'{total_n - c_even:.0f} left'}); "
                         f"a larger --n helps")
    rate = (total_n - c_even) / max(now - t_even, 1e-3)
    log(f"scale-out: {workers} workers, {instances} instances: {rate:.0f} cmd/s once spread "
        f"({t_even - t_first:.1f} s after the first answer; {whole:.0f} cmd/s from the first answer); "
        f"answered per worker {[int(x) for x in shares]}")
    return {"workers": workers, "instances": instances, "n": total_n, "timed_n": total_n - c_even, "rate": rate,
            "whole_rate": whole,
            "spread_after_s": t_even - t_first, "per_worker": shares, "cpu": window}


def broker_handles():
    """(used, limit) of the broker's file handles as RabbitMQ counts them (3.10's file handle
    cache, which refuses new sockets near its limit); on brokers without it, the process's open
    files against its limit. None when neither can be read."""
    try:
        out = subprocess.run(["rabbitmqctl", "-q", "eval", "file_handle_cache:info()."],
                             capture_output=True, text=True, timeout=30).stdout
        figures = dict(re.findall(r"\{(total_limit|total_used),(\d+)\}", out))
        if len(figures) == 2:
            return int(figures["total_used"]), int(figures["total_limit"])
    except (OSError, subprocess.TimeoutExpired):
        pass
    pid = broker_pid()
    try:
        with open(f"/proc/{pid}/limits") as f:
            limit = next(int(line.split()[3]) for line in f if line.startswith("Max open files"))
        return len(os.listdir(f"/proc/{pid}/fd")), limit
    except (OSError, TypeError, ValueError, IndexError, StopIteration):
        return None


# Handles a quorum queue holds (3.10: log segments and snapshot), and what the bench's other
# namespaces, connections and the broker's own needs may take at once.
HANDLES_PER_QUEUE = 3.2
HANDLES_BESIDES = 250


def handles_blocker(queues, what):
    """Why the broker cannot take `queues` more quorum queues without wedging (past ~90 % of
    its limit RabbitMQ 3.10 accepts no connection until queues are deleted), or None."""
    handles = broker_handles()
    if handles is None or ARGS.force_many:
        return None
    used, limit = handles
    needed = int(queues * HANDLES_PER_QUEUE) + HANDLES_BESIDES
    if used + needed > 0.9 * limit:
        return (f"the broker has {limit - used} of {limit} file handles free, too few for {what} "
                f"(~{needed}): delete queues left behind (`rabbitmqctl list_queues name`; an earlier "
                f"bench's start with bench), or restart it with a higher limit "
                f"(`scripts/services --restart-rabbitmq` raises it to the hard one); or pass --force-many")
    return None


def part_many(count, per_instance, prefetch, concurrency):
    ns = new_ns("m")
    names = [f"i{i:04d}" for i in range(count)]
    inst = instances_args(count, prefix="i")
    NAMESPACES.append((ns, inst))
    w = Worker(ns, names, prefetch, concurrency)
    w.check()
    # Cold: nothing declared yet; the worker declares every queue, then consumes.
    w.start()
    try:
        t_ready = w.wait_ready(ARGS.ready_timeout)
        cold_ready = t_ready - w.started
        # At rest: ready, nothing to do; RSS sampled over the next two seconds (the last one kept).
        rest_kb = w.rss_kb()
        while time.monotonic() < t_ready + 2.0:
            time.sleep(0.1)
            rest_kb = w.rss_kb()
    finally:
        w.stop()
    log(f"many: {count} instances ready in {cold_ready:.2f}s cold, RSS at rest {rest_kb / 1024:.1f} MiB")
    n = count * per_instance
    # The bare loop on the same queues with the worker's per-queue prefetch (lowered to fit
    # worker.max_in_flight = 4096 over the instance queues and the unrouted one), around each
    # worker drain: the broker's pace drifts, so each drain is set against the mean of the
    # ceilings just before and after it, and the median drain is reported.
    queue_prefetch = max(1, min(prefetch, 4096 // (count + 1)))

    def bare_drain(i):
        preload(ns, inst, per_instance, f"mc{i}")
        return run_ceiling(ns, inst, queue_prefetch, n, f"ceiling-many-{i}.log")

    ceilings, drains = [bare_drain(0)], []
    for i in range(ARGS.many_pairs):
        preload(ns, inst, per_instance, f"m{i}")
        try:
            drains.append(drain_run(w, n, ARGS.ready_timeout, ARGS.drain_timeout, 1.0,
                                    perf_name="many" if i == 0 else None))
        finally:
            w.stop()
        ceilings.append(bare_drain(i + 1))
        mean = (ceilings[-2]["rate"] + ceilings[-1]["rate"]) / 2
        drains[-1]["ratio"] = drains[-1]["rate"] / mean
        log(f"many: {drains[-1]['rate']:.0f} cmd/s between ceilings of {ceilings[-2]['rate']:.0f} / "
            f"{ceilings[-1]['rate']:.0f} cmd/s over {count} queues (prefetch {queue_prefetch} each): "
            f"{drains[-1]['ratio']:.2f}x; ready with backlog in {drains[-1]['ready_s']:.2f}s, "
            f"peak RSS {drains[-1]['peak_rss_kb'] / 1024:.1f} MiB; stages (mean, p99 ms): {drains[-1]['stages_ms']}")
    # The lower median when there are two.
    loaded = sorted(drains, key=lambda d: d["ratio"])[(len(drains) - 1) // 2]
    loaded["peak_rss_kb"] = max(d["peak_rss_kb"] for d in drains)
    loaded["ready_s"] = max(d["ready_s"] for d in drains)
    rates = [c["rate"] for c in ceilings]
    ceiling = {"rate": sum(rates) / len(rates), "rates": rates,
               "cpu_us_per_cmd": sum(c["cpu_us_per_cmd"] for c in ceilings) / len(ceilings)}
    delete_namespace(ns, inst)
    return {"count": count, "per_instance": per_instance, "cold_ready_s": cold_ready,
            "rest_rss_kb": rest_kb, "loaded": loaded, "ceiling": ceiling, "queue_prefetch": queue_prefetch}


# --- report -----------------------------------------------------------------------------------

def fmt(v, spec="{:,.0f}", none="n/a"):
    return none if v is None else spec.format(v)


def median(values):
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def report(r):
    n = r["n"]
    ceil = r["ceiling"]
    ceil_rate = sum(c["rate"] for c in ceil) / len(ceil)
    workers = r["workers"]
    ratios = [wk["rate"] / ((ceil[i]["rate"] + ceil[i + 1]["rate"]) / 2) for i, wk in enumerate(workers)]
    ratio_ceiling = median(ratios)
    # The drain nearest the median stands for the worker in the rows below.
    w = workers[min(range(len(workers)), key=lambda i: abs(ratios[i] - ratio_ceiling))]
    w_rate = median([wk["rate"] for wk in workers])
    py = r["aiopika"]
    rep = r["replay"]
    lat = r["latency"]
    many = r["many"]
    ratio_py = w_rate / py["rate"] if py else None
    replay_ok = rep is not None and rep["replays"] >= 0.99 * n
    rows = []

    def row(what, value, ratio="", note=""):
        rows.append((what, value, ratio, note))

    def ceiling_row(i):
        c = ceil[i]
        row(f"ceiling (bare lapin loop) run {i + 1}, N={n:,}", f"{c['rate']:,.0f} cmd/s", "",
            f"svc p50/p99 {c['svc_p50_ms']:.1f}/{c['svc_p99_ms']:.1f} ms; {c['cpu_us_per_cmd']:.0f} us CPU/cmd; "
            f"broker {c['cpu']['broker_cpu_s'] / c['cpu']['wall_s'] * 100:.0f}% CPU")

    ceiling_row(0)
    for i, wk in enumerate(workers):
        threads = ", ".join(f"{k} {v:.0f}" for k, v in wk["threads_us_per_cmd"].items())
        row(f"worker run {i + 1}, 1 simulated instance, N={n:,}", f"{wk['rate']:,.0f} cmd/s",
            f"{ratios[i]:.2f}x", f"vs the ceilings before and after; {wk['cpu_us_per_cmd']:.0f} us CPU/cmd "
            f"({threads}); broker {wk['cpu']['broker_cpu_s'] / wk['cpu']['wall_s'] * 100:.0f}% CPU")
        ceiling_row(i + 1)
    row(f"worker vs ceiling, median of {len(workers)}", f"{w_rate:,.0f} cmd/s", f"{ratio_ceiling:.2f}x ceiling",
        f"goal >= 0.90x; quorum, prefetch {r['prefetch']}, concurrency {r['concurrency']}; {r['settings']}; "
        f"store folder: {', '.join(r['store_files']) or 'empty'}")
    row("  worker service time p50 / p99", f"{fmt(w['svc_p50_ms'], '{:.1f}')} / {fmt(w['svc_p99_ms'], '{:.1f}')} ms",
        "", "receive -> ack, from /metrics histogram (interpolated in buckets)")
    row("  worker peak RSS (VmHWM)", f"{w['peak_rss_kb'] / 1024:.1f} MiB", "", "")
    if py:
        row(f"aio-pika peer, N={py['n']:,}", f"{py['rate']:,.0f} cmd/s", f"worker = {ratio_py:.1f}x peer",
            f"goal >= 5x; prefetch {py['prefetch']}; svc p50/p99 {py['svc_p50_ms']:.0f}/{py['svc_p99_ms']:.0f} ms; "
            f"{py['cpu_us_per_cmd']:.0f} us CPU/cmd; peak RSS {py['peak_rss_kb'] / 1024:.1f} MiB")
    if rep is None:
        row("replays (same N ids again)", "skipped", "", "")
    elif replay_ok:
        row("replays (same N ids again)", f"{rep['rate']:,.0f} cmd/s", f"{rep['rate'] / ceil_rate:.2f}x ceiling",
            f"vs the mean ceiling ({ceil_rate:,.0f}); {rep['replays']:,.0f} answered from the store; peak RSS {rep['peak_rss_kb'] / 1024:.1f} MiB")
    else:
        row("replays (same N ids again)", "n/a", "",
            f"store not answering replays (replays counter {rep['replays']:,.0f}); re-run took {rep['rate']:,.0f} cmd/s")
    red = r.get("redis")
    # The Redis drains come after the worker pairs: each is set against the ceilings just
    # before and after them, as the worker drains are.
    red_ceiling = (r["ceiling"][-2]["rate"] + r["ceiling"][-1]["rate"]) / 2 if red else None
    red_ok = red is not None and red["replay"]["replays"] >= 0.99 * n
    if red:
        fr, rr = red["fresh"], red["replay"]
        row("Redis store: fresh / replays (after a restart)", f"{fr['rate']:,.0f} / {rr['rate']:,.0f} cmd/s",
            f"{fr['rate'] / red_ceiling:.2f}x / {rr['rate'] / red_ceiling:.2f}x ceiling",
            f"vs the ceilings just before and after them ({red_ceiling:,.0f}); {rr['replays']:,.0f} answered "
            f"from the store; fresh / replay CPU {fr['cpu_us_per_cmd']:.0f} / {rr['cpu_us_per_cmd']:.0f} us/cmd "
            f"(+ {fr['cpu']['other_cpu_s'] * 1e6 / fr['n']:.0f} / {rr['cpu']['other_cpu_s'] * 1e6 / rr['n']:.0f} "
            f"us/cmd outside the worker and the broker: Redis)")
        lk = red.get("looked")
        if lk:
            row("  bare loop with one Redis look per command", f"{lk['rate']:,.0f} cmd/s",
                f"{lk['rate'] / red_ceiling:.2f}x ceiling",
                f"the least any Redis replay costs: the loop reads a record with HMGET (pipelined) before "
                f"publishing; {lk['cpu_us_per_cmd']:.0f} us CPU/cmd")
    so = r.get("scale_out")
    if so:
        row(f"{so['workers']} workers sharing {so['instances']} instances (Redis store, ownership), N={so['n']:,}",
            f"{so['rate']:,.0f} cmd/s", f"{so['rate'] / so['ceiling']:.2f}x ceiling",
            f"goal >= 0.8x; vs the ceilings just before and after it ({so['ceiling']:,.0f}); timed once each "
            f"worker owns its share ({so['spread_after_s']:.1f} s after the first answer; "
            f"{so['whole_rate']:,.0f} cmd/s from the first answer); per worker {[int(x) for x in so['per_worker']]}; "
            f"box {so['cpu']['box_cpu_s'] / so['cpu']['wall_s'] * 100:.0f}% CPU of 2 cores; per command: workers "
            f"{so['cpu']['proc_cpu_s'] * 1e6 / so['timed_n']:.0f} µs, broker {so['cpu']['broker_cpu_s'] * 1e6 / so['timed_n']:.0f}, "
            f"the rest (Redis, the bench) {so['cpu']['other_cpu_s'] * 1e6 / so['timed_n']:.0f}")
    if lat:
        row(f"latency at steady {lat['offered_rate']:,.0f}/s, publish -> result",
            f"p50 {lat['p50_ms']:.1f} / p99 {lat['p99_ms']:.1f} / p999 {lat['p999_ms']:.1f} ms", "",
            f"{lat['received']:,} of {lat['n']:,} results; max {lat['max_ms']:.1f} ms; "
            f"publisher held {lat['achieved_publish_rate']:,.0f}/s")
    cls = lat["bare"] if lat else []
    if lat and len(lat["ratios"]) > 1:
        row("  p99 against the bare loop's around each probe", "", f"median {lat['p99_ratio']:.2f}x",
            "probes in turn with the bare loop's: " + " / ".join(f"{x:.2f}" for x in lat["ratios"]) +
            "; the median probe is the row above")
    for when, cl in zip(("before", "after"), cls):
        row(f"  same probe against the bare loop, just {when}",
            f"p50 {cl['p50_ms']:.1f} / p99 {cl['p99_ms']:.1f} / p999 {cl['p999_ms']:.1f} ms",
            "", f"{cl['received']:,} of {cl['n']:,} results; max {cl['max_ms']:.1f} ms")
    sy = lat.get("synced") if lat else None
    if sy:
        row("  the bare loop with a synced append before each publish",
            f"p50 {sy['p50_ms']:.1f} / p99 {sy['p99_ms']:.1f} / p999 {sy['p999_ms']:.1f} ms",
            f"p99 {sy['p99_ratio']:.2f}x", "the least any durable remember costs: one fdatasync (grouped) in "
            f"series before the publish; probed after the first worker probe, against the bare loop's around "
            f"that; {sy['received']:,} of {sy['n']:,} results")
    if not many and r.get("many_skipped"):
        row(f"{ARGS.instances or ('200' if ARGS.quick else '1000')} instances", "n/a", "", r["many_skipped"])
    if many:
        ld = many["loaded"]
        tag = f"{many['count']:,} instances x {many['per_instance']}"
        row(f"{tag}: start -> ready (cold declare)", f"{many['cold_ready_s']:.2f} s", "", "goal < 10 s")
        row(f"{tag}: start -> ready (queues exist, backlog)", f"{ld['ready_s']:.2f} s", "", "")
        mc = many["ceiling"]
        row(f"{tag}: bare loop on the same queues, around the drains",
            " / ".join(f"{x:,.0f}" for x in mc["rates"]) + " cmd/s", f"{mc['rate'] / ceil_rate:.2f}x ceiling",
            f"prefetch {many['queue_prefetch']} per queue; {mc['cpu_us_per_cmd']:.0f} us CPU/cmd")
        row(f"{tag}: throughput, median drain", f"{ld['rate']:,.0f} cmd/s", f"{ld['ratio']:.2f}x many-queue ceiling",
            f"goal >= 0.8x; {ld['rate'] / ceil_rate:.2f}x the single-queue ceiling; "
            f"prefetch {many['queue_prefetch']} per queue, concurrency {r['many_concurrency']}; "
            f"{ld['cpu_us_per_cmd']:.0f} us CPU/cmd")
        row(f"{tag}: RSS at rest / peak under load", f"{many['rest_rss_kb'] / 1024:.1f} / {ld['peak_rss_kb'] / 1024:.1f} MiB",
            "", "goal < 100 MiB")

    widths = [max(len(str(x[i])) for x in rows + [("what", "value", "ratio", "notes")]) for i in range(3)]
    line = f"| {'what':<{widths[0]}} | {'value':<{widths[1]}} | {'ratio':<{widths[2]}} | notes"
    print(line)
    print(f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|{'-' * (widths[2] + 2)}|------")
    for what, value, ratio, note in rows:
        print(f"| {what:<{widths[0]}} | {value:<{widths[1]}} | {ratio:<{widths[2]}} | {note}")
    print()
    rss_1000 = (max(many["rest_rss_kb"], many["loaded"]["peak_rss_kb"]) / 1024) if many else None
    ready_1000 = max(many["cold_ready_s"], many["loaded"]["ready_s"]) if many else None
    # The goal holds on both stores: the lower of the two is reported.
    replay_ratios = ([rep["rate"] / ceil_rate] if replay_ok else []) + \
        ([red["replay"]["rate"] / red_ceiling] if red_ok else [])
    replay_ratio = min(replay_ratios) if replay_ratios else None
    lat_ratio = lat["p99_ratio"] if lat else None
    many_ratio = many["loaded"]["ratio"] if many else None
    sp = r.get("shared_pacing")
    if sp:
        print(f"shared pacing: {sp['workers']} workers (Redis store), one token at {sp['per_minute']}/min, "
              f"{sp['n']:,} commands: {sp['rate_per_minute']:,.0f}/min after the burst = {sp['ratio']:.3f}x the budget "
              f"(goal within 5 %); per worker {[int(x) for x in sp['per_worker']]}")
    if not many and r.get("many_skipped"):
        print(f"1,000 instances: n/a, {r['many_skipped']}")
    floors = []
    if red and red.get("looked"):
        floors.append(f"bare_redis_look_ratio={red['looked']['rate'] / red_ceiling:.2f}")
    if sy:
        floors.append(f"bare_synced_p99_ratio={sy['p99_ratio']:.2f}")
    if floors:
        # What the goals' own steps cost the bare loop, in the same run (not a result of the worker).
        print("floors: " + " ".join(floors))
    figures_line({"ratio_to_ceiling": fmt(ratio_ceiling, '{:.2f}'), "ratio_to_aiopika": fmt(ratio_py, '{:.2f}'),
                  "rss_1000_mib": fmt(rss_1000, '{:.1f}'), "ready_1000_s": fmt(ready_1000, '{:.2f}'),
                  "replay_ratio": fmt(replay_ratio, '{:.2f}'), "latency_p99_ratio": fmt(lat_ratio, '{:.2f}'),
                  "many_queue_ratio": fmt(many_ratio, '{:.2f}')})


def figures_line(values, failed=None):
    """The last line of every run, also a failed one: what is not known reads n/a."""
    line = " ".join(f"{k}={values.get(k, 'n/a')}" for k in FIGURES)
    if failed:
        line += " failed=" + json.dumps(failed)
    print(line, flush=True)


def report_failed(reason):
    """The table and figures of the parts that finished, when a later one failed."""
    if RESULTS and RESULTS.get("workers") and len(RESULTS.get("ceiling", [])) > len(RESULTS["workers"]):
        ceil, workers = RESULTS["ceiling"], RESULTS["workers"]
        ratios = [wk["rate"] / ((ceil[i]["rate"] + ceil[i + 1]["rate"]) / 2) for i, wk in enumerate(workers)]
        figures_line({"ratio_to_ceiling": f"{median(ratios):.2f}"}, failed=reason)
    else:
        figures_line({}, failed=reason)


def main():
    global ARGS, OUT, RUN_ID
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20k commands, 200 instances x 50, 10 s of latency")
    ap.add_argument("--bin-dir", required=True, help="folder with chat-delete-worker and cdw-bench")
    ap.add_argument("--url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    ap.add_argument("--n", type=int)
    ap.add_argument("--prefetch", type=int, default=500)
    ap.add_argument("--concurrency", type=int, help="worker concurrency_per_instance (default: = prefetch)")
    ap.add_argument("--warmup", type=int, default=20_000, help="commands of an uncounted worker drain "
                    "before the pairs (0: none)")
    ap.add_argument("--pairs", type=int, default=3, help="worker drains, each between two ceiling drains "
                    "(the ratio reported is the median)")
    ap.add_argument("--aiopika-prefetch", type=int, default=100,
                    help="prefetch of the Python peer (default 100: its best, as in the prior figure)")
    ap.add_argument("--aiopika-n", type=int, help="commands for the Python peer (default: N, at most 50,000)")
    ap.add_argument("--instances", type=int)
    ap.add_argument("--per-instance", type=int)
    ap.add_argument("--many-prefetch", type=int, default=64, help="default: the worker's default prefetch")
    ap.add_argument("--many-pairs", type=int, default=2, help="worker drains on the many queues, each "
                    "between two bare-loop drains on the same queues")
    ap.add_argument("--many-concurrency", type=int, default=32, help="default: the worker's default")
    ap.add_argument("--latency-seconds", type=float)
    ap.add_argument("--latency-rate", type=float, default=1000)
    ap.add_argument("--latency-pairs", type=int, help="worker latency probes, each between two of the bare "
                    "loop's (the median ratio is reported; default 3, 1 with --quick)")
    ap.add_argument("--worker-log", default=os.environ.get("RUST_LOG", "info"), help="RUST_LOG of the worker")
    ap.add_argument("--perf", action="store_true", help="perf record the worker's first drain and its many-instances drain (in --out)")
    ap.add_argument("--skip-aiopika", action="store_true")
    ap.add_argument("--skip-many", action="store_true")
    ap.add_argument("--skip-replays", action="store_true")
    ap.add_argument("--skip-redis", action="store_true", help="skip the Redis-store fresh/replay drains")
    ap.add_argument("--skip-floors", action="store_true", help="skip the bare loop with one Redis look per "
                    "command, and with a synced append before each publish (what those steps cost alone)")
    ap.add_argument("--skip-scale-out", action="store_true", help="skip 3 workers sharing 6 instances (Redis store)")
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    ap.add_argument("--shared-pacing", action="store_true", help="also run 3 workers with the Redis store "
                    "and one token at 600/min on 2,000 commands (about 3 minutes): the observed rate against the budget")
    ap.add_argument("--force-many", action="store_true", help="run the many-instances part even when the "
                    "broker's open-files limit looks too low for that many quorum queues")
    ap.add_argument("--ready-timeout", type=float, default=120)
    ap.add_argument("--drain-timeout", type=float, default=600)
    ap.add_argument("--out", help="folder for logs and raw results (default: a new temp folder)")
    ARGS = ap.parse_args()
    q = ARGS.quick
    n = ARGS.n or (20_000 if q else 100_000)
    count = ARGS.instances or (200 if q else 1000)
    per = ARGS.per_instance or (50 if q else 100)
    lat_s = ARGS.latency_seconds if ARGS.latency_seconds is not None else (10 if q else 20)
    if ARGS.latency_pairs is None:
        ARGS.latency_pairs = 1 if q else 3
    conc = ARGS.concurrency or ARGS.prefetch
    py_prefetch = ARGS.aiopika_prefetch
    RUN_ID = secrets.token_hex(3)
    OUT = ARGS.out or tempfile.mkdtemp(prefix="cdw-bench-")
    os.makedirs(OUT, exist_ok=True)
    for tool in ("chat-delete-worker", "cdw-bench"):
        if not os.access(os.path.join(ARGS.bin_dir, tool), os.X_OK):
            raise BenchError(f"{tool} not built in {ARGS.bin_dir}")
    if not amqp_reachable():
        raise BenchError("RabbitMQ is not reachable on 127.0.0.1:5672 (scripts/services starts it)")
    blocker = handles_blocker(0, "the bench's own namespaces")
    if blocker:
        raise BenchError(blocker)
    log(f"run {RUN_ID}: N={n:,}, prefetch {ARGS.prefetch}, {count} x {per} instances; logs in {OUT}")

    global RESULTS
    r = RESULTS = {"n": n, "prefetch": ARGS.prefetch, "concurrency": conc, "many_prefetch": ARGS.many_prefetch,
         "many_concurrency": ARGS.many_concurrency, "ceiling": [], "workers": [], "aiopika": None,
         "many": None}
    # The broker's pace drifts from one drain to the next, so ceiling and worker alternate, and
    # each worker drain is set against the ceilings just before and after it. The first worker
    # drain on a fresh broker ran slower than every later one, so a short one goes first and is
    # not counted.
    if ARGS.warmup > 0:
        part_worker(ARGS.warmup, ARGS.prefetch, conc, 0, 0, "warm-up worker drain (not counted)", more=False)
    r["ceiling"].append(part_ceiling(n, ARGS.prefetch, "ceiling run 1"))
    first, r["replay"], r["latency"], r["store_files"] = part_worker(n, ARGS.prefetch, conc, lat_s,
                                                                     ARGS.latency_rate, "worker run 1")
    r["workers"] = [first]
    r["ceiling"].append(part_ceiling(n, ARGS.prefetch, "ceiling run 2"))
    for i in range(1, max(1, ARGS.pairs)):
        r["workers"].append(part_worker(n, ARGS.prefetch, conc, 0, 0, f"worker run {i + 1}", more=False))
        r["ceiling"].append(part_ceiling(n, ARGS.prefetch, f"ceiling run {i + 2}"))
    r["redis"] = None if ARGS.skip_redis or ARGS.skip_replays else part_redis_replays(n, ARGS.prefetch, conc)
    if r["redis"]:
        if not ARGS.skip_floors:
            r["redis"]["looked"] = part_ceiling(n, ARGS.prefetch, "bare loop with a Redis look per command",
                                                look=True)
        r["ceiling"].append(part_ceiling(n, ARGS.prefetch, "ceiling after the Redis drains"))
    if not ARGS.skip_aiopika:
        r["aiopika"] = part_aiopika(ARGS.aiopika_n or min(n, 50_000), py_prefetch)
    r["many_skipped"] = ("skipped (--skip-many)" if ARGS.skip_many
                         else handles_blocker(count, f"{count} instance queues"))
    if r["many_skipped"]:
        log(f"many instances: {r['many_skipped']}")
    else:
        r["many"] = part_many(count, per, ARGS.many_prefetch, ARGS.many_concurrency)
    r["shared_pacing"] = part_shared_pacing(3, 600, 2000) if ARGS.shared_pacing else None
    r["scale_out"] = None
    if not ARGS.skip_scale_out:
        # Against the ceilings just before and after it, as the other drains.
        around = [part_ceiling(n, ARGS.prefetch, "ceiling before the scale-out drain")]
        r["scale_out"] = part_scale_out(n, ARGS.prefetch, conc)
        around.append(part_ceiling(n, ARGS.prefetch, "ceiling after the scale-out drain"))
        r["scale_out"]["ceiling"] = sum(c["rate"] for c in around) / 2
    r["settings"] = ("pacing unlimited, embedded idempotency store" if FEATURES["optional_sections"]
                     else "this build has no [pacing]/[idempotency] settings")
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(r, f, indent=2)
    log(f"raw results in {os.path.join(OUT, 'results.json')}")
    report(r)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    atexit.register(cleanup_all)
    try:
        main()
    except (BenchError, Exception, SystemExit) as e:  # noqa: BLE001 - any failure still reports
        if isinstance(e, SystemExit) and not e.code:
            raise
        reason = str(e) if isinstance(e, (BenchError, SystemExit)) else f"{type(e).__name__}: {e}"
        log(f"FAILED: {reason}")
        # Clean up first, so what it prints cannot be the last line.
        cleanup_all()
        report_failed(reason)
        sys.exit(1)
