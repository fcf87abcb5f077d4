import threading

import h5py
import numpy as np
import pytest
import torch
import zarr

from invnet.data import (
    BatchLoader,
    Shard,
    ZarrResultWriter,
    chunk_aligned_range,
    compute_normalization,
    data_moments,
    open_array,
    open_pairs,
    train_validation_split,
)


def write_pairs(path, x, y, chunk=4, names=("x", "y")):
    if path.endswith(".h5"):
        with h5py.File(path, "w") as f:
            f.create_dataset(names[0], data=x, chunks=(chunk,) + x.shape[1:])
            f.create_dataset(names[1], data=y, chunks=(chunk,) + y.shape[1:])
    else:
        g = zarr.open_group(path, mode="w")
        for name, a in zip(names, (x, y)):
            g.create_array(name, shape=a.shape, chunks=(chunk,) + a.shape[1:], dtype=a.dtype)[...] = a
    return path


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 2, 6, 6)).astype("f4") * 3 + 1
    y = rng.normal(size=(20, 1, 6, 6)).astype("f4")
    return x, y


@pytest.mark.parametrize("ext", [".h5", ".zarr"])
def test_round_trip_any_order(tmp_path, arrays, ext):
    x, y = arrays
    ds = open_pairs(write_pairs(str(tmp_path / f"d{ext}"), x, y))
    idx = [7, 3, 4, 5, 19, 0]
    xb, yb = ds.read(idx)
    np.testing.assert_array_equal(xb, x[idx])
    np.testing.assert_array_equal(yb, y[idx])
    assert (ds.x_shape, ds.y_shape, len(ds)) == ((2, 6, 6), (1, 6, 6), 20)


@pytest.mark.parametrize("ext", [".h5", ".zarr"])
def test_lazy_reading_never_loads_the_whole_file(tmp_path, ext):
    # a file of 64 samples x 4 KiB = 256 KiB, with a read limit of 20 KiB: a full load fails,
    # streaming statistics and batches work, and each read stays within a few chunks
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 1, 32, 32)).astype("f4")
    y = rng.normal(size=(64, 1, 32, 32)).astype("f4")
    path = write_pairs(str(tmp_path / f"big{ext}"), x, y, chunk=4)
    ds = open_pairs(path, max_read_bytes=20 * 1024)
    with pytest.raises(ValueError, match="max_read_bytes"):
        ds.x.read((slice(None),))
    norm = compute_normalization(ds)
    np.testing.assert_allclose(norm.x_mean, [x.astype(np.float64).mean()], rtol=1e-10)
    np.testing.assert_allclose(norm.x_std, [x.astype(np.float64).std()], rtol=1e-10)
    assert ds.x.bytes_read == x.nbytes and ds.x.reads == 16  # one pass, chunk by chunk
    loader = BatchLoader(ds, range(64), batch_size=4, seed=0)
    before = ds.x.bytes_read
    loader.next_batch()
    assert ds.x.bytes_read - before == 4 * 32 * 32 * 4


def test_random_patches_are_cut_at_the_same_place_and_resume(tmp_path):
    x = np.arange(4 * 1 * 16 * 16, dtype="f4").reshape(4, 1, 16, 16)
    ds = open_pairs(write_pairs(str(tmp_path / "v.h5"), x, x + 0.5, chunk=1), patch=[4, 8])
    loader = BatchLoader(ds, range(4), batch_size=2, seed=3)
    xb, yb = loader.next_batch()
    assert xb.shape == (2, 1, 4, 8)
    assert torch.equal(yb, xb + 0.5)
    state = loader.state_dict()
    a = [loader.next_batch()[0] for _ in range(3)]
    loader.load_state_dict(state)
    b = [loader.next_batch()[0] for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="patch"):
        open_pairs(str(tmp_path / "v.h5"), patch=[32, 4])


def test_split_is_disjoint_and_deterministic():
    tr, va = train_validation_split(50, 0.2, seed=4)
    assert len(va) == 10 and not set(tr) & set(va)
    tr2, va2 = train_validation_split(50, 0.2, seed=4)
    assert (va == va2).all()
    with pytest.raises(ValueError, match="validation_fraction"):
        train_validation_split(50, 1.0)


def test_loader_shards_global_batches_over_ranks(arrays, tmp_path):
    x, y = arrays
    ds = open_pairs(write_pairs(str(tmp_path / "d.h5"), x, y))
    full = BatchLoader(ds, range(20), batch_size=4, seed=1).next_batch()[0]
    parts = [BatchLoader(ds, range(20), batch_size=2, seed=1, shard=Shard(r, 2)).next_batch()[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), full)


