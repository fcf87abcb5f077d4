"""Posterior accuracy against known posteriors: C2ST of trained conditional flows, as in
"Benchmarking Simulation-Based Inference" (Lueckmann et al., AISTATS 2021, arXiv:2101.04653).

For each problem (scripts/sbi_problems.py), simulation budget and model: simulate the budget,
train a conditional flow q(theta | y) the careful way (10% validation, early stopping on the
validation loss with patience, best weights), draw 10,000 samples for each of several fixed
observations (samples outside the prior's support discarded, as NPE does), and score them against
10,000 reference posterior samples with the classifier two-sample test of the paper: an MLP with
two hidden layers of 10 x dim units (scikit-learn's MLPClassifier, adam, ReLU), 5-fold
cross-validated accuracy on inputs standardised by the reference samples' moments. 0.5 means
indistinguishable, 1.0 fully separable.

Resumable: every finished configuration is appended to --out (JSON); per-configuration pieces
(best weights, samples, per-observation scores) live in --work and are reused. Rerun the same
command to continue; a larger --observations extends the finished configurations.

    PYTHONPATH=$PWD python scripts/bench_posterior.py --problems gaussian_linear two_moons \
        --budgets 1000 10000 --models glow hint spline --out docs/benchmarks/posterior_accuracy.json

Needs scikit-learn (``pip install scikit-learn``, the ``posterior-bench`` extra).

Training goes through invnet's own :class:`~invnet.training.Trainer` with the settings
``invnet train`` uses by default (validation once per epoch, early stopping with patience 20, the
best-by-validation weights), so the benchmark measures the product.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from sbi_problems import NPE_C2ST, NPE_C2ST_RERUN, PROBLEMS, Problem

import invnet
from invnet.core.checks import invertibility_error
from invnet.layers import ActNorm, AffineCoupling, Conv1x1, MLPConditioner, SplineCoupling
from invnet.networks import ConditionalGlow, ConditionalHINT, MultiscaleFlow
from invnet.networks.base import FlowNetwork

OBSERVATION_SEED = 1_000_003  # the fixed observations of each problem
TEST_PAIRS = 20_000  # fresh pairs for the test NLL
MAX_OBSERVATIONS = 100  # the pool the observations are taken from, in order
KL_PAIRS = 100  # test pairs whose exact posterior density is found by quadrature (two moons)
MODELS = ("glow", "hint", "spline", "hybrid", "hint_spline")


# ------------------------------------------------------------------------------------------------
# models
class SkipMLP(torch.nn.Module):
    """Conditioner ``out = W x + MLP(x)`` (both zero at the start): a linear path beside the
    residual MLP, so that conditional shifts and scales that are linear in the condition, as in
    every location-scale family, need no fit of a ReLU network to a straight line."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, residual_blocks: int = 1) -> None:
        super().__init__()
        self.reach = 0
        self.mlp = MLPConditioner(in_channels, out_channels, hidden, residual_blocks)
        self.linear = torch.nn.Linear(in_channels, out_channels)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return self.linear(x) + self.mlp(x)


@dataclass(frozen=True)
class AffineStep:
    """Glow's step (ActNorm, orthogonal 1x1 mixing, affine coupling) for vectors with a
    :class:`SkipMLP` conditioner; otherwise as :class:`~invnet.networks.GlowStep`."""

    hidden: int
    clamp: float
    residual_blocks: int

    def __call__(self, channels: int, cond_channels: int, ndim: int, scale: int, index: int) -> list:
        n_p = channels // 2
        cond = SkipMLP(n_p + cond_channels, 2 * (channels - n_p), self.hidden, self.residual_blocks)
        return [ActNorm(channels, ndim), Conv1x1(channels, ndim=ndim),
                AffineCoupling(channels, self.hidden, ndim, cond_channels, clamp=self.clamp, swap=bool(index % 2),
                               conditioner=cond)]


