"""Scaling of a domain-decomposed 3D conditional Glow training step, measured through invnet's
run stack: the library Trainer with a ParallelStrategy (grid (1, ranks, 1, 1): every volume split
along its first axis), not a hand-written loop.

    # strong scaling: one 128^3 volume on 1 and 2 ranks, one thread each
    mpiexec -n 1 python -m mpi4py scripts/bench_distributed.py --mode strong --size 128
    mpiexec -n 2 python -m mpi4py scripts/bench_distributed.py --mode strong --size 128
    # weak scaling: a 64^3 block per rank (the volume grows with the ranks)
    mpiexec -n 1 python -m mpi4py scripts/bench_distributed.py --mode weak --size 64
    mpiexec -n 2 python -m mpi4py scripts/bench_distributed.py --mode weak --size 64
    # the largest cubic volume whose step fits in 24 GB: exact tensor bytes at a few sizes, fitted
    mpiexec -n 1 python -m mpi4py scripts/bench_distributed.py --mode fit --sizes 32 48 64 --budget-gb 24
    mpiexec -n 2 python -m mpi4py scripts/bench_distributed.py --mode fit --sizes 32 48 64 --budget-gb 24

Per run, rank 0 prints one JSON line:

* ``step_s``: median time of a training step (``--steps`` timed steps after one warm-up step;
  every rank runs the trainer's step alone, ``Trainer._train_step``: the warm-up is not a
  ``fit``, whose checkpoint and metrics plot only rank 0 writes, which would leave rank 0 with
  more memory and another allocator state than the other ranks);
  ``step_cpu_s_per_rank``: CPU time per step (steadier on a loaded machine);
  ``halo_fraction_min/max``: time inside the halo exchange and its adjoint over the step (min:
  the rank that waits least, closest to the exchange's own cost; max: with load imbalance);
* ``phases_s``: per rank, the median seconds of each part of the step (``forward``: the
  per-sample losses; ``loss_mean``: their global mean, an allreduce that waits for the slowest
  rank; ``backward``; ``grad_allreduce``; ``update``: the gradient norm, optimizer step and the
  rest), ``halo_s`` the part of forward and backward spent in halo exchanges (waits included),
  and ``cpu_user_s``/``cpu_sys_s``/``minor_faults`` per step (``sys`` is page faults and the MPI
  library's yields while waiting): which rank does more, and where;
* ``--overhead``: each rank also times the serial step of its own subdomain (the same network,
  not decomposed), interleaved with the decomposed steps in the same process, so that both meet
  the same load: ``decomposition_overhead`` is the per-rank median of decomposed / serial step
  time (1.0: decomposing costs nothing beyond the subdomain's own work); then each rank in turn
  times the same serial step while the other ranks sleep (``serial_alone_step_s``), and
  ``contention`` is the serial step timed with all ranks working over the one timed alone: what
  the ranks cost each other through the hardware (memory bandwidth, caches, cores that are
  hyperthreads of one), which no change to the decomposition can remove. The 2-rank speedup is
  about (1-rank step / 1-rank time per voxel x subdomain voxels) / (contention x overhead);
  the ``_cpu`` forms are the same ratios in CPU time (steadier on a loaded machine; a waiting
  rank's CPU time includes MPI's busy polling). The serial trainer's memory adds to the RSS
  figures: measure memory without ``--overhead``;
* ``--bind``: pin each rank to one core (node-local rank ``r`` to the ``r``-th allowed CPU) when
  the node has a core per rank, like ``mpiexec -bind-to core``;
* ``peak_rss_mb``, ``step_rss_growth_mb``: per rank, the kernel's high-water mark after the timed
  steps and its growth above the resident memory before them (``MALLOC_MMAP_THRESHOLD_=65536``
  recommended, so freed blocks go back to the OS);
* ``live``: exact bytes of tensors created during one step and alive at its peak
  (:func:`invnet.core.memory_trace.trace_live_bytes`, independent of the allocator and the load),
  with the part that scales with the local volume (``activations_mb``: storages of at least one
  local voxel per channel) and the rest (``other_mb``: gradients, optimizer, halo faces, small
  buffers), and ``at_rest_mb``: tensors alive before the step (parameters, optimizer state, the
  batch);
* mode ``fit``: the per-rank memory at each ``--sizes`` edge fitted as ``a + b * voxels_per_rank``
  (from the exact tensor bytes plus the process's baseline, and from the peak RSS), solved for
  the largest cube whose step fits in ``--budget-gb`` with all ranks on one machine, and with one
  rank per machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import tempfile
import time
from typing import Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from bench_common import FixedPairs, reset_peak_rss, status_mb  # noqa: E402

from invnet import host_allocator  # noqa: E402
from invnet.core.memory_trace import trace_live_bytes  # noqa: E402
from invnet.distributed import ParallelStrategy, SerialComm, default_comm  # noqa: E402
from invnet.distributed import halo as halo_module  # noqa: E402
from invnet.networks import ConditionalGlow  # noqa: E402
from invnet.training import Trainer  # noqa: E402

HALO_SECONDS = [0.0]
MB = 2.0**20
PHASES = ("forward", "loss_mean", "backward", "grad_allreduce")
PHASE_SECONDS = dict.fromkeys(PHASES, 0.0)


def _timed(fn, into=None, key=None):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if into is None:
                HALO_SECONDS[0] += time.perf_counter() - t0
            else:
                into[key] += time.perf_counter() - t0

    return wrapper


halo_module._exchange = _timed(halo_module._exchange)
halo_module._exchange_adjoint = _timed(halo_module._exchange_adjoint)
torch.Tensor.backward = _timed(torch.Tensor.backward, PHASE_SECONDS, "backward")


def instrument(trainer: Trainer) -> None:
    """Time the parts of this trainer's step (instance attributes: the serial trainer of
    ``--overhead`` is left alone; backward is timed for all, but only read for this one)."""
    trainer._losses = _timed(trainer._losses, PHASE_SECONDS, "forward")
    trainer.strategy.global_mean = _timed(trainer.strategy.global_mean, PHASE_SECONDS, "loss_mean")
    trainer.strategy.reduce_gradients = _timed(trainer.strategy.reduce_gradients, PHASE_SECONDS, "grad_allreduce")


def bind_to_core(comm) -> str:
    """Pin this rank to one CPU of those it may use (node-local rank ``r`` to the ``r``-th), when
    there are at least as many as ranks on the node; returns what was done."""
    local, local_size = comm.node_local()
    cpus = sorted(os.sched_getaffinity(0))
    if local_size > len(cpus):
        return f"not bound ({local_size} ranks on {len(cpus)} cpus)"
    os.sched_setaffinity(0, {cpus[local]})
    return f"cpu {cpus[local]}"


def build(space: tuple[int, ...], args, comm, out_dir: str, serial_subdomain: bool = False) -> Trainer:
    """The trainer of the decomposed job; with ``serial_subdomain`` the same network and data,
    serially on this rank's subdomain (what the rank would do if its block were the whole volume)."""
    strategy = ParallelStrategy(space, (1, comm.size, 1, 1), comm)
    if serial_subdomain:
        strategy = ParallelStrategy(strategy.local_space_shape, None, SerialComm())
    torch.manual_seed(0)
    net = ConditionalGlow(1, 1, hidden=args.hidden, levels=args.levels, depth=args.depth, ndim=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    # this rank's subdomain of a fixed pair of random volumes, generated on the rank (no rank holds a whole volume)
    source = FixedPairs((args.batch, 1) + tuple(strategy.local_space_shape), 0.5, seed=1 + comm.rank)
    return Trainer(net, opt, source, out_dir, steps=1, strategy=strategy, device="cpu", progress=False,
                   log_every=1)


def live_bytes(trainer: Trainer, local_voxels: int) -> dict:
    """Exact tensor bytes of one step, split into what scales with the local volume and the rest."""
    at_rest = sum(t.numel() * t.element_size() for t in trainer.model.parameters())
    at_rest += sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values()
                   if torch.is_tensor(t))
    at_rest += sum(t.numel() * t.element_size() for t in trainer.batches.next_batch())
    trace = trace_live_bytes(trainer._train_step)
    return {"peak_mb": round(trace.peak_bytes / MB, 2), "end_mb": round(trace.end_bytes / MB, 2),
            "at_rest_mb": round(at_rest / MB, 2), "local_voxels": local_voxels}