@pytest.mark.parametrize("ext", [".h5", ".zarr"])
@pytest.mark.parametrize("patch", [None, [4, 6]])
def test_subdomain_shards_read_only_their_part(tmp_path, ext, patch):
    """Four ranks on a 2 x 2 grid of subdomains (one batch group): each reads a quarter of every
    sample (of y too, on the same grid), the read counters say so, and the quarters assemble into
    the serial batch; a vector y is read whole by every rank."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 2, 8, 6)).astype("f4")
    for y in (rng.normal(size=(20, 1, 8, 6)).astype("f4"), rng.normal(size=(20, 3)).astype("f4")):
        if patch and y.ndim == 2:
            continue  # patches are cut from x and y alike: y must share the grid
        path = write_pairs(str(tmp_path / f"d{y.ndim}{ext}"), x, y)
        serial_ds = open_pairs(path, patch=patch)
        xs, ys = BatchLoader(serial_ds, range(20), batch_size=4, seed=1).next_batch()
        space = tuple(patch or (8, 6))
        quarters = {}
        for cell in [(0, 0), (0, 1), (1, 0), (1, 1)]:
            ds = open_pairs(path, patch=patch)
            xb, yb = BatchLoader(ds, range(20), batch_size=4, seed=1, shard=Shard(0, 1, cell, (2, 2))).next_batch()
            quarters[cell] = xb
            region = (slice(None), slice(None)) + Shard(0, 1, cell, (2, 2)).region(space)
            assert torch.equal(xb, xs[region])
            assert ds.x.bytes_read == xs.numel() * 4 // 4 and ds.x.largest_read <= 4 * 2 * 4 * 3 * 4
            if y.ndim > 2:
                assert torch.equal(yb, ys[region]) and ds.y.bytes_read == ys.numel()  # a quarter of float32
            else:
                assert torch.equal(yb, ys) and ds.y.bytes_read == ys.numel() * 4  # replicated: read whole
        top = torch.cat([quarters[(0, 0)], quarters[(0, 1)]], 3)
        bottom = torch.cat([quarters[(1, 0)], quarters[(1, 1)]], 3)
        assert torch.equal(torch.cat([top, bottom], 2), xs)


def run_as_ranks(n, work):
    """Run ``work(rank, total)`` in ``n`` threads, ``total`` summing a tensor over them (what an
    allreduce does across processes); returns the results in rank order."""
    barrier, slots, results = threading.Barrier(n), [None] * n, [None] * n

    def rank_main(r):
        def total(t):
            slots[r] = t.clone()
            barrier.wait()
            out = sum(slots[k] for k in range(n))
            barrier.wait()
            return out

        results[r] = work(r, total)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_moments_merged_over_shards_equal_the_serial_statistics(tmp_path, arrays):
    """Two batch groups x two subdomains, each reading its part, merge to the serial statistics."""
    x, y = arrays
    ds_path = write_pairs(str(tmp_path / "d.h5"), x, y)
    serial = compute_normalization(open_pairs(ds_path), range(3, 20))

    def work(r, total):
        ds = open_pairs(ds_path)
        moments = data_moments(ds, range(3, 20), shard=Shard(r // 2, 2, (r % 2, 0), (2, 1)))
        moments.sum_over_ranks(total)
        return moments.normalization(), ds.x.bytes_read

    results = run_as_ranks(4, work)
    for norm, _ in results:
        for key in ("x_mean", "x_std", "y_mean", "y_std"):
            np.testing.assert_allclose(getattr(norm, key), getattr(serial, key), rtol=1e-12)
    assert sum(b for _, b in results) == x[3:].nbytes  # every value read once, by one rank


def test_bad_inputs_are_rejected_with_clear_errors(tmp_path, arrays):
    x, y = arrays
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_pairs(str(tmp_path / "missing.h5"))
    p = write_pairs(str(tmp_path / "d.h5"), x, y)
    with pytest.raises(ValueError, match=r"no dataset 'obs'.*\['x', 'y'\]"):
        open_pairs(p, y="obs")
    pz = write_pairs(str(tmp_path / "d.zarr"), x, y)
    with pytest.raises(ValueError, match="no array 'truth'"):
        open_pairs(pz, x="truth")
    with pytest.raises(ValueError, match="same number of samples"):
        open_pairs(write_pairs(str(tmp_path / "count.h5"), x, y[:5]))
    with pytest.raises(ValueError, match="channels"):
        open_pairs(write_pairs(str(tmp_path / "flat.h5"), x.reshape(20, -1)[:, 0], y))
    with pytest.raises(ValueError, match="same space shape"):
        open_pairs(write_pairs(str(tmp_path / "space.h5"), x, y[..., :4]), patch=[2, 2])
    with h5py.File(tmp_path / "dtype.h5", "w") as f:
        f["x"] = np.array([b"a", b"b"])
        f["y"] = np.zeros((2, 1))
    with pytest.raises(ValueError, match="dtype"):
        open_pairs(str(tmp_path / "dtype.h5"))
    bad = x.copy()
    bad[13, 1, 2, 2] = np.nan
    ds = open_pairs(write_pairs(str(tmp_path / "nan.h5"), bad, y))
    with pytest.raises(ValueError, match="NaN or Inf in sample 13"):
        compute_normalization(ds)
    (tmp_path / "file.txt").write_text("not data")
    with pytest.raises(ValueError, match="storage format"):
        open_array(str(tmp_path / "file.txt"), "x")


def test_zarr_writer_regions_are_chunk_aligned(tmp_path):
    path = str(tmp_path / "out.zarr")
    w = ZarrResultWriter.create(path, {"mean": ((10, 1, 4), (3, 1, 4), "f4")})
    # three "ranks" write their own aligned blocks; together they cover everything exactly once
    for rank in range(3):
        lo, hi = chunk_aligned_range(10, 3, rank, 3)
        w.write("mean", lo, np.full((hi - lo, 1, 4), rank, "f4"))
    got = ZarrResultWriter.open(path).read("mean")
    assert not np.isnan(got).any()
    assert got[:, 0, 0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="not aligned"):
        w.write("mean", 1, np.zeros((2, 1, 4)))
    with pytest.raises(ValueError, match="outside"):
        w.write("mean", 9, np.zeros((3, 1, 4)))
    with pytest.raises(ValueError, match="already exists"):
        ZarrResultWriter.create(path, {"mean": ((1,), (1,), "f4")})
