"""Super-resolution application (applications/super_resolution) at a tiny size: metrics, the
model, the data and simulator, training through invnet's trainer (and its equality with the
application's former loop), evaluation and sampling from the run folder."""
from __future__ import annotations

import doctest
import gzip
import json
import math
import struct
import time

import pytest
import torch

from applications.super_resolution import data, degradation, evaluate, metrics, model, tiles
from applications.super_resolution.__main__ import main as train_main
from applications.super_resolution.checkpoints import load_run
from applications.super_resolution.degradation import bicubic_upsample, downsample, project_consistent, replicate
from applications.super_resolution.metrics import diversity, lr_consistency, psnr, ssim
from applications.super_resolution.model import SRFlow
from applications.super_resolution.tiles import decode_tiled, sample_tiled
from invnet.data.simulated import simulation_generator
from invnet.training import read_checkpoint


def _tiny_model(factor: int = 4, dtype=torch.float32) -> SRFlow:
    torch.manual_seed(0)
    m = SRFlow(channels=1, factor=factor, steps=2, hidden=8, cond_features=4, encoder_hidden=8, encoder_layers=1)
    return m.to(dtype)


def _images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(n, 1, size + 4, size + 4, generator=g), 5, stride=1)
    return smooth


@pytest.mark.parametrize("module", [data, degradation, metrics, model, tiles])
def test_doctests(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# metrics on known inputs
def test_psnr_of_known_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 32, 32, generator=g)
    sigma = 0.05
    noise = torch.randn(x.shape, generator=g)
    noise = sigma * noise / noise.flatten(1).pow(2).mean(1).sqrt()[:, None, None, None]  # MSE exactly sigma^2
    expected = 10 * math.log10(1 / sigma**2)
    assert torch.allclose(psnr(x + noise, x), torch.full((3,), expected, dtype=torch.float64), atol=1e-5)
    assert torch.isinf(psnr(x, x)).all()


def test_ssim_orders_by_noise():
    x = _images(2, 32)
    g = torch.Generator().manual_seed(1)
    small = ssim(x + 0.01 * torch.randn(x.shape, generator=g), x)
    large = ssim(x + 0.2 * torch.randn(x.shape, generator=g), x)
    assert (ssim(x, x) == 1).all() and (small < 1).all() and (large < small).all()


def test_lr_consistency_perfect_and_bicubic():
    x = _images(2, 32)
    y = downsample(x, 4)
    assert (lr_consistency(replicate(y, 4), y, 4) > 120).all()  # perfect upsampler: round-off only
    bic = bicubic_upsample(y, 4)
    assert (lr_consistency(bic, y, 4) < 80).all()  # bicubic does not downscale back exactly
    assert (lr_consistency(project_consistent(bic, y, 4), y, 4) > 120).all()


def test_diversity_known():
    a = torch.zeros(1, 2, 1, 3, 3)
    a[0, 1] = 1.0
    b = torch.zeros(1, 2, 1, 3, 3)
    d = diversity(torch.cat([a, b]))
    assert torch.allclose(d, torch.tensor([0.0, math.sqrt(0.5)], dtype=torch.float64))


def test_downsample_is_box_average():
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    y = downsample(x, 4)
    assert y.flatten().tolist() == [x[0, 0, :4, :4].mean().item(), x[0, 0, :4, 4:].mean().item(),
                                    x[0, 0, 4:, :4].mean().item(), x[0, 0, 4:, 4:].mean().item()]


# ---------------------------------------------------------------------------------------------
# bad inputs
def test_bad_inputs_raise_value_errors():
    m = _tiny_model()
    with pytest.raises(ValueError, match="must divide"):
        downsample(torch.zeros(1, 1, 10, 12), 4)
    with pytest.raises(ValueError, match="power of two"):
        downsample(torch.zeros(1, 1, 12, 12), 3)
    with pytest.raises(ValueError, match="must divide"):
        m.log_prob(torch.zeros(1, 1, 18, 16), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="1 channel"):
        m.sample(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="1 channel"):
        m.log_prob(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        m.log_prob(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="temperature"):
        m.sample(torch.zeros(1, 1, 4, 4), temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 8))
    with pytest.raises(ValueError, match="power of two"):
        SRFlow(factor=6)
    with pytest.raises(ValueError, match="divide the patch size"):
        data.check_arguments(factor=8, patch=36)
    with pytest.raises(ValueError, match="source must be one of"):
        data.simulate(2, torch.Generator(), source="mnist")
    with pytest.raises(ValueError, match="overlap"):
        tiles.tile_starts(10, 4, 4)