def _serial_steps(serial: Optional[Trainer]) -> Optional[tuple[float, float]]:
    """Wall and CPU seconds of one step of the serial trainer (``None`` without one)."""
    if serial is None:
        return None
    t0, c0 = time.perf_counter(), time.process_time()
    serial._train_step()
    return time.perf_counter() - t0, time.process_time() - c0


def _quiet_barrier(comm) -> None:
    """A barrier that waits asleep (MPI's own barrier polls the CPU: a waiting rank would compete
    with the one that works)."""
    mpi = getattr(comm, "comm", None)
    if mpi is None or not hasattr(mpi, "Ibarrier"):
        comm.barrier()
        return
    request = mpi.Ibarrier()
    while not request.Test():
        time.sleep(0.002)


def _serial_alone(serial: Trainer, steps: int, comm) -> list[float]:
    """This rank's serial subdomain step while every other rank sleeps, one rank after another:
    the step on a machine with nothing else running, against which the same step timed while all
    ranks work (the serial steps of the main loop) shows what the ranks cost each other through
    the hardware (shared memory bandwidth and caches, or cores that are hyperthreads of one)."""
    times = []
    for r in range(comm.size):
        comm.barrier()
        if comm.rank == r:
            times = [_serial_steps(serial) for _ in range(steps)]
        _quiet_barrier(comm)
    return times


