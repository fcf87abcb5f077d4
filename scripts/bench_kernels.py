"""Kernel benchmark (issue 18): time per voxel of a training step of 3D conditional flows over
volume size, batch and threads, and which convolution kernels the step runs.

For every (network, threads, batch, size) a fresh process times, round-robin in one process,

* ``invnet``: the network's memory-saving training step (NLL, backward) with the kernel rule of
  ``invnet.layers.kernels``;
* ``before``: the same step under ``invnet.layers.kernels.reference_kernels()``, i.e. PyTorch's
  own kernel choice, the code path before issue 18;
* ``plain``: the same conditioners written with plain PyTorch layers (``nn.Conv3d`` with
  ``padding``, ``nn.ReLU``, the residual 1x1 stage), each called once on an input of the shape
  it sees in the network, forward and backward by autograd: the reference for kernel throughput
  (invnet's step adds the flow's own arithmetic and one extra conditioner forward per coupling,
  the price of the memory-free backward, so ``invnet / plain`` near 1.3-2 is expected);

and records one profile (``torch.profiler`` op names, which do not depend on timing or load) of a
step of each, reporting whether it contains ``slow_conv3d`` (PyTorch's reference kernel).
Results: ns per voxel (median step time / (batch x volume); ``--clock wall`` by default,
``--clock cpu`` for this process's CPU time, the steadier figure for one thread on a loaded
machine), the ratios ``before / invnet`` and ``invnet / plain``, and per (network, threads,
batch) the flatness of invnet's figure: max / min over the sizes from the smallest one whose
largest conditioner activation no longer fits the L2 cache of a core (read from /sys) to the
largest (target <= 1.3). ``--profile-only`` lists every convolution call of one step per variant
(kernel, input and weight shapes) without timing; ``--conditioners`` times single 1D/2D/3D
conditioners instead of networks.

Memory: before each size, the previous size's peak RSS growth (same network, batch and threads)
is scaled by the volume ratio; a size whose estimate exceeds ``--budget-gb`` is skipped and says
so.

    # the op names of every convolution call (load-independent; docs/benchmarks.md section 4)
    PYTHONPATH=$PWD python scripts/bench_kernels.py --profile-only --nets chain glow hint \
        --sizes 32 64 128 --batches 1 2 4 --threads 1 2 --out docs/benchmarks/kernels_profile.json
    # small run that proves it works (a few minutes)
    PYTHONPATH=$PWD python scripts/bench_kernels.py --sizes 32 64 --batches 1 2 --threads 1 \\
        --repeats 2 --out /tmp/kernels.json
    # the full sweep (idle machine; 256^3 runs only where the memory estimate fits --budget-gb)
    PYTHONPATH=$PWD python scripts/bench_kernels.py --out docs/benchmarks/kernels_cpu.json
    # single 1D, 2D and 3D conditioners, kernel rule against PyTorch's own choice
    PYTHONPATH=$PWD python scripts/bench_kernels.py --conditioners --threads 1 --repeats 5 --out /tmp/cond.json
    # GPU: cuDNN with torch.backends.cudnn.benchmark off and on, and the host read-backs per step
    PYTHONPATH=$PWD python scripts/bench_kernels.py --device cuda --out docs/benchmarks/kernels_gpu.json

With ``--device cuda`` and no CUDA device the script prints why and exits with status 0,
measuring nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

import bench_common as bc
import torch

from invnet import host_allocator, host_memory  # before the first tensor: large CPU tensors on huge pages

HERE = os.path.abspath(__file__)
NETWORKS = ("glow", "hint", "chain")
NO_GPU_MESSAGE = (
    "bench_kernels.py --device cuda: no CUDA device is available (torch.cuda.is_available() is False); "
    "nothing was measured. Run it on a machine with an NVIDIA GPU and a CUDA build of torch."
)


# -- the networks -------------------------------------------------------------------------------
def build_network(name: str, hidden: int, depth: int, levels: int) -> torch.nn.Module:
    """``glow``: ConditionalGlow(1, 1, ...) on a 3D volume with a 1-channel condition field;
    ``hint``: MultiscaleConditionalHINT(1, 1, ...) likewise (its HINT couplings recurse over the
    8 channels of a squeezed volume: 8 conditioners per step); ``chain``: the unconditional chain
    of issue 18 and scripts/bench_distributed.py (a Haar squeeze, then ``depth`` steps of ActNorm,
    1x1 convolution and affine coupling on 8 channels)."""
    import invnet
    from invnet.layers import ActNorm, AffineCoupling, Conv1x1, HaarSqueeze
    from invnet.networks import ConditionalGlow, MultiscaleConditionalHINT

    torch.manual_seed(0)
    if name == "chain":
        blocks = [HaarSqueeze(ndim=3)]
        for k in range(depth):
            blocks += [ActNorm(8), Conv1x1(8), AffineCoupling(8, hidden=hidden, ndim=3, swap=bool(k % 2))]
        return invnet.Chain(*blocks)
    if name == "glow":
        return ConditionalGlow(1, 1, hidden=hidden, levels=levels, depth=depth, ndim=3)
    return MultiscaleConditionalHINT(1, 1, hidden=hidden, levels=levels, depth=depth, ndim=3)


def conditioner_calls(net: torch.nn.Module, x: torch.Tensor, c: torch.Tensor) -> list[tuple[Any, tuple]]:
    """Every conditioner call of one forward: (the ConvConditioner, its input shape)."""
    from invnet.layers import ConvConditioner

    calls: list[tuple[Any, tuple]] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: calls.append((m, tuple(args[0].shape))))
             for m in net.modules() if isinstance(m, ConvConditioner)]
    try:
        with torch.no_grad():
            net(x, c if net.cond_channels else None)
    finally:
        for h in hooks:
            h.remove()
    return calls


class _Residual(torch.nn.Module):
    def __init__(self, conv: torch.nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, h):
        return h + torch.relu(self.conv(h))


def plain_conditioner(cond) -> torch.nn.Module:
    """The conditioner in plain PyTorch layers: the same shapes, padding inside the convolutions."""
    nn = torch.nn
    k = cond.conv_in.weight.shape[-1]
    cin, hidden, cout = cond.conv_in.in_channels, cond.conv_in.out_channels, cond.conv_out.out_channels
    layers = [nn.Conv3d(cin, hidden, k, padding=k // 2), nn.ReLU()]
    layers += [_Residual(nn.Conv3d(hidden, hidden, 1)) for _ in cond.body]
    layers += [nn.Conv3d(hidden, cout, k, padding=k // 2)]
    return nn.Sequential(*layers)


def make_steps(cfg: dict, device: torch.device) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    import invnet
    from invnet.layers.kernels import reference_kernels

    s, b = cfg["size"], cfg["batch"]
    net = build_network(cfg["net"], cfg["hidden"], cfg["depth"], cfg["levels"]).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, 1, s, s, s, generator=gen).to(device)
    c = torch.randn(b, 1, s, s, s, generator=gen).to(device)
    calls = conditioner_calls(net, x, c)
    plain = [(plain_conditioner(m).to(device), shape) for m, shape in calls]
    by_shape = {shape: torch.randn(shape, generator=gen).to(device) for _, shape in plain}  # one per shape
    plain_inputs = [by_shape[shape] for _, shape in plain]
    opt = torch.optim.SGD(net.parameters(), lr=1e-6)

    def invnet_step() -> None:
        opt.zero_grad(set_to_none=True)
        if cfg["net"] == "chain":  # a Chain has no density: the standard-normal NLL by hand
            z, logdet = net(x)
            (0.5 * z.square().sum() / b - logdet.mean()).backward()
        else:
            (-net.log_prob(x, c).mean()).backward()

    def before_step() -> None:
        with reference_kernels():
            invnet_step()

    def unchecked_step() -> None:
        with invnet.value_checks(False):
            invnet_step()

    def plain_step() -> None:
        for (module, _), inp in zip(plain, plain_inputs):
            module.zero_grad(set_to_none=True)
            module(inp).square().mean().backward()

    steps = {"invnet": invnet_step, "before": before_step, "plain": plain_step}
    if device.type == "cuda":
        steps = {"invnet": invnet_step, "invnet-no-value-checks": unchecked_step, "plain": plain_step}
    hidden_bytes = max(shape[0] * m.conv_in.out_channels * _volume(shape[2:]) for m, shape in calls)
    info = {
        "params": bc.parameter_count(net), "conditioner_calls": len(calls),
        "largest_hidden_bytes": hidden_bytes * x.element_size(),
        "readbacks_per_step": count_readbacks(invnet_step),
    }
    return steps, info


def _volume(space) -> int:
    v = 1
    for n in space:
        v *= int(n)
    return v


# -- what the step runs -------------------------------------------------------------------------
def conv_ops(step: Callable[[], None]) -> list[str]:
    """Names of the convolution kernels (and reference kernels) one call of ``step`` runs."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        step()
    keep = ("conv", "mkldnn", "cudnn", "slow_")
    return sorted({e.key for e in prof.key_averages() if any(k in e.key for k in keep)})


