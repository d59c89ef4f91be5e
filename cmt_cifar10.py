"""Consistency Mid-Training (CMT) for CIFAR-10 and FFHQ/AFHQv2 64x64, in one file.

CMT (arXiv 2509.24526) inserts a cheap *mid-training* stage between a pre-trained diffusion teacher
and consistency post-training. Three stages, one network family (EDM's SongUNet DDPM++):

1. pretrain (EDM).  D(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, ln(s)/4)  (EDM paper, Table 1), trained with
       ln s ~ N(-1.2, 1.2^2),  loss = (s^2 + sd^2)/(s sd)^2 * |D(y + s n, s) - y|^2.
   Official runs start from EDM's published teacher instead (`--teacher edm-...pkl`).
2. mid (CMT).  The frozen teacher solves its probability-flow ODE from x_T = y + 80 eps with
   16-step third-order multistep DPM-Solver++ on the logSNR grid s_i = 80 (0.002/80)^(i/16).
   Every state x_{s_i}, i = 0..15, is paired with the trajectory's end point x_hat_0:
       L_mid = mean_i d( f_theta(x_{s_i}, s_i), sg(x_hat_0) ),
   d = LPIPS (official), l2, huber or cauchy. f_theta is the ECM-preconditioned student, which starts
   from the teacher's weights. Mid-training is plain regression on fixed targets: it is stable and
   puts the student close to the teacher's flow map.
3. post (ECT).  Easy Consistency Tuning from the mid-trained student:
       t ~ LogNormal(-1.1, 2.0),  r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))),
       L_post = |f(y + t eps, t) - sg(f(y + r eps, r))|_2 / (t - r),
   with the same dropout mask in both calls; CMT keeps q fixed (CIFAR-10: 4096).
Sampling: the student in eval mode (c_skip, c_out shifted by s_min = 0.003 so f(x, s_min) = x);
1 step x = f(80 z, 80), 2 steps x = f(x + t z', t) with t = 0.821 for post-trained students and 0.77569
while mid-training (sony/cmt's defaults). The teacher samples with EDM's Heun.

Usage (all outputs under --outdir; `torchrun --nproc_per_node=N cmt_cifar10.py ...` for N GPUs):
  python cmt_cifar10.py --preset tiny                  # CPU demo: teacher -> mid -> post -> table
  python cmt_cifar10.py --stage pretrain --data cifar10 --outdir runs/edm        # own teacher
  torchrun --nproc_per_node=8 cmt_cifar10.py --stage mid --data cifar10 \\
      --teacher https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl \\
      --metric lpips --lpips-weights vgg16.pth,lpips_vgg.pth --outdir runs/mid
  torchrun --nproc_per_node=8 cmt_cifar10.py --stage post --data cifar10 \\
      --init runs/mid/ckpt-latest.pt --outdir runs/post --fid-ref cifar10-32x32.npz
  python cmt_cifar10.py --stage sample --init runs/post/ckpt-latest.pt --num 50000 --outdir runs/s
FFHQ/AFHQv2 64x64: add `--preset ffhq64` / `--preset afhq64` and `--data ffhq-64x64.zip`.
`--resume auto` continues a stage exactly where its ckpt-latest.pt left off. Speed benchmark and
evidence study: experiments/bench_cifar10.py and experiments/study_ect.py (they import this file).

Deviations from the official code (sony/cmt), all deliberate and documented at the code:
the loss is averaged over the global batch (the official loop sums micro-batch means, which only
rescales the gradient when accumulating); mid-training loads B/16 data images per micro-batch instead
of loading B and discarding the rest; `--traj-reuse K > 1` is an option the official code lacks; the
teacher solves the trajectories of many micro-steps in one batch (`--traj-buffer`, default 128 per process;
0: one solve per micro-step, as sony/cmt), the same pairs computed ahead, each x_T's noise drawn from a
generator seeded by (seed, draw, slot) instead of the global RNG.
Resampling by average pooling / nearest doubling and attention by SDPA compute what EDM's [1,1]
filter convolutions and einsum attention compute (same outputs to float32 rounding), faster.
"""

import argparse
import collections
import copy
import hashlib
import io
import json
import math
import os
import pickle
import random
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import zipfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ----------------------------------------------------------------------------- config
# A preset holds the network and data, then per-stage training recipes. A flag left unset takes the
# stage's value, then the preset's. `cifar10` is the paper's recipe (sony/cmt run_*.sh).

SIGMA_DATA = 0.5
ECM_SIGMA_MIN = 0.003        # student boundary s_min (ECMPrecond)
T_MAX = 80.0                 # largest noise level of teacher solver and few-step sampler
CMT_SIGMA_MIN = 0.002        # end of the CMT teacher trajectory (t_0 of sony/cmt DPMSolverLoss)
TEACHER_STEPS = 16           # teacher steps per trajectory = pairs per trajectory (sony/cmt --nfe; --teacher-steps)
SCRIPT = "cmt_cifar10.py"    # recorded in every checkpoint: --init/--resume/--teacher refuse other scripts' files
# Config fields a resumed run may change: how long it runs, how often it logs, checkpoints, samples and
# evaluates, and speed switches. Every other field defines the run and must match the checkpoint's.
# --traj-buffer only groups the teacher's solves: a resumed run finishes the checkpoint's chunk as it was
# solved, then solves chunks of the new size (the same pairs, to float rounding).
RESUME_MAY_CHANGE = {"outdir", "resume", "iters", "mimg", "batch_gpu", "log_every", "ckpt_every", "snap_every",
                     "sample_every", "fid_ref", "fid_every", "fid_num", "num", "sample_steps", "bf16", "tf32",
                     "channels_last", "compile", "max_nonfinite", "eval_num", "baselines", "lpips_weights",
                     "teacher_sha256", "traj_buffer", "grid", "cudnn_benchmark"}

EDM_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
_DDPMPP = dict(model_channels=128, num_blocks=4, attn_resolutions=[16])
_RUN = dict(log_every=100, ckpt_every=5000, snap_every=50000, sample_every=10000)
# The 2-step sampler's intermediate noise level: sony/cmt's ECT post-training and evaluation default to
# 0.821 (ct_train.py, ct_eval.py --mid_t; run_cmt+ecm_*.sh keep it), mid-training passes 0.77569
# (run_cmt_*.sh --mid_t=7.7569e-01). `--stage sample` takes the value of the checkpoint's stage.
MID_T = dict(mid=0.77569, post=0.821)
# pretrain approximates EDM's CIFAR-10 run (Adam 1e-3, batch 512, 200 Mimg, dropout 0.13; EMA 0.9993 ~ its
# 0.5 Mimg half-life) without its augmentation pipeline, lr warm-up or EMA ramp-up; mid and post are official.
_RECIPE = dict(
    pretrain=dict(init="random", optimizer="adam", lr=1e-3, ema=0.9993, batch=512, mimg=200.0, dropout=0.13),
    mid=dict(init="teacher", optimizer="radam", lr=2e-4, ema=0.999, batch=128, mimg=38.4, dropout=0.2, mid_t=MID_T["mid"]),
    post=dict(init=None, optimizer="radam", lr=1e-4, ema=0.9999, batch=128, mimg=12.8, dropout=0.2, mid_t=MID_T["post"]),
)


def _cpu_recipe(batch, iters, lr, mid_optimizer):
    """Stage recipes of the CPU presets from their (pretrain, mid, post) iterations and learning rates."""
    common = dict(ema=0.99, batch=batch, dropout=0.0)
    return dict(pretrain=dict(common, init="random", optimizer="adam", lr=lr[0], iters=iters[0]),
                mid=dict(common, init="teacher", optimizer=mid_optimizer, lr=lr[1], iters=iters[1], mid_t=MID_T["mid"]),
                post=dict(common, init=None, optimizer="adam", lr=lr[2], iters=iters[2], mid_t=MID_T["post"]))


PRESETS = {
    "cifar10": dict(data="cifar10", teacher=EDM_URL + "edm-cifar10-32x32-uncond-vp.pkl", resolution=32,
                    channel_mult=[2, 2, 2], **_DDPMPP, ect_q=4096.0, metric="lpips", **_RUN, **_RECIPE),
    "ffhq64": dict(data=None, teacher=EDM_URL + "edm-ffhq-64x64-uncond-vp.pkl", resolution=64,
                   channel_mult=[1, 2, 2, 2], **_DDPMPP, ect_q=512.0, metric="lpips", **_RUN, **_RECIPE),
    "afhq64": dict(data=None, teacher=EDM_URL + "edm-afhqv2-64x64-uncond-vp.pkl", resolution=64,
                   channel_mult=[1, 2, 2, 2], **_DDPMPP, ect_q=1024.0, metric="lpips", **_RUN, **_RECIPE),
    # Your own 32x32 images on a laptop CPU (--data FOLDER of PNGs, then --teacher its pretrain checkpoint): a
    # 1.26M-parameter DDPM++ (one block per level, attention at 8x8), short stages at batch 32, the l2 distance
    # (LPIPS needs VGG weights on disk). EMA 0.99 (half-life 69 iterations): at 0.999 a 600-iteration EMA would
    # still hold 55% of the random initialisation. Mid and post use Adam: RAdam's first steps (un-normalised
    # momentum SGD) blow this network up at 1e-3, and at 2e-4 a 100-iteration mid stage still maps every noise
    # to the data mean; Adam 3e-4 for 300 iterations gives 1-step samples that follow the teacher's.
    "small32": dict(data=None, teacher=None, resolution=32, channel_mult=[1, 2, 2], model_channels=32, num_blocks=1,
                    attn_resolutions=[8], ect_q=4096.0, metric="l2",
                    **dict(_RUN, log_every=20, ckpt_every=100, snap_every=0, sample_every=0),
                    **_cpu_recipe(batch=32, iters=(600, 300, 100), lr=(1e-3, 3e-4, 1e-4), mid_optimizer="adam")),
    # CPU demo on the built-in Gaussian mixture (3x8x8) with a small DDPM++ (0.19M parameters). Post-training
    # uses Adam: RAdam's first five steps are un-normalised momentum SGD, and ECT's gradient norms (~1e4
    # here, from the 1/(t - r) weight) make those steps wreck a small pre-trained network.
    "tiny": dict(data="toy", teacher=None, resolution=8, channel_mult=[1, 2], model_channels=16, num_blocks=1,
                 attn_resolutions=[4], ect_q=4096.0, metric="l2",
                 **dict(_RUN, log_every=50, ckpt_every=100, snap_every=0, sample_every=0),
                 **_cpu_recipe(batch=64, iters=(400, 150, 150), lr=(2e-3, 1e-3, 2e-4), mid_optimizer="radam")),
}


def resolve_config(args):
    """Merge CLI flags over the stage recipe over the preset; derive iters <-> mimg."""
    preset = PRESETS[args.preset]
    stage = args.stage
    cfg = {k: copy.deepcopy(v) for k, v in preset.items() if k not in _RECIPE}
    cfg.update(copy.deepcopy(preset[stage if stage in _RECIPE else "mid"]))  # sample, benchmark: mid's network
    for key, value in vars(args).items():
        if value is not None or key not in cfg:
            cfg[key] = value
    if stage in _RECIPE:
        if args.iters is None and args.mimg is None and cfg.get("iters") is None:
            cfg["iters"] = round(cfg["mimg"] * 1e6 / cfg["batch"])
        elif args.mimg is not None and args.iters is None:
            cfg["iters"] = round(args.mimg * 1e6 / cfg["batch"])
        cfg["mimg"] = cfg["iters"] * cfg["batch"] / 1e6
    if cfg["lr_decay"] is None:
        cfg["lr_decay"] = "constant" if stage == "post" and cfg["ect_double"] else "linear"
    if stage == "sample":
        cfg["mid_t"] = args.mid_t  # None: the value of the sampled checkpoint's stage (MID_T)
    if cfg["data"] is None and stage in ("pretrain", "mid", "post"):
        raise SystemExit(f"--data: preset {args.preset!r} needs a dataset (zip or folder of PNGs)")
    if stage == "post":
        # ECT's f(y + t eps) and f(y + r eps) see inputs q^-(stage+1) apart (relative); below a fast path's
        # rounding of the network's inputs the loss |f_t - f_r| / (t - r) is rounding noise (measured at q = 4096:
        # median error 6.2x the fp32 loss per sample in bf16, 0.12x in TF32). sony/cmt post-trains in float32.
        gap = cfg["ect_q"] ** -(ect_stage(cfg["iters"] - 1, cfg["batch"], cfg["ect_double"]) + 1)
        for flag, unit in (("bf16", 2.0 ** -8), ("tf32", 2.0 ** -11)):  # unit round-offs: 8, 11 significant bits
            if cfg[flag] and gap < unit:
                raise SystemExit(f"--{flag}: ECT compares the network at noise levels {gap:.1e} apart (relative), "
                                 f"within {flag}'s rounding of its inputs ({unit:.1e}); post-train in fp32 (or lower "
                                 "--ect-q)")
    return cfg