# ---------------------------------------------------------------------------------------------
# the model
@pytest.mark.parametrize("factor", [4, 8])
def test_samples_are_lr_consistent_and_invertible(factor):
    m = _tiny_model(factor, torch.float64)
    x = _images(3, 2 * factor).double()
    y = downsample(x, factor)
    m.log_prob(x, y)  # initialises ActNorm
    low, details = m.analysis(x)
    assert torch.allclose(low, factor * y, atol=1e-12)
    assert torch.allclose(m.synthesis(low, details), x, atol=1e-12)
    z, _ = m(x, y)
    assert torch.allclose(m.decode(z, y), x, atol=1e-10)
    s = m.sample(y, n=3, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3,) + tuple(x.shape)
    assert (lr_consistency(s.reshape(-1, *x.shape[1:]), y.repeat(3, 1, 1, 1), factor) > 200).all()
    assert diversity(s).min() > 0


def test_log_prob_matches_brute_force_jacobian():
    """log q(x|y) = log N(z) + log|det dz/dd| on the detail coefficients (Haar is orthogonal)."""
    m = _tiny_model(2, torch.float64)
    x = _images(1, 4).double()
    y = downsample(x, 2)
    m.log_prob(x, y)
    for p in m.flow.parameters():  # leave the zero-initialised identity
        p.data.add_(0.1 * torch.randn_like(p))
    c, base = m.condition(y)
    _, d = m.analysis(x)
    jac = torch.autograd.functional.jacobian(lambda r: m.flow(r, c.detach())[0], d - base)
    jac = jac.reshape(d.numel(), d.numel())
    z, logdet = m.flow(d - base, c)
    assert torch.allclose(logdet, torch.linalg.slogdet(jac)[1].reshape(1), atol=1e-9)
    expected = -0.5 * z.pow(2).sum() - 0.5 * z.numel() * math.log(2 * math.pi) + logdet
    assert torch.allclose(m.log_prob(x, y), expected, atol=1e-9)


def test_memory_saving_gradients_match_plain_autograd():
    import invnet

    m = _tiny_model(4, torch.float64)
    x = _images(2, 8).double()
    y = downsample(x, 4)
    m.log_prob(x, y)
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    m.zero_grad()
    m.log_prob(x, y).sum().backward()
    saved = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with invnet.memory_saving(False):
        m.log_prob(x, y).sum().backward()
    for g, p in zip(saved, m.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-10, atol=1e-12)