FORWARD_KERNELS = ("aten::slow_conv3d_forward", "aten::slow_conv2d_forward", "aten::thnn_conv2d",
                   "aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::_nnpack_spatial_convolution")


def conv_calls(step: Callable[[], None]) -> list[dict[str, Any]]:
    """Every convolution kernel call of one step (forward kernels: a convolution's backward runs
    on the kernel family its forward ran on), grouped by (kernel, input shape, weight shape)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    counts: Counter = Counter()
    for e in prof.events():
        if e.name in FORWARD_KERNELS:
            counts[(e.name.replace("aten::", ""), tuple(e.input_shapes[0]), tuple(e.input_shapes[1]))] += 1
    return [{"kernel": k, "input": list(i), "weight": list(w), "calls": n} for (k, i, w), n in sorted(counts.items())]


def count_readbacks(step: Callable[[], None]) -> int:
    """Host synchronisations in one step: value read-backs (``aten::_local_scalar_dense``, behind
    ``.item()``, ``bool(t)``, ``float(t)``) and tensors made from Python data (``aten::lift_fresh``,
    a blocking host-to-device copy on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default)

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.n


def worker(cfg: dict) -> dict:
    device = torch.device(cfg["device"])
    torch.set_num_threads(cfg["threads"])
    out = dict(cfg)
    out["rss_baseline_mb"] = (bc._status_kb("VmRSS") or 0) / 1024.0  # interpreter and torch, before the network
    out["huge_pages"] = host_memory.describe()
    out["allocator"] = host_allocator.allocator_in_use()
    steps, info = make_steps(cfg, device)
    out.update(info)
    runs: list[tuple[str, Callable[[], None]]] = []
    if device.type == "cuda":
        for bench in (False, True):  # cuDNN's own algorithm search off and on
            for name, step in steps.items():
                runs.append((f"{name}{'-cudnn-benchmark' if bench else ''}", _with_cudnn_benchmark(step, bench)))
    else:
        runs = list(steps.items())
    for _, step in runs:
        step()  # warm-up (ActNorm initialisation, oneDNN primitive caches, cuDNN search)
    if cfg.get("profile_only"):
        out["conv_calls"] = {name: conv_calls(step) for name, step in runs}
        out["slow_conv3d"] = {name: any(c["kernel"].startswith("slow_conv3d") for c in calls)
                              for name, calls in out["conv_calls"].items()}
        return out
    out["ops"] = {name: conv_ops(step) for name, step in runs}
    out["slow_conv3d"] = {name: any("slow_conv3d" in op for op in ops) for name, ops in out["ops"].items()}
    timed = bc.interleaved_times(dict(runs), cfg["repeats"], device)
    voxels = cfg["batch"] * cfg["size"] ** 3
    out["times"] = timed
    key = "cpu_median_s" if cfg.get("clock") == "cpu" else "time_median_s"
    out["ns_per_voxel"] = {name: t[key] / voxels * 1e9 for name, t in timed.items()}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / bc.MB
    out["peak_rss_mb"] = (bc._status_kb("VmHWM") or 0) / 1024.0
    return out


