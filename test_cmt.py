"""Tests of the CMT reference implementation: fid.py and the three training scripts.

Run: python -m pytest -q test_cmt.py   (CPU only; about 9 minutes on 2 cores; the test_cuda_* tests need a GPU)
Every input is generated here; nothing is downloaded and ../shared is never read.
"""

import argparse
import ast
import collections
import concurrent.futures
import contextlib
import copy
import functools
import hashlib
import importlib
import io
import json
import math
import os
import pickle
import random
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import types
import warnings
import zipfile
from pathlib import Path

import PIL.Image
import numpy as np
import pytest
import torch
import torch._dynamo.utils
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT / "experiments"), str(ROOT / "tools")]

import bench_cifar10
import bench_imagenet
import bench_meanflow
import bench_parity
import cmt_cifar10 as cc
import cmt_imagenet as inet
import fid
import gpu_check
import meanflow_post as mf
import plot
import study_ect
import study_meanflow
import study_round2
import train_latent_vgg

torch.set_num_threads(1)  # CI has 2 cores; several tests start worker processes of their own

# The CUDA tests (test_cuda_*, run by tools/gpu_check.py) need a GPU; elsewhere they are skipped with the
# reason "needs CUDA", the suite's only skip. CMT_TEST_CUDA=cpu rehearses them on the CPU (each comparison
# is then CPU against CPU: it proves the test code, not the kernels).
CUDA = torch.device(os.environ.get("CMT_TEST_CUDA", "cuda"))
needs_cuda = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")


def run_script(script, *args, cwd, env=None, timeout=600):
    """Run one of the scripts as a user would, in cwd: (exit code, stdout, stderr)."""
    env = dict({k: v for k, v in os.environ.items() if k != "FID_WEIGHTS"}, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               **(env or {}))
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def folder_bytes(folder):
    """Every file under folder (relative path -> bytes): 'nothing written' means this is unchanged."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# Inputs of the bad-input rows, made in the test's folder (each returns the path it wrote).
def make_pngs(folder, sizes=(8, 8, 8), mode="RGB", labels=None):
    """PNGs img{i}.png of the given square sizes; labels {name: class} go to dataset.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes):
        Image.new(mode, (n, n), 100 + 10 * i).save(folder / f"img{i}.png")
    if labels is not None:
        (folder / "dataset.json").write_text(json.dumps({"labels": [[k, v] for k, v in labels.items()]}))
    return folder


def make_truncated(path):
    """The first half of a real torch.save file: what a crash in a non-atomic write would leave."""
    buf = io.BytesIO()
    torch.save({"ema": {"w": torch.zeros(1000)}}, buf)
    Path(path).write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    return path


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def make_evil(path):
    """A checkpoint whose unpickling would run a shell command (it must never run: no pwned.txt appears)."""
    torch.save({"ema": Evil()}, path)
    return path


def make_ckpt(path, script, stage, config=None, it=3):
    """A stand-in checkpoint with the entries read_checkpoint checks (script, stage, config, iter, ema)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"script": script, "stage": stage, "config": config or {"iters": 10}, "iter": it,
                "ema": {"w": torch.zeros(2)}}, path)
    return path


def bad_init_rows(argv, script, other_script, other_stage):
    """Rows of the bad-input table for `argv + --init FILE`: a truncated file, a plain state dict, another
    script's checkpoint and a malicious pickle."""
    argv = argv + ["--init", "{tmp}/m.pt"]
    return [("init-truncated", argv, lambda t: make_truncated(t / "m.pt"), ["--init", "m.pt", "not a readable checkpoint"]),
            ("init-not-a-checkpoint", argv, lambda t: torch.save({"w": torch.zeros(2)}, t / "m.pt"),
             ["--init", "m.pt", f"not a checkpoint of {script}"]),
            ("init-other-script", argv, lambda t: make_ckpt(t / "m.pt", other_script, other_stage),
             ["--init", f"a checkpoint of {other_script}"]),
            ("init-malicious", argv, lambda t: make_evil(t / "m.pt"), ["--init", "refused", "nothing in it was run"])]


# ==================================================================================================
# fid.py: Inception features, resize modes, statistics, Frechet distance, CLI
# ==================================================================================================

# Rows of the bad-input table (test_bad_input_is_one_line_exit_2_and_writes_nothing, at the end of the file):
# pytest.param(script, argv, setup, expected, id=...): argv and expected items may use {tmp};
# setup(tmp) makes the inputs in the test's folder, which is also the working directory.
def _ref(path, mu, sigma):
    np.savez(path, mu=mu, sigma=sigma)
    return path


BAD_INPUTS_FID = [pytest.param("fid.py", argv, setup, expected, id="fid-" + name) for name, argv, setup, expected in [
    ("unknown-command", ["score"], None, ["invalid choice: 'score'"]),
    ("batch-zero", ["bench", "--batch", "0"], None, ["--batch must be >= 1"]),
    ("images-nchw", ["ref", "--data", "{tmp}/x.npz", "--out", "{tmp}/r.npz"],
     lambda t: np.savez(t / "x.npz", images=np.zeros((4, 3, 8, 8), np.uint8)), ["x.npz", "expected uint8 images [N, H, W, 3]"]),
    ("images-float", ["ref", "--data", "{tmp}/x.npz", "--out", "{tmp}/r.npz"],
     lambda t: np.savez(t / "x.npz", images=np.zeros((4, 8, 8, 3), np.float32)), ["x.npz", "expected uint8 images"]),
    ("out-exists", ["ref", "--data", "{tmp}/x.npz", "--out", "{tmp}/r.npz"],
     lambda t: (np.savez(t / "x.npz", images=np.zeros((4, 8, 8, 3), np.uint8)), _ref(t / "r.npz", np.zeros(3), np.eye(3))),
     ["--out", "r.npz", "already exists"]),
    ("ref-nan", ["calc", "--images", "{tmp}/x.npz", "--ref", "{tmp}/r.npz"],
     lambda t: _ref(t / "r.npz", np.full(3, np.nan), np.eye(3)), ["--ref", "r.npz", "NaN"]),
    ("ref-dimensions", ["calc", "--images", "{tmp}/x.npz", "--ref", "{tmp}/r.npz"],
     lambda t: _ref(t / "r.npz", np.zeros(4), np.eye(5)), ["--ref", "r.npz", "expected mu [D] and sigma [D, D]"]),
    ("ref-not-2048", ["calc", "--images", "{tmp}/x.npz", "--ref", "{tmp}/r.npz"],
     lambda t: _ref(t / "r.npz", np.zeros(5), np.eye(5)), ["--ref", "5-d statistics", "2048"]),
    ("ref-not-npz", ["calc", "--images", "{tmp}/x.npz", "--ref", "{tmp}/r.npz"],
     lambda t: (t / "r.npz").write_text("mu,sigma"), ["--ref", "r.npz", "cannot read"]),
]]


def _child_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("FID_WEIGHTS", None)
    return env


def _random_spd(rng, d, eigs):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * eigs) @ q.T, q


# ----------------------------------------------------------------------------- Frechet distance

def test_frechet_closed_form_diagonal_and_rotated():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    # Commuting covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-10)
    s1, q = _random_spd(rng, d, a)
    s2 = (q * b) @ q.T  # same eigenvectors, rotated away from the axes
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-10)
    # Non-commuting 2x2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M with positive eigenvalues.
    rot = lambda t: np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])  # noqa: E731
    s1 = rot(0.3) @ np.diag([2.0, 0.5]) @ rot(0.3).T
    s2 = rot(1.1) @ np.diag([0.7, 3.0]) @ rot(1.1).T
    m = s1 @ s2
    exact = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    assert fid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(exact, rel=1e-12)
    # The classic sqrtm path agrees on well-conditioned covariances (both float64, ~1e-12 apart).
    s1, s2 = _random_spd(rng, d, a)[0], _random_spd(rng, d, b)[0]
    assert fid.frechet_distance_sqrtm(mu1, s1, mu2, s2) == pytest.approx(
        fid.frechet_distance(mu1, s1, mu2, s2), rel=1e-9)


def _rounding_bound(s, t):
    # Where an eigenvalue of M = S^1/2 T S^1/2 is exactly 0, float64 gives ~eps * |M|; its square
    # root enters the trace term: at most D * sqrt(eps * |M|) in all (x2 in the distance).
    d = len(s)
    return 2 * d * np.sqrt(np.finfo(np.float64).eps * np.linalg.norm(s, 2) * np.linalg.norm(t, 2))


def test_frechet_rank_deficient_and_ill_conditioned():
    rng = np.random.default_rng(1)
    d = 64
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    a[20:], b[40:] = 0, 0  # ranks 20 and 40, as with fewer samples than feature dims
    s1, q = _random_spd(rng, d, a)
    s2 = (q * b) @ q.T
    exact = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    value = fid.frechet_distance(np.zeros(d), s1, np.zeros(d), s2)
    assert np.isfinite(value) and value == pytest.approx(exact, abs=_rounding_bound(s1, s2))
    # Singular and non-commuting: the covariance of 10 samples (rank 9) against itself is 0.
    x = rng.standard_normal((10, d))
    s4 = np.cov(x, rowvar=False)
    assert abs(fid.frechet_distance(np.zeros(d), s4, np.zeros(d), s4)) < _rounding_bound(s4, s4)
    # Ill-conditioned (eigenvalues over 6 decades), non-commuting, with a known answer: for
    # T = S^-1/2 Q D Q^T S^-1/2, S T is similar to Q D Q^T, so tr (S T)^1/2 = sum sqrt(D). (Building
    # T in float64 perturbs M by ~eps * cond(S) ~ 1e-10, far below min(D) = 1e-4: rel 1e-9 holds.)
    eigs = np.logspace(0, -6, d)
    s3, q3 = _random_spd(rng, d, eigs)
    inv_root = (q3 / np.sqrt(eigs)) @ q3.T
    dd = np.logspace(0.5, -4, d)
    t3 = inv_root @ _random_spd(rng, d, dd)[0] @ inv_root
    t3 = (t3 + t3.T) / 2
    assert fid.trace_sqrt_product(s3, t3) == pytest.approx(np.sqrt(dd).sum(), rel=1e-9)
    assert fid.frechet_distance_sqrtm(np.zeros(d), s3, np.zeros(d), t3) == pytest.approx(
        fid.frechet_distance(np.zeros(d), s3, np.zeros(d), t3), rel=1e-9)
    for s, t in ((s3, s4), (s4, s3)):  # singular against ill-conditioned: finite, real, >= 0
        value = fid.frechet_distance(np.zeros(d), s, np.zeros(d), t)
        assert np.isfinite(value) and value > -_rounding_bound(s, t)


def test_frechet_rejects_mismatched_or_nonfinite():
    with pytest.raises(ValueError, match="dimension mismatch"):
        fid.frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"sigma1 \[D, D\]"):
        fid.frechet_distance(np.zeros(4), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(np.zeros(2), np.array([[1, 0], [0, np.nan]]), np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------- streaming statistics

@pytest.mark.parametrize("batch", [1, 3, 7, 50, 1000])
def test_streaming_stats_equal_np_cov(batch):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((123, 10)) * rng.uniform(0.1, 5, 10) + rng.uniform(-3, 3, 10)
    x = x.astype(np.float32)  # features arrive as float32; the sums are float64
    stats = fid.FeatureStats(10)
    for start in range(0, len(x), batch):
        stats.update(torch.from_numpy(x[start:start + batch]))
    x = x.astype(np.float64)
    mu, sigma = stats.mean_cov()
    # float64 sums of 123 O(10) values: agreement to ~1e-13 relative.
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert stats.n == 123


def test_mean_cov_identical_sets_give_zero():
    x = np.random.default_rng(3).integers(0, 256, (300, 48)).astype(np.uint8)
    mu, sigma = fid.mean_cov(x)
    # outer-sum minus n mu mu^T cancels terms of size mean^2 ~ 1.6e4: absolute error ~ 1e-16 * 1.6e4.
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=0, atol=1e-9)
    assert abs(fid.frechet_distance(mu, sigma, *fid.mean_cov(x.copy()))) < 1e-8 * np.trace(sigma)
    with pytest.raises(ValueError, match="at least 2"):
        fid.mean_cov(x[:1])


def test_ref_roundtrip_and_foreign_files(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(5), _random_spd(rng, 5, rng.uniform(1, 2, 5))[0]
    fid.save_ref(tmp_path / "ref.npz", mu, sigma)
    with np.load(tmp_path / "ref.npz") as f:
        assert sorted(f.files) == ["mu", "sigma"]  # EDM's layout exactly
    mu2, sigma2 = fid.load_ref(tmp_path / "ref.npz")
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    # ADM's reference files carry extra keys (spatial statistics, activations): ignored.
    np.savez(tmp_path / "adm.npz", mu=mu.astype(np.float32), sigma=sigma, mu_s=mu, sigma_s=sigma)
    assert fid.load_ref(tmp_path / "adm.npz")[0].dtype == np.float64
    # EDM2's reference files are pickles {"num_images": int, "fid": {"mu", "sigma"}, "fd_dinov2": {...}}
    # (its calculate_metrics.py), written by numpy 1.x: names numpy.core.*, where numpy 2 writes numpy._core.*.
    edm2 = {"num_images": 50000, "fid": {"mu": mu, "sigma": sigma}, "fd_dinov2": {"mu": mu[:2], "sigma": sigma[:2, :2]}}
    for protocol in (2, 4, 5):
        (tmp_path / "edm2.pkl").write_bytes(pickle.dumps(edm2, protocol=protocol))
        np.testing.assert_array_equal(fid.load_ref(tmp_path / "edm2.pkl")[1], sigma)
    raw = pickle.dumps(edm2, protocol=2)  # protocol 2: module names as plain text (GLOBAL opcodes)
    for name in (b"numpy.core.multiarray", b"numpy._core.multiarray"):
        variant = raw.replace(b"cnumpy._core.multiarray\n", b"c" + name + b"\n").replace(
            b"cnumpy.core.multiarray\n", b"c" + name + b"\n")
        assert b"c" + name + b"\n_reconstruct\n" in variant
        (tmp_path / "edm2.pkl").write_bytes(variant)
        mu2, sigma2 = fid.load_ref(tmp_path / "edm2.pkl")
        np.testing.assert_array_equal(mu2, mu)
        np.testing.assert_array_equal(sigma2, sigma)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"fid": {"mu": mu, "sigma": sigma, "x": os.system}}, f)  # a global: refused
    with pytest.raises(ValueError, match="refusing to unpickle"):
        fid.load_ref(tmp_path / "evil.pkl")
    np.savez(tmp_path / "bad.npz", mean=mu, cov=sigma)
    with pytest.raises(ValueError, match="expected keys 'mu' and 'sigma'"):
        fid.load_ref(tmp_path / "bad.npz")


# ----------------------------------------------------------------------------- network

# Names and shapes copied from pytorch-fid's state_dict (566 tensors, in this order).
REFERENCE_KEYS = {
    0: ("Conv2d_1a_3x3.conv.weight", [32, 3, 3, 3]),
    5: ("Conv2d_1a_3x3.bn.num_batches_tracked", []),
    30: ("Mixed_5b.branch1x1.conv.weight", [64, 192, 1, 1]),
    66: ("Mixed_5b.branch_pool.conv.weight", [32, 192, 1, 1]),
    192: ("Mixed_6b.branch7x7_2.conv.weight", [128, 128, 1, 7]),
    450: ("Mixed_7a.branch7x7x3_4.conv.weight", [192, 192, 3, 3]),
    534: ("Mixed_7c.branch3x3dbl_1.conv.weight", [448, 2048, 1, 1]),
    562: ("Mixed_7c.branch_pool.bn.running_var", [192]),
    564: ("fc.weight", [1008, 2048]),
    565: ("fc.bias", [1008]),
}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A random-weight file in the official layout (FID values meaningless, protocol identical)."""
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(fid.random_inception(seed=0).state_dict(), path)
    return path


def test_state_dict_layout_loads_strictly(weights_file, tmp_path):
    state = fid.InceptionV3().state_dict()
    keys = list(state)
    assert len(keys) == 566
    for i, (name, shape) in REFERENCE_KEYS.items():
        assert keys[i] == name and list(state[name].shape) == shape
    assert state["Conv2d_1a_3x3.bn.num_batches_tracked"].dtype == torch.int64
    # The whole layout: this is the `sha256sum` of ../shared/ref/keys/pytorch_fid_inception.txt, the
    # key list built from pytorch-fid's FIDInceptionA/C/E network (one "name<TAB>shape<TAB>dtype"
    # line per tensor, in order). Tests may not read ../shared, so its digest is pinned here.
    listing = "".join(f"{k}\t{list(v.shape)}\t{v.dtype}\n" for k, v in state.items())
    assert hashlib.sha256(listing.encode()).hexdigest() == \
        "27dd36ee3db4c3a51a399f94d6c708d5d233e35d5aebb187ee55a8dd7369d1c5"
    saved = torch.load(weights_file, weights_only=True)  # the random file written by the fixture
    net = fid.load_inception(weights_file)  # strict=True inside
    for name, shape in REFERENCE_KEYS.values():
        assert torch.equal(net.state_dict()[name], saved[name]) and list(saved[name].shape) == shape
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="pytorch-fid's Inception layout"):
        fid.load_inception(tmp_path / "other.pth")


def test_network_gives_2048_features(weights_file):
    net = fid.load_inception(weights_file)
    assert not net.official and net.weights_name == "random_inception.pth"
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.inference_mode():
        features = net(fid.preprocess(images))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert features.std() > 0  # the random network does not collapse to a constant


def test_batchnorm_folding_and_pool_quirks():
    torch.manual_seed(0)
    block = fid.BasicConv2d(5, 7, 3, padding=1).eval()
    block.bn.running_mean.normal_()
    block.bn.running_var.uniform_(0.5, 2)
    block.bn.weight.data.normal_()
    block.bn.bias.data.normal_()
    x = torch.randn(2, 5, 9, 9)
    reference = F.relu(block.bn(block.conv(x)))  # eval-mode BatchNorm, eps 1e-3
    assert block.bn.eps == 1e-3
    torch.testing.assert_close(block(x), reference, rtol=1e-5, atol=1e-5)
    # TF average pooling ignores padding: a constant image stays constant at the border.
    ones = torch.ones(1, 1, 4, 4)
    torch.testing.assert_close(fid.avg_pool_3x3(ones), ones)
    assert fid.InceptionV3().Mixed_7b.pool == "avg" and fid.InceptionV3().Mixed_7c.pool == "max"


# ----------------------------------------------------------------------------- resize

def _bilinear_numpy(img, src_y, src_x):
    """Bilinear sampling of img [C, H, W] at source coordinates (floor/floor+1, clamped)."""
    h, w = img.shape[1:]
    y0 = np.floor(src_y).astype(int)
    x0 = np.floor(src_x).astype(int)
    fy, fx = (src_y - y0)[:, None], (src_x - x0)[None, :]
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    y0, x0 = np.minimum(y0, h - 1), np.minimum(x0, w - 1)
    g = lambda ys, xs: img[:, ys][:, :, xs]  # noqa: E731
    return ((1 - fy) * (1 - fx) * g(y0, x0) + (1 - fy) * fx * g(y0, x1)
            + fy * (1 - fx) * g(y1, x0) + fy * fx * g(y1, x1))


@pytest.mark.parametrize("size", [(7, 5), (32, 32), (320, 310)])
def test_resize_modes_match_numpy(size):
    h, w = size
    images = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h))
    j = np.arange(299, dtype=np.float64)
    for mode in fid.RESIZE_MODES:
        out = fid.preprocess(images, mode)
        assert out.shape == (2, 3, 299, 299) and out.dtype == torch.float32
        for n in range(2):
            img = images[n].numpy().astype(np.float64)
            if mode == "tf1":  # source pixel j * W / 299, no half-pixel offset; (x - 128) / 128
                expected = (_bilinear_numpy(img, j * h / 299, j * w / 299) - 128) / 128
            else:  # half-pixel centres, negative source clamped to 0; 2 x - 1 on [0, 1]
                sy = np.maximum((j + 0.5) * h / 299 - 0.5, 0)
                sx = np.maximum((j + 0.5) * w / 299 - 0.5, 0)
                expected = 2 * _bilinear_numpy(img / 255, sy, sx) - 1
            # tf1: float32 lerp of values <= 255, error ~1e-7. pytorch-fid: PyTorch computes the
            # source coordinate in float32 (error ~300 * 6e-8 px) and the output changes by up to
            # 2 per px, so ~4e-5; allow 2e-4.
            tol = 1e-5 if mode == "tf1" else 2e-4
            np.testing.assert_allclose(out[n].numpy(), expected, rtol=0, atol=tol)
    # tf1 is what the TorchScript detector of EDM/StyleGAN does with affine_grid + grid_sample
    # (align_corners=False, border padding, grid shifted by 1/W - 1/299); float32 grid coordinates
    # put ~1e-5 px of error on outputs that change by up to 2 per px: allow 1e-4.
    theta = torch.eye(2, 3).repeat(2, 1, 1)
    theta[:, 0, 2] += 1 / w - 1 / 299
    theta[:, 1, 2] += 1 / h - 1 / 299
    grid = F.affine_grid(theta, [2, 3, 299, 299], align_corners=False)
    sampled = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    torch.testing.assert_close(fid.preprocess(images, "tf1"), (sampled - 128) / 128, rtol=0, atol=1e-4)
    same = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    torch.testing.assert_close(fid.preprocess(same, "tf1"), (same.float() - 128) / 128)  # identity at 299


# ----------------------------------------------------------------------------- inputs

def _write_pngs(folder, n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        sub = folder / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(image).save(sub / f"{i:05d}.png")
    return images


def test_inputs_folder_npz_zip_cifar(tmp_path):
    images = _write_pngs(tmp_path / "pngs", 5)
    folder = fid.open_images(tmp_path / "pngs")
    # Sorted relative paths: class0/00000, class0/00002, class0/00004, class1/00001, class1/00003.
    np.testing.assert_array_equal(folder[3], images[1].transpose(2, 0, 1))
    # JPEG (any case of the extension) at any depth; other files are skipped.
    (tmp_path / "mixed" / "a" / "b").mkdir(parents=True)
    PIL.Image.fromarray(images[0]).save(tmp_path / "mixed" / "a" / "b" / "photo.JPG", format="JPEG")
    PIL.Image.fromarray(images[1]).save(tmp_path / "mixed" / "z.jpeg", format="JPEG")
    (tmp_path / "mixed" / "notes.txt").write_text("not an image")
    mixed = fid.open_images(tmp_path / "mixed")
    assert mixed.names == ["a/b/photo.JPG", "z.jpeg"]
    with PIL.Image.open(tmp_path / "mixed" / "a" / "b" / "photo.JPG") as im:
        np.testing.assert_array_equal(mixed[0], np.asarray(im.convert("RGB")).transpose(2, 0, 1))
    np.savez(tmp_path / "samples.npz", images=images, labels=np.arange(5))
    np.savez(tmp_path / "single.npz", x=images)
    np.savez_compressed(tmp_path / "compressed.npz", images=images)
    for name in ("samples.npz", "single.npz", "compressed.npz"):
        ds = fid.open_images(tmp_path / name)
        assert len(ds) == 5
        np.testing.assert_array_equal(ds[4], images[4].transpose(2, 0, 1))
        np.testing.assert_array_equal(ds[1], images[1].transpose(2, 0, 1))
    np.savez(tmp_path / "gray.npz", images=images[..., :1])  # [N, H, W, 1]: repeated to RGB
    np.testing.assert_array_equal(fid.open_images(tmp_path / "gray.npz")[2],
                                  np.repeat(images[2, :, :, :1], 3, axis=2).transpose(2, 0, 1))
    with zipfile.ZipFile(tmp_path / "dataset.zip", "w") as z:
        for i, image in enumerate(images):
            buf = io.BytesIO()
            PIL.Image.fromarray(image).save(buf, format="PNG")
            z.writestr(f"00000/img{i:08d}.png", buf.getvalue())
        z.writestr("dataset.json", '{"labels": null}')
    ds = fid.open_images(tmp_path / "dataset.zip")
    np.testing.assert_array_equal(np.stack([ds[i] for i in range(5)]), images.transpose(0, 3, 1, 2))
    # CIFAR-10 python tarball: 5 pickled batches (protocol 2, as in the official file).
    data = np.random.default_rng(5).integers(0, 256, (5, 4, 3072), dtype=np.uint8)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        for i in range(5):
            blob = pickle.dumps({b"data": data[i], b"labels": [0, 1, 2, 3]}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{i + 1}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    ds = fid.open_images(tmp_path / "cifar-10-python.tar.gz")
    assert len(ds) == 20
    np.testing.assert_array_equal(ds[6], data[1, 2].reshape(3, 32, 32))


def test_fid_pattern_of_npz_files_is_one_dataset_in_file_order(tmp_path):
    """cmt_imagenet.py's torchrun sample stage writes one samples-<tag>-rankRofW.npz per rank: a quoted pattern
    reads them as one dataset (files in sorted order) and gives the batches the concatenated file gives."""
    images = np.random.default_rng(3).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    for r, part in enumerate((images[:3], images[3:5], images[5:])):
        np.savez(tmp_path / f"samples-2step-rank{r}of3.npz", images=part)
    np.savez(tmp_path / "all.npz", images=images)
    PIL.Image.fromarray(images[0]).save(tmp_path / "samples-2step.png")  # the grid beside them is not matched
    ds, whole = fid.open_images(str(tmp_path / "samples-2step-rank*of3.npz")), fid.open_images(tmp_path / "all.npz")
    assert len(ds) == 7
    for num in (None, 5):  # every image, and EDM's seeded subset
        idx = fid.select_indices(7, num, seed=1)
        got, want = (list(fid.image_batches(d, idx, batch=2)) for d in (ds, whole))
        assert len(got) == len(want) and all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="matched nothing"):
        fid.open_images(str(tmp_path / "none-*.npz"))
    with pytest.raises(ValueError, match=r"\.npz files only"):
        fid.open_images(str(tmp_path / "samples-2step*"))
    np.savez(tmp_path / "mixed-0.npz", images=images[:2])
    np.savez(tmp_path / "mixed-1.npz", images=np.zeros((2, 9, 9, 3), np.uint8))
    with pytest.raises(ValueError, match="different sizes"):
        fid.open_images(str(tmp_path / "mixed-?.npz"))


def test_cifar_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:
        blob = pickle.dumps({b"data": Evil()}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        fid.open_images(tmp_path / "evil.tar.gz")


def test_fid_bad_inputs_give_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PNG/JPG images found"):
        fid.open_images(tmp_path / "empty")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=r"bad\.png: cannot read image"):
        fid.open_images(tmp_path / "corrupt")[0]
    np.savez(tmp_path / "nchw.npz", images=np.zeros((4, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"expected uint8 images \[N, H, W, 3\]"):
        fid.open_images(tmp_path / "nchw.npz")
    np.savez(tmp_path / "float.npz", images=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        fid.open_images(tmp_path / "float.npz")
    np.savez(tmp_path / "two.npz", a=np.zeros(1), b=np.zeros(1))
    with pytest.raises(ValueError, match="'images' or a single array"):
        fid.open_images(tmp_path / "two.npz")
    with pytest.raises(ValueError, match="different sizes"):
        fid._stack([np.zeros((3, 8, 8), np.uint8), np.zeros((3, 9, 8), np.uint8)])
    with pytest.raises(ValueError, match="--num 9: only 5 images"):
        fid.select_indices(5, 9)


def test_subset_selection_is_edm_rule():
    a = fid.select_indices(100, 10, seed=7)
    assert np.array_equal(a, fid.select_indices(100, 10, seed=7)) and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, fid.select_indices(100, 10, seed=8))
    idx = np.arange(100)
    np.random.RandomState(7).shuffle(idx)
    assert np.array_equal(a, np.sort(idx[:10]))
    assert np.array_equal(fid.select_indices(100), np.arange(100))


# ----------------------------------------------------------------------------- weights

def test_weights_download_verified_and_offline_error(tmp_path, monkeypatch):
    source = tmp_path / "source.pth"
    source.write_bytes(b"weights" * 1000)
    url = source.as_uri()  # file:// stands in for the release URL on this offline machine
    good = fid.sha256_file(source)
    with pytest.raises(RuntimeError, match="has sha256"):
        fid.download(url, tmp_path / "cache" / "w.pth", "0" * 64)
    assert not (tmp_path / "cache" / "w.pth").exists() and list((tmp_path / "cache").iterdir()) == []
    fid.download(url, tmp_path / "cache" / "w.pth", good)
    assert (tmp_path / "cache" / "w.pth").read_bytes() == source.read_bytes()
    monkeypatch.delenv("FID_WEIGHTS", raising=False)
    monkeypatch.setenv("CMT_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(RuntimeError, match="--weights PATH, set FID_WEIGHTS"):
        fid.resolve_weights(url=(tmp_path / "nowhere.pth").as_uri())
    with pytest.raises(FileNotFoundError, match="--weights"):
        fid.resolve_weights(tmp_path / "nowhere.pth")
    monkeypatch.setenv("FID_WEIGHTS", str(source))
    assert fid.resolve_weights() == source


def test_weights_cache_filled_once_and_corrupt_cache_refused(weights_file, tmp_path, monkeypatch):
    # The random-weight file plays the release file: its digest stands in for the official one.
    monkeypatch.setattr(fid, "WEIGHTS_SHA256", fid.sha256_file(weights_file))
    monkeypatch.delenv("FID_WEIGHTS", raising=False)
    monkeypatch.setenv("CMT_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / fid.WEIGHTS_FILE
    assert fid.resolve_weights(url=weights_file.as_uri()) == cached
    assert cached.read_bytes() == weights_file.read_bytes()
    assert fid.resolve_weights(url=(tmp_path / "gone.pth").as_uri()) == cached  # no second download
    fid._load_inception.cache_clear()
    try:
        net = fid.load_inception()
        assert net.weights_name == fid.WEIGHTS_FILE and net.official
        cached.write_bytes(b"truncated download")
        fid._load_inception.cache_clear()
        with pytest.raises(RuntimeError, match="is corrupt .* delete it"):
            fid.load_inception()
    finally:
        fid._load_inception.cache_clear()  # the entries above depend on the patched digest


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def png_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pngs")
    _write_pngs(root / "data", 4, size=8, seed=1)
    _write_pngs(root / "samples", 3, size=8, seed=2)
    return root


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_child_env(),
                          cwd=ROOT, timeout=300)


def test_cli_help_ref_calc(png_folders, weights_file, tmp_path):
    out = _run(str(ROOT / "fid.py"), "--help")
    assert out.returncode == 0 and "calc" in out.stdout and "bench" in out.stdout
    ref = tmp_path / "ref.npz"
    out = _run(str(ROOT / "fid.py"), "ref", "--data", str(png_folders / "data"), "--out", str(ref),
               "--weights", str(weights_file), "--batch", "4")
    assert out.returncode == 0, out.stderr
    assert "4 images (all)" in out.stdout and "resize tf1" in out.stdout and "FID from only 4 images" in out.stderr
    mu, sigma = fid.load_ref(ref)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    out = _run(str(ROOT / "fid.py"), "calc", "--images", str(png_folders / "samples"), "--ref", str(ref),
               "--weights", str(weights_file), "--resize", "pytorch-fid", "--num", "2", "--seed", "1")
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("FID "))
    for part in ("random_inception.pth (NOT the official weights)", "resize pytorch-fid",
                 "2 images (subset seed 1)", f"ref {ref}"):
        assert part in line
    assert float(line.split()[1]) > 0
    out = _run(str(ROOT / "fid.py"), "calc", "--images", str(tmp_path / "empty"), "--ref", str(ref))
    assert out.returncode != 0 and "no such file or folder" in out.stderr
    out = _run(str(ROOT / "fid.py"), "bench", "--batch", "1", "--iters", "1", "--res", "8")
    assert out.returncode == 0, out.stderr
    last = out.stdout.splitlines()[-1].split()  # "[bench] X img/s (median of 1 batches, best X)"
    assert "random weights" in out.stdout and last[2] == "img/s" and float(last[1]) > 0


def test_inception_stats_two_processes_equal_one(png_folders, weights_file, tmp_path):
    two = _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "fid.py"),
               "ref", "--data", str(png_folders / "data"), "--weights", str(weights_file), "--batch", "1",
               "--out", str(tmp_path / "two.npz"))
    assert two.returncode == 0, two.stderr
    assert "2 process(es)" in two.stdout
    ds = fid.open_images(png_folders / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the children: oneDNN's float32 kernels depend on the threads
    try:
        one = fid.inception_stats([torch.tensor(ds[i][None]) for i in range(len(ds))], weights=weights_file)
    finally:
        torch.set_num_threads(threads)
    (mu1, s1), (mu2, s2) = one[:2], fid.load_ref(tmp_path / "two.npz")
    # Batches of one image everywhere, so identical float32 features; only the order of the float64
    # sums differs (~1e-16 relative).
    np.testing.assert_allclose(mu2, mu1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s2, s1, rtol=1e-10, atol=1e-12)


def test_inception_stats_in_process_api(png_folders, weights_file):
    ds = fid.open_images(png_folders / "data")
    batches = [torch.from_numpy(np.stack([ds[i] for i in range(j, j + 2)])) for j in (0, 2)]
    with pytest.warns(UserWarning, match="FID from only 3 images"):
        mu, sigma, n = fid.inception_stats(batches, weights=weights_file, num=3)
    assert n == 3 and mu.shape == (2048,) and sigma.dtype == np.float64
    with pytest.raises(ValueError, match="uint8"):
        fid.inception_stats([batches[0].float()], weights=weights_file)


def test_progress_line_reports_rate_and_eta(png_folders, weights_file, monkeypatch, capsys):
    monkeypatch.setattr(fid, "LOG_EVERY_S", 0.0)  # a line per batch instead of one per 10 s
    ds = fid.open_images(png_folders / "data")
    batches = fid.image_batches(ds, np.arange(len(ds)), batch=1)
    with pytest.warns(UserWarning, match="FID from only 4 images"):
        fid.inception_stats(batches, weights=weights_file, total=4, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[fid] 1/4 img (25.0%) | ") and " img/s | ETA " in lines[0]
    assert float(lines[0].split(" | ")[1].split()[0]) > 0
    assert lines[-1].startswith("[fid] 4/4 img (100.0%) | ") and " img/s | done in " in lines[-1]


def test_cli_errors_name_the_file(png_folders, weights_file, tmp_path, capsys):
    def error(*argv):
        with pytest.raises(SystemExit) as e:
            fid.main([*argv, "--weights", str(weights_file)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        return err
    fid.save_ref(tmp_path / "small.npz", np.zeros(5), np.eye(5))
    message = error("calc", "--images", str(png_folders / "samples"), "--ref", str(tmp_path / "small.npz"))
    assert message.startswith("fid.py calc: error: --ref") and "5-d statistics" in message
    (tmp_path / "corrupt").mkdir()
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "corrupt" / "good.png")
    (tmp_path / "corrupt" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    message = error("ref", "--data", str(tmp_path / "corrupt"), "--out", str(tmp_path / "r.npz"))
    assert "bad.png: cannot read image" in message and not (tmp_path / "r.npz").exists()
    np.savez(tmp_path / "nchw.npz", images=np.zeros((4, 3, 8, 8), np.uint8))
    message = error("calc", "--images", str(tmp_path / "nchw.npz"), "--ref", str(tmp_path / "small.npz"))
    assert "--ref" in message  # the reference is checked first: no features computed for nothing
    message = error("ref", "--data", str(tmp_path / "nchw.npz"), "--out", str(tmp_path / "r.npz"))
    assert "nchw.npz: expected uint8 images [N, H, W, 3]" in message
    (tmp_path / "empty").mkdir()
    message = error("ref", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r.npz"))
    assert "empty: no PNG/JPG images found" in message


# ==================================================================================================
# official EDM/EDM2 pickles: restricted unpickler, downloads, copy by name (the section pasted into cmt_cifar10.py and cmt_imagenet.py)
# ==================================================================================================

PKL_MODULES = ["cmt_cifar10", "cmt_imagenet"]  # the scripts that carry this section verbatim


@pytest.fixture(params=PKL_MODULES)
def pkl(request):
    return importlib.import_module(request.param)


# Each script is self-contained, so plumbing that two scripts need is pasted into both, between the lines
# `# >>> pasted: NAME` and `# <<< pasted: NAME` in the script's appendix (after the method, before the
# `if __name__ == "__main__":` guard). The tests of each block run on every copy (PKL_MODULES, VAE_MODULES).
# The run-folders section (ArgumentParser, read_checkpoint, ..., check_outdir) is pasted into all three scripts
# between the same markers but stays in place, before the training loop (it is part of the method's flow); its
# tests are every script's rows of the bad-input table (test_bad_input_is_one_line_exit_2_and_writes_nothing),
# among them outdir-is-a-file (check_outdir) and resume-other-stage (read_checkpoint, check_resume).
PASTED = {"official-pkl": ["cmt_cifar10.py", "cmt_imagenet.py"], "sd-vae": ["cmt_imagenet.py", "meanflow_post.py"],
          "run-folders": ["cmt_cifar10.py", "cmt_imagenet.py", "meanflow_post.py"]}
PASTED_MIN_LINES = {"official-pkl": 200, "sd-vae": 200, "run-folders": 80}  # the whole section, not an empty pair of markers
SCRIPTS = ["cmt_cifar10.py", "cmt_imagenet.py", "meanflow_post.py"]


def pasted_block(script, name):
    """The bytes between the two marker lines of block `name` in `script`; each marker stands exactly once."""
    lines = (ROOT / script).read_bytes().splitlines(keepends=True)
    begin, end = f"# >>> pasted: {name}\n".encode(), f"# <<< pasted: {name}\n".encode()
    assert (lines.count(begin), lines.count(end)) == (1, 1), f"{script}: markers of '{name}' not exactly once each"
    i, j = lines.index(begin), lines.index(end)
    assert i < j, f"{script}: '{name}' ends before it begins"
    assert j < lines.index(b'if __name__ == "__main__":\n'), f"{script}: '{name}' is not before the __main__ guard"
    return b"".join(lines[i + 1:j])


@pytest.mark.parametrize("name", PASTED)
def test_pasted_blocks_stay_copies(name):
    """Copies stay copies: the scripts that carry a block hold it byte for byte, the others hold no marker of it,
    and the tests of the block run on every copy."""
    first, *others = [pasted_block(script, name) for script in PASTED[name]]
    assert len(first.splitlines()) > PASTED_MIN_LINES[name]
    for script, block in zip(PASTED[name][1:], others):
        assert block == first, f"'{name}' in {script} differs from {PASTED[name][0]}: paste the edited copy into every copy"
    for script in SCRIPTS:
        text = (ROOT / script).read_text()
        names = re.findall(r"^# (?:>>>|<<<) pasted: (\S+)$", text, flags=re.M)
        assert set(names) <= set(PASTED), f"{script}: marker of an unknown block {set(names) - set(PASTED)}"
        assert (name in names) == (script in PASTED[name]), f"{script}: marker of '{name}' found: {name in names}"
    run_folder_rows = [[p.values[0] for p in BAD_INPUTS_CIFAR + BAD_INPUTS_IMAGENET + BAD_INPUTS_MEANFLOW
                        if p.id.endswith("-" + row)] for row in ("outdir-is-a-file", "resume-other-stage")]
    tested = {"official-pkl": PKL_MODULES, "sd-vae": VAE_MODULES,
              "run-folders": [s[:-3] for s in SCRIPTS if all(s in scripts for scripts in run_folder_rows)]}
    assert tested[name] == [s[:-3] for s in PASTED[name]]


# One vocabulary: the three scripts share conventions, not code, so a concept has one flag and one helper name in
# each of them, with one meaning. Retired names must not come back as aliases.
SHARED_FLAGS = {"--stage", "--preset", "--outdir", "--data", "--teacher", "--init", "--resume", "--batch", "--batch-gpu",
                "--iters", "--mimg", "--lr", "--ema", "--seed", "--teacher-steps", "--traj-buffer", "--fid-ref", "--num",
                "--sample-steps", "--eval-num", "--bf16", "--no-bf16", "--tf32", "--no-tf32", "--compile", "--no-compile",
                "--ckpt-every", "--snap-every", "--sample-every", "--grid", "--log-every", "--max-nonfinite",
                "--skip-nonfinite"}
SHARED_HELPERS = ["ArgumentParser", "read_checkpoint", "run_fields", "config_diff", "check_resume", "check_outdir",
                  "init_distributed", "write_atomic", "rng_state", "set_rng_state", "format_duration", "int_at_least",
                  "step_counts", "build_parser", "parse_args", "resolve_config", "sample_fewstep", "run_sample", "main"]
RETIRED_FLAGS = {"--cmt-steps", "--nfe", "--num-eval"}
RETIRED_HELPERS = ["dist_setup", "setup_dist", "save_atomic", "write_text_atomic", "save_checkpoint", "fmt_time",
                   "format_eta", "sample_stage", "write_samples", "cmt_sigmas", "karras_sigmas", "center_crop_dhariwal",
                   "_int_list", "_numpy_state", "_python_state", "CMT_STEPS"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_share_one_vocabulary(script):
    mod = importlib.import_module(script[:-3])
    parser = mod.build_parser()
    flags = {s for action in parser._actions for s in action.option_strings}
    assert SHARED_FLAGS <= flags, SHARED_FLAGS - flags
    assert not flags & RETIRED_FLAGS
    for name in SHARED_HELPERS:
        assert callable(getattr(mod, name)), name
    for name in RETIRED_HELPERS:
        assert not hasattr(mod, name), name
    rank, world, device = mod.init_distributed()  # the same return convention everywhere
    assert (rank, world) == (0, 1) and isinstance(device, torch.device)
    # the same meanings: switches off, a step-count list, --grid images (0 = none), the config keys of the flags
    cfg = mod.resolve_config(mod.parse_args(["--preset", "tiny", "--stage", "mid", "--sample-steps", "1,2",
                                             "--grid", "0", "--eval-num", "7", "--teacher-steps", "4"]))
    assert not any(cfg[k] for k in ("bf16", "tf32", "compile")), cfg
    assert (cfg["sample_steps"], cfg["grid"], cfg["eval_num"], cfg["teacher_steps"]) == ([1, 2], 0, 7, 4)
    assert mod.resolve_config(mod.parse_args(["--preset", "tiny", "--stage", "mid", "--tf32"]))["tf32"]
    assert mod.format_duration(3725) == "1h02m" and mod.format_duration(65) == "1m05s"
    with pytest.raises(SystemExit, match="--sample-steps"):
        mod.parse_args(["--sample-steps", "1,0"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_tf32_is_off_unless_asked_and_sets_both_switches(script, tmp_path):
    """--tf32/--no-tf32, off by default: main() sets cuBLAS's and cuDNN's TF32 switches from it, both ways (PyTorch's
    own default lets cuDNN convolutions run in TF32, which an fp32 run must not), before the stage runs."""
    mod = importlib.import_module(script[:-3])
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for flags, want in (([], False), (["--tf32"], True), (["--tf32", "--no-tf32"], False)):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not want
            with pytest.raises(SystemExit, match="--init .*no such file"):  # a sample stage with nothing to sample
                mod.main(["--preset", "tiny", "--stage", "sample", "--init", str(tmp_path / "none.pt"),
                          "--outdir", str(tmp_path / "s"), *flags])
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (want, want), flags
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("script", ["cmt_cifar10.py", "cmt_imagenet.py"])
def test_cudnn_benchmark_is_off_unless_asked(script, tmp_path):
    """--cudnn-benchmark/--no-cudnn-benchmark (the two U-Net scripts), off by default: main() sets cuDNN's switch
    from it both ways before the stage runs; a resume may change it (a speed switch)."""
    mod = importlib.import_module(script[:-3])
    old = torch.backends.cudnn.benchmark
    try:
        for flags, want in (([], False), (["--cudnn-benchmark"], True), (["--cudnn-benchmark", "--no-cudnn-benchmark"], False)):
            torch.backends.cudnn.benchmark = not want
            with pytest.raises(SystemExit, match="--init .*no such file"):  # a sample stage with nothing to sample
                mod.main(["--preset", "tiny", "--stage", "sample", "--init", str(tmp_path / "none.pt"),
                          "--outdir", str(tmp_path / "s"), *flags])
            assert torch.backends.cudnn.benchmark == want, flags
    finally:
        torch.backends.cudnn.benchmark = old
    assert "cudnn_benchmark" in mod.RESUME_MAY_CHANGE


# ----------------------------------------------------------------------------- fake official modules
def pkl_fake_reconstruct(meta):  # pickled by reference only; loading must never call it
    raise AssertionError("the real reconstruct function must never run")


pkl_fake_reconstruct.__module__ = "torch_utils.persistence"
pkl_fake_reconstruct.__name__ = pkl_fake_reconstruct.__qualname__ = "_reconstruct_persistent_obj"


class PklEasyDict(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


PklEasyDict.__module__, PklEasyDict.__name__, PklEasyDict.__qualname__ = "dnnlib.util", "EasyDict", "EasyDict"
PKL_FAKE_MODULES = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")
# How the fakes pickle: module_src is set per test to a marker writer; torch1 mimics torch 1.x state dicts.
PKL_PICKLING = {"module_src": "raise RuntimeError('module_src must never run')", "torch1": False}


@contextlib.contextmanager
def pkl_fake_official_modules(reconstruct=None, easydict=None):
    """torch_utils.persistence / dnnlib.util exist only while pickling (as on a machine with EDM/EDM2)."""
    mods = {name: types.ModuleType(name) for name in PKL_FAKE_MODULES}
    mods["torch_utils.persistence"]._reconstruct_persistent_obj = reconstruct or pkl_fake_reconstruct
    mods["torch_utils"].persistence = mods["torch_utils.persistence"]
    mods["dnnlib.util"].EasyDict = easydict or PklEasyDict
    mods["dnnlib"].util = mods["dnnlib.util"]
    assert not any(name in sys.modules for name in PKL_FAKE_MODULES)
    sys.modules.update(mods)
    try:
        yield
    finally:
        for name in PKL_FAKE_MODULES:
            del sys.modules[name]


def pkl_persistent(cls):
    """What torch_utils.persistence.persistent_class does to a class, minus the source capture."""
    class Decorator(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if PKL_PICKLING["torch1"] and isinstance(self, torch.nn.Module):  # torch 1.x kept OrderedDicts
                fields[2] = {k: collections.OrderedDict(v) if k in ("_parameters", "_buffers", "_modules") else v
                             for k, v in fields[2].items()}
            meta = dict(type="class", version=6, module_src=PKL_PICKLING["module_src"],
                        class_name=cls.__name__.removeprefix("Pkl"), state=fields[2])
            return (pkl_fake_reconstruct, (meta,), None)

    Decorator.__name__ = Decorator.__qualname__ = cls.__name__
    return Decorator


# ----------------------------------------------------------------------------- toy EDM networks
@pkl_persistent
class PklLinear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.randn(out_features)) if bias else None


@pkl_persistent
class PklConv2d(torch.nn.Module):
    def __init__(self, cin, cout, down=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = torch.nn.Parameter(torch.randn(cout))
        self.register_buffer("resample_filter", torch.ones(1, 1, 2, 2) / 4 if down else None)  # None like EDM
        self.register_buffer("cache", torch.randn(4), persistent=False)


@pkl_persistent
class PklSongUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=8,
                 channel_mult=(1, 2), dropout=0.1, embedding_type="positional"):
        super().__init__()
        self.map_augment = PklLinear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = PklLinear(model_channels, 4 * model_channels)
        self.map_label = None
        self.enc = torch.nn.ModuleDict()
        self.enc["8x8_conv"] = PklConv2d(in_channels, model_channels)
        self.enc["4x4_down"] = PklConv2d(model_channels, model_channels * channel_mult[1], down=True)
        self.dec = torch.nn.ModuleDict()
        self.dec["8x8_aux_conv"] = PklConv2d(model_channels, out_channels)
        self.dropout = dropout
        self.skip_scale = np.sqrt(0.5)  # numpy scalars in module state, as in EDM's UNetBlock


@pkl_persistent
class PklEDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="SongUNet", **model_kwargs):
        super().__init__()
        self.sigma_data, self.sigma_max = sigma_data, sigma_max
        self.model = PklSongUNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                              label_dim=label_dim, **model_kwargs)


@pkl_persistent
class PklEDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data


@pkl_persistent
class PklAugmentPipe:
    def __init__(self, p=0.12):
        self.p = float(p)


PKL_EDM_KWARGS = dict(model_type="SongUNet", embedding_type="positional", model_channels=8, channel_mult=[1, 2],
                  augment_dim=9, dropout=0.13, use_fp16=False, img_resolution=8, img_channels=3, label_dim=0)


def pkl_make_edm(augment_dim=9):
    torch.manual_seed(0)
    return PklEDMPrecond(**dict(PKL_EDM_KWARGS, augment_dim=augment_dim)).eval().requires_grad_(False)


def pkl_write_edm(path, net, **extra):
    data = dict(ema=net, loss_fn=PklEDMLoss(), augment_pipe=PklAugmentPipe(), **extra,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip", xflip=False))
    with pkl_fake_official_modules(), open(path, "wb") as f:
        pickle.dump(data, f)  # the official training_loop uses the default protocol
    return path


# ----------------------------------------------------------------------------- toy EDM2 networks
@pkl_persistent
class PklMPFourier(torch.nn.Module):
    def __init__(self, num_channels):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels))
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))


@pkl_persistent
class PklMPConv(torch.nn.Module):
    def __init__(self, cin, cout, kernel):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(cout, cin, *kernel))


@pkl_persistent
class PklBlock(torch.nn.Module):
    def __init__(self, cin, cout, emb):
        super().__init__()
        self.emb_gain = torch.nn.Parameter(torch.randn([]))
        self.conv_res0 = PklMPConv(cin, cout, [3, 3])
        self.emb_linear = PklMPConv(emb, cout, [])
        self.conv_skip = PklMPConv(cin, cout, [1, 1]) if cin != cout else None
        self.register_buffer("counter", torch.arange(3))  # an integer buffer keeps its dtype


@pkl_persistent
class PklUNet(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, model_channels=8, channel_mult=(1, 2), **block_kwargs):
        super().__init__()
        c = [model_channels * x for x in channel_mult]
        self.out_gain = torch.nn.Parameter(torch.randn([]))
        self.emb_fourier = PklMPFourier(c[0])
        self.emb_noise = PklMPConv(c[0], max(c), [])
        self.emb_label = PklMPConv(label_dim, max(c), []) if label_dim else None
        self.enc = torch.nn.ModuleDict({"8x8_conv": PklMPConv(img_channels + 1, c[0], [3, 3]),
                                        "8x8_block0": PklBlock(c[0], c[1], max(c))})
        self.dec = torch.nn.ModuleDict({"8x8_block0": PklBlock(c[1], c[1], max(c))})


@pkl_persistent
class PklPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, use_fp16=True, sigma_data=0.5, logvar_channels=16,
                 **unet_kwargs):
        super().__init__()
        self.unet = PklUNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                            **unet_kwargs)
        self.logvar_fourier = PklMPFourier(logvar_channels)
        self.logvar_linear = PklMPConv(logvar_channels, 1, [])


@pkl_persistent
class PklStabilityVAEEncoder:
    def __init__(self, raw_mean=(5.81, 3.25, 0.12, -2.15), raw_std=(4.17, 4.62, 3.71, 3.28), final_std=0.5):
        self.scale = np.float32(final_std) / np.float32(raw_std)  # numpy arrays, as in EDM2's encoders.py
        self.bias = -np.float32(raw_mean) * self.scale
        self.final_std = np.float32(final_std)  # a numpy scalar
        self._vae = None


PKL_EDM2_KWARGS = dict(model_channels=8, dropout=0.0, use_fp16=True, img_resolution=8, img_channels=4, label_dim=10)


def pkl_make_edm2(dtype=torch.float16):
    torch.manual_seed(1)
    return PklPrecond(**PKL_EDM2_KWARGS).eval().requires_grad_(False).to(dtype)


def pkl_write_edm2(path, net):
    dataset_kwargs = PklEasyDict(class_name="training.dataset.ImageFolderDataset", path="sd.zip", use_labels=True)
    loss_fn = PklEDMLoss(P_mean=-0.4, P_std=1.0)
    data = PklEasyDict(encoder=PklStabilityVAEEncoder(), dataset_kwargs=dataset_kwargs, loss_fn=loss_fn)
    data.ema = net  # as EDM2's training_loop: ema added last
    with pkl_fake_official_modules(), open(path, "wb") as f:
        pickle.dump(data, f)
    return path


@pytest.fixture
def pkl_marker(tmp_path):
    """A file that any executed payload (or module_src) would create; it must never appear."""
    path = tmp_path / "pwned"
    PKL_PICKLING["module_src"] = f"open({str(path)!r}, 'w').write('module_src ran')\n"
    yield path
    PKL_PICKLING.update(module_src="raise RuntimeError('module_src must never run')", torch1=False)


def pkl_bits(t):
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16}.get(t.dtype, t.dtype))


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("torch1", [False, True])
def test_pkl_edm_pickle_loads_exactly(pkl, tmp_path, pkl_marker, torch1):
    PKL_PICKLING["torch1"] = torch1
    net = pkl_make_edm()
    path = pkl_write_edm(tmp_path / "edm.pkl", net)
    assert not any(name in sys.modules for name in PKL_FAKE_MODULES)
    sd, init_kwargs, class_name = pkl.load_official_pkl(str(path))
    ref = net.state_dict()
    assert list(sd) == list(ref)  # same names, same order as module.state_dict()
    assert "model.map_augment.weight" in sd and "model.enc.4x4_down.resample_filter" in sd
    assert "model.enc.8x8_conv.resample_filter" not in sd  # a None buffer
    assert not any(k.endswith(".cache") for k in sd)  # non-persistent buffers are excluded
    assert any(k.endswith(".cache") for k, _ in net.named_buffers())
    for k in ref:
        assert sd[k].dtype == torch.float32 and torch.equal(pkl_bits(sd[k]), pkl_bits(ref[k])), k
    assert init_kwargs == PKL_EDM_KWARGS
    assert class_name == "EDMPrecond"
    state = pkl._pkl_unpickle(str(path))["ema"].state
    assert type(state["_parameters"]) is (collections.OrderedDict if torch1 else dict)
    assert not pkl_marker.exists() and not any(name in sys.modules for name in PKL_FAKE_MODULES)


def test_pkl_edm2_pickle_float16_to_float32(pkl, tmp_path, pkl_marker):
    net = pkl_make_edm2()
    path = pkl_write_edm2(tmp_path / "edm2.pkl", net)
    sd, init_kwargs, class_name = pkl.load_official_pkl(str(path))
    ref = net.state_dict()
    assert list(sd) == list(ref)
    assert "unet.enc.8x8_block0.conv_skip.weight" in sd and "unet.dec.8x8_block0.conv_skip.weight" not in sd
    for k in ref:
        if ref[k].is_floating_point():
            assert ref[k].dtype == torch.float16 and sd[k].dtype == torch.float32, k
            assert torch.equal(pkl_bits(sd[k].half()), pkl_bits(ref[k])), k  # float16 -> float32 is exact
        else:
            assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k
    assert init_kwargs == PKL_EDM2_KWARGS
    assert class_name == "Precond"
    enc = pkl._pkl_unpickle(str(path))["encoder"]  # numpy arrays and scalars come back intact
    np.testing.assert_array_equal(enc.state["scale"], PklStabilityVAEEncoder().scale)
    assert enc.state["scale"].dtype == np.float32 and enc.state["final_std"] == np.float32(0.5)
    assert not pkl_marker.exists()


def test_pkl_numpy_core_and_numpy_underscore_core_names(pkl, tmp_path):
    data = dict(a=np.arange(6, dtype=np.float32).reshape(2, 3), s=np.float64(0.25), i=np.int64(7))
    raw = pickle.dumps(data, protocol=3)  # protocol 3: names as text (GLOBAL), no length-prefixed frames
    assert b"cnumpy._core.multiarray\n" in raw or b"cnumpy.core.multiarray\n" in raw
    for name in (b"numpy._core.multiarray", b"numpy.core.multiarray"):
        variant = raw.replace(b"cnumpy._core.multiarray\n", b"c" + name + b"\n").replace(
            b"cnumpy.core.multiarray\n", b"c" + name + b"\n")
        (tmp_path / "np.pkl").write_bytes(variant)
        out = pkl._pkl_unpickle(str(tmp_path / "np.pkl"))
        np.testing.assert_array_equal(out["a"], data["a"])
        assert out["a"].dtype == np.float32 and out["s"] == 0.25 and out["i"] == 7


def test_pkl_missing_key_lists_available(pkl, tmp_path):
    path = pkl_write_edm(tmp_path / "edm.pkl", pkl_make_edm())
    with pytest.raises(ValueError, match="no key 'net'") as e:
        pkl.load_official_pkl(str(path), key="net")
    for k in ("ema", "loss_fn", "augment_pipe", "dataset_kwargs"):
        assert k in str(e.value)
    with pytest.raises(ValueError, match="not a torch module .*EDMLoss"):
        pkl.load_official_pkl(str(path), key="loss_fn")


def test_pkl_bad_files(pkl, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        pkl.load_official_pkl(str(tmp_path / "nope.pkl"))
    for seed in range(64):  # garbage, bare and behind a pickle protocol-4 header: always the same clear error
        junk = random.Random(seed).randbytes(64)
        (tmp_path / "junk.pkl").write_bytes(junk if seed % 2 else b"\x80\x04" + junk)
        with pytest.raises(ValueError, match="junk.pkl is not a readable EDM/EDM2 pickle"):
            pkl.load_official_pkl(str(tmp_path / "junk.pkl"))
    torch.save({"model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="zip"):
        pkl.load_official_pkl(str(tmp_path / "ckpt.pt"))
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(dict(ema=torch.nn.Linear(2, 2))))  # harmless but not official
    with pytest.raises(pickle.UnpicklingError, match=r"torch\.nn\.modules\.linear\.Linear"):
        pkl.load_official_pkl(str(tmp_path / "plain.pkl"))


# ----------------------------------------------------------------------------- refused payloads
class PklPayload:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def pkl_payloads(marker):
    touch = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    return {
        f"{os.system.__module__}.system": PklPayload(os.system, (f"touch '{marker}'",)),
        "builtins.eval": PklPayload(eval, (f"open({str(marker)!r}, 'w')",)),
        "subprocess.Popen": PklPayload(subprocess.Popen, (touch,)),
        "subprocess.check_output": PklPayload(subprocess.check_output, (touch,)),
    }


def test_pkl_payloads_are_live(tmp_path):
    """Control: with a plain pickle.load each payload really creates its marker (so the test below means something)."""
    for i, name in enumerate(pkl_payloads(tmp_path / "x")):
        marker = tmp_path / f"live{i}"
        obj = pickle.loads(pickle.dumps(pkl_payloads(marker)[name]))
        if isinstance(obj, subprocess.Popen):
            obj.wait()
        assert marker.exists(), name


@pytest.mark.parametrize("name", [f"{os.system.__module__}.system", "builtins.eval", "subprocess.Popen",
                                  "subprocess.check_output"])
def test_pkl_refuses_code_execution(pkl, tmp_path, pkl_marker, name):
    payload = pkl_payloads(pkl_marker)[name]
    net = pkl_make_edm()
    net.model.evil = payload  # hidden deep inside a persistent object's state
    path = pkl_write_edm(tmp_path / "evil.pkl", net)
    (tmp_path / "bare.pkl").write_bytes(pickle.dumps(payload))
    for p in (path, tmp_path / "bare.pkl"):
        with pytest.raises(pickle.UnpicklingError, match=name.replace(".", r"\.")):
            pkl.load_official_pkl(str(p))
    assert not pkl_marker.exists()


def test_pkl_refuses_protocol0_os_system_and_evil_storage_blob(pkl, tmp_path, pkl_marker):
    (tmp_path / "p0.pkl").write_bytes(b"cos\nsystem\n(S'touch " + str(pkl_marker).encode() + b"'\ntR.")
    with pytest.raises(pickle.UnpicklingError, match=r"os\.system"):
        pkl.load_official_pkl(str(tmp_path / "p0.pkl"))
    buf = io.BytesIO()  # a storage blob is itself a legacy torch.save pickle: it must load weights-only
    torch.save(pkl_payloads(pkl_marker)["builtins.eval"], buf, _use_new_zipfile_serialization=False)
    (tmp_path / "blob.pkl").write_bytes(pickle.dumps(PklPayload(torch.storage._load_from_bytes, (buf.getvalue(),))))
    with pytest.raises(pickle.UnpicklingError, match=r"storage blob was refused .*GLOBAL eval"):
        pkl.load_official_pkl(str(tmp_path / "blob.pkl"))
    assert not pkl_marker.exists()


# ----------------------------------------------------------------------------- download
def test_pkl_download_file_url(pkl, tmp_path):
    src = tmp_path / "src" / "teacher.pkl"
    src.parent.mkdir()
    src.write_bytes(os.urandom(3000))
    sha, md5 = hashlib.sha256(src.read_bytes()).hexdigest(), hashlib.md5(src.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="hash mismatch"):
        pkl.download(src.as_uri(), str(cache), sha256="0" * 64)
    assert not cache.exists() or not list(cache.iterdir())  # nothing left behind, not even the temp file
    path = pkl.download(src.as_uri(), str(cache), sha256=sha.upper(), md5=md5)
    assert Path(path) == cache / "teacher.pkl" and Path(path).read_bytes() == src.read_bytes()
    src.unlink()  # a verified cached copy is reused without touching the URL
    assert pkl.download(src.as_uri(), str(cache), sha256=sha) == path
    assert sorted(p.name for p in cache.iterdir()) == ["teacher.pkl"]


def test_pkl_download_offline_errors(pkl, tmp_path):
    for url in ((tmp_path / "missing.pkl").as_uri(), "http://127.0.0.1:9/edm.pkl"):
        with pytest.raises(OSError, match="cannot download .*--teacher"):
            pkl.download(url, str(tmp_path / "cache"))
    with pytest.raises(OSError, match="pass its path with --data"):
        pkl.download((tmp_path / "missing.tar.gz").as_uri(), str(tmp_path / "cache"), flag="--data")
    assert not list((tmp_path / "cache").iterdir())


def test_pkl_load_official_pkl_from_url(pkl, tmp_path):
    net = pkl_make_edm()
    path = pkl_write_edm(tmp_path / "edm.pkl", net)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    sd, _, _ = pkl.load_official_pkl(path.as_uri(), cache_dir=str(tmp_path / "cache"), sha256=sha)
    assert (tmp_path / "cache" / "edm.pkl").is_file() and list(sd) == list(net.state_dict())


# ----------------------------------------------------------------------------- init kwargs and copy
def test_pkl_check_init_kwargs(pkl):
    recorded = dict(model_type="SongUNet", model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13)
    pkl.check_init_kwargs(recorded, dict(model_type="SongUNet", model_channels=128, channel_mult=(2, 2, 2)), "edm.pkl")
    pkl.check_init_kwargs(recorded, dict(num_blocks=4), "edm.pkl", defaults=dict(num_blocks=4))  # official default
    with pytest.raises(ValueError) as e:
        pkl.check_init_kwargs(recorded, dict(model_channels=192, channel_mult=[1, 2, 2, 2], model_type="SongUNet",
                                           num_blocks=4), "edm.pkl")
    msg = str(e.value)
    assert "model_channels: edm.pkl has 128, this model has 192" in msg
    assert "channel_mult: edm.pkl has [2, 2, 2], this model has [1, 2, 2, 2]" in msg
    assert "num_blocks: edm.pkl has <not recorded>, this model has 4" in msg and "model_type" not in msg


def test_pkl_copy_by_name(pkl, tmp_path):
    teacher = pkl_make_edm(augment_dim=9)
    sd, _, _ = pkl.load_official_pkl(str(pkl_write_edm(tmp_path / "edm.pkl", teacher)))
    torch.manual_seed(123)
    student = pkl_make_edm(augment_dim=0)
    for p in student.parameters():
        p.data.normal_()
    assert pkl.copy_by_name(sd, student) == ["model.map_augment.weight"]
    for k, v in student.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # the same network without the preconditioning wrapper, through prefix_map
    bare = pkl_make_edm(augment_dim=0).model
    pkl.copy_by_name(sd, bare, prefix_map={"model.": ""})
    assert torch.equal(bare.map_layer0.weight, sd["model.map_layer0.weight"])
    # EDM2: the logvar head is teacher-only
    t2 = pkl_make_edm2()
    sd2, _, _ = pkl.load_official_pkl(str(pkl_write_edm2(tmp_path / "edm2.pkl", t2)))
    s2 = pkl_make_edm2(torch.float32)
    del s2.logvar_fourier, s2.logvar_linear
    for p in s2.parameters():
        p.data.normal_()
    skipped = pkl.copy_by_name(sd2, s2)
    assert sorted(skipped) == ["logvar_fourier.freqs", "logvar_fourier.phases", "logvar_linear.weight"]
    assert torch.equal(s2.unet.out_gain, sd2["unet.out_gain"])
    # clear errors for anything else
    broken = {k: v for k, v in sd.items() if k != "model.map_layer0.bias"}
    broken["model.extra.weight"] = torch.zeros(1)
    broken["model.map_layer0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as e:
        pkl.copy_by_name(broken, student)
    msg = str(e.value)
    assert "missing in checkpoint (1): model.map_layer0.bias" in msg
    assert "unexpected in checkpoint (1): model.extra.weight" in msg
    assert "model.map_layer0.weight: checkpoint (3, 3) vs model (32, 8)" in msg


# ==================================================================================================
# SD-VAE (the section pasted into cmt_imagenet.py and meanflow_post.py)
# ==================================================================================================

VAE_MODULES = ["cmt_imagenet", "meanflow_post"]  # the scripts that carry this section verbatim

# Facts copied from the diffusers AutoencoderKL key list of stabilityai/sd-vae-ft-mse
# (diffusers 0.42.1): 248 tensors, 83,653,863 parameters, these names and shapes in this order.
VAE_NUM_KEYS = 248
VAE_NUM_PARAMS = 83_653_863
VAE_FIRST_KEYS = ["encoder.conv_in.weight", "encoder.conv_in.bias",
                  "encoder.down_blocks.0.resnets.0.norm1.weight"]
VAE_SHAPES = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down_blocks.0.downsamplers.0.conv.weight": (128, 128, 3, 3),
    "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
    "encoder.mid_block.attentions.0.to_q.weight": (512, 512),
    "encoder.mid_block.attentions.0.to_out.0.bias": (512,),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.up_blocks.0.resnets.2.conv2.weight": (512, 512, 3, 3),
    "decoder.up_blocks.2.resnets.0.conv_shortcut.weight": (256, 512, 1, 1),
    "decoder.up_blocks.2.upsamplers.0.conv.weight": (256, 256, 3, 3),
    "decoder.up_blocks.3.resnets.2.conv2.weight": (128, 128, 3, 3),
    "decoder.mid_block.attentions.0.group_norm.weight": (512,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
}
VAE_LAST_KEYS = ["quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias"]
ATTN_WEIGHTS = [f"{p}.mid_block.attentions.0.{n}.weight" for p in ("encoder", "decoder")
                for n in ("to_q", "to_k", "to_v", "to_out.0")]


@pytest.fixture(params=VAE_MODULES, scope="module")
def mod(request):
    return importlib.import_module(request.param)


def random_vae_weights(mod):
    """Random weights in the diffusers layout from numpy's legacy RandomState (its stream is frozen
    across numpy versions, so the golden values below stay valid), scaled so that the forward pass
    stays O(1): norm affines near 1, conv/linear weights with variance 1/fan-in, biases 0.1."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in mod.AutoencoderKL().state_dict().items()}
    total = sum(int(np.prod(s)) for s in shapes.values())
    flat = (np.random.RandomState(0).random_sample(total).astype(np.float32) * 2 - 1) * np.float32(np.sqrt(3))
    out, i = {}, 0
    for k, s in shapes.items():
        n = int(np.prod(s))
        t = torch.from_numpy(flat[i:i + n]).reshape(s)
        i += n
        if "norm" in k and k.endswith("weight"):
            t = 1 + 0.1 * t
        elif len(s) > 1:
            t = t / float(np.sqrt(np.prod(s[1:])))
        else:
            t = 0.1 * t
        out[k] = t
    return out


_WEIGHTS = {}


@pytest.fixture(scope="module")
def weights(mod):
    # generated once per session: every module in VAE_MODULES has the same layout (test_vae_layout checks it)
    if not _WEIGHTS:
        _WEIGHTS.update(random_vae_weights(mod))
    return _WEIGHTS


def golden_input():
    return torch.from_numpy(np.random.RandomState(1).random_sample((2, 3, 16, 24)).astype(np.float32) * 2 - 1)


def write_safetensors(path, tensors, dtypes=None):
    """Minimal independent writer: 8-byte little-endian header length, JSON header (padded with spaces
    to a multiple of 8, with a __metadata__ entry as the official writer adds), raw little-endian data."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        dt = (dtypes or {}).get(name, "F32")
        if dt == "BF16":
            raw = t.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
        else:
            raw = t.numpy().astype({"F32": "<f4", "F16": "<f2"}[dt]).tobytes()
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for b in blobs:
            f.write(b)


def test_vae_layout(mod):
    with torch.device("meta"):
        sd = mod.AutoencoderKL().state_dict()
    keys = list(sd)
    assert len(keys) == VAE_NUM_KEYS
    assert sum(v.numel() for v in sd.values()) == VAE_NUM_PARAMS
    assert keys[:3] == VAE_FIRST_KEYS and keys[-4:] == VAE_LAST_KEYS
    for k, s in VAE_SHAPES.items():
        assert tuple(sd[k].shape) == s, k


def test_vae_safetensors_mixed_dtypes_load_strictly(mod, weights, tmp_path):
    # F16 for most tensors (halves the file), BF16 for the attention weights, F32 for the rest of the
    # encoder's first block: every dtype path is exercised on real layer names.
    names = list(weights)
    dtypes = {k: "F16" for k in names[len(names) // 4:]}
    dtypes.update({k: "BF16" for k in ATTN_WEIGHTS})
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    write_safetensors(path, weights, dtypes)

    raw = mod.read_safetensors(path)
    assert list(raw) == names
    assert raw[names[0]].dtype == torch.float32 and raw[names[-1]].dtype == torch.float16
    assert raw[ATTN_WEIGHTS[0]].dtype == torch.bfloat16

    vae = mod.load_vae(tmp_path)  # the folder, as in the Hugging Face repo layout
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    sd = vae.state_dict()
    for k, t in weights.items():
        want = {"F16": torch.float16, "BF16": torch.bfloat16}.get(dtypes.get(k), torch.float32)
        # exact: the file holds t rounded to its dtype, and widening to float32 is exact
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], t.to(want).float()), k


def test_vae_bin_with_old_attention_names_and_1x1_convs(mod, weights, tmp_path):
    old = {}
    for k, t in weights.items():
        for new_name, old_name in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
        old[k] = t[:, :, None, None] if k.endswith(("query.weight", "key.weight", "proj_attn.weight")) else t
    assert sum(".query." in k for k in old) == 4 and old["encoder.mid_block.attentions.0.key.weight"].ndim == 4
    path = tmp_path / "old.bin"
    torch.save({k: t.half() for k, t in old.items()}, path)  # fp16 keeps the file small; load casts to fp32
    sd = mod.load_vae(path).state_dict()
    for k, t in weights.items():
        assert torch.equal(sd[k], t.half().float()), k


def test_vae_load_errors(mod, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        mod.load_vae(tmp_path / "nowhere.safetensors")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        mod.load_vae(tmp_path)  # a folder without weights
    (tmp_path / "vae.onnx").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="unknown VAE weight format"):
        mod.load_vae(tmp_path / "vae.onnx")
    torch.save({"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3), "decoder.extra.weight": torch.zeros(1)},
               tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"247 missing keys.*conv_in\.bias.*1 unexpected keys.*decoder\.extra"):
        mod.load_vae(tmp_path / "bad.pt")
    torch.save({"encoder.down.0.block.0.norm1.weight": torch.ones(128)}, tmp_path / "ldm.pth")
    with pytest.raises(ValueError, match="CompVis/LDM layout"):
        mod.load_vae(tmp_path / "ldm.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.bin")
    with pytest.raises(ValueError, match="flat state_dict"):
        mod.load_vae(tmp_path / "list.bin")

    # Every key present (zero tensors expanded from one element keep the file tiny), one shape wrong:
    # a 1x1-conv shape is reshaped only for the attention linears; anywhere else it is a shape error.
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in mod.AutoencoderKL().state_dict().items()}
    wrong = {k: torch.zeros(1).expand(s) for k, s in shapes.items()}
    wrong["decoder.conv_out.bias"] = torch.zeros(1).expand(3, 1, 1, 1)
    torch.save(wrong, tmp_path / "wrong.bin")
    with pytest.raises(ValueError, match=r"wrong shape.*decoder\.conv_out\.bias"):
        mod.load_vae(tmp_path / "wrong.bin")


def test_safetensors_parser_rejects_bad_files(mod, tmp_path):
    t = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(5)}
    path = tmp_path / "x.safetensors"
    write_safetensors(path, t)
    blob = path.read_bytes()
    got = mod.read_safetensors(path)
    assert torch.equal(got["a"], t["a"]) and torch.equal(got["b"], t["b"])

    (tmp_path / "cut.safetensors").write_bytes(blob[:-4])  # last tensor's data cut short
    with pytest.raises(ValueError, match="truncated"):
        mod.read_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(blob[:40])  # cut inside the JSON header
    with pytest.raises(ValueError, match="truncated"):
        mod.read_safetensors(tmp_path / "head.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(blob[:5])
    with pytest.raises(ValueError, match="truncated"):
        mod.read_safetensors(tmp_path / "tiny.safetensors")
    with pytest.raises(ValueError, match="truncated"):
        mod.load_vae(tmp_path / "cut.safetensors")

    h = json.dumps({"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "int.safetensors").write_bytes(len(h).to_bytes(8, "little") + h + b"\0" * 8)
    with pytest.raises(ValueError, match="dtype I64"):
        mod.read_safetensors(tmp_path / "int.safetensors")
    h = json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "off.safetensors").write_bytes(len(h).to_bytes(8, "little") + h + b"\0" * 8)
    with pytest.raises(ValueError, match="inconsistent"):
        mod.read_safetensors(tmp_path / "off.safetensors")
    (tmp_path / "json.safetensors").write_bytes((4).to_bytes(8, "little") + b"{no}")
    with pytest.raises(ValueError, match="JSON"):
        mod.read_safetensors(tmp_path / "json.safetensors")


@pytest.fixture(scope="module")
def vae(mod, weights):
    with torch.device("meta"):  # the loading paths are tested above; here only the forward pass matters
        model = mod.AutoencoderKL()
    model.load_state_dict(weights, assign=True)
    return model.eval().requires_grad_(False)


def test_vae_encode_decode_shapes(mod, vae):
    x = golden_input()
    mean, std = vae.encode(x)
    assert mean.shape == std.shape == (2, 4, 2, 3)
    assert torch.isfinite(mean).all() and (std > 0).all()
    y = vae.decode(mean)
    assert y.shape == (2, 3, 16, 24) and torch.isfinite(y).all()
    # micro-batches give the same numbers: GroupNorm is per sample; the tolerance only absorbs float32
    # summation-order differences between convolution algorithms for different batch sizes
    m1, s1 = vae.encode(x, batch=1)
    assert torch.allclose(m1, mean, rtol=1e-4, atol=1e-5) and torch.allclose(s1, std, rtol=1e-4, atol=1e-5)
    assert torch.allclose(vae.decode(mean, batch=1), y, rtol=1e-4, atol=1e-5)


def test_vae_matches_diffusers_golden_values(mod, vae):
    # Reference numbers from diffusers 0.42.1 AutoencoderKL (sd-vae-ft-mse config) run on the same
    # random_vae_weights and golden_input (our implementation matched it to 1.4e-5 over all outputs).
    # atol 2e-4: outputs are O(1) after ~40 float32 layers; BLAS/thread summation order moves them by
    # ~1e-5, while a layout error (padding side, attention scale, block order, shortcut) moves them by
    # far more. The corners of the decoded image see the asymmetric down-sampling padding.
    golden_mean = {(0, 0, 0): [-0.09814418, 0.78986263, -0.08060463, 0.10688864],
                   (1, 1, 2): [-0.39159381, 0.25092852, 0.11312912, 0.43083647]}
    golden_std = {(0, 1, 1): [0.63696772, 1.52249944, 1.40819943, 0.79353839]}
    golden_y = {(0, 0, 0): [-0.06849828, 0.13100138, 0.00899909],
                (1, 15, 23): [0.34675345, 0.16373211, -0.10224871],
                (0, 7, 11): [0.74892908, -1.01710355, 1.06585944]}
    with torch.no_grad():
        mean, std = vae.encode(golden_input())
        y = vae.decode(mean)
    for (n, i, j), want in golden_mean.items():
        assert torch.allclose(mean[n, :, i, j], torch.tensor(want), rtol=0, atol=2e-4), (n, i, j)
    for (n, i, j), want in golden_std.items():
        assert torch.allclose(std[n, :, i, j], torch.tensor(want), rtol=0, atol=2e-4), (n, i, j)
    for (n, i, j), want in golden_y.items():
        assert torch.allclose(y[n, :, i, j], torch.tensor(want), rtol=0, atol=2e-4), (n, i, j)
    assert abs(y.abs().mean().item() - 0.49929106) < 2e-5


def test_latent_normalisations_round_trip(mod):
    z = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(2)) * 4
    # float32 round trip: a few ulps of |z| ~ 10
    assert torch.allclose(mod.edm2_unnormalize_latents(mod.edm2_normalize_latents(z)), z, rtol=0, atol=1e-5)
    assert torch.allclose(mod.sd_unscale_latents(mod.sd_scale_latents(z)), z, rtol=0, atol=1e-5)
    # EDM2: the assumed raw mean maps to 0 and mean + std to the final std 0.5, channel by channel
    raw_mean = torch.tensor([5.81, 3.25, 0.12, -2.15]).reshape(1, 4, 1, 1)
    raw_std = torch.tensor([4.17, 4.62, 3.71, 3.28]).reshape(1, 4, 1, 1)
    assert torch.allclose(mod.edm2_normalize_latents(raw_mean), torch.zeros(1, 4, 1, 1), atol=1e-6)
    assert torch.allclose(mod.edm2_normalize_latents(raw_mean + raw_std), torch.full((1, 4, 1, 1), 0.5), atol=1e-6)
    assert torch.allclose(mod.sd_scale_latents(torch.ones(1)), torch.tensor([0.18215]))


def test_latent_draws_from_raw(mod):
    mean = torch.randn(2, 4, 3, 3)
    std = torch.rand(2, 4, 3, 3) + 0.1
    raw = torch.cat([mean, std], dim=1)
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    z = mean + noise * std
    assert torch.allclose(mod.edm2_encode_latents(raw, torch.Generator().manual_seed(3)),
                          mod.edm2_normalize_latents(z), atol=1e-6)
    assert torch.allclose(mod.sd_encode_latents(raw, torch.Generator().manual_seed(3)), z * 0.18215, atol=1e-6)


class _SpyVAE(torch.nn.Module):
    """Stands in for the VAE to check what the conventions feed it and how they turn its output into
    uint8 pixels."""

    def __init__(self, out_value=None):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.out_value = out_value

    def encode(self, x, batch=None):
        self.seen = x
        mean = x[:, :, ::8, ::8].mean(1, keepdim=True).expand(-1, 4, -1, -1)
        return mean, torch.ones_like(mean)

    def decode(self, z, batch=None):
        self.seen = z
        return self.out_value.reshape(1, 1, 1, -1).expand(len(z), 3, 8 * z.shape[2], -1)


def test_pixel_conventions(mod):
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).reshape(1, 1, 1, 3).expand(2, 3, 8, 3).clone()
    spy = _SpyVAE()
    assert mod.edm2_encode_pixels(spy, images).shape == (2, 8, 1, 1)
    assert torch.allclose(spy.seen[0, 0, 0], torch.tensor([0.0, 0.2, 1.0]))  # EDM2 feeds [0, 1]
    mod.sd_encode_pixels(spy, images)
    assert torch.allclose(spy.seen[0, 0, 0], torch.tensor([-1.0, -0.6, 1.0]))  # MeanFlow/DiT feed [-1, 1]

    spy = _SpyVAE(out_value=torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0]))
    z = torch.zeros(2, 4, 1, 1)
    out = mod.edm2_decode(spy, z)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 8, 5)
    assert out[0, 0, 0].tolist() == [0, 0, 127, 255, 255]  # clamp to [0, 1], x255, truncate
    assert torch.allclose(spy.seen, mod.edm2_unnormalize_latents(z))
    out = mod.sd_decode(spy, z)
    assert out[0, 0, 0].tolist() == [0, 128, 191, 255, 255]  # 127.5 x + 128, clip, truncate
    assert torch.equal(spy.seen, z)


def test_conventions_end_to_end_on_random_vae(mod, vae):
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    for encode_pixels, encode_latents, decode in ((mod.edm2_encode_pixels, mod.edm2_encode_latents, mod.edm2_decode),
                                                  (mod.sd_encode_pixels, mod.sd_encode_latents, mod.sd_decode)):
        raw = encode_pixels(vae, images)
        assert raw.shape == (2, 8, 2, 2) and (raw[:, 4:] > 0).all()
        z = encode_latents(raw, torch.Generator().manual_seed(5))
        out = decode(vae, z)
        assert out.shape == images.shape and out.dtype == torch.uint8


# ==================================================================================================
# cmt_cifar10.py
# ==================================================================================================

# Rows of the bad-input table (test_bad_input_is_one_line_exit_2_and_writes_nothing, at the end of the file):
# pytest.param(script, argv, setup, expected, id=...): argv and expected items may use {tmp};
# setup(tmp) makes the inputs in the test's folder, which is also the working directory.
_T = ["--preset", "tiny", "--outdir", "{tmp}/run"]
BAD_INPUTS_CIFAR = [pytest.param("cmt_cifar10.py", argv, setup, expected, id="cifar-" + name) for name, argv, setup, expected in [
    ("unknown-preset", ["--preset", "foo", "--stage", "mid"], None, ["--preset", "'foo'"]),
    ("unknown-stage", ["--stage", "foo"], None, ["--stage", "'foo'"]),
    ("unknown-metric", _T + ["--stage", "mid", "--metric", "foo"], None, ["--metric", "'foo'"]),
    ("batch-zero", _T + ["--stage", "pretrain", "--batch", "0"], None, ["--batch", "'0'"]),
    ("batch-negative", _T + ["--stage", "pretrain", "--batch", "-4"], None, ["--batch", "'-4'"]),
    ("batch-not-divisible", _T + ["--stage", "pretrain", "--batch", "48", "--batch-gpu", "32"], None,
     ["--batch 48", "--batch-gpu 32"]),
    ("data-missing", _T + ["--stage", "pretrain", "--data", "{tmp}/nope"], None, ["--data", "nope", "no such"]),
    ("data-empty", _T + ["--stage", "pretrain", "--data", "{tmp}/d"], lambda t: (t / "d").mkdir(), ["--data", "no PNG"]),
    ("data-not-png", _T + ["--stage", "pretrain", "--data", "{tmp}/d"],
     lambda t: make_pngs(t / "d").joinpath("img1.png").write_bytes(b"not a png"), ["--data", "img1.png", "not a readable PNG"]),
    ("data-mixed-sizes", _T + ["--stage", "pretrain", "--data", "{tmp}/d"], lambda t: make_pngs(t / "d", (8, 16, 8)),
     ["--data", "img1.png is 16x16", "img0.png is 8x8"]),
    ("data-wrong-resolution", _T + ["--stage", "pretrain", "--data", "{tmp}/d"], lambda t: make_pngs(t / "d", (16, 16)),
     ["--data", "16, 16", "3x8^2"]),
    ("data-labels-mismatch", _T + ["--stage", "pretrain", "--cond", "--data", "{tmp}/d"],
     lambda t: make_pngs(t / "d", labels={"img0.png": 0, "other.png": 1}), ["--data", "no label for img1.png"]),
    *bad_init_rows(_T + ["--stage", "post"], "cmt_cifar10.py", "meanflow_post.py", "mid"),
    ("post-bf16-at-q4096", _T + ["--stage", "post", "--init", "random", "--bf16"], None, ["--bf16", "2.4e-04 apart", "fp32"]),
    ("post-tf32-at-q4096", _T + ["--stage", "post", "--init", "random", "--tf32"], None, ["--tf32", "2.4e-04 apart", "fp32"]),
    ("tiny-pipeline-bf16-at-q4096", ["--preset", "tiny", "--bf16", "--outdir", "{tmp}/run"], None,  # before training
     ["--bf16", "2.4e-04 apart"]),
    ("teacher-truncated-pkl", _T + ["--stage", "mid", "--teacher", "{tmp}/t.pkl"],
     lambda t: (t / "t.pkl").write_bytes(pickle.dumps({"ema": list(range(100))})[:40]), ["--teacher", "t.pkl", "not a readable"]),
    ("teacher-garbage-pt", _T + ["--stage", "mid", "--teacher", "{tmp}/t.pt"], lambda t: (t / "t.pt").write_bytes(b"\x00" * 64),
     ["--teacher", "t.pt", "not a readable checkpoint"]),
    ("resume-missing", _T + ["--stage", "pretrain", "--resume", "{tmp}/c.pt"], None, ["--resume", "c.pt", "no such file"]),
    ("resume-other-stage", _T + ["--stage", "post", "--init", "random", "--resume", "auto"],
     lambda t: make_ckpt(t / "run" / "ckpt-latest.pt", "cmt_cifar10.py", "pretrain"),
     ["--resume", "a pretrain checkpoint", "--stage post"]),
    ("outdir-is-a-file", _T[:2] + ["--stage", "pretrain", "--outdir", "{tmp}/f"], lambda t: (t / "f").write_text("x"),
     ["--outdir", "is a file"]),
    ("outdir-holds-a-run", _T + ["--stage", "pretrain"], lambda t: make_ckpt(t / "run" / "ckpt-latest.pt", "cmt_cifar10.py", "post"),
     ["--outdir", "already holds a post run at iteration 3", "--resume auto"]),
    ("outdir-holds-files", _T + ["--stage", "pretrain"], lambda t: make_pngs(t / "run"), ["--outdir", "already holds 3 files"]),
    ("fid-ref-nan", _T + ["--stage", "pretrain", "--fid-ref", "{tmp}/r.npz"], lambda t: _ref(t / "r.npz", np.full(3, np.nan), np.eye(3)),
     ["--fid-ref", "r.npz", "NaN"]),
    ("sample-needs-init", ["--preset", "tiny", "--stage", "sample", "--outdir", "{tmp}/s"], None, ["--teacher", "needs a teacher"]),
    ("sample-steps-zero", ["--preset", "tiny", "--stage", "sample", "--sample-steps", "0"], None, ["--sample-steps", "'0'"]),
]]


# A single Gaussian N(mu, std^2): linear denoiser, closed-form flow map (cc.gaussian_flow_map).
G_MU, G_STD = 0.3, 0.5


def gauss_denoiser(x, s):
    s = torch.as_tensor(s, dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1)) if torch.is_tensor(s) else s
    return G_MU + G_STD ** 2 / (G_STD ** 2 + s ** 2) * (x - G_MU)


def gauss_flow(x, s_from, s_to):
    return cc.gaussian_flow_map(x, s_from, s_to, G_MU, G_STD)


def slope(hs, errs):
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


def tiny_cfg(**over):
    """A resolved tiny-preset config for one stage, without the CLI."""
    args = cc.parse_args(["--preset", "tiny", "--stage", over.pop("stage", "pretrain"), "--outdir", over.pop("outdir", "x")])
    for k, v in over.items():
        setattr(args, k, v)
    return cc.resolve_config(args)


# ----------------------------------------------------------------------------- grid and solvers

def test_logsnr_grid_values():
    # s_i = 80 (0.002/80)^(i/16) to 6 significant digits, as the formula and sony/cmt's get_time_steps
    # (training/dpm_solver.py) give them.
    spec = [80, 41.2535, 21.2732, 10.9699, 5.65685, 2.91707, 1.50424, 0.775691, 0.4, 0.206268, 0.106366,
            0.0548495, 0.0282843, 0.0145853, 0.00752121, 0.00387845, 0.002]
    grid = cc.logsnr_grid()
    assert len(grid) == 17
    np.testing.assert_allclose(grid.numpy(), spec, rtol=6e-6)
    assert abs(float(grid[7]) - 0.77569) < 1e-5  # the CIFAR-10 two-step mid_t


def test_dpm_solver_pp_local_orders():
    # One update from exact history: local error O(h^(k+1)) for orders 1 and 2. The official third-order
    # multistep update (sony/cmt training/dpm_solver.py, multistep_dpm_solver_third_update) scales
    # D2 ~ h^2 m''/2 by phi_3 where the Taylor expansion needs h^2 m'', so its local error is O(h^3) as well
    # -- we reproduce it exactly, and check that doubling D2 would give O(h^4), i.e. that the measurement
    # is sharp.
    x_ref = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    hs = [0.02, 0.01, 0.005, 0.0025]  # small enough to be asymptotic, large enough to stay above roundoff

    def local_error(order, step):
        errs = []
        for h in hs:
            lams = [(j - order + 1) * h for j in range(order)] + [h]
            sig = [math.exp(-lam) for lam in lams]
            xs = [gauss_flow(x_ref, 2.0, s) for s in sig[:-1]]
            x1 = step(xs[-1], [gauss_denoiser(x, s) for x, s in zip(xs, sig)], lams, order)
            errs.append(float((x1 - gauss_flow(x_ref, 2.0, sig[-1])).abs().max()))
        return slope(hs, errs)

    assert abs(local_error(1, cc.dpm_solver_pp_step) - 2) < 0.1
    assert abs(local_error(2, cc.dpm_solver_pp_step) - 3) < 0.1
    assert abs(local_error(3, cc.dpm_solver_pp_step) - 3) < 0.1

    def doubled_d2(x, ms, lams, order):  # the Taylor-consistent variant, for contrast only
        h = lams[-1] - lams[-2]
        r0, r1 = (lams[-2] - lams[-3]) / h, (lams[-3] - lams[-4]) / h
        d1_0, d1_1 = (ms[-1] - ms[-2]) / r0, (ms[-2] - ms[-3]) / r1
        extra = -((math.expm1(-h) / h + 1) / h - 0.5) * (d1_0 - d1_1) / (r0 + r1)
        return cc.dpm_solver_pp_step(x, ms, lams, order) + extra
    assert local_error(3, doubled_d2) > 3.7


def test_solvers_global_orders():
    # Whole trajectories 10 -> 0.05 against the exact flow map, float64, N = 16..128 steps.
    x0 = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 10
    exact = gauss_flow(x0, 10.0, 0.05)
    ns = [16, 32, 64, 128]
    err = lambda f: [float((f(n) - exact).abs().max()) for n in ns]
    dpm = {o: err(lambda n: cc.dpm_solver_pp(gauss_denoiser, x0, cc.logsnr_grid(n, 10.0, 0.05), o)[-1]) for o in (1, 2, 3)}
    heun = err(lambda n: cc.heun_sampler(gauss_denoiser, x0, cc.logsnr_grid(n, 10.0, 0.05)))
    assert abs(-slope(ns, dpm[1]) - 1) < 0.1
    assert abs(-slope(ns, dpm[2]) - 2) < 0.15
    assert abs(-slope(ns, heun) - 2) < 0.1
    # Order 3 with first-order warm-up/final steps: asymptotically O(h^2) but 3-4x more accurate from N = 32.
    assert -slope(ns, dpm[3]) > 1.9 and all(e3 < 0.4 * e2 for e3, e2 in zip(dpm[3][1:], dpm[2][1:]))


def test_dpm_solver_orders_schedule_and_nfe():
    calls = []
    x = torch.zeros(1, dtype=torch.float64)

    def denoise(x, s):
        calls.append(s)
        return x
    states = cc.dpm_solver_pp(denoise, x, cc.logsnr_grid())
    assert len(states) == 17 and len(calls) == 16  # the state at s_min is never denoised
    np.testing.assert_allclose(calls, cc.logsnr_grid()[:16].numpy())


def test_heun_nfe_and_karras_grid():
    calls = []
    g = cc.karras_grid(18)
    cc.heun_sampler(lambda x, s: calls.append(s) or x, torch.zeros(1, dtype=torch.float64), g)
    assert len(calls) == 35 and float(g[0]) == 80 and float(g[-1]) == 0 and abs(float(g[-2]) - 0.002) < 1e-12


# ----------------------------------------------------------------------------- CMT pairs and loss

def test_cmt_pair_layout():
    steps, b = 16, 3
    states = torch.arange(steps * b, dtype=torch.float32).view(steps, b, 1, 1, 1).expand(steps, b, 3, 2, 2)
    target = 1000 + torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 2, 2)
    labels = torch.eye(b)
    x, sigmas, targets, lab = cc.cmt_pairs(states, target, labels)
    grid = cc.logsnr_grid().float()
    for i in range(steps):
        for j in range(b):
            row = i * b + j  # step-major
            assert x[row, 0, 0, 0] == i * b + j and targets[row, 0, 0, 0] == 1000 + j
            assert sigmas[row] == grid[i] and lab[row].argmax() == j


def gaussian_teacher():
    toy = cc.ToyMixture(resolution=2, components=1)
    toy.means.fill_(G_MU)
    toy.stds = torch.tensor([G_STD])
    return toy


def test_cmt_trajectories_match_exact_flow():
    toy = gaussian_teacher()
    torch.manual_seed(0)
    states, target = cc.cmt_trajectories(toy, torch.full((4, 3, 2, 2), G_MU), None)
    assert states.shape == (16, 4, 3, 2, 2) and target.shape == (4, 3, 2, 2)
    # Every state lies on the exact trajectory up to the 16-step solver's error: measured max 4.2e-2 along
    # the way and 1.9e-2 at the end, against starting points of size ~80 (data std 0.5).
    for i, s in enumerate(cc.logsnr_grid()[:16].tolist()):
        assert float((states[i] - gauss_flow(states[0].double(), 80.0, s)).abs().max()) < 6e-2
    assert float((target - gauss_flow(states[0].double(), 80.0, 0.002)).abs().max()) < 3e-2


def test_cmt_loss_zero_for_exact_flow_map_and_grows():
    # Exact trajectories (the limit of a perfect teacher solver) and a student that is the exact flow map.
    x_T = G_MU + 80 * torch.randn(8, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    states = torch.stack([gauss_flow(x_T, 80.0, s) for s in cc.logsnr_grid()[:16].tolist()])
    target = gauss_flow(x_T, 80.0, 0.002)

    def student(eps):
        def f(x, s, labels=None, train=True):
            s = s.double().view(-1, 1, 1, 1)
            return gauss_flow(x.double(), s, 0.002) * (1 + eps)
        return f
    losses = [float(cc.cmt_loss(student(e), states, target, None, "l2").mean()) for e in (0, 0.01, 0.1)]
    assert losses[0] < 1e-12  # float64 roundoff only (measured 5e-16)
    # l2 is quadratic in the perturbation: 10x larger eps -> 100x larger loss.
    assert losses[1] > 1e-6 and abs(losses[2] / losses[1] - 100) < 1


@pytest.mark.parametrize("buffer, solved", [(0, [2, 2, 2, 2]), (8, [8])])
def test_traj_reuse_solves_once_per_k_iterations(monkeypatch, buffer, solved):
    # --traj-reuse 3 over 6 iterations: 2 trajectory draws of 2 micro-batches x 2 trajectories. --traj-buffer 0
    # solves each micro-batch alone when it is first used; 8 = both draws' 8 trajectories in one solve.
    solves = []
    real = cc.cmt_trajectories
    monkeypatch.setattr(cc, "cmt_trajectories", lambda *a: solves.append(a[1].shape[0]) or real(*a))
    stream = cc.DataStream(cc.ToyMixture(), 0)
    pairs = cc.TeacherPairs(cc.ToyMixture(), stream, trajectories=2, steps=16, reuse=3, accum=2, device="cpu",
                            buffer=buffer, seed=0, draws=2)
    got = [[pairs.get(it, r)[1] for r in range(2)] for it in range(6)]
    assert solves == solved  # iterations 0 and 3, two micro-batches each, or one solve for both
    assert torch.equal(got[0][0], got[2][0]) and not torch.equal(got[0][0], got[3][0])
    assert not torch.equal(got[0][0], got[0][1])  # micro-batches keep their own trajectories


def c10_tiny_teacher(seed=1):
    """The tiny preset's EDM teacher (SongUNet DDPM++) in eval mode, its weights moved off their near-zero init
    (else D(x) ~ c_skip x and every comparison of trajectories would be nearly vacuous)."""
    torch.manual_seed(seed)
    net = cc.build_net(tiny_cfg(stage="mid"), "edm", dropout=0.0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval().requires_grad_(False)


def test_cifar10_teacher_solves_in_float32_under_bf16_autocast():
    # --bf16 autocasts the student's micro-steps, which draw their pairs; the teacher's trajectories stay float32.
    teacher = c10_tiny_teacher()
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pairs = lambda: cc.TeacherPairs(teacher, cc.DataStream((images, None), 0), 2, 16, 1, 1, torch.device("cpu"),  # noqa: E731
                                    4, 0, 2)
    ref = pairs().get(0, 0)
    with torch.autocast("cpu", torch.bfloat16):
        got = pairs().get(0, 0)
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16  # autocast is on here
    assert all(torch.equal(a, b) for a, b in zip(got[:2], ref[:2]))


@pytest.mark.parametrize("world", [1, 2])
def test_cifar10_bulk_trajectories_equal_one_solve_per_micro_step(world):
    # Per rank (DDP simulated: each rank its own stream shard and noise slots), 5 iterations of 2 micro-steps x 2
    # trajectories; --traj-buffer 12 = 3 iterations per solve: chunks [0, 3) and [3, 5). The reference solves each
    # micro-step alone from the images its stream gives and the noise of noise_seed(seed, iteration, slot).
    teacher = c10_tiny_teacher()
    sizes = []
    teacher.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    b, rounds, iters = 2, 2, 5
    n_img = iters * rounds * b * world  # one epoch: every image once over the whole run, all ranks together
    images = torch.randint(0, 256, (n_img, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[:, 0, 0, 0] = torch.arange(n_img, dtype=torch.uint8)  # an image's index, readable from y
    used = []
    for rank in range(world):
        stream = lambda: cc.DataStream((images, None), 0, rank, world)  # noqa: E731
        one, bulk = (cc.TeacherPairs(teacher, stream(), b, 16, 1, rounds, torch.device("cpu"), buffer, 0, iters)
                     for buffer in (0, 3 * rounds * b))
        ref_stream = stream()
        assert one.chunk == 0 and bulk.chunk == 3
        for it in range(iters):
            for r in range(rounds):
                y, _ = ref_stream.next(b)
                seed = cc.noise_seed(0, it, r * world + rank)  # --seed 0, draw = iteration, slot
                eps = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
                sizes.clear()
                ref = cc.cmt_trajectories(teacher, y, None, 16, eps)
                sizes.clear()
                a = one.get(it, r)
                assert sizes == [b] * 16  # the official schedule: this micro-step's trajectories alone
                sizes.clear()
                c = bulk.get(it, r)
                chunk_start = it in (0, 3) and r == 0
                assert sizes == ([min(3, iters - it) * rounds * b] * 16 if chunk_start else [])  # one solve per chunk
                for u, v, w in zip(a[:2], c[:2], ref):  # states, target
                    assert torch.equal(u, w)
                    # The bulk solve's only difference is the teacher's batch (eval mode, no dropout, GroupNorm
                    # and attention per sample): float32 rounding of other kernel blockings. Measured <= 7.6e-6
                    # absolute on states up to ~350 (x_T = y + 80 eps) and targets ~2; 1e-4 + 1e-5 |x| is >10x.
                    torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-4)
                assert a[2] is None and c[2] is None  # unconditional: no labels
                assert torch.equal(c[0][0], ref[0][0])  # x_T = y + 80 eps of exactly this micro-step's inputs
                used += ((y[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()
    assert sorted(used) == list(range(n_img))  # every trajectory used once over micro-steps and ranks


def test_distances():
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.1)
    sq = 48 * 0.01
    assert torch.allclose(cc.distance(a, b, "l2"), torch.tensor([sq, sq]))
    c = 0.00054 * math.sqrt(48)
    assert torch.allclose(cc.distance(a, b, "huber"), torch.tensor(math.sqrt(sq + c * c) - c))
    assert torch.allclose(cc.distance(a, b, "cauchy", c=0.1), torch.tensor(math.log1p(sq / 0.02)))


def test_lpips_needs_weights_and_runs_with_them(tmp_path):
    with pytest.raises(SystemExit, match="--lpips-weights"):
        cc.make_lpips({"metric": "lpips", "lpips_weights": None}, "cpu")
    # Synthetic weights in the published layouts: torchvision vgg16 features.* and LPIPS lin{i}.model.1.
    torch.manual_seed(0)
    vgg = cc.LPIPS.__new__(cc.LPIPS)
    torch.nn.Module.__init__(vgg)
    feats, cin = [], 3
    for v in cc.LPIPS.CFG:
        feats += [torch.nn.MaxPool2d(2)] if v == "M" else [torch.nn.Conv2d(cin, v, 3, padding=1), torch.nn.ReLU()]
        cin = v if v != "M" else cin
    torch.save({f"features.{k}": t for k, t in torch.nn.Sequential(*feats).state_dict().items()}, tmp_path / "vgg.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
               tmp_path / "lin.pth")
    lp = cc.make_lpips({"metric": "lpips", "lpips_weights": f"{tmp_path}/vgg.pth,{tmp_path}/lin.pth"}, "cpu")
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lp(a, a), torch.zeros(2)) and (lp(a, b) > 0).all()


# ----------------------------------------------------------------------------- preconditioning

def test_edm_and_ecm_coefficients():
    s = torch.tensor([0.5, 2.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = cc.edm_precond(s)
    np.testing.assert_allclose(c_skip, [0.5, 0.25 / 4.25], rtol=1e-12)
    np.testing.assert_allclose(c_out, [0.25 / math.sqrt(0.5), 1.0 / math.sqrt(4.25)], rtol=1e-12)
    np.testing.assert_allclose(c_in, [1 / math.sqrt(0.5), 1 / math.sqrt(4.25)], rtol=1e-12)
    np.testing.assert_allclose(c_noise, [math.log(0.5) / 4, math.log(2.0) / 4], rtol=1e-12)
    train = cc.ecm_precond(s, train=True)
    assert all(torch.equal(a, b) for a, b in zip(train, (c_skip, c_out, c_in, c_noise)))
    e_skip, e_out, e_in, _ = cc.ecm_precond(s, train=False)
    np.testing.assert_allclose(e_skip, 0.25 / ((s - 0.003) ** 2 + 0.25), rtol=1e-12)
    np.testing.assert_allclose(e_out, (s - 0.003) * 0.5 / (s ** 2 + 0.25).sqrt(), rtol=1e-12)


def test_ecm_boundary_condition():
    cfg = tiny_cfg(stage="mid")
    net = cc.build_net(cfg, "ecm", dropout=0.3)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)  # no zero-initialised output layer hides the network's contribution
        x = torch.randn(3, 3, 8, 8)
        assert torch.equal(net(x, torch.full((3,), 0.003), train=False), x)   # f(x, s_min) = x exactly
        assert not torch.allclose(net(x, torch.full((3,), 0.003), train=True), x)


# ----------------------------------------------------------------------------- ECT

def test_ect_t_to_r_values():
    t = torch.tensor([0.01, 1.0, 10.0], dtype=torch.float64)
    sig = torch.sigmoid(-t)
    r = cc.ect_t_to_r(t, q=4096.0)                      # CMT's fixed q, stage 0
    np.testing.assert_allclose(r, t * (1 - (1 + 8 * sig) / 4096), rtol=1e-12)
    np.testing.assert_allclose(float(r[1]), 1 - (1 + 8 / (1 + math.e)) / 4096, rtol=1e-12)  # 0.99923058
    # Plain ECT: q = 2, Delta t halves each stage; early stages clamp r to 0 for small t.
    assert float(cc.ect_t_to_r(torch.tensor(0.01), 2.0, stage=0)) == 0.0
    np.testing.assert_allclose(cc.ect_t_to_r(t, 2.0, stage=3), (t * (1 - (1 + 8 * sig) / 16)).clamp(min=0), rtol=1e-12)


def official_ect_stages(iters, batch, double, tick_kimg=12.8):
    """The stage each iteration trains with, replayed from locuslab/ect training/ct_training_loop.py: tick 0
    ends after the first step, later ticks after `tick_kimg` more kimg, and after each tick the stage
    becomes (cur_tick - 1) // double_ticks."""
    stages, stage, cur_tick, nimg, tick_start = [], 0, 0, 0, 0
    for _ in range(iters):
        stages.append(stage)
        nimg += batch
        if cur_tick != 0 and nimg < tick_start + tick_kimg * 1000:
            continue
        cur_tick, tick_start = cur_tick + 1, nimg
        stage = max(stage, (cur_tick - 1) // double)
    return stages


@pytest.mark.parametrize("batch,double", [(128, 2), (96, 3), (512, 1)])
def test_ect_stage_halves_on_locuslab_tick_boundaries(batch, double):
    # run_ecm.sh: --tick=12.8 --double=250 --batch=128; here fewer ticks per stage to see several stages,
    # and batches that do (128) and do not (96) divide a tick.
    n = 1 + 4 * double * math.ceil(12800 / batch) + 5
    want = official_ect_stages(n, batch, double)
    assert [cc.ect_stage(it, batch, double) for it in range(n)] == want and max(want) == 4
    assert all(cc.ect_stage(it, batch, 0) == 0 for it in range(0, n, 7))  # --ect-double 0: q stays fixed


def test_ect_stage_reaches_the_loss(monkeypatch):
    seen = []
    monkeypatch.setattr(cc, "ect_loss", lambda net, y, labels, q, stage, c: seen.append((q, stage)) or y.flatten(1).sum(1))
    cfg = tiny_cfg(stage="post", ect_double=1, ect_q=2.0, batch=6400)  # 2 iterations per tick
    loss, _ = cc.make_loss(cfg, cc.DataStream(cc.ToyMixture(), 0), None, 4, 1, torch.device("cpu"))
    for it in (0, 2, 3, 5):
        loss(None, it, 0)
    assert seen == [(2.0, 0), (2.0, 0), (2.0, 1), (2.0, 2)]


@pytest.mark.parametrize("flags,decay", [([], "linear"), (["--ect-double", "250"], "constant"),
                                         (["--ect-double", "250", "--lr-decay", "linear"], "linear"),
                                         (["--lr-decay", "constant"], "constant")])
def test_cifar10_lr_decay_follows_the_official_recipe(tmp_path, flags, decay):
    # sony/cmt training/ct_training_loop.py decays linearly (learning_rate_schedule); locuslab/ect's plain ECT,
    # the only recipe that halves Delta t, keeps it constant (ct_training_loop.py: the ramp/decay line is
    # commented out).
    args = cc.parse_args(["--preset", "tiny", "--stage", "post", "--outdir", str(tmp_path / "x"), *flags])
    cfg = cc.resolve_config(args)
    assert cfg["lr_decay"] == decay
    cfg.update(init="random", batch=32, iters=4, log_every=1, ckpt_every=0, outdir=str(tmp_path / "run"))
    cc.train(cfg)
    lrs = [json.loads(l)["lr"] for l in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    want = [cfg["lr"] * (1 - it / 4) if decay == "linear" else cfg["lr"] for it in range(4)]
    assert lrs == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("batch,double", [(128, 2), (96, 3)])
def test_imagenet_ect_stage_halves_on_sony_cmt_tick_boundaries(batch, double):
    # imagenet512/run_ect_512.sh: --tick=6.4 --double 50000 --batch=128 (ct_training_loop_simpleema_512.py).
    n = 1 + 4 * double * math.ceil(6400 / batch) + 5
    want = official_ect_stages(n, batch, double, tick_kimg=6.4)
    assert [inet.ect_stage(it, batch, double) for it in range(n)] == want and max(want) == 4


@pytest.mark.parametrize("stage,flags,decay", [("mid", [], "linear"), ("post", [], "constant"),
                                               ("post", ["--lr-decay", "linear"], "linear")])
def test_imagenet_lr_decay_default_and_flag(stage, flags, decay):
    # sony/cmt imagenet512: run_cmt_512.sh decays linearly, run_ecd_512.sh / run_ect_512.sh pass --sch Constant.
    cfg = inet_cfg("--stage", stage, *flags)
    assert cfg["lr_decay"] == decay
    lrs = [inet.learning_rate(cfg, it) for it in (0, cfg["iters"] // 2)]
    assert lrs == ([cfg["lr"], cfg["lr"] * (1 - (cfg["iters"] // 2) / cfg["iters"])] if decay == "linear" else [cfg["lr"]] * 2)


class MaskRecorder(torch.nn.Module):
    """f(x, s) = x * dropout-mask: records each call's mask."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def forward(self, x, s, labels=None, train=True):
        m = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=train)
        self.masks.append(m)
        return x * m


def test_ect_same_dropout_mask_in_both_passes():
    net = MaskRecorder()
    torch.manual_seed(0)
    cc.ect_loss(net, torch.randn(4, 3, 8, 8), None, q=4096.0, stage=0)
    assert len(net.masks) == 2 and torch.equal(net.masks[0], net.masks[1])
    net(torch.ones(4, 3, 8, 8), None)  # control: a plain second call draws a different mask
    assert not torch.equal(net.masks[1], net.masks[2])


def test_ect_loss_weighting_is_one_over_t_minus_r():
    # f(x) = x and y = 0: f_t - f_r = (t - r) eps, so loss = |eps|_2 for every t, including r = 0.
    identity = lambda x, s, labels=None, train=True: x
    torch.manual_seed(0)
    loss = cc.ect_loss(identity, torch.zeros(64, 3, 8, 8), None, q=2.0, stage=0)
    torch.manual_seed(0)
    torch.randn(64, 1, 1, 1)
    eps = torch.randn(64, 3, 8, 8)
    np.testing.assert_allclose(loss.numpy(), eps.flatten(1).norm(dim=1).numpy(), rtol=1e-4)  # float32 cancellation


# ----------------------------------------------------------------------------- network

STUDENT_KEYS = [  # from the official ECT/CMT student (ECMPrecond, SongUNet DDPM++ CIFAR-10)
    (0, "model.map_layer0.weight", (512, 128)),
    (4, "model.enc.32x32_conv.weight", (128, 3, 3, 3)),
    (52, "model.enc.16x16_down.conv0.resample_filter", (1, 1, 2, 2)),
    (61, "model.enc.16x16_down.skip.resample_filter", (1, 1, 2, 2)),
    (216, "model.dec.8x8_block0.skip.weight", (256, 512, 1, 1)),
    (270, "model.dec.16x16_up.conv0.resample_filter", (1, 1, 2, 2)),
]


def test_student_and_teacher_layout_and_parameter_count():
    cfg = cc.resolve_config(cc.parse_args(["--stage", "mid", "--outdir", "x"]))
    student = cc.build_net(cfg, "ecm")
    sd = student.state_dict()
    keys = list(sd)
    assert len(keys) == 424 and sum(p.numel() for p in student.parameters()) == 55_732_739
    for idx, name, shape in STUDENT_KEYS:
        assert keys[idx] == name and tuple(sd[name].shape) == shape
    assert keys[-2:] == ["model.dec.32x32_aux_conv.weight", "model.dec.32x32_aux_conv.bias"]
    assert any(".qkv.weight" in k for k in keys) and tuple(sd["model.enc.16x16_block0.qkv.weight"].shape) == (768, 256, 1, 1)
    teacher = cc.build_net(cfg, "edm", augment_dim=9)
    tkeys = list(teacher.state_dict())
    assert len(tkeys) == 425 and tkeys[0] == "model.map_augment.weight" and tkeys[1:] == keys
    assert teacher.state_dict()["model.map_augment.weight"].shape == (128, 9)
    assert sum(p.numel() for p in teacher.parameters()) == 55_733_891
    ffhq = cc.build_net(cc.resolve_config(cc.parse_args(["--stage", "mid", "--preset", "ffhq64", "--data", "x",
                                                         "--outdir", "x"])), "edm", augment_dim=9)
    assert len(ffhq.state_dict()) == 553


def test_real_size_forward_backward_cpu():
    cfg = cc.resolve_config(cc.parse_args(["--stage", "mid", "--outdir", "x"]))
    net = cc.build_net(cfg, "ecm")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    out = net(x, torch.tensor([2.0]), train=True)
    out.square().mean().backward()
    assert out.shape == x.shape and torch.isfinite(out).all()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert net.model.dec["32x32_aux_conv"].weight.grad.abs().sum() > 0


def random_edm_teacher(cfg):
    """An EDM teacher in the official layout (map_augment included) with N(0, 1) weights."""
    torch.manual_seed(0)
    official = cc.build_net(cfg, "edm", augment_dim=9)
    with torch.no_grad():
        for p in official.parameters():
            p.normal_()
    return official


def test_teacher_state_with_map_augment_copies_by_name(tmp_path):
    cfg = tiny_cfg(stage="mid")
    official = random_edm_teacher(cfg)
    state = official.state_dict()                            # EDM layout incl. model.map_augment.weight
    teacher = cc.build_net(cfg, "edm", augment_dim=9, dropout=0.0)
    cc.copy_by_name(state, teacher, ignore=())
    student = cc.build_net(cfg, "ecm")
    cc.init_weights(student, dict(cfg, init="teacher"), teacher)
    ema = copy.deepcopy(student)
    for name, t in student.state_dict().items():
        assert torch.equal(t, state[name]) and torch.equal(ema.state_dict()[name], state[name])
    assert all(torch.equal(t, state[n]) for n, t in teacher.state_dict().items())
    assert "model.map_augment.weight" not in student.state_dict()
    # Our own checkpoints feed --teacher/--init through torch.load(weights_only=True).
    torch.save({"ema": cc.build_net(cfg, "edm").state_dict(), "script": cc.SCRIPT, "stage": "pretrain", "config": cfg, "iter": 1},
               tmp_path / "t.pt")
    assert isinstance(cc.load_teacher(dict(cfg, teacher=str(tmp_path / "t.pt")), "cpu", 0), cc.Precond)
    # An official pickle's recorded architecture is checked against ours.
    expected, defaults = cc.official_kwargs(cfg, 0)
    with pytest.raises(ValueError, match="channel_mult"):
        cc.check_init_kwargs(dict(expected, channel_mult=[2, 2, 2]), expected, "x.pkl", defaults)


def write_edm_pickle(path, net, init_kwargs):
    """A synthetic official EDM network pickle: every module is the persistence call
    torch_utils.persistence._reconstruct_persistent_obj(meta) of NVlabs/edm torch_utils/persistence.py,
    tensors pickled natively."""
    import types
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # pickled by reference only; loading must never call it
        raise AssertionError("official-pickle code executed")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class Record:
        def __init__(self, module, extra=None):
            self.state = {"_parameters": dict(module._parameters), "_buffers": dict(module._buffers),
                          "_non_persistent_buffers_set": set(), "training": False,
                          "_modules": {k: Record(m) for k, m in module._modules.items()}, **(extra or {})}
            self.name = "EDMPrecond" if extra else type(module).__name__

        def __reduce__(self):
            return _reconstruct_persistent_obj, (dict(type="class", version=6, module_src="import os", class_name=self.name,
                                                      state=self.state),)
    sys.modules.update({"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence})
    try:
        with open(path, "wb") as f:
            pickle.dump(dict(ema=Record(net, {"_init_kwargs": init_kwargs}), loss_fn=None, augment_pipe=None,
                             dataset_kwargs={}), f, protocol=4)
    finally:
        del sys.modules["torch_utils"], sys.modules["torch_utils.persistence"]


def test_teacher_from_official_pickle(tmp_path, monkeypatch):
    cfg = tiny_cfg(stage="mid")
    official = random_edm_teacher(cfg)
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet",
                  embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
                  resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2], augment_dim=9, dropout=0.13,
                  num_blocks=1, attn_resolutions=[4])
    write_edm_pickle(tmp_path / "edm.pkl", official, kwargs)
    teacher = cc.load_teacher(dict(cfg, teacher=str(tmp_path / "edm.pkl")), "cpu", 0)
    assert list(teacher.state_dict()) == list(official.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), official.state_dict().values()))
    student = cc.build_net(cfg, "ecm")
    cc.init_weights(student, dict(cfg, init="teacher"), teacher)
    assert all(torch.equal(t, official.state_dict()[n]) for n, t in student.state_dict().items())
    write_edm_pickle(tmp_path / "wide.pkl", official, dict(kwargs, model_channels=32))  # not our architecture
    with pytest.raises(SystemExit, match="model_channels"):
        cc.load_teacher(dict(cfg, teacher=str(tmp_path / "wide.pkl")), "cpu", 0)
    url, sha = (tmp_path / "edm.pkl").as_uri(), hashlib.sha256((tmp_path / "edm.pkl").read_bytes()).hexdigest()
    monkeypatch.setattr(cc, "CACHE_DIR", tmp_path / "cache")  # a URL teacher: downloaded, then checked by --teacher-sha256
    with pytest.raises(SystemExit, match="hash mismatch"):
        cc.load_teacher(dict(cfg, teacher=url, teacher_sha256="0" * 64), "cpu", 0)
    fetched = cc.load_teacher(dict(cfg, teacher=url, teacher_sha256=sha), "cpu", 0)
    assert all(torch.equal(a, b) for a, b in zip(fetched.state_dict().values(), official.state_dict().values()))


# ----------------------------------------------------------------------------- data

def test_cifar10_tarball_and_edm_folder(tmp_path):
    buf = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(buf, "w:gz") as tar:
        for i in range(1, 6):
            data = pickle.dumps({b"data": np.full((2, 3072), i, np.uint8), b"labels": [i, i + 1]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{i}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    images, labels = cc.open_data(str(buf))
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8 and labels.tolist()[:2] == [1, 2]
    evil = tmp_path / "evil.tar.gz"  # a batch whose unpickling would call os.system
    with tarfile.open(evil, "w:gz") as tar:
        data = b"cos\nsystem\n(S'echo pwned'\ntR."
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SystemExit, match="refusing global os.system .*nothing in it was run"):
        cc.open_data(str(evil))
    folder = tmp_path / "ds"
    (folder / "00000").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / "00000" / f"img{i}.png")
    (folder / "dataset.json").write_text(json.dumps({"labels": [[f"00000/img{i}.png", i % 2] for i in range(3)]}))
    images, labels = cc.open_data(str(folder))
    assert images.shape == (3, 3, 8, 8) and int(images[2, 0, 0, 0]) == 80 and labels.tolist() == [0, 1, 0]
    zpath = tmp_path / "ds.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder).as_posix())
    zimages, zlabels = cc.open_data(str(zpath))
    assert torch.equal(zimages, images) and zlabels.tolist() == [0, 1, 0]
    stream = cc.DataStream((images, labels), seed=0, cond=True)
    y, lab = stream.next(2)
    assert y.min() >= -1 and y.max() <= 1 and lab.shape == (2, 2)
    with pytest.raises(SystemExit, match="--data"):
        cc.open_data(str(tmp_path / "missing"))


def test_cifar10_download_is_md5_checked(tmp_path, monkeypatch):
    src = tmp_path / "src" / "cifar-10-python.tar.gz"
    src.parent.mkdir()
    with tarfile.open(src, "w:gz") as tar:
        for i in range(1, 6):
            data = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{i}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(cc, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(cc, "CIFAR10_URL", src.as_uri())
    with pytest.raises(SystemExit, match="--data cifar10: hash mismatch"):  # the real md5 is that of the official archive
        cc.open_data("cifar10")
    assert not (tmp_path / "cache" / "cifar-10-python.tar.gz").exists()
    monkeypatch.setattr(cc, "CIFAR10_MD5", hashlib.md5(src.read_bytes()).hexdigest())
    images, _ = cc.open_data("cifar10")
    assert images.shape == (5, 3, 32, 32) and (tmp_path / "cache" / "cifar-10-python.tar.gz").exists()
    monkeypatch.setattr(cc, "CIFAR10_URL", (tmp_path / "nowhere.tar.gz").as_uri())
    monkeypatch.setattr(cc, "CACHE_DIR", tmp_path / "empty")
    with pytest.raises(SystemExit, match="--data cifar10: cannot download"):  # offline: the error names the flag to use instead
        cc.open_data("cifar10")


def test_data_stream_resume_and_shards():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    a, b = cc.DataStream((images, None), 0, rank=0, world_size=2), cc.DataStream((images, None), 0, rank=1, world_size=2)
    first = set(a.next(5)[0][:, 0, 0, 0].tolist()) | set(b.next(5)[0][:, 0, 0, 0].tolist())
    assert len(first) == 10  # the two ranks' shards of one epoch are disjoint
    state = a.state_dict()
    expected = a.next(7)[0]
    c = cc.DataStream((images, None), 0, rank=0, world_size=2)
    c.load_state_dict(state)
    assert torch.equal(c.next(7)[0], expected)


def test_toy_denoiser_is_exact_posterior_mean():
    toy = cc.ToyMixture()
    x = toy.sample(4, torch.Generator().manual_seed(0)).double()
    # sigma -> 0 returns x; sigma -> inf returns the mixture mean.
    assert torch.allclose(toy.denoise(x, 1e-6), x, atol=1e-6)
    mean = (toy.weights.double().view(-1, 1, 1, 1) * toy.means.double()).sum(0)
    assert torch.allclose(toy.denoise(x, 1e4), mean.expand_as(x), atol=1e-3)


# ----------------------------------------------------------------------------- training mechanics

def run_stage(tmp_path, **over):
    cfg = tiny_cfg(outdir=str(tmp_path), **{"batch": 32, "iters": 6, "log_every": 2, "ckpt_every": 3, **over})
    return cfg, cc.train(cfg)


def interrupt_in_iteration_5(tmp_path, monkeypatch, **over):
    """run_stage, killed in iteration 5: its folder holds the checkpoint of iteration 3."""
    real_update, calls = cc.apply_update, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 5:  # die in iteration 5, after the checkpoint at iteration 3
            raise KeyboardInterrupt
        return real_update(*args)
    monkeypatch.setattr(cc, "apply_update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, **over)
    monkeypatch.setattr(cc, "apply_update", real_update)


@pytest.mark.parametrize("stage", ["mid", "post"])
def test_cifar10_resume_is_bit_exact(tmp_path, monkeypatch, stage):
    over = dict(stage=stage, teacher="analytic", init="random", traj_reuse=2, dropout=0.1)
    _, (net_a, ema_a) = run_stage(tmp_path / "a", **over)
    interrupt_in_iteration_5(tmp_path / "b", monkeypatch, **over)
    _, (net_b, ema_b) = run_stage(tmp_path / "b", resume="auto", **over)
    for a, b in zip(list(net_a.state_dict().values()) + list(ema_a.state_dict().values()),
                    list(net_b.state_dict().values()) + list(ema_b.state_dict().values())):
        assert torch.equal(a, b)
    ckpt = torch.load(tmp_path / "b" / "ckpt-latest.pt", weights_only=True)
    assert set(ckpt) == {"model", "ema", "optimizer", "iter", "rng", "data_state", "config", "stage", "script"}
    assert ckpt["iter"] == 6 and ckpt["stage"] == stage and (tmp_path / "b" / "ckpt-0000006.pt").exists()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


@pytest.mark.parametrize("before, after", [(False, True), (True, False)])
def test_cifar10_resume_with_other_channels_last_lays_adam_moments_out_like_their_parameters(tmp_path, monkeypatch,
                                                                                           before, after):
    """--channels-last may change on resume; Adam's moments come back in the checkpoint's layout and must take
    their parameter's (CUDA's fused Adam refuses mixed layouts; the CPU kernel does not check, so strides are
    compared here). The resumed run ends as close to one that never stopped as the two layouts allow."""
    over = dict(stage="pretrain", optimizer="adam")
    _, (net_a, _) = run_stage(tmp_path / "a", channels_last=after, **over)
    interrupt_in_iteration_5(tmp_path / "b", monkeypatch, channels_last=before, **over)
    real_update, seen = cc.apply_update, []

    def checked(net, ema, optimizer, *args):
        for p in net.parameters():
            seen.append(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) == after and not
                        p.is_contiguous() == after)
            assert all(v.stride() == p.stride() for v in optimizer.state[p].values() if v.shape == p.shape)
        return real_update(net, ema, optimizer, *args)
    monkeypatch.setattr(cc, "apply_update", checked)
    _, (net_b, _) = run_stage(tmp_path / "b", resume="auto", channels_last=after, **over)
    assert any(seen)  # 3x3 convolutions, whose two layouts differ, were among the checked parameters
    # Two uninterrupted runs that differ only in the layout end 2.5e-4 apart (relative, the worst tensor): the
    # kernels' summation orders differ, and Adam normalises the round-off of near-zero gradients to O(lr) steps.
    rel = max(((a - b).norm() / a.norm().clamp_min(1e-12)).item()
              for a, b in zip(net_a.state_dict().values(), net_b.state_dict().values()))
    assert rel < 1e-3


def test_cifar10_mid_resume_inside_a_trajectory_buffer_is_bit_exact(tmp_path, monkeypatch):
    # --traj-buffer 8 at 2 trajectories per iteration (batch 32 = 2 micro-steps of 16 rows, 1 trajectory each): one
    # solve serves 4 iterations, so the checkpoint at iteration 3 lies inside the chunk [0, 4). The resumed run
    # re-draws the chunk's images from the stream position saved at its start and re-solves it at the same batch.
    # A network teacher, whose kernels may round differently at another batch: only the same solve is bit-exact.
    cc.main(["--preset", "tiny", "--stage", "pretrain", "--iters", "1", "--outdir", str(tmp_path / "t")])
    over = dict(stage="mid", teacher=str(tmp_path / "t" / "ckpt-latest.pt"), batch_gpu=16, traj_buffer=8, dropout=0.1)
    _, (net_a, ema_a) = run_stage(tmp_path / "a", **over)
    interrupt_in_iteration_5(tmp_path / "b", monkeypatch, **over)
    state = torch.load(tmp_path / "b" / "ckpt-latest.pt", weights_only=True)["data_state"][0]
    assert tuple(state["chunk"]) == (0, 4, True)  # (first draw, draws, one bulk solve)
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    _, (net_b, ema_b) = run_stage(tmp_path / "b", resume="auto", **over)
    weights = lambda net, ema: list(net.state_dict().values()) + list(ema.state_dict().values())  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(weights(net_a, ema_a), weights(net_b, ema_b)))
    # --traj-buffer may change on resume (RESUME_MAY_CHANGE): the chunk [0, 4) is finished as it was solved, then
    # each micro-step is solved alone. The pairs are the same to float rounding (see the bulk-solve test), and
    # RAdam's first steps are linear in the gradient: the weights agree to float32 round-off.
    sizes, real = [], cc.cmt_trajectories
    monkeypatch.setattr(cc, "cmt_trajectories", lambda *a: sizes.append(a[1].shape[0]) or real(*a))
    _, (net_c, ema_c) = run_stage(tmp_path / "c", resume="auto", **dict(over, traj_buffer=0))
    assert sizes == [8, 1, 1, 1, 1]  # the chunk again, then iterations 4 and 5: 2 micro-steps each
    for a, c in zip(weights(net_a, ema_a), weights(net_c, ema_c)):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("buffer, solved", [(None, [12]), (0, [1] * 12), (1, [1] * 12), (4, [4, 4, 4])])
def test_cifar10_mid_solves_in_bulk_by_default_and_per_micro_step_at_traj_buffer_0(tmp_path, monkeypatch, buffer,
                                                                                     solved):
    # 6 iterations x 2 micro-steps x 1 trajectory. Default --traj-buffer 128: the whole run's 12 in one solve (the
    # chunk ends with the run); 0, or fewer than one iteration's 2: sony/cmt's one solve per micro-step; 4: 2
    # iterations per solve.
    official = cc.resolve_config(cc.parse_args(["--stage", "mid"]))
    assert tiny_cfg(stage="mid")["traj_buffer"] == 128 == official["traj_buffer"]
    sizes, real = [], cc.cmt_trajectories
    monkeypatch.setattr(cc, "cmt_trajectories", lambda *a: sizes.append(a[1].shape[0]) or real(*a))
    run_stage(tmp_path, stage="mid", teacher="analytic", init="random", batch_gpu=16,
              **({} if buffer is None else {"traj_buffer": buffer}))
    assert sizes == solved


def test_cifar10_run_folder_refuses_another_run_and_checks_resume(tmp_path, capsys):
    run = ["--preset", "tiny", "--outdir", str(tmp_path / "run"), "--iters", "2", "--log-every", "1"]
    cc.main(run + ["--stage", "pretrain"])
    before = folder_bytes(tmp_path / "run")
    for argv, message in [
            (["--stage", "pretrain"], "already holds a pretrain run at iteration 2 of 2; continue it with --resume auto"),
            (["--stage", "post", "--init", "random", "--resume", "auto"], "a pretrain checkpoint (iteration 2); this run is --stage post"),
            (["--stage", "pretrain", "--resume", "auto", "--lr", "0.5"], "differs from this one: lr 0.002 -> 0.5"),
            (["--stage", "pretrain", "--resume", "auto", "--dropout", "0.3"], "dropout 0.0 -> 0.3")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            cc.main(run + argv)
        assert folder_bytes(tmp_path / "run") == before  # nothing written, changed or removed
    cc.main(run[:-4] + ["--iters", "3", "--log-every", "1", "--stage", "pretrain", "--resume", "auto"])  # iters may change
    assert "resumed from ckpt-latest.pt at iteration 2" in capsys.readouterr().out
    assert cc.read_checkpoint(tmp_path / "run" / "ckpt-latest.pt", "--resume")["iter"] == 3


@pytest.mark.parametrize("writer", ["cifar10 samples", "imagenet grid", "meanflow grid", "cifar10 comparison"])
def test_samples_and_grids_are_never_left_half_written(tmp_path, monkeypatch, writer):
    """A sample file or picture that fails half-way (disk full, a kill) leaves the previous file whole and no new
    partial one: they go through the scripts' write_atomic as checkpoints do. Here PNG encoding writes a few bytes
    and then raises."""
    def half_then_fail(self, fp, *args, **kwargs):
        (fp.write if hasattr(fp, "write") else open(fp, "wb").write)(b"\x89PNG half")
        raise OSError("disk full")
    u8 = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    write = {"cifar10 samples": lambda p: cc.save_samples(u8, p.with_suffix("")),
             "imagenet grid": lambda p: inet.save_grid(u8, p, 2),
             "meanflow grid": lambda p: mf.save_grid(u8.permute(0, 2, 3, 1).numpy(), p, 2),
             "cifar10 comparison": lambda p: cc.save_comparison([("x", u8.float() / 127.5 - 1)], p)}[writer]
    path = tmp_path / "out.png"
    write(path)
    before = path.read_bytes()
    assert Image.open(path).size[0] > 0
    monkeypatch.setattr(PIL.Image.Image, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write(path)
    assert path.read_bytes() == before


def test_cifar10_sigkill_inside_a_checkpoint_write_loses_nothing(tmp_path):
    """Killed while ckpt-latest.pt.tmp is being written, the previous ckpt-latest.pt stays loadable and
    --resume auto ends with the weights of an uninterrupted run."""
    argv = [sys.executable, str(ROOT / "cmt_cifar10.py"), "--preset", "tiny", "--stage", "pretrain", "--iters", "30",
            "--batch", "16", "--ckpt-every", "1", "--log-every", "10"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    subprocess.run(argv + ["--outdir", "ref"], cwd=tmp_path, env=env, check=True, capture_output=True)
    run, landed = tmp_path / "run", False
    for _ in range(20):  # a kill lands inside a write when the temp file outlives the process
        p = subprocess.Popen(argv + ["--outdir", "run", "--resume", "auto"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while p.poll() is None and not ((run / "ckpt-latest.pt").exists() and (run / "ckpt-latest.pt.tmp").exists()):
            pass
        p.kill()
        p.wait()
        landed = (run / "ckpt-latest.pt.tmp").exists()
        if landed:
            break
    assert landed, "no kill landed inside a checkpoint write in 20 tries"
    killed_at = cc.read_checkpoint(run / "ckpt-latest.pt", "--resume")["iter"]  # the previous one, whole
    assert 1 <= killed_at < 30
    subprocess.run(argv + ["--outdir", "run", "--resume", "auto"], cwd=tmp_path, env=env, check=True, capture_output=True)
    ref, got = (cc.read_checkpoint(tmp_path / d / "ckpt-latest.pt", "--resume") for d in ("ref", "run"))
    assert got["iter"] == 30
    for key in ("model", "ema"):
        assert all(torch.equal(ref[key][k], got[key][k]) for k in ref[key]), key


def test_cifar10_two_step_mid_t_follows_sony_cmt(tmp_path, monkeypatch):
    # sony/cmt ct_train.py and ct_eval.py: --mid_t default [0.821], kept by run_cmt+ecm_*.sh (post-training
    # and the evaluation of its students); run_cmt_cifar.sh passes --mid_t=7.7569e-01 (mid-training).
    official = cc.parse_args(["--stage", "post", "--init", "x"])
    assert cc.resolve_config(official)["mid_t"] == 0.821 and tiny_cfg(stage="post")["mid_t"] == 0.821
    assert cc.resolve_config(cc.parse_args(["--stage", "mid"]))["mid_t"] == 0.77569 == tiny_cfg(stage="mid")["mid_t"]
    assert tiny_cfg(stage="post", mid_t=0.5)["mid_t"] == 0.5
    run = ["--preset", "tiny", "--iters", "1", "--batch", "16", "--teacher", "analytic", "--init", "random"]
    cc.main(run + ["--stage", "post", "--outdir", str(tmp_path / "post")])
    cc.main(run + ["--stage", "mid", "--outdir", str(tmp_path / "mid")])
    seen, real = [], cc.sample_fewstep
    monkeypatch.setattr(cc, "sample_fewstep", lambda net, z, steps, mid_t, *a, **k: seen.append((steps, mid_t)) or real(net, z, steps, mid_t, *a, **k))
    for stage, flags, expected in (("post", [], 0.821), ("mid", [], 0.77569), ("post", ["--mid-t", "1.5"], 1.5)):
        seen.clear()
        cc.main(["--preset", "tiny", "--stage", "sample", "--num", "4", "--init", str(tmp_path / stage / "ckpt-latest.pt"),
                 "--outdir", str(tmp_path / f"s-{stage}-{len(flags)}"), *flags])
        assert (2, expected) in seen, (stage, flags, seen)


def test_nonfinite_loss_steps_as_sony_cmt_or_is_skipped_on_request(tmp_path, monkeypatch):
    # sony/cmt training/cmt_training_loop.py and ct_training_loop.py always step, after
    # torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5); --skip-nonfinite drops such a step.
    real, calls = cc.edm_loss, []

    def flaky(net, y, labels):
        calls.append(1)
        loss = real(net, y, labels)
        return loss * float("nan") if len(calls) == 2 else loss
    monkeypatch.setattr(cc, "edm_loss", flaky)
    for flag, steps in ((False, 4), (True, 3)):
        calls.clear()
        _, (net, ema) = run_stage(tmp_path / str(flag), stage="pretrain", iters=4, skip_nonfinite=flag)
        rows = [json.loads(l) for l in (tmp_path / str(flag) / "stats.jsonl").read_text().splitlines()]
        assert rows[-1]["nonfinite"] == 1 and all(math.isfinite(r["loss"]) for r in rows)
        assert all(torch.isfinite(p).all() for p in list(net.parameters()) + list(ema.parameters()))
        adam = torch.load(tmp_path / str(flag) / "ckpt-latest.pt", weights_only=True)["optimizer"]["state"]
        assert {int(v["step"]) for v in adam.values()} == {steps}, flag  # optimizer steps taken
    monkeypatch.setattr(cc, "edm_loss", lambda net, y, labels: real(net, y, labels) * float("nan"))
    with pytest.raises(SystemExit, match="--max-nonfinite 2"):
        run_stage(tmp_path / "abort", stage="pretrain", iters=4, max_nonfinite=2)


def test_cmt_trajectories_are_cleaned_of_nonfinite_values(monkeypatch):
    # sony/cmt training/loss.py DPMSolverLoss: Traj = torch.nan_to_num(Traj), D_y_ref = torch.nan_to_num(D_y_ref).
    bad = [torch.full((2, 3, 4, 4), v) for v in (float("nan"), float("inf"), 1.0)]
    monkeypatch.setattr(cc, "dpm_solver_pp", lambda denoise, x, sigmas: bad)
    states, target = cc.cmt_trajectories(None, torch.zeros(2, 3, 4, 4), None, steps=2)
    assert torch.isfinite(states).all() and torch.isfinite(target).all()
    assert (states[0] == 0).all() and (states[1] == torch.finfo(torch.float32).max).all() and (target == 1).all()


CIFAR10_DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import cmt_cifar10 as cc
torch.set_num_threads(1)
rank, world, device = cc.init_distributed()
rounds = int(sys.argv[2])
cfg = cc.resolve_config(cc.parse_args(["--preset", "tiny", "--stage", "mid", "--outdir", "x"]))
torch.manual_seed(0)
net = cc.build_net(cfg, "ecm", dropout=0.0)
g = torch.Generator().manual_seed(1)
y, noise = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g)
sigma = torch.linspace(0.1, 5, 8)
per = 8 // (world * rounds)
def micro_loss(m, it, r):  # micro-batch r of this rank: a fixed, deterministic slice of the global batch
    i = (rank * rounds + r) * per
    return (m(y[i:i+per] + sigma[i:i+per].view(-1, 1, 1, 1) * noise[i:i+per], sigma[i:i+per], train=True)
            - y[i:i+per]).square().flatten(1).sum(1)
ddp = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
cc.accumulate_gradients(ddp, micro_loss, 0, rounds)
if rank == 0:
    torch.save([p.grad for p in net.parameters()], sys.argv[3])
if world > 1:
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


def test_ddp_accumulation_equivalence(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(CIFAR10_DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(script), str(ROOT), "4", str(tmp_path / "g1.pt")], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script), str(ROOT), "2", str(tmp_path / "g2.pt")], check=True, env=env,
                   capture_output=True)
    g1, g2 = torch.load(tmp_path / "g1.pt"), torch.load(tmp_path / "g2.pt")
    for a, b in zip(g1, g2):
        # Same sums in a different order (micro-batch grouping, all-reduce): float32 rounding only.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert sum(float(a.abs().sum()) for a in g1) > 0


@pytest.mark.filterwarnings("ignore::UserWarning")  # fid.py warns that 4 images make a biased FID
def test_fid_during_training(tmp_path, monkeypatch):
    # The plumbing generation -> fid.inception_stats -> fid.load_ref -> fid.frechet_distance, with a
    # random-weight Inception and the 2048-d matrix square root (tens of seconds on CI) replaced by the
    # mean term, which is enough to see that our 4 images and the reference reached it.
    import fid
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": fid.random_inception())
    monkeypatch.setattr(fid, "resolve_weights", lambda weights=None: Path("random"))  # looked for at the start
    seen = []
    monkeypatch.setattr(fid, "frechet_distance", lambda m1, s1, m2, s2: seen.append((m1, s1, m2, s2)) or
                        float(((np.asarray(m1) - m2) ** 2).sum()))
    np.savez(tmp_path / "ref.npz", mu=np.full(2048, 0.5), sigma=np.eye(2048))
    run_stage(tmp_path / "run", stage="post", init="random", iters=2, fid_ref=str(tmp_path / "ref.npz"), fid_num=4)
    rows = [json.loads(l) for l in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert rows[-1]["iter"] == 2 and all(math.isfinite(rows[-1][k]) and rows[-1][k] > 0 for k in ("fid_1step", "fid_2step"))
    assert len(seen) == 2 and rows[-1]["fid_1step"] != rows[-1]["fid_2step"]
    m1, s1, m2, s2 = seen[0]
    assert np.shape(s1) == (2048, 2048) and np.all(np.asarray(m2) == 0.5) and np.any(np.asarray(m1) != 0)


def test_batch_split_error(tmp_path):
    with pytest.raises(SystemExit, match="--batch"):
        run_stage(tmp_path, batch=30, batch_gpu=8)
    with pytest.raises(SystemExit, match="--batch-gpu"):
        run_stage(tmp_path, stage="mid", teacher="analytic", init="random", batch=24, batch_gpu=24)


def test_cifar10_tiny_preset_end_to_end(tmp_path, capsys):
    cc.main(["--preset", "tiny", "--iters", "4", "--outdir", str(tmp_path), "--eval-num", "300"])
    out = capsys.readouterr().out
    for row in ("teacher (EDM)", "mid (CMT)", "post (CMT -> ECT)", "baseline ECT, teacher init", "baseline ECT, random init"):
        assert row in out
    for sub in ("teacher", "mid", "post"):
        assert (tmp_path / sub / "ckpt-latest.pt").exists() and (tmp_path / sub / "config.json").exists()
        row = json.loads((tmp_path / sub / "stats.jsonl").read_text().splitlines()[-1])
        assert {"iter", "kimg", "loss", "grad_norm", "lr", "it_per_s", "img_per_s", "nonfinite", "sec"} <= set(row)
    table = (tmp_path / "quality.txt").read_text()
    assert "nan" not in table.split("\n", 2)[2]  # every model row has real numbers
    cc.main(["--stage", "sample", "--init", str(tmp_path / "post" / "ckpt-latest.pt"),
             "--outdir", str(tmp_path / "s"), "--num", "16"])
    data = np.load(tmp_path / "s" / "samples-2step.npz")["images"]
    assert data.shape == (16, 8, 8, 3) and data.dtype == np.uint8 and (tmp_path / "s" / "samples-1step.png").exists()
    # The comparison picture: 10 labelled rows (exact map, teacher, then mid, post and the two baselines at 1 and
    # 2 steps) of the quality table's first 12 samples, enlarged 8x with 4-pixel gaps. The noise is the table's in
    # every row: the exact map's first tile is that of its first noise, and the 1-step rows sample f(80 z, 80).
    pic = np.asarray(Image.open(tmp_path / "comparison.png"))
    assert pic.shape == (10 * (8 * 8 + 4), 190 + 12 * (8 * 8 + 4), 3)
    q = cc.ToyQuality(tiny_cfg(stage="post"), 300)
    tile = lambda row, j: pic[row * 68:row * 68 + 64:8, 190 + j * 68:190 + j * 68 + 64:8]  # noqa: E731
    assert np.array_equal(tile(0, 0), cc.to_uint8(q.exact[0]).permute(1, 2, 0).numpy())
    post = cc.build_net(tiny_cfg(stage="post"), "ecm", dropout=0.0)
    post.load_state_dict(torch.load(tmp_path / "post" / "ckpt-latest.pt", weights_only=True)["ema"])
    one_step = cc.to_uint8(q.sample(post, 1)[:12]).permute(0, 2, 3, 1).numpy()
    assert all(np.array_equal(tile(4, j), one_step[j]) for j in (0, 11))  # row 4: post, 1 step
    assert not np.array_equal(tile(4, 0), tile(2, 0))  # mid and post differ


def test_cifar10_small32_preset_runs_the_pipeline_on_a_folder_of_pngs(tmp_path, capsys):
    # A user's own 32x32 images: pretrain -> mid -> post -> sample with the small32 preset (1.26M parameters), from
    # a generated folder of 40 PNGs (smooth random colour fields: any RGB image will do), 2 iterations a stage.
    g = np.random.default_rng(0)
    (tmp_path / "png").mkdir()
    for i in range(40):
        field = g.normal(size=(4, 4, 3)).repeat(8, 0).repeat(8, 1)
        Image.fromarray(np.uint8(np.clip(128 + 60 * field, 0, 255))).save(tmp_path / "png" / f"{i:03d}.png")
    assert sum(p.numel() for p in cc.build_net(cc.PRESETS["small32"], "ecm").parameters()) == pytest.approx(1.26e6, rel=0.01)
    common = ["--preset", "small32", "--data", str(tmp_path / "png"), "--iters", "2"]
    cc.main(common + ["--stage", "pretrain", "--outdir", str(tmp_path / "t"), "--grid", "4"])
    cc.main(common + ["--stage", "mid", "--teacher", str(tmp_path / "t" / "ckpt-latest.pt"), "--outdir",
                      str(tmp_path / "m"), "--grid", "0"])
    cc.main(common + ["--stage", "post", "--init", str(tmp_path / "m" / "ckpt-latest.pt"), "--outdir", str(tmp_path / "p")])
    cc.main(["--stage", "sample", "--init", str(tmp_path / "p" / "ckpt-latest.pt"), "--num", "4", "--outdir",
             str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert "[pretrain] it 2/2" in out and "[mid] it 2/2" in out and "[post] it 2/2" in out
    # --grid 4: a 2x2 grid (each 32x32 image at its size); --grid 0: none; the default 64 for the post student,
    # 1- and 2-step; the sample stage writes --num images.
    assert Image.open(tmp_path / "t" / "samples-0000002.png").size == (64, 64)
    assert np.load(tmp_path / "t" / "samples-0000002.npz")["images"].shape == (4, 32, 32, 3)
    assert not list((tmp_path / "m").glob("samples-*"))
    assert Image.open(tmp_path / "p" / "samples-0000002-2step.png").size == (256, 256)
    assert np.load(tmp_path / "s" / "samples-2step.npz")["images"].shape == (4, 32, 32, 3)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["batch"] == 32


# ----------------------------------------------------------------------------- evidence study and benchmark (experiments/)

def test_exact_flow_map_is_second_order_and_matches_the_gaussian():
    # One component: the per-sample flow map has the closed form of cc.gaussian_flow_map. The vectorised
    # multistep solver is second order (first-order first and last steps keep the global error O(h^2)).
    toy = cc.ToyMixture(resolution=2, components=1)
    mean, std = toy.means[0].double(), float(toy.stds[0])
    g = torch.Generator().manual_seed(0)
    t = torch.exp(torch.randn(64, generator=g, dtype=torch.float64) * 2 - 1.1).clamp(min=0.01, max=80)
    x = mean + torch.randn(64, *toy.shape, generator=g, dtype=torch.float64) * (std ** 2 + t.view(-1, 1, 1, 1) ** 2).sqrt()
    exact = cc.gaussian_flow_map(x, t.view(-1, 1, 1, 1), cc.CMT_SIGMA_MIN, mean, std)
    errs = [float((study_ect.exact_flow_map(toy, x, t, steps=n) - exact).abs().max()) for n in (16, 32, 64)]
    assert 1.7 < slope([1 / 16, 1 / 32, 1 / 64], errs) < 2.3
    # The study's 256 steps: second order puts them 16x below the 64-step error (1.8e-4 -> 1.1e-5 here).
    assert float((study_ect.exact_flow_map(toy, x, t) - exact).abs().max()) < errs[-1] / 8
    below = torch.full((3,), 1e-3, dtype=torch.float64)  # at or below the end level: the identity
    assert torch.equal(study_ect.exact_flow_map(toy, x[:3], below), x[:3])


def test_study_cost_counts_passes():
    # ECT: 3B (grad pass) + B (target) = 4B = 1 unit; CMT: 3B + B teacher NFE = 1 unit; reuse K: 3B + B/K.
    assert study_ect.study_cost("post", 10) == 10 and study_ect.study_cost("mid", 10) == 10
    assert study_ect.study_cost("mid", 8, traj_reuse=4) == pytest.approx(8 * 3.25 / 4)


def test_teacher_steps_changes_trajectory_and_pair_layout(tmp_path):
    states, target = cc.cmt_trajectories(cc.ToyMixture(), torch.zeros(2, 3, 8, 8), None, steps=8)
    assert states.shape[:2] == (8, 2)
    x, sigmas, targets, _ = cc.cmt_pairs(states, target, None)
    assert torch.allclose(sigmas, cc.logsnr_grid(8)[:8].float().repeat_interleave(2))
    assert torch.equal(targets[:2], targets[2:4]) and x.shape[0] == 16
    with pytest.raises(SystemExit, match="--teacher-steps 12"):
        run_stage(tmp_path, stage="mid", teacher="analytic", init="random", batch=16, batch_gpu=16, teacher_steps=12)


def test_study_runs_end_to_end(tmp_path):
    study_ect.main(["--outdir", str(tmp_path), "--seeds", "2", "--budget", "20", "--eval-every", "10",
                    "--splits", "0.5", "--teacher-iters", "10", "--eval-num", "64"])
    res = json.loads((tmp_path / "study.json").read_text())
    assert set(res["q1"]) == {"CMT -> ECT", "teacher -> ECT", "random -> ECT"}
    for arm, runs in res["q1"].items():
        xs = [[pt[0] for pt in curve] for curve in runs.values()]
        assert len(runs) == 2 and xs[0] == xs[1] and xs[0][0] == 0 and xs[0][-1] == 20, arm
        assert all(math.isfinite(pt[1]["err1"]) and math.isfinite(pt[1]["err2"]) for c in runs.values() for pt in c)
    # The CMT arm's curve: the teacher init, mid snapshots at 10 (= 1/3 of 20, rounded to the grid), post after.
    assert [pt[0] for pt in res["q1"]["CMT -> ECT"]["seed0"]] == [0, 10, 20]
    assert res["q1"]["CMT -> ECT"]["seed0"][0][1] == res["q1"]["teacher -> ECT"]["seed0"][0][1]  # same start
    assert set(res["q2"]) == {"split mid 50%", "solver steps 8", "solver steps 32", "metric huber",
                              "traj-reuse 4", "traj-reuse 16"}
    assert res["q2"]["traj-reuse 4"]["seed1"]["cost"] == pytest.approx(study_ect.study_cost("mid", 10, 4) + 10)
    for arm in ("CMT", "teacher", "random"):
        b = res["q3"][arm]["seed0"]
        assert b["target_err"] > 0 and b["rel_bias"] >= 0 and -1 <= b["cosine"] <= 1
    report = (tmp_path / "study.md").read_text()
    assert "Q1" in report and "Q2" in report and "Q3" in report and "nan" not in report
    assert PIL.Image.open(tmp_path / "study-convergence.png").size == (1120, 400)
    for run in ("cmt-mid", "cmt-post", "teacher-post", "random-post"):  # snapshots evaluated, then removed
        assert not list((tmp_path / "seed0" / run).glob("ckpt-00*.pt")) and (tmp_path / "seed0" / run / "ckpt-latest.pt").exists()


def test_bench_cifar10_reports_flop_rate_and_mid_to_plain_ratio(capsys):
    res = bench_cifar10.main(["--preset", "tiny", "--batch-gpu", "16", "--reps", "1"])
    assert res["mid_over_plain"] == pytest.approx(res["mid_s"] / res["plain_s"]) and res["peak_gb"] > 0
    assert res["img_per_s_plain"] == pytest.approx(16 / res["plain_s"]) and 0 < res["frac_peak"]
    out = capsys.readouterr().out
    assert "of fp32 matmul peak" in out and "plain student step (batch 16)" in out
    ratios = [float(line.split("= ")[-1].split("x")[0]) for line in out.splitlines() if line.startswith("mid step")]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)  # --traj-reuse 1 and 4
    # Bulk trajectories: 16 rows / 16 steps = 1 trajectory per micro-step, the default buffer of 128 in one solve.
    assert res["traj_buffer"] == 128 and res["teacher_s_per_traj_1"] > 0 and res["teacher_s_per_traj_bulk"] > 0
    assert res["teacher_s_per_traj_1"] == pytest.approx(res["mid_s"] - res["mid_student_s"])
    assert res["mid_bulk_s"] == pytest.approx(res["mid_student_s"] + res["teacher_s_per_traj_bulk"])
    assert res["mid_bulk_over_plain"] == pytest.approx(res["mid_bulk_s"] / res["plain_s"])
    assert res["img_per_s_mid_bulk"] == pytest.approx(16 / res["mid_bulk_s"]) and "in a buffer of 128" in out


# ==================================================================================================
# cmt_imagenet.py
# ==================================================================================================

# Rows of the bad-input table (test_bad_input_is_one_line_exit_2_and_writes_nothing, at the end of the file):
# pytest.param(script, argv, setup, expected, id=...): argv and expected items may use {tmp};
# setup(tmp) makes the inputs in the test's folder, which is also the working directory.
_TI = ["--preset", "tiny", "--outdir", "{tmp}/run"]
_POST = _TI + ["--stage", "post", "--teacher", "analytic", "--init", "random"]
BAD_INPUTS_IMAGENET = [pytest.param("cmt_imagenet.py", argv, setup, expected, id="imagenet-" + name) for name, argv, setup, expected in [
    ("unknown-preset", ["--preset", "img1024-s", "--stage", "mid"], None, ["--preset", "'img1024-s'"]),
    ("batch-zero", _TI + ["--stage", "pretrain", "--batch", "0"], None, ["--batch", "'0'"]),
    ("batch-gpu-not-whole-trajectories", _TI + ["--stage", "mid", "--teacher", "analytic", "--batch", "24"], None,
     ["--batch-gpu 24", "--teacher-steps 16"]),
    ("data-mixed-sizes", _TI + ["--stage", "pretrain", "--data", "{tmp}/d"], lambda t: make_pngs(t / "d", (8, 16), labels={"img0.png": 0, "img1.png": 1}),
     ["--data", "img1.png", "(3, 16, 16)", "expected (3, 8, 8)"]),
    ("data-labels-mismatch", _TI + ["--stage", "pretrain", "--data", "{tmp}/d"], lambda t: make_pngs(t / "d", (8, 8), labels={"img0.png": 0}),
     ["--data", "no label for img1.png"]),
    ("data-label-out-of-range", _TI + ["--stage", "pretrain", "--data", "{tmp}/d"], lambda t: make_pngs(t / "d", (8, 8), labels={"img0.png": 0, "img1.png": 9}),
     ["--data", "classes 0..5"]),
    ("data-not-png", _TI + ["--stage", "pretrain", "--data", "{tmp}/d"],
     lambda t: make_pngs(t / "d", (8, 8), labels={"img0.png": 0, "img1.png": 1}).joinpath("img0.png").write_bytes(b"GIF89a"),
     ["--data", "img0.png", "not a readable PNG"]),
    ("teacher-truncated-pkl", _TI + ["--stage", "mid", "--teacher", "{tmp}/t.pkl"],
     lambda t: (t / "t.pkl").write_bytes(pickle.dumps({"ema": list(range(100))})[:40]), ["--teacher", "t.pkl", "not a readable"]),
    ("guide-truncated", _TI + ["--stage", "post", "--teacher", "analytic", "--init", "random", "--guide", "{tmp}/g.pt"],
     lambda t: make_truncated(t / "g.pt"), ["--guide", "g.pt", "not a readable checkpoint"]),
    ("init-other-script", _TI + ["--stage", "post", "--teacher", "analytic", "--init", "{tmp}/m.pt"],
     lambda t: make_ckpt(t / "m.pt", "cmt_cifar10.py", "mid"), ["--init", "a checkpoint of cmt_cifar10.py, not of cmt_imagenet.py"]),
    ("init-malicious", ["--preset", "tiny", "--stage", "sample", "--init", "{tmp}/m.pt", "--outdir", "{tmp}/s"],
     lambda t: make_evil(t / "m.pt"), ["--init", "refused", "nothing in it was run"]),
    ("vae-garbage", ["--preset", "img512-xs", "--stage", "sample", "--init", "{tmp}/m.pt", "--vae", "{tmp}/v.bin", "--outdir", "{tmp}/s"],
     lambda t: (t / "v.bin").write_bytes(bytes(range(256)) * 4), ["--vae", "v.bin", "not readable sd-vae-ft-mse weights"]),
    ("post-bf16-gap-below-rounding", _POST + ["--bf16", "--ect-q", "1024"], None,
     ["--bf16 with --stage post", "1/1024 = 0.00098", "bfloat16's rounding 0.0039"]),
    ("post-tf32-gap-below-rounding", _POST + ["--tf32", "--ect-q", "4096"], None,
     ["--tf32 with --stage post", "1/4096 = 0.00024", "TF32's rounding 0.00049"]),
    ("tiny-pipeline-bf16-gap-below-rounding", _TI + ["--bf16", "--ect-q", "512"], None,  # refused before any training
     ["--bf16 with --stage post", "1/512 = 0.002"]),
    ("resume-other-stage", _POST + ["--resume", "auto"], lambda t: make_ckpt(t / "run" / "ckpt-latest.pt", "cmt_imagenet.py", "mid"),
     ["--resume", "a mid checkpoint", "--stage post"]),
    ("fid-ref-missing", ["--preset", "tiny", "--stage", "sample", "--init", "teacher", "--teacher", "analytic", "--outdir",
                         "{tmp}/s", "--fid-ref", "{tmp}/r.npz"], None, ["--fid-ref", "r.npz", "cannot read"]),
    ("outdir-is-a-file", ["--preset", "tiny", "--stage", "pretrain", "--outdir", "{tmp}/f"], lambda t: (t / "f").write_text("x"),
     ["--outdir", "is a file"]),
    ("encode-outdir-holds-files", ["--preset", "img64-s", "--stage", "encode", "--data", "{tmp}/src", "--outdir", "{tmp}/out"],
     lambda t: (make_pngs(t / "src" / "n01"), make_pngs(t / "out")), ["--outdir", "already holds 3 files"]),
    ("encode-resume-other-files", ["--preset", "img64-s", "--stage", "encode", "--data", "{tmp}/src", "--outdir", "{tmp}/out",
                                   "--resume", "auto"], lambda t: (make_pngs(t / "src" / "n01"), make_pngs(t / "out")),
     ["--outdir", "not an encode's folders"]),
    ("encode-resume-path", ["--preset", "img64-s", "--stage", "encode", "--data", "{tmp}/src", "--outdir", "{tmp}/out",
                            "--resume", "{tmp}/ckpt.pt"], lambda t: make_pngs(t / "src" / "n01"),
     ["--resume", "continues with --resume auto"]),
]]


@pytest.fixture
def inet_one_thread():
    """Tiny 8x8 networks run fastest single-threaded (and a busy CI core makes 2 threads spin)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def inet_cfg(*argv):
    return inet.resolve_config(inet.parse_args(list(argv)))


# ----------------------------------------------------------------------------- network
def test_imagenet_mp_primitives_unit_magnitude():
    torch.manual_seed(0)
    rms = lambda t: t.square().mean().sqrt().item()  # noqa: E731
    a, b = torch.randn(64, 256, 8, 8), torch.randn(64, 128, 8, 8)
    # 1e-2: statistical error of an RMS over ~1e6 (or 2.6e5) unit-variance samples is ~1e-3.
    assert rms(inet.normalize(3 * a)) == pytest.approx(1, abs=1e-3)
    assert rms(inet.mp_silu(a)) == pytest.approx(1, abs=1e-2)
    assert rms(inet.mp_sum(a, torch.randn_like(a), frac=0.3)) == pytest.approx(1, abs=1e-2)
    assert rms(inet.mp_cat(a, b, frac=0.5)) == pytest.approx(1, abs=1e-2)
    assert rms(inet.MPFourier(4096)(torch.randn(256))) == pytest.approx(1, abs=2e-2)
    conv, lin = inet.MPConv(256, 64, [3, 3]), inet.MPConv(256, 512, [])
    # zero padding: a border pixel sees 2 of 3 taps per axis, so on 8x8 maps the expected RMS is
    # (6/8 + 2/8 * 2/3) = 0.9167 instead of 1
    assert rms(conv(a)) == pytest.approx((6 + 2 * 2 / 3) / 8, abs=1e-2)
    assert rms(lin(torch.randn(512, 256))) == pytest.approx(1, abs=2e-2)
    assert rms(lin(torch.randn(512, 256), gain=0.5)) == pytest.approx(0.5, abs=1e-2)
    blk = inet.Block(128, 256, 512, "enc", "down", attention=True).eval()
    with torch.no_grad():
        blk.emb_gain.fill_(1.0)
        out = blk(b, torch.randn(64, 512))
    assert out.shape == (64, 256, 4, 4) and 0.7 < rms(out) < 1.3  # a whole block stays O(1) by design


def test_imagenet_forced_weight_normalisation():
    torch.manual_seed(0)
    conv = inet.MPConv(16, 8, [3, 3])
    with torch.no_grad():
        conv.weight.mul_(torch.linspace(0.1, 5, 8).reshape(-1, 1, 1, 1))
    x = torch.randn(2, 16, 5, 5)
    before = conv.weight.detach().clone()
    y_eval = conv.eval()(x)
    assert torch.equal(conv.weight, before)  # eval mode never writes the weights
    y_train = conv.train()(x)
    norms = conv.weight.detach().flatten(1).norm(dim=1)
    # each output row now has unit RMS (norm sqrt(fan_in)); eps 1e-4 in normalize gives ~1e-4 relative error
    torch.testing.assert_close(norms, torch.full([8], math.sqrt(16 * 9)), rtol=1e-3, atol=0)
    # the function is unchanged up to normalize's eps: 1e-4 against a row RMS >= 0.1 is <= 1e-3 relative
    torch.testing.assert_close(y_train, y_eval, rtol=2e-3, atol=2e-3)
    with inet.no_forced_wn(conv):
        with torch.no_grad():
            conv.weight.mul_(2)
        conv(x)
        assert conv.weight.detach().flatten(1).norm(dim=1).mean() > 2 * math.sqrt(16 * 9) * 0.99


def test_imagenet_official_key_layout():
    # Facts copied from the official EDM2 Precond key lists of size S (shared/ref/keys/edm2_img512_s_Precond.txt
    # and edm2_img64_s_Precond.txt, dumped from the NVlabs/edm2 pickles): 203 tensors, these names and shapes.
    # (The full lists were checked name by name and shape by shape when this test was written; the test does
    # not read ../shared.)
    with torch.device("meta"):
        net512 = inet.build_net(inet_cfg("--stage", "mid", "--preset", "img512-s"), logvar=True)
        net64 = inet.build_net(inet_cfg("--stage", "mid", "--preset", "img64-s"), logvar=True)
    sd = {k: tuple(v.shape) for k, v in net512.state_dict().items()}
    assert len(sd) == 203
    names = list(sd)
    assert names[:5] == ["unet.out_gain", "unet.emb_fourier.freqs", "unet.emb_fourier.phases",
                         "unet.emb_noise.weight", "unet.emb_label.weight"]
    assert names[-4:] == ["unet.out_conv.weight", "logvar_fourier.freqs", "logvar_fourier.phases",
                          "logvar_linear.weight"]
    expect = {"unet.out_gain": (), "unet.emb_noise.weight": (768, 192), "unet.emb_label.weight": (768, 1000),
              "unet.enc.64x64_conv.weight": (192, 5, 3, 3), "unet.enc.32x32_block0.conv_skip.weight": (384, 192, 1, 1),
              "unet.enc.16x16_block0.attn_qkv.weight": (1728, 576, 1, 1),
              "unet.enc.8x8_block2.attn_proj.weight": (768, 768, 1, 1),
              "unet.dec.8x8_in0.attn_qkv.weight": (2304, 768, 1, 1), "unet.dec.8x8_block3.conv_res0.weight": (768, 1344, 3, 3),
              "unet.dec.16x16_block0.conv_skip.weight": (576, 1344, 1, 1),
              "unet.dec.64x64_block3.conv_skip.weight": (192, 384, 1, 1), "unet.out_conv.weight": (4, 192, 3, 3),
              "logvar_linear.weight": (1, 128)}
    for k, shape in expect.items():
        assert sd[k] == shape, k
    sd64 = {k: tuple(v.shape) for k, v in net64.state_dict().items()}
    assert len(sd64) == 203 and list(sd64) == names
    assert sd64["unet.enc.64x64_conv.weight"] == (192, 4, 3, 3) and sd64["unet.out_conv.weight"] == (3, 192, 3, 3)
    with torch.device("meta"):  # the CMT student drops the logvar head: 200 tensors
        assert len(inet.build_net(inet_cfg("--stage", "mid", "--preset", "img512-xxl")).state_dict()) == 200


def test_imagenet_presets_and_paper_recipe():
    # sony/cmt imagenet512/run_cmt_512.sh and run_ecd_512.sh
    mid = inet_cfg("--stage", "mid")  # the default preset is the paper's img512-xxl
    assert (mid["lr"], mid["lr_decay"], tuple(mid["betas"]), mid["ema"], mid["batch"]) == \
        (2e-4, "linear", (0.9, 0.999), 0.999, 128)
    assert mid["iters"] == 100_000 and mid["mimg"] == pytest.approx(12.8)
    assert (mid["metric"], mid["huber_c"], mid["teacher_steps"], mid["tf32"], mid["dropout"], mid["init"]) == \
        ("huber", 0.06, 16, False, 0.0, "teacher")
    assert mid["teacher"].endswith("/edm2-img512-xxl-0939524-0.070.pkl") and mid["guide"] is None
    assert inet.learning_rate(mid, 0) == 2e-4 and inet.learning_rate(mid, 50_000) == pytest.approx(1e-4)
    post = inet_cfg("--stage", "post")
    assert (post["lr"], post["lr_decay"], tuple(post["betas"]), post["ema"], post["batch"]) == \
        (1e-6, "constant", (0.9, 0.99), 0.9999, 128)
    assert (post["post_loss"], post["solver"], post["ect_q"], post["ect_double"], post["p_mean"], post["p_std"],
            post["huber_c"], post["k"], post["b"]) == ("ecd", "heun", 1024.0, 0, -0.8, 1.6, 0.06, 8.0, 1.0)
    assert post["teacher"].endswith("/edm2-img512-xxl-0939524-0.075.pkl") and post["guidance"] == 2.05
    assert post["guide"].endswith("/edm2-img512-m-0268435-0.155.pkl") and post["init"] is None
    assert inet.learning_rate(post, 99_999) == 1e-6
    sample = inet_cfg("--stage", "sample")
    assert sample["mid_t"] == 1.526 and sample["init"] is None and not any(isinstance(v, dict) for v in sample.values())
    for kind, cin in (("img512", 4), ("img64", 3)):
        for size, ch in zip(("xs", "s", "m", "l", "xl", "xxl"), (128, 192, 256, 320, 384, 448)):
            cfg = inet_cfg("--stage", "mid", "--preset", f"{kind}-{size}")
            assert (cfg["model_channels"], cfg["img_channels"], cfg["res"], cfg["latent"]) == (ch, cin, 64, kind == "img512")
            with torch.device("meta"):
                sd = inet.build_net(cfg).state_dict()
            assert sd["unet.enc.64x64_conv.weight"].shape == (ch, cin + 1, 3, 3)  # + the constant-ones channel
            assert sd["unet.emb_noise.weight"].shape == (4 * ch, ch) and sd["unet.emb_label.weight"].shape == (4 * ch, 1000)


def test_imagenet_cli_help_and_names(tmp_path):
    parser = inet.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert "(default:" in action.help, action.option_strings  # every flag states its default
    flags = {s for action in parser._actions for s in action.option_strings}
    assert flags >= {"--stage", "--preset", "--outdir", "--data", "--teacher", "--init", "--resume", "--batch",
                     "--batch-gpu", "--iters", "--mimg", "--lr", "--ema", "--seed", "--fid-ref", "--bf16", "--tf32",
                     "--compile", "--ckpt-every", "--sample-every"}
    stage = next(action for action in parser._actions if action.dest == "stage")
    assert set(stage.choices) >= {"pretrain", "mid", "post", "sample"}
    for name in ("load_official_pkl", "edm_precond", "ecm_precond", "dpm_solver_pp", "heun_sampler", "cmt_loss",
                 "ect_t_to_r", "ect_loss", "ecd_loss", "sample_fewstep"):
        assert callable(getattr(inet, name)), name
    with pytest.raises(SystemExit, match="argument --preset: invalid choice: 'img1024-s'"):
        inet_cfg("--stage", "mid", "--preset", "img1024-s")
    with pytest.raises(SystemExit, match="--iters and --mimg"):
        inet_cfg("--stage", "mid", "--iters", "5", "--mimg", "1")
    with pytest.raises(SystemExit, match="--init"):
        inet.main(["--stage", "post", "--preset", "tiny", "--teacher", "analytic", "--outdir", str(tmp_path)])


# ----------------------------------------------------------------------------- official pickle
def inet_fake_reconstruct(meta):  # pickled by reference only; loading must never call it
    raise AssertionError("the real reconstruct function must never run")


inet_fake_reconstruct.__module__ = "torch_utils.persistence"
inet_fake_reconstruct.__name__ = inet_fake_reconstruct.__qualname__ = "_reconstruct_persistent_obj"


class InetEasyDict(dict):
    pass


InetEasyDict.__module__, InetEasyDict.__name__, InetEasyDict.__qualname__ = "dnnlib.util", "EasyDict", "EasyDict"


def inet_fake_official_modules():
    return pkl_fake_official_modules(inet_fake_reconstruct, InetEasyDict)


def inet_persistent_reduce(self):
    """What torch_utils.persistence.persistent_class pickles: a call with meta = {type, version,
    module_src, class_name, state}; state is the object's __dict__."""
    meta = dict(type="class", version=6, module_src="raise RuntimeError('module_src must never run')",
                class_name=type(self).__name__, state=dict(self.__dict__))
    return inet_fake_reconstruct, (meta,)


def test_imagenet_edm2_pickle_loads_float32(tmp_path):
    cfg = inet_cfg("--stage", "mid", "--preset", "tiny")
    torch.manual_seed(3)
    net = inet.build_net(cfg, logvar=True).half().eval()
    ref = {k: v.clone() for k, v in net.state_dict().items()}
    fake = copy.deepcopy(net)
    for m in fake.modules():  # every EDM2 class is persistent; ModuleDict pickles normally
        if type(m) is not torch.nn.ModuleDict:
            m.__class__ = type(type(m).__name__, (type(m),), {"__reduce__": inet_persistent_reduce})
    fake._init_kwargs = dict(img_resolution=8, img_channels=3, label_dim=6, model_channels=16, channel_mult=[1, 2],
                             num_blocks=1, attn_resolutions=[4], dropout=0.0, use_fp16=True)
    path = tmp_path / "edm2-toy.pkl"
    with inet_fake_official_modules(), open(path, "wb") as f:
        pickle.dump(InetEasyDict(dataset_kwargs=InetEasyDict(path="x.zip"), loss_fn=None, ema=fake), f)
    teacher = inet.load_network(str(path), cfg, "teacher")  # strict: every name and shape must match
    got = teacher.state_dict()
    assert list(got) == list(ref)
    for k, v in ref.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k].half(), v), k  # float16 -> float32 is exact
    bad = dict(cfg, model_channels=32)
    with pytest.raises(SystemExit, match="--teacher .* model_channels"):
        inet.load_network(str(path), bad, "teacher")


def inet_official_pkl(tmp_path, cfg, use_fp16=True):
    """The tiny preset's network pickled as an official EDM2 Precond with the given use_fp16, its 0-dim gains at 0.5
    (a fresh EDM2 net's are 0: out_gain = 0 makes the U-Net's output exactly 0, which any precision computes alike)."""
    torch.manual_seed(3)
    net = inet.build_net(cfg, logvar=True).half().eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.5)
    for m in net.modules():
        if type(m) is not torch.nn.ModuleDict:
            m.__class__ = type(type(m).__name__, (type(m),), {"__reduce__": inet_persistent_reduce})
    net._init_kwargs = dict(img_resolution=8, img_channels=3, label_dim=6, model_channels=16, channel_mult=[1, 2],
                            num_blocks=1, attn_resolutions=[4], dropout=0.0, use_fp16=use_fp16)
    path = tmp_path / f"edm2-fp16-{use_fp16}.pkl"
    with inet_fake_official_modules(), open(path, "wb") as f:
        pickle.dump(InetEasyDict(dataset_kwargs=InetEasyDict(path="x.zip"), loss_fn=None, ema=net), f)
    return str(path)


@pytest.mark.parametrize("pickled,flag,want", [(True, None, True), (False, None, False), (True, False, False),
                                               (False, True, True)])
def test_imagenet_guide_runs_as_its_pickle_says(tmp_path, pickled, flag, want):
    # sony/cmt imagenet512/training/cd_guid_training_loop_512.py: gnet = pickle.load(f)['ema'], i.e. EDM2's
    # Precond with its own use_fp16 (float16 on CUDA); the teacher (net_ref) is rebuilt in float32.
    cfg = dict(inet_cfg("--stage", "post", "--preset", "tiny"), guide_fp16=flag)
    path = inet_official_pkl(tmp_path, cfg, use_fp16=pickled)
    assert inet.load_network(path, cfg, "guide").use_fp16 is want
    assert inet.load_network(path, cfg, "teacher").use_fp16 is False


def test_imagenet_guide_fp16_cli_default_and_flag():
    assert inet_cfg("--stage", "post")["guide_fp16"] is None  # None: as the pickle says
    assert inet_cfg("--stage", "post", "--no-guide-fp16")["guide_fp16"] is False


def test_imagenet_fp16_precond_is_float32_off_cuda(tmp_path):
    # EDM2's Precond picks float16 only for CUDA inputs: on the CPU a use_fp16 guide computes in float32.
    cfg = inet_cfg("--stage", "post", "--preset", "tiny")
    path = inet_official_pkl(tmp_path, cfg)
    gnet, ref = inet.load_network(path, cfg, "guide"), inet.load_network(path, dict(cfg, guide_fp16=False), "guide")
    x, s, lab = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 1.0, 20.0]), torch.tensor([0, 2, 5])
    assert torch.equal(gnet(x, s, lab), ref(x, s, lab))


@needs_cuda
def test_cuda_imagenet_fp16_guide_runs_unet_in_float16(tmp_path):
    cfg = inet_cfg("--stage", "post", "--preset", "tiny")
    path = inet_official_pkl(tmp_path, cfg)
    gnet = inet.load_network(path, cfg, "guide").to(CUDA)
    ref = inet.load_network(path, dict(cfg, guide_fp16=False), "guide")
    unet_out = []  # F_x of each network: the U-Net's output, before the float32 skip connection of D_x
    for net in (gnet, ref):
        net.unet.register_forward_hook(lambda m, args, out: unet_out.append(out))
    x, s, lab = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 1.0, 20.0]), torch.tensor([0, 2, 5])
    got, want = gnet(x.to(CUDA), s.to(CUDA), lab.to(CUDA)), ref(x, s, lab)
    f_got, f_want = unet_out
    assert got.dtype == torch.float32  # D_x = c_skip x + c_out F_x.float(), as EDM2
    assert f_want.square().mean().sqrt() > 0.1  # the fixture's non-zero gains: F_x is O(1), not 0
    if ON_GPU:
        assert f_got.dtype == torch.float16
        # float16's unit round-off is u = 2^-11 = 4.9e-4. Each of the U-Net's MPConv layers (39 here) rounds its
        # weights, its output and about two elementwise results; magnitude-preserving layers pass relative errors
        # on without growth, so ~4 roundings per layer of independent sign add up to ~2 sqrt(layers) u = 6e-3
        # (measured with the CPU's float16 kernels: 1.0e-3) and at worst to 4 layers u = 7.6e-2. The bound of one
        # full rounding per layer, layers u = 1.9e-2, sits 3x above the expected error; a wrong scale errs by O(1).
        layers = sum(isinstance(m, inet.MPConv) for m in ref.unet.modules())
        assert _rel(f_got, f_want) <= layers * 2 ** -11
    else:
        assert f_got.dtype == torch.float32 and torch.equal(got, want)


# ----------------------------------------------------------------------------- teacher and solver
def test_imagenet_guided_teacher_formula():
    x = torch.zeros(3, 2, 4, 4)
    net = lambda x, s, labels: torch.full_like(x, 3.0)  # noqa: E731
    gnet = lambda x, s, labels: torch.full_like(x, 1.0)  # noqa: E731
    d = inet.guided_denoiser(net, gnet, 2.05)(x, torch.ones(3), None)
    torch.testing.assert_close(d, torch.full_like(x, 1.0 + 2.05 * (3.0 - 1.0)))
    assert inet.guided_denoiser(net, gnet, 1.0) is net and inet.guided_denoiser(net, None, 2.0) is net


def inet_gaussian():
    toy = inet.ToyMixture(num_classes=2, res=4, channels=2)
    return toy, (lambda x, s, labels: toy.denoise(x, s, labels))


def test_imagenet_ecd_step_matches_exact_ode_to_heun_order():
    toy, denoise = inet_gaussian()
    labels = torch.tensor([0, 1, 1, 0])
    gen = torch.Generator().manual_seed(0)
    t = 1.2
    spread = torch.sqrt(toy.std[labels] ** 2 + t ** 2).reshape(-1, 1, 1, 1)  # x_t ~ N(mu, (s_k^2 + t^2) I)
    x_t = toy.mu[labels] + spread * torch.randn(4, 2, 4, 4, generator=gen, dtype=torch.float64)
    hs = np.array([0.1, 0.05, 0.025, 0.0125])  # asymptotic regime h << t; float64 keeps round-off far below
    for solver, order in (("heun", 3), ("euler", 2)):  # local error O(h^(p+1)): Heun p = 2, Euler p = 1
        errs = [(inet.teacher_step(denoise, x_t, t, t - h, labels, solver) - toy.flow(x_t, t, t - h, labels))
                .abs().max().item() for h in hs]
        slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
        assert abs(slope - order) < 0.3, (solver, slope, errs)


class InetIdentity(torch.nn.Module):
    """A student f(x, s) = x: makes f_t - f_r = x_t - x_r, so a loss can be checked by hand."""

    def forward(self, x, sigma, labels=None):
        return x.clone()


def test_imagenet_ecd_loss_weighting_and_target():
    toy, denoise = inet_gaussian()
    cfg = dict(p_mean=-0.8, p_std=1.6, ect_q=1024.0, ect_double=0, batch=128, k=8.0, b=1.0, solver="heun", huber_c=0.06,
               sigma_data=0.5)
    labels = torch.tensor([0, 1, 1, 0])
    y = toy.mu[labels] + 0.1 * torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    guided = inet.guided_denoiser(denoise, lambda x, s, lab: toy.denoise(x, s, None), 2.0)
    loss = inet.ecd_loss(InetIdentity(), guided, y, labels, torch.Generator().manual_seed(0), cfg, 0)
    # by hand, in ecd_loss's draw order (t, then eps)
    g = torch.Generator().manual_seed(0)
    t = torch.exp(-0.8 + 1.6 * torch.randn([4], generator=g))  # float32, as drawn by the script
    r = t * (1 - (1 + 8 * torch.sigmoid(-t)) / 1024)  # q = 1024, k = 8, b = 1 (exact in float32 like the script)
    x_t = y + t.reshape(-1, 1, 1, 1) * torch.randn(y.shape, generator=g)
    t, r = t.double(), r.double()
    d = (x_t - guided(x_t, t, labels)) / t.reshape(-1, 1, 1, 1)  # one Heun step of D_gnet + w (D_net - D_gnet)
    x_eu = x_t + (r - t).reshape(-1, 1, 1, 1) * d
    x_r = x_t + (r - t).reshape(-1, 1, 1, 1) * 0.5 * (d + (x_eu - guided(x_eu, r, labels)) / r.reshape(-1, 1, 1, 1))
    sq = (x_t - x_r).square().flatten(1).sum(1)
    want = (t ** 2 + 0.25) / (t * 0.5) ** 2 * (torch.sqrt(sq + 0.06 ** 2) - 0.06)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)  # float32 draws, float64 arithmetic on both sides
    # rows with r = 0 take the clean image as the target
    t0, r0 = torch.tensor([0.5, 2.0]), torch.tensor([0.4, 0.0])
    a, b, y0 = torch.randn(3, 2, 3, 4, 4).unbind(0)
    got = inet.consistency_pair_loss(InetIdentity(), a, t0, b, r0, y0, None, 0.06, 0.5)
    sq = (a - torch.stack([b[0], y0[1]])).square().flatten(1).sum(1)
    torch.testing.assert_close(got, (t0 ** 2 + 0.25) / (t0 * 0.5) ** 2 * (torch.sqrt(sq + 0.0036) - 0.06))


def test_imagenet_distance_metrics():
    a, b = torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    b[0, 0, 0, 0], b[1] = 3.0, 0.5  # per-sample sums of squares: 9 and 12 * 0.25 = 3
    sq = torch.tensor([9.0, 3.0])
    torch.testing.assert_close(inet.distance(a, b, "l2", 0.06), sq)
    torch.testing.assert_close(inet.distance(a, b, "huber", 0.06), torch.sqrt(sq + 0.0036) - 0.06)
    torch.testing.assert_close(inet.distance(a, b, "cauchy", 0.06), torch.log1p(sq / 0.0072))
    with pytest.raises(ValueError, match="--metric"):
        inet.distance(a, b, "lpips", 0.06)


def test_imagenet_heun_sampler_second_order():
    toy, denoise = inet_gaussian()
    labels = torch.tensor([0, 1])
    z = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # reference: the exact flow from 80 to s_min = 0.002, then the sampler's final Euler step to 0
    # (which is D(x, s_min) exactly), so only the Heun steps' discretisation error remains
    x_min = toy.flow(80 * z, 80.0, 0.002, labels)
    ref = toy.denoise(x_min, torch.full([2], 0.002, dtype=torch.float64), labels)
    errs, calls = [], []
    counted = lambda x, s, lab: calls.append(1) or denoise(x, s, lab)  # noqa: E731
    for n in (8, 16, 32):
        calls.clear()
        errs.append((inet.heun_sampler(counted, z, labels, n) - ref).abs().max().item())
        assert len(calls) == 2 * n - 1  # EDM Algorithm 2: no correction on the last step
    # second order: doubling the steps divides the error by ~4 (first order would give 2)
    assert errs[1] < errs[0] / 3 and errs[2] < errs[1] / 3, errs


def test_imagenet_dpm_solver_converges():
    toy, denoise = inet_gaussian()
    labels = torch.tensor([0, 1, 0])
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errs = []
    for n in (16, 32, 64):
        sig = inet.logsnr_grid(n, 80.0, 0.002, dtype=torch.float64)
        errs.append((inet.dpm_solver_pp(denoise, 80 * z, labels, sig)[-1] - toy.flow(80 * z, 80.0, 0.002, labels))
                    .abs().max().item())
    # doubling the steps divides the error by >= 4 here (first order would give 2): a multistep solver of order >= 2
    assert errs[1] < errs[0] / 3.5 and errs[2] < errs[1] / 3.5, errs


# ----------------------------------------------------------------------------- E-LatentLPIPS
# (features index of the conv, in channels, out channels), written out from the official cfg
# 'VGG16_Latent' = [64, 64, 128, 128, 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512] with
# conv/GroupNorm/ReLU triples (sony/cmt imagenet512/elatentlpips/models.py, _make_layers 'group').
ELPIPS_CONVS = [(0, 4, 64), (3, 64, 64), (6, 64, 128), (9, 128, 128), (12, 128, 256), (15, 256, 256),
         (18, 256, 256), (22, 256, 512), (25, 512, 512), (28, 512, 512), (32, 512, 512),
         (35, 512, 512), (38, 512, 512)]
ELPIPS_LINEARS = [(0, 512 * 7 * 7, 4096), (3, 4096, 4096), (6, 4096, 1000)]


def elpips_official_layout():
    out = {}
    for i, cin, cout in ELPIPS_CONVS:
        out[f"features.{i}.weight"] = (cout, cin, 3, 3)
        out[f"features.{i}.bias"] = (cout,)
        out[f"features.{i + 1}.weight"] = (cout,)  # GroupNorm(32, cout) affine
        out[f"features.{i + 1}.bias"] = (cout,)
    for i, fin, fout in ELPIPS_LINEARS:
        out[f"classifier.{i}.weight"] = (fout, fin)
        out[f"classifier.{i}.bias"] = (fout,)
    return out


def elpips_features_only(vgg, dtype=torch.float32):
    """taps of a copy of vgg.features (skips copying the 100M-parameter classifier)."""
    v = types.SimpleNamespace(features=copy.deepcopy(vgg.features).to(dtype))
    return v, lambda x: inet.LatentVGG16GN.taps(v, x)


@pytest.fixture(scope="module")
def elpips_vgg():
    torch.manual_seed(0)
    return inet.LatentVGG16GN().eval().requires_grad_(False)


def test_imagenet_elpips_state_dict_layout(elpips_vgg):
    vgg = elpips_vgg
    want = elpips_official_layout()
    got = {k: tuple(v.shape) for k, v in vgg.state_dict().items()}
    assert list(got) == list(want) and got == want and len(got) == 58
    # an official-shaped state dict loads strictly (no buffers: GroupNorm has none)
    vgg.load_state_dict({k: vgg.state_dict()[k] for k in want}, strict=True)  # values unchanged
    assert [type(vgg.features[i]).__name__ for i in (21, 31)] == ["MaxPool2d", "MaxPool2d"]
    assert len(vgg.features) == inet.TAPS[-1] == 41


def test_imagenet_elpips_taps_shapes_and_logits(elpips_vgg):
    vgg = elpips_vgg
    x = torch.randn(2, 4, 16, 16)
    shapes = [tuple(f.shape) for f in vgg.taps(x)]
    assert shapes == [(2, 64, 16, 16), (2, 128, 16, 16), (2, 256, 16, 16), (2, 512, 8, 8), (2, 512, 4, 4)]
    assert torch.equal(vgg.taps(x)[-1], vgg.features(x))
    assert vgg(x).shape == (2, 1000)


def test_imagenet_elpips_distance_hand_values():
    e = torch.eye(4, dtype=torch.float64)
    const = lambda v, n=1: v.view(1, 4, 1, 1).expand(n, 4, 3, 5).clone()
    taps = lambda x: [x] * 5  # identity "backbone": 5 taps equal to the input
    # orthogonal unit vectors: |e0 - e1|^2 = 2 per pixel, 5 taps -> 10 (eps 1e-8 shrinks the norms)
    d = inet.elatentlpips_distance(taps, const(e[0]), const(e[1]))
    assert d.shape == (1,) and d.item() == pytest.approx(10 / (1 + 1e-8), rel=1e-12)
    # channel normalisation: 3 e0 vs e0 -> 0 up to eps
    assert inet.elatentlpips_distance(taps, const(3 * e[0]), const(e[0])).item() < 1e-8
    # 2 of 5 columns differ -> the spatial mean takes 2/5 of it; samples are independent
    a, b = const(e[0], 2), const(e[0], 2)
    b[1, :, :, :2] = 0
    b[1, 1, :, :2] = -1  # antiparallel would be 4; here orthogonal (e0 vs -e1): 2 per pixel
    d = inet.elatentlpips_distance(taps, a, b)
    assert d[0].item() == 0 and d[1].item() == pytest.approx(5 * 2 * (2 / 5) / (1 + 1e-8), rel=1e-12)


def test_imagenet_elpips_distance_properties(elpips_vgg):
    vgg = elpips_vgg
    torch.manual_seed(1)
    a, b = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    d = inet.elatentlpips_distance(vgg.taps, a, b)
    assert d.shape == (3,) and (d > 0).all()
    assert inet.elatentlpips_distance(vgg.taps, a, a).abs().max() == 0
    assert torch.allclose(d, inet.elatentlpips_distance(vgg.taps, b, a), rtol=1e-5)
    f = torch.randn(2, 7, 3, 3)
    assert torch.allclose(inet.unit_channels(5.0 * f), inet.unit_channels(f), atol=1e-6)
    assert torch.allclose(inet.unit_channels(f).square().sum(1), torch.ones(2, 3, 3), atol=1e-6)
    # GroupNorm after a bias-free first conv makes the whole distance invariant to input scale
    v, taps = elpips_features_only(vgg)
    v.features[0].bias.zero_()
    d1 = inet.elatentlpips_distance(taps, a, b)
    assert torch.allclose(d1, inet.elatentlpips_distance(taps, 4 * a, 4 * b), rtol=1e-3)


def test_imagenet_elpips_gradcheck_distance_no_aug(elpips_vgg):
    vgg = elpips_vgg
    torch.manual_seed(2)
    _, taps = elpips_features_only(vgg, torch.float64)
    a = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)  # taps: 4x4 .. 1x1
    b = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    dist = lambda taps: (lambda a, b: inet.elatentlpips_distance(taps, a, b))
    # the full VGG: directional derivative along a random u by central differences (what gradcheck's
    # fast mode does; the full gradcheck takes ~1 min on 2 CPU cores)
    u, h = torch.randn_like(a), 1e-6
    ga, gb = torch.autograd.grad(dist(taps)(a, b).sum(), (a, b))
    for x, gx in ((a, ga), (b, gb)):
        with torch.no_grad():
            fd = (dist(taps)(*(x + h * u if y is x else y for y in (a, b))) -
                  dist(taps)(*(x - h * u if y is x else y for y in (a, b)))).item() / (2 * h)
        assert fd == pytest.approx((gx * u).sum().item(), rel=1e-5, abs=1e-8)
    # the distance formula in full: 5 taps from a small conv/GroupNorm/ReLU stack
    conv, gn = torch.nn.Conv2d(4, 8, 3, padding=1).double(), torch.nn.GroupNorm(2, 8).double()
    small = lambda x: [torch.relu(gn(conv(x)))[..., :k, :k] for k in (3, 3, 2, 2, 1)]
    a3, b3 = (x[..., :3, :3].detach().contiguous().requires_grad_() for x in (a, b))
    assert torch.autograd.gradcheck(dist(small), (a3, b3))


def test_imagenet_elpips_gradcheck_augment_fast():
    torch.manual_seed(3)
    a = torch.randn(1, 4, 24, 24, dtype=torch.float64, requires_grad=True)  # >= 22: filter's reflect pad
    b = torch.randn(1, 4, 24, 24, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: inet.augment_pair(a, b, torch.Generator().manual_seed(5), 1.0)
    assert torch.autograd.gradcheck(fn, (a, b), fast_mode=True)


def test_imagenet_elpips_augment_identity_same_and_grad():
    torch.manual_seed(4)
    a, b = torch.randn(3, 4, 32, 32, dtype=torch.float64), torch.randn(3, 4, 32, 32, dtype=torch.float64)
    # p = 0: every op still runs with identity parameters (as in ADA), so this checks that the sym6
    # up/down pair and the filter bank reconstruct perfectly
    a0, b0 = inet.augment_pair(a, b, torch.Generator().manual_seed(0), 0.0)
    assert (a0 - a).abs().max() < 1e-9 and (b0 - b).abs().max() < 1e-9
    x1, x2 = inet.augment_pair(a, a, torch.Generator().manual_seed(1), 1.0)
    assert torch.equal(x1, x2) and (x1 - a).abs().max() > 0.1
    y1, _ = inet.augment_pair(a, b, torch.Generator().manual_seed(1), 1.0)
    assert torch.equal(x1, y1)  # same generator state -> same transform
    a.requires_grad_(True), b.requires_grad_(True)
    o1, o2 = inet.augment_pair(a, b, torch.Generator().manual_seed(2), 1.0)
    (o1.square().sum() + o2.sum()).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0 and a.grad.isfinite().all()


def test_imagenet_elpips_warp_integer_shift_exact():
    x = torch.randn(2, 4, 32, 32, dtype=torch.float64)
    y = inet.aug_geometry(x, inet.aug_shift(-3.0, 0.0, 2, x))  # output(u) = input(u - 3)
    assert (y[..., 3:] - x[..., :-3]).abs().max() < 1e-9


# Binomial/normal tolerances below: n = 4000 samples, allowed error = 5 standard errors (a false
# failure has probability < 1e-6 per check), e.g. P(xflip) = 0.5: SE = sqrt(0.25 / n) = 0.0079.
ELPIPS_N = 4000


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_imagenet_elpips_augment_statistics(p):
    like = torch.zeros((), dtype=torch.float64)
    prm = inet.sample_aug((ELPIPS_N, 4, 4, 4), torch.Generator().manual_seed(7), p, like)
    # only x-flip has det < 0 (rotations, shifts and scalings keep the orientation)
    q = 0.5 * p
    flipped = (torch.linalg.det(prm["G"]) < 0).double().mean().item()
    assert abs(flipped - q) < 5 * math.sqrt(q * (1 - q) / ELPIPS_N)
    # noise: sigma = |N(0, 1)| * 0.1 with probability p -> E[noise^2] = 0.01 p; a sample's mean
    # square m has Var(m) = 1e-4 (3p (1 + 2/64) - p^2) < 1e-4 * 3p, so SE < 0.01 sqrt(3p / ELPIPS_N)
    ms = prm["noise"].square().mean((1, 2, 3))
    assert abs(ms.mean().item() - 0.01 * p) < 5 * 0.01 * math.sqrt(3 * p / ELPIPS_N)
    assert (ms == 0).double().mean().item() == pytest.approx(1 - p, abs=5 * math.sqrt(p * (1 - p) / ELPIPS_N) + 1e-9)
    # saturation scales latent channel 3 (official 4-channel rule): log2 C[3, 3] ~ N(0, 1) w.p. p
    l = torch.log2(prm["C"][:, 3, 3])
    assert torch.allclose(prm["C"][:, 3, :3], torch.zeros(ELPIPS_N, 3, dtype=torch.float64))
    assert abs(l.square().mean().item() - p) < 5 * math.sqrt((3 * p - p * p) / ELPIPS_N)  # Var(l^2) = 3p - p^2
    # cutout: size 0.5 w.p. p, centre uniform
    size, centre = prm["cut"]
    assert abs((size > 0).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / ELPIPS_N) + 1e-9
    assert abs(centre.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / (2 * ELPIPS_N))


def test_imagenet_elpips_distance_with_augmentation(elpips_vgg):
    vgg = elpips_vgg
    torch.manual_seed(5)
    a, b = torch.randn(2, 4, 24, 24), torch.randn(2, 4, 24, 24)
    g = lambda: torch.Generator().manual_seed(3)
    d = inet.elatentlpips_distance(vgg.taps, a, b, g())
    assert d.shape == (2,) and torch.equal(d, inet.elatentlpips_distance(vgg.taps, a, b, g()))
    assert inet.elatentlpips_distance(vgg.taps, a, a, g()).abs().max() == 0


def test_imagenet_elpips_weights_load_official_layout_or_features_only(tmp_path, elpips_vgg):
    full = tmp_path / "full.pt"
    torch.save(elpips_vgg.state_dict(), full)  # the official VGGBase layout, classifier included
    features = tmp_path / "features.pt"
    torch.save(elpips_vgg.features.state_dict(prefix="features."), features)
    for path in (full, features):
        net = inet.load_latent_vgg(str(path), torch.device("cpu"))
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        assert not hasattr(net, "classifier")  # the distance needs the features only
        assert all(torch.equal(v, elpips_vgg.state_dict()[k]) for k, v in net.state_dict().items())
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pt")
    for bad in (tmp_path / "bad.pt", tmp_path / "missing.pt"):
        with pytest.raises(SystemExit, match=f"--elpips-weights {re.escape(str(bad))}: not a VGG16_Latent_GN state dict"):
            inet.load_latent_vgg(str(bad), torch.device("cpu"))


def test_imagenet_cmt_loss_with_elatentlpips_is_the_distance_of_output_and_target():
    # sony/cmt imagenet512/training/loss.py DPMSolverLoss: ELatentLPIPS2(D_yt, D_y_ref), no weighting.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    vgg = types.SimpleNamespace(taps=lambda x: [torch.relu(conv(x))] * 5)
    net = lambda x, s, lab: 0.9 * x + 0.01 * s.view(-1, 1, 1, 1)  # noqa: E731
    pairs = (torch.randn(4, 4, 24, 24), torch.rand(4) + 0.1, torch.zeros(4, dtype=torch.long), torch.randn(4, 4, 24, 24))
    cfg = dict(metric="elatentlpips", huber_c=0.06)
    got = inet.cmt_loss(net, pairs, cfg, vgg, torch.Generator().manual_seed(3))
    want = inet.elatentlpips_distance(vgg.taps, net(*pairs[:3]), pairs[3], torch.Generator().manual_seed(3))
    assert got.shape == (4,) and torch.equal(got, want)
    plain = inet.elatentlpips_distance(vgg.taps, net(*pairs[:3]), pairs[3])
    assert not torch.allclose(got, plain)  # the augmentation is on: generator given, p = 1


@pytest.mark.parametrize("flags,message", [
    (["--metric", "elatentlpips"], "--metric elatentlpips: give the latent VGG's state dict with --elpips-weights PATH"),
    (["--metric", "elatentlpips", "--preset", "img64-s", "--elpips-weights", "v.pt"],
     "--metric elatentlpips: compares 4-channel SD latents of at least 22x22; preset img64-s trains on 3x64x64"),
    (["--elpips-weights", "v.pt"], "--elpips-weights: only --metric elatentlpips uses it")])
def test_imagenet_elpips_flags_refused_in_one_line(flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        inet_cfg("--stage", "mid", *flags)


def test_imagenet_mid_trains_with_elatentlpips(tmp_path, inet_one_thread, elpips_vgg):
    # One data-free mid step on 4x24x24 latents (the toy teacher), the backbone from a features-only file.
    torch.save(elpips_vgg.features.state_dict(prefix="features."), tmp_path / "vgg.pt")
    cfg = inet_cfg("--stage", "mid", "--preset", "tiny", "--teacher", "analytic", "--init", "random", "--batch", "16",
                   "--iters", "1", "--outdir", str(tmp_path / "run"))
    cfg.update(res=24, img_channels=4, metric="elatentlpips", elpips_weights=str(tmp_path / "vgg.pt"), sample_every=0)
    inet.train(cfg, "mid")
    row = json.loads((tmp_path / "run" / "stats.jsonl").read_text().splitlines()[-1])
    assert row["iter"] == 1 and math.isfinite(row["loss"]) and row["loss"] > 0 and row["grad_norm"] > 0


def test_train_latent_vgg_writes_a_backbone_cmt_imagenet_loads(tmp_path):
    # experiments/train_latent_vgg.py on 4 EDM2 latents (8x64x64 [mean, std] .npy): 2 SGD steps at batch 2.
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "lat" / "00000")
    labels = []
    for i in range(4):
        arr = np.concatenate([rng.standard_normal((4, 64, 64)) * 4, np.full((4, 64, 64), 0.1)]).astype(np.float32)
        np.save(tmp_path / "lat" / f"00000/img-mean-std-{i:08d}.npy", arr)
        labels.append([f"00000/img-mean-std-{i:08d}.npy", 10 * i])
    (tmp_path / "lat" / "dataset.json").write_text(json.dumps(dict(labels=labels)))
    out = tmp_path / "vgg.pt"
    argv = ["--data", str(tmp_path / "lat"), "--out", str(out), "--batch", "2", "--iters", "2"]
    net = train_latent_vgg.main(argv)
    state = torch.load(out, weights_only=True)
    assert list(state) == list(inet.LatentVGG16GN().state_dict())  # the official VGGBase layout
    assert all(torch.equal(v.cpu(), net.state_dict()[k].cpu()) for k, v in state.items())
    torch.manual_seed(0)
    assert not torch.equal(state["features.0.weight"], inet.LatentVGG16GN().features[0].weight)  # it trained
    inet.load_latent_vgg(str(out), torch.device("cpu"))
    before = out.read_bytes()
    with pytest.raises(SystemExit, match="--out .*exists"):
        train_latent_vgg.main(argv)
    assert out.read_bytes() == before


def test_imagenet_data_free_batch_layout():
    sig = inet.logsnr_grid(16)
    np.testing.assert_allclose(sig[[0, 1, 7, 8, 16]].numpy(), [80, 41.2535, 0.775691, 0.4, 0.002], rtol=1e-5)
    b = 3
    noise = torch.randn(b, 4, 2, 2)
    labels = torch.tensor([5, 7, 999])
    zero = lambda x, s, lab: torch.zeros_like(x)  # noqa: E731  (then every solver step is x * s_next / s_cur)
    x, s, lab, target = inet.cmt_batch(zero, noise, labels, sig)
    assert x.shape == (16 * b, 4, 2, 2) and s.shape == lab.shape == (16 * b,)
    for i in range(16):  # step-major: rows i*b..(i+1)*b hold state s_i of every trajectory
        torch.testing.assert_close(x[i * b:(i + 1) * b], sig[i] * noise, rtol=1e-5, atol=1e-6)
        assert torch.equal(s[i * b:(i + 1) * b], sig[i].expand(b)) and torch.equal(lab[i * b:(i + 1) * b], labels)
        torch.testing.assert_close(target[i * b:(i + 1) * b], sig[16] * noise, rtol=1e-4, atol=1e-6)
    cfg = inet_cfg("--stage", "mid", "--preset", "img512-xs", "--batch-gpu", "64")
    src = inet.BatchSource(cfg, "labels", torch.device("cpu"), 0, 1, 1, 0)
    y, lab = src.next(torch.Generator().manual_seed(0))
    assert y is None and lab.shape == (64,) and lab.min() >= 0 and lab.max() < 1000 and len(set(lab.tolist())) > 50


def test_imagenet_ecm_precond_boundary(inet_one_thread):
    cfg = inet_cfg("--stage", "mid", "--preset", "tiny", "--s-min", "0.003")
    net = inet.build_net(cfg).eval()
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)  # a non-zero raw output, so that only c_skip/c_out can make f = x
        x = torch.randn(4, 3, 8, 8)
        torch.testing.assert_close(net(x, torch.full([4], 0.003), None, eval_mode=True), x, rtol=0, atol=1e-6)
        assert not torch.allclose(net(x, torch.full([4], 0.003), None), x, atol=1e-4)  # train mode: plain EDM
        c = inet.ecm_precond(torch.tensor(2.0), 0.5, 0.003, train=True)
        assert all(torch.equal(a, e) for a, e in zip(c, inet.edm_precond(torch.tensor(2.0), 0.5)))


def test_imagenet_latent_dataset_checks(tmp_path):
    rng = np.random.default_rng(0)
    raw_mean, raw_std = np.array(inet.EDM2_RAW_MEAN), np.array(inet.EDM2_RAW_STD)

    def write(folder, scale, shape=(8, 64, 64)):
        os.makedirs(folder / "00000")
        labels = []
        for i in range(3):
            mean = (raw_mean.reshape(4, 1, 1) + raw_std.reshape(4, 1, 1) * rng.standard_normal((4, 64, 64))) * scale
            arr = np.concatenate([mean, np.full((4, 64, 64), 0.01)])[:shape[0]].astype(np.float32)
            np.save(folder / f"00000/img-mean-std-{i:08d}.npy", arr)
            labels.append([f"00000/img-mean-std-{i:08d}.npy", i])
        (folder / "dataset.json").write_text(json.dumps(dict(labels=labels)))
        return str(folder)

    cfg = inet_cfg("--stage", "post", "--preset", "img512-xs", "--batch-gpu", "2", "--workers", "0")
    cfg["data"] = write(tmp_path / "good", 1.0)
    mean, rms = inet.check_latent_stats(cfg)
    assert mean.abs().max() < 0.1 and (rms - 0.5).abs().max() < 0.05
    y, labels = inet.BatchSource(cfg, "dataset", torch.device("cpu"), 0, 1, 1, 0).next(torch.Generator())
    assert y.shape == (2, 4, 64, 64) and labels.tolist() in ([0, 1], [0, 2], [1, 0], [1, 2], [2, 0], [2, 1])
    zipped = shutil.make_archive(str(tmp_path / "good"), "zip", tmp_path / "good")  # an EDM2-style img512-sd.zip
    mean_zip, rms_zip = inet.check_latent_stats(dict(cfg, data=zipped))
    assert torch.equal(mean_zip, mean) and torch.equal(rms_zip, rms)
    with pytest.raises(SystemExit, match="do not look like EDM2"):
        inet.check_latent_stats(dict(cfg, data=write(tmp_path / "sd-scaled", 0.18215)))
    with pytest.raises(SystemExit, match=r"expected \(8, 64, 64\)"):
        inet.check_latent_stats(dict(cfg, data=write(tmp_path / "four", 1.0, shape=(4, 64, 64))))


# ----------------------------------------------------------------------------- training loop
def inet_train_args(outdir, *extra):
    return ["--preset", "tiny", "--teacher", "analytic", "--init", "random", "--outdir", str(outdir),
            "--log-every", "1", *extra]


def test_imagenet_run_folder_refuses_another_run_and_checks_resume(tmp_path, inet_one_thread):
    run = ["--preset", "tiny", "--outdir", str(tmp_path / "run"), "--iters", "2", "--batch", "16", "--log-every", "1"]
    inet.main(run + ["--stage", "pretrain"])
    before = folder_bytes(tmp_path / "run")
    for argv, message in [
            (["--stage", "pretrain"], "already holds a pretrain run at iteration 2 of 2"),
            (["--stage", "post", "--teacher", "analytic", "--resume", "auto"], "a pretrain checkpoint (iteration 2); this run is --stage post"),
            (["--stage", "pretrain", "--resume", "auto", "--ema", "0.5"], "differs from this one: ema 0.99 -> 0.5")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            inet.main(run + argv)
        assert folder_bytes(tmp_path / "run") == before
    inet.main(run + ["--stage", "pretrain", "--resume", "auto", "--iters", "3"])  # a longer run of the same recipe
    assert inet.read_checkpoint(tmp_path / "run" / "ckpt-latest.pt", "--resume")["iter"] == 3


def test_imagenet_mid_resume_inside_a_trajectory_buffer_is_bit_exact(tmp_path, inet_one_thread):
    # --traj-buffer 12 at 4 trajectories per iteration: one solve serves 3 iterations, so the resume at
    # iteration 2 lands inside the chunk [0, 3) and must re-solve it exactly as the first run did.
    args = ["--stage", "mid", "--batch", "64", "--batch-gpu", "32", "--iters", "5", "--ckpt-every", "2",
            "--traj-buffer", "12", "--dropout", "0.1"]
    inet_run_and_resume(tmp_path, args, at=2, end=5)


def inet_run_and_resume(tmp_path, args, at, end):
    """Run `args` in a/ with a snapshot every `at` iterations, resume its iteration-`at` snapshot in b/; the final
    weights must be bit-equal. Snapshots are kept at multiples of --snap-every and at the end, no others."""
    inet.main(inet_train_args(tmp_path / "a", *args, "--snap-every", str(at)))
    kept = sorted(int(p.stem[5:]) for p in (tmp_path / "a").glob("ckpt-0*.pt"))
    assert kept == sorted(set(range(at, end + 1, at)) | {end}), kept
    inet.main(inet_train_args(tmp_path / "b", *args, "--resume", str(tmp_path / "a" / f"ckpt-{at:07d}.pt")))
    full = torch.load(tmp_path / "a" / f"ckpt-{end:07d}.pt", weights_only=True)
    resumed = torch.load(tmp_path / "b" / f"ckpt-{end:07d}.pt", weights_only=True)
    for key in ("model", "ema"):
        assert all(torch.equal(full[key][k], resumed[key][k]) for k in full[key]), key
    return full, resumed


@pytest.mark.parametrize("world", [1, 2])
def test_imagenet_bulk_trajectories_equal_one_solve_per_micro_step(world):
    # Same noise and labels per micro-step as a solve of its own; each trajectory used once; one teacher
    # solve per chunk of iterations. The toy teacher is per-sample, so batching may only change rounding.
    cfg = dict(inet_cfg("--stage", "mid", "--preset", "tiny", "--batch", "64", "--batch-gpu", "16"), iters=5)
    toy = inet.ToyMixture(cfg["label_dim"], cfg["res"], cfg["img_channels"])
    sizes = []
    teacher = lambda x, s, lab: sizes.append(x.shape[0]) or toy.denoise(x, s, lab)  # noqa: E731
    accum = cfg["batch"] // (16 * world)
    for rank in range(world):
        src = inet.BatchSource(cfg, "labels", torch.device("cpu"), rank, world, accum, 0)
        one = inet.TeacherPairs(teacher, src, dict(cfg, traj_buffer=0), torch.device("cpu"), rank, world, accum)
        bulk = inet.TeacherPairs(teacher, src, dict(cfg, traj_buffer=3 * accum), torch.device("cpu"), rank, world, accum)
        assert bulk.chunk == 3 and one.chunk == 0
        starts = set()
        for it in range(cfg["iters"]):
            for m in range(accum):
                sizes.clear()
                a = one.get(it, m)
                assert sizes == [1] * 16  # batch_gpu 16 = one trajectory of 16 states
                # The official draw order: the micro-step's labels first (BatchSource), then x_T's noise.
                gen = torch.Generator().manual_seed(inet.micro_seed(cfg["seed"], it, m * world + rank))
                _, labels = src.next(gen)
                noise = torch.randn([1, 3, 8, 8], generator=gen)
                ref = inet.cmt_batch(teacher, noise, labels[:1], bulk.sigmas)
                sizes.clear()
                b = bulk.get(it, m)
                assert sizes == ([16 * min(3, cfg["iters"] - it) * accum // 16] * 16 if it % 3 == 0 and m == 0 else [])
                for u, v, w in zip(a, b, ref):
                    torch.testing.assert_close(u, w, rtol=0, atol=0)
                    torch.testing.assert_close(v, w, rtol=1e-6, atol=1e-6)
                starts.add(b[0][0].flatten()[:4].tolist().__repr__())
        assert len(starts) == cfg["iters"] * accum  # every micro-step got trajectories of its own


def test_imagenet_resume_bit_exact(tmp_path, inet_one_thread):
    # Guided ECD post stage on the toy: exercises data noise (micro_seed), dropout RNG (saved and restored)
    # and the same-dropout-mask replay of the second student call.
    args = ["--stage", "post", "--batch", "32", "--iters", "4", "--ckpt-every", "2", "--dropout", "0.1",
            "--guide", "analytic", "--guidance", "1.5"]  # autoguided by the unconditional mixture
    full, resumed = inet_run_and_resume(tmp_path, args, at=2, end=4)
    opt_a, opt_b = full["optimizer"]["state"], resumed["optimizer"]["state"]
    assert all(torch.equal(opt_a[i][s], opt_b[i][s]) for i in opt_a for s in opt_a[i])
    assert full["iter"] == resumed["iter"] == 4 and full["stage"] == "post"
    assert set(full) == {"model", "ema", "optimizer", "iter", "rng", "data_state", "config", "stage", "script"}
    group = full["optimizer"]["param_groups"][0]  # post: Adam (0.9, 0.99), constant lr
    assert tuple(group["betas"]) == (0.9, 0.99) and group["lr"] == inet.PRESETS["tiny"]["post"]["lr"]
    assert not list(tmp_path.rglob("*.tmp*"))  # checkpoints are written to a temp file, then renamed
    rows = [json.loads(line) for line in (tmp_path / "a" / "stats.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert set(rows[0]) >= {"iter", "kimg", "loss", "grad_norm", "lr", "it_per_s", "img_per_s", "nonfinite", "sec"}


@pytest.mark.parametrize("first, then", [("--no-channels-last", "--channels-last"),
                                         ("--channels-last", "--no-channels-last")])
def test_imagenet_resume_with_other_channels_last_gives_adam_moments_their_parameters_layout(tmp_path, inet_one_thread,
                                                                                              first, then):
    # --channels-last may change on resume. Adam's moments load in the checkpoint's layout, and CUDA's fused Adam
    # refuses moments laid out unlike their parameter (the CPU's Adam does not check): the resume must convert them.
    run = inet_train_args(tmp_path / "run", "--stage", "mid", "--batch", "16")
    inet.main(run + ["--iters", "2", first])
    inet.main(run + ["--iters", "4", then, "--resume", "auto"])
    old, new = (torch.load(tmp_path / "run" / f"ckpt-{i:07d}.pt", weights_only=True) for i in (2, 4))
    names = [n for n, _ in inet.build_net(inet_cfg("--preset", "tiny", "--stage", "mid")).named_parameters()]
    assert [n for n in names if new["model"][n].stride() != old["model"][n].stride()]  # the layout did change
    for i, name in enumerate(names):
        for k in ("exp_avg", "exp_avg_sq"):
            assert new["optimizer"]["state"][i][k].stride() == new["model"][name].stride(), (name, k)
    rows = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize("stage", ["mid", "post"])
def test_imagenet_bf16_autocasts_the_student_only(stage, inet_one_thread):
    # The teacher is float32 (EDM2's fp16 guide as its pickle says): under --bf16 its CMT trajectories (mid) and its
    # guided Heun step (ECD) equal the float32 run's bit for bit, while the student's loss does change.
    cfg = dict(inet_cfg("--preset", "tiny", "--stage", stage, "--batch", "16", "--init", "random"), batch_gpu=16,
               traj_buffer=0)
    net, gnet, student = (_inet_net(cfg, seed, attention=False) for seed in (1, 3, 2))
    guided = inet.guided_denoiser(net.eval(), gnet.eval(), 2.05)
    outputs, losses = {}, {}
    for bf16 in (False, True):
        seen = outputs[bf16] = []
        teacher = lambda x, s, labels: seen.append(guided(x, s, labels)) or seen[-1]  # noqa: E731
        micro_loss = inet.make_loss(dict(cfg, bf16=bf16), stage, copy.deepcopy(student), teacher, 1, 0, 0, 1, CPU)
        losses[bf16] = micro_loss(torch.Generator().manual_seed(0), 0, 0).detach()
    assert len(outputs[True]) == len(outputs[False]) == (16 if stage == "mid" else 2)  # DPM-Solver++ 16; Heun 2
    assert all(torch.equal(a, b) for a, b in zip(outputs[True], outputs[False]))
    assert not torch.equal(losses[True], losses[False])  # the student did run in bfloat16


def test_imagenet_ddp_matches_accumulation(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["--stage", "mid", "--batch", "64", "--batch-gpu", "16", "--iters", "1"]
    script = str(ROOT / "cmt_imagenet.py")
    subprocess.run([sys.executable, script, *inet_train_args(tmp_path / "one", *common)], check=True, env=env,
                   cwd=tmp_path, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                    *inet_train_args(tmp_path / "two", *common)], check=True, env=env, cwd=tmp_path, capture_output=True)
    one, two = [json.loads((tmp_path / d / "stats.jsonl").read_text()) for d in ("one", "two")]
    # Same global batch (noise keyed by micro-batch slot = micro_step * world + rank); only the
    # summation order of the gradient differs: float32 round-off, ~1e-7 relative.
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-5)
    a = torch.load(tmp_path / "one" / "ckpt-latest.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt-latest.pt", weights_only=True)["model"]
    lr = inet.PRESETS["tiny"]["mid"]["lr"]
    for k in a:  # Adam's first step is ~lr * sign(g): round-off in g moves a weight by << lr
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-3 * lr)


def test_imagenet_tiny_end_to_end(tmp_path, inet_one_thread, capsys, monkeypatch):
    rows = inet.main(["--preset", "tiny", "--iters", "3", "--eval-num", "64", "--outdir", str(tmp_path)])
    assert [(r["model"], r["steps"]) for r in rows] == [
        ("data (FD floor)", "-"), ("teacher (Heun)", 35), ("mid (CMT)", 1), ("mid (CMT)", 2),
        ("post (CMT -> ECD)", 1), ("post (CMT -> ECD)", 2)]
    assert all(math.isfinite(r["pixel_fd"]) for r in rows) and all(math.isfinite(r["flow_map_err"]) for r in rows[1:])
    assert (tmp_path / "quality.txt").read_text().splitlines()[0].split() == \
        ["model", "steps", "flow-map", "err", "pixel", "FD", "wall", "time"]
    for stage in ("pretrain", "mid", "post"):
        for name in ("config.json", "stats.jsonl", "ckpt-latest.pt", "ckpt-0000003.pt"):
            assert (tmp_path / stage / name).is_file(), (stage, name)
    assert (tmp_path / "mid" / "samples-0000003.png").is_file()
    # The comparison picture: 6 labelled rows (exact map, teacher, mid and post at 1 and 2 steps) of 12 toy
    # samples enlarged 8x, one row per model from the same noise; its first tile is the exact map's image.
    pic = np.asarray(Image.open(tmp_path / "comparison.png"))
    assert pic.shape == (6 * (8 * 8 + 4), 190 + 12 * (8 * 8 + 4), 3)
    toy = inet.ToyMixture(6, 8, 3)
    cfg = inet_cfg("--stage", "mid", "--preset", "tiny")
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    torch.randint(6, (64,), generator=gen)
    z = torch.randn([64, 3, 8, 8], generator=gen)
    first = toy.flow(z[:1] * 80.0, 80.0, 0.0, torch.tensor([0]))
    want = (first[0] * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(pic[0:64:8, 190:190 + 64:8], want)
    out = capsys.readouterr().out
    assert "flow-map err" in out and "pixel FD" in out and "[mid] it 3/3" in out
    assert " it/s " in out and "| ETA " in out  # progress lines
    # stage sample: the 2-step student (from its checkpoint, with FID through fid.py on random
    # Inception weights: checks the plumbing, not the value) and the teacher's Heun reference
    import fid
    torch.save(fid.random_inception().state_dict(), tmp_path / "inception.pth")
    monkeypatch.setenv("FID_WEIGHTS", str(tmp_path / "inception.pth"))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    base = ["--preset", "tiny", "--stage", "sample", "--num", "10", "--batch-gpu", "4", "--outdir", str(tmp_path / "s")]
    inet.main([*base, "--init", str(tmp_path / "post" / "ckpt-latest.pt"), "--fid-ref", str(tmp_path / "ref.npz"),
               "--num", "4", "--outdir", str(tmp_path / "f")])
    metrics = json.loads((tmp_path / "f" / "metrics.jsonl").read_text())
    assert metrics["tag"] == "2step" and metrics["num"] == 4 and math.isfinite(metrics["fid"]) and metrics["fid"] > 0
    inet.main([*base, "--init", str(tmp_path / "post" / "ckpt-latest.pt")])
    inet.main([*base, "--init", "teacher", "--teacher", "analytic", "--heun-steps", "4", "--outdir", str(tmp_path / "h")])
    for tag, folder in (("2step", "s"), ("heun4", "h")):  # one folder per run: a second sample run may not write into s
        images = np.load(tmp_path / folder / f"samples-{tag}.npz")["images"]
        assert images.shape == (10, 8, 8, 3) and images.dtype == np.uint8
        assert (tmp_path / folder / f"samples-{tag}.png").is_file()


def test_imagenet_xs_real_size_forward():
    cfg = inet_cfg("--stage", "mid", "--preset", "img64-xs")
    torch.manual_seed(0)
    net = inet.build_net(cfg).eval()
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)
        x = 0.5 * torch.randn(1, 3, 64, 64) + 2.0 * torch.randn(1, 3, 64, 64)
        d = net(x, torch.tensor([2.0]), torch.tensor([207]))
    assert d.shape == (1, 3, 64, 64) and torch.isfinite(d).all()


def test_imagenet_encode_folder(tmp_path, inet_one_thread):
    src = tmp_path / "imagenet"
    rng = np.random.default_rng(0)
    for c, synset in enumerate(["n01440764", "n01443537"]):
        os.makedirs(src / synset)
        for i in range(2):
            h, w = (90, 120) if i else (130, 70)  # landscape and portrait: the ADM crop takes the centre square
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            PIL.Image.fromarray(arr).save(src / synset / f"{synset}_{i}.JPEG")
    # pixel preset: 64x64 PNGs + labels from the sorted class folders
    cfg = inet_cfg("--stage", "encode", "--preset", "img64-s", "--data", str(src), "--outdir", str(tmp_path / "px"))
    inet.run_encode(cfg)
    ds = inet.ImageFolderDataset(str(tmp_path / "px"), False, 64, 3, 1000)
    assert len(ds) == 4 and ds.labels.tolist() == [0, 0, 1, 1] and ds[3][0].shape == (3, 64, 64)
    # the 64x64 presets train on those pixels in [-1, 1]: rows in the order of the epoch-0 permutation
    cfg = inet_cfg("--stage", "post", "--preset", "img64-s", "--data", str(tmp_path / "px"), "--batch-gpu", "4",
                   "--workers", "0")
    y, lab = inet.BatchSource(cfg, "dataset", torch.device("cpu"), 0, 1, 1, 0).next(torch.Generator())
    perm = np.random.RandomState(0).permutation(4)
    assert torch.equal(y, torch.stack([ds[int(i)][0] for i in perm]).float() / 127.5 - 1)
    assert lab.tolist() == ds.labels[perm].tolist()
    # An interrupted encode (killed inside its third write: the file's temp copy, no file, no dataset.json) is
    # refused without --resume and continued with --resume auto: the missing image encoded, the others untouched.
    px = tmp_path / "px"
    files = sorted(p for p in px.rglob("*") if p.is_file())
    done = {p: p.read_bytes() for p in files}
    victim = px / "00000" / "img-00000002.png"
    for p in files:
        os.utime(p, (1, 1))
    victim.rename(str(victim) + ".tmp")
    (px / "dataset.json").unlink()
    with pytest.raises(SystemExit, match="already holds .*--resume auto"):
        inet.run_encode(dict(cfg, stage="encode", data=str(src), outdir=str(px), resume=None))
    cfg = inet_cfg("--stage", "encode", "--preset", "img64-s", "--data", str(src), "--outdir", str(px), "--resume", "auto")
    inet.run_encode(cfg)
    assert sorted(p for p in px.rglob("*") if p.is_file()) == files  # the temp copy is gone
    assert all(p.read_bytes() == b for p, b in done.items())
    assert [p for p in files if p.stat().st_mtime == 1] == [p for p in files if p not in (victim, px / "dataset.json")]
    (px / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds notes.txt, not an encode's folders"):
        inet.run_encode(cfg)
    # latent preset at a reduced size (8x8 latents of 64x64 crops) with a random VAE in the diffusers layout
    torch.manual_seed(0)
    torch.save(inet.AutoencoderKL().state_dict(), tmp_path / "vae.bin")
    cfg = inet_cfg("--stage", "encode", "--preset", "img512-xs", "--data", str(src), "--outdir", str(tmp_path / "lat"),
                   "--vae", str(tmp_path / "vae.bin"))
    inet.run_encode(dict(cfg, res=8))
    ds = inet.ImageFolderDataset(str(tmp_path / "lat"), True, 8, 4, 1000)
    raw, label = ds[2]
    assert len(ds) == 4 and label == 1 and raw.shape == (8, 8, 8) and raw.dtype == torch.float32
    assert (raw[4:] > 0).all()  # the second half holds the posterior std


def test_imagenet_nonfinite_loss_steps_as_sony_cmt_or_is_skipped_on_request(tmp_path, inet_one_thread, monkeypatch):
    real = inet.cmt_loss
    monkeypatch.setattr(inet, "cmt_loss", lambda *a: real(*a) * float("nan"))
    args = inet_train_args(tmp_path / "a", "--stage", "mid", "--batch", "16", "--iters", "3", "--max-nonfinite", "5")
    torch.manual_seed(0)  # the student's construction in train(): seed, then build
    init = inet.build_net(inet.resolve_config(inet.parse_args(args))).state_dict()
    ckpts = {}
    for run, flags in (("a", []), ("b", ["--skip-nonfinite"])):
        inet.main(inet_train_args(tmp_path / run, "--stage", "mid", "--batch", "16", "--iters", "3",
                                  "--max-nonfinite", "5", *flags))
        ckpts[run] = ckpt = torch.load(tmp_path / run / "ckpt-latest.pt", weights_only=True)
        rows = [json.loads(line) for line in (tmp_path / run / "stats.jsonl").read_text().splitlines()]
        assert [r["nonfinite"] for r in rows] == [1, 2, 3] and all(r["loss"] is None for r in rows)
        assert ckpt["data_state"]["nonfinite"] == 3
        assert bool(ckpt["optimizer"]["state"]) == (run == "a")  # --skip-nonfinite never steps
    # --skip-nonfinite: no step, no EMA update. Default: Adam steps on nan_to_num'd (here all-zero) gradients,
    # which move no weight, so the weights are those of the skipping run (both were renormalised by EDM2's
    # forced weight normalisation in the forwards) and finite.
    assert all(torch.equal(ckpts["b"]["ema"][k], init[k]) for k in init)
    assert all(torch.equal(ckpts["a"]["model"][k], ckpts["b"]["model"][k]) for k in init)
    assert all(torch.isfinite(v).all() for v in ckpts["a"]["ema"].values())
    with pytest.raises(SystemExit, match="--max-nonfinite 1"):
        inet.main(inet_train_args(tmp_path / "c", "--stage", "mid", "--batch", "16", "--iters", "3", "--max-nonfinite", "1"))


def test_imagenet_cmt_trajectories_are_cleaned_of_nonfinite_values():
    sigmas = inet.logsnr_grid(4, 80.0, 0.002, torch.device("cpu"))
    def teacher(bad):
        def denoise(x, s, labels):  # zero, or overflowing on the first row
            out = torch.zeros_like(x)
            out[0] = float("inf") if bad else 0.0
            return out
        return denoise
    noise, labels = torch.randn(2, 4, 8, 8), torch.zeros(2, dtype=torch.long)
    x, _, _, target = inet.cmt_batch(teacher(True), noise, labels, sigmas)
    x_ok, _, _, target_ok = inet.cmt_batch(teacher(False), noise, labels, sigmas)
    assert torch.isfinite(x).all() and torch.isfinite(target).all() and x.shape == (8, 4, 8, 8)
    assert torch.equal(x[1::2], x_ok[1::2]) and torch.equal(target[1::2], target_ok[1::2])  # the clean row untouched


def test_imagenet_post_on_latent_dataset(tmp_path, inet_one_thread):
    # The ECD loop on an EDM2-style latent dataset (8-channel [mean, std] .npy + dataset.json), read by
    # DataLoader workers, with a network teacher from one of our .pt files; small 8x8 latents.
    rng = np.random.default_rng(0)
    raw_mean, raw_std = np.array(inet.EDM2_RAW_MEAN).reshape(4, 1, 1), np.array(inet.EDM2_RAW_STD).reshape(4, 1, 1)
    os.makedirs(tmp_path / "lat" / "00000")
    labels = []
    for i in range(24):
        mean = raw_mean + raw_std * rng.standard_normal((4, 8, 8))
        np.save(tmp_path / "lat" / f"00000/img-mean-std-{i:08d}.npy",
                np.concatenate([mean, np.full((4, 8, 8), 0.05)]).astype(np.float32))
        labels.append([f"00000/img-mean-std-{i:08d}.npy", i % 6])
    (tmp_path / "lat" / "dataset.json").write_text(json.dumps(dict(labels=labels)))
    cfg = inet_cfg("--stage", "post", "--preset", "tiny", "--iters", "2", "--batch", "8", "--workers", "1",
                   "--outdir", str(tmp_path / "run"), "--init", "teacher")
    cfg.update(latent=True, img_channels=4, data=str(tmp_path / "lat"), teacher=str(tmp_path / "teacher.pt"))
    torch.manual_seed(5)
    torch.save(dict(ema=inet.build_net(cfg).state_dict(), script=inet.SCRIPT, stage="pretrain", config=cfg, iter=0),
               tmp_path / "teacher.pt")
    inet.train(cfg, "post")
    rows = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert rows[-1]["iter"] == 2 and math.isfinite(rows[-1]["loss"]) and rows[-1]["nonfinite"] == 0


# ==================================================================================================
# meanflow_post.py
# ==================================================================================================

# Rows of the bad-input table (test_bad_input_is_one_line_exit_2_and_writes_nothing, at the end of the file):
# pytest.param(script, argv, setup, expected, id=...): argv and expected items may use {tmp};
# setup(tmp) makes the inputs in the test's folder, which is also the working directory.
_MF = ["--preset", "tiny", "--iters", "2", "--batch", "8", "--outdir", "{tmp}/run"]


def _mf_pretrain_ckpt(tmp):
    """A stand-in pretrain checkpoint of this script in {tmp}/run, beside its config.json."""
    make_ckpt(tmp / "run" / "ckpt-latest.pt", "meanflow_post.py", "pretrain", config={"iters": 10})
    (tmp / "run" / "config.json").write_text("{}")


def _mf_vae_setup(tmp):
    make_pngs(tmp / "imgs" / "n01", (64, 64))
    (tmp / "vae.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")  # header cut short


BAD_INPUTS_MEANFLOW = [pytest.param("meanflow_post.py", argv, setup, expected, id="meanflow-" + name)
                       for name, argv, setup, expected in [
    ("no-stage", ["--preset", "xl2"], None, ["--stage is required"]),
    ("unknown-stage", ["--stage", "foo"], None, ["--stage", "'foo'", "see --help"]),
    ("batch-zero", _MF + ["--stage", "pretrain", "--batch", "0"], None, ["--batch", "'0'", "expected an integer >= 1"]),
    ("batch-negative", _MF + ["--stage", "pretrain", "--batch", "-4"], None, ["--batch", "'-4'", "expected an integer >= 1"]),
    ("iters-zero", _MF + ["--stage", "pretrain", "--iters", "0"], None, ["--iters", "'0'", "expected an integer >= 1"]),
    ("ckpt-every-negative", _MF + ["--stage", "pretrain", "--ckpt-every", "-1"], None, ["--ckpt-every", "'-1'", ">= 0"]),
    ("pairs-too-many", _MF + ["--stage", "mid", "--pairs", "11"], None, ["--pairs 11", "at most", "10"]),
    ("batch-not-divisible", _MF + ["--stage", "pretrain", "--batch-gpu", "3"], None, ["--batch 8", "--batch-gpu 3"]),
    ("init-missing", _MF + ["--stage", "post", "--init", "{tmp}/no.pt"], None, ["--init", "no.pt", "no such file"]),
    *bad_init_rows(_MF + ["--stage", "post"], "meanflow_post.py", "cmt_cifar10.py", "post"),
    ("teacher-garbage", _MF + ["--stage", "mid", "--teacher", "{tmp}/t.pt"], lambda t: (t / "t.pt").write_bytes(b"\x00" * 64),
     ["--teacher", "t.pt", "not a readable checkpoint"]),
    ("mid-needs-teacher", _MF + ["--stage", "mid"], None, ["--teacher", "needs --teacher PATH"]),
    ("data-pngs", _MF + ["--stage", "post", "--data", "{tmp}/d"], lambda t: make_pngs(t / "d"),
     ["--data", "no latents-*.npy shards", "--stage encode"]),
    ("data-missing", _MF + ["--stage", "post", "--data", "{tmp}/nope"], None, ["--data", "nope", "no such folder"]),
    ("outdir-is-a-file", _MF[:-2] + ["--stage", "pretrain", "--outdir", "{tmp}/f"], lambda t: (t / "f").write_text("x"),
     ["--outdir", "is a file"]),
    ("outdir-holds-a-run", _MF + ["--stage", "post"], _mf_pretrain_ckpt,
     ["--outdir", "already holds a pretrain run at iteration 3 of 10", "--resume auto"]),
    ("outdir-holds-files", _MF + ["--stage", "pretrain"], lambda t: make_pngs(t / "run"), ["--outdir", "already holds 3 files"]),
    ("resume-other-stage", _MF + ["--stage", "post", "--resume", "auto"], _mf_pretrain_ckpt,
     ["--resume", "a pretrain checkpoint", "--stage post"]),
    ("resume-malicious", _MF + ["--stage", "pretrain", "--resume", "{tmp}/m.pt"], lambda t: make_evil(t / "m.pt"),
     ["--resume", "refused", "nothing in it was run"]),
    ("resume-other-script", _MF + ["--stage", "pretrain", "--resume", "auto"],
     lambda t: make_ckpt(t / "run" / "ckpt-latest.pt", "cmt_imagenet.py", "pretrain"),
     ["--resume", "a checkpoint of cmt_imagenet.py"]),
    ("resume-files-no-ckpt", _MF + ["--stage", "pretrain", "--resume", "auto"], lambda t: make_pngs(t / "run"),
     ["--resume auto", "no ckpt-latest.pt"]),
    ("sample-needs-init", _MF + ["--stage", "sample"], None, ["--init", "needs --init PATH"]),
    ("sample-outdir-holds-a-run", _MF + ["--stage", "sample", "--init", "{tmp}/run/ckpt-latest.pt"], _mf_pretrain_ckpt,
     ["--outdir", "already holds a pretrain run"]),
    ("sample-steps-zero", _MF + ["--stage", "sample", "--sample-steps", "0"], None, ["--sample-steps", "'0'", "positive"]),
    ("sample-fid-ref-missing", _MF + ["--stage", "sample", "--init", "{tmp}/no.pt", "--fid-ref", "{tmp}/r.npz"], None,
     ["--fid-ref", "r.npz", "cannot read"]),
    ("encode-vae-garbage", ["--stage", "encode", "--data", "{tmp}/imgs", "--vae", "{tmp}/vae.safetensors",
                            "--outdir", "{tmp}/lat"], _mf_vae_setup, ["--vae", "vae.safetensors", "not readable sd-vae-ft-mse"]),
    ("encode-outdir-holds-a-run", ["--stage", "encode", "--data", "{tmp}/imgs", "--vae", "{tmp}/vae.safetensors",
                                   "--outdir", "{tmp}/run"], lambda t: (_mf_vae_setup(t), _mf_pretrain_ckpt(t)),
     ["--outdir", "already holds a pretrain run"]),
    ("tiny-outdir-holds-a-run", ["--preset", "tiny", "--outdir", "{tmp}/run"], _mf_pretrain_ckpt,
     ["--outdir", "already holds a pretrain run"]),
    ("tiny-resume-into-other-run", ["--preset", "tiny", "--resume", "auto", "--outdir", "{tmp}/run"], _mf_pretrain_ckpt,
     ["--outdir", "ckpt-latest.pt", "not a run of the tiny pipeline"]),
]]


class ExactU(torch.nn.Module):
    """The exact average velocity of class-conditional Gaussian data (mf.gaussian_average_velocity) behind
    the network interface net(z, t, h, y): class k is N(mu_k, s_k^2 I)."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s, self.num_classes = mu, s, mu.shape[0]
        self.calls = []

    def forward(self, z, t, h, y):
        self.calls.append((t.clone(), h.clone(), y.clone()))
        b = lambda a: a.view(-1, 1, 1, 1)
        return mf.gaussian_average_velocity(z, b(t - h), b(t), self.mu[y], b(self.s[y]))


def exact_setup(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    s = torch.tensor([0.3, 0.7, 1.2], dtype=torch.float64)
    y = torch.arange(n) % 3
    return ExactU(mu, s), mu, s, y, g


def random_dit(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    net = mf.DiTMF(input_size=8, in_channels=4, num_classes=5, depth=2, hidden_size=32, num_heads=4, patch_size=2, **kw)
    with torch.no_grad():  # non-zero adaLN/final layers, otherwise u == 0 and the tests would be vacuous
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.to(dtype)


def test_meanflow_identity_on_exact_gaussian_flow():
    # u_tgt = v - (t - r) du/dt built by our jvp target must reproduce the exact u (float64).
    net, mu, s, y, g = exact_setup()
    z = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3, 0.99, 0.2, 0.7], dtype=torch.float64)
    r = torch.tensor([0.1, 0.5, 0.0, 0.01, 0.15, 0.35], dtype=torch.float64)
    b = lambda a: a.view(-1, 1, 1, 1)
    v = net(z, t, torch.zeros_like(t), y)  # u(z, t, t) = v: the exact marginal velocity of the class
    # Through meanflow_loss itself: pick (x, e) on the exact trajectory so that e - x = v(z_t, t).
    x, e = z - b(t) * v, z + (1 - b(t)) * v
    cfg = dict(omega=1.0, kappa=0.0, t_start=0.0, t_end=1.0, norm_p=1.0, norm_eps=0.01)
    loss, l = mf.meanflow_loss(net, x, y, e, t, r, torch.zeros(6, dtype=torch.bool), cfg)
    u = mf.gaussian_average_velocity(z, b(r), b(t), mu[y], b(s[y]))
    # float64 roundoff of O(1) quantities is ~1e-15; 1e-5 per element bounds l by 1e-10 * 32 elements.
    assert l.max().item() < 1e-10 * 32 and l.max().item() >= 0
    u_jvp, dudt = torch.func.jvp(lambda z_, r_, t_: mf.average_velocity(net, z_, r_, t_, y), (z, r, t),
                                 (v, torch.zeros_like(r), torch.ones_like(t)))
    torch.testing.assert_close(mf.meanflow_target(v, dudt, t, r), u, rtol=0, atol=1e-5)
    torch.testing.assert_close(u_jvp, u, rtol=0, atol=1e-12)
    # A wrong tangent (du/dt without the t-derivative) must break it: the test can fail.
    _, dudz = torch.func.jvp(lambda z_: mf.average_velocity(net, z_, r, t, y), (z,), (v,))
    assert (mf.meanflow_target(v, dudz, t, r) - u).abs().max() > 1e-3


def test_jvp_equals_central_finite_differences():
    net = random_dit(torch.float64)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.8, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([0.2, 0.5, 0.1], dtype=torch.float64)
    y = torch.tensor([0, 3, 5])  # 5 = null class
    f = lambda z_, r_, t_: mf.average_velocity(net, z_, r_, t_, y)
    _, dudt = torch.func.jvp(f, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    h = 1e-5  # central differences: O(h^2) ~ 1e-10 truncation, ~1e-16/h ~ 1e-11 roundoff in float64
    fd = (f(z + h * v, r, t + h) - f(z - h * v, r, t - h)) / (2 * h)
    assert dudt.abs().max() > 1e-2
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-8)


def test_u_at_r_equals_t_is_the_velocity():
    net, mu, s, y, g = exact_setup()
    z = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
    b = lambda a: a.view(-1, 1, 1, 1)
    sig2 = mf.gaussian_sigma(b(t), b(s[y])) ** 2
    v_closed = -mu[y] + ((1 + b(s[y]) ** 2) * b(t) - b(s[y]) ** 2) / sig2 * (z - (1 - b(t)) * mu[y])
    torch.testing.assert_close(mf.average_velocity(net, z, t, t, y), v_closed, rtol=1e-12, atol=1e-12)
    # and it is the limit r -> t of the finite-interval formula: error (t - r)/2 |du/dr| <= 1e-6 * O(10)
    d = 1e-6
    torch.testing.assert_close(mf.average_velocity(net, z, t - d, t, y), v_closed, rtol=0, atol=1e-4)
    # the network is fed h = t - r: 0 on the first call, d on the second
    assert (net.calls[0][1] == 0).all() and torch.allclose(net.calls[1][1], torch.full((6,), d, dtype=torch.float64))


def test_fewstep_sampler_with_exact_u_hits_the_exact_endpoint():
    net, mu, s, y, g = exact_setup()
    e = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    # z_1 = e, so xi = e and the trajectory ends at mu + s e.
    end = mu[y] + s[y].view(-1, 1, 1, 1) * e
    for steps in (1, 2, 4):
        torch.testing.assert_close(mf.sample_fewstep(net, e, y, steps), end, rtol=0, atol=1e-12)
    t, h, _ = net.calls[0]
    assert (t == 1).all() and (h == 1).all()  # 1 NFE: u(e, r=0, t=1)


def test_cmt_mf_targets_on_exact_trajectories_are_the_exact_u():
    net, mu, s, y, g = exact_setup()
    e = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    M = 4
    states, grid = mf.teacher_trajectory(net, e, y, M, "meanflow")
    b = lambda a: a.view(-1, 1, 1, 1)
    exact = torch.stack([(1 - tk) * mu[y] + mf.gaussian_sigma(tk, b(s[y])) * e for tk in grid])
    torch.testing.assert_close(states, exact, rtol=0, atol=1e-12)
    assert grid[0] == 0 and grid[-1] == 1
    pairs = M * (M + 1) // 2  # all of them
    z, r, t, u_tgt, n = mf.cmt_mf_pairs(states, grid, pairs, torch.Generator().manual_seed(0))
    assert (t > r).all() and z.shape[0] == 6 * pairs
    assert len({(a, c, k) for a, c, k in zip(t.tolist(), r.tolist(), n.tolist())}) == 6 * pairs  # distinct pairs
    u = mf.gaussian_average_velocity(z, b(r), b(t), mu[y[n]], b(s[y[n]]))
    torch.testing.assert_close(u_tgt, u, rtol=0, atol=1e-10)
    # and the CMT-MF loss of the exact model is zero
    assert mf.cmt_mf_loss(net, z, r, t, y[n], u_tgt).item() < 1e-20
    with pytest.raises(ValueError, match="--pairs"):
        mf.cmt_mf_pairs(states, grid, pairs + 1, torch.Generator())


def test_time_sampler_statistics():
    n = 100_000
    g = torch.Generator().manual_seed(0)
    t, r = mf.sample_t_r(n, -0.4, 1.0, 0.25, g, "cpu")
    assert (r <= t).all() and (t > 0).all() and (t < 1).all()
    neq = r != t
    assert neq.sum().item() == n - int(n * 0.75)  # exactly 25%, the last rows (official data_proportion)
    assert not neq[: int(n * 0.75)].any()
    logit = lambda a: torch.log(a / (1 - a))
    # {t, r} is a pair of i.i.d. N(-0.4, 1) logits: their mean is N(-0.4, 1/2); 25k rows -> sd 0.0045
    assert abs((logit(t[neq]) + logit(r[neq])).mean().item() / 2 + 0.4) < 0.03
    # r = t rows hold the max of two draws: E = -0.4 + 1/sqrt(pi) = 0.164; sd 0.83/sqrt(75k) = 0.003
    assert abs(logit(t[~neq]).mean().item() - (-0.4 + 1 / torch.pi ** 0.5)) < 0.02
    drop = mf.label_drop_mask(n, 0.1, g, "cpu")
    k = drop.sum().item()
    assert abs(k / n - 0.1) < 0.005 and drop[:k].all()  # binomial sd 0.001; the first k rows


def test_cfg_target_formula():
    class Const(torch.nn.Module):
        """u(z, t, t | y) = 3 for the null class, 5 for a label; records the calls."""
        num_classes = 4

        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, z, t, h, y):
            self.calls.append(h.clone())
            return torch.where(y == 4, 3.0, 5.0).view(-1, 1, 1, 1).expand_as(z)

    net = Const()
    z, v = torch.zeros(4, 1, 2, 2), torch.full((4, 1, 2, 2), 7.0)
    y = torch.tensor([0, 1, 2, 3])
    t = torch.tensor([0.1, 0.5, 0.75, 0.9])
    vg = mf.guided_velocity(net, z, t, v, y, 4, omega=0.2, kappa=0.92, t_start=0.0, t_end=0.75)
    inside = 0.2 * 7 + 0.92 * 5 + (1 - 0.2 - 0.92) * 3
    torch.testing.assert_close(vg[:, 0, 0, 0], torch.tensor([inside, inside, inside, 7.0]))
    assert all((h == 0).all() for h in net.calls)  # guidance uses u(z, t, t) = v
    vg = mf.guided_velocity(net, z, t, v, y, 4, omega=2.0, kappa=0.0, t_start=0.0, t_end=1.0)
    torch.testing.assert_close(vg[:, 0, 0, 0], torch.full((4,), 2.0 * 7 + (1 - 2.0) * 3))  # kappa 0: classic CFG


def test_dropped_labels_use_the_null_class_and_the_plain_velocity():
    net, mu, s, y, g = exact_setup(n=4)
    seen = []
    orig = net.forward
    net.forward = lambda z, t, h, y_: (seen.append(y_.clone()), orig(z, t, h, y_))[1]
    x = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64)
    e = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.full((4,), 0.5, dtype=torch.float64)
    drop = torch.tensor([True, False, False, False])
    null_mu = torch.cat([mu, torch.zeros(1, 2, 4, 4, dtype=torch.float64)])  # a row for the null class
    net.mu, net.s = null_mu, torch.cat([s, torch.ones(1, dtype=torch.float64)])
    cfg = dict(omega=0.5, kappa=0.3, t_start=0.0, t_end=1.0, norm_p=1.0, norm_eps=0.01)
    mf.meanflow_loss(net, x, y, e, t, t, drop, cfg)
    assert seen[-1].tolist() == [3, y[1].item(), y[2].item(), y[3].item()]  # jvp call: null for the dropped row


def test_meanflow_target_reduces_to_flow_matching_at_r_equals_t():
    net = random_dit()
    g = torch.Generator().manual_seed(2)
    x, e = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    y, t = torch.tensor([0, 1, 2, 3, 4]), torch.rand(5, generator=g)
    cfg = dict(omega=1.0, kappa=0.0, t_start=0.0, t_end=1.0, norm_p=1.0, norm_eps=0.01)
    _, l = mf.meanflow_loss(net, x, y, e, t, t, torch.zeros(5, dtype=torch.bool), cfg)
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
    fm = (mf.average_velocity(net, z, t, t, y) - (e - x)).square().sum(dim=(1, 2, 3))
    torch.testing.assert_close(l, fm.detach(), rtol=1e-5, atol=1e-6)  # float32 sums of 256 terms
    dudt = torch.randn(5, 4, 8, 8, generator=g)
    torch.testing.assert_close(mf.meanflow_target(e - x, dudt, t, t), e - x, rtol=0, atol=0)


def test_adaptive_weight_formula():
    l = torch.tensor([0.0, 0.5, 3.0, 100.0], requires_grad=True)
    for p, c in ((1.0, 0.01), (0.5, 1e-3), (0.0, 0.01)):
        w = mf.adaptive_weight(l, p, c)
        torch.testing.assert_close(w, 1 / (l.detach() + c) ** p)
        (g,) = torch.autograd.grad((l * w).sum(), l)
        torch.testing.assert_close(g, w.detach())  # the weight is stop-gradient


def test_meanflow_loss_gradient_treats_target_and_guidance_as_constants():
    # d loss / d theta must be that of mean(l / sg(l + c)) with u_tgt a constant: the jvp's du/dt and the
    # CFG forwards depend on theta too, and leaking their gradient would give a different (wrong) gradient.
    net = random_dit(torch.float64)
    params = list(net.parameters())
    g = torch.Generator().manual_seed(5)
    x, e = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    y, t = torch.tensor([0, 1, 2, 3]), 0.2 + 0.8 * torch.rand(4, generator=g, dtype=torch.float64)
    r = t * torch.rand(4, generator=g, dtype=torch.float64)
    drop = torch.tensor([True, False, False, False])
    cfg = dict(omega=0.6, kappa=0.3, t_start=0.0, t_end=1.0, norm_p=1.0, norm_eps=0.01)
    loss, _ = mf.meanflow_loss(net, x, y, e, t, r, drop, cfg)
    grads = torch.autograd.grad(loss, params)
    b = lambda a: a.view(-1, 1, 1, 1)
    z, v, y_in = (1 - b(t)) * x + b(t) * e, e - x, torch.where(drop, 5, y)

    def reference(constant_target):
        v_g = torch.where(b(drop), v, mf.guided_velocity(net, z, t, v, y, 5, 0.6, 0.3, 0.0, 1.0))
        f = lambda z_, t_: mf.average_velocity(net, z_, r, t_, y_in)
        u, dudt = torch.func.jvp(f, (z, t), (v_g, torch.ones_like(t)))
        u_tgt = v_g - b(t - r) * dudt
        l = (u - (u_tgt.detach() if constant_target else u_tgt)).square().sum(dim=(1, 2, 3))
        return torch.autograd.grad((l / (l.detach() + 0.01)).mean(), params)

    for a, c in zip(grads, reference(True)):  # float64, same ops: agreement to roundoff
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)
    leak = reference(False)  # the check has teeth: a target that carries gradient differs
    assert max((a - c).abs().max().item() for a, c in zip(grads, leak)) > 1e-4


def _mf_setup(cfg, stage, teacher=None, rank=0, world=1):
    """meanflow_post.train's setup of one rank, without the loop: (net, params, micro_loss, accum)."""
    batch_gpu = cfg["batch_gpu"] or cfg["batch"] // world
    accum = cfg["batch"] // (batch_gpu * world)
    torch.manual_seed(cfg["seed"])
    net = mf.build_net(cfg)
    mf.init_weights(net, cfg)
    params = [p for p in net.parameters() if p.requires_grad]
    micro_loss = mf.make_loss(dict(cfg, stage=stage), stage, net, teacher, batch_gpu, accum, rank, world,
                              torch.device("cpu"))
    return net, params, micro_loss, accum


def test_mid_stage_drops_labels_before_the_teacher_runs(tmp_path, monkeypatch):
    run_main("--preset", "tiny", "--stage", "pretrain", "--iters", 1, "--batch", 8, "--outdir", tmp_path / "t")
    cfg = mf.resolve_config(mf.parse_args(["--preset", "tiny", "--stage", "mid", "--teacher", str(tmp_path / "t" / "ckpt-latest.pt"),
                                           "--batch", "2048", "--pairs", "4"]), "mid")
    teacher, seen, student = mf.load_teacher(cfg, torch.device("cpu")), [], []
    counting = lambda z, t, h, y: (seen.append(y.clone()), teacher(z, t, h, y))[1]
    _, _, micro_loss, _ = _mf_setup(cfg, "mid", counting)
    orig = mf.cmt_mf_loss
    monkeypatch.setattr(mf, "cmt_mf_loss", lambda net, z, r, t, y, u: (student.append(y.clone()), orig(net, z, r, t, y, u))[1])
    micro_loss(0, 0)
    assert len(seen) == cfg["teacher_steps"] and all(torch.equal(s, seen[0]) for s in seen)  # one label per trajectory
    y_teacher = seen[0]
    assert y_teacher.shape == (2048 // 4,)
    frac = (y_teacher == 8).double().mean().item()  # 8 = null class of the tiny preset
    assert abs(frac - 0.1) < 0.045  # binomial sd sqrt(0.09 / 512) = 0.013
    # the student sees each trajectory's (possibly dropped) label on all of its pairs
    assert torch.equal(student[0], y_teacher.repeat_interleave(4))


def test_compile_never_touches_the_jvp_path(tmp_path, monkeypatch):
    class Compiled(torch.nn.Module):
        """Stands in for torch.compile (a C++ toolchain is not needed to check the wiring)."""

        def __init__(self, net):
            super().__init__()
            self.net, self.rows = net, []

        def forward(self, z, t, h, y):
            self.rows.append(z.shape[0])
            return self.net(z, t, h, y)

    wrappers = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: wrappers.append(Compiled(m)) or wrappers[-1])
    cfg = mf.resolve_config(mf.parse_args(["--preset", "tiny", "--stage", "post", "--batch", "8", "--compile",
                                           "--kappa", "0.5", "--omega", "0.5"]), "post")
    net, _, micro_loss, _ = _mf_setup(cfg, "post")
    eager_rows = []
    net.register_forward_hook(lambda m, args, out: eager_rows.append(args[0].shape[0]))
    micro_loss(0, 0).backward()
    assert len(wrappers) == 1 and wrappers[0].net is net
    assert wrappers[0].rows == [16]  # the CFG forwards (cond + null, batched) went through the compiled net
    assert eager_rows == [16, 8]  # ... and the jvp (8 rows) called the eager module directly


MEANFLOW_DDP_SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, {root!r})
import meanflow_post as mf
torch.set_num_threads(1)
rank, world, device = mf.init_distributed()
cfg = mf.resolve_config(mf.parse_args(["--preset", "tiny", "--stage", "post", "--batch", "8", "--batch-gpu", "4",
                                        "--model", "tiny-teacher", "--kappa", "0.5", "--omega", "0.7"]), "post")
accum = cfg["batch"] // (cfg["batch_gpu"] * world)
torch.manual_seed(cfg["seed"])  # as train: the same init on every rank
net = mf.build_net(cfg).to(device)
params = [p for p in net.parameters() if p.requires_grad]
gen = torch.Generator().manual_seed(3)
with torch.no_grad():
    for p in net.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=gen))
micro_loss = mf.make_loss(dict(cfg, stage="post"), "post", net, None, cfg["batch_gpu"], accum, rank, world, device)
mf.accumulate_gradients(params, micro_loss, 0, rank, accum, world, device)
if rank == 0:
    torch.save([p.grad for p in params], {out!r} + "/grads.pt")
if world > 1:
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


def test_ddp_gradient_equals_single_process_gradient_on_joined_batch(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(MEANFLOW_DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "grads.pt", weights_only=True)
    # Single process: the same two micro-batches (slots 0 and 1) joined into one batch of 8.
    cfg = mf.resolve_config(mf.parse_args(["--preset", "tiny", "--stage", "post", "--batch", "8", "--batch-gpu", "4",
                                           "--model", "tiny-teacher", "--kappa", "0.5", "--omega", "0.7"]), "post")
    net, params, micro_loss, accum = _mf_setup(cfg, "post")
    assert accum == 2
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    data = mf.open_data(cfg, torch.device("cpu"))
    parts = [mf.mf_inputs(cfg, data, 0, slot, 4, 2, torch.device("cpu")) for slot in (0, 1)]
    joined = [torch.cat(f) for f in zip(*parts)]
    loss, _ = mf.meanflow_loss(net, *joined, cfg)
    grads = torch.autograd.grad(loss, params)
    assert sum(g.abs().sum() for g in grads) > 0
    for a, b in zip(ddp, grads):  # float32, different summation order: agreement to ~1e-6 relative
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # one process, 2 accumulation steps over the same two slots: the same gradient
    mf.accumulate_gradients(params, micro_loss, 0, 0, accum, 1, torch.device("cpu"))
    for p, b in zip(params, grads):
        torch.testing.assert_close(p.grad, b, rtol=1e-4, atol=1e-6)


def run_main(*args):
    return mf.main([str(a) for a in args])


def test_meanflow_resume_is_bit_exact(tmp_path):
    common = ["--preset", "tiny", "--model", "tiny-teacher", "--batch", "16", "--log-every", "2", "--ckpt-every", "3",
              "--snap-every", "3"]
    for stage in ("pretrain", "mid", "post"):
        extra = {"pretrain": [], "mid": ["--teacher", tmp_path / "pretrain-a" / "ckpt-latest.pt"],
                 "post": ["--init", tmp_path / "mid-a" / "ckpt-latest.pt"]}[stage]
        run_main("--stage", stage, "--iters", 6, "--outdir", tmp_path / f"{stage}-a", *common, *extra)
        (tmp_path / f"{stage}-b").mkdir()
        shutil.copy(tmp_path / f"{stage}-a" / "ckpt-0000003.pt", tmp_path / f"{stage}-b" / "ckpt-latest.pt")
        run_main("--stage", stage, "--iters", 6, "--outdir", tmp_path / f"{stage}-b", "--resume", "auto", *common, *extra)
        a = torch.load(tmp_path / f"{stage}-a" / "ckpt-latest.pt", weights_only=True)
        b = torch.load(tmp_path / f"{stage}-b" / "ckpt-latest.pt", weights_only=True)
        assert a["iter"] == b["iter"] == 6 and a["stage"] == stage
        for key in ("model", "ema"):
            for k in a[key]:
                assert torch.equal(a[key][k], b[key][k]), (stage, key, k)
        for k, sa in a["optimizer"]["state"].items():
            assert all(torch.equal(sa[n], b["optimizer"]["state"][k][n]) for n in sa)
        assert not torch.equal(a["model"]["final_layer.linear.weight"], torch.zeros_like(a["model"]["final_layer.linear.weight"]))
        assert a["script"] == "meanflow_post.py" and a["config"]["outdir"] == str(tmp_path / f"{stage}-a")
    # A resume that changes a run-defining field is refused, naming the field, and writes nothing;
    # a longer run (--iters is free to change) continues from iteration 6.
    before = folder_bytes(tmp_path / "pretrain-b")
    with pytest.raises(SystemExit, match=r"--resume .*differs from this one: lr 0\.001 -> 0\.002 \(only "):
        run_main("--stage", "pretrain", "--iters", 6, "--outdir", tmp_path / "pretrain-b", "--resume", "auto", *common,
                 "--lr", "0.002")
    with pytest.raises(SystemExit, match=r"model 'tiny-teacher' -> 'tiny'"):
        run_main("--stage", "pretrain", "--iters", 6, "--outdir", tmp_path / "pretrain-b", "--resume", "auto", *common,
                 "--model", "tiny")
    assert folder_bytes(tmp_path / "pretrain-b") == before
    tr = run_main("--stage", "pretrain", "--iters", 7, "--outdir", tmp_path / "pretrain-b", "--resume", "auto", *common)
    assert tr.it == 7 and torch.load(tmp_path / "pretrain-b" / "ckpt-latest.pt", weights_only=True)["iter"] == 7


def mf_tiny_teacher(outdir, iters=1):
    """A teacher checkpoint of this script: the tiny preset's tiny-teacher pretrained for `iters` steps."""
    run_main("--preset", "tiny", "--model", "tiny-teacher", "--stage", "pretrain", "--iters", iters, "--batch", 16,
             "--outdir", outdir)
    return Path(outdir) / "ckpt-latest.pt"


@pytest.mark.parametrize("world", [1, 2])
def test_meanflow_bulk_trajectories_equal_one_solve_per_micro_step(tmp_path, world):
    # Per rank (DDP simulated: each rank its own micro-batch slots), 5 iterations of 4 / world micro-steps x 4
    # trajectories (batch 64, --batch-gpu 16, --pairs 4); --traj-buffer = 3 iterations' trajectories: chunks [0, 3)
    # and [3, 5). The reference solves each micro-step alone from the inputs its micro_seed generator draws.
    argv = ["--preset", "tiny", "--stage", "mid", "--teacher", str(mf_tiny_teacher(tmp_path / "t")), "--batch", "64",
            "--batch-gpu", "16", "--pairs", "4", "--iters", "5"]
    cfg = mf.resolve_config(mf.parse_args(argv), "mid")
    teacher, cpu = mf.load_teacher(cfg, torch.device("cpu")), torch.device("cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the adaLN-Zero init: a teacher with u = 0 would make every trajectory constant
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    sizes = []
    counting = lambda z, t, h, y: sizes.append(z.shape[0]) or teacher(z, t, h, y)
    solve = lambda e, y: mf.solve_teacher(counting, e, y, cfg)  # as make_loss wires them
    inputs = lambda it, slot: mf.mid_inputs(cfg, it, slot, cfg["batch_gpu"], cpu)
    accum, b, M, iters = cfg["batch"] // (cfg["batch_gpu"] * world), 4, cfg["teacher_steps"], 5
    assert accum == 4 // world
    slots, noises = [], []
    for rank in range(world):
        one, bulk = (mf.TeacherPairs(solve, inputs, dict(cfg, traj_buffer=n), rank, accum, b)
                     for n in (0, 3 * accum * b))
        assert one.chunk == 0 and bulk.chunk == 3
        for it in range(iters):
            for slot in range(rank * accum, (rank + 1) * accum):
                gen, y, e = inputs(it, slot)
                ref_states, grid = solve(e, y)
                ref = mf.cmt_mf_pairs(ref_states, grid, cfg["pairs"], gen)
                sizes.clear()
                a = one.get(it, slot)
                assert sizes == [b] * M  # one solve per micro-step: its own trajectories alone
                sizes.clear()
                c = bulk.get(it, slot)
                chunk_start = it in (0, 3) and slot == rank * accum
                assert sizes == ([min(3, iters - it) * accum * b] * M if chunk_start else [])  # one solve per chunk
                assert torch.equal(a[0], ref_states) and torch.equal(a[2], y) and torch.equal(c[2], y)
                # The bulk solve differs in the teacher's batch only (eval mode, LayerNorm and attention per sample):
                # float32 rounding of other matmul blockings, measured 0 on this CPU; states are O(5), 1e-5 is ~20 ulp.
                torch.testing.assert_close(c[0], ref_states, rtol=1e-5, atol=1e-5)
                assert torch.equal(c[0][M], e)  # z_{t_M} = e: exactly this micro-step's noise
                for got in (a, c):  # the pair picks continue the micro-step's own generator
                    _, r, t, u_tgt, n = mf.cmt_mf_pairs(got[0], got[1], cfg["pairs"], got[3])
                    assert torch.equal(n, ref[4]) and torch.equal(r, ref[1]) and torch.equal(t, ref[2])
                    torch.testing.assert_close(u_tgt, ref[3], rtol=1e-4, atol=1e-4)  # chords over t_i - t_j >= 1/4
                slots.append((it, slot))
                noises.append(e.flatten(1))
    assert sorted(slots) == [(it, s) for it in range(iters) for s in range(4)]  # every micro-batch once, over ranks
    assert len(torch.unique(torch.cat(noises), dim=0)) == iters * 4 * b  # every trajectory its own noise


def test_meanflow_mid_resume_inside_a_trajectory_buffer_is_bit_exact(tmp_path, monkeypatch):
    # --traj-buffer 8 at 4 trajectories per iteration (batch 16 / --pairs 4): chunks [0, 2), [2, 4), [4, 5). The
    # checkpoint at iteration 3 lies inside [2, 4), which the resumed run re-solves from the same micro_seed inputs at
    # the same batch: bit-exact, nothing of the buffer in the checkpoint.
    common = ["--preset", "tiny", "--model", "tiny-teacher", "--stage", "mid", "--batch", 16, "--iters", 5,
              "--log-every", 1, "--ckpt-every", 3, "--snap-every", 3, "--teacher", mf_tiny_teacher(tmp_path / "t", 2)]
    run_main(*common, "--traj-buffer", 8, "--outdir", tmp_path / "a")
    for run in "bc":
        (tmp_path / run).mkdir()
        shutil.copy(tmp_path / "a" / "ckpt-0000003.pt", tmp_path / run / "ckpt-latest.pt")
    sizes, real = [], mf.teacher_trajectory
    monkeypatch.setattr(mf, "teacher_trajectory", lambda net, e, *a: sizes.append(e.shape[0]) or real(net, e, *a))
    run_main(*common, "--traj-buffer", 8, "--outdir", tmp_path / "b", "--resume", "auto")
    assert sizes == [8, 4]  # the chunk [2, 4) again, then [4, 5)
    a, b = (torch.load(tmp_path / run / "ckpt-latest.pt", weights_only=True) for run in "ab")
    assert a["iter"] == b["iter"] == 5
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert [r["loss"] for r in _stats(tmp_path / "a")][3:] == [r["loss"] for r in _stats(tmp_path / "b")]
    # --traj-buffer may change on resume (RESUME_MAY_CHANGE): the same inputs solved in other batches, the same
    # pairs to float rounding, so the weights agree to float32 round-off.
    sizes.clear()
    run_main(*common, "--traj-buffer", 0, "--outdir", tmp_path / "c", "--resume", "auto")
    assert sizes == [4, 4]
    c = torch.load(tmp_path / "c" / "ckpt-latest.pt", weights_only=True)
    for key in ("model", "ema"):
        for k in a[key]:
            torch.testing.assert_close(c[key][k], a[key][k], rtol=1e-4, atol=1e-6)


def test_meanflow_mid_solves_in_bulk_by_default_and_per_micro_step_at_traj_buffer_0(tmp_path, monkeypatch):
    # 4 iterations x 4 trajectories (batch 16 / --pairs 4). Default --traj-buffer 128: the whole run's 16 in one solve
    # (the chunk ends with the run); 0, or fewer than one iteration's 4: one solve per micro-step; 8: 2 iterations.
    assert all(mf.resolve_config(mf.parse_args(["--preset", p, "--stage", "mid"]), "mid")["traj_buffer"] == 128
               for p in mf.PRESETS)
    teacher = mf_tiny_teacher(tmp_path / "t")
    sizes, real = [], mf.teacher_trajectory
    monkeypatch.setattr(mf, "teacher_trajectory", lambda net, e, *a: sizes.append(e.shape[0]) or real(net, e, *a))
    for i, (flags, solved) in enumerate([([], [16]), (["--traj-buffer", 0], [4] * 4), (["--traj-buffer", 3], [4] * 4),
                                         (["--traj-buffer", 8], [8, 8])]):
        sizes.clear()
        run_main("--preset", "tiny", "--model", "tiny-teacher", "--stage", "mid", "--batch", 16, "--iters", 4,
                 "--teacher", teacher, "--outdir", tmp_path / f"m{i}", *flags)
        assert sizes == solved, flags


def test_200_steps_finite_and_injected_nan_steps_as_sony_cmt_or_is_skipped(tmp_path, monkeypatch, capsys):
    make_loss = mf.make_loss

    def poisoned(*args):
        micro_loss = make_loss(*args)
        return lambda it, slot: micro_loss(it, slot) * float("nan") if it == 50 else micro_loss(it, slot)

    monkeypatch.setattr(mf, "make_loss", poisoned)
    common = ["--preset", "tiny", "--stage", "pretrain", "--model", "tiny-teacher", "--batch", "8", "--log-every", 50]
    tr = run_main(*common, "--iters", 200, "--ckpt-every", 200, "--outdir", tmp_path / "a")
    assert tr.nonfinite == 1 and "non-finite loss (1 so far), step taken with nan_to_num gradients" in capsys.readouterr().out
    stats = [json.loads(line) for line in (tmp_path / "a" / "stats.jsonl").read_text().splitlines()]
    assert [s["iter"] for s in stats] == [50, 100, 150, 200] and stats[-1]["nonfinite"] == 1
    assert all(torch.isfinite(torch.tensor(s["loss"])) and torch.isfinite(torch.tensor(s["grad_norm"])) for s in stats)
    for net in (tr.net, tr.ema):
        assert all(torch.isfinite(p).all() for p in net.parameters())
    keys = {"iter", "kimg", "loss", "grad_norm", "lr", "it_per_s", "img_per_s", "nonfinite", "sec"}
    assert keys <= set(stats[0])
    steps = lambda t: {int(st["step"]) for st in t.optimizer.state_dict()["state"].values()}
    assert steps(tr) == {200}  # the poisoned step was taken (on nan_to_num'd gradients)
    skip = run_main(*common, "--iters", 60, "--outdir", tmp_path / "b", "--skip-nonfinite")
    assert skip.nonfinite == 1 and steps(skip) == {59} and "step skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--max-nonfinite 0"):
        run_main(*common, "--iters", 60, "--outdir", tmp_path / "c", "--max-nonfinite", 0)


def test_meanflow_tiny_preset_end_to_end(tmp_path, capsys):
    table = run_main("--preset", "tiny", "--iters", 10, "--eval-num", 300, "--outdir", tmp_path)
    out = capsys.readouterr().out
    rows = table.splitlines()[1:]
    assert "flow-map err" in out and "pixel FD" in out and len(rows) == 7
    for row in rows[:-1]:
        err, fd = float(row.split()[-3]), float(row.split()[-2])
        assert 0 < err < 10 and 0 < fd < 1e4
    for stage in ("teacher", "mid", "post", "post-random"):
        assert (tmp_path / stage / "ckpt-latest.pt").is_file() and (tmp_path / stage / "config.json").is_file()
    ckpt = torch.load(tmp_path / "post" / "ckpt-latest.pt", weights_only=True)
    assert set(ckpt) == {"model", "ema", "optimizer", "iter", "rng", "data_state", "config", "stage", "script"}
    assert ckpt["script"] == "meanflow_post.py" and ckpt["stage"] == "post" and ckpt["config"]["stage"] == "post"
    # comparison.png: 8 labelled rows (exact map, 4-step teacher, then mid, post and the baseline at 1 and 2
    # steps) of 16 samples (two per class) from the table's noise, each enlarged 8x behind a 290-px label strip.
    pic = np.asarray(Image.open(tmp_path / "comparison.png"))
    assert pic.shape == (8 * (64 + 4), 290 + 16 * (64 + 4), 3)
    assert all((pic[i * 68:i * 68 + 64, :290] < 128).any() for i in range(8))  # every row carries its label
    tiles = lambda i: np.stack([pic[i * 68:i * 68 + 64, 290 + j * 68:290 + j * 68 + 64] for j in range(16)])
    big = lambda x: (x[:, :3] * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy() \
        .repeat(8, axis=1).repeat(8, axis=2)  # the first 3 of 4 latent channels as RGB, nearest-neighbour 8x
    e, y, z0 = mf.eval_batch(ckpt["config"], 300)
    load = lambda stage: mf.load_ema_net(tmp_path / stage / "ckpt-latest.pt", "test")[0].eval()
    assert np.array_equal(tiles(0), big(z0[:16]))
    assert np.array_equal(tiles(4), big(mf.sample_fewstep(load("post"), e, y, 1)[:16]))  # the table's samples
    assert np.array_equal(tiles(7), big(mf.sample_fewstep(load("post-random"), e[:16], y[:16], 2)))  # drawn anew
    # The finished pipeline: a plain rerun is refused; --resume auto continues every stage (here: all done),
    # so the table's error and FD columns come back identical and no stage trains again.
    with pytest.raises(SystemExit, match="already holds 6 files"):
        run_main("--preset", "tiny", "--iters", 10, "--eval-num", 300, "--outdir", tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("ckpt-*.pt")}
    again = run_main("--preset", "tiny", "--iters", 10, "--eval-num", 300, "--outdir", tmp_path, "--resume", "auto")
    assert [r.split()[-3:-1] for r in again.splitlines()] == [r.split()[-3:-1] for r in table.splitlines()]
    assert {p: p.read_bytes() for p in tmp_path.rglob("ckpt-*.pt")} == before


def test_sample_stage_writes_npz_and_grid(tmp_path, monkeypatch, capsys):
    run_main("--preset", "tiny", "--stage", "pretrain", "--iters", 2, "--batch", 8, "--outdir", tmp_path)
    # --fid-ref: FID through fid.py on random Inception weights (the plumbing, not the value), the reference read
    # before sampling (a bad one is a bad-input row)
    import fid
    torch.save(fid.random_inception().state_dict(), tmp_path / "inception.pth")
    monkeypatch.setenv("FID_WEIGHTS", str(tmp_path / "inception.pth"))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    run_main("--preset", "tiny", "--stage", "sample", "--init", tmp_path / "ckpt-latest.pt", "--num", 4,
             "--sample-steps", "1", "--fid-ref", tmp_path / "ref.npz", "--outdir", tmp_path / "f")
    score = float(capsys.readouterr().out.split("FID (1 steps, 4 images): ")[1].split()[0])
    assert math.isfinite(score) and score > 0
    # the same CLI as cmt_cifar10.py: --stage sample --init CKPT --num N --sample-steps 1,2
    run_main("--preset", "tiny", "--stage", "sample", "--init", tmp_path / "ckpt-latest.pt", "--num", 10,
             "--sample-steps", "1,2", "--outdir", tmp_path / "s")
    for steps in (1, 2):
        images = np.load(tmp_path / "s" / f"samples-{steps}step.npz")["images"]
        assert images.shape == (10, 8, 8, 3) and images.dtype == np.uint8
        assert (tmp_path / "s" / f"samples-{steps}step.png").is_file()
    # 1 step is e - u(e, 0, 1) of the EMA model, on the seed's noise: the npz holds exactly those images
    ckpt = torch.load(tmp_path / "ckpt-latest.pt", weights_only=True)
    net = mf.build_net(ckpt["config"])
    net.load_state_dict(ckpt["ema"])
    gen = torch.Generator().manual_seed(mf.micro_seed(0, 0, 0))
    e = torch.randn((10, 4, 8, 8), generator=gen)
    y = torch.randint(0, 8, (10,), generator=gen)
    want = mf.to_uint8((e - mf.average_velocity(net.eval(), e, torch.zeros(10), torch.ones(10), y))[:, :3].clamp(-1, 1))
    assert np.array_equal(np.load(tmp_path / "s" / "samples-1step.npz")["images"], want)  # same ops, same batch
    with pytest.raises(SystemExit, match="--init"):
        run_main("--preset", "tiny", "--stage", "sample", "--outdir", tmp_path / "s2")
    with pytest.raises(SystemExit, match="--outdir .*already holds 4 files"):  # never over an earlier sample
        run_main("--preset", "tiny", "--stage", "sample", "--init", tmp_path / "ckpt-latest.pt", "--num", 10,
                 "--outdir", tmp_path / "s")
    with pytest.raises(SystemExit, match="--sample-steps"):
        run_main("--preset", "tiny", "--stage", "sample", "--init", tmp_path / "ckpt-latest.pt", "--sample-steps", "1,x")


def test_meanflow_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="--teacher"):
        run_main("--preset", "tiny", "--stage", "mid", "--outdir", tmp_path)
    with pytest.raises(SystemExit, match="--batch-gpu 4"):
        run_main("--preset", "tiny", "--stage", "post", "--batch", "10", "--batch-gpu", "4", "--outdir", tmp_path)
    with pytest.raises(SystemExit, match="--data .*nothing: no such folder"):
        run_main("--preset", "b4", "--stage", "post", "--data", tmp_path / "nothing", "--model", "tiny", "--outdir", tmp_path)
    with pytest.raises(SystemExit, match="--init .*no.pt: no such file"):
        run_main("--preset", "tiny", "--stage", "post", "--init", tmp_path / "no.pt", "--outdir", tmp_path)
    with pytest.raises(SystemExit, match="--init teacher: needs --teacher"):
        run_main("--preset", "tiny", "--stage", "post", "--init", "teacher", "--outdir", tmp_path)
    # an --init of another size: the keys that do not fit, not a load_state_dict traceback
    make_ckpt(tmp_path / "m.pt", "meanflow_post.py", "mid", config={"iters": 10}, it=3)
    with pytest.raises(SystemExit, match="--init .*m.pt: its EMA weights do not fit --model tiny"):
        run_main("--preset", "tiny", "--stage", "post", "--init", tmp_path / "m.pt", "--outdir", tmp_path / "r")
    with pytest.raises(SystemExit, match="--vae .*nope.safetensors: not readable sd-vae-ft-mse weights"):
        mf.open_vae(tmp_path / "nope.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # nothing written by any of them


def test_bf16_forward_keeps_loss_close_to_fp32():
    net = random_dit()
    g = torch.Generator().manual_seed(4)
    x, e = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    y, t = torch.tensor([0, 1, 2, 5]), torch.rand(4, generator=g)
    r = t * 0.5
    cfg = dict(omega=1.0, kappa=0.5, t_start=0.0, t_end=1.0, norm_p=1.0, norm_eps=0.01)
    drop = torch.zeros(4, dtype=torch.bool)
    _, l32 = mf.meanflow_loss(net, x, y, e, t, r, drop, cfg)
    loss, l16 = mf.meanflow_loss(net, x, y, e, t, r, drop, cfg, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    assert l16.dtype == torch.float32 and loss.dtype == torch.float32
    assert not torch.equal(l16, l32)  # autocast really ran the network in bf16
    torch.testing.assert_close(l16, l32, rtol=5e-2, atol=1e-2)  # bf16 has 8 mantissa bits (~4e-3 relative per op)


def test_meanflow_presets_hold_the_paper_recipe(tmp_path):
    resolve = lambda preset, stage: mf.resolve_config(mf.parse_args(["--preset", preset, "--stage", stage]), stage)
    post, teacher = resolve("xl2", "post"), resolve("xl2", "pretrain")
    # Gsunshine/meanflow configs/default.py
    recipe = dict(lr=1e-4, adam_betas=[0.9, 0.95], ema=0.9999, batch=256, p_mean=-0.4, p_std=1.0, ratio_neq=0.25,
                  label_drop=0.1, norm_p=1.0, norm_eps=0.01, res=32, channels=4, num_classes=1000)
    assert {k: post[k] for k in recipe} == recipe
    assert (post["model"], post["omega"], post["kappa"], post["t_start"], post["t_end"]) == ("XL/2", 0.2, 0.92, 0.0, 0.75)
    assert (teacher["model"], teacher["omega"], teacher["kappa"], teacher["t_end"]) == ("B/4", 1.0, 0.5, 1.0)
    mid = resolve("xl2", "mid")
    assert (mid["teacher_solver"], mid["teacher_steps"]) == ("meanflow", 8)  # MF-B/4 teacher run for 8 steps
    assert abs(teacher["iters"] * 256 / 1_281_167 - 240) < 0.01  # 240 epochs
    cfg = mf.resolve_config(mf.parse_args(["--preset", "tiny", "--stage", "post", "--mimg", "0.0064"]), "post")
    assert cfg["iters"] == 100 and cfg["mimg"] == 0.0064  # --mimg sets --iters at the preset's batch (64)
    opt = mf.make_optimizer(cfg, list(mf.build_net(cfg).parameters()), torch.device("cpu"))
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["weight_decay"] == 0


def test_dit_mf_key_names_and_sizes():
    with torch.device("meta"):
        nets = {name: mf.DiTMF(**mf.MODELS[name]) for name in ("B/4", "B/2", "M/2", "L/2", "XL/2")}
    counts = {n: sum(p.numel() for p in net.parameters()) for n, net in nets.items()}

    def dit_mf_count(depth, hidden_size, num_heads, patch_size, C=4, K=1000):
        """Counted by hand from the DiT layer list (facebookresearch/DiT models.py); pos_embed is a fixed
        buffer, not counted."""
        H, o = hidden_size, patch_size ** 2 * C
        block = (3 * H * H + 3 * H) + (H * H + H) + (4 * H * H + 4 * H) + (4 * H * H + H) + (6 * H * H + 6 * H)
        embed = (o * H + H) + 2 * (256 * H + H + H * H + H) + (K + 1) * H  # x, t and h (256 freqs), y (+ null)
        final = (H * o + o) + (2 * H * H + 2 * H)
        return depth * block + embed + final

    assert counts == {n: dit_mf_count(**mf.MODELS[n]) for n in nets}
    # MeanFlow paper (Table 2) sizes in millions: B/2 131M, M/2 308M, L/2 459M, XL/2 676M.
    assert {n: round(c / 1e6) for n, c in counts.items() if n != "B/4"} == {"B/2": 131, "M/2": 308, "L/2": 459, "XL/2": 676}
    assert [mf.MODELS[n]["num_heads"] for n in ("B/4", "M/2", "XL/2")] == [12, 16, 16]
    sd = nets["XL/2"].state_dict()
    assert len(sd) == 296
    expected_head = [("pos_embed", (1, 256, 1152)), ("x_embedder.proj.weight", (1152, 4, 2, 2)), ("x_embedder.proj.bias", (1152,)),
                     ("t_embedder.mlp.0.weight", (1152, 256)), ("t_embedder.mlp.0.bias", (1152,)),
                     ("t_embedder.mlp.2.weight", (1152, 1152)), ("t_embedder.mlp.2.bias", (1152,)),
                     ("h_embedder.mlp.0.weight", (1152, 256)), ("h_embedder.mlp.0.bias", (1152,)),
                     ("h_embedder.mlp.2.weight", (1152, 1152)), ("h_embedder.mlp.2.bias", (1152,)),
                     ("y_embedder.embedding_table.weight", (1001, 1152)),
                     ("blocks.0.attn.qkv.weight", (3456, 1152)), ("blocks.0.attn.qkv.bias", (3456,)),
                     ("blocks.0.attn.proj.weight", (1152, 1152)), ("blocks.0.attn.proj.bias", (1152,)),
                     ("blocks.0.mlp.fc1.weight", (4608, 1152)), ("blocks.0.mlp.fc1.bias", (4608,)),
                     ("blocks.0.mlp.fc2.weight", (1152, 4608)), ("blocks.0.mlp.fc2.bias", (1152,)),
                     ("blocks.0.adaLN_modulation.1.weight", (6912, 1152)), ("blocks.0.adaLN_modulation.1.bias", (6912,))]
    assert [(k, tuple(v.shape)) for k, v in list(sd.items())[:22]] == expected_head
    assert [(k, tuple(v.shape)) for k, v in list(sd.items())[-4:]] == [
        ("final_layer.linear.weight", (16, 1152)), ("final_layer.linear.bias", (16,)),
        ("final_layer.adaLN_modulation.1.weight", (2304, 1152)), ("final_layer.adaLN_modulation.1.bias", (2304,))]
    assert nets["B/4"].state_dict()["pos_embed"].shape == (1, 64, 768)
    # zero-init (adaLN-Zero): a fresh model outputs exactly 0; pos_embed is the fixed sin-cos table
    net = mf.DiTMF(input_size=8, num_classes=3, depth=2, hidden_size=32, num_heads=4, patch_size=2)
    for name, p in net.named_parameters():
        if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
            assert (p == 0).all(), name
    assert (net(torch.randn(2, 4, 8, 8), torch.rand(2), torch.rand(2), torch.tensor([0, 3])) == 0).all()
    pe = net.pos_embed[0]
    assert torch.allclose(pe[1, :8], torch.sin(torch.ones(8) / 10000 ** (torch.arange(8) / 8.0)), atol=1e-6)  # w = 1


def test_encode_folder_to_shards_then_train_on_them(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    class FakeVAE(torch.nn.Module):
        """Stands in for sd-vae-ft-mse (83M parameters, too slow for CI): mean = 8x8 average pool."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def encode(self, x, batch=None):
            self.seen = x
            m = torch.nn.functional.avg_pool2d(x, 8)
            return torch.cat([m, m[:, :1]], dim=1), torch.full_like(torch.cat([m, m[:, :1]], dim=1), 0.01)

    vae = FakeVAE()
    monkeypatch.setattr(mf, "load_vae", lambda path, device="cpu": vae)
    monkeypatch.setattr(mf, "SHARD_SIZE", 4)
    rng = np.random.RandomState(0)
    for c, name in enumerate(["n01", "n02"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.randint(0, 256, (70 + 10 * k, 90, 3), dtype=np.uint8)).save(tmp_path / "imgs" / name / f"{k}.png")
    run_main("--preset", "tiny", "--stage", "encode", "--data", tmp_path / "imgs", "--vae", "fake", "--outdir", tmp_path / "lat")
    encoded = folder_bytes(tmp_path / "lat")
    with pytest.raises(SystemExit, match="--outdir .*lat: already holds 5 files"):  # never over earlier shards
        run_main("--preset", "tiny", "--stage", "encode", "--data", tmp_path / "imgs", "--vae", "fake", "--outdir", tmp_path / "lat")
    (tmp_path / "lat" / "latents-00001.npy").unlink()  # an interrupted encode: --resume auto redoes only that shard
    run_main("--preset", "tiny", "--stage", "encode", "--data", tmp_path / "imgs", "--vae", "fake", "--outdir", tmp_path / "lat",
             "--resume", "auto")
    assert folder_bytes(tmp_path / "lat") == encoded  # the same shard again (the posterior moments are deterministic)
    (tmp_path / "lat" / "ckpt-latest.pt").write_bytes(b"")  # ... but only into a folder of shards
    with pytest.raises(SystemExit, match="--outdir .*holds ckpt-latest.pt, not latent shards"):
        run_main("--preset", "tiny", "--stage", "encode", "--data", tmp_path / "imgs", "--vae", "fake", "--outdir", tmp_path / "lat",
                 "--resume", "auto")
    (tmp_path / "lat" / "ckpt-latest.pt").unlink()
    assert sorted(p.name for p in (tmp_path / "lat").glob("*.npy")) == [
        "labels-00000.npy", "labels-00001.npy", "latents-00000.npy", "latents-00001.npy"]
    lat = np.concatenate([np.load(tmp_path / "lat" / f"latents-0000{i}.npy") for i in (0, 1)])
    labels = np.concatenate([np.load(tmp_path / "lat" / f"labels-0000{i}.npy") for i in (0, 1)])
    assert lat.shape == (6, 8, 8, 8) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert vae.seen.shape[-2:] == (64, 64) and vae.seen.min() >= -1 and vae.seen.max() <= 1  # crop of res*8 px in [-1, 1]
    data = mf.LatentShards(tmp_path / "lat")
    x, y = data.batch(0, 6, 0, torch.Generator().manual_seed(0), "cpu")
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]  # one epoch = a permutation of all images
    # latent = (mean + 0.01 noise) * 0.18215
    idx = [int(np.flatnonzero((np.abs(lat[:, :4] * 0.18215 - xi.numpy()) < 0.01).all(axis=(1, 2, 3)))[0]) for xi in x]
    assert sorted(idx) == list(range(6))
    tr = run_main("--preset", "tiny", "--stage", "post", "--data", tmp_path / "lat", "--iters", 2, "--batch", 4,
                  "--outdir", tmp_path / "run")
    assert tr.it == 2 and all(torch.isfinite(p).all() for p in tr.net.parameters())


def test_bench_meanflow_reports_ratios_to_a_plain_step(capsys):
    with pytest.raises(SystemExit, match="--pairs"):  # CMT-MF rows must equal the plain batch
        bench_meanflow.main(["--models", "tiny", "--batch-gpu", "4"])
    # --traj-buffer 4: the MF-B/4 teacher's bulk solve stays at seconds on a CPU (as gpu_check's CPU mode runs it)
    res = bench_meanflow.main(["--models", "tiny", "--batch-gpu", "8", "--reps", "1", "--traj-buffer", "4"])["tiny"]
    assert all(res[f"{k}_ratio"] > 0 for k in ("jvp", "cfg", "cmt", "cmt_teacher")) and res["peak_gb"] > 0
    assert res["img_per_s_jvp"] == pytest.approx(8 / (res["plain_s"] * res["jvp_ratio"]))
    # Bulk trajectories: 8 rows / 8 pairs = 1 trajectory per micro-step, a buffer of 4 of them solved together.
    assert res["traj_buffer"] == 4 and res["teacher_s_per_traj_1"] > 0 and res["teacher_s_per_traj_bulk"] > 0
    student = res["plain_s"] * res["cmt_ratio"]
    assert res["mid_bulk_s"] == pytest.approx(student + res["teacher_s_per_traj_bulk"])
    assert res["mid_bulk_over_plain"] == pytest.approx(res["mid_bulk_s"] / res["plain_s"])
    assert res["img_per_s_mid_bulk"] == pytest.approx(8 / res["mid_bulk_s"])
    (net, row), = gpu_check.flatten("meanflow", {"tiny": res})
    assert row["mid_bulk_over_plain"] == res["mid_bulk_over_plain"]  # the report's "bulk mid / plain" column
    out = capsys.readouterr().out
    assert "ratios to plain" in out and "in a buffer of 4" in out


def test_flow_matching_teacher_solvers_converge_at_their_order():
    # Euler is first order, Heun second order: doubling the steps divides the error by ~2 and ~4.
    net, mu, s, y, g = exact_setup()
    e = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    end = mu[y] + s[y].view(-1, 1, 1, 1) * e
    for solver, order in (("euler", 1), ("heun", 2)):
        errs = [(mf.teacher_trajectory(net, e, y, m, solver)[0][0] - end).abs().max().item() for m in (16, 32, 64)]
        rates = [errs[k] / errs[k + 1] for k in range(2)]
        assert all(abs(rate - 2 ** order) < 0.35 * 2 ** order for rate in rates), (solver, errs)
    with pytest.raises(ValueError, match="--teacher-solver"):
        mf.teacher_trajectory(net, e, y, 2, "rk4")


def test_meanflow_study_cost_and_end_to_end(tmp_path):
    cfg = dict(teacher_steps=4, pairs=4, teacher_solver="meanflow")
    assert study_meanflow.study_cost("post", 10, cfg) == 10 and study_meanflow.study_cost("mid", 10, cfg) == 8  # (3 + 4/4) / 5
    assert study_meanflow.study_cost("mid", 10, dict(cfg, teacher_solver="heun")) == 10                        # (3 + 8/4) / 5
    study_meanflow.main(["--iters", "20", "--eval-every", "10", "--seeds", "2", "--eval-num", "128", "--outdir", str(tmp_path)])
    res = json.loads((tmp_path / "study.json").read_text())
    assert res["config"]["random_iters"] == 40 and res["config"]["mid_cost"] == 16
    cmt, rnd = res["curves"]["CMT-MF -> MeanFlow"], res["curves"]["random -> MeanFlow"]
    assert [pt[0] for pt in cmt["seed1"]] == [0, 8, 16, 26, 36] and [pt[0] for pt in rnd["seed0"]] == [0, 10, 20, 30, 40]
    assert cmt["seed0"][0][1] == rnd["seed0"][0][1]  # both arms start from the seed's random network
    assert all(math.isfinite(v) for c in (cmt, rnd) for curve in c.values() for pt in curve for v in pt[1].values())
    assert "nan" not in (tmp_path / "study.md").read_text()
    assert PIL.Image.open(tmp_path / "study-convergence.png").size == (1120, 400)
    assert not list(tmp_path.glob("seed0/*/ckpt-00*.pt"))  # snapshots evaluated, then removed
    # A student-sized flow-matching teacher: Heun trajectories (2 NFE a step) and a teacher-initialised arm.
    study_meanflow.main(["--teacher", "flow", "--iters", "20", "--eval-every", "10", "--seeds", "1", "--eval-num", "128",
                         "--outdir", str(tmp_path / "flow")])
    res = json.loads((tmp_path / "flow" / "study.json").read_text())
    assert res["config"]["mid_cost"] == 20 and res["config"]["random_iters"] == 40
    fm = res["curves"]["teacher (flow) -> MeanFlow"]["seed0"]
    assert [pt[0] for pt in fm] == [0, 10, 20, 30, 40] and fm[0][1] != res["curves"]["random -> MeanFlow"]["seed0"][0][1]
    teacher = torch.load(tmp_path / "flow" / "seed0" / "teacher" / "ckpt-latest.pt", weights_only=True)
    assert teacher["config"]["ratio_neq"] == 0.0 and teacher["config"]["model"] == "tiny"



def test_round2_costs_curves_and_paired_differences():
    sr = study_round2
    # A CMT-MF step: the student's forward+backward (3B) plus the teacher's NFE on B/pairs trajectories at its FLOP
    # share, in MeanFlow steps (5B). Heun doubles the NFE.
    cfg = dict(teacher_steps=4, pairs=4, solver="meanflow")
    assert sr.mf_mid_cost(10, cfg, 0.25) == pytest.approx(10 * (3 + 0.25) / 5)
    assert sr.mf_mid_cost(10, dict(cfg, solver="heun"), 1.0) == pytest.approx(10)
    # FLOPs counted by torch: equal models cost the same; the 64-wide teacher's share of a 96-wide student is near
    # (64/96)^2, the linear layers' share (attention scores and the embedders are not quadratic in the width).
    assert sr.flop_ratio("tiny", "tiny") == 1.0
    assert sr.flop_ratio("tiny-teacher", "tiny") == pytest.approx((64 / 96) ** 2, rel=0.1)
    # An arm's curve: the mid run on its own cost axis, then the post run from where the mid compute ends,
    # without repeating the post run's start (the mid run's end).
    a, b, c, d, e = ({"err2": v} for v in range(5))
    results = {"mid": {"curve": [(0, a), (5, b), (10, c)]}, "post": {"curve": [(0, c), (10, d), (20, e)]}}
    assert sr.arm_curve(results, "mid", "post") == [(0, a), (5, b), (10, c), (20, d), (30, e)]
    assert sr.arm_curve(results, "mid", "post", lambda k: k / 2) == [(0, a), (2.5, b), (5, c), (15, d), (25, e)]
    assert sr.arm_curve(results, None, "post") == [(0.0, c), (10.0, d), (20.0, e)]
    # Paired by seed at the end: differences -0.5 and +1.0 -> mean +0.25, sample std 1.0607, CMT wins on one seed.
    end = lambda v: [(0, {"err2": 9.0}), (600, {"err2": v})]  # noqa: E731
    diff, wins = sr.paired({"seed0": end(1.0), "seed1": end(2.0)}, {"seed0": end(1.5), "seed1": end(1.0)}, "err2")
    assert diff == "+0.2500 ± 1.0607" and wins == "1/2"


def test_round2_questions_share_cached_runs_and_count_compute(tmp_path, monkeypatch):
    sr = study_round2
    monkeypatch.setattr(sr, "DEFAULT", dict(sr.DEFAULT, teacher_iters=2, budget=12))
    monkeypatch.setattr(sr, "SEEDS", [0, 1])
    monkeypatch.setattr(sr, "RECIPE_GRID", sr.RECIPE_GRID[:2])
    run = lambda q: sr.main([q, "--outdir", str(tmp_path), "--workers", "0", "--eval-num", "32", "--mf-eval-num", "32"])  # noqa: E731
    run("budget")
    res = json.loads((tmp_path / "budget.json").read_text())["cells"]
    cmt, teacher = res["budget 48"]["CMT -> ECT"]["seed1"], res["budget 48"]["teacher -> ECT"]["seed1"]
    # 4x the budget: a curve point every 48 // 24 = 2; the CMT arm's mid third (16 iterations) costs 16.
    assert [pt[0] for pt in cmt] == list(range(0, 49, 2)) and [pt[0] for pt in teacher] == list(range(0, 49, 2))
    # Both start from the seed's teacher; the 2-step sampler differs (the mid stage's second level, 0.77569,
    # vs post-training's 0.821, as sony/cmt evaluates each), so the 1-step numbers are the ones that agree.
    assert cmt[0][1]["err1"] == teacher[0][1]["err1"] and cmt[0][1]["err2"] != teacher[0][1]["err2"]
    default = tmp_path / "runs" / "post-teacher-teacher-w16-i2-s0-i12-lr0.0002-q4096-ema0.99" / "result.json"
    stamp = default.stat().st_mtime_ns
    cut_off = tmp_path / "runs" / "post-teacher-teacher-w16-i2-s1-i12-lr0.0002-q4096-ema0.99"
    (cut_off / "result.json").unlink()  # a run cut off before it finished is run again
    run("recipe")
    assert default.stat().st_mtime_ns == stamp and (cut_off / "result.json").is_file()
    report = (tmp_path / "recipe.md").read_text()
    assert "Chosen for CMT -> ECT: lr 0.0001" in report and "tuned per arm" in report and "nan" not in report
    assert not list(tmp_path.glob("runs/[mp]*/ckpt-0*.pt"))  # the mid and post snapshots: evaluated, then removed
    # MeanFlow: the teacher's NFE charged at its measured FLOP share; the other arm gets the same compute.
    for c in sr.MF_CELLS.values():
        monkeypatch.setitem(c, "teacher_iters", 2), monkeypatch.setitem(c, "mid", 4)
        monkeypatch.setitem(c, "post", 4), monkeypatch.setitem(c, "every", 2)
    run("meanflow")
    out = json.loads((tmp_path / "meanflow.json").read_text())
    cell = "(a) 64-wide MeanFlow teacher, 128-wide student"
    cost = out["costs"][cell]
    assert 0.2 < cost["flop_ratio"] < 0.35  # 64- vs 128-wide: near (1/2)^2
    assert cost["mid_cost"] == pytest.approx(4 * (3 + cost["flop_ratio"]) / 5) and cost["other_iters"] == 4 + 2
    cmt = out["cells"][cell]["CMT-MF -> MeanFlow"]["seed0"]
    assert [pt[0] for pt in cmt] == pytest.approx([0, cost["mid_cost"] / 2, cost["mid_cost"], cost["mid_cost"] + 2,
                                                   cost["mid_cost"] + 4])
    assert [pt[0] for pt in out["cells"][cell]["random -> MeanFlow"]["seed0"]] == [0, 2, 4, 6]
    flow = out["cells"]["(b) flow-matching teacher, 2x round 1's budget"]
    assert flow["teacher (flow) -> MeanFlow"]["seed0"][-1][0] == 8  # Heun at the student's size: a mid step costs 1
    assert PIL.Image.open(tmp_path / "meanflow.png").size == (2 * 560, 400)

# ==================================================================================================
# experiments/: studies, benchmarks and their plotting helper import the scripts, never the reverse
# ==================================================================================================

def test_bench_parity_times_two_networks_with_the_same_weights(tmp_path, capsys):
    # A stand-in "official checkout" whose training/networks.py is our SongUNet behind EDM's constructor and
    # forward signature: the plumbing (import by path, weights copied by name, outputs compared, alternating
    # timings) is what is tested; the real comparison needs an NVlabs/edm checkout (--edm-src).
    (tmp_path / "edm" / "training").mkdir(parents=True)
    (tmp_path / "edm" / "training" / "networks.py").write_text(f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import cmt_cifar10 as cc
class SongUNet(cc.SongUNet):
    def __init__(self, img_resolution, in_channels, out_channels, model_channels, channel_mult, num_blocks,
                 attn_resolutions, dropout):
        super().__init__(img_resolution, in_channels, model_channels=model_channels, channel_mult=channel_mult,
                         num_blocks=num_blocks, attn_resolutions=attn_resolutions, dropout=dropout)
    def forward(self, x, noise_labels, class_labels):
        return super().forward(x, noise_labels, class_labels)
""")
    res = bench_parity.main(["--edm-src", str(tmp_path / "edm"), "--batch", "1", "--reps", "1"])
    r = res["DDPM++"]
    assert r["max_abs_diff"] == 0  # same class, same weights, same inputs
    for k in ("fwd", "fwdbwd"):
        assert r[f"ours_{k}_s"] > 0 and r[f"{k}_ratio"] == pytest.approx(r[f"ours_{k}_s"] / r[f"theirs_{k}_s"])
    assert "[parity] DDPM++ batch 1: forward" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no training/networks_edm2.py here"):
        bench_parity.main(["--edm2-src", str(tmp_path / "edm")])


def test_bench_imagenet_times_plain_mid_and_post_steps(capsys):
    res = bench_imagenet.main(["--preset", "tiny", "--sizes", "tiny", "--batch-gpu", "16"])["tiny"]
    assert all(res[f"{k}_s"] > 0 and res[f"img_per_s_{k}"] == pytest.approx(16 / res[f"{k}_s"]) for k in ("plain", "mid", "post"))
    assert res["mid_over_plain"] == pytest.approx(res["mid_s"] / res["plain_s"]) and res["peak_gb"] > 0
    assert "[bench] tiny   mid:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--batch-gpu 12"):  # the mid step needs whole trajectories
        bench_imagenet.main(["--preset", "tiny", "--sizes", "tiny", "--batch-gpu", "12"])
    # The post step's guide is the preset's own: XXL guided by M (w 2.05), S by XS (2.10), XS and tiny by nothing.
    img512, img64 = (inet.resolve_config(inet.parse_args(["--stage", "sample", "--preset", p])) for p in ("img512-s", "img64-s"))
    assert [bench_imagenet.official_guide(img512, s) for s in ("xxl", "s", "xs", "tiny")] == [(256, 2.05), (128, 2.10), None, None]
    assert bench_imagenet.official_guide(img64, "s") == (128, 1.70) and bench_imagenet.official_guide(img64, "xxl") is None


def _documented_commands():
    """Every `python|torchrun ... NAME.py ARGS` in README.md, experiments/README.md and the scripts' docstrings, as
    (where, NAME, ARGS): fenced bash blocks (continuation lines joined, comments cut) and inline code spans."""
    texts = {doc: (ROOT / doc).read_text() for doc in ("README.md", "experiments/README.md")}
    for path in [*ROOT.glob("*.py"), *ROOT.glob("experiments/*.py"), *ROOT.glob("tools/*.py")]:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        texts[str(path.relative_to(ROOT))] = "```\n" + doc + "\n```"
    found = []
    for where, text in texts.items():
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
        spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        lines = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()] + [s.replace("\n", " ") for s in spans]
        for line in lines:
            m = re.search(r"(?:^|\s)(?:python3?|torchrun)(?:\s+-\S+)*\s+(\S+)\.py\b(.*)", line.split(" #")[0])
            if m and Path(m.group(1)).name != "test_cmt":
                found.append((where, Path(m.group(1)).name, m.group(2)))
    return found


def test_every_documented_command_parses(monkeypatch):
    """Each command the READMEs and the scripts' docstrings show is accepted by that script's own argument parser
    (flag names, choices, types), without running it: a flag renamed or removed breaks this test, not a user's
    first command. The parse stops at the first successful parse_args (benchmarks and studies pass the flags
    they do not know on to a training script's parser, which is then the one that must accept them)."""
    class Parsed(Exception):
        pass
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise Parsed
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    modules = {m.__name__: m for m in (cc, inet, mf, fid, gpu_check, bench_cifar10, bench_imagenet, bench_meanflow,
                                       bench_parity, study_ect, study_meanflow, study_round2, train_latent_vgg)}
    commands = _documented_commands()
    assert len(commands) > 40 and {name for _, name, _ in commands} >= {"cmt_cifar10", "cmt_imagenet", "meanflow_post",
                                                                         "fid", "gpu_check", "bench_imagenet"}
    for where, name, args in commands:
        with pytest.raises(Parsed):
            try:
                modules[name].main(shlex.split(args))
            except SystemExit as e:
                pytest.fail(f"{where}: `{name}.py {args.strip()}` does not parse (exit {e.code})")


def test_no_script_imports_experiments_and_plot_draws_one_panel_per_entry(tmp_path):
    for script in ("cmt_cifar10.py", "cmt_imagenet.py", "meanflow_post.py", "fid.py"):
        text = (ROOT / script).read_text()
        assert "experiments" not in text.replace("experiments/", ""), script  # only prose pointers to the folder
        assert not any(f"import {m}" in text for m in ("plot", "study_ect", "study_meanflow", "study_round2", "bench_"))
    panels = [(f"panel {i}", {"a": [[0, 1.0, 2.0], [10, 0.5, 0.7]], "b": [[0, 3.0, 3.5], [10, 0.1, 0.2]]}) for i in range(3)]
    plot.draw_curves(panels, tmp_path / "c.png", "x", marker_x=5)
    assert PIL.Image.open(tmp_path / "c.png").size == (3 * 560, 400)


# ==================================================================================================
# CUDA tests (test_cuda_*): run by tools/gpu_check.py on a GPU; skipped ("needs CUDA") elsewhere
# ==================================================================================================
# GPU side: CUDA (CMT_TEST_CUDA=cpu rehearses every test on the CPU, CPU against CPU); reference side: the CPU.
CPU = torch.device("cpu")
ON_GPU = CUDA.type == "cuda"


@contextlib.contextmanager
def _tf32(matmul, cudnn=None):
    """Set the two TF32 switches (cuBLAS matmuls, cuDNN convs; cudnn defaults to matmul) through the API the
    scripts use (the legacy one) and restore them afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, matmul if cudnn is None else cudnn
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def _backend_flags():
    """The scripts set the process-wide TF32 and cuDNN switches; in-process runs must not leak them into other tests."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
           torch.get_num_threads())
    torch.set_num_threads(1)  # tiny networks: one thread is fastest on the CPU (rehearsal); no effect on GPU kernels
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = old[:3]
    torch.set_num_threads(old[3])


def _rel(a, b):
    """||a - b|| / ||b|| in float64 (a may live on another device)."""
    a, b = a.detach().to(CPU, torch.float64), b.detach().to(CPU, torch.float64)
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ============================================================================= CUDA tests: cmt_cifar10.py, fid.py
# In-process and subprocess runs of the script pick their device themselves (CUDA when available), as a user's
# run does. The network: the real DDPM++ SongUNet at 32x32 (CIFAR-10's resolution), narrowed to 16 channels
# (32 per block), two levels and one block per level: real down/up blocks, 1x1 skips, GroupNorm, dropout and
# single-head attention at 16x16 (the paper's attn_resolutions), 0.26M parameters.
C10_NARROW = dict(model_channels=16, channel_mult=[2, 2], num_blocks=1, attn_resolutions=[16])


def _c10_cfg(stage, **over):
    """A resolved cifar10-preset config for one stage with the narrowed network (no CLI, nothing written)."""
    args = cc.parse_args(["--stage", stage, "--outdir", "unused", *(["--init", "random"] if stage == "post" else [])])
    for k, v in {**C10_NARROW, "metric": "l2", **over}.items():
        setattr(args, k, v)
    return cc.resolve_config(args)


def _c10_trained_like(net, seed):
    """Give every weight an O(1)-effect value (fresh DDPM++ nets start with conv1/proj/aux_conv at 1e-5, which
    would leave almost the whole gradient on the last layer): W ~ N(0, 1/fan_in), 1-d tensors perturbed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


class _C10CPUNoise:
    """Stands in for `torch` inside cmt_cifar10 (monkeypatched as cc.torch): every name is torch's, except
    that randn / randn_like draw from one seeded CPU generator and then move to the requested device. A CPU
    run and a CUDA run of the script's own loss functions then see bit-identical noise (t, eps, x_T)."""

    def __init__(self, seed):
        self._gen = torch.Generator().manual_seed(seed)

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn(self, *size, device=None, dtype=None, generator=None, **kwargs):
        size = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        cpu = torch.randn(size, generator=generator or self._gen, dtype=dtype or torch.float32)
        return cpu.to(device or "cpu")

    def randn_like(self, t, **kwargs):
        return torch.randn(t.shape, generator=self._gen).to(t.device, t.dtype)


def _c10_pngs(folder, n=32, size=32, seed=0):
    """n RGB PNGs of size x size (a stand-in CIFAR-10 for --data: an EDM-style image folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


def _c10_teacher_ckpt(path, seed=1):
    """A teacher checkpoint of this script (the narrowed network, trained-like weights) for --teacher."""
    cfg = _c10_cfg("pretrain")
    torch.manual_seed(seed)
    teacher = _c10_trained_like(cc.build_net(cfg, "edm"), seed)
    torch.save({"script": cc.SCRIPT, "stage": "pretrain", "config": cfg, "iter": 1, "ema": teacher.state_dict()}, path)
    return path


def _c10_stats(outdir):
    return [json.loads(line) for line in (Path(outdir) / "stats.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- 1. fp32 CUDA step = CPU step

def _c10_step(stage, device, net0, teacher0, y, noise=_C10CPUNoise, **over):
    """One training step of `stage` on `device` with the script's own functions and CPU-drawn noise:
    (per-row losses, gradients, parameters after cc.apply_update with the script's optimizer)."""
    cfg = _c10_cfg(stage, **{"dropout": 0.0, **over})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cc, "torch", noise(seed=7))
        net = copy.deepcopy(net0).to(device).train()
        ema = copy.deepcopy(net).requires_grad_(False)
        y = y.to(device)
        if stage == "pretrain":
            loss = cc.edm_loss(net, y, None)
        elif stage == "post":
            loss = cc.ect_loss(net, y, None, q=cfg["ect_q"], stage=0)
        else:
            states, target = cc.cmt_trajectories(copy.deepcopy(teacher0).to(device), y[:1], None)
            assert states.device.type == device.type and states.shape == (16, 1, 3, 32, 32)
            loss = cc.cmt_loss(net, states, target, None, metric="l2")
        loss.mean().backward()
        grads = [p.grad.detach().clone() for p in net.parameters()]
        optimizer = cc.make_optimizer(cfg, net, device)
        cc.apply_update(net, ema, optimizer, cfg["lr"], cfg["ema"])
    return loss.detach(), grads, [p.detach().clone() for p in net.parameters()], cfg


# Tolerances (loss row, whole gradient, worst tensor, whole update), relative. Both sides are IEEE fp32 with
# different summation orders (cuDNN/cuBLAS vs oneDNN), each with its own round-off. Measured on the CPU against
# a float64 run of the same step (tmp_cifar/measure*.py): pretrain 1.4e-7, 1.2e-6, 1.8e-6; ECT at q = 4
# 2.2e-7, 1.4e-6, 3.2e-6; CMT 4.3e-6, 4.3e-6, 1.1e-5; ECT at the paper's q = 4096 5.9e-4, 1.4e-3, 5.4e-3.
# The ECT loss divides f(y + t eps) - f(y + r eps), a difference of two nearly equal outputs, by t - r ~ t/q:
# their round-off is amplified ~q-fold (measured: linear in q), a property of the loss, not of the kernels;
# q = 4 keeps the tight check and q = 4096 is checked at its own conditioning. Every bound leaves >= 20x for
# the CUDA side's own round-off and cuDNN's less accurate fp32 algorithms (Winograd, FFT); TF32 (unit
# round-off 4.9e-4, ~8000x fp32's) would exceed each by far. Adam's first update is lr g / (|g| + eps)
# ~ lr sign(g): elements whose gradient is within round-off of 0 may flip, so its update is checked per
# element (|diff| <= 2 lr) and as a whole to 0.1 (measured 1.7e-2); RAdam's first five steps are lr g, linear.
C10_STEP_TOL = {"pretrain": (1e-5, 1e-4, 1e-3, 0.1), "post-q4": (1e-5, 1e-4, 1e-3, 1e-4),
                "post-q4096": (1e-2, 2e-2, 1e-1, 2e-2), "mid": (1e-4, 1e-4, 1e-3, 1e-4)}


@needs_cuda
@pytest.mark.parametrize("case", list(C10_STEP_TOL))
def test_cuda_cifar10_fp32_step_equals_the_cpu_step(case, _backend_flags):
    """fp32 on CUDA (TF32 off) computes the EDM / ECT / CMT loss, its gradient and one step of the script's
    optimizer on the narrowed DDPM++ as the CPU does, from the same weights, batch and noise (dropout 0:
    CUDA's and the CPU's dropout generators differ by design; the shared-mask test covers dropout on CUDA)."""
    stage, q = case.split("-q")[0], float(case.split("-q")[1]) if "-q" in case else None
    over = dict(dropout=0.0, **({"ect_q": q} if q else {}))
    kind = "edm" if stage == "pretrain" else "ecm"
    net0 = _c10_trained_like(cc.build_net(_c10_cfg(stage, **over), kind), seed=0)
    teacher0 = _c10_trained_like(cc.build_net(_c10_cfg("pretrain", dropout=0.0), "edm"), seed=1).eval().requires_grad_(False)
    y = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with _tf32(False, False):
        l_ref, g_ref, p_ref, cfg = _c10_step(stage, CPU, net0, teacher0, y, **over)
        l_got, g_got, p_got, _ = _c10_step(stage, CUDA, net0, teacher0, y, **over)
    assert stage != "post" or cfg["ect_q"] == q  # the q under test reached the loss
    row_tol, grad_tol, tensor_tol, update_tol = C10_STEP_TOL[case]
    assert l_got.device.type == CUDA.type and torch.isfinite(l_got).all() and torch.isfinite(l_ref).all()
    row_err = ((l_got.cpu().double() - l_ref.double()).abs() / l_ref.double().abs()).max().item()
    assert row_err <= row_tol, (case, row_err)
    flat_got, flat_ref = torch.cat([g.flatten() for g in g_got]), torch.cat([g.flatten() for g in g_ref])
    assert flat_ref.abs().sum() > 0 and _rel(flat_got, flat_ref) <= grad_tol, (case, _rel(flat_got, flat_ref))
    total = flat_ref.double().norm().item()
    for i, (a, b) in enumerate(zip(g_got, g_ref)):
        # Per tensor, with a floor of 1e-3 of the whole gradient's norm for tensors whose gradient is ~0.
        err = (a.cpu().double() - b.double()).norm().item()
        assert a.device.type == CUDA.type and err <= tensor_tol * (b.double().norm().item() + 1e-3 * total), (case, i, err)
    p0 = list(net0.parameters())
    upd_got = torch.cat([(a.cpu() - b).flatten() for a, b in zip(p_got, p0)])
    upd_ref = torch.cat([(a - b).flatten() for a, b in zip(p_ref, p0)])
    assert upd_ref.abs().sum() > 0 and _rel(upd_got, upd_ref) <= update_tol, (case, _rel(upd_got, upd_ref))
    if cfg["optimizer"] == "adam":
        assert (upd_got - upd_ref).abs().max().item() <= 2 * cfg["lr"] * (1 + 1e-5)


# ----------------------------------------------------------------------------- 4. ECT's shared dropout mask on CUDA

def _c10_record_masks(net):
    """Forward pre-hooks on every UNetBlock.conv1 (the conv right after F.dropout): the keep-mask each call used."""
    masks = []
    hooks = [m.conv1.register_forward_pre_hook(lambda mod, inp: masks.append(inp[0].detach() != 0))
             for m in net.modules() if isinstance(m, cc.UNetBlock)]
    return masks, hooks


@needs_cuda
def test_cuda_cifar10_ect_passes_share_the_dropout_mask():
    """On CUDA, ECT's two passes f(y + t eps, t) and f(y + r eps, r) drop the same units (the script saves
    torch.cuda.get_rng_state() before the first pass and restores it before the second), with dropout 0.2 in
    the narrowed DDPM++; a pass without the restore draws another mask, and a CUDA forward repeated under the
    same saved generator state is bit-identical."""
    cfg = _c10_cfg("post", dropout=0.2)
    torch.manual_seed(0)
    net = _c10_trained_like(cc.build_net(cfg, "ecm"), seed=0).to(CUDA).train()
    y = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(CUDA)
    masks, hooks = _c10_record_masks(net)
    blocks = len(hooks)
    try:
        with (torch.cuda.device(CUDA) if ON_GPU else contextlib.nullcontext()):  # the script: set_device
            loss = cc.ect_loss(net, y, None, q=cfg["ect_q"], stage=0)
            assert len(masks) == 2 * blocks and loss.device.type == CUDA.type and torch.isfinite(loss).all()
            first, second = masks[:blocks], masks[blocks:]
            for a, b in zip(first, second):
                assert a.device.type == CUDA.type and torch.equal(a, b)
            dropped = 1 - torch.cat([m.flatten().float() for m in first]).mean().item()
            assert 0.17 < dropped < 0.23, dropped  # dropout 0.2 is live (>= 10^5 units: +-0.03 is > 20 sigma)
            masks.clear()
            x, s = y + 0.5 * torch.randn_like(y), torch.full((4,), 0.5, device=CUDA)
            state = torch.cuda.get_rng_state() if ON_GPU else torch.get_rng_state()
            out1 = net(x, s, train=True)
            (torch.cuda.set_rng_state if ON_GPU else torch.set_rng_state)(state)
            out2 = net(x, s, train=True)
            out3 = net(x, s, train=True)  # control: the generator moved on
            assert torch.equal(out1, out2) and not torch.equal(out2, out3)
            assert all(torch.equal(a, b) for a, b in zip(masks[:blocks], masks[blocks:2 * blocks]))
            assert not all(torch.equal(a, b) for a, b in zip(masks[blocks:2 * blocks], masks[2 * blocks:]))
    finally:
        for h in hooks:
            h.remove()


# ----------------------------------------------------------------------------- 2. fast paths: 20 steps, finite, close to fp32

C10_FAST = {"fp32": [], "bf16": ["--bf16"], "tf32": ["--tf32"], "channels_last": ["--channels-last"],
            "compile": ["--compile"], "cudnn_benchmark": ["--cudnn-benchmark"]}
# Per-step |loss - loss_fp32| / loss_fp32 over the 20 steps: (largest, mean). Measured in the rehearsal (CPU,
# same test, q = 64, trained-like weights): bf16 9.8e-2 / 1.4e-2 (the inputs' rounding 2^-8, amplified by
# ECT's 1/(t - r) = q/t: at most about q 2^-8 = 0.25); channels_last 5.4e-7 / 1.8e-7 (another fp32 kernel:
# round-off only, no divergence in 20 Adam steps). TF32's unit round-off is 8x below bf16's: its bound is bf16's / 5. Fused
# kernels of Inductor and the convolution algorithms cuDNN's benchmark picks change fp32 summation orders only, as
# channels_last does: 1e-3 leaves > 100x. The fp32 baseline is real fp32 (TF32 off), so each bound holds whatever
# the kernels pick.
C10_FAST_TOL = {"bf16": (0.25, 0.05), "tf32": (0.05, 0.01), "channels_last": (1e-3, 1e-4), "compile": (1e-3, 1e-4),
                "cudnn_benchmark": (1e-3, 1e-4)}


def _c10_run_main(monkeypatch, argv):
    """cc.main(argv) in this process with the narrowed network as the cifar10 preset's; TF32 is switched off
    before (the fp32 baseline must be fp32: PyTorch's default lets cuDNN use TF32) and after (--tf32 sets it)."""
    monkeypatch.setitem(cc.PRESETS, "cifar10", {**cc.PRESETS["cifar10"], **C10_NARROW})
    with _tf32(False, False):
        cc.main([str(a) for a in argv])


@needs_cuda
def test_cuda_cifar10_fast_paths_stay_finite_and_close_to_fp32(tmp_path, monkeypatch, _backend_flags):
    """--bf16, --tf32, --channels-last, --compile and --cudnn-benchmark each train 20 ECT steps of the narrowed DDPM++
    through the script's own main(), every step finite and its loss close to the fp32 run's on the same data
    and noise; every CUDA run steps with fused Adam. Dropout is 0 here: the compiled graph draws its dropout
    masks with Inductor's own generator, so only without dropout do all five runs see identical randomness."""
    data = _c10_pngs(tmp_path / "data")
    init = _c10_teacher_ckpt(tmp_path / "init.pt")  # trained-like weights: a fresh net's output is ~0
    base = ["--stage", "post", "--init", init, "--data", data, "--iters", 20, "--batch", 8, "--log-every", 1,
            "--ckpt-every", 0, "--snap-every", 0, "--sample-every", 0, "--optimizer", "adam", "--dropout", 0,
            "--ect-q", 64]
    # ECT with Adam, so that every CUDA run steps with the fused Adam of make_optimizer; q = 64, since the
    # script refuses bf16 and TF32 at the paper's q = 4096 (its two noise levels lie within their rounding).
    if not ON_GPU:  # rehearsal: Inductor's C++ codegen costs ~100 s on 2 cores; aot_eager traces the same graphs
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    losses = {}
    for mode, flags in C10_FAST.items():
        _c10_run_main(monkeypatch, base + ["--outdir", tmp_path / mode] + flags)
        rows = _c10_stats(tmp_path / mode)
        assert [r["iter"] for r in rows] == list(range(1, 21)), mode
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["nonfinite"] == 0 for r in rows), mode
        losses[mode] = np.array([r["loss"] for r in rows])
        ckpt = cc.read_checkpoint(tmp_path / mode / "ckpt-latest.pt", "--resume")
        assert ckpt["iter"] == 20 and all(torch.isfinite(v).all() for v in ckpt["model"].values()), mode
        assert bool(ckpt["optimizer"]["param_groups"][0]["fused"]) == ON_GPU, mode  # fused Adam exactly on CUDA
        assert ckpt["config"]["bf16"] == (mode == "bf16") and ckpt["config"]["compile"] == (mode == "compile")
        assert torch.backends.cudnn.benchmark == (mode == "cudnn_benchmark"), mode  # the switch is set both ways
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"]), mode
    for mode, (tol_max, tol_mean) in C10_FAST_TOL.items():
        err = np.abs(losses[mode] - losses["fp32"]) / np.abs(losses["fp32"])
        assert err.max() <= tol_max and err.mean() <= tol_mean, (mode, err.max(), err.mean(), list(err))
    assert not np.array_equal(losses["bf16"], losses["fp32"])  # --bf16 did take effect (autocast ran)


@needs_cuda
def test_cuda_cifar10_fused_adam_update_matches_plain_adam(_backend_flags):
    """The script's optimizer for --optimizer adam is fused Adam on CUDA; driven through cc.apply_update
    (nan_to_num of the gradients, step, EMA) with the very same gradients, it moves the weights as
    torch.optim.Adam's single-tensor reference does on the CPU, for 20 steps, a non-finite gradient included."""
    cfg = _c10_cfg("pretrain")
    assert cfg["optimizer"] == "adam"
    net_cpu = _c10_trained_like(cc.build_net(cfg, "edm"), seed=0)
    net_gpu = copy.deepcopy(net_cpu).to(CUDA)
    ema_cpu, ema_gpu = copy.deepcopy(net_cpu).requires_grad_(False), copy.deepcopy(net_gpu).requires_grad_(False)
    opt_gpu = cc.make_optimizer(cfg, net_gpu, CUDA)
    assert type(opt_gpu) is torch.optim.Adam and bool(opt_gpu.param_groups[0]["fused"]) == ON_GPU
    opt_cpu = torch.optim.Adam(net_cpu.parameters(), lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, foreach=False)
    g = torch.Generator().manual_seed(5)
    p0 = [p.detach().clone() for p in net_cpu.parameters()]
    for step in range(20):
        for a, b in zip(net_cpu.parameters(), net_gpu.parameters()):
            # Gradients over 8 decades, as a real step has them (Adam's g / sqrt(v) normalises each element).
            grad = torch.randn(a.shape, generator=g) * 10 ** torch.randint(-6, 2, a.shape, generator=g).float()
            if step == 3 and a.dim() > 1:
                grad.view(-1)[0] = float("inf")  # cc.apply_update: nan_to_num to 1e5 on the device
            a.grad, b.grad = grad.clone(), grad.to(CUDA)
        lr = cfg["lr"] * (1 - step / 20)
        n_cpu = cc.apply_update(net_cpu, ema_cpu, opt_cpu, lr, cfg["ema"])
        n_gpu = cc.apply_update(net_gpu, ema_gpu, opt_gpu, lr, cfg["ema"])
        assert n_gpu.device.type == CUDA.type and abs(n_gpu.item() - n_cpu.item()) <= 1e-6 * n_cpu.item()
    # The fused kernel orders the same fp32 operations differently: per step the update differs by a few ulps
    # of lr (~1e-10) and each weight (|w| <~ 3) rounds to its own ulp (<= 2.4e-7): 20 steps stay below 5e-6,
    # while the weights moved by ~lr per element and step (~2e-2 in all): the bound is 4000x below the motion.
    for a, b, w in zip(net_cpu.parameters(), net_gpu.parameters(), p0):
        assert torch.isfinite(b).all() and (b.detach().cpu() - a.detach()).abs().max().item() <= 5e-6
        assert (a.detach() - w).abs().mean().item() > 100 * 5e-6
    for a, b in zip(ema_cpu.parameters(), ema_gpu.parameters()):
        assert (b.cpu() - a).abs().max().item() <= 5e-6


# ----------------------------------------------------------------------------- 3. resume on CUDA is exact

# One process of the script with deterministic kernels: cuDNN's deterministic algorithms, cuBLAS with a fixed
# workspace (CUBLAS_WORKSPACE_CONFIG, set in the environment before the process starts), and the deterministic
# backward of memory-efficient attention (SDPA's fp32 kernel on CUDA splits keys across blocks with atomics
# unless use_deterministic_algorithms(True) is on, warn_only=False). argv: root, preset override (json),
# stop-after (0: run to the end; k: os._exit(17) in the k-th optimizer step), then the script's own flags.
C10_DETERMINISTIC_RUN = r"""
import json, os, sys
import torch
sys.path.insert(0, sys.argv[1])
import cmt_cifar10 as cc
torch.use_deterministic_algorithms(True)
torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
cc.PRESETS["cifar10"].update(json.loads(sys.argv[2]))
stop, real, calls = int(sys.argv[3]), cc.apply_update, []
def apply_update(*args):
    calls.append(1)
    if len(calls) == stop:
        sys.stdout.flush()
        os._exit(17)  # killed mid-run, after the checkpoint of iteration 2
    return real(*args)
cc.apply_update = apply_update
cc.main(sys.argv[4:])
"""


@needs_cuda
@pytest.mark.parametrize("stage", ["mid", "post"])
def test_cuda_cifar10_resume_on_cuda_is_bit_exact(tmp_path, stage):
    """On CUDA, a run killed after its iteration-2 checkpoint and continued with --resume auto ends at
    iteration 4 with the bit-identical weights, EMA, optimizer state (fused Adam's on-device step counters
    included), RNG states (CUDA's Philox included) and data positions of an uninterrupted run: dropout 0.2
    masks, ECT noise (post) and the teacher's trajectories (mid, reused over 2 iterations) all continue."""
    script = tmp_path / "run.py"
    script.write_text(C10_DETERMINISTIC_RUN)
    data = _c10_pngs(tmp_path / "data")
    flags = ["--stage", stage, "--data", data, "--iters", 4, "--ckpt-every", 2, "--log-every", 1, "--snap-every", 0,
             "--sample-every", 0, "--dropout", 0.2, "--metric", "l2"]
    if stage == "mid":
        flags += ["--teacher", _c10_teacher_ckpt(tmp_path / "teacher.pt"), "--batch", 16, "--traj-reuse", 2]
    else:
        flags += ["--init", "random", "--batch", 8, "--optimizer", "adam"]
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    narrow = json.dumps(C10_NARROW)

    def run(outdir, stop, *extra):
        return run_script(script, ROOT, narrow, stop, *flags, "--outdir", outdir, *extra, cwd=tmp_path, env=env)
    rc, out, err = run(tmp_path / "a", 0)
    assert rc == 0, out + err
    assert f"device {CUDA.type}" in out  # the script chose the device under test
    rc, out, err = run(tmp_path / "b", 3)
    assert rc == 17, out + err
    assert cc.read_checkpoint(tmp_path / "b" / "ckpt-latest.pt", "--resume")["iter"] == 2
    rc, out, err = run(tmp_path / "b", 0, "--resume", "auto")
    assert rc == 0 and "resumed from ckpt-latest.pt at iteration 2" in out, out + err
    a, b = (torch.load(tmp_path / d / "ckpt-latest.pt", map_location="cpu", weights_only=True) for d in "ab")
    assert a["iter"] == b["iter"] == 4

    def leaves(obj, path=""):
        if isinstance(obj, dict):
            for k in sorted(obj, key=str):
                yield from leaves(obj[k], f"{path}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from leaves(v, f"{path}/{i}")
        else:
            yield path, obj
    la, lb = dict(leaves({k: a[k] for k in ("model", "ema", "optimizer", "rng", "data_state")})), \
        dict(leaves({k: b[k] for k in ("model", "ema", "optimizer", "rng", "data_state")}))
    assert la.keys() == lb.keys() and any("/rng/0/cuda" in k for k in la) == ON_GPU
    for k, v in la.items():
        assert torch.equal(v, lb[k]) if isinstance(v, torch.Tensor) else v == lb[k], k
    assert {float(v["step"]) for v in a["optimizer"]["state"].values()} == {4.0}  # 4 real optimizer steps
    if stage == "post" and ON_GPU:
        assert a["optimizer"]["param_groups"][0]["fused"]


# ----------------------------------------------------------------------------- 5. torchrun, one process

# torchrun's child: the script itself (run as __main__), with init_process_group and destroy_process_group
# wrapped to print the backend the script asked for and the one in use. argv: script, then its flags.
C10_TORCHRUN_CHILD = r"""
import runpy, sys
import torch.distributed as dist
real_init, real_destroy = dist.init_process_group, dist.destroy_process_group
def init_process_group(backend=None, *args, **kwargs):
    print(f"[test] init_process_group({backend!r})", flush=True)
    return real_init(backend, *args, **kwargs)
def destroy_process_group(*args, **kwargs):
    print(f"[test] in use: {dist.get_backend()} world {dist.get_world_size()} rank {dist.get_rank()}", flush=True)
    return real_destroy(*args, **kwargs)
dist.init_process_group, dist.destroy_process_group = init_process_group, destroy_process_group
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@needs_cuda
def test_cuda_cifar10_torchrun_single_process_completes_a_stage(tmp_path):
    """`torchrun --standalone --nproc_per_node=1 cmt_cifar10.py ...` initialises the process group (NCCL on
    CUDA, gloo on the CPU) even for one process, trains an ECT stage on the device and writes its checkpoint."""
    child = tmp_path / "child.py"
    child.write_text(C10_TORCHRUN_CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("FID_WEIGHTS", None)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        str(child), str(ROOT / "cmt_cifar10.py"), "--preset", "tiny", "--stage", "post", "--init",
                        "random", "--iters", "3", "--batch", "16", "--log-every", "1", "--dropout", "0.1",
                        "--outdir", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    backend = "nccl" if torch.cuda.is_available() else "gloo"  # the script's rule (init_distributed)
    assert f"[test] init_process_group({backend!r})" in p.stdout, p.stdout
    assert f"[test] in use: {backend} world 1 rank 0" in p.stdout, p.stdout
    assert f"device {CUDA.type}" in p.stdout and "1 processes" in p.stdout, p.stdout
    ckpt = cc.read_checkpoint(tmp_path / "run" / "ckpt-latest.pt", "--resume")
    assert ckpt["iter"] == 3 and (tmp_path / "run" / "ckpt-0000003.pt").exists() and len(ckpt["rng"]) == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert (tmp_path / "run" / "samples-0000003.npz").exists()
    assert len(_c10_stats(tmp_path / "run")) == 3 and all(math.isfinite(r["loss"]) for r in _c10_stats(tmp_path / "run"))


# ----------------------------------------------------------------------------- 6. fid.inception_stats: CUDA = CPU

def _c10_varied_images(n, seed=0):
    """uint8 [n, 3, 32, 32]: coloured sinusoids of random frequency, phase, contrast and noise level. Their
    random-Inception features spread (|f - mean| / |f| ~ 0.14) 7x more than those of uniform-noise images,
    which all look alike to the network; sigma's relative round-off is the features' divided by that spread."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, 32), np.linspace(0, 1, 32), indexing="ij")
    out = []
    for _ in range(n):
        freq, phase, colour, contrast = rng.uniform(0.5, 6, 2), rng.uniform(0, 6.3, 3), rng.uniform(0, 1, 3), rng.uniform(0, 1)
        wave = np.stack([np.sin(2 * np.pi * (freq[0] * xx + freq[1] * yy) + phase[k]) for k in range(3)])
        noise = rng.uniform(0, 0.5) * rng.standard_normal((3, 32, 32))
        out.append((255 * np.clip(colour[:, None, None] + 0.5 * contrast * wave + noise, 0, 1)).astype(np.uint8))
    return torch.from_numpy(np.stack(out))


@needs_cuda
def test_cuda_fid_inception_stats_equal_the_cpu(weights_file):
    """fid.inception_stats on CUDA gives the CPU's mu and sigma to 1e-5 relative, on 16 CIFAR-sized images with
    the random-weight Inception, even with both TF32 switches on (PyTorch's cuDNN default is TF32 on): the
    function itself must run its convolutions in fp32 (fid._fp32_convolutions)."""
    images = _c10_varied_images(16)
    batches = [images[:10], images[10:]]  # two batches: the float64 sums are accumulated across them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "FID from only 16 images", "not the official weights"
        mu_ref, sigma_ref, n_ref = fid.inception_stats(batches, weights=weights_file, device=CPU)
        with _tf32(True, True):
            mu, sigma, n = fid.inception_stats(batches, weights=weights_file, device=CUDA)
            assert torch.backends.cudnn.allow_tf32  # restored by fid after its fp32 section
    assert n == n_ref == 16 and mu.dtype == sigma.dtype == np.float64 and np.isfinite(sigma).all()
    # 1e-5 relative in norm (Frobenius for sigma). Expected: fp32 round-off through the ~95 convolutions
    # (reductions up to 2048 x 3 x 3 terms). Measured, CPU fp32 against a float64 Inception on these images
    # (tmp_cifar/measure_fid2.py): mu 1.5e-7, sigma 8.9e-7 (element-wise 7e-7 of max |sigma|). The CUDA side
    # adds its own round-off of that size, and cuDNN's Winograd / FFT algorithms a few times more: 1e-5 leaves
    # ~8x on sigma, 60x on mu. (On uniform-noise images sigma's would be 1.3e-5 already on the CPU: see
    # _c10_varied_images.) TF32 (unit round-off 4.9e-4, ~8000x fp32's) would exceed it by orders of magnitude.
    assert np.linalg.norm(mu - mu_ref) <= 1e-5 * np.linalg.norm(mu_ref), np.linalg.norm(mu - mu_ref) / np.linalg.norm(mu_ref)
    assert np.linalg.norm(sigma - sigma_ref) <= 1e-5 * np.linalg.norm(sigma_ref), \
        np.linalg.norm(sigma - sigma_ref) / np.linalg.norm(sigma_ref)
    # Element-wise with a floor: sigma of 16 images has entries near 0 whose relative error means nothing.
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-3, atol=1e-5 * np.abs(sigma_ref).max())
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-3, atol=1e-5 * np.abs(mu_ref).max())


# ----------------------------------------------------------------------------- script bugs on CUDA (cifar_fid_script_changes.md)

def _c10_fp32_probe(device):
    """Normwise relative error of a 3x3 convolution and a matmul on `device` against float64 on the CPU."""
    g = torch.Generator().manual_seed(0)
    x, w, a, b = (torch.randn(s, generator=g) for s in ((8, 64, 16, 16), (64, 64, 3, 3), (256, 256), (256, 256)))
    conv = F.conv2d(x.to(device), w.to(device), padding=1).cpu().double()
    mm = (a.to(device) @ b.to(device)).cpu().double()
    return (_rel(conv, F.conv2d(x.double(), w.double(), padding=1)), _rel(mm, a.double() @ b.double()))


@needs_cuda
def test_cuda_cifar10_fp32_run_without_tf32_flag_is_fp32(tmp_path, monkeypatch, _backend_flags):
    """A run without --tf32 ('default: off') trains in fp32 on CUDA: with the switches at PyTorch's defaults
    (cuBLAS TF32 off, cuDNN TF32 ON), a 3x3 convolution and a matmul made during the training step are
    fp32-accurate. (EDM's and ECT's training loops set torch.backends.cudnn.allow_tf32 = False themselves.)"""
    monkeypatch.setitem(cc.PRESETS, "cifar10", {**cc.PRESETS["cifar10"], **C10_NARROW})
    real, seen = cc.accumulate_gradients, []
    monkeypatch.setattr(cc, "accumulate_gradients", lambda *a, **k: seen.append(_c10_fp32_probe(CUDA)) or real(*a, **k))
    data = _c10_pngs(tmp_path / "data", n=8)
    with _tf32(False, True):  # PyTorch's defaults
        cc.main(["--stage", "post", "--init", "random", "--data", str(data), "--iters", "1", "--batch", "8",
                 "--outdir", str(tmp_path / "run")])
    assert len(seen) == 1
    # fp32: ~1e-7 (3x3 conv, 576-term sums; 256-term matmul); TF32 rounds the operands to 10 mantissa bits
    # (unit round-off 4.9e-4): ~3e-4. 1e-5 separates them by 30x on either side.
    conv_err, mm_err = seen[0]
    assert conv_err <= 1e-5, f"convolutions ran in TF32 during an fp32 run (error {conv_err:.1e})"
    assert mm_err <= 1e-5, f"matmuls ran in TF32 during an fp32 run (error {mm_err:.1e})"


@needs_cuda
@pytest.mark.parametrize("teacher", ["pretrained", "analytic"])
def test_cuda_cifar10_tiny_demo_runs_on_the_device(tmp_path, teacher, _backend_flags, capsys):
    """`python cmt_cifar10.py --preset tiny` (the whole demo: teacher -> mid -> post -> quality table) runs on a
    CUDA machine, where the script trains on CUDA: with its own EDM teacher and with --teacher analytic (the
    toy mixture's exact denoiser then meets CUDA states)."""
    argv = ["--preset", "tiny", "--iters", "2", "--eval-num", "64", "--baselines", "0", "--outdir", str(tmp_path / "demo")]
    cc.main(argv + (["--teacher", "analytic"] if teacher == "analytic" else []))
    out = capsys.readouterr().out
    assert f"device {CUDA.type}" in out and "post (CMT -> ECT)" in out
    table = (tmp_path / "demo" / "quality.txt").read_text()
    assert "nan" not in table.split("\n", 2)[2]


# ============================================================================= CUDA tests: cmt_imagenet.py, meanflow_post.py
# In-process runs of the scripts pick their device themselves (CUDA when available), as a user's run does.


def _assert_grads_close(got, ref, rtol, what):
    """Per tensor: ||g_gpu - g_cpu|| <= rtol (||g_cpu|| + 1e-3 ||g_all||); the floor keeps tensors whose
    gradient is ~0 (round-off only) from demanding an impossible relative accuracy."""
    assert len(got) == len(ref) and len(ref) > 0
    total = torch.cat([g.detach().flatten().double() for g in ref]).norm().item()
    assert total > 0, f"{what}: all gradients are zero (the check would be vacuous)"
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.device.type == CUDA.type and torch.isfinite(a).all(), (what, i)
        err = (a.detach().to(CPU, torch.float64) - b.double()).norm().item()
        assert err <= rtol * (b.double().norm().item() + 1e-3 * total), (what, i, err, b.norm().item(), total)


def _adam_steps_match(net_cpu, grads, make_opt, lr, steps=3):
    """The script's optimiser (fused Adam on CUDA) against CPU Adam, fed the very same gradients: the update
    rule itself, independent of the network's round-off."""
    a, b = copy.deepcopy(net_cpu), copy.deepcopy(net_cpu).to(CUDA)
    oa, ob = make_opt(list(a.parameters()), False), make_opt(list(b.parameters()), ON_GPU)
    assert bool(ob.param_groups[0].get("fused")) == ON_GPU  # fused exactly when on CUDA, as the scripts build it
    for k in range(steps):
        for p, q, g in zip(a.parameters(), b.parameters(), grads):
            p.grad, q.grad = g * (1 + k), (g * (1 + k)).to(CUDA)  # a changing gradient: m and v both move
        oa.step()
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        # Elementwise float32 arithmetic in another order (fused kernel): a few ulp of the update (~lr) plus one
        # ulp of the weight when it is rounded. A wrong rule (bias correction, betas, eps) errs by ~lr per step.
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-6, atol=1e-5 * lr)


def _stats(folder):
    return [json.loads(line) for line in (Path(folder) / "stats.jsonl").read_text().splitlines()]


def _losses(folder, iters):
    """The per-iteration losses of a run logged with --log-every 1 (stable keys: iter, loss)."""
    rows = _stats(folder)
    assert [r["iter"] for r in rows] == list(range(1, iters + 1))
    losses = [r["loss"] for r in rows]
    assert all(v is not None and math.isfinite(v) for v in losses), losses
    return np.array(losses)


def _assert_tracks(fast, ref, rtol_each, rtol_mean, what):
    """A fast path's per-iteration losses against fp32 on the same data: each within rtol_each, the mean over the
    run within rtol_mean (the mean averages out the per-step noise that a reduced precision adds)."""
    rel = np.abs(fast - ref) / np.abs(ref)
    assert rel.max() <= rtol_each, (what, rel.max(), fast, ref)
    assert abs(fast.mean() - ref.mean()) / abs(ref.mean()) <= rtol_mean, (what, fast.mean(), ref.mean())


@contextlib.contextmanager
def _compile_backend_for_rehearsal():
    """On the GPU the scripts' own torch.compile (inductor) runs. In the CPU rehearsal, inductor's C++ build of
    every graph would take minutes on 2 cores, so torch.compile gets backend="aot_eager" there: the same Dynamo
    capture and AOTAutograd (graph breaks, the in-place weight writes, the backward), without code generation."""
    if ON_GPU:
        yield
        return
    real = torch.compile
    torch.compile = functools.partial(real, backend="aot_eager")
    try:
        yield
    finally:
        torch.compile = real


def _dynamo_graphs(reset=False):
    """Graphs Dynamo has captured so far in this process. reset=True first drops every cached graph: a network of
    the same class and shapes compiled earlier in this process (another test) would otherwise be reused from
    the cache, and the count could not show that this run compiled."""
    if reset:
        torch._dynamo.reset()
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# Deterministic kernels for the bit-exact resume checks. These must be set before the first cuBLAS/cuDNN call,
# so every run goes through a fresh interpreter; warn_only=True keeps an op without a deterministic kernel from
# aborting the run: it prints a warning instead, which the test reads to decide between bit-exact and a tolerance.
DETERMINISTIC_RUNNER = r"""
import importlib, json, sys
import torch
torch.use_deterministic_algorithms(True, warn_only=True)
torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
module = importlib.import_module(sys.argv[1])
for argv in json.loads(sys.argv[2]):
    module.main(argv)
"""
NONDETERMINISTIC = re.compile(r"does not have a deterministic implementation|is not deterministic|nondeterministic",
                              re.IGNORECASE)


def _run_deterministic(tmp_path, module, runs, timeout=600):
    """Run module.main(argv) for each argv in one deterministic process; returns the nondeterminism warnings."""
    runner = tmp_path / "deterministic_runner.py"
    runner.write_text(DETERMINISTIC_RUNNER.format(root=str(ROOT)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUBLAS_WORKSPACE_CONFIG=":4096:8")
    p = subprocess.run([sys.executable, str(runner), module, json.dumps([[str(a) for a in argv] for argv in runs])],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return [line for line in p.stderr.splitlines() if NONDETERMINISTIC.search(line)]


def _assert_resumed_runs_agree(tmp_path, stages, warn):
    """Each stage's run {s}-a (4 iterations in one go) and {s}-b (resumed from a's iteration-2 checkpoint) end
    alike: bit for bit when every kernel was deterministic (no warning), else to round-off (the warnings name the
    kernel). Iteration 3's logged loss comes from the restored state before any new step."""
    exact = not warn
    for s in stages:
        a = torch.load(tmp_path / f"{s}-a" / "ckpt-latest.pt", weights_only=True)
        b = torch.load(tmp_path / f"{s}-b" / "ckpt-latest.pt", weights_only=True)
        assert a["iter"] == b["iter"] == 4
        _assert_same_checkpoint(a, b, exact, f"{s} (nondeterministic kernels: {warn})")
        la = [r["loss"] for r in _stats(tmp_path / f"{s}-a")][2:]
        lb = [r["loss"] for r in _stats(tmp_path / f"{s}-b")]
        assert len(la) == len(lb) == 2
        if exact:
            assert la == lb, (s, la, lb)
        else:
            assert la[0] == pytest.approx(lb[0], rel=1e-5) and la[1] == pytest.approx(lb[1], rel=1e-3), (s, la, lb, warn)


def _assert_same_checkpoint(a, b, exact, what):
    """model / ema / optimizer state of two checkpoints: bit-identical, or (exact=False) to a float32 tolerance."""
    assert a["iter"] == b["iter"] and a["stage"] == b["stage"], what
    pairs = [(f"{key}.{k}", a[key][k], b[key][k]) for key in ("model", "ema") for k in a[key]]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    pairs += [(f"optimizer.{i}.{s}", sa[i][s], sb[i][s]) for i in sa for s in sa[i]]
    for name, x, y in pairs:
        if exact:
            assert torch.equal(x, y), (what, name)
        else:
            # Only if a kernel has no deterministic version (named in the failure message): its float32 sums in
            # another order differ by ~1e-6 relative, but Adam may turn a near-zero gradient element's sign, an
            # lr-sized move of that element; per tensor that stays below 1e-2 of its norm over the 2 resumed steps.
            err = (x.double() - y.double()).norm().item()
            assert err <= 1e-2 * y.double().norm().item() + 1e-12, (what, name, err)


# ----------------------------------------------------------------------------- cmt_imagenet.py
def _inet_small_cfg():
    """The real EDM2 U-Net at reduced size: latent-shaped 4x8x8, 10 classes, two levels (32/64 channels), one
    block per level, self-attention at 4x4 (64 channels = 1 head, so the attention path really runs)."""
    cfg = inet_cfg("--preset", "tiny", "--stage", "mid")
    cfg.update(img_channels=4, res=8, latent=False, label_dim=10, model_channels=32, channel_mult=[1, 2],
               num_blocks=1, attn_res=[4], dropout=0.0)
    return cfg


def _inet_net(cfg, seed, attention=True):
    """A U-Net with non-zero gains (fresh EDM2 nets have out_gain = emb_gain = 0: D = c_skip x, no gradient)."""
    torch.manual_seed(seed)
    net = inet.build_net(cfg)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.3 + 0.5 * torch.rand([]).item())
    assert any(b.num_heads for b in net.unet.dec.values()) == attention  # the attention blocks are in the graph
    return net


@needs_cuda
def test_cuda_imagenet_fp32_mid_and_post_step_match_cpu(_backend_flags):
    """fp32 (TF32 off): the CMT, ECD and ECT losses and gradients on CUDA equal the CPU's for the same weights and
    inputs, and the script's optimiser (fused Adam on CUDA) takes the same step as CPU Adam."""
    cfg = _inet_small_cfg()
    teacher, guide, student = _inet_net(cfg, 1), _inet_net(cfg, 3), _inet_net(cfg, 2)
    teacher.eval().requires_grad_(False), guide.eval().requires_grad_(False), student.train()
    toy = inet.ToyMixture(cfg["label_dim"], cfg["res"], cfg["img_channels"])
    b, n = 2, 8  # CMT: 2 trajectories x 16 states; ECD/ECT: 8 images
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(cfg["label_dim"], (b,), generator=g)
    y, y_labels = toy.sample(n, generator=g)

    def cmt(dev, noise):
        st, te = copy.deepcopy(student).to(dev), copy.deepcopy(teacher).to(dev)
        sigmas = inet.logsnr_grid(cfg["teacher_steps"], cfg["s_max"], cfg["s_lo"], dev)
        x, s, lab, target = inet.cmt_batch(te, noise.to(dev), labels.to(dev), sigmas)
        loss = inet.distance(st(x, s, lab), target, cfg["metric"], cfg["huber_c"])
        return loss, torch.autograd.grad(loss.mean(), list(st.parameters())), target

    def pair(dev, post_loss, t, eps):
        st, te, gn = (copy.deepcopy(m).to(dev) for m in (student, teacher, guide))
        yd, ld, td, ed = y.to(dev), y_labels.to(dev), t.to(dev), eps.to(dev)
        r = inet.ect_t_to_r(td, cfg["ect_q"], 0, cfg["k"], cfg["b"])
        x_t = yd + td.reshape(-1, 1, 1, 1) * ed
        if post_loss == "ect":
            x_r = yd + r.reshape(-1, 1, 1, 1) * ed
        else:  # ECD: one Heun step of the autoguided teacher D_g = D_guide + w (D - D_guide)
            with torch.no_grad():
                x_r = inet.teacher_step(inet.guided_denoiser(te, gn, 2.05), x_t, td, r, ld, "heun")
        loss = inet.consistency_pair_loss(st, x_t, td, x_r, r, yd, ld, cfg["huber_c"], cfg["sigma_data"])
        return loss, torch.autograd.grad(loss.mean(), list(st.parameters())), x_r

    with _tf32(False):
        # The inputs above reproduce the scripts' own losses (same draws in the same order from one generator):
        # checked on the CPU, so the CUDA comparison below is of cmt_loss / ecd_loss / ect_loss themselves.
        gs = torch.Generator().manual_seed(7)
        noise = torch.randn([b, cfg["img_channels"], cfg["res"], cfg["res"]], generator=gs)
        noise7 = torch.randn([b, cfg["img_channels"], cfg["res"], cfg["res"]], generator=torch.Generator().manual_seed(7))
        pairs = inet.cmt_batch(teacher, noise7, labels, inet.logsnr_grid(cfg["teacher_steps"], cfg["s_max"], cfg["s_lo"]))
        script = inet.cmt_loss(copy.deepcopy(student), pairs, cfg)
        torch.testing.assert_close(cmt(CPU, noise)[0].detach(), script.detach(), rtol=1e-6, atol=0)
        gs = torch.Generator().manual_seed(8)
        t = torch.exp(cfg["p_mean"] + cfg["p_std"] * torch.randn([n], generator=gs))
        eps = torch.randn(y.shape, generator=gs)
        for post_loss, fn in (("ect", lambda st, gen: inet.ect_loss(st, y, y_labels, gen, cfg, 0)),
                              ("ecd", lambda st, gen: inet.ecd_loss(st, inet.guided_denoiser(teacher, guide, 2.05), y,
                                                                      y_labels, gen, dict(cfg, solver="heun"), 0))):
            ref = fn(copy.deepcopy(student), torch.Generator().manual_seed(8))
            torch.testing.assert_close(pair(CPU, post_loss, t, eps)[0].detach(), ref.detach(), rtol=1e-6, atol=0)

        # CPU vs CUDA. Measured on the CPU, float32 round-off moves these losses by ~1e-7 and the gradients by
        # ~1e-6 (relative; contiguous vs channels_last kernels, or 1-ulp input changes): the 16-step solver and the
        # network do not amplify it. cuDNN may pick Winograd convolutions (~1e-5 relative); rtol 1e-4 on the losses
        # and 5e-4 on each gradient tensor leave a 50x margin over that. A leaked TF32 path would not pass: bf16
        # autocast moved the worst gradient tensor by 1.6e-2 here, so TF32 (8x finer) by ~2e-3; a draw on the
        # wrong device or a lost term errs by O(1).
        l_cpu, g_cpu, tgt_cpu = cmt(CPU, noise)
        l_gpu, g_gpu, tgt_gpu = cmt(CUDA, noise)
        assert l_gpu.device.type == CUDA.type
        assert _rel(tgt_gpu, tgt_cpu) < 1e-4  # the teacher's DPM-Solver++ trajectory end points
        torch.testing.assert_close(l_gpu.detach().cpu(), l_cpu.detach(), rtol=1e-4, atol=1e-5)
        _assert_grads_close(g_gpu, g_cpu, 5e-4, "cmt")
        for post_loss in ("ecd", "ect"):
            l_cpu, g_post_cpu, xr_cpu = pair(CPU, post_loss, t, eps)
            l_gpu, g_post_gpu, xr_gpu = pair(CUDA, post_loss, t, eps)
            assert _rel(xr_gpu, xr_cpu) < 1e-5, post_loss  # the guided teacher's Heun step
            torch.testing.assert_close(l_gpu.detach().cpu(), l_cpu.detach(), rtol=1e-4, atol=1e-5)
            _assert_grads_close(g_post_gpu, g_post_cpu, 5e-4, post_loss)

        for stage, grads in (("mid", g_cpu), ("post", g_post_cpu)):  # the optimiser exactly as train() builds it
            lr, betas = 2e-3, tuple(inet.STAGES[stage]["betas"])
            _adam_steps_match(student, grads, lambda ps, fused: torch.optim.Adam(ps, lr=lr, betas=betas, eps=1e-8,
                                                                                 fused=fused), lr)


@needs_cuda
def test_cuda_imagenet_dropout_mask_replayed_by_second_student_call():
    """The ECT/ECD second (no-grad) student call reuses the first call's dropout mask on CUDA (its RNG state is
    saved and restored on the device's generator): with x_r = x_t, r = t the two outputs agree."""
    cfg = dict(_inet_small_cfg(), dropout=0.5)
    net = _inet_net(cfg, 4).to(CUDA).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=g).to(CUDA)
    t = torch.tensor([0.3, 1.0, 2.0, 5.0], device=CUDA)
    y = torch.zeros_like(x)
    labels = torch.arange(4, device=CUDA)
    with torch.no_grad():  # replayed: only the weight normalisation differs (normalize(normalize(w)) vs normalize(w))
        loss = inet.consistency_pair_loss(net, x, t, x, t, y, labels, 0.0, cfg["sigma_data"])
        first = net(x, t, labels)
        other = net(x, t, labels)  # a fresh mask: what a lost replay would compare against
    scale = first.flatten(1).norm(dim=1)
    assert (loss / ((t ** 2 + 0.25) / (t * 0.5) ** 2) < 1e-4 * scale).all(), (loss, scale)  # float32 round-off
    assert ((first - other).flatten(1).norm(dim=1) > 1e-2 * scale).all()  # dropout 0.5 really changes the output


def _inet_run(outdir, stage, iters, *extra):
    return inet.main(inet_train_args(outdir, "--stage", stage, "--batch", "16", "--iters", str(iters), *extra))


def _inet_live_init(path):
    """An --init checkpoint of the tiny preset's U-Net with non-zero gains: a fresh EDM2 net has out_gain = 0, so its
    loss would not depend on the U-Net at all and a precision change could not show (nor a resume error hide)."""
    cfg = inet_cfg("--preset", "tiny", "--stage", "mid")
    state = _inet_net(cfg, 5, attention=False).state_dict()
    torch.save(dict(script=inet.SCRIPT, stage="pretrain", config=cfg, iter=0, ema=state), path)
    return path


@needs_cuda
def test_cuda_imagenet_fast_paths_track_fp32(tmp_path, _backend_flags, capsys):
    """--bf16, --tf32, --channels-last (mid and post), --compile and --cudnn-benchmark (mid) each train 20 steps through
    main() with finite losses that stay close to fp32's on the same data; every run steps with fused Adam on CUDA."""
    iters = 20
    init = ["--init", str(_inet_live_init(tmp_path / "init.pt"))]
    # post: the tiny lr (1e-5) would leave the weights ~unchanged (no trajectory to track); and with the tiny
    # q = 256, f(x_t) - sg(f(x_r)) is a ~t/256 difference of two outputs, below bfloat16's own noise (~4e-3 of each
    # output: the bf16 ECD loss was measured 10-15% off fp32 there). q = 16 makes it a difference of the network's
    # own scale, so the comparison measures the fast path, not that cancellation.
    post = ["--lr", "1e-3", "--ect-q", "16"]
    for stage, extra in (("mid", init), ("post", init + post)):
        ema = _inet_run(tmp_path / f"{stage}-fp32", stage, iters, *extra)
        assert next(ema.parameters()).device.type == CUDA.type
        assert f"device {CUDA.type}" in capsys.readouterr().out
        ref = _losses(tmp_path / f"{stage}-fp32", iters)
        ckpt = torch.load(tmp_path / f"{stage}-fp32" / "ckpt-latest.pt", weights_only=True)
        assert bool(ckpt["optimizer"]["param_groups"][0].get("fused")) == ON_GPU  # fused Adam exactly on CUDA
        modes = [("bf16", ["--bf16"]), ("tf32", ["--tf32"]), ("channels-last", ["--channels-last"])]
        if stage == "mid":
            modes += [("compile", ["--compile"]), ("cudnn-benchmark", ["--cudnn-benchmark"])]
        for mode, flags in modes:
            out = tmp_path / f"{stage}-{mode}"
            before = _dynamo_graphs(reset=mode == "compile")
            with _compile_backend_for_rehearsal():
                ema = _inet_run(out, stage, iters, *flags, *extra)
            fast = _losses(out, iters)
            assert torch.backends.cudnn.benchmark == (mode == "cudnn-benchmark"), mode  # the switch is set both ways
            if mode == "bf16":
                # bfloat16 keeps 8 mantissa bits (~4e-3 relative per op); through the U-Net and 20 steps of
                # training on the same data the per-step loss moved by <= 3e-3 on the CPU (mid and post):
                # 5e-2 each and 2e-2 on the run's mean leave a margin for CUDA's autocast op list.
                assert not np.array_equal(fast, ref)  # autocast really ran
                _assert_tracks(fast, ref, 5e-2, 2e-2, (stage, mode))
            elif mode == "tf32":
                # TF32 keeps 10 mantissa bits (~5e-4 relative per matmul/conv): 2e-2 each, 1e-2 on the mean.
                _assert_tracks(fast, ref, 2e-2, 1e-2, (stage, mode))
            else:
                # float32 in other kernels (memory layout, inductor fusions): round-off, ~1e-6 per step, amplified
                # at most mildly by 20 Adam steps; 1e-3 still separates it from any change of the computation.
                _assert_tracks(fast, ref, 1e-3, 1e-3, (stage, mode))
            if mode == "channels-last":
                w = ema.unet.enc["8x8_conv"].weight
                assert w.ndim == 4 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
            if mode == "compile":
                assert _dynamo_graphs() > before  # the student really went through torch.compile
            capsys.readouterr()


@needs_cuda
def test_cuda_imagenet_resume_continues_exactly(tmp_path):
    """mid and post (dropout, autoguided ECD) on CUDA: 4 iterations in one go equal 2, then --resume auto for 2,
    bit for bit with deterministic kernels (weights, EMA, Adam state, logged losses)."""
    common = ["--batch", "16", "--iters", "4", "--ckpt-every", "2", "--snap-every", "2"]
    stages = {"mid": [], "post": ["--dropout", "0.1", "--guide", "analytic", "--guidance", "1.5"]}
    warn = _run_deterministic(tmp_path, "cmt_imagenet", [
        inet_train_args(tmp_path / f"{s}-a", "--stage", s, *common, *extra) for s, extra in stages.items()])
    for s in stages:
        (tmp_path / f"{s}-b").mkdir()
        shutil.copy(tmp_path / f"{s}-a" / "ckpt-0000002.pt", tmp_path / f"{s}-b" / "ckpt-latest.pt")
    warn += _run_deterministic(tmp_path, "cmt_imagenet", [
        inet_train_args(tmp_path / f"{s}-b", "--stage", s, *common, *extra, "--resume", "auto")
        for s, extra in stages.items()])
    for s in stages:
        ckpt = torch.load(tmp_path / f"{s}-a" / "ckpt-latest.pt", weights_only=True)
        assert (ckpt["rng"][0]["cuda"] is not None) == ON_GPU  # the CUDA generator's state is saved on CUDA
    _assert_resumed_runs_agree(tmp_path, stages, warn)


@needs_cuda
def test_cuda_imagenet_torchrun_one_process_writes_checkpoint(tmp_path):
    """torchrun with one process (process group initialised: NCCL on CUDA) completes a mid stage on the GPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        str(ROOT / "cmt_imagenet.py"),
                        *inet_train_args(tmp_path / "run", "--stage", "mid", "--batch", "16", "--iters", "2")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"device {CUDA.type}" in p.stdout, p.stdout[-2000:]
    ckpt = inet.read_checkpoint(tmp_path / "run" / "ckpt-latest.pt", "--resume")
    assert ckpt["iter"] == 2 and ckpt["stage"] == "mid" and len(ckpt["rng"]) == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@needs_cuda
@pytest.mark.parametrize("teacher", ["pretrain", "analytic"])
def test_cuda_imagenet_tiny_demo_runs_on_the_device(tmp_path, teacher, _backend_flags, capsys):
    """`python cmt_imagenet.py --preset tiny` (the whole demo: teacher -> mid -> post -> quality table) runs on a CUDA
    machine, where train() returns its students on CUDA and the quality table samples them there from its CPU-drawn
    noise: with the demo's own pretrained teacher and with --teacher analytic (the toy's exact denoiser then meets
    CUDA states)."""
    rows = inet.main(["--preset", "tiny", "--teacher", teacher, "--iters", "2", "--eval-num", "64", "--grid", "0",
                      "--outdir", str(tmp_path / "demo")])
    assert f"device {CUDA.type}" in capsys.readouterr().out
    assert [r["model"] for r in rows][-1] == "post (CMT -> ECD)"
    assert all(math.isfinite(r["flow_map_err"]) and math.isfinite(r["pixel_fd"]) for r in rows[1:]), rows
    assert (tmp_path / "demo" / "comparison.png").is_file()


# ----------------------------------------------------------------------------- meanflow_post.py
def _mf_net(seed, hidden=64, heads=4, depth=2):
    """DiT-MF at reduced size (4x8x8 latents, patch 2 = 16 tokens, 10 classes), with the adaLN-Zero and final layers
    moved off zero (else u == 0 and every comparison would be vacuous)."""
    torch.manual_seed(seed)
    net = mf.DiTMF(input_size=8, in_channels=4, num_classes=10, depth=depth, hidden_size=hidden, num_heads=heads,
                   patch_size=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


MF_LOSS_CFG = dict(omega=0.6, kappa=0.3, t_start=0.0, t_end=0.8, norm_p=1.0, norm_eps=0.01)  # CFG on, with an interval


def _mf_post_inputs(n=8, seed=0):
    """One MeanFlow micro-batch from the script's own samplers, drawn on the CPU: (x, y, e, t, r, drop)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = mf.toy_sample(*mf.toy_mixture(10, 4, 8), n, gen, "cpu")
    e = torch.randn(x.shape, generator=gen)
    t, r = mf.sample_t_r(n, -0.4, 1.0, 0.25, gen, "cpu")
    drop = mf.label_drop_mask(n, 0.1, gen, "cpu") | (torch.arange(n) == 0)  # at least one dropped (first) row
    return x, y, e, t, r, drop


@needs_cuda
def test_cuda_meanflow_fp32_mid_and_post_step_match_cpu(_backend_flags):
    """fp32 (TF32 off): the CMT-MF loss (teacher trajectory + pairs) and the MeanFlow JVP loss with training-time CFG,
    and their gradients, on CUDA equal the CPU's; the script's Adam (fused on CUDA) takes the same step."""
    student, teacher = _mf_net(0), _mf_net(1, hidden=32, heads=2).eval().requires_grad_(False)
    inputs = _mf_post_inputs()

    def post(dev):
        net = copy.deepcopy(student).to(dev)
        loss, l = mf.meanflow_loss(net, *(v.to(dev) for v in inputs), MF_LOSS_CFG)
        return loss, l, torch.autograd.grad(loss, list(net.parameters()))

    steps, pairs, b = 4, 4, 4
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 11, (b,), generator=g)  # 10 = the null class: unconditional trajectories too
    e = torch.randn(b, 4, 8, 8, generator=g)

    def mid(dev):
        states, grid = mf.teacher_trajectory(copy.deepcopy(teacher).to(dev), e.to(dev), y.to(dev), steps, "meanflow")
        assert states.device.type == dev.type
        # the same pairs on both sides: picked on the CPU from this device's states (a CUDA generator draws others)
        z, r, t, u_tgt, n = mf.cmt_mf_pairs(states.cpu(), grid.cpu(), pairs, torch.Generator().manual_seed(2))
        net = copy.deepcopy(student).to(dev)
        loss = mf.cmt_mf_loss(net, z.to(dev), r.to(dev), t.to(dev), y[n].to(dev), u_tgt.to(dev))
        return loss, states, torch.autograd.grad(loss, list(net.parameters()))

    with _tf32(False):
        # Float32 round-off on the CPU moves these by ~1e-7 (loss) and ~1e-6 (gradients, relative); the JVP's
        # tangent pass and the adaptive weight 1/(l + c) add no amplification at these l (>> c). rtol 1e-4 / 5e-4
        # allow for other reduction orders on the GPU with a wide margin; a TF32 matmul (~1e-3 on the worst
        # gradient tensor) or a wrong tangent (~1) is outside.
        (lc, per_c, gc), (lg, per_g, gg) = post(CPU), post(CUDA)
        assert lg.device.type == CUDA.type
        torch.testing.assert_close(per_g.detach().cpu(), per_c.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lg.detach().cpu(), lc.detach(), rtol=1e-4, atol=1e-6)
        _assert_grads_close(gg, gc, 5e-4, "meanflow")
        (mc, sc, gmc), (mg, sg, gmg) = mid(CPU), mid(CUDA)
        assert _rel(sg, sc) < 1e-5  # the teacher's 4-step trajectories
        torch.testing.assert_close(mg.detach().cpu(), mc.detach(), rtol=1e-4, atol=1e-7)
        _assert_grads_close(gmg, gmc, 5e-4, "cmt-mf")
    for grads in (gc, gmc):  # the optimiser exactly as make_optimizer builds it
        lr, betas = 1e-3, tuple(mf.BASE["adam_betas"])
        _adam_steps_match(student, grads, lambda ps, fused: torch.optim.Adam(ps, lr=lr, betas=betas, weight_decay=0,
                                                                             fused=fused or None), lr)


@needs_cuda
def test_cuda_meanflow_jvp_equals_central_differences_and_cpu(_backend_flags):
    """du/dt = jvp(u, (z, t), (v, 1)) on CUDA equals float64 central differences on the CPU, and the CPU's jvp."""
    net = _mf_net(3)
    g = torch.Generator().manual_seed(4)
    n = 6
    z, v = torch.randn(n, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(n, 4, 8, 8, generator=g, dtype=torch.float64)
    t = 0.2 + 0.7 * torch.rand(n, generator=g, dtype=torch.float64)
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 5, 9, 10, 10])  # 10 = null class

    def jvp(dev, dtype):
        m = copy.deepcopy(net).to(dev, dtype)
        zz, vv, tt, rr, yy = z.to(dev, dtype), v.to(dev, dtype), t.to(dev, dtype), r.to(dev, dtype), y.to(dev)
        f = lambda z_, t_: mf.average_velocity(m, z_, rr, t_, yy)  # noqa: E731  (r held fixed: tangent 0, as the loss)
        u, dudt = torch.func.jvp(f, (zz, tt), (vv, torch.ones_like(tt)))
        with torch.no_grad():
            assert torch.equal(u, f(zz, tt)) or _rel(u, f(zz, tt)) < 1e-6  # the primal is the plain forward
        return u.detach(), dudt.detach()

    with _tf32(False), torch.no_grad():
        m64 = copy.deepcopy(net).double()
        f64 = lambda z_, t_: mf.average_velocity(m64, z_, r, t_, y)  # noqa: E731
        h = 1e-5  # float64 central differences: O(h^2) ~ 1e-10 truncation, ~1e-16/h ~ 1e-11 round-off
        cd = (f64(z + h * v, t + h) - f64(z - h * v, t - h)) / (2 * h)
    with _tf32(False):
        _, d64_cpu = jvp(CPU, torch.float64)
        u64, d64_gpu = jvp(CUDA, torch.float64)
        u32_cpu, d32_cpu = jvp(CPU, torch.float32)
        u32_gpu, d32_gpu = jvp(CUDA, torch.float32)
    assert d32_gpu.device.type == CUDA.type and d32_gpu.dtype == torch.float32
    assert cd.norm() > 1e-3 * v.norm()  # a non-trivial derivative
    assert _rel(d64_cpu, cd) < 1e-7  # the CPU reference itself (truncation + round-off above)
    assert _rel(d64_gpu, cd) < 1e-7  # CUDA forward-mode kernels in float64: same bound
    # float32: ~1e-7 round-off per op, ~1e-6 through the network (measured on the CPU); 1e-4 leaves room for GPU
    # reduction orders while a wrong tangent rule (e.g. attention or layer-norm forward-AD) errs by O(1).
    assert _rel(d32_gpu, cd) < 1e-4
    assert _rel(d32_gpu, d32_cpu) < 1e-4
    assert _rel(u32_gpu, u64.cpu()) < 1e-5 and _rel(u32_gpu, u32_cpu) < 1e-5


def _mf_run(outdir, stage, iters, *extra):
    return run_main("--preset", "tiny", "--stage", stage, "--batch", 16, "--iters", iters, "--log-every", 1,
                             "--outdir", outdir, *extra)


def _mf_live_init(path):
    """An --init checkpoint of the tiny preset's DiT-MF with its adaLN-Zero/final layers moved off zero, so that the
    loss depends on every layer from the first step (a zero-initialised DiT outputs u = 0 whatever its precision)."""
    cfg = mf.resolve_config(mf.parse_args(["--preset", "tiny", "--stage", "post"]), "post")
    torch.manual_seed(6)
    net = mf.build_net(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(dict(script=mf.SCRIPT, stage="pretrain", config=cfg, iter=0, ema=net.state_dict()), path)
    return path


@needs_cuda
def test_cuda_meanflow_fast_paths_track_fp32(tmp_path, _backend_flags):
    """--bf16 and --tf32 (mid and post, with training CFG) and --compile (post: the CFG forwards compiled, the jvp
    eager; one run) each train 20 steps through main() with finite losses close to fp32's; fused Adam on CUDA."""
    iters = 20
    _mf_run(tmp_path / "teacher", "pretrain", 2, "--model", "tiny-teacher")
    init = ["--init", _mf_live_init(tmp_path / "init.pt")]
    # post: --norm-p 0 logs the plain loss mean(l); with the adaptive weight l / sg(l + c) ~ 1 for l >> c the
    # logged value would hardly move whatever the precision, and the comparison would have no teeth.
    stages = {"mid": ["--teacher", tmp_path / "teacher" / "ckpt-latest.pt", *init],
              "post": ["--omega", "0.6", "--kappa", "0.3", "--norm-p", "0", *init]}
    for stage, extra in stages.items():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 (see the test below)
        tr = _mf_run(tmp_path / f"{stage}-fp32", stage, iters, *extra)
        assert tr.device.type == CUDA.type
        ref = _losses(tmp_path / f"{stage}-fp32", iters)
        ckpt = torch.load(tmp_path / f"{stage}-fp32" / "ckpt-latest.pt", weights_only=True)
        assert bool(ckpt["optimizer"]["param_groups"][0].get("fused")) == ON_GPU  # fused Adam exactly on CUDA
        modes = [("bf16", ["--bf16"]), ("tf32", ["--tf32"])] + ([("compile", ["--compile"])] if stage == "post" else [])
        for mode, flags in modes:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # --tf32 only turns on
            out = tmp_path / f"{stage}-{mode}"
            before = _dynamo_graphs(reset=mode == "compile")
            with _compile_backend_for_rehearsal():
                _mf_run(out, stage, iters, *flags, *extra)
            fast = _losses(out, iters)
            if mode == "bf16":
                # bfloat16 forwards and tangents (~4e-3 relative per op) under 20 steps of lr 1e-3 training: on the
                # CPU the mid (chord MSE) loss moved by up to 2.4e-2 in one step (1e-3 on the mean), the post loss
                # by 3e-4: 1e-1 each and 2e-2 on the mean bound the noise; a broken path (fp32 tangent against bf16
                # primal, a wrong cast of the target) moves the loss by O(1).
                assert not np.array_equal(fast, ref)  # autocast really ran
                _assert_tracks(fast, ref, 1e-1, 2e-2, (stage, mode))
            elif mode == "tf32":
                _assert_tracks(fast, ref, 2e-2, 1e-2, (stage, mode))  # 10-bit mantissa, ~5e-4 per matmul
            else:
                _assert_tracks(fast, ref, 1e-3, 1e-3, (stage, mode))  # float32, other kernels: round-off only
                assert _dynamo_graphs() > before  # the CFG forwards really went through torch.compile


@needs_cuda
def test_cuda_meanflow_fp32_run_turns_tf32_off(tmp_path, _backend_flags):
    """A run without --tf32 is float32 throughout (the docstring's promise): main() leaves TF32 off for cuBLAS and
    cuDNN even where it was on (PyTorch's own default for cuDNN convolutions is TF32 on)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    _mf_run(tmp_path / "run", "post", 1)
    if ON_GPU:  # the switches mean nothing on the CPU (rehearsal): there the run above only proves the wiring
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


@needs_cuda
def test_cuda_meanflow_resume_continues_exactly(tmp_path):
    """mid (teacher trajectories) and post (JVP loss with CFG) on CUDA: 4 iterations in one go equal 2, then
    --resume auto for 2, bit for bit with deterministic kernels (weights, EMA, Adam state, logged losses)."""
    common = ["--preset", "tiny", "--batch", "16", "--iters", "4", "--log-every", "1", "--ckpt-every", "2",
              "--snap-every", "2"]
    teacher = tmp_path / "teacher" / "ckpt-latest.pt"
    stages = {"mid": ["--teacher", teacher], "post": ["--omega", "0.6", "--kappa", "0.3"]}
    warn = _run_deterministic(tmp_path, "meanflow_post", [
        ["--preset", "tiny", "--stage", "pretrain", "--model", "tiny-teacher", "--batch", "16", "--iters", "2",
         "--outdir", tmp_path / "teacher"]] + [
        ["--stage", s, *common, *extra, "--outdir", tmp_path / f"{s}-a"] for s, extra in stages.items()])
    for s in stages:
        (tmp_path / f"{s}-b").mkdir()
        shutil.copy(tmp_path / f"{s}-a" / "ckpt-0000002.pt", tmp_path / f"{s}-b" / "ckpt-latest.pt")
    warn += _run_deterministic(tmp_path, "meanflow_post", [
        ["--stage", s, *common, *extra, "--outdir", tmp_path / f"{s}-b", "--resume", "auto"] for s, extra in stages.items()])
    _assert_resumed_runs_agree(tmp_path, stages, warn)


@needs_cuda
def test_cuda_meanflow_torchrun_one_process_writes_checkpoint(tmp_path):
    """torchrun with one process (process group initialised: NCCL on CUDA) completes a post stage (JVP loss)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        str(ROOT / "meanflow_post.py"), "--preset", "tiny", "--stage", "post", "--batch", "8",
                        "--iters", "2", "--outdir", str(tmp_path / "run")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    ckpt = mf.read_checkpoint(tmp_path / "run" / "ckpt-latest.pt", "--resume")
    assert ckpt["iter"] == 2 and ckpt["stage"] == "post"
    assert bool(ckpt["optimizer"]["param_groups"][0].get("fused")) == ON_GPU  # it ran on the GPU: fused Adam
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


# ==================================================================================================
# The device check (tools/gpu_check.py): its CPU mode runs every part but the CUDA kernels
# ==================================================================================================

def host_reads(module, fn):
    """Every read of a tensor's value into Python (item, float, int, bool, tolist, cpu, numpy, index) made by
    the module's own lines while fn() runs: {source line: count}. On a GPU each one is a host-device sync."""
    import linecache
    counts, path, saved = collections.Counter(), module.__file__, {}

    def counting(name, orig):
        def read(self, *a, **k):
            frame = sys._getframe(1)
            if frame.f_code.co_filename == path:
                counts[linecache.getline(path, frame.f_lineno).strip()] += 1
            return orig(self, *a, **k)
        return read
    for name in ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy", "__index__"):
        saved[name] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, counting(name, saved[name]))
    try:
        fn()
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)
    return counts


# The one documented read per training step: the non-finite flag (each script's loop says so).
NONFINITE_FLAG = {"cifar10": "finite = int(bad) == 0", "imagenet": "finite = finite.item() == 1",
                  "meanflow": "finite = bool(torch.isfinite(loss))"}
# cmt_cifar10.py's solver reads its float64 noise-level grid, which is made on the CPU and stays there.
CPU_GRID = ("float(sigmas[k])", "lams = (-torch.log(sigmas.to(torch.float64))).tolist()")


def tiny_training_run(script, stage, iters, every, outdir):
    """(module, train): a tiny-preset run of one stage of one script in the working directory, batch 16; its
    teacher (mid) and start (post) are a 1-iteration pretrain run in t/ (imagenet: the analytic teacher)."""
    run = ["--stage", stage, "--iters", str(iters), "--log-every", str(every), "--outdir", outdir, "--batch", "16",
           "--preset", "tiny"]
    start = {"pretrain": [], "mid": ["--teacher", "t/ckpt-latest.pt"], "post": ["--init", "t/ckpt-latest.pt"]}[stage]
    if script == "imagenet":
        start = ["--teacher", "analytic"] + (["--init", "random"] if stage != "pretrain" else [])
        return inet, lambda: inet.main(run + start)
    module, extra, pretrain = ((cc, ["--sample-every", "0"], ["--preset", "tiny"]) if script == "cifar10" else
                               (mf, ["--model", "tiny-teacher"], ["--preset", "tiny", "--model", "tiny-teacher", "--batch", "16"]))
    if stage != "pretrain" and not Path("t/ckpt-latest.pt").exists():
        module.main(pretrain + ["--stage", "pretrain", "--iters", "1", "--outdir", "t"])
    return module, lambda: module.main(run + start + extra)


@pytest.mark.parametrize("stage", ["pretrain", "mid", "post"])
@pytest.mark.parametrize("script", ["cifar10", "imagenet", "meanflow"])
def test_training_loop_reads_one_flag_per_step_from_the_device(tmp_path, script, stage, monkeypatch):
    monkeypatch.chdir(tmp_path)
    iters = 8  # 8 steps, 2 progress lines
    module, train = tiny_training_run(script, stage, iters, 4, stage)
    counts = host_reads(module, train)
    per_step = {line for line, n in counts.items() if n >= iters and not any(g in line for g in CPU_GRID)}
    assert per_step == {NONFINITE_FLAG[script]} and counts[NONFINITE_FLAG[script]] == iters, counts


@needs_cuda
@pytest.mark.parametrize("stage", ["pretrain", "mid", "post"])
@pytest.mark.parametrize("script", ["cifar10", "imagenet", "meanflow"])
def test_cuda_training_step_synchronises_once(tmp_path, script, stage, monkeypatch, _backend_flags):
    """On CUDA a training step waits for the GPU once: the non-finite flag. Every synchronising call (a read of a
    value, a copy from pageable memory, nonzero, ...) is counted with torch.cuda.set_sync_debug_mode('warn'),
    by source line, in a run of 4 and one of 12 iterations with the same setup, one progress line and one
    checkpoint: their difference / 8 is what one step costs. A first, uncounted run makes what is made once per
    process (cached constants, CUDA handles). (CMT_TEST_CUDA=cpu: runs them all, counts nothing.)"""
    monkeypatch.chdir(tmp_path)
    counts = {}
    for run, iters in (("warm-up", 4), ("short", 4), ("long", 12)):
        module, train = tiny_training_run(script, stage, iters, iters, f"{stage}-{run}")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if ON_GPU:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                train()
            finally:
                if ON_GPU:
                    torch.cuda.set_sync_debug_mode("default")
        counts[run] = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in seen
                                          if "synchronizing" in str(w.message))
    per_step = {line: (counts["long"][line] - counts["short"][line]) / 8 for line in counts["long"] | counts["short"]}
    per_step = {line: n for line, n in per_step.items() if n}
    assert sum(per_step.values()) == (1 if ON_GPU else 0), per_step


def test_gpu_check_cpu_mode_writes_the_whole_report(tmp_path):
    # torch.compile is left to the GPU run: compiling the three tiny networks costs ~150 s on 2 cores.
    env = dict(os.environ, OMP_NUM_THREADS="1", CMT_TEST_CUDA="cuda")
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--cpu", "--out", str(tmp_path),
                        "--modes", "fp32,bf16", "--budget", "540"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    tests = report["tests"]
    assert tests["status"] == "ok" and not tests["failed"] and re.search(r"\d+ skipped", tests["summary"])
    assert tests["skipped"] and not tests["passed"] and not tests["not_reached"]  # all of them ran, to a skip
    assert tests["skip_reasons"] == ["needs CUDA"]  # on a machine without CUDA, the only skip
    assert [(b["script"], b["mode"], b["status"]) for b in report["benches"]] == [
        (s, m, "ok") for m in ("fp32", "bf16") for s in ("cifar10", "imagenet", "meanflow")]
    md = (tmp_path / "report.md").read_text()
    for b in report["benches"]:
        for net, r in gpu_check.flatten(b["script"], b["result"]):
            assert r["plain_s"] > 0 and r["mid_s"] > 0 and r["peak_gb"] > 0
            assert r["img_per_s_plain"] > 0 and r["mid_over_plain"] == pytest.approx(r["mid_s"] / r["plain_s"], rel=1e-6)
            assert f"| {b['script']} | {net} | {b['mode']} | {r['plain_s']:.4f} |" in md
    assert report["fid"]["status"] == "ok" and report["fid"]["result"]["images"] == 64
    assert f"{report['fid']['result']['img_per_s']:.0f} images/s" in md and "CPU" in md.splitlines()[0]
    assert f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}" in md.splitlines()[0]


# Lines as pytest 9 -v writes them, with pytest-xdist 3.8 (a test's id when it starts, its outcome when it
# ends) and without (the id when it starts, its outcome on the same line when it ends); a test can end twice
# (passed, then an error in its teardown). test_cuda_d and _e were still running or waiting when pytest stopped.
STREAMED_XDIST = """4 workers [5 items]
test_cmt.py::test_cuda_a 
[gw0] [ 20%] PASSED test_cmt.py::test_cuda_a 
test_cmt.py::test_cuda_b[x y] 
test_cmt.py::test_cuda_c 
[gw1] [ 40%] FAILED test_cmt.py::test_cuda_b[x y] 
[gw0] [ 60%] PASSED test_cmt.py::test_cuda_c 
[gw0] [ 60%] ERROR test_cmt.py::test_cuda_c 
test_cmt.py::test_cuda_d 
"""
STREAMED_PLAIN = """collected 359 items / 354 deselected / 5 selected
test_cmt.py::test_cuda_a PASSED                                         [ 20%]
test_cmt.py::test_cuda_b[x y] FAILED                                    [ 40%]
test_cmt.py::test_cuda_c PASSED                                         [ 60%]
test_cmt.py::test_cuda_c ERROR                                          [ 60%]
test_cmt.py::test_cuda_d SKIPPED (needs CUDA)                           [ 80%]
test_cmt.py::test_cuda_e 
"""
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest">
<testcase classname="test_cmt" name="test_cuda_a" time="0.1" />
<testcase classname="test_cmt" name="test_cuda_b[x y]" time="0.1"><failure message="assert 0">E</failure></testcase>
<testcase classname="test_cmt" name="test_cuda_c" time="0.1"><error message="failed on teardown">E</error></testcase>
<testcase classname="test_cmt" name="test_cuda_d" time="0.0"><skipped type="pytest.skip" message="needs CUDA">s</skipped></testcase>
<testcase classname="test_cmt" name="test_cuda_e" time="0.1" /></testsuite></testsuites>"""


@pytest.mark.parametrize("files, expected", [
    ({"tests.log": STREAMED_XDIST}, (["test_cuda_a"], ["test_cuda_b[x y]", "test_cuda_c"], [], ["test_cuda_d", "test_cuda_e"], [])),
    ({"tests.log": STREAMED_PLAIN}, (["test_cuda_a"], ["test_cuda_b[x y]", "test_cuda_c"], ["test_cuda_d"], ["test_cuda_e"],
                                     ["needs CUDA"])),
    # pytest finished: its JUnit XML has every outcome, and the log is not read
    ({"tests.log": STREAMED_XDIST, "tests.xml": JUNIT}, (["test_cuda_a", "test_cuda_e"], ["test_cuda_b[x y]", "test_cuda_c"],
                                                        ["test_cuda_d"], [], ["needs CUDA"])),
], ids=["xdist-log", "plain-log", "junit"])
def test_gpu_check_names_each_test_as_passed_failed_skipped_or_not_reached(tmp_path, files, expected):
    (tmp_path / "tests.collected").write_text("".join(f"test_cmt.py::test_cuda_{t}\n" for t in ("a", "b[x y]", "c", "d", "e")))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    got = gpu_check.read_outcomes(tmp_path)
    assert (got["passed"], got["failed"], got["skipped"], got["not_reached"], got["skip_reasons"]) == expected
    assert got["outcomes_from"] == ("tests.xml" if "tests.xml" in files else "tests.log")


def test_gpu_check_without_a_gpu_names_the_cpu_mode(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--cpu"):
        gpu_check.main(["--out", "unused"])


# ----------------------------------------------------------------------------- compile-heavy CUDA tests, last
# The GPU check runs the CUDA tests in file order within a time budget: each of these compiles two graphs.

@needs_cuda
@pytest.mark.parametrize("script", ["cifar10", "imagenet"])
def test_cuda_compiled_consistency_passes_share_the_dropout_mask(script, _backend_flags):
    """Under --compile, Inductor draws dropout masks from seeds it takes from the device's generator, in a training
    graph for the first student pass of ECT/ECD and an inference graph for the no-grad second pass: restoring the
    generator between them (cc.ect_loss, inet.consistency_pair_loss) must still give both one mask. The graphs fuse
    differently, so the outputs agree to float32 round-off, not bitwise; a pass without the restore draws another
    mask and moves the output by O(1) (dropout 0.2 / 0.5 in networks whose output depends on their weights)."""
    if script == "cifar10":
        torch.manual_seed(0)
        net = _c10_trained_like(cc.build_net(_c10_cfg("post", dropout=0.2), "ecm"), seed=0).to(CUDA).train()
        x = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(CUDA)
        call = lambda f: f(x, torch.full((4,), 0.5, device=CUDA), train=True)  # noqa: E731
    else:
        net = _inet_net(dict(_inet_small_cfg(), dropout=0.5), 4).to(CUDA).train()
        x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(CUDA)
        call = lambda f: f(x, torch.tensor([0.3, 1.0, 2.0, 5.0], device=CUDA), torch.arange(4, device=CUDA))  # noqa: E731
    compiled = torch.compile(net)
    get_state, set_state = (torch.cuda.get_rng_state, torch.cuda.set_rng_state) if ON_GPU else \
        (torch.get_rng_state, torch.set_rng_state)
    with (torch.cuda.device(CUDA) if ON_GPU else contextlib.nullcontext()):
        state = get_state()
        first = call(compiled).detach()
        set_state(state)
        with torch.no_grad(), (inet.no_forced_wn(net) if script == "imagenet" else contextlib.nullcontext()):
            second = call(compiled)  # as the scripts' second pass (imagenet: weights not re-normalised)
            other = call(compiled)  # the generator moved on: another mask
    scale = first.flatten(1).norm(dim=1)
    # Measured on CPU (Inductor), relative to the output's norm: between the passes 5e-7 (cifar10) and at most 1.1e-5
    # (imagenet: its second pass also skips the forced weight normalisation), with another mask 0.33 and at least
    # 0.12; 1e-4 leaves 9x for GPU kernels' float32 round-off, 1e-2 stays 12x below a changed mask.
    assert ((first - second).flatten(1).norm(dim=1) < 1e-4 * scale).all()
    assert ((second - other).flatten(1).norm(dim=1) > 1e-2 * scale).all()


# ==================================================================================================
# Every script: a user's mistake is one line, exit code 2, and nothing written
# ==================================================================================================

@pytest.mark.parametrize("script", ["cmt_cifar10.py", "meanflow_post.py"])
def test_fid_ref_without_inception_weights_stops_before_any_work(tmp_path, script):
    # --fid-ref is evaluated after training (cifar10) or after sampling (meanflow): the Inception weights are
    # looked for at the start, so an offline machine without them learns it at once.
    _ref(tmp_path / "r.npz", np.zeros(3), np.eye(3))
    argv = ["--preset", "tiny", "--stage", "pretrain"]
    if script == "meanflow_post.py":
        assert run_script(script, *argv, "--iters", "1", "--outdir", tmp_path / "t", cwd=tmp_path)[0] == 0
        argv = ["--preset", "tiny", "--stage", "sample", "--init", tmp_path / "t" / "ckpt-latest.pt"]
    rc, out, err = run_script(script, *argv, "--outdir", tmp_path / "run", "--fid-ref", tmp_path / "r.npz",
                              cwd=tmp_path, env={"FID_WEIGHTS": str(tmp_path / "none.pth")})
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "--fid-ref" in err and "Inception weights" in err and "none.pth" in err
    assert not (tmp_path / "run").exists()


BAD_INPUTS = {p.id: p.values for p in BAD_INPUTS_FID + BAD_INPUTS_CIFAR + BAD_INPUTS_IMAGENET + BAD_INPUTS_MEANFLOW}


@pytest.fixture(scope="session")
def bad_input_runs(request, tmp_path_factory):
    """The selected rows of the bad-input table, each run as a user would, two at a time: each row is a fresh
    Python importing torch (~2 s, one core), so on 2 cores this halves the table's wall time. The setups run
    first, one by one. Returns {id: (folder, exit code, stdout, stderr, folder bytes before)}."""
    wanted = {item.callspec.params["row"] for item in request.session.items
              if item.originalname == "test_bad_input_is_one_line_exit_2_and_writes_nothing"}
    jobs = []
    for row in sorted(wanted):
        script, argv, setup, _ = BAD_INPUTS[row]
        tmp = tmp_path_factory.mktemp(row)
        if setup is not None:
            setup(tmp)
        jobs.append((row, tmp, script, [a.format(tmp=tmp) for a in argv]))
    befores = {row: folder_bytes(tmp) for row, tmp, _, _ in jobs}
    run = lambda job: (job[0], (job[1], *run_script(job[2], *job[3], cwd=job[1]), befores[job[0]]))  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(run, jobs))


@pytest.mark.parametrize("row", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bad_input_runs, row):
    tmp, rc, out, err, before = bad_input_runs[row]
    expected = BAD_INPUTS[row][3]
    lines = err.strip().splitlines()
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err, err
    assert len(lines) == 1 and all(e.format(tmp=tmp) in lines[0] for e in expected), err
    assert folder_bytes(tmp) == before  # no file written, changed or removed (the output folder included)