@dataclass(frozen=True)
class SplineStep:
    """Step factory of a neural spline flow (Durkan et al., 2019, arXiv:1906.04032), the
    transform behind NPE: ActNorm, orthogonal 1x1 mixing and a rational-quadratic spline coupling
    whose conditioner reads the condition. ``ConditionalGlow(coupling="spline")`` builds the same
    steps with the default bins and tail bound; this factory sets them. ``affine_clamp > 0``
    (model "hybrid") puts an affine coupling on the other half before each spline: the affine
    part moves and scales with the condition, which a spline fixed at +-B does badly."""

    hidden: int
    bins: int
    tail_bound: float
    clamp: float
    residual_blocks: int

    affine_clamp: float = 0.0  # > 0: an affine coupling on the other half before each spline (hybrid)
    linear_skip: bool = False  # SkipMLP conditioners

    def _conditioner(self, channels, cond_channels, swap, per_active):
        if not self.linear_skip:
            return None  # the coupling's default residual MLP
        n_p = channels // 2
        return SkipMLP(n_p + cond_channels, per_active * (channels - n_p), self.hidden, self.residual_blocks)

    def __call__(self, channels: int, cond_channels: int, ndim: int, scale: int, index: int) -> list:
        blocks = [ActNorm(channels, ndim), Conv1x1(channels, ndim=ndim)]
        if self.affine_clamp:  # location and scale from an affine coupling, shape from the spline
            blocks.append(AffineCoupling(channels, self.hidden, ndim, cond_channels, clamp=self.affine_clamp,
                                         swap=not index % 2, residual_blocks=self.residual_blocks,
                                         conditioner=self._conditioner(channels, cond_channels, not index % 2, 2)))
        blocks.append(SplineCoupling(channels, self.hidden, ndim, cond_channels, clamp=self.clamp, swap=bool(index % 2),
                                     bins=self.bins, tail_bound=self.tail_bound, residual_blocks=self.residual_blocks,
                                     conditioner=self._conditioner(channels, cond_channels, bool(index % 2),
                                                                   3 * self.bins - 1)))
        return blocks


def build_model(name: str, dim: int, cond: int, a: argparse.Namespace) -> FlowNetwork:
    if name == "glow" and a.linear_skip:
        return MultiscaleFlow(AffineStep(a.hidden, a.clamp, a.residual_blocks), dim, levels=1, depth=a.depth, ndim=0,
                              squeeze=None, cond_channels=cond)
    if name == "glow":
        return ConditionalGlow(dim, cond, hidden=a.hidden, levels=1, depth=a.depth, ndim=0, clamp=a.clamp,
                               residual_blocks=a.residual_blocks)
    if name == "hint":
        return ConditionalHINT(dim, cond, hidden=a.hidden, depth=a.depth, ndim=0, clamp=a.clamp,
                               residual_blocks=a.residual_blocks)
    if name == "hint_spline":  # HINT's recursive coupling with spline nodes (default bins and bound)
        return ConditionalHINT(dim, cond, hidden=a.hidden, depth=a.depth, ndim=0, clamp=a.clamp,
                               residual_blocks=a.residual_blocks, coupling="spline")
    if name in ("spline", "hybrid"):
        step = SplineStep(a.hidden, a.bins, a.tail_bound, a.spline_clamp, a.residual_blocks,
                          a.clamp if name == "hybrid" else 0.0, a.linear_skip)
        return MultiscaleFlow(step, dim, levels=1, depth=a.depth, ndim=0, squeeze=None, cond_channels=cond)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


# ------------------------------------------------------------------------------------------------
# training: invnet's Trainer (validation every epoch, early stopping, best weights, reduce on plateau)
def _nll(net, theta, y, batch):
    with torch.no_grad():
        return float(torch.cat([-net.log_prob(theta[i:i + batch], y[i:i + batch])
                                for i in range(0, len(theta), batch)]).mean())