def _with_cudnn_benchmark(step: Callable[[], None], enabled: bool) -> Callable[[], None]:
    def run() -> None:
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = enabled
        try:
            step()
        finally:
            torch.backends.cudnn.benchmark = previous

    return run


# -- driver -------------------------------------------------------------------------------------
def l2_cache_bytes() -> int:
    """Size of a core's L2 cache from /sys (1 MiB if it cannot be read)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            with open(os.path.join(base, entry, "level")) as fh:
                if fh.read().strip() != "2":
                    continue
            with open(os.path.join(base, entry, "size")) as fh:
                text = fh.read().strip().upper()
            scale = {"K": 1024, "M": 1024**2}.get(text[-1], 1)
            return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return 1024**2


def flatness(rows: list[dict], cache_bytes: int, variant: str = "invnet") -> dict[str, Any]:
    """max / min of ``variant``'s ns per voxel over the sizes whose largest conditioner
    activation exceeds ``cache_bytes`` (all sizes when none does)."""
    done = sorted((r for r in rows if "ns_per_voxel" in r), key=lambda r: r["size"])
    big = [r for r in done if r["largest_hidden_bytes"] >= cache_bytes] or done
    if len(big) < 2:
        return {"from_size": big[0]["size"] if big else None, "ratio": None}
    vals = [r["ns_per_voxel"][variant] for r in big]
    return {"from_size": big[0]["size"], "to_size": big[-1]["size"], "ratio": max(vals) / min(vals)}


#: single conditioners (batch, in, hidden, out, space) for --conditioners: 1D, 2D and 3D shapes,
#: batch 1 (where PyTorch's choice depends on size) and larger batches
CONDITIONER_CASES = [
    (1, 2, 16, 4, (4096,)), (1, 3, 32, 6, (1024,)), (1, 6, 64, 12, (65536,)), (8, 3, 32, 6, (512,)),
    (1, 2, 16, 4, (64, 64)), (1, 6, 32, 12, (128, 128)), (4, 3, 32, 6, (64, 64)), (16, 6, 64, 12, (32, 32)),
    (16, 12, 64, 24, (16, 16)), (1, 4, 8, 8, (32, 32, 32)), (1, 4, 8, 8, (64, 64, 64)), (2, 12, 16, 8, (64, 64, 64)),
    (1, 80, 16, 32, (32, 32, 32)),
]


def _rule_and_reference_steps(
    net: torch.nn.Module, x: torch.Tensor, g: torch.Tensor
) -> tuple[Callable[[], None], Callable[[], None]]:
    """One forward + backward of ``net`` at ``x`` (output cotangent ``g``) with invnet's kernel
    rule, and the same under PyTorch's own choice of kernels."""
    from invnet.layers.kernels import reference_kernels

    def rule() -> None:
        net(x).backward(g)

    def reference() -> None:
        with reference_kernels():
            net(x).backward(g)

    return rule, reference