def one_run(space: tuple[int, ...], args, comm, trace: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        trainer = build(space, args, comm, out)
        trainer._train_step()  # warm-up step (ActNorm initialisation, allocator), alike on every rank
        serial = None
        if getattr(args, "overhead", False):
            serial = build(space, args, comm, os.path.join(out, "serial"), serial_subdomain=True)
            serial._train_step()
        instrument(trainer)
        local_voxels = math.prod(trainer.strategy.local_space_shape)
        live = live_bytes(trainer, local_voxels) if trace else None
        comm.barrier()
        reset_peak_rss()
        baseline = status_mb("VmRSS")
        times, serial_times, phases, halos, usage = [], [], [], [], []
        c0 = time.process_time()
        for _ in range(args.steps):
            for k in PHASES:
                PHASE_SECONDS[k] = 0.0
            HALO_SECONDS[0] = 0.0
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            trainer._train_step()
            times.append(time.perf_counter() - t0)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            phases.append(dict(PHASE_SECONDS, update=times[-1] - sum(PHASE_SECONDS.values())))
            halos.append(HALO_SECONDS[0])
            usage.append((r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt))
            comm.barrier()  # both kinds of step start together on every rank
            serial_times.append(_serial_steps(serial))
            comm.barrier()
        cpu = (time.process_time() - c0) / args.steps  # CPU time: steadier than wall time on a loaded machine
        if serial is not None:  # (the serial steps are not the job's: CPU time of the decomposed steps only)
            cpu = sum(u + s for u, s, _ in usage) / args.steps
        comm.barrier()
        alone = _serial_alone(serial, args.steps, comm) if serial is not None else []
        step, halo = statistics.median(times), statistics.median(halos)
        overhead = (statistics.median([a / b[0] for a, b in zip(times, serial_times)]) if serial is not None
                    else float("nan"))
        nan = float("nan")
        med = statistics.median
        contention = med(t for t, _ in serial_times) / med(t for t, _ in alone) if alone else nan
        # CPU time: the same ratios without the time a rank spent descheduled (on a loaded machine)
        contention_cpu = med(c for _, c in serial_times) / med(c for _, c in alone) if alone else nan
        cpu_steps = [u + sy for u, sy, _ in usage]
        overhead_cpu = med([a / b[1] for a, b in zip(cpu_steps, serial_times)]) if serial is not None else nan
        mine = [statistics.median([p[k] for p in phases]) for k in PHASES + ("update",)]
        mine += [halo] + [statistics.median([u[i] for u in usage]) for i in range(3)]
        mine += [med(t for t, _ in serial_times) if serial is not None else nan, overhead,
                 med(t for t, _ in alone) if alone else nan, contention, overhead_cpu, contention_cpu]
        table = torch.zeros(len(mine), comm.size, dtype=torch.float64)
        table[:, comm.rank] = torch.tensor(mine, dtype=torch.float64)
        table = comm.allreduce_sum(table)
        names = list(PHASES) + ["update", "halo_s", "cpu_user_s", "cpu_sys_s", "minor_faults", "serial_step_s",
                                "decomposition_overhead", "serial_alone_step_s", "contention",
                                "decomposition_overhead_cpu", "contention_cpu"]
        per_rank_parts = {k: [round(float(v), 4) for v in table[i]] for i, k in enumerate(names)}
        per_rank = torch.zeros(6, comm.size, dtype=torch.float64)
        per_rank[:, comm.rank] = torch.tensor([step, halo, status_mb("VmHWM"), status_mb("VmHWM") - baseline,
                                               baseline, cpu], dtype=torch.float64)
        per_rank = comm.allreduce_sum(per_rank)
        lives = None
        if live is not None:
            table = torch.zeros(3, comm.size, dtype=torch.float64)
            mine = [live["peak_mb"], live["end_mb"], live["at_rest_mb"]]
            table[:, comm.rank] = torch.tensor(mine, dtype=torch.float64)
            lives = comm.allreduce_sum(table)
        return {
            "ranks": comm.size, "volume": list(space), "local": list(trainer.strategy.local_space_shape),
            "step_s": round(float(per_rank[0].max()), 3),
            "step_cpu_s_per_rank": [round(float(v), 3) for v in per_rank[5]],
            "halo_fraction_min": round(float((per_rank[1] / per_rank[0]).min()), 4),
            "halo_fraction_max": round(float((per_rank[1] / per_rank[0]).max()), 4),
            "peak_rss_mb": [round(float(v), 1) for v in per_rank[2]],
            "step_rss_growth_mb": [round(float(v), 1) for v in per_rank[3]],
            "rss_before_step_mb": [round(float(v), 1) for v in per_rank[4]],
            "live_peak_mb": None if lives is None else [round(float(v), 2) for v in lives[0]],
            "live_end_mb": None if lives is None else [round(float(v), 2) for v in lives[1]],
            "at_rest_mb": None if lives is None else [round(float(v), 2) for v in lives[2]],
            "local_voxels": local_voxels,
            "phases_s": {k: per_rank_parts[k] for k in list(PHASES) + ["update", "halo_s"]},
            **{k: per_rank_parts[k] for k in ("cpu_user_s", "cpu_sys_s", "minor_faults")},
            **({k: per_rank_parts[k] for k in ("serial_step_s", "decomposition_overhead", "serial_alone_step_s",
                                               "contention", "decomposition_overhead_cpu", "contention_cpu")}
               if serial is not None else {}),
        }


def _gather_strings(comm, text: str) -> list[str]:
    """Every rank's ``text``, in rank order, on every rank (one broadcast per rank: a few strings)."""
    return [comm.bcast(text if comm.rank == r else None, root=r) for r in range(comm.size)]


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-300)
    return my - b * mx, b