def test_tiles_cover_whole_image_exactly_and_stay_consistent():
    m = _tiny_model(4, torch.float64)
    x = _images(1, 48).double()
    y = downsample(x, 4)
    m.log_prob(x, y)
    z = torch.randn(m.latent_shape(tuple(y.shape)), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = m.decode(z, y)
    assert torch.allclose(decode_tiled(m, z, y, tile=12, overlap=3), whole, atol=1e-12)  # one tile
    tiled = decode_tiled(m, z, y, tile=6, overlap=2)
    assert (lr_consistency(tiled, y, 4) > 200).all()
    # seams: the tiles see zero padding at their borders, so they differ from the untiled result
    # only a little; far from any tile border (more than the model's reach) they would agree
    assert float(psnr(tiled, whole)) > 30
    s = sample_tiled(m, y, n=2, tile=6, overlap=2, generator=torch.Generator().manual_seed(1))
    assert s.shape == (2, 1, 1, 48, 48)


# ---------------------------------------------------------------------------------------------
# data
def test_patch_sampler_and_fixed_patches():
    imgs = [torch.rand(1, 40, 50), torch.rand(1, 20, 30)]
    s = data.PatchSampler(imgs, 16, seed=0)
    assert s.sample(5).shape == (5, 1, 16, 16)
    a = data.fixed_patches(imgs, 16, 3, seed=2)
    assert torch.equal(a, data.fixed_patches(imgs, 16, 3, seed=2)) and a.shape == (6, 1, 16, 16)
    with pytest.raises(ValueError, match="larger than"):
        data.PatchSampler(imgs, 32)


def test_train_and_test_images_are_disjoint():
    assert not set(data.TRAIN_IMAGES) & set(data.TEST_IMAGES)


def test_fashion_mnist_reader_on_a_generated_idx_file(tmp_path, monkeypatch):
    for stem, n in (("train", 5), ("t10k", 3)):
        pixels = n * 28 * 28
        payload = struct.pack(">IIII", 0x0803, n, 28, 28) + bytes(range(256)) * (pixels // 256) + bytes(pixels % 256)
        with gzip.open(tmp_path / f"{stem}-images-idx3-ubyte.gz", "wb") as f:
            f.write(payload)
    x = data.load_fashion_mnist("test", root=tmp_path)
    assert x.shape == (3, 1, 28, 28) and float(x.max()) <= 1.0
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.load_fashion_mnist("train", root=tmp_path / "missing")
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    data._training_set.cache_clear()  # (read once per process: not the generated files of another test)
    try:
        hr, lr = data.simulate(4, torch.Generator().manual_seed(0), source="fashion-mnist", factor=8)
        assert hr.shape == (4, 1, 32, 32) and lr.shape == (4, 1, 4, 4)  # padded 28 -> 32 for 8x
        assert data.held_out_images(source="fashion-mnist", factor=8).shape == (3, 1, 32, 32)
    finally:
        data._training_set.cache_clear()


def test_simulator_draws_dequantised_images_and_their_exact_inputs():
    g = torch.Generator().manual_seed(3)
    x, y = data.simulate(6, g, patch=16, factor=4)
    clean = data.draw_images(6, torch.Generator().manual_seed(3), patch=16, factor=4)
    assert torch.equal(y, downsample(clean, 4))  # y = D x of the clean image
    noise = x - clean
    assert float(noise.abs().max()) <= 0.5 / 256 + 1e-7 and float(noise.std()) > 0.5 / 256 / 3
    again, _ = data.simulate(6, torch.Generator().manual_seed(3), patch=16, factor=4)
    assert torch.equal(again, x)  # a function of the generator only
    held = data.held_out_images(patch=16, per_image=2)
    assert held.shape == (2 * len(data.TEST_IMAGES), 1, 16, 16)
    assert torch.equal(held, data.held_out_images(patch=16, per_image=2))


# ---------------------------------------------------------------------------------------------
# training through invnet's trainer
TINY = """
[data]
source = "applications.super_resolution.data:simulate"
arguments = {{ source = "skimage", patch = 16, factor = 4 }}

[model]
type = "applications.super_resolution.model:SRFlow"
factor = 4
steps = 2
hidden = 8
cond_features = 4
encoder_hidden = 8
encoder_layers = 1

[optimizer]
name = "Adam"
lr = 1e-3

[scheduler]
name = "CosineAnnealingLR"
T_max = {steps}

[training]
out_dir = "run"
steps = {steps}
batch_size = 8
seed = {seed}
clip_grad_norm = 10.0
log_every = 1
progress = false
device = "cpu"
precision = "{precision}"
"""


def _tiny_config(tmp_path, steps: int = 6, seed: int = 0, precision: str = "float32", name: str = "tiny.toml"):
    path = tmp_path / name
    path.write_text(TINY.format(steps=steps, seed=seed, precision=precision))
    return str(path)


def _former_training_loop(model, draw, total: int, lr: float, grad_clip: float, factor: int,
                          minutes: float = 1e9) -> list[float]:
    """The application's own training loop before it moved onto invnet's trainer (``train.py``'s
    ``train``), kept here only as the reference of the equality test below. Unchanged but for where
    the random numbers come from: ``draw(step)`` gives the clean images of the step and the
    generator of their dequantisation noise (the simulator's per-step stream; the former loop drew
    from one sampler and one noise generator), its data are cast to the model's dtype, and the
    logging and test loss are left out."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    budget_s = 60.0 * minutes
    dtype = next(model.parameters()).dtype
    start = time.perf_counter()
    losses = []
    for step in range(1, total + 1):
        x, noise = draw(step)
        y = downsample(x, factor)
        x_deq = x + (torch.rand(x.shape, generator=noise) - 0.5) / 256.0
        loss = model.bits_per_dim(x_deq.to(dtype), y.to(dtype)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        elapsed = time.perf_counter() - start
        # cosine decay over whichever budget runs out first (steps or wall time)
        progress = min(1.0, max(step / total, elapsed / budget_s))
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * progress))
    return losses


def test_trainer_run_equals_the_former_loop_step_by_step(tmp_path):
    """Instead of retraining the published results: the same seed gives the same loss trajectory
    and weights (float64) through invnet's trainer as through the application's former loop."""
    steps, seed, batch = 5, 3, 8
    assert train_main(["--config", _tiny_config(tmp_path, steps, seed, "float64"), "--validation-images", "0"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    new_losses = [r["train_bpd"] for r in records]
    new_weights = read_checkpoint(str(tmp_path / "run")).weights

    torch.manual_seed(seed)  # the former loop's initialisation
    reference = SRFlow(channels=1, factor=4, steps=2, hidden=8, cond_features=4, encoder_hidden=8,
                       encoder_layers=1).double()
    initial = {k: v.clone() for k, v in reference.state_dict().items()}

    def draw(step: int):
        g = simulation_generator(seed, 0, step - 1)  # the trainer's stream of training batches
        return data.draw_images(batch, g, source="skimage", factor=4, patch=16), g

    old_losses = _former_training_loop(reference, draw, steps, lr=1e-3, grad_clip=10.0, factor=4)
    assert len(new_losses) == steps
    assert torch.allclose(torch.tensor(new_losses), torch.tensor(old_losses), rtol=1e-12, atol=0)
    moved = 0.0
    assert new_weights.keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        if not value.is_floating_point():  # (ActNorm's "initialised" flags)
            assert torch.equal(new_weights[name], value), name
            continue
        assert new_weights[name].dtype == torch.float64
        assert torch.allclose(new_weights[name], value, rtol=0, atol=1e-12), name
        moved = max(moved, float((value - initial[name]).abs().max()))
    assert moved > 1e-3  # the weights did train (the comparison is not of two initialisations)
    assert len(set(old_losses)) == steps


def test_bad_configs_are_refused_before_anything_is_written(tmp_path):
    good = _tiny_config(tmp_path)
    for override, message in (
        ("data.arguments={\"patch\": 18, \"factor\": 4}", "must divide the patch size"),
        ("model.factor=8", "must agree"),
        ("data.arguments={\"source\": \"mnist\"}", "source must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            train_main(["--config", good, "--set", override])
    assert not (tmp_path / "run").exists()
    from applications.super_resolution.__main__ import SOURCE, check_config

    with pytest.raises(ValueError, match="this application trains"):
        check_config({"data": {"source": SOURCE, "arguments": {}}, "model": {"type": "ConditionalGlow"}})


# ---------------------------------------------------------------------------------------------
# end to end
def test_pipeline_end_to_end(tmp_path):
    config = _tiny_config(tmp_path, steps=6)
    assert train_main(["--config", config, "--validation-images", "12", "--set", "training.validate_every=3",
                       "--set", "training.steps=3"]) == 0  # stopped at 3 (the schedule still spans 6)
    assert train_main(["--config", config, "--validation-images", "12", "--set", "training.validate_every=3"]) == 0
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))  # resumed at 3, no step twice
    val = [r["val_bpd"] for r in records if "val_bpd" in r]
    assert len(val) == 2 and all(math.isfinite(v) for v in val) and val[1] < val[0] + 0.5
    loaded, arguments = load_run(str(run))
    assert isinstance(loaded, SRFlow) and arguments == {"source": "skimage", "patch": 16, "factor": 4}
    test = data.held_out_images(**arguments)[:8]
    result, images = evaluate.evaluate(loaded, test, samples=3, batch=8)
    for key in ("bicubic", "posterior_mean", "single_sample"):
        assert math.isfinite(result[key]["psnr"]) and -1 <= result[key]["ssim"] <= 1
    assert result["posterior_mean"]["lr_consistency"] > 90 and result["bicubic"]["lr_consistency"] < 90
    assert result["diversity"] > 0
    evaluate.save_figure(tmp_path / "fig.png", images, rows=2)
    assert (tmp_path / "fig.png").stat().st_size > 1000
    out = tmp_path / "eval"
    assert evaluate.main([str(run), "--images", "4", "--samples", "3", "--tile", "8", "--overlap", "2",
                          "--out", str(out)]) == 0
    metrics_json = json.loads((out / "metrics.json").read_text())
    assert metrics_json["images"] == 4 and math.isfinite(metrics_json["test_bits_per_dim"])
    assert (out / "large.png").stat().st_size > 1000
    # the sampling command on an image file, in overlapping tiles
    from applications.super_resolution import sample

    sample.write_png(tmp_path / "hr.png", _images(1, 40)[0, 0])
    assert sample.main([str(run), "--hr", str(tmp_path / "hr.png"), "--n", "2", "--tile", "6",
                        "--overlap", "2", "--out", str(tmp_path / "out")]) == 0
    assert sample.read_grey(tmp_path / "out" / "mean.png").shape == (1, 1, 40, 40)
    assert sample.read_grey(tmp_path / "out" / "input.png").shape == (1, 1, 10, 10)
    with pytest.raises(ValueError, match="not an invnet run"):
        load_run(str(tmp_path / "hr.png"))


def test_make_pairs_for_invnet_train(tmp_path):
    import h5py

    from applications.super_resolution.make_pairs import write_pairs

    write_pairs(tmp_path / "pairs.h5", n=5, patch=16, factor=4, chunk=2)
    with h5py.File(tmp_path / "pairs.h5", "r") as f:
        x, y = torch.from_numpy(f["x"][:]), torch.from_numpy(f["y"][:])
    assert x.shape == (5, 1, 16, 16) and torch.allclose(downsample(x, 4), y, atol=1e-6)
    with pytest.raises(ValueError, match="divide the patch size"):
        write_pairs(tmp_path / "bad.h5", n=5, patch=18, factor=4)
    assert not (tmp_path / "bad.h5").exists()


def test_evaluate_reads_an_invnet_train_run(tmp_path):
    """The generic path: pairs -> `invnet train` (ConditionalGlow + ImageSummary) -> evaluate.py."""
    import json

    from applications.super_resolution.checkpoints import InvnetTrainModel, is_invnet_checkpoint
    from applications.super_resolution.make_pairs import write_pairs
    from invnet.cli import main as invnet_main

    write_pairs(tmp_path / "pairs.h5", n=48, patch=16, factor=4)
    (tmp_path / "train.toml").write_text(
        '[data]\npath = "pairs.h5"\nx = "x"\ny = "y"\nvalidation_fraction = 0.1\n'
        '[model]\ntype = "ConditionalGlow"\nhidden = 8\nlevels = 2\ndepth = 1\n'
        'summary = { type = "ImageSummary", hidden = 8, out_channels = 4 }\n'
        '[optimizer]\nname = "Adam"\nlr = 1e-3\n'
        '[training]\nout_dir = "run"\nsteps = 3\nbatch_size = 8\nvalidate_every = 3\nlog_every = 1\nprogress = false\n'
    )
    assert invnet_main(["train", str(tmp_path / "train.toml")]) == 0
    run = tmp_path / "run"
    assert is_invnet_checkpoint(str(run)) and not is_invnet_checkpoint(str(tmp_path / "pairs.h5"))
    model = InvnetTrainModel(str(run))
    assert model.factor == 4 and model.data_arguments == {"source": "skimage", "factor": 4, "patch": 16}
    y = downsample(_images(2, 16), 4)
    assert model.sample(y, n=3).shape == (3, 2, 1, 16, 16)
    with pytest.raises(ValueError, match="shape"):
        model.sample(y[:, 0])
    out = tmp_path / "eval"
    assert evaluate.main([str(run), "--images", "4", "--samples", "3", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoint"]["trained_by"] == "invnet train" and metrics["test_bits_per_dim"] is None
    assert metrics["images"] == 4 and math.isfinite(metrics["posterior_mean"]["psnr"])
    assert (out / "patches.png").stat().st_size > 1000