def conditioner_table(repeats: int, size_cap: int = 0) -> list[dict]:
    """One ConvConditioner's forward + backward per case, kernel rule against PyTorch's own choice,
    timed round-robin in this process (CPU time and wall time). ``size_cap`` > 0 caps every space
    size (smoke tests)."""
    from invnet.layers import ConvConditioner

    rows = []
    for batch, cin, hidden, cout, space in CONDITIONER_CASES:
        if size_cap > 0:
            space = tuple(min(n, size_cap) for n in space)
        torch.manual_seed(0)
        net = ConvConditioner(cin, cout, hidden=hidden, ndim=len(space), zero_init=False)
        x = torch.randn(batch, cin, *space, requires_grad=True)
        g = torch.randn(batch, cout, *space)

        rule, reference = _rule_and_reference_steps(net, x, g)
        for f in (rule, reference):
            f()
        t = bc.interleaved_times({"rule": rule, "reference": reference}, repeats, torch.device("cpu"))
        ops = {name: [o for o in conv_ops(f) if "slow" in o or "thnn" in o] for name, f in
               (("rule", rule), ("reference", reference))}
        rows.append(dict(batch=batch, channels=[cin, hidden, cout], space=list(space), times=t, reference_ops=ops))
        print(f"{len(space)}D batch {batch} {cin}->{hidden}->{cout} {'x'.join(map(str, space))}: "
              f"rule {t['rule']['cpu_median_s'] * 1e3:.2f} ms, reference {t['reference']['cpu_median_s'] * 1e3:.2f} ms "
              f"(cpu), reference / rule {t['reference']['cpu_median_s'] / t['rule']['cpu_median_s']:.2f}; "
              f"reference kernels: rule {ops['rule'] or 'none'}, PyTorch's choice {ops['reference'] or 'none'}",
              flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--nets", nargs="+", choices=NETWORKS, default=["glow", "hint"])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256], help="volume edges")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--glow-levels", type=int, default=2)
    p.add_argument("--glow-depth", type=int, default=2, help="Glow steps per scale")
    p.add_argument("--hint-levels", type=int, default=1)
    p.add_argument("--hint-depth", type=int, default=1, help="HINT lane steps per scale")
    p.add_argument("--chain-depth", type=int, default=2, help="steps of the Haar + coupling chain")
    p.add_argument("--chain-hidden", type=int, default=8, help="hidden channels of the chain (issue 18: 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="ns/voxel from wall time (idle machine) or process CPU time (loaded machine, 1 thread)")
    p.add_argument("--conditioners", action="store_true",
                   help="time single 1D/2D/3D conditioners (rule against PyTorch's choice) instead of networks")
    p.add_argument("--size-cap", type=int, default=0, help=argparse.SUPPRESS)  # smoke tests: cap --conditioners sizes
    p.add_argument("--profile-only", action="store_true",
                   help="no timing: list every convolution kernel call of one step (load-independent)")
    p.add_argument("--budget-gb", type=float, default=20.0, help="skip sizes whose memory estimate exceeds this")
    p.add_argument("--timeout", type=float, default=5400, help="seconds per configuration")
    p.add_argument("--allocator", default=os.environ.get(host_allocator.CHOICE_VARIABLE, "jemalloc"),
                   choices=["jemalloc", "system"],
                   help="the workers' C allocator: jemalloc where installed (what invnet train does), or glibc's")
    p.add_argument("--out", default="docs/benchmarks/kernels_cpu.json")
    args = p.parse_args(argv)
    if args.worker:
        host_allocator.relaunch_under_jemalloc(sys.orig_argv)  # as `invnet train` does (INVNET_ALLOCATOR: the parent's)
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    os.environ[host_allocator.CHOICE_VARIABLE] = args.allocator  # inherited by the workers (run_fresh)
    if args.allocator == "system":  # nor a jemalloc the caller preloaded
        kept = [x for x in os.environ.get("LD_PRELOAD", "").split(":") if x and "jemalloc" not in x]
        os.environ["LD_PRELOAD"] = ":".join(kept)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU_MESSAGE)
        return 0
    if args.conditioners:
        torch.set_num_threads(args.threads[0])
        load = os.getloadavg()
        rows = conditioner_table(args.repeats, args.size_cap)
        bc.write_json_atomic(args.out, {"benchmark": "kernels-conditioners", "threads": args.threads[0],
                                        "loadavg_before": load, "loadavg_after": os.getloadavg(),
                                        "versions": bc.versions(), "results": rows})
        print(f"load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f}; wrote {args.out}")
        return 0
    levels = {"glow": args.glow_levels, "hint": args.hint_levels, "chain": 1}
    depth = {"glow": args.glow_depth, "hint": args.hint_depth, "chain": args.chain_depth}
    hidden = {"glow": args.hidden, "hint": args.hidden, "chain": args.chain_hidden}
    most = max(levels[n] for n in args.nets)
    bad = [s for s in args.sizes if s % 2**most]
    if bad:
        p.error(f"sizes must be divisible by 2^levels = {2**most}; got {bad}")
    command = "python scripts/bench_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv)
    cache = l2_cache_bytes()
    results: list[dict] = []
    load_before = os.getloadavg()
    threads = [1] if args.device == "cuda" else args.threads
    for net in args.nets:
        for th in threads:
            for batch in args.batches:
                previous = None
                for size in sorted(args.sizes):
                    cfg = dict(net=net, threads=th, batch=batch, size=size, hidden=hidden[net], depth=depth[net],
                               levels=levels[net], repeats=args.repeats, device=args.device,
                               profile_only=args.profile_only, clock=args.clock)
                    if previous is not None and "peak_rss_mb" in previous:
                        base = previous["rss_baseline_mb"]
                        growth = previous["peak_rss_mb"] - base
                        estimate_gb = (base + growth * (size / previous["size"]) ** 3) / 1024
                        if estimate_gb > args.budget_gb:
                            results.append(dict(cfg, skipped=f"memory estimate {estimate_gb:.1f} GB > budget "
                                                             f"{args.budget_gb:.0f} GB"))
                            print(f"{net} threads={th} batch={batch} {size}^3: skipped ({results[-1]['skipped']})",
                                  flush=True)
                            continue
                    r = bc.run_fresh(HERE, cfg, th, args.timeout, mmap_threshold=False)
                    results.append(r)
                    previous = r if "error" not in r else previous
                    print(_line(r), flush=True)
    load_after = os.getloadavg()
    summary = []
    for net in args.nets:
        for th in threads:
            for batch in args.batches:
                rows = [r for r in results if r["net"] == net and r["threads"] == th and r["batch"] == batch]
                summary.append(dict(net=net, threads=th, batch=batch, flatness=flatness(rows, cache)))
    record = {
        "benchmark": "kernels", "command": command, "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "versions": bc.versions(), "l2_cache_bytes": cache, "loadavg_before": load_before, "loadavg_after": load_after,
        "results": results, "summary": summary,
    }
    bc.write_json_atomic(args.out, record)
    if args.profile_only:
        print_profiles(results)
    else:
        print_tables(results, summary, args.device)
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; wrote {args.out}")
    return 0