def fit(args, comm) -> dict:
    """Per-rank memory of a step at several sizes, fitted as ``a + b * voxels per rank`` in two
    ways, and solved for the largest cube that fits the budget:

    * ``tensors``: exact live tensor bytes (peak of the step + what is alive at rest) plus the
      process's resident memory without them: what the network needs;
    * ``rss``: the kernel's high-water mark of the process during the step: what it took, with
      the workspaces convolution kernels allocate outside tensors (PyTorch's reference Conv3d
      kernel unfolds its input into a buffer of kernel-volume copies)."""
    points = [one_run((s, s, s), args, comm, trace=True) for s in args.sizes]
    voxels = [p["local_voxels"] for p in points]
    at_rest = [max(p["at_rest_mb"]) for p in points]
    process_mb = max(max(p["rss_before_step_mb"]) - r for p, r in zip(points, at_rest))
    models = {
        "tensors": _line(voxels, [max(p["live_peak_mb"]) + r + process_mb for p, r in zip(points, at_rest)]),
        "rss": _line(voxels, [max(p["peak_rss_mb"]) for p in points]),
    }
    budget = args.budget_gb * 1024.0
    divisor = comm.size * 2 ** args.levels  # every local size even at each squeeze level

    def largest(model: tuple[float, float], per_rank_budget_mb: float) -> int:
        a, b = model
        edge = int(((per_rank_budget_mb - a) / b * comm.size) ** (1 / 3)) if per_rank_budget_mb > a else 0
        return edge - edge % divisor

    return {
        "mode": "fit", "ranks": comm.size, "sizes": args.sizes, "points": points, "budget_gb": args.budget_gb,
        "process_baseline_mb": round(process_mb, 1),
        "models_mb": {k: {"a": round(a, 1), "b_per_voxel": b} for k, (a, b) in models.items()},
        # all ranks on one machine share its memory; one rank per machine has it whole
        "largest_edge_one_machine": {k: largest(m, budget / comm.size) for k, m in models.items()},
        "largest_edge_one_rank_per_machine": {k: largest(m, budget) for k, m in models.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("strong", "weak", "fit"), default="strong")
    ap.add_argument("--size", type=int, default=128, help="edge of the volume (strong) or of each rank's block (weak)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64], help="edges measured in mode fit")
    ap.add_argument("--budget-gb", type=float, default=24.0)
    ap.add_argument("--hidden", type=int, default=8)
    ap.add_argument("--levels", type=int, default=2)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up)")
    ap.add_argument("--trace", action="store_true", help="also count the exact live tensor bytes of one step")
    ap.add_argument("--overhead", action="store_true",
                    help="also time the serial step of each rank's subdomain, interleaved (decomposition_overhead)")
    ap.add_argument("--bind", action="store_true", help="pin each rank to one core (like mpiexec -bind-to core)")
    ap.add_argument("--reference-kernels", action="store_true",
                    help="PyTorch's own convolution kernel choice (invnet's kernel rule off), for comparison")
    args = ap.parse_args()
    kernel_choice = contextlib.ExitStack()
    if args.reference_kernels:
        try:
            from invnet.layers.kernels import reference_kernels
        except ImportError:
            raise SystemExit("--reference-kernels: this invnet has no kernel rule (invnet.layers.kernels)") from None
        kernel_choice.enter_context(reference_kernels())  # for the whole run (thread-local)
    comm = default_comm()
    binding = bind_to_core(comm) if args.bind else "not bound"
    common = {"binding": _gather_strings(comm, binding),
              "hidden": args.hidden, "levels": args.levels, "depth": args.depth, "batch": args.batch,
              "kernels": "reference (PyTorch's choice)" if args.reference_kernels else "invnet rule",
              "threads_per_rank": torch.get_num_threads(), "load_average": os.getloadavg(),
              "allocator": _gather_strings(comm, host_allocator.allocator_in_use())}
    if args.mode == "fit":
        record = fit(args, comm)
    else:
        s = args.size
        space = (s, s, s) if args.mode == "strong" else (s * comm.size, s, s)
        record = {"mode": args.mode, **one_run(space, args, comm, trace=args.trace)}
    if comm.rank == 0:
        print(json.dumps({**record, **common, "load_average_after": os.getloadavg()}), flush=True)
    kernel_choice.close()
    comm.close()


if __name__ == "__main__":
    main()