class _EpochLoss:
    """The loss in nats, -log q(theta | y) per sample, that also sums the training part (the
    trainer sets ``model.train()`` for steps, ``eval()`` for validation) for the epoch means."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def __call__(self, model, batch):
        theta, y = batch
        per_sample = -model.log_prob(theta, y)
        if model.training:
            self.total, self.count = self.total + float(per_sample.detach().sum()), self.count + len(per_sample)
        return per_sample

    def take(self) -> float:
        mean = self.total / max(self.count, 1)
        self.total, self.count = 0.0, 0
        return mean


def train_flow(net: FlowNetwork, theta: np.ndarray, y: np.ndarray, a: argparse.Namespace, seed: int,
               run_dir: str) -> dict:
    """Maximum likelihood on standardised pairs through :class:`invnet.training.Trainer`, as
    ``invnet train`` does: a 10% validation split validated once per epoch, early stopping after
    ``a.patience`` validations without a better loss, the best weights (``run_dir/checkpoints/best``)
    loaded into ``net``, and (``a.plateau``) ReduceLROnPlateau halving the learning rate after
    ``a.plateau`` bad validations. A killed run resumes from ``run_dir``. Returns the log and the
    standardisation."""
    from invnet.data import ArraySource, BatchLoader, PairDataset
    from invnet.training import Trainer, read_checkpoint

    gen = torch.Generator().manual_seed(seed)
    n = len(theta)
    perm = torch.randperm(n, generator=gen).numpy()
    n_val = max(1, int(round(a.validation * n)))
    val, tr = perm[:n_val], perm[n_val:]
    stats = {"theta_mean": theta[tr].mean(0), "theta_std": theta[tr].std(0), "y_mean": y[tr].mean(0),
             "y_std": y[tr].std(0)}
    tt = torch.tensor((theta - stats["theta_mean"]) / stats["theta_std"], dtype=torch.float32)
    yy = torch.tensor((y - stats["y_mean"]) / stats["y_std"], dtype=torch.float32)
    t_tr, y_tr, t_val, y_val = tt[tr], yy[tr], tt[val], yy[val]
    batch = min(a.batch, len(tr))
    per_epoch = len(tr) // batch  # steps; the ragged last batch of an epoch is dropped
    loss, history = _EpochLoss(), []
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=a.plateau, threshold=0.0,
                                                       threshold_mode="abs") if a.plateau else None

    def validation():  # called once per epoch, after its steps: the epoch's mean training loss first
        history.append([len(history) + 1, loss.take(), None, opt.param_groups[0]["lr"]])
        return [(t_val[i:i + 4096], y_val[i:i + 4096]) for i in range(0, len(t_val), 4096)]

    pairs = PairDataset(ArraySource(t_tr.numpy(), "theta"), ArraySource(y_tr.numpy(), "y"))
    t0 = time.time()
    with invnet.memory_saving(a.memory_saving):
        net(t_tr[:min(len(tr), 1024)], y_tr[:min(len(tr), 1024)])  # ActNorm's data-dependent init
        trainer = Trainer(net, opt, BatchLoader(pairs, range(len(tr)), batch, seed=seed), run_dir,
                          a.max_epochs * per_epoch, loss_fn=loss, loss_name="nll", scheduler=sched,
                          validation=validation, validate_every=per_epoch, patience=a.patience,
                          clip_grad_norm=a.clip or None, log_every=per_epoch, checkpoint_every_minutes=10.0,
                          progress=False, device="cpu")
        trainer.resume()  # a run killed while training goes on where it was
        with _time_cap(a.max_minutes) as capped:
            result = trainer.fit()
    if result.status != "finished" and not capped():
        raise SystemExit(f"training stopped by {result.signal}; rerun the same command to resume it")
    for row, record in zip(history, [r for r in trainer.metrics.read() if "val_nll" in r][-len(history):]):
        row[2] = record["val_nll"]
    net.load_state_dict(read_checkpoint(result.best_checkpoint).weights)
    net.eval()
    log_std = float(np.log(stats["theta_std"]).sum())  # raw NLL = standardised NLL + sum log std
    return {"epochs": result.step // per_epoch, "best_epoch": result.best_step // per_epoch,
            "stopped_early": result.stopped_early, "train_seconds": time.time() - t0,
            "best_val_nll_raw": result.best_val_loss + log_std,
            "final_train_nll_raw": history[-1][1] + log_std,
            "history": [[e, tl + log_std, vl + log_std, lr] for e, tl, vl, lr in history if vl is not None],
            "stats": {k: v.tolist() for k, v in stats.items()}}


@contextlib.contextmanager
def _time_cap(minutes: float):
    """After ``minutes``, send this process SIGUSR1: the trainer finishes its step, writes a
    checkpoint (with the best weights) and returns, as a batch system's warning would make it.
    Yields a function telling whether the cap was reached."""
    import signal

    reached = []

    def alarm(signum, frame):
        reached.append(True)
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, minutes * 60)
    try:
        yield lambda: bool(reached)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sample_posterior(net: FlowNetwork, problem: Problem, y_obs: np.ndarray, stats: dict, n: int,
                     seed: int) -> tuple[np.ndarray, float]:
    """``n`` samples of q(theta | y_obs) inside the prior's support; returns them and the fraction
    of draws that fell inside (NPE's leakage correction discards the rest)."""
    gen = torch.Generator().manual_seed(seed)
    tm, ts = np.array(stats["theta_mean"]), np.array(stats["theta_std"])
    yn = torch.tensor((y_obs - np.array(stats["y_mean"])) / np.array(stats["y_std"]), dtype=torch.float32)[None]
    out, drawn, kept = [], 0, 0
    while kept < n:
        with torch.no_grad():
            s = net.sample(4096, yn, generator=gen).double().numpy() * ts + tm
        s = s[np.isfinite(s).all(1)]
        inside = problem.in_support(s)
        drawn += 4096
        out.append(s[inside])
        kept += int(inside.sum())
        if drawn > 200 * n:
            raise RuntimeError(f"fewer than 0.5% of the samples fall inside the prior's support ({kept}/{drawn})")
    return np.concatenate(out)[:n], kept / drawn


# ------------------------------------------------------------------------------------------------
# C2ST (Lueckmann et al. 2021)
def c2st(reference: np.ndarray, samples: np.ndarray, seed: int = 1, folds: int = 5) -> float:
    """Classifier two-sample test: 5-fold cross-validated accuracy of an MLP (two hidden layers of
    10 x dim ReLU units, adam, scikit-learn's defaults otherwise) telling ``samples`` from
    ``reference``, both standardised with the reference's mean and std."""
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neural_network import MLPClassifier

    mean, std = reference.mean(0), reference.std(0)
    data = np.concatenate([(reference - mean) / std, (samples - mean) / std])
    target = np.concatenate([np.zeros(len(reference)), np.ones(len(samples))])
    dim = reference.shape[1]
    clf = MLPClassifier(activation="relu", hidden_layer_sizes=(10 * dim, 10 * dim), max_iter=10000, solver="adam",
                        random_state=seed)
    cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(clf, data, target, cv=cv, scoring="accuracy")))


