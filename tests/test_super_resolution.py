"""Super-resolution application (applications/super_resolution) at a tiny size."""
from __future__ import annotations

import doctest
import gzip
import math
import struct

import pytest
import torch

from applications.super_resolution import config, data, degradation, evaluate, metrics, model, tiles, train
from applications.super_resolution.degradation import bicubic_upsample, downsample, project_consistent, replicate
from applications.super_resolution.metrics import diversity, lr_consistency, psnr, ssim
from applications.super_resolution.model import SRFlow
from applications.super_resolution.tiles import decode_tiled, sample_tiled


def _tiny_model(factor: int = 4, dtype=torch.float32) -> SRFlow:
    torch.manual_seed(0)
    m = SRFlow(channels=1, factor=factor, steps=2, hidden=8, cond_features=4, encoder_hidden=8, encoder_layers=1)
    return m.to(dtype)


def _images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(n, 1, size + 4, size + 4, generator=g), 5, stride=1)
    return smooth


@pytest.mark.parametrize("module", [config, data, degradation, metrics, model, tiles])
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
        config.merge_config({"model": {"factor": 8}, "data": {"patch": 36}})
    with pytest.raises(ValueError, match="unknown key"):
        config.merge_config({"train": {"iteratons": 3}})
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
        pixels = bytes(range(256)) * (n * 28 * 28 // 256) + bytes(n * 28 * 28 % 256)
        payload = struct.pack(">IIII", 0x0803, n, 28, 28) + pixels
        with gzip.open(tmp_path / f"{stem}-images-idx3-ubyte.gz", "wb") as f:
            f.write(payload)
    x = data.load_fashion_mnist("test", root=tmp_path)
    assert x.shape == (3, 1, 28, 28) and float(x.max()) <= 1.0
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.load_fashion_mnist("train", root=tmp_path / "missing")
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    cfg = config.merge_config({"data": {"source": "fashion-mnist"}, "model": {"factor": 8}})
    draw, test = train.build_data(cfg)
    assert draw(4).shape == (4, 1, 32, 32) and test.shape == (3, 1, 32, 32)  # padded 28 -> 32 for 8x


# ---------------------------------------------------------------------------------------------
# end to end
def test_pipeline_end_to_end(tmp_path):
    cfg = config.merge_config({
        "data": {"patch": 16, "test_per_image": 2},
        "model": {"steps": 2, "hidden": 8, "cond_features": 4, "encoder_hidden": 8, "encoder_layers": 1},
        "train": {"batch": 8, "iterations": 6, "log_every": 3, "lr": 1e-3, "checkpoint": str(tmp_path / "m.pt")},
        "eval": {"samples": 3, "batch": 8},
    })
    m, history = train.train(cfg, log=lambda s: None)
    assert len(history) == 2 and all(math.isfinite(h["test_bpd"]) for h in history)
    assert history[-1]["test_bpd"] < history[0]["test_bpd"] + 0.5
    train.save_checkpoint(cfg["train"]["checkpoint"], m, cfg)
    loaded, cfg2 = train.load_checkpoint(cfg["train"]["checkpoint"])
    _, test = train.build_data(cfg2)
    y = downsample(test, 4)
    assert torch.allclose(loaded.log_prob(test, y), m.log_prob(test, y), atol=1e-5)
    result, images = evaluate.evaluate(loaded, test, samples=3, batch=8)
    for key in ("bicubic", "posterior_mean", "single_sample"):
        assert math.isfinite(result[key]["psnr"]) and -1 <= result[key]["ssim"] <= 1
    assert result["posterior_mean"]["lr_consistency"] > 90 and result["bicubic"]["lr_consistency"] < 90
    assert result["diversity"] > 0
    evaluate.save_figure(tmp_path / "fig.png", images, rows=2)
    assert (tmp_path / "fig.png").stat().st_size > 1000
    # the sampling command on an image file, in overlapping tiles
    from applications.super_resolution import sample

    sample.write_png(tmp_path / "hr.png", _images(1, 40)[0, 0])
    assert sample.main([cfg["train"]["checkpoint"], "--hr", str(tmp_path / "hr.png"), "--n", "2", "--tile", "6",
                        "--overlap", "2", "--out", str(tmp_path / "out")]) == 0
    assert sample.read_grey(tmp_path / "out" / "mean.png").shape == (1, 1, 40, 40)
    assert sample.read_grey(tmp_path / "out" / "input.png").shape == (1, 1, 10, 10)


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

    from applications.super_resolution.invnet_checkpoint import InvnetTrainModel, is_invnet_checkpoint
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
    assert model.factor == 4 and model.config["data"]["patch"] == 16
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