# ----------------------------------------------------------------------------- data
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CACHE_DIR = Path(os.environ.get("CMT_CACHE", Path.home() / ".cache" / "cmt"))


class CifarUnpickler(pickle.Unpickler):
    """CIFAR-10 batches are pickled dicts of numpy arrays: answer numpy's array globals, refuse the rest
    (a local tarball is not hash-checked, so it must not be able to run code)."""

    def find_class(self, module, name):
        if module.split(".")[0] == "numpy" and name in ("_reconstruct", "ndarray", "dtype", "scalar"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name} in a CIFAR-10 batch (nothing in it was run)")


def load_cifar10(path):
    """CIFAR-10 python tarball (https://www.cs.toronto.edu/~kriz/cifar.html) -> uint8 [50000, 3, 32, 32]
    and int64 labels."""
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for i in range(1, 6):
                member = tar.extractfile(f"cifar-10-batches-py/data_batch_{i}")
                batch = CifarUnpickler(member, encoding="bytes").load()
                images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    except pickle.UnpicklingError as e:
        raise SystemExit(f"--data {path}: {e}") from None
    except (tarfile.TarError, KeyError, EOFError, OSError, ValueError, TypeError) as e:
        raise SystemExit(f"--data {path}: not the CIFAR-10 python tarball cifar-10-python.tar.gz "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_image_folder(path):
    """EDM/StyleGAN dataset: a zip or folder of PNGs, labels from an optional dataset.json."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        zf = zipfile.ZipFile(path)
        names = sorted(n for n in zf.namelist() if n.lower().endswith(".png"))
        read = lambda n: zf.read(n)
    elif path.is_dir():
        names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*.png"))
        read = lambda n: (path / n).read_bytes()
    else:
        raise SystemExit(f"--data {path}: expected a CIFAR-10 .tar.gz, a zip or folder of PNGs, or 'toy'")
    if not names:
        raise SystemExit(f"--data {path}: no PNG files found")
    images = []
    for n in names:
        try:
            image = Image.open(io.BytesIO(read(n)))
            image.load()
        except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise SystemExit(f"--data {path}: {n} is not a readable PNG ({' '.join(str(e).split())[:100]})") from None
        image = np.asarray(image.convert("RGB"))  # grayscale and palette PNGs become RGB, as EDM's dataset_tool.py does
        if images and image.shape != images[0].shape:
            raise SystemExit(f"--data {path}: {n} is {image.shape[1]}x{image.shape[0]} but {names[0]} is "
                             f"{images[0].shape[1]}x{images[0].shape[0]}; every image must have the same size")
        images.append(image)
    labels = None
    meta = "dataset.json"
    if (zipfile.is_zipfile(path) and meta in zf.namelist()) or (path.is_dir() and (path / meta).exists()):
        try:
            table = dict(json.loads(read(meta)).get("labels") or [])
        except (ValueError, TypeError, AttributeError) as e:
            raise SystemExit(f"--data {path}: dataset.json is not {{\"labels\": [[file, class], ...]}} ({e})") from None
        if table:
            missing = [n for n in names if n not in table]
            if missing:
                raise SystemExit(f"--data {path}: dataset.json has no label for {missing[0]} "
                                 f"({len(missing)} of {len(names)} images unlabelled)")
            if not all(isinstance(table[n], int) and table[n] >= 0 for n in names):
                raise SystemExit(f"--data {path}: dataset.json labels must be class indices >= 0")
            labels = torch.tensor([table[n] for n in names], dtype=torch.int64)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), labels


class ToyMixture:
    """Built-in data: an isotropic Gaussian mixture of smooth coloured patterns.

    Its ideal denoiser is closed-form, which gives an analytic teacher and exact flow maps for
    tests. The mixture is fixed (it does not depend on --seed) so every run sees the same data."""

    def __init__(self, resolution=8, components=6):
        g = torch.Generator().manual_seed(20250929)
        u = torch.linspace(0, 1, resolution)
        yy, xx = torch.meshgrid(u, u, indexing="ij")
        means = []
        for _ in range(components):
            freq, phase = torch.rand(2, 2, generator=g) * torch.tensor([[2.5], [6.3]])
            colour = torch.rand(3, generator=g) * 1.6 - 0.8
            wave = torch.sin(2 * math.pi * (freq[0] * xx + freq[1] * yy) / 2 + phase[0])
            ramp = torch.cos(math.pi * (xx - yy) + phase[1])
            means.append(0.75 * (colour[:, None, None] * wave + 0.3 * ramp))
        self.means = torch.stack(means).clamp(-0.9, 0.9)                      # [K, 3, R, R]
        self.stds = torch.linspace(0.06, 0.16, components)                    # s_k
        self.weights = torch.softmax(torch.rand(components, generator=g), 0)  # pi_k
        self.shape = tuple(self.means.shape[1:])

    def sample(self, n, generator=None):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn((n,) + self.shape, generator=generator)
        return self.means[k] + self.stds[k].view(-1, 1, 1, 1) * noise

    def denoise(self, x, sigma):
        """Exact E[y | y + sigma n = x]:  sum_k w_k [mu_k + s_k^2/(s_k^2+s^2)(x - mu_k)]."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)
        mu, s2 = self.means.to(x.device, x.dtype).flatten(1), self.stds.to(x.device, x.dtype) ** 2  # [K, D], [K]
        var = s2[None] + sigma ** 2                                                   # [N, K]
        xf = x.flatten(1)
        dist2 = (xf.square().sum(1, keepdim=True) - 2 * xf @ mu.T + mu.square().sum(1)[None])
        logw = self.weights.to(x.device, x.dtype).log()[None] - 0.5 * dist2 / var - 0.5 * xf.shape[1] * var.log()
        w = torch.softmax(logw, dim=1)                                                # [N, K]
        shrink = s2[None] / var                                                       # [N, K]
        out = (w @ mu) + (w * shrink).sum(1, keepdim=True) * xf - (w * shrink) @ mu
        return out.view_as(x)


def gaussian_flow_map(x, s_from, s_to, mean, std):
    """Exact PF-ODE map of one Gaussian N(mean, std^2 I) from noise level s_from to s_to: for a Gaussian
    the PF-ODE (EDM Eq. 1) keeps x - mean proportional to sqrt(s^2 + std^2)."""
    return mean + (x - mean) * ((std ** 2 + s_to ** 2) / (std ** 2 + s_from ** 2)) ** 0.5


class DataStream:
    """An endless, resumable stream of this rank's training batches in [-1, 1].

    Datasets are shuffled per epoch with a generator seeded by (seed, epoch), each rank taking a
    disjoint shard; the toy mixture draws fresh samples from its own generator. state_dict() holds
    the position, so a resumed run sees exactly the batches the uninterrupted run would."""

    def __init__(self, source, seed, rank=0, world_size=1, cond=False):
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.toy = source if isinstance(source, ToyMixture) else None
        if self.toy is not None:
            self.gen = torch.Generator().manual_seed(seed * world_size + rank)
            self.shape, self.label_dim = self.toy.shape, 0
            return
        self.images, labels = source
        if cond and labels is None:
            raise SystemExit("--cond: the dataset has no labels (dataset.json)")
        self.labels = labels if cond else None
        self.label_dim = int(labels.max()) + 1 if cond else 0
        self.shape = tuple(self.images.shape[1:])
        self.epoch, self.pos = 0, 0
        self._order = self._permutation()

    def _permutation(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return torch.randperm(len(self.images), generator=g)[self.rank::self.world_size]

    def next(self, n):
        if self.toy is not None:
            return self.toy.sample(n, self.gen), None
        idx = []
        while n > 0:
            take = self._order[self.pos:self.pos + n]
            idx.append(take)
            self.pos, n = self.pos + len(take), n - len(take)
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
        idx = torch.cat(idx)
        images = self.images[idx].to(torch.float32) / 127.5 - 1
        labels = F.one_hot(self.labels[idx], self.label_dim).float() if self.labels is not None else None
        return images, labels

    def state_dict(self):
        if self.toy is not None:
            return {"gen": self.gen.get_state()}
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        if self.toy is not None:
            self.gen.set_state(state["gen"])
        else:
            self.epoch, self.pos = state["epoch"], state["pos"]
            self._order = self._permutation()


def open_data(spec):
    """--data: 'toy', 'cifar10' (downloaded, md5-checked), a CIFAR-10 .tar.gz, or an EDM zip/folder."""
    if spec == "toy":
        return ToyMixture()
    if spec == "cifar10":
        try:
            spec = download(CIFAR10_URL, CACHE_DIR, md5=CIFAR10_MD5, flag="--data")
        except (OSError, ValueError) as e:  # offline or a bad download: one line naming the flag
            raise SystemExit(f"--data cifar10: {' '.join(str(e).split())}") from None
    path = Path(spec)
    if not path.exists():
        raise SystemExit(f"--data {spec}: no such file or folder")
    if path.name.endswith(".tar.gz"):
        return load_cifar10(path)
    return load_image_folder(path)


def to_device(x, device):
    """Host -> GPU copy that leaves the host free to queue more work: a copy from pageable memory waits until
    the GPU has finished everything queued before it, one from pinned memory need not."""
    if x is None or torch.device(device).type != "cuda":
        return None if x is None else x.to(device)
    return x.pin_memory().to(device, non_blocking=True)

# ----------------------------------------------------------------------------- network
# EDM's SongUNet in the DDPM++ configuration (NVlabs/edm training/networks.py), with the official
# state_dict names so EDM and ECT/CMT checkpoints load strictly.


def weight_init(shape, fan_in, fan_out, scale=1.0):
    """Xavier-uniform, the DDPM++ initialiser (EDM `init_mode='xavier_uniform'`)."""
    return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1) * scale


class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_weight=1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], in_features, out_features, init_weight))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(torch.nn.Module):
    """Conv with optional 2x resampling *before* the conv (DDPM++ order). The filter [1,1] makes
    down = 2x2 average pooling and up = nearest-neighbour doubling; the buffer is kept because the
    official checkpoints store it."""

    def __init__(self, in_channels, out_channels, kernel, up=False, down=False, init_weight=1.0):
        super().__init__()
        self.up, self.down = up, down
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], fan_in, fan_out, init_weight))
        self.bias = torch.nn.Parameter(torch.zeros(out_channels))
        if up or down:
            f = torch.tensor([1.0, 1.0])
            self.register_buffer("resample_filter", (f.ger(f) / f.sum().square())[None, None])

    def forward(self, x):
        if self.down:
            x = F.avg_pool2d(x, 2)  # == conv with the [1,1]x[1,1]/4 filter, stride 2
        if self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # == transposed conv with 4 * filter
        w, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if w.shape[-1] == 1:  # 1x1 conv as one batched GEMM: CPU conv kernels take a slow path here
            n, _, h, wd = x.shape
            return torch.baddbmm(bias[None, :, None], w.flatten(1).expand(n, -1, -1), x.flatten(2)).view(n, -1, h, wd)
        return F.conv2d(x, w, bias, padding=w.shape[-1] // 2)


class GroupNorm(torch.nn.Module):
    def __init__(self, num_channels, eps=1e-6):
        super().__init__()
        self.num_groups = min(32, num_channels // 4)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(torch.nn.Module):
    """DDPM++ residual block (additive embedding, skip_scale sqrt(1/2)), optional self-attention."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False, dropout=0.0):
        super().__init__()
        self.in_channels, self.out_channels, self.dropout = in_channels, out_channels, dropout
        self.norm0 = GroupNorm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_weight=1e-5)
        self.skip = None
        if in_channels != out_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down)
        self.attention = attention
        if attention:
            self.norm2 = GroupNorm(out_channels)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init_weight=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, 1, init_weight=1e-5)

    def forward(self, x, emb, train):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        x = F.silu(self.norm1(x + self.affine(emb)[:, :, None, None].to(x.dtype)))
        x = self.conv1(F.dropout(x, p=self.dropout, training=train))
        # Scaled in place: no backward needs the sum itself, so this saves one activation-sized allocation.
        x = (x + (self.skip(orig) if self.skip is not None else orig)).mul_(math.sqrt(0.5))
        if self.attention:
            n, c, h, w = x.shape
            # One head; q/k/v channels are interleaved (c0q, c0k, c0v, c1q, ...) as in EDM.
            q, k, v = self.qkv(self.norm2(x)).reshape(n, c, 3, h * w).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            x = (self.proj(a.transpose(1, 2).reshape(n, c, h, w)) + x).mul_(math.sqrt(0.5))
        return x


class SongUNet(torch.nn.Module):
    """DDPM++ U-Net: positional noise embedding, 'standard' encoder and decoder, filter [1,1]."""

    def __init__(self, resolution, channels=3, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.0):
        super().__init__()
        emb_channels, noise_channels = model_channels * 4, model_channels
        self.noise_channels = noise_channels
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        block = dict(emb_channels=emb_channels, dropout=dropout)

        self.enc = torch.nn.ModuleDict()
        cout = channels
        for level, mult in enumerate(channel_mult):
            res = resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels if isinstance(m, UNetBlock) else model_channels for m in self.enc.values()]

        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
        self.dec[f"{resolution}x{resolution}_aux_norm"] = GroupNorm(cout)
        self.dec[f"{resolution}x{resolution}_aux_conv"] = Conv2d(cout, channels, 3, init_weight=1e-5)

    def embed_noise(self, c_noise):
        """Positional embedding with endpoint=True, emitted as [sin, cos] (EDM flips [cos, sin])."""
        half = self.noise_channels // 2
        freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32, device=c_noise.device) / (half - 1))
        x = c_noise.float().ger(freqs)
        return torch.cat([x.sin(), x.cos()], dim=1)

    def forward(self, x, c_noise, class_labels=None, train=False):
        emb = self.embed_noise(c_noise).to(x.dtype)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels.to(x.dtype) * math.sqrt(class_labels.shape[1]))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        skips = []
        for block in self.enc.values():
            x = block(x, emb, train) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):
                x = F.silu(block(x))
            elif name.endswith("aux_conv"):
                x = block(x)
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb, train)
        return x


def edm_precond(sigma, sigma_data=SIGMA_DATA):
    """EDM coefficients (Karras et al. 2022, Table 1): c_skip, c_out, c_in, c_noise."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    return c_skip, c_out, c_in, sigma.log() / 4


def ecm_precond(sigma, train, sigma_data=SIGMA_DATA, sigma_min=ECM_SIGMA_MIN):
    """ECM coefficients (sony/cmt training/networks.py, ECMPrecond): EDM's in train mode; in eval mode
    shifted so f(x, s_min) = x."""
    c_skip, c_out, c_in, c_noise = edm_precond(sigma, sigma_data)
    if not train:
        c_skip = sigma_data ** 2 / ((sigma - sigma_min) ** 2 + sigma_data ** 2)
        c_out = (sigma - sigma_min) * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out, c_in, c_noise


class Precond(torch.nn.Module):
    """D(x, s) = c_skip x + c_out F(c_in x, c_noise). kind='edm' (teacher) or 'ecm' (student).

    `train` is an explicit argument: it switches dropout and, for the student, the ECM boundary
    shift. The CMT and ECT targets are computed with train=True (as in the official code)."""

    def __init__(self, kind, resolution, channels=3, label_dim=0, augment_dim=0, **net_kwargs):
        super().__init__()
        assert kind in ("edm", "ecm")
        self.kind, self.label_dim = kind, label_dim
        self.model = SongUNet(resolution, channels, label_dim, augment_dim, **net_kwargs)

    def forward(self, x, sigma, class_labels=None, *, train):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        coef = edm_precond(sigma) if self.kind == "edm" else ecm_precond(sigma, train)
        c_skip, c_out, c_in, c_noise = coef
        x = x.to(torch.float32)
        F_x = self.model(c_in * x, c_noise.flatten().expand(x.shape[0]), class_labels, train=train)
        return c_skip * x + c_out * F_x.to(torch.float32)


def build_net(cfg, kind, label_dim=0, augment_dim=0, dropout=None):
    return Precond(kind, cfg["resolution"], 3, label_dim, augment_dim, model_channels=cfg["model_channels"],
                   channel_mult=cfg["channel_mult"], num_blocks=cfg["num_blocks"],
                   attn_resolutions=cfg["attn_resolutions"],
                   dropout=cfg.get("dropout", 0.0) if dropout is None else dropout)

# Official EDM/EDM2 .pkl loading, downloads and copy_by_name: see the appendix at the end of this file.

# ----------------------------------------------------------------------------- teacher and solver
def logsnr_grid(n=TEACHER_STEPS, s_max=T_MAX, s_min=CMT_SIGMA_MIN, dtype=torch.float64):
    """s_i = s_max (s_min/s_max)^(i/n): uniform in lambda = -ln s (sony/cmt training/dpm_solver.py,
    DPM_Solver.get_time_steps 'logSNR'); 17 values for n = 16."""
    return s_max * (s_min / s_max) ** (torch.arange(n + 1, dtype=dtype) / n)


def karras_grid(n=18, s_max=T_MAX, s_min=CMT_SIGMA_MIN, rho=7.0, dtype=torch.float64):
    """EDM's Heun grid t_0..t_{n-1} plus t_n = 0 (NVlabs/edm generate.py, edm_sampler)."""
    i = torch.arange(n, dtype=dtype)
    t = (s_max ** (1 / rho) + i / (n - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=dtype)])


def dpm_solver_pp_step(x, ms, lams, order):
    """One multistep DPM-Solver++ update of the given order from lambda lams[-2] to lams[-1] (Lu et al.
    2022; sony/cmt training/dpm_solver.py, DPM_Solver.multistep_dpm_solver_update).

    ms: denoiser outputs at the last `order` states (newest last); lams: their lambda = -ln s
    followed by the target's. x_next = (s_next/s_cur) x - phi_1 m_0 [+ phi_2 D1 - phi_3 D2]."""
    h = lams[-1] - lams[-2]
    phi_1 = math.expm1(-h)
    x = math.exp(-h) * x - phi_1 * ms[-1]  # s_next / s_cur = exp(-h)
    if order == 2:
        r0 = (lams[-2] - lams[-3]) / h
        x = x - 0.5 * phi_1 * (ms[-1] - ms[-2]) / r0
    elif order == 3:
        r0, r1 = (lams[-2] - lams[-3]) / h, (lams[-3] - lams[-4]) / h
        d1_0, d1_1 = (ms[-1] - ms[-2]) / r0, (ms[-2] - ms[-3]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_2 = phi_1 / h + 1
        phi_3 = phi_2 / h - 0.5
        x = x + phi_2 * d1 - phi_3 * d2
    return x


def dpm_solver_pp(denoise, x, sigmas, order=3):
    """Multistep DPM-Solver++ (data prediction) along `sigmas`, returning all len(sigmas) states.

    Step k uses order min(order, k+1, steps-k): warm-up and lower-order final steps, as in sony/cmt
    (`lower_order_final=True`). One model call per step; the final state is never denoised.
    The first-order first and last steps make the global error O(h^2) for order 3 too."""
    steps = len(sigmas) - 1
    lams = (-torch.log(sigmas.to(torch.float64))).tolist()
    states, ms = [x], []
    for k in range(steps):
        ms = (ms + [denoise(x, float(sigmas[k])).to(x.dtype)])[-order:]
        o = min(order, k + 1, steps - k)
        x = dpm_solver_pp_step(x, ms[-o:], lams[k + 1 - o:k + 2], o)
        states.append(x)
    return states


def heun_sampler(denoise, x, sigmas):
    """EDM Algorithm 2 without churn: Euler steps with Heun's correction except into sigma = 0."""
    for t_cur, t_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = (x - denoise(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d
        if t_next > 0:
            d_next = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * 0.5 * (d + d_next)
        x = x_next
    return x


def teacher_denoiser(teacher, labels=None):
    """The frozen teacher as a float64-in/out function D(x, s), or the toy mixture's exact one."""
    if isinstance(teacher, ToyMixture):
        return lambda x, s: teacher.denoise(x.double(), s).to(x.dtype)
    return lambda x, s: teacher(x, torch.full((x.shape[0],), s, device=x.device), labels, train=False).to(x.dtype)

# ----------------------------------------------------------------------------- losses
def edm_loss(net, y, labels, P_mean=-1.2, P_std=1.2):
    """EDM pre-training loss per sample: lambda(s) |D(y + s n, s) - y|^2, ln s ~ N(P_mean, P_std^2)."""
    sigma = (torch.randn(y.shape[0], 1, 1, 1, device=y.device) * P_std + P_mean).exp()
    weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
    D = net(y + sigma * torch.randn_like(y), sigma, labels, train=True)
    return (weight * (D - y).square()).flatten(1).sum(1)


def cmt_trajectories(teacher, y, labels, steps=TEACHER_STEPS, noise=None):
    """Teacher trajectories from x_T = y + 80 eps (sony/cmt training/loss.py, DPMSolverLoss) -> (16 states
    [16, n, ...], target [n, ...]). eps = `noise`, or a draw from the global RNG."""
    sigmas = logsnr_grid(steps)  # on the CPU: the solver reads its coefficients without a host-device sync
    noise = torch.randn_like(y) if noise is None else noise
    with torch.no_grad():
        states = dpm_solver_pp(teacher_denoiser(teacher, labels), y + T_MAX * noise, sigmas)
    # sony/cmt training/loss.py (DPMSolverLoss) cleans the trajectory and its target before regressing on them.
    return torch.nan_to_num(torch.stack(states[:-1])), torch.nan_to_num(states[-1])


def cmt_pairs(states, target, labels):
    """Step-major pair layout of sony/cmt DPMSolverLoss: row i*n + j holds (x_{s_i} of trajectory j, s_i,
    x_hat_0 of j)."""
    steps, n = states.shape[:2]
    sigmas = to_device(logsnr_grid(steps)[:steps].float(), states.device).repeat_interleave(n)
    targets = target.repeat(steps, *[1] * (target.dim() - 1))
    labels = labels.repeat(steps, 1) if labels is not None else None
    return states.flatten(0, 1), sigmas, targets, labels


def distance(pred, target, metric, c=None, lpips=None):
    """Per-sample distance of the CMT loss: l2, huber (pseudo-Huber as in iCT, Song & Dhariwal 2023), cauchy,
    or lpips (sony/cmt training/loss.py, DPMSolverLoss: LPIPS-VGG on the 32x32 outputs)."""
    sq = (pred - target).square().flatten(1).sum(1)
    c = 0.00054 * math.sqrt(pred[0].numel()) if c is None else c  # iCT's pixel-space rule
    if metric == "l2":
        return sq
    if metric == "huber":
        return (sq + c ** 2).sqrt() - c
    if metric == "cauchy":
        return torch.log1p(sq / (2 * c ** 2))
    if metric == "lpips":
        return lpips(pred, target)
    raise ValueError(f"--metric {metric!r}: expected l2, huber, cauchy or lpips")


def cmt_loss(student, states, target, labels, metric="l2", c=None, lpips=None):
    """CMT mid-training loss per row: d(f_theta(x_{s_i}, s_i), sg(x_hat_0)), no time weighting."""
    x, sigmas, targets, labels = cmt_pairs(states, target.detach(), labels)
    return distance(student(x, sigmas, labels, train=True), targets, metric, c, lpips)


class LPIPS(torch.nn.Module):
    """LPIPS-VGG (Zhang et al. 2018) on 32x32 outputs, no resize (as in the official CMT runs).

    Weights are user-supplied: torchvision's VGG16 `features.*` state_dict and the LPIPS v0.1
    linear heads (`lin{0..4}.model.1.weight`), both loaded with weights_only=True."""

    CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision indexing

    def __init__(self, vgg_path, lin_path):
        super().__init__()
        layers, cin = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(torch.nn.MaxPool2d(2))
            else:
                layers += [torch.nn.Conv2d(cin, v, 3, padding=1), torch.nn.ReLU()]
                cin = v
        self.features = torch.nn.Sequential(*layers)
        self.lins = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        vgg = {k: v for k, v in torch.load(vgg_path, map_location="cpu", weights_only=True).items() if k.startswith("features.")}
        self.load_state_dict({**vgg, **{f"lins.{i}.weight": w for i, w in enumerate(self._lin_weights(lin_path))}})
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    @staticmethod
    def _lin_weights(path):
        sd = torch.load(path, map_location="cpu", weights_only=True)
        return [sd[f"lin{i}.model.1.weight"] for i in range(5)]

    def forward(self, pred, target):
        h = torch.cat([pred, target]).sub(self.shift).div(self.scale)
        total = 0
        for i, layer in enumerate(self.features[: self.TAPS[-1] + 1]):
            h = layer(h)
            if i in self.TAPS:
                fa, fb = h.chunk(2)
                fa = fa / (fa.square().sum(1, keepdim=True).sqrt() + 1e-10)
                fb = fb / (fb.square().sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + self.lins[self.TAPS.index(i)]((fa - fb).square()).mean((1, 2, 3))
        return total


def make_lpips(cfg, device):
    if cfg["metric"] != "lpips":
        return None
    paths = (cfg.get("lpips_weights") or "").split(",")
    if len(paths) != 2 or not all(Path(p).is_file() for p in paths):
        raise SystemExit("--metric lpips needs --lpips-weights VGG16.pth,LPIPS_LIN.pth (torchvision vgg16 "
                         "state_dict and LPIPS v0.1 vgg.pth, both on disk); or use --metric l2|huber|cauchy")
    return LPIPS(*paths).to(device)


def ect_t_to_r(t, q, stage=0, k=8.0, b=1.0):
    """ECT's sigmoid map (locuslab/ect training/loss.py, ECMLoss.t_to_r_sigmoid):
    r = clamp(t (1 - q^-(stage+1) (1 + k sigmoid(-b t))), min=0)."""
    return (t * (1 - q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * t)))).clamp(min=0)


# locuslab/ect's plain-ECT schedule halves Delta t on progress-tick boundaries (run_ecm.sh --tick=12.8):
# ct_training_loop.py ends tick 0 after the first iteration, every later tick after
# ceil(12.8 kimg / batch) iterations, and starts stage (ticks done - 1) // --double after each tick.
ECT_TICK_KIMG = 12.8


def ect_stage(it, batch, double, tick_kimg=ECT_TICK_KIMG):
    """Delta t halvings before iteration `it` (0-based) when Delta t halves every `double` ticks (0 = never)."""
    if not double or it == 0:
        return 0
    per_tick = math.ceil(round(tick_kimg * 1000) / batch)
    return (it - 1) // per_tick // double


def ect_loss(net, y, labels, q, stage, c=0.0, P_mean=-1.1, P_std=2.0):
    """ECT loss per sample: |f(y + t eps, t) - sg(f(y + r eps, r))|_2 / (t - r), shared dropout mask."""
    t = (torch.randn(y.shape[0], 1, 1, 1, device=y.device) * P_std + P_mean).exp()
    r = ect_t_to_r(t, q, stage)
    eps = torch.randn_like(y)
    rng = torch.cuda.get_rng_state(y.device) if y.is_cuda else torch.get_rng_state()
    f_t = net(y + t * eps, t, labels, train=True)
    if y.is_cuda:  # same dropout mask in both calls
        torch.cuda.set_rng_state(rng, y.device)
    else:
        torch.set_rng_state(rng)
    with torch.no_grad():
        f_r = torch.where(r > 0, torch.nan_to_num(net(y + r * eps, r, labels, train=True)), y)
    sq = (f_t - f_r).square().flatten(1).sum(1)
    dist = (sq + c ** 2).sqrt() - c if c > 0 else sq.sqrt()
    return dist / (t - r).flatten()

# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_fewstep(net, z, steps=1, mid_t=MID_T["post"], labels=None, generator=None):
    """Student sampling in eval mode, float64 outside the net: x = f(80 z, 80) [, f(x + mid_t z', mid_t)]."""
    ts = [T_MAX, mid_t][:steps]
    x = z.to(torch.float64) * ts[0]
    for i, t in enumerate(ts):
        if i > 0:
            x = x + t * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = net(x, torch.full((x.shape[0],), t, device=x.device), labels, train=False).to(torch.float64)
    return x


@torch.no_grad()
def sample_teacher(teacher, z, labels=None, steps=18):
    """EDM Heun with 18 steps (35 NFE) from 80 z."""
    sigmas = karras_grid(steps).to(z.device)
    return heun_sampler(teacher_denoiser(teacher, labels), z.to(torch.float64) * T_MAX, sigmas)


def to_uint8(x):
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def save_samples(images_u8, path_stem, side=8):
    """A PNG grid of the first side^2 images and an .npz (key 'images', uint8 NHWC) for fid.py."""
    nhwc = images_u8.permute(0, 2, 3, 1).cpu().numpy()
    write_atomic(str(path_stem) + ".npz", lambda f: np.savez(f, images=nhwc))
    n = min(side * side, len(nhwc))
    cols = min(side, n)
    rows = -(-n // cols)
    h, w = nhwc.shape[1:3]
    canvas = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i in range(n):
        canvas[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = nhwc[i]
    grid = Image.fromarray(canvas).resize((cols * max(w, 32), rows * max(h, 32)), Image.NEAREST)
    write_atomic(str(path_stem) + ".png", lambda f: grid.save(f, format="PNG"))

# ----------------------------------------------------------------------------- checkpoints and teachers
def rng_state():
    """Torch (CPU and CUDA), numpy and python RNG states in a weights_only-loadable form."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    # CUDA: this process's device only (set_device ran), so a run may resume where fewer GPUs are visible
    return {"torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [py_version, list(py_state), py_gauss]}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"]:  # checkpoints before 2026-12 hold every visible device's state: take this process's
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda[0] if len(cuda) == 1 else cuda[torch.cuda.current_device()])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


def gather(obj, world_size):
    """Every rank's object on every rank (RNG and data positions differ per rank)."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def write_atomic(path, write):
    """write(file) into a temp file, then os.replace: a crash or SIGKILL mid-write leaves the previous
    file intact, never a half-written one."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def official_kwargs(cfg, label_dim):
    """The EDMPrecond/SongUNet constructor kwargs our config implies, and the official defaults of
    those an EDM pickle may not record (NVlabs/edm training/networks.py), for check_init_kwargs."""
    expected = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                    decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], channel_mult_emb=4,
                    model_channels=cfg["model_channels"], channel_mult=cfg["channel_mult"],
                    num_blocks=cfg["num_blocks"], attn_resolutions=cfg["attn_resolutions"],
                    img_resolution=cfg["resolution"], img_channels=3, label_dim=label_dim)
    defaults = dict(model_type="DhariwalUNet", embedding_type="positional", encoder_type="standard",
                    decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], channel_mult_emb=4,
                    model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=4, attn_resolutions=[16], label_dim=0)
    return expected, defaults


def load_teacher(cfg, device, label_dim):
    """--teacher: 'analytic' (toy data only), an official EDM .pkl (path or URL), or our checkpoint."""
    spec = cfg["teacher"]
    if spec is None:
        raise SystemExit(f"--teacher: stage {cfg['stage']} needs a teacher (PATH|URL|analytic)")
    if spec == "analytic":
        if cfg["data"] != "toy":
            raise SystemExit("--teacher analytic: only the built-in toy data has an exact denoiser (--data toy)")
        return ToyMixture(cfg["resolution"])
    if spec.endswith(".pkl") or "://" in spec:
        try:
            state, init_kwargs, _ = load_official_pkl(spec, cache_dir=CACHE_DIR, sha256=cfg["teacher_sha256"])
            expected, defaults = official_kwargs(cfg, label_dim)
            check_init_kwargs(init_kwargs, expected, source=spec, defaults=defaults)
        except (OSError, ValueError, pickle.UnpicklingError) as e:  # the loader's errors name what is wrong
            raise SystemExit(f"--teacher {spec}: {' '.join(str(e).split())}") from None
        augment_dim = init_kwargs.get("augment_dim", 0)
    else:
        state, augment_dim = read_checkpoint(spec, "--teacher")["ema"], 0
    teacher = build_net(cfg, "edm", label_dim, augment_dim, dropout=0.0)
    copy_by_name(state, teacher, ignore=())  # the teacher takes every tensor, map_augment included
    return teacher.to(device).eval().requires_grad_(False)


def init_weights(net, cfg, teacher):
    """--init: 'teacher' (copy by name; teacher-only keys such as map_augment are skipped),
    'random', or a checkpoint PATH whose EMA weights are copied (e.g. a mid checkpoint for post)."""
    spec = cfg["init"]
    if spec == "random":
        return
    if spec is None:
        raise SystemExit("--init: post-training starts from a mid checkpoint PATH, 'teacher' or 'random'")
    if spec == "teacher":
        teacher = teacher if teacher is not None else load_teacher(cfg, "cpu", net.label_dim)
        if isinstance(teacher, ToyMixture):
            raise SystemExit("--init teacher: the analytic teacher has no weights; use --init random or PATH")
        copy_by_name(teacher.state_dict(), net)
    else:
        try:
            copy_by_name(read_checkpoint(spec, "--init")["ema"], net)
        except ValueError as e:  # another architecture: the list of keys that do not fit
            raise SystemExit(f"--init {spec}: {e}") from None

# >>> pasted: run-folders
# ----------------------------------------------------------------------------- run folders
# An output folder belongs to one run: a training stage starts in a new or empty --outdir, or continues with
# --resume the run whose checkpoint it names (its script, stage and config, differing in RESUME_MAY_CHANGE fields
# alone), and writes nothing before every check has passed. A user's mistake raises SystemExit(message), which the
# entry point prints as one line (exit code 2). Pasted in all three scripts: test_cmt.py keeps the copies identical.


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors take the same one-line form
        raise SystemExit(f"{message} (see --help)")


def read_checkpoint(path, flag):
    """One of this script's checkpoints, loaded with weights_only=True (no code can run)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise SystemExit(f"{flag} {path}: is a folder, expected a checkpoint file") from None
    except pickle.UnpicklingError as e:  # torch's weights-only unpickler: a refused global, or damaged bytes
        if "GLOBAL" in str(e):
            raise SystemExit(f"{flag} {path}: refused: it holds objects other than tensors and plain data "
                             "(nothing in it was run)") from None
        raise SystemExit(f"{flag} {path}: not a readable checkpoint (its pickle is damaged)") from None
    except Exception as e:  # truncated, damaged or not a torch file: the unpickler then fails in any way
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise SystemExit(f"{flag} {path}: not a readable checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or not {"script", "stage", "config", "iter", "ema"} <= ckpt.keys():
        raise SystemExit(f"{flag} {path}: not a checkpoint of {SCRIPT} (no script/stage/config/iter/ema entries)")
    if ckpt["script"] != SCRIPT:
        raise SystemExit(f"{flag} {path}: a checkpoint of {ckpt['script']}, not of {SCRIPT}")
    return ckpt


def run_fields(cfg):
    """The config fields that define a run: all but RESUME_MAY_CHANGE."""
    return {k: v for k, v in cfg.items() if k not in RESUME_MAY_CHANGE}


def config_diff(old, new):
    """'field old -> new' for each run-defining field that differs, on one line ('' if none)."""
    old, new = run_fields(old), run_fields(new)
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "unset") != new.get(k, "unset"))
    return "; ".join(f"{k} {old.get(k, 'unset')!r} -> {new.get(k, 'unset')!r}" for k in keys)


def check_resume(ckpt, cfg, path):
    """Refuse a checkpoint of another stage, network or recipe, naming the fields that differ."""
    if ckpt["stage"] != cfg["stage"]:
        raise SystemExit(f"--resume {path}: a {ckpt['stage']} checkpoint (iteration {ckpt['iter']}); "
                         f"this run is --stage {cfg['stage']}")
    diff = config_diff(ckpt["config"], cfg)
    if diff:
        raise SystemExit(f"--resume {path}: the checkpoint's run differs from this one: {diff} "
                         f"(only {', '.join(sorted(RESUME_MAY_CHANGE))} may change on resume)")


def check_outdir(cfg):
    """Before a byte is written: --outdir must be new or empty, or hold the run that --resume continues.
    Returns the checkpoint to resume from (already checked against cfg), or None for a fresh start."""
    out, resume = Path(cfg["outdir"]), cfg["resume"]
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--outdir {out}: is a file, expected a folder")
    base = next(p for p in (out, *out.parents) if p.exists())
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise SystemExit(f"--outdir {out}: {base} is not a writable folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    latest = out / "ckpt-latest.pt"
    if resume is None and held:
        what = f"{len(held)} files ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''})"
        if latest.is_file():
            c = read_checkpoint(latest, "--outdir")
            what = f"a {c['stage']} run at iteration {c['iter']} of {c['config'].get('iters', '?')}"
        raise SystemExit(f"--outdir {out}: already holds {what}; continue it with --resume auto, "
                         "or choose a new --outdir")
    if resume is None or (resume == "auto" and not latest.exists() and not held):
        return None
    if resume == "auto" and not latest.exists():
        raise SystemExit(f"--resume auto: {out} holds files but no ckpt-latest.pt to continue; "
                         "choose a new --outdir")
    path = latest if resume == "auto" else Path(resume)
    ckpt = read_checkpoint(path, "--resume")
    check_resume(ckpt, cfg, path)
    if held and path.resolve() != latest.resolve():  # continuing a copy into a folder that holds a run
        if not latest.is_file():
            raise SystemExit(f"--outdir {out}: not empty and holds no ckpt-latest.pt; choose a new --outdir")
        check_resume(read_checkpoint(latest, "--outdir"), cfg, latest)
    return ckpt
# <<< pasted: run-folders

# ----------------------------------------------------------------------------- training loop
def init_distributed():
    """torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK): nccl on CUDA, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if (world > 1 or "LOCAL_RANK" in os.environ) and not torch.distributed.is_initialized():  # torchrun, even 1 process
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def rank0_first(fn, rank, world):
    """Rank 0 runs fn first (it may download into the cache), then the other ranks (reading it)."""
    if world > 1 and rank != 0:
        torch.distributed.barrier()
    out = fn()
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    return out


def noise_seed(seed, draw, slot):
    """Seed of the x_T noise of one micro-step's trajectories: a function of (--seed, trajectory draw, slot =
    micro-step x processes + rank) only, so a bulk solve, a solve per micro-step and a resumed run all draw the
    same noise (sony/cmt draws it from the global RNG: the same distribution; ours leaves that to dropout)."""
    return int(np.random.SeedSequence([seed, draw, slot]).generate_state(1, np.uint64)[0] & ((1 << 63) - 1))


class TeacherPairs:
    """CMT training pairs for each micro-step, the teacher's trajectories solved in bulk.

    Micro-step `micro` of iteration `it` takes trajectory draw it // K (--traj-reuse K: each trajectory serves K
    consecutive iterations, cutting the teacher's share of the step cost by K; 1 = official): the next
    `trajectories` images of this rank's stream and noise seeded by noise_seed(seed, draw, slot). One teacher solve
    (cmt_trajectories) covers a chunk of `buffer` // (trajectories per iteration) consecutive draws
    (--traj-buffer; with K > 1 a chunk serves K times as many iterations); a buffer smaller than one
    iteration's trajectories solves each micro-step alone, when it is first used, as sony/cmt (training/loss.py,
    DPMSolverLoss). Either way a micro-step's pairs are those of a solve of its own (to float rounding: only the
    teacher's batch grows) and each trajectory serves exactly its K iterations. state_dict() holds the stream's
    position at the chunk's start and the chunk, so a resumed run re-draws and re-solves exactly that chunk
    (same inputs, same batch: bit-exact) and goes on from it."""

    def __init__(self, teacher, stream, trajectories, steps, reuse, accum, device, buffer, seed, draws):
        self.teacher, self.stream, self.trajs, self.steps, self.device = teacher, stream, trajectories, steps, device
        self.reuse, self.accum, self.seed, self.draws = reuse, accum, seed, draws
        self.chunk = buffer // (accum * trajectories)  # draws per bulk solve; 0: one solve per micro-step
        self.span, self.mark = None, None  # the chunk (first draw, draws, bulk) and the stream at its start
        self.inputs, self.solved = [], {}

    def draw_inputs(self, draw, micro):
        """(y, eps, labels) of micro-step `micro`'s trajectories of draw `draw`, on the device."""
        y, labels = self.stream.next(self.trajs)
        slot = micro * self.stream.world_size + self.stream.rank
        gen = torch.Generator(self.device).manual_seed(noise_seed(self.seed, draw, slot))
        eps = torch.randn(y.shape, generator=gen, device=self.device)
        return to_device(y, self.device), eps, to_device(labels, self.device)

    def start(self, first, n, bulk):
        self.span, self.mark = (first, n, bulk), self.stream.state_dict()
        self.inputs = [self.draw_inputs(draw, micro) for draw in range(first, first + n) for micro in range(self.accum)]
        self.solved = {}

    def solve(self, j):
        """Micro-step j's trajectories: with the whole chunk's in one teacher batch, or alone."""
        parts = range(len(self.inputs)) if self.span[2] else [j]
        y, eps, labels = (None if v[0] is None else torch.cat(v) for v in zip(*(self.inputs[k] for k in parts)))
        with torch.autocast(y.device.type, enabled=False):  # the teacher in float32, also under --bf16
            states, target = cmt_trajectories(self.teacher, y, labels, self.steps, eps)
        for i, k in enumerate(parts):
            rows = slice(i * self.trajs, (i + 1) * self.trajs)
            self.solved[k] = (states[:, rows], target[rows], None if labels is None else labels[rows])

    def get(self, it, micro):
        draw = it // self.reuse
        first, n, _ = self.span or (0, 0, False)
        if not first <= draw < first + n:
            self.start(draw, max(1, min(self.chunk, self.draws - draw)), self.chunk > 0)
        j = (draw - self.span[0]) * self.accum + micro
        if j not in self.solved:
            self.solve(j)
        return self.solved[j]

    def state_dict(self):
        return {"stream": self.stream.state_dict() if self.span is None else self.mark, "chunk": self.span}

    def load_state_dict(self, state):
        self.stream.load_state_dict(state["stream"])
        if state.get("chunk"):  # the chunk it stood in: drawn again from its start, solved again when used
            self.start(*state["chunk"])


class PlainBatches:
    """Data batches for the pre-training and post-training losses."""

    def __init__(self, stream, device):
        self.stream, self.device = stream, device

    def get(self, n):
        y, labels = self.stream.next(n)
        return to_device(y, self.device), to_device(labels, self.device)

    def state_dict(self):
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state):
        self.stream.load_state_dict(state["stream"])


def make_loss(cfg, stream, teacher, batch_gpu, accum, device):
    """The stage's loss as micro_loss(net, it, micro) -> per-row losses, plus its resumable data source."""
    stage = cfg["stage"]
    if stage == "pretrain":
        src = PlainBatches(stream, device)
        return (lambda net, it, micro: edm_loss(net, *src.get(batch_gpu))), src
    if stage == "post":
        src = PlainBatches(stream, device)
        return (lambda net, it, micro: ect_loss(net, *src.get(batch_gpu), q=cfg["ect_q"],
                                                stage=ect_stage(it, cfg["batch"], cfg["ect_double"]), c=cfg["ect_c"])), src
    steps = cfg["teacher_steps"]
    if batch_gpu % steps:
        raise SystemExit(f"--batch-gpu {batch_gpu}: mid-training needs a multiple of --teacher-steps {steps} "
                         f"(each trajectory gives {steps} pairs)")
    lpips = make_lpips(cfg, device)
    reuse = cfg["traj_reuse"]
    src = TeacherPairs(teacher, stream, batch_gpu // steps, steps, reuse, accum, device, cfg["traj_buffer"],
                       cfg["seed"], draws=-(-cfg["iters"] // reuse))
    return (lambda net, it, micro: cmt_loss(net, *src.get(it, micro), metric=cfg["metric"], c=cfg["huber_c"],
                                            lpips=lpips)), src


def accumulate_gradients(ddp, micro_loss, it, accum, bf16=False):
    """Sum of gradients of the mean loss over this rank's `accum` micro-batches; DDP averages over
    ranks, so the result is the gradient of the global-batch mean whatever the split. Gradient
    all-reduce runs only on the last micro-step. Returns (loss sum, rows, non-finite count) on device."""
    total, rows, bad = 0.0, 0, 0
    for micro in range(accum):
        sync = micro == accum - 1 or not isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        with (nullcontext() if sync else ddp.no_sync()):
            device_type = next(ddp.parameters()).device.type
            with torch.autocast(device_type, torch.bfloat16, enabled=bf16):
                loss = micro_loss(ddp, it, micro).float()
            loss.sum().div(loss.shape[0] * accum).backward()
        total = total + loss.detach().sum()
        rows += loss.shape[0]
        bad = bad + (~torch.isfinite(loss.detach().sum())).int()
    return total, rows, bad


def apply_update(net, ema, optimizer, lr, ema_beta):
    """nan_to_num the gradients (as sony/cmt training/cmt_training_loop.py), step, EMA
    p_ema = lerp(p, p_ema, beta); returns the grad norm."""
    params = [p for p in net.parameters() if p.grad is not None]
    for p in params:
        torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    with torch.no_grad():  # multi-tensor kernels, not one per parameter
        ema_params = list(ema.parameters())
        torch._foreach_copy_(ema_params, torch._foreach_lerp(list(net.parameters()), ema_params, ema_beta))
    return grad_norm


def make_optimizer(cfg, net, device):
    kind = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[cfg["optimizer"]]
    fused = dict(fused=True) if device.type == "cuda" and kind is torch.optim.Adam else {}
    return kind(net.parameters(), lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, **fused)


def format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def load_checkpoint(ckpt, net, ema, optimizer, source, cfg, rank, world):
    """Weights and optimiser of a checkpoint, and, when it was written by as many processes as this run has,
    each rank's RNG and data position (a bit-exact continuation); returns (iteration, non-finite count)."""
    net.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    for p, state in optimizer.state.items():  # Adam's moments in their parameter's memory layout, which
        for k, v in state.items():           # --channels-last may change on resume (CUDA's fused Adam needs it)
            if torch.is_tensor(v) and v.shape == p.shape:
                state[k] = torch.empty_like(p).copy_(v)
    if len(ckpt["rng"]) == world:
        source.load_state_dict(ckpt["data_state"][rank])
        set_rng_state(ckpt["rng"][rank])
    elif rank == 0:
        print(f"warning: the checkpoint was written by {len(ckpt['rng'])} processes, this run has {world}: "
              "weights and optimizer continue, data order and noise restart from --seed")
    if rank == 0:
        print(f"resumed from {'ckpt-latest.pt' if cfg['resume'] == 'auto' else cfg['resume']} at iteration {ckpt['iter']}")
    return ckpt["iter"], ckpt["data_state"][0]["nonfinite"]


def write_checkpoint(outdir, net, ema, optimizer, source, it, nonfinite, cfg, rank, world, snapshot):
    """ckpt-latest.pt and, if `snapshot`, the kept ckpt-NNNNNNN.pt, with every rank's RNG and data position
    (gathered: every rank must call this)."""
    data_states = gather({"nonfinite": nonfinite, **source.state_dict()}, world)
    rngs = gather(rng_state(), world)
    if rank == 0:
        ckpt = {"model": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "iter": it, "rng": rngs, "data_state": data_states, "config": cfg, "stage": cfg["stage"],
                "script": SCRIPT}
        write_atomic(outdir / "ckpt-latest.pt", lambda f: torch.save(ckpt, f))
        if snapshot:
            write_atomic(outdir / f"ckpt-{it:07d}.pt", lambda f: torch.save(ckpt, f))


def count_nonfinite(nonfinite, cfg):
    """One more step with a non-finite loss; abort past --max-nonfinite. Returns the new count."""
    nonfinite += 1
    if nonfinite > cfg["max_nonfinite"]:
        raise SystemExit(f"[{cfg['stage']}] aborting: {nonfinite} steps with a non-finite loss "
                         f"(--max-nonfinite {cfg['max_nonfinite']}); lower --lr or check the data")
    return nonfinite


def log_window(window, done, lr, nonfinite, t_start, cfg, stats, device, rank, world):
    """The stats.jsonl row and progress line of the steps since the last one (loss averaged over ranks), then
    a new window. `window`: its start (t, it), summed per-row loss and rows, summed grad norm and steps taken."""
    iters = cfg["iters"]
    sec = time.time() - window["t"]
    n_it = done - window["it"]
    # nan: every step of the window was non-finite
    loss = float(window["loss"]) / window["rows"] if window["rows"] else float("nan")
    if world > 1:
        loss_t = torch.tensor([loss], device=device)
        torch.distributed.all_reduce(loss_t)
        loss = float(loss_t) / world
    row = dict(iter=done, kimg=done * cfg["batch"] / 1e3, loss=loss,
               grad_norm=float(window["gnorm"]) / max(window["steps"], 1), lr=lr, it_per_s=n_it / sec,
               img_per_s=n_it * cfg["batch"] / sec, nonfinite=nonfinite, sec=time.time() - t_start)
    if rank == 0:
        eta = (iters - done) / row["it_per_s"]
        print(f"[{cfg['stage']}] it {done}/{iters} ({100 * done / iters:.1f}%) loss {loss:.4f} "
              f"gnorm {row['grad_norm']:.2f} | {row['it_per_s']:.1f} it/s {row['img_per_s']:.0f} img/s | "
              f"lr {lr:.1e} nonfinite {nonfinite} | ETA {format_duration(eta)}", flush=True)
        stats.write(json.dumps(row) + "\n")
        stats.flush()
    window.update(loss=0.0, rows=0, gnorm=0.0, steps=0, t=time.time(), it=done)


def log_fid(ema, cfg, done, stats, label_dim, device, rank, world):
    """FID of the EMA model (students: 1- and 2-step, as officially) into the log and stats.jsonl."""
    fids = {}
    for steps in ((1, 2) if ema.kind == "ecm" else (None,)):
        key = "fid" if steps is None else f"fid_{steps}step"
        fids[key] = evaluate_fid(ema, cfg, label_dim, device, rank, world, steps)
    if rank == 0:
        print(f"[{cfg['stage']}] it {done} " + " ".join(f"{k} {v:.3f}" for k, v in fids.items()), flush=True)
        stats.write(json.dumps(dict(iter=done, **fids)) + "\n")
        stats.flush()


def train(cfg):
    """One loop for every training stage: pretrain (EDM), mid (CMT), post (ECT)."""
    rank, world, device = init_distributed()
    outdir = Path(cfg["outdir"])
    ckpt = check_outdir(cfg)  # None: a fresh start
    if cfg["fid_ref"]:
        read_fid_ref(cfg["fid_ref"])
    torch.manual_seed(cfg["seed"] * world + rank)  # distinct per rank, derived from --seed
    np.random.seed((cfg["seed"] * world + rank) % (1 << 31))
    random.seed(cfg["seed"] * world + rank)

    batch_gpu = cfg["batch_gpu"] or cfg["batch"] // world
    accum = cfg["batch"] / (batch_gpu * world)
    if accum != int(accum) or accum < 1:
        raise SystemExit(f"--batch {cfg['batch']} is not a multiple of --batch-gpu {batch_gpu} x {world} processes")
    accum = int(accum)

    stream = DataStream(rank0_first(lambda: open_data(cfg["data"]), rank, world), cfg["seed"], rank, world, cfg["cond"])
    if stream.shape != (3, cfg["resolution"], cfg["resolution"]):
        raise SystemExit(f"--data: images are {stream.shape}, preset {cfg['preset']!r} expects 3x{cfg['resolution']}^2")
    teacher = None
    if cfg["stage"] == "mid":
        teacher = rank0_first(lambda: load_teacher(cfg, device, stream.label_dim), rank, world)
    net = build_net(cfg, "edm" if cfg["stage"] == "pretrain" else "ecm", stream.label_dim)
    if ckpt is None:  # a resumed run takes every weight from its checkpoint
        init_weights(net, cfg, teacher)
    net.to(device).train().requires_grad_(True)
    ema = copy.deepcopy(net).requires_grad_(False)
    if cfg["channels_last"]:
        net.to(memory_format=torch.channels_last)
        ema.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, net, device)
    micro_loss, source = make_loss(cfg, stream, teacher, batch_gpu, accum, device)

    start, nonfinite = 0, 0
    if ckpt is not None:
        start, nonfinite = load_checkpoint(ckpt, net, ema, optimizer, source, cfg, rank, world)
    if world > 1:
        torch.distributed.barrier()  # every rank has checked --outdir before rank 0 writes into it
    if rank == 0:
        outdir.mkdir(parents=True, exist_ok=True)
        write_atomic(outdir / "config.json", lambda f: f.write(json.dumps(cfg, indent=2).encode()))

    step_net = torch.compile(net) if cfg["compile"] else net  # checkpoints save `net`: no _orig_mod. prefix
    if world > 1:
        step_net = torch.nn.parallel.DistributedDataParallel(step_net)
    if rank == 0:
        n_params = sum(p.numel() for p in net.parameters())
        print(f"[{cfg['stage']}] {n_params:,} parameters | batch {cfg['batch']} = {batch_gpu} x {accum} accumulation "
              f"x {world} processes | {cfg['iters']} iterations = {cfg['mimg']:.4g} Mimg | device {device}")

    iters = cfg["iters"]
    t_start = time.time()
    window = dict(loss=0.0, rows=0, gnorm=0.0, steps=0, t=t_start, it=start)
    stats = open(outdir / "stats.jsonl", "a") if rank == 0 else None
    for it in range(start, iters):
        lr = cfg["lr"] * (1 - it / iters) if cfg["lr_decay"] == "linear" else cfg["lr"]  # a function of `it`: no state
        optimizer.zero_grad(set_to_none=True)
        loss_sum, rows, bad = accumulate_gradients(step_net, micro_loss, it, accum, cfg["bf16"])
        if world > 1:
            torch.distributed.all_reduce(bad)
        # Non-finite losses are counted (one flag read per step: the only host-device sync outside logging).
        # As sony/cmt's training loops, the step is taken anyway with nan_to_num'd gradients; --skip-nonfinite
        # drops it instead.
        finite = int(bad) == 0
        if not finite:
            nonfinite = count_nonfinite(nonfinite, cfg)
        if finite or not cfg["skip_nonfinite"]:
            window["gnorm"] = window["gnorm"] + apply_update(net, ema, optimizer, lr, cfg["ema"])
            window["steps"] += 1
        if finite:
            window["loss"], window["rows"] = window["loss"] + loss_sum, window["rows"] + rows

        done = it + 1
        if done % cfg["log_every"] == 0 or done == iters:
            log_window(window, done, lr, nonfinite, t_start, cfg, stats, device, rank, world)
        if cfg["ckpt_every"] and done % cfg["ckpt_every"] == 0 or done == iters:
            snapshot = done == iters or (cfg["snap_every"] and done % cfg["snap_every"] == 0)
            write_checkpoint(outdir, net, ema, optimizer, source, done, nonfinite, cfg, rank, world, snapshot)
        if rank == 0 and cfg["grid"] and (done == iters or cfg["sample_every"] and done % cfg["sample_every"] == 0):
            sample_grid(ema, cfg, outdir / f"samples-{done:07d}", stream.label_dim, device)
        if cfg["fid_ref"] and (done == iters or cfg["fid_every"] and done % cfg["fid_every"] == 0):
            log_fid(ema, cfg, done, stats, stream.label_dim, device, rank, world)
    if stats is not None:
        stats.close()
    return net, ema

# ----------------------------------------------------------------------------- evaluation
def generate(net, n, cfg, label_dim, device, seed, steps):
    """n images in [-1, 1] (float64) from seed: Heun (35 NFE) for an EDM net, 1/2-step for a student."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, 3, cfg["resolution"], cfg["resolution"]), generator=g, dtype=torch.float64).to(device)
    labels = None
    if label_dim:
        labels = F.one_hot(torch.randint(label_dim, (n,), generator=g), label_dim).float().to(device)
    if isinstance(net, ToyMixture) or net.kind == "edm":
        return sample_teacher(net, z, labels)
    return sample_fewstep(net, z, steps, cfg["mid_t"], labels, generator=g)


def sample_grid(net, cfg, stem, label_dim, device):
    """The --grid images of a training run's samples-*.png (1- and 2-step for a student), from --seed."""
    n = cfg["grid"]
    for steps in ((1, 2) if net.kind == "ecm" else (None,)):
        suffix = "" if steps in (None, 1) else f"-{steps}step"
        x = generate(net, n, cfg, label_dim, device, seed=cfg["seed"], steps=steps)
        save_samples(to_uint8(x), Path(str(stem) + suffix), side=math.ceil(math.sqrt(n)))


def evaluate_fid(net, cfg, label_dim, device, rank, world, steps):
    """FID of --fid-num images (Heun for steps=None, else 1-/2-step) against --fid-ref (an .npz with
    mu, sigma) through fid.py, the images sharded over ranks."""
    import fid  # evaluation only, imported lazily so training never depends on it
    per_rank, bs = -(-cfg["fid_num"] // world), 250

    def batches():
        for i in range(0, per_rank, bs):
            x = generate(net, min(bs, per_rank - i), cfg, label_dim, device, seed=cfg["seed"] * 1000003 + rank * per_rank + i,
                         steps=steps)
            yield to_uint8(x)
    mu, sigma, _ = fid.inception_stats(batches(), device=device, num=per_rank)
    mu_ref, sigma_ref = read_fid_ref(cfg["fid_ref"])
    return float(fid.frechet_distance(mu, sigma, mu_ref, sigma_ref))


def read_fid_ref(path):
    """--fid-ref statistics (mu, sigma) through fid.py; also read before the first step, with the Inception
    weights found (or downloaded) then, so that a bad file or an offline machine stops the run at once instead
    of after training."""
    import fid
    try:
        ref = fid.load_ref(path)
        fid.resolve_weights()
    except ValueError as e:
        raise SystemExit(f"--fid-ref {e}") from None
    except (OSError, RuntimeError) as e:
        raise SystemExit(f"--fid-ref: FID needs the Inception weights: {' '.join(str(e).split())}") from None
    return ref


@torch.no_grad()
def exact_ode_solution(toy, z, steps=256):
    """The toy mixture's PF-ODE solution from 80 z down to s = 0.002, with its exact denoiser and
    256 third-order steps (a reference: it differs from the 1024-step solution by 1e-10 in MSE)."""
    return dpm_solver_pp(lambda x, s: toy.denoise(x, s), z.double() * T_MAX, logsnr_grid(steps))[-1]


def pixel_fd(x, y):
    """Frechet distance between raw pixel vectors (no Inception), via fid.py's float64 statistics."""
    import fid
    mu1, s1 = fid.mean_cov(x.flatten(1).double().cpu().numpy())
    mu2, s2 = fid.mean_cov(y.flatten(1).double().cpu().numpy())
    return float(fid.frechet_distance(mu1, s1, mu2, s2))


class ToyQuality:
    """Quality on the toy mixture: flow-map error (MSE per element against the exact ODE solution from
    the same noise) and pixel FD against fresh toy samples, for a teacher (Heun) or a student (1, 2 steps)."""

    def __init__(self, cfg, n, seed=123):
        self.mid_t, self.toy, self.seed = cfg["mid_t"], ToyMixture(cfg["resolution"]), seed
        self.z = torch.randn((n, *self.toy.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.exact = exact_ode_solution(self.toy, self.z)
        self.fresh = self.toy.sample(n, torch.Generator().manual_seed(seed + 1)).double()

    def sample(self, net, steps=None):
        """The model's samples from self.z: Heun for a teacher (steps None), else its `steps`-step flow map."""
        if steps is None:
            return sample_teacher(net, self.z)
        return sample_fewstep(net.eval(), self.z, steps, self.mid_t, generator=torch.Generator().manual_seed(self.seed + 3))

    def row(self, x):
        return float((x - self.exact).square().mean()), pixel_fd(x, self.fresh)

    def teacher(self, net):
        return self.row(self.sample(net))

    def __call__(self, student):
        """{err1, fd1, err2, fd2} of a student's 1- and 2-step samples."""
        out = {}
        for steps in (1, 2):
            out[f"err{steps}"], out[f"fd{steps}"] = self.row(self.sample(student, steps))
        return out


def quality_table(models, cfg, n, seed=123, picture=None, k=12):
    """Rows (name, net, wall s) -> the printed table. The 'data' row is FD's finite-sample floor. With
    `picture` (a path) also the comparison PNG: the first k samples of every row, the same noise throughout."""
    quality = ToyQuality(cfg, n, seed)
    floor = pixel_fd(quality.toy.sample(n, torch.Generator().manual_seed(seed + 2)), quality.fresh)
    rows = [("data (FD floor)", "-", float("nan"), floor, 0.0)]
    tiles = [("exact flow map", quality.exact[:k])]
    for name, net, wall in models:
        is_teacher = isinstance(net, ToyMixture) or net.kind == "edm"
        for steps in ((None,) if is_teacher else (1, 2)):
            x = quality.sample(net, steps)
            rows.append((name, "35 (Heun)" if is_teacher else str(steps), *quality.row(x), wall))
            tiles.append((name if is_teacher else f"{name}, {steps} step{'s' * (steps > 1)}", x[:k]))
    lines = [f"{'model':<26} {'steps':>10} {'flow-map err':>13} {'pixel FD':>10} {'wall time':>10}"]
    for name, steps, err, fd, wall in rows:
        lines.append(f"{name:<26} {steps:>10} {err:>13.5f} {fd:>10.4f} {wall:>9.1f}s")
    if picture:
        save_comparison(tiles, picture)
    return "\n".join(lines), rows


def save_comparison(rows, path, scale=8, gap=4):
    """One labelled row of tiles per (name, x [k, 3, H, W] in [-1, 1]), each enlarged `scale` times."""
    import PIL.ImageDraw
    k, _, h, w = rows[0][1].shape
    label_w, th, tw = 190, h * scale, w * scale
    canvas = Image.new("RGB", (label_w + k * (tw + gap), len(rows) * (th + gap)), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for i, (name, x) in enumerate(rows):
        img = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
        for j in range(k):
            canvas.paste(Image.fromarray(img[j]).resize((tw, th), Image.NEAREST), (label_w + j * (tw + gap), i * (th + gap)))
        draw.text((6, i * (th + gap) + th // 2 - 6), name, fill="black")
    write_atomic(path, lambda f: canvas.save(f, format="PNG"))


def run_tiny(args):
    """--preset tiny without --stage: teacher -> mid -> post (+ baselines) -> quality table."""
    root = Path(args.outdir or "runs/tiny")
    if args.data not in (None, "toy"):
        raise SystemExit("--data: the tiny pipeline runs on the built-in toy data (its table needs the exact ODE)")
    if args.resume not in (None, "auto"):
        raise SystemExit("--resume: the tiny pipeline continues with --resume auto (each stage from its own folder)")
    if args.resume is None:
        check_outdir(dict(outdir=str(root), resume=None))  # a fresh demo needs a new or empty folder
    resolve_config(argparse.Namespace(**{**vars(args), "stage": "post"}))  # a refused post recipe: before training
    analytic = args.teacher == "analytic"

    def stage(name, sub, **over):
        a = argparse.Namespace(**{**vars(args), "stage": name, "outdir": str(root / sub), **over})
        cfg = resolve_config(a)
        t0 = time.time()
        _, ema = train(cfg)
        return ema.eval().cpu(), time.time() - t0, cfg  # the quality table runs on the CPU

    models = []
    if analytic:
        teacher_path = "analytic"
        models.append(("teacher (analytic)", ToyMixture(PRESETS["tiny"]["resolution"]), 0.0))
    elif args.teacher is not None:  # a teacher checkpoint from an earlier run
        teacher_path = args.teacher
        models.append(("teacher (given)", load_teacher(resolve_config(argparse.Namespace(
            **{**vars(args), "stage": "mid"})), "cpu", 0), 0.0))
    else:
        ema, wall, _ = stage("pretrain", "teacher", init="random", teacher=None)
        teacher_path = str(root / "teacher" / "ckpt-latest.pt")
        models.append(("teacher (EDM)", ema, wall))
    ema, wall, _ = stage("mid", "mid", teacher=teacher_path, init="random" if analytic else "teacher")
    models.append(("mid (CMT)", ema, wall))
    ema, wall, cfg = stage("post", "post", init=str(root / "mid" / "ckpt-latest.pt"), teacher=None)
    models.append(("post (CMT -> ECT)", ema, wall))
    if args.baselines:
        if not analytic:
            ema, wall, _ = stage("post", "post-from-teacher", init="teacher", teacher=teacher_path)
            models.append(("baseline ECT, teacher init", ema, wall))
        ema, wall, _ = stage("post", "post-from-random", init="random", teacher=None)
        models.append(("baseline ECT, random init", ema, wall))
    table, _ = quality_table(models, cfg, args.eval_num, picture=root / "comparison.png")
    print("\nQuality on the toy mixture (flow-map err: MSE per element vs the exact ODE solution from the "
          "same noise; pixel FD vs fresh data; post rows share one budget):\n" + table)
    write_atomic(root / "quality.txt", lambda f: f.write((table + "\n").encode()))
    print(f"wrote {root / 'quality.txt'} and {root / 'comparison.png'} (the same noise in every row)")
    return table

# ----------------------------------------------------------------------------- sampling stage
def run_sample(cfg):
    """--stage sample: --init PATH (checkpoint of any stage) or --init teacher -> PNG grid, .npz, FID."""
    rank, world, device = init_distributed()
    outdir = Path(cfg["outdir"])
    check_outdir(dict(cfg, resume=None))  # samples never overwrite an earlier run's files
    if cfg["fid_ref"]:
        read_fid_ref(cfg["fid_ref"])
    label_dim = 0
    if cfg["init"] == "teacher":
        net = load_teacher(cfg, device, label_dim)
    else:
        if cfg["init"] in (None, "random"):
            raise SystemExit("--init: --stage sample needs a checkpoint PATH (ckpt-*.pt) or 'teacher'")
        ckpt = read_checkpoint(cfg["init"], "--init")
        cfg = dict(cfg, resolution=ckpt["config"]["resolution"])  # the network as trained, whatever --preset
        if cfg["mid_t"] is None:
            cfg["mid_t"] = MID_T.get(ckpt["stage"])
        label_dim = ckpt["ema"]["model.map_label.weight"].shape[1] if "model.map_label.weight" in ckpt["ema"] else 0
        net = build_net(ckpt["config"], "edm" if ckpt["stage"] == "pretrain" else "ecm", label_dim, dropout=0.0)
        net.load_state_dict(ckpt["ema"])
        net = net.to(device).eval()
    if world > 1:
        torch.distributed.barrier()  # every rank has checked --outdir before rank 0 writes into it
    if rank == 0:
        outdir.mkdir(parents=True, exist_ok=True)
    for steps in ((None,) if isinstance(net, ToyMixture) or net.kind == "edm" else cfg["sample_steps"]):
        tag = "heun" if steps is None else f"{steps}step"
        if rank == 0:
            xs = [generate(net, min(250, cfg["num"] - i), cfg, label_dim, device, cfg["seed"] + i, steps)
                  for i in range(0, cfg["num"], 250)]
            save_samples(to_uint8(torch.cat(xs)), outdir / f"samples-{tag}")
            print(f"wrote {outdir}/samples-{tag}.png and .npz ({cfg['num']} images)")
        if cfg["fid_ref"]:
            fid = evaluate_fid(net, cfg, label_dim, device, rank, world, steps)
            if rank == 0:
                print(f"FID ({tag}, {cfg['fid_num']} images): {fid:.3f}")

# ----------------------------------------------------------------------------- entry point
def int_at_least(low):
    """argparse type: an integer >= low, so --batch 0 is one clear line instead of a ZeroDivisionError."""
    def parse(text):
        try:
            if int(text) >= low:
                return int(text)
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return parse


def step_counts(most=None):
    """argparse type: comma-separated step counts from 1 to `most` (None: any positive count), e.g. 1,2."""
    def parse(text):
        try:
            steps = [int(v) for v in text.split(",")]
        except ValueError:
            steps = []
        if not steps or min(steps) < 1 or (most is not None and max(steps) > most):
            what = "positive step counts" if most is None else f"step counts from 1 to {most}"
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} such as 1,2, got {text!r}")
        return steps
    return parse


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Flags left unset take the preset's value (cifar10 values shown).")
    a = p.add_argument
    a("--stage", choices=["pretrain", "mid", "post", "sample"],
      help="what to run; omitted with --preset tiny: the whole CPU demo pipeline")
    a("--preset", default="cifar10", choices=list(PRESETS), help=f"recipe: {', '.join(PRESETS)} (default: cifar10, the paper's)")
    a("--outdir", help="output folder (default: runs/<stage>, runs/tiny for the demo)")
    a("--data", help="'cifar10' (downloaded), a CIFAR-10 .tar.gz, an EDM zip/folder of PNGs, or 'toy' (default: preset)")
    a("--cond", action="store_true", help="class-conditional: labels from dataset.json / CIFAR (default: off)")
    a("--teacher", help="EDM .pkl path or URL, our pretrain checkpoint, or 'analytic' for toy data "
                        "(default: EDM's edm-cifar10-32x32-uncond-vp.pkl)")
    a("--teacher-sha256", help="expected SHA-256 of a --teacher URL's download (NVIDIA publishes none; the "
                               "restricted unpickler runs no code either way) (default: no check)")
    a("--init", help="student weights: PATH (checkpoint EMA), 'teacher' or 'random' (default: mid 'teacher', "
                     "pretrain 'random', post: required)")
    a("--resume", help="'auto' (= outdir/ckpt-latest.pt if present) or a checkpoint PATH (default: none)")
    a("--batch", type=int_at_least(1), help="global batch in images (default: 128 mid/post, 512 pretrain)")
    a("--batch-gpu", type=int_at_least(1), help="per-process micro-batch; accumulation = batch / (batch_gpu x processes) "
                                    "(default: batch / processes)")
    a("--iters", type=int_at_least(1), help="training iterations (default: from --mimg)")
    a("--mimg", type=float, help="training length in millions of images (default: 38.4 mid, 12.8 post, 200 pretrain)")
    a("--lr", type=float, help="peak learning rate (default: 2e-4 mid, 1e-4 post, 1e-3 pretrain)")
    a("--lr-decay", choices=["linear", "constant"],
      help="learning rate over the run: linear to 0 (sony/cmt) or constant (locuslab/ect's plain ECT, whose decay line "
           "is commented out) (default: constant with --ect-double, else linear)")
    a("--ema", type=float, help="EMA decay per iteration (default: 0.999 mid, 0.9999 post)")
    a("--optimizer", choices=["adam", "radam"], help="(default: radam mid/post, adam pretrain)")
    a("--dropout", type=float, help="dropout probability (default: 0.2 mid/post, 0.13 pretrain)")
    a("--seed", type=int_at_least(0), default=0, help="global seed; ranks use seed x processes + rank (default: 0)")
    a("--metric", choices=["l2", "huber", "cauchy", "lpips"], help="CMT distance (default: lpips; tiny: l2)")
    a("--lpips-weights", help="VGG16.pth,LPIPS_LIN.pth: torchvision vgg16 state_dict and LPIPS v0.1 vgg.pth")
    a("--huber-c", type=float, help="c of huber/cauchy (default: 0.00054 sqrt(pixels x channels))")
    a("--teacher-steps", type=int_at_least(1), default=TEACHER_STEPS,
      help="mid: teacher DPM-Solver++ steps per trajectory = CMT pairs per trajectory (default: 16, official)")
    a("--traj-reuse", type=int_at_least(1), default=1, help="iterations each teacher trajectory serves (default: 1, official)")
    a("--traj-buffer", type=int_at_least(0), default=128,
      help="mid: teacher trajectories per process solved in one batch, rounded down to whole iterations; fewer than "
           "one iteration's: one solve per micro-step, as sony/cmt (same pairs either way) (default: 128)")
    a("--mid-t", type=float, help="noise level of the 2-step sampler's second step (default: 0.821 post, "
                                  "0.77569 mid, as sony/cmt; --stage sample: that of the checkpoint's stage)")
    a("--ect-q", type=float, help="ECT q, Delta t = 1/q at stage 0 (default: 4096 CIFAR, 512 FFHQ, 1024 AFHQ)")
    a("--ect-double", type=int_at_least(0), default=0,
      help="plain ECT: halve Delta t every N ticks of 12.8 kimg, as locuslab/ect's --double (default: 0 = fixed q)")
    a("--ect-c", type=float, default=0.0, help="ECT pseudo-Huber c (default: 0 = L2)")
    a("--fid-ref", help="reference statistics .npz (mu, sigma) for FID via fid.py (default: no FID)")
    a("--fid-every", type=int_at_least(0), default=0, help="FID every N iterations, 0 = only at the end (default: 0)")
    a("--fid-num", type=int_at_least(1), default=50000, help="images per FID (default: 50000)")
    a("--num", type=int_at_least(1), default=64, help="--stage sample: images to write (default: 64)")
    a("--sample-steps", type=step_counts(2), default=[1, 2],
      help="--stage sample: comma-separated student step counts, 1 or 2 (default: 1,2)")
    a("--bf16", action=argparse.BooleanOptionalAction, default=False, help="bfloat16 autocast (default: off: fp32)")
    a("--tf32", action=argparse.BooleanOptionalAction, default=False,
      help="TF32 matmuls and cuDNN convolutions on CUDA (default: off: fp32)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=False,
      help="channels_last memory format (default: off)")
    a("--compile", action=argparse.BooleanOptionalAction, default=False,
      help="torch.compile the training network (default: off)")
    a("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=False,
      help="let cuDNN time its convolution algorithms and keep the fastest (sony/cmt's --bench, on there); a resume "
           "is then exact only to round-off (default: off)")
    a("--log-every", type=int_at_least(1), help="iterations per progress line / stats.jsonl row (default: 100)")
    a("--ckpt-every", type=int_at_least(0), help="iterations per ckpt-latest.pt, 0 = end only (default: 5000)")
    a("--snap-every", type=int_at_least(0), help="iterations per ckpt-NNNNNNN.pt snapshot, 0 = end only (default: 50000)")
    a("--sample-every", type=int_at_least(0), help="iterations per samples-NNNNNNN.png grid, 0 = end only (default: 10000)")
    a("--grid", type=int_at_least(0), default=64, help="images in each samples-NNNNNNN.png grid (and .npz), 0 = none: "
                                                     "a teacher's grid costs 35 network passes per image (default: 64)")
    a("--max-nonfinite", type=int_at_least(0), default=100, help="abort after this many steps with a non-finite "
                                                                    "loss (default: 100)")
    a("--skip-nonfinite", action="store_true", help="drop a step whose loss is non-finite (default: off: step with "
                                                    "nan_to_num'd gradients, as sony/cmt)")
    a("--eval-num", type=int_at_least(1), default=1000, help="tiny demo: samples per quality-table row (default: 1000)")
    a("--baselines", type=int, default=1, help="tiny demo: also post-train from teacher/random init (default: 1)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Both ways: PyTorch's own default lets cuDNN convolutions run in TF32, which an fp32 run must not.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    if args.stage is None:
        if args.preset != "tiny":
            raise SystemExit("--stage is required (only --preset tiny runs the whole pipeline)")
        run_tiny(args)
    else:
        args.outdir = args.outdir or f"runs/{args.stage}"
        cfg = resolve_config(args)
        (run_sample if args.stage == "sample" else train)(cfg)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # a rank that tears gloo down while a peer is still talking aborts
        torch.distributed.destroy_process_group()


# ============================================================================= appendix
# Plumbing pasted verbatim between the scripts so that each one stays self-contained: here the official
# .pkl loader (also in cmt_imagenet.py). It stands after the method because a reader needs none of it to
# follow the method. test_cmt.py checks that the text between the marker lines is the same in every copy:
# edit all copies alike.


# >>> pasted: official-pkl
# ----------------------------------------------------------------------------- official checkpoints
# EDM / EDM2 publish their networks as pickles (the format of NVlabs/edm torch_utils/persistence.py) in
# which every network object is the call torch_utils.persistence._reconstruct_persistent_obj(meta),
# meta = {type, version, module_src, class_name, state}. A plain pickle.load would exec `module_src`
# (arbitrary code from the file). Our unpickler answers only the globals below; the persistent objects
# become inert _PklObject records (class name + state dict) and `module_src` is dropped unread.

try:  # numpy >= 2 writes numpy._core.* into pickles, numpy 1.x writes numpy.core.*; accept both
    from numpy._core import multiarray as _pkl_np_multiarray
except ImportError:
    from numpy.core import multiarray as _pkl_np_multiarray


class _PklObject:
    """An unpickled EDM object: its class name and its __dict__, nothing callable."""
    class_name, state = None, {}  # class defaults for a container pickled without state

    def __init__(self, class_name=None, state=None):
        self.class_name, self.state = class_name, dict(state or {})

    def __setstate__(self, state):  # pickle's BUILD for plain torch containers (ModuleDict)
        self.state = dict(state or {})


class _PklModuleDict(_PklObject):
    class_name = "ModuleDict"


class _PklEasyDict(dict):
    """Stands in for dnnlib.util.EasyDict (a dict with attribute access) at load time."""


class PickleRefusedError(pickle.UnpicklingError):
    pass


def _pkl_reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("malformed torch_utils.persistence record (want type='class' and a state dict)")
    return _PklObject(meta.get("class_name"), meta["state"])  # meta["module_src"] is never executed


def _pkl_load_storage(blob):
    # Each storage is a nested legacy torch.save blob: the weights-only loader reads it safely.
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), str(e))
        raise PickleRefusedError(f"a tensor storage blob was refused by torch.load(weights_only=True): {why}") from None


def _pkl_rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, collections.OrderedDict())


def _pkl_rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data  # we only want the values; hooks are dropped


# Every global an official EDM/EDM2 network pickle names (see the tests). Nothing else.
_PKL_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _pkl_reconstruct_persistent_obj,
    ("torch.storage", "_load_from_bytes"): _pkl_load_storage,
    ("torch._utils", "_rebuild_tensor_v2"): _pkl_rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _pkl_rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,  # module dicts (torch < 2) and tensor hooks
    ("torch.nn.modules.container", "ModuleDict"): _PklModuleDict,  # enc/dec of SongUNet, DhariwalUNet, EDM2 UNet
    ("dnnlib.util", "EasyDict"): _PklEasyDict,  # EDM2's top level and dataset_kwargs
    ("numpy", "ndarray"): np.ndarray,  # EDM2's StabilityVAEEncoder keeps numpy scale/bias arrays,
    ("numpy", "dtype"): np.dtype,  # EDM keeps numpy scalars (UNetBlock.skip_scale = np.sqrt(0.5), ...)
    **{(m, n): getattr(_pkl_np_multiarray, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
       for n in ("_reconstruct", "scalar")},
}


class _PklUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        obj = _PKL_ALLOWED.get((module, name))
        if obj is None:
            raise PickleRefusedError(f"refusing to load global '{module}.{name}': it is not on the allowlist of "
                                     "objects an official EDM/EDM2 network pickle needs")
        return obj


def _pkl_unpickle(path):
    """Restricted unpickling of a local .pkl file: returns the top-level object with _PklObject records."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"official checkpoint not found: {path} (pass --teacher PATH|URL)")
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head.startswith(b"PK\x03\x04"):
            raise ValueError(f"{path} is a zip archive (a torch.save checkpoint?), not an EDM/EDM2 .pkl pickle")
        try:
            return _PklUnpickler(f).load()
        except PickleRefusedError as e:
            raise PickleRefusedError(f"{path}: {e}") from None
        except Exception as e:  # garbage drives the pickle machine into any error type; all mean the same
            raise ValueError(f"{path} is not a readable EDM/EDM2 pickle: {type(e).__name__}: {e}") from e


def _pkl_flatten(obj, prefix, out, where):
    """module.state_dict() order: own parameters, persistent buffers, then children, recursively."""
    if not isinstance(obj, _PklObject) or not isinstance(obj.state.get("_parameters"), dict):
        what = obj.class_name if isinstance(obj, _PklObject) else type(obj).__name__
        raise ValueError(f"{where}: {prefix or 'the object'} is not a torch module (it is a {what})")
    st = obj.state
    skip = st.get("_non_persistent_buffers_set") or set()
    items = list(st["_parameters"].items())
    items += [(k, v) for k, v in (st.get("_buffers") or {}).items() if k not in skip]
    for name, value in items:
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: '{prefix}{name}' is a {type(value).__name__}, not a tensor")
        value = value.detach()  # a fresh tensor object: nothing the pickle attached to the original comes along
        out[prefix + name] = value.float() if value.is_floating_point() else value  # EDM2 stores float16
    for name, child in (st.get("_modules") or {}).items():
        if child is not None:
            _pkl_flatten(child, f"{prefix}{name}.", out, where)
    return out


def load_official_pkl(path, key="ema", cache_dir=None, sha256=None, md5=None):
    """An official EDM/EDM2 network pickle, loaded without running its code. path: a file or an http(s)/file URL
    (downloaded once into cache_dir, default $CMT_CACHE or ~/.cache/cmt, checked against sha256/md5 if given).
    Returns (state_dict, init_kwargs, class_name) of data[key]: its tensors named and ordered as
    module.state_dict() would, floats as float32; the constructor kwargs recorded in `_init_kwargs`; its class
    name, e.g. 'EDMPrecond'."""
    if urllib.parse.urlparse(str(path)).scheme in ("http", "https", "file"):
        cache_dir = cache_dir or os.environ.get("CMT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cmt")
        path = download(path, cache_dir, sha256=sha256, md5=md5)
    data = _pkl_unpickle(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict at the top level (EDM: ema, loss_fn, augment_pipe, "
                         f"dataset_kwargs; EDM2: encoder, dataset_kwargs, loss_fn, ema), got {type(data).__name__}")
    if key not in data:
        raise ValueError(f"{path}: no key {key!r}; available top-level keys: {', '.join(map(str, data))}")
    state_dict = _pkl_flatten(data[key], "", {}, f"{path}[{key!r}]")
    return state_dict, dict(data[key].state.get("_init_kwargs") or {}), data[key].class_name


def download(url, dest_dir, sha256=None, md5=None, flag="--teacher"):
    """Fetch url into dest_dir/<file name> and return that path. The bytes go to a temp file that replaces the
    target only after the hash check; a copy already there that passes is reused. `flag`: the CLI flag the
    offline error names. Multi-process runs: call it on rank 0 first, then barrier, then everywhere."""
    name = urllib.parse.unquote(os.path.basename(urllib.parse.urlparse(url).path))
    if not name:
        raise ValueError(f"cannot derive a file name from the URL {url}")
    path = os.path.join(dest_dir, name)
    want = {k: v.lower() for k, v in (("sha256", sha256), ("md5", md5)) if v}
    if os.path.isfile(path):
        if all(_pkl_file_hash(path, k) == v for k, v in want.items()):
            return path
        print(f"{path} fails its hash check; downloading it again", flush=True)
    os.makedirs(dest_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    hashes = {k: hashlib.new(k, usedforsecurity=False) for k in want}
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                size = int(response.headers.get("Content-Length") or 0)
                print(f"downloading {url} ({size / 2**20:.0f} MiB) -> {path}", flush=True)
                while chunk := response.read(1 << 22):
                    f.write(chunk)
                    for h in hashes.values():
                        h.update(chunk)
        except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors
            raise OSError(f"cannot download {url}: {e}; "
                               f"download it manually and pass its path with {flag}") from e
        bad = [f"{k} expected {v}, got {hashes[k].hexdigest()}" for k, v in want.items() if hashes[k].hexdigest() != v]
        if bad:
            raise ValueError(f"hash mismatch for {url} ({'; '.join(bad)}); the download was deleted")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # no partial file is left behind
            os.remove(tmp)
    return path


def _pkl_file_hash(path, algo):
    h = hashlib.new(algo, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _pkl_plain(v):
    """Comparable form of a kwarg value: tuples -> lists, numpy scalars/arrays -> Python."""
    if isinstance(v, (list, tuple)):
        return [_pkl_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _pkl_plain(x) for k, x in v.items()}
    if isinstance(v, (np.generic, np.ndarray)):
        return v.tolist()
    return v


class _PklAbsent:
    def __repr__(self):
        return "<not recorded>"


def check_init_kwargs(init_kwargs, expected, source, defaults=None):
    """Raise if an official pickle's constructor kwargs differ from ours on any key of `expected`. EDM/EDM2
    record only the kwargs their train.py passed (EDMPrecond: model_type, model_channels, channel_mult, ... as
    set; EDM2 Precond: img_resolution, img_channels, label_dim, use_fp16, model_channels, dropout); a key not
    recorded took the official constructor default, which `defaults` supplies. Leave training-only kwargs
    (dropout, use_fp16) out of `expected`: the student may differ there on purpose."""
    defaults = defaults or {}
    diffs = []
    for k, want in expected.items():
        have = init_kwargs[k] if k in init_kwargs else defaults.get(k, _PklAbsent())
        if _pkl_plain(have) != _pkl_plain(want):
            diffs.append(f"{k}: {source} has {have!r}, this model has {want!r}")
    if diffs:
        raise ValueError(f"{source} does not match the configured architecture:\n  " + "\n  ".join(diffs))


# Teacher-only tensors: EDM's augmentation conditioning, EDM2's uncertainty (logvar) head.
TEACHER_ONLY_KEYS = ("map_augment", "logvar_fourier", "logvar_linear")


def copy_by_name(state_dict, module, ignore=TEACHER_ONLY_KEYS, prefix_map=None):
    """Load state_dict into module (unwrapped: no DDP/compile prefixes) by name, strictly: every key
    must be on both sides with the same shape, except keys with a dotted component in `ignore`,
    which are copied when both sides have them and skipped otherwise. prefix_map {old: new} renames
    checkpoint key prefixes first (e.g. {"model.": ""}). Returns the checkpoint keys skipped."""
    src = {}
    for k, v in state_dict.items():
        old = next((p for p in (prefix_map or {}) if k.startswith(p)), None)
        src[k if old is None else prefix_map[old] + k[len(old):]] = v
    dst = module.state_dict()
    required = {k for k in set(src) | set(dst) if not set(k.split(".")) & set(ignore)}
    problems = {
        "missing in checkpoint": [k for k in dst if k in required and k not in src],
        "unexpected in checkpoint": [k for k in src if k in required and k not in dst],
        "shape mismatch": [f"{k}: checkpoint {tuple(src[k].shape)} vs model {tuple(dst[k].shape)}"
                           for k in dst if k in src and src[k].shape != dst[k].shape],
    }
    if any(problems.values()):
        lines = [f"\n  {what} ({len(ks)}): " + ", ".join(ks[:12]) + (" ..." if len(ks) > 12 else "")
                 for what, ks in problems.items() if ks]
        raise ValueError(f"checkpoint does not fit {type(module).__name__}:" + "".join(lines))
    module.load_state_dict({k: src[k] for k in dst if k in src}, strict=False)
    return [k for k in src if k not in dst]
# <<< pasted: official-pkl


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        if not isinstance(e.code, str):  # --help, or an exit status
            raise
        print(f"{SCRIPT}: error: {e.code}", file=sys.stderr)
        sys.exit(2)