def _c2st_task(task):
    j, ref, samples, inside = task
    t0 = time.time()
    return j, c2st(ref, samples), time.time() - t0, inside


class _Serial:
    """``multiprocessing.Pool``'s ``imap_unordered`` in this process (``--jobs 1``)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap_unordered(fn, items):
        return map(fn, items)


def _pool(jobs: int):
    if jobs <= 1:
        return _Serial()
    import multiprocessing

    return multiprocessing.get_context("spawn").Pool(jobs)


# ------------------------------------------------------------------------------------------------
# the resumable run
def observations(problem: Problem, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` of a fixed pool of observations: observation ``j`` is the same whatever
    ``count`` is (a run extended to more observations keeps the ones it has)."""
    if count > MAX_OBSERVATIONS:
        raise ValueError(f"at most {MAX_OBSERVATIONS} observations, got {count}")
    rng = np.random.default_rng(OBSERVATION_SEED + sum(map(ord, problem.name)))
    theta, y = problem.joint(MAX_OBSERVATIONS, rng)
    return theta[:count], y[:count]


def reference_samples(problem: Problem, y_obs: np.ndarray, index: int, n: int, work: str) -> np.ndarray:
    """Reference posterior samples of observation ``index``, cached in ``work`` with the
    observation they belong to (a cached file made for another observation is refused)."""
    path = os.path.join(work, f"reference_{problem.name}_{index}_{n}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            if not np.array_equal(f["y"], y_obs):
                raise ValueError(f"{path} holds the reference of another observation; delete it")
            return f["samples"]
    rng = np.random.default_rng(7919 * (index + 1) + sum(map(ord, problem.name)))
    ref = problem.reference_posterior(y_obs, n, rng)
    tmp = path + ".tmp.npz"
    np.savez(tmp, samples=ref, y=y_obs)
    os.replace(tmp, path)
    return ref


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _read_json(path: str, default):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def config_key(problem: str, budget: int, model: str, seed: int, tag: str) -> str:
    return f"{problem}_n{budget}_{model}_s{seed}" + (f"_{tag}" if tag else "")


def _key_of(record: dict) -> str:
    return config_key(record["problem"], record["budget"], record["model"], record["seed"], record.get("tag", ""))


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock beside ``path`` (several runs may share one results file)."""
    import fcntl

    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_config(problem: Problem, budget: int, model: str, a: argparse.Namespace) -> dict:
    key = config_key(problem.name, budget, model, a.seed, a.tag)
    folder = os.path.join(a.work, key)
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(a.seed)
    net = build_model(model, problem.dim_theta, problem.dim_y, a)
    weights = os.path.join(folder, "best.pt")
    train_log = _read_json(os.path.join(folder, "train.json"), None)
    if train_log is not None and os.path.exists(weights):
        net.load_state_dict(torch.load(weights, weights_only=True))
        net.eval()
    else:
        rng = np.random.default_rng(a.seed * 7777 + budget + sum(map(ord, problem.name)))
        theta, y = problem.joint(budget, rng)
        train_log = train_flow(net, theta, y, a, a.seed, os.path.join(folder, "run"))
        tmp = weights + ".tmp"
        torch.save(net.state_dict(), tmp)
        os.replace(tmp, weights)
        _write_json(os.path.join(folder, "train.json"), train_log)
    print(f"[{key}] trained: {train_log['epochs']} epochs (best {train_log['best_epoch']}), "
          f"{train_log['train_seconds']:.0f} s, val NLL {train_log['best_val_nll_raw']:.3f}", flush=True)
    theta_obs, y_obs = observations(problem, a.observations)
    scores = _read_json(os.path.join(folder, "c2st.json"), {})
    todo = []
    for j in range(a.observations):
        if str(j) in scores and np.array_equal(scores[str(j)].get("y"), y_obs[j].tolist()):
            continue
        ref = reference_samples(problem, y_obs[j], j, a.samples, a.work)
        samples, inside = sample_posterior(net, problem, y_obs[j], train_log["stats"], a.samples, a.seed * 31 + j)
        todo.append((j, ref, samples, inside))
    # the classifier is the costly part (minutes per observation in 10-D): --jobs runs it in parallel
    with _pool(a.jobs) as pool:
        for j, score, seconds, inside in pool.imap_unordered(_c2st_task, todo):
            scores[str(j)] = {"c2st": score, "inside_support": inside, "c2st_seconds": seconds,
                              "y": y_obs[j].tolist()}
            _write_json(os.path.join(folder, "c2st.json"), scores)
            print(f"[{key}] observation {j}: C2ST {score:.3f} ({seconds:.0f} s)", flush=True)
    # on fresh prior pairs: the test NLL, E[-log q(theta|y)] = E_y KL(p(.|y) || q(.|y)) + H(theta|y),
    # so differences between models are differences of their expected KL (a cheap proxy of C2ST),
    # and the float32 reconstruction error of the trained network (standardised units)
    rng = np.random.default_rng(5)
    th, yy = problem.joint(TEST_PAIRS, rng)
    st = train_log["stats"]
    th_n = torch.tensor((th - np.array(st["theta_mean"])) / np.array(st["theta_std"]), dtype=torch.float32)
    y_n = torch.tensor((yy - np.array(st["y_mean"])) / np.array(st["y_std"]), dtype=torch.float32)
    test_nll = _nll(net, th_n, y_n, 4096) + float(np.log(np.array(st["theta_std"])).sum())
    recon = invertibility_error(net, th_n[:512], y_n[:512])
    vals = [scores[str(j)]["c2st"] for j in range(a.observations)]
    record = {
        "problem": problem.name, "budget": budget, "model": model, "seed": a.seed, "tag": a.tag,
        "c2st_mean": float(np.mean(vals)) if vals else None, "c2st_std": float(np.std(vals)) if vals else None,
        "c2st": vals, "test_nll_raw": test_nll,
        "observations": a.observations, "npe_published": NPE_C2ST.get((problem.name, budget)),
        "inside_support": (float(np.mean([scores[str(j)]["inside_support"] for j in range(a.observations)]))
                           if vals else None),
        "epochs": train_log["epochs"], "best_epoch": train_log["best_epoch"],
        "train_seconds": train_log["train_seconds"], "best_val_nll_raw": train_log["best_val_nll_raw"],
        "final_train_nll_raw": train_log["final_train_nll_raw"], "float32_reconstruction_error": recon,
        "parameters": sum(p.numel() for p in net.parameters()),
        "settings": {k: getattr(a, k) for k in ("hidden", "depth", "bins", "tail_bound", "clamp", "spline_clamp",
                                                "residual_blocks", "linear_skip", "lr", "batch", "weight_decay",
                                                "patience", "plateau", "clip", "validation")},
    }
    if hasattr(problem, "posterior_entropy"):  # exact: the test NLL's floor, and the KL gap itself
        record["posterior_entropy"] = problem.posterior_entropy()
        record["kl_gap"] = test_nll - record["posterior_entropy"]
    elif hasattr(problem, "log_posterior"):  # KL gap E[log p(theta|y) - log q(theta|y)] by quadrature
        k = KL_PAIRS
        with torch.no_grad():
            log_q = net.log_prob(th_n[:k], y_n[:k]).double().numpy() - float(np.log(np.array(st["theta_std"])).sum())
        log_p = np.array([problem.log_posterior(th[i], yy[i])[0] for i in range(k)])
        record["kl_gap"] = float(np.mean(log_p - log_q))
        record["kl_gap_se"] = float(np.std(log_p - log_q) / np.sqrt(k))
    return record


def npe_reference(problem: str, budget: int) -> str:
    """NPE's C2ST for the table: the published figure, else the sbibm re-run's (marked), else '-'."""
    if (problem, budget) in NPE_C2ST:
        return f"{NPE_C2ST[(problem, budget)]}"
    if (problem, budget) in NPE_C2ST_RERUN:
        return f"{NPE_C2ST_RERUN[(problem, budget)]} (re-run)"
    return "-"


def markdown_table(results: list[dict]) -> str:
    """The results as a Markdown table, one row per configuration (problem, budget, model)."""
    lines = ["| problem | budget | model | tag | C2ST (mean +- sd, observations) | NPE | KL gap (nats) | "
             "test NLL | epochs (best) | train s | float32 recon. error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(MODELS)}
    for r in sorted(results, key=lambda r: (r["problem"], r["budget"], order.get(r["model"], 99), r.get("tag", ""))):
        c2 = (f"{r['c2st_mean']:.3f} +- {r['c2st_std']:.3f} ({r['observations']})" if r.get("c2st_mean") is not None
              else "-")
        kl = "-" if r.get("kl_gap") is None else f"{r['kl_gap']:.3f}" + (
            f" +- {r['kl_gap_se']:.3f}" if r.get("kl_gap_se") is not None else "")
        lines.append(f"| {r['problem']} | {r['budget']:g} | {r['model']} | {r.get('tag') or ''} | {c2} | "
                     f"{npe_reference(r['problem'], r['budget'])} | {kl} | {r['test_nll_raw']:.3f} | "
                     f"{r['epochs']} ({r['best_epoch']}) | "
                     f"{r['train_seconds']:.0f} | {r['float32_reconstruction_error']:.1e} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", nargs="+", default=["gaussian_linear", "two_moons", "slcp"], choices=sorted(PROBLEMS))
    p.add_argument("--budgets", nargs="+", type=int, default=[1000, 10_000, 100_000])
    p.add_argument("--models", nargs="+", default=["glow", "hint", "spline"], choices=MODELS)
    p.add_argument("--observations", type=int, default=10, help="observations per problem (the paper: 10)")
    p.add_argument("--samples", type=int, default=10_000, help="posterior and reference samples per observation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the configuration key (for tuning variants)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--residual-blocks", type=int, default=1)
    p.add_argument("--linear-skip", action="store_true", help="conditioners with a linear path (glow, spline, hybrid)")
    p.add_argument("--bins", type=int, default=10)
    p.add_argument("--tail-bound", type=float, default=3.0)
    p.add_argument("--clamp", type=float, default=2.0, help="bound of the affine log-scales (glow, hint)")
    p.add_argument("--spline-clamp", type=float, default=3.0, help="bound of the spline knot log-slopes")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    p.add_argument("--patience", type=int, default=20, help="epochs (validations) without a better validation loss")
    p.add_argument("--plateau", type=int, default=0,
                   help="ReduceLROnPlateau: halve the learning rate after more than this many bad epochs (0: off)")
    p.add_argument("--clip", type=float, default=5.0, help="gradient norm clip (0: off)")
    p.add_argument("--validation", type=float, default=0.1)
    p.add_argument("--max-epochs", type=int, default=2000)
    p.add_argument("--max-minutes", type=float, default=120.0, help="training time cap per configuration")
    p.add_argument("--memory-saving", action="store_true",
                   help="train with the memory-free backward (same gradients; slower, and memory is no issue here)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="C2ST classifiers run in parallel (one thread each)")
    p.add_argument("--out", default="docs/benchmarks/posterior_accuracy.json")
    p.add_argument("--work", default="bench_posterior_work", help="folder for weights, samples and partial scores")
    p.add_argument("--table", action="store_true", help="print --out as a Markdown table and exit")
    a = p.parse_args(argv)
    if a.table:
        print(markdown_table(_read_json(a.out, {"results": []})["results"]))
        return
    try:
        import sklearn  # noqa: F401
    except ImportError:
        p.error("the C2ST classifier needs scikit-learn: pip install scikit-learn")
    if a.observations < 0 or a.samples < 100:
        p.error("need --observations >= 0 (0: train and report the test NLL only) and --samples >= 100")
    torch.set_num_threads(a.threads)
    os.makedirs(a.work, exist_ok=True)
    if os.path.dirname(a.out):
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
    for name in a.problems:
        problem = PROBLEMS[name]()
        for budget in a.budgets:
            for model in a.models:
                key = config_key(name, budget, model, a.seed, a.tag)
                done = [r for r in _read_json(a.out, {"results": []})["results"] if _key_of(r) == key]
                if done and done[0]["observations"] >= a.observations:
                    print(f"[{key}] done: C2ST {done[0]['c2st_mean']}", flush=True)
                    continue
                record = run_config(problem, budget, model, a)
                with _locked(a.out):  # another run may have added its records meanwhile: re-read
                    results = _read_json(a.out, {"results": []})
                    results["results"] = [r for r in results["results"] if _key_of(r) != key] + [record]
                    _write_json(a.out, results)
                npe = record["npe_published"]
                gap = f", KL gap {record['kl_gap']:.4f}" if "kl_gap" in record else ""
                c2 = (f"C2ST {record['c2st_mean']:.3f} +- {record['c2st_std']:.3f} over {a.observations} observations"
                      if a.observations else "no C2ST")
                published = f" (NPE published: {npe})" if npe else ""
                print(f"[{key}] test NLL {record['test_nll_raw']:.4f}{gap}; {c2}{published}", flush=True)


if __name__ == "__main__":
    main()