def _line(r: dict) -> str:
    head = f"{r['net']} threads={r['threads']} batch={r['batch']} {r['size']}^3:"
    if "error" in r:
        return f"{head} failed: {r['error']}"
    if "conv_calls" in r:
        return head + "; ".join(
            f" {name}: " + ", ".join(f"{sum(c['calls'] for c in calls if c['kernel'] == k)} {k}"
                                     for k in sorted({c["kernel"] for c in calls}))
            for name, calls in r["conv_calls"].items())
    ns = "  ".join(f"{k} {v:.0f}" for k, v in r["ns_per_voxel"].items())
    slow = ", ".join(k for k, v in r["slow_conv3d"].items() if v) or "none"
    return f"{head} ns/voxel {ns}; slow_conv3d in: {slow}; allocator {r.get('allocator', '?')}"


def print_profiles(results: list[dict]) -> None:
    """Per configuration: forward convolution kernel calls of one step, per variant; then every
    distinct (input, weight) shape that ran on PyTorch's reference kernel, with the product
    PyTorch's heuristic compares (batch x channels x first two space sizes of the input)."""
    done = [r for r in results if "conv_calls" in r]
    if not done:
        return
    names = list(done[0]["conv_calls"])
    print("\n| net | threads | batch | size | " + " | ".join(f"{n}: kernel calls (forward)" for n in names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for r in done:
        cells = []
        for n in names:
            calls = r["conv_calls"][n]
            kinds = sorted({c["kernel"] for c in calls})
            cells.append(", ".join(f"{sum(c['calls'] for c in calls if c['kernel'] == k)} {k}" for k in kinds))
        print(f"| {r['net']} | {r['threads']} | {r['batch']} | {r['size']}^3 | " + " | ".join(cells) + " |")
    slow = {}
    for r in done:
        for n in names:
            for c in r["conv_calls"][n]:
                if c["kernel"].startswith("slow"):
                    key = (n, tuple(c["input"]), tuple(c["weight"]))
                    slow.setdefault(key, set()).add(r["threads"])
    if slow:
        print("\nshapes on the reference kernel (input, weight; N*C*D*H of the input; threads):")
        for (n, i, w), th in sorted(slow.items()):
            product = i[0] * i[1] * i[2] * i[3]
            print(f"  {n}: input {list(i)} weight {list(w)}  N*C*D*H = {product}  threads {sorted(th)}")


def print_tables(results: list[dict], summary: list[dict], device: str) -> None:
    done = [r for r in results if "ns_per_voxel" in r]
    if not done:
        return
    names = list(done[0]["ns_per_voxel"])
    ratio_cols = [("before", "invnet"), ("invnet", "plain")] if device == "cpu" else [
        ("invnet", "invnet-cudnn-benchmark"), ("invnet", "invnet-no-value-checks"), ("invnet", "plain")]
    print("\n| net | threads | batch | size | " + " | ".join(f"{n} ns/voxel" for n in names) + " | "
          + " | ".join(f"{a} / {b}" for a, b in ratio_cols) + " | slow_conv3d in profile | host syncs / step |")
    print("|---" * (5 + len(names) + len(ratio_cols) + 1) + "|")
    for r in results:
        key = f"| {r['net']} | {r['threads']} | {r['batch']} | {r['size']}^3 | "
        if "ns_per_voxel" not in r:
            print(key + (r.get("skipped") or "failed: " + r.get("error", "?")[:80]) + " |")
            continue
        ns = r["ns_per_voxel"]
        ratios = [f"{ns[a] / ns[b]:.2f}" for a, b in ratio_cols if a in ns and b in ns]
        slow = ", ".join(k for k, v in r["slow_conv3d"].items() if v) or "none"
        print(key + " | ".join(f"{ns[n]:.0f}" for n in names) + " | " + " | ".join(ratios)
              + f" | {slow} | {r['readbacks_per_step']} |")
    print("\nflatness of invnet's ns/voxel (max / min from the first size past the L2 cache; target <= 1.3):")
    for s in summary:
        f = s["flatness"]
        text = ("fewer than two sizes" if f["ratio"] is None
                else f"{f['ratio']:.2f} ({f['from_size']}^3 .. {f['to_size']}^3)")
        print(f"  {s['net']} threads={s['threads']} batch={s['batch']}: {text}")


if __name__ == "__main__":
    sys.exit(main())
