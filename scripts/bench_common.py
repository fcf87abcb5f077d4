"""Measurement helpers shared by the benchmark scripts (not part of the invnet package).

Memory of one training step is measured in a fresh process per configuration:

* CPU: peak resident set size growth. The kernel's high-water mark (``VmHWM`` in
  ``/proc/self/status``) is reset by writing ``5`` to ``/proc/self/clear_refs``; the step's growth
  is ``VmHWM`` after the step minus ``VmRSS`` before it. ``MALLOC_MMAP_THRESHOLD_=65536`` (set by
  :func:`run_fresh`) makes glibc return freed blocks to the OS, so peaks are comparable.
* GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
  allocated before the step.

The bytes autograd saves for backward are counted with saved-tensor hooks
(:func:`invnet.core.checks.saved_bytes`), a deterministic figure that does not depend on the
allocator. Step time is the median over several steps (the machine may be shared: medians, and
ratios taken within one run, are what to compare).
"""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import torch

MB = 1024.0 * 1024.0


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (``"VmRSS"``, ``"VmHWM"``) in MB; NaN where unsupported."""
    kb = _status_kb(field)
    return float("nan") if kb is None else kb / 1024


class FixedPairs:
    """One fixed batch of pairs ``(x, y = x + noise * N(0, 1))`` of shape ``shape``, served at every
    step: a batch source for the trainer (nothing to save on a checkpoint)."""

    def __init__(self, shape: tuple[int, ...], noise: float, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g)
        self.batch = (x, x + noise * torch.randn(shape, generator=g))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_step_memory(step: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Peak memory growth (MB) of one call of ``step`` (CPU: RSS; CUDA: allocated)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_growth_mb": (peak - base) / MB, "peak_total_mb": peak / MB}
    base_kb = _status_kb("VmRSS")
    if base_kb is None or not reset_peak_rss():
        step()
        return {"peak_growth_mb": float("nan"), "peak_total_mb": float("nan")}
    step()
    hwm_kb = _status_kb("VmHWM") or 0
    return {"peak_growth_mb": (hwm_kb - base_kb) / 1024.0, "peak_total_mb": hwm_kb / 1024.0}


def median_time(step: Callable[[], None], repeats: int, device: torch.device) -> dict[str, float]:
    """Median and minimum wall time (s) of ``repeats`` calls of ``step``."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"time_median_s": statistics.median(times), "time_min_s": min(times), "times_s": times}


def interleaved_times(
    steps: dict[str, Callable[[], None]], repeats: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """Time several step functions round-robin (a, b, c, a, b, c, ...), ``repeats`` each, so that
    load from other processes hits them alike; median and minimum of the wall time per name, and
    the median of this process's CPU time (``cpu_median_s``: on a loaded machine the steadier
    figure for a one-thread step, as waiting for a core is not counted)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            gc.collect()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {
        name: {"time_median_s": statistics.median(ts), "time_min_s": min(ts), "times_s": ts,
               "cpu_median_s": statistics.median(cpu[name]), "cpu_s": cpu[name]}
        for name, ts in times.items()
    }


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def versions() -> dict[str, str]:
    """Versions of Python, torch, invnet and the peers that are importable."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for name, mod in (("invnet", "invnet"), ("FrEIA", "FrEIA"), ("normflows", "normflows"), ("memcnn", "memcnn")):
        try:
            from importlib.metadata import version

            out[name] = version(name if name != "FrEIA" else "FrEIA")
        except Exception:  # noqa: BLE001 - not installed / no metadata
            try:
                m = __import__(mod)
                out[name] = getattr(m, "__version__", "unknown")
            except Exception:  # noqa: BLE001
                pass
    try:
        import subprocess as sp

        out["invnet_git"] = sp.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except OSError:
        pass
    from invnet import host_memory  # the workers' setting: their own records say whether it took

    out["huge_pages"] = (f"{host_memory.PYTORCH_VARIABLE}={os.environ.get(host_memory.PYTORCH_VARIABLE, 'unset')}, "
                         f"kernel mode {host_memory.kernel_mode()}")
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name(0)
        out["cuda"] = str(torch.version.cuda)
    return out


def run_fresh(
    script: str, config: dict[str, Any], threads: int, timeout: float, mmap_threshold: bool = True
) -> dict[str, Any]:
    """Run ``script --worker '<config json>'`` in a fresh Python process and return the JSON it
    prints on its last stdout line (or an ``error`` record).

    ``mmap_threshold=True`` sets ``MALLOC_MMAP_THRESHOLD_=65536`` (for memory measurements: freed
    memory goes back to the OS). Timings run without it: with it, every large tensor is a fresh
    ``mmap`` whose pages fault in on first touch, which slows allocation-heavy code (plain
    autograd most) and would distort time ratios."""
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    root = os.path.dirname(os.path.dirname(os.path.abspath(script)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, script, "--worker", json.dumps(config)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return dict(config, error=f"timeout after {timeout:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        if proc.returncode < 0 or proc.returncode == 137:
            tail.append(f"killed by signal {-proc.returncode if proc.returncode < 0 else 9} (out of memory?)")
        return dict(config, error=" | ".join(tail) or f"exit code {proc.returncode}")
    return json.loads(lines[-1])


def write_json_atomic(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def set_threads(threads: int) -> None:
    torch.set_num_threads(max(1, threads))
