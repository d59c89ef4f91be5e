"""Consistency Mid-Training (CMT) for class-conditional ImageNet on EDM2 networks.

Reference implementation of CMT (arXiv 2509.24526) for ImageNet 512x512 (in the latent space of
Stability's SD-VAE, 4x64x64) and ImageNet 64x64 (pixels), on the magnitude-preserving EDM2 U-Net.

The method in one screen (EDM notation: noise level s, x_s = y + s*eps, sigma_data = 0.5):

  1. Teacher: a pre-trained EDM2 denoiser D(x, s | c) (official .pkl, float16 -> float32), used as
     the probability-flow ODE  dx/ds = (x - D(x, s)) / s.
  2. Mid-training (`--stage mid`, data-free): draw x_T = 80 * eps and a uniform class c, run the
     teacher's 16-step DPM-Solver++(3M) on the logSNR grid s_0 = 80 > ... > s_16 = 0.002 and train
     the student f_theta (initialised from the teacher) to map *every* state to the end point:
         L_CMT = mean_i d( f_theta(x_{s_i}, s_i | c), sg(x_{s_16}) ),  i = 0..15
     with d = pseudo-Huber  sqrt(|a-b|^2 + c^2) - c  (c = 0.06), Cauchy / L2, or sony/cmt's
     E-LatentLPIPS (`--metric elatentlpips`; its backbone is unpublished: experiments/train_latent_vgg.py).
     The trajectories of many micro-steps are solved in one batch (`--traj-buffer`), each with its own noise.
  3. Post-training (`--stage post`): consistency distillation (ECD) from the CMT weights.
     t ~ LogNormal(-0.8, 1.6), r = t (1 - q^-1 (1 + 8 sigmoid(-t))), q = 1024;
     x_r = one Heun step from x_t = y + t*eps to r of the guided teacher
         D_g = D_gnet + w (D_net - D_gnet)        (autoguidance: XXL 0.075 guided by M 0.155, w 2.05)
         L_ECD = (t^2 + sd^2)/(t sd)^2 * ( sqrt(|f(x_t, t) - sg(f(x_r, r))|^2 + c^2) - c )
     (ECT, x_r = y + r*eps, is available as `--post-loss ect`.)
  4. Sampling (`--stage sample`): 1 step x = f(80 z, 80); 2 steps x = f(x + 1.526 z', 1.526);
     latents are decoded by the SD-VAE. `--init teacher` samples the guided teacher with Heun instead.

Usage (every output goes under --outdir; one process or `torchrun --nproc_per_node=N`):

  python cmt_imagenet.py --preset tiny                          # CPU demo: toy data, whole pipeline
  python cmt_imagenet.py --stage encode --data ~/ILSVRC/train --vae VAE --outdir img512-sd
  torchrun --nproc_per_node=8 cmt_imagenet.py --stage mid  --preset img512-xxl --outdir runs/mid
  torchrun --nproc_per_node=8 cmt_imagenet.py --stage post --preset img512-xxl --outdir runs/post \\
      --init runs/mid/ckpt-latest.pt --data img512-sd
  torchrun --nproc_per_node=8 cmt_imagenet.py --stage sample --preset img512-xxl --outdir runs/fid \\
      --init runs/post/ckpt-latest.pt --sample-steps 2 --vae VAE --fid-ref img512.pkl
  python cmt_imagenet.py --stage encode --preset img64-s --data ~/ILSVRC/train --outdir img64   # 64x64 PNGs
  torchrun --nproc_per_node=8 cmt_imagenet.py --stage mid  --preset img64-s --outdir runs/mid64
  torchrun --nproc_per_node=8 cmt_imagenet.py --stage post --preset img64-s --outdir runs/post64 \\
      --init runs/mid64/ckpt-latest.pt --data img64

Stages: `pretrain` (EDM2 loss with the logvar head: the tiny demo's teacher), `mid`, `post`, `sample`, `encode`
(ImageNet folder -> EDM2 latent dataset of [mean, std] .npy files, or 64x64 PNGs for the pixel presets). Outputs
and run folders: see README.md; sample grids hold one row per class, 1-step left, 2-step right. VAE weights:
`diffusion_pytorch_model.safetensors` of stabilityai/sd-vae-ft-mse (--vae, file or folder). Speed per step at
real size: experiments/bench_imagenet.py.

Where this file follows the official code (sony/cmt imagenet512/) rather than the family defaults: the student
uses plain EDM2 preconditioning (s_min = 0; `--s-min` to change), gradients pass through nan_to_num(nan=0,
posinf=0, neginf=0), mid-training uses Adam betas (0.9, 0.999), the guiding network runs as its pickle says
(float16 on CUDA) while the teacher is float32, and `--ect-double` counts ticks of 6.4 kimg.
"""

import argparse
import collections
import contextlib
import copy
import functools
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config
EDM2_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"
EDM2_CHANNELS = dict(xs=128, s=192, m=256, l=320, xl=384, xxl=448)  # model_channels per size

# Teachers: the EDM2 "fid" post-hoc EMA of each size (NVlabs/edm2 generate_images.py), and the
# autoguided pairs (net, gnet, w) for ECD. None = no official file: pass --teacher.
EDM2_TEACHERS = {
    "img512": dict(xs="xs-2147483-0.135", s="s-2147483-0.130", m="m-2147483-0.100", l="l-1879048-0.085",
                   xl="xl-1342177-0.085", xxl="xxl-0939524-0.070"),
    "img64": dict(xs=None, s="s-1073741-0.075", m="m-2147483-0.060", l="l-1073741-0.040",
                  xl="xl-0671088-0.040", xxl=None),
}
EDM2_AUTOGUIDED = {
    ("img512", "xxl"): ("xxl-0939524-0.075", "m-0268435-0.155", 2.05),  # CMT's ECD recipe
    ("img512", "s"): ("s-2147483-0.070", "xs-0134217-0.125", 2.10),
    ("img64", "s"): ("s-1073741-0.045", "xs-0134217-0.110", 1.70),
}

COMMON = dict(  # shared by every preset; the paper's ImageNet-512 recipe (sony/cmt imagenet512/run_*_512.sh)
    res=64, img_channels=4, latent=True, label_dim=1000, model_channels=448, channel_mult=[1, 2, 3, 4],
    num_blocks=3, attn_res=[16, 8], dropout=0.0, s_min=0.0, sigma_data=0.5,
    data=None, teacher=None, guide=None, guide_fp16=None, guidance=1.0, init=None, vae=None,
    batch=128, batch_gpu=None, seed=0, tf32=False, bf16=False, compile=False, channels_last=False, cudnn_benchmark=False,
    ckpt_every=2000, snap_every=20000, sample_every=20000, grid=64, log_every=100, max_nonfinite=100,
    skip_nonfinite=False, workers=2,
    teacher_steps=16, traj_buffer=128, metric="huber", elpips_weights=None, huber_c=0.06, s_max=80.0, s_lo=0.002,
    post_loss="ecd", solver="heun", ect_q=1024.0, ect_double=0, p_mean=-0.8, p_std=1.6, k=8.0, b=1.0,
    mid_t=1.526, sample_steps=[2], heun_steps=32, num=50000, fid_ref=None, eval_num=4096,
)
STAGES = {  # optimiser and length per stage (sony/cmt imagenet512/run_cmt_512.sh, run_ecd_512.sh)
    "pretrain": dict(lr=1e-2, lr_decay="linear", betas=[0.9, 0.99], ema=0.999, mimg=128.0, p_mean=-0.4, p_std=1.0,
                     init="random"),
    "mid": dict(lr=2e-4, lr_decay="linear", betas=[0.9, 0.999], ema=0.999, mimg=12.8, init="teacher"),
    "post": dict(lr=1e-6, lr_decay="constant", betas=[0.9, 0.99], ema=0.9999, mimg=16.0),
}


def _edm2_preset(kind, size):
    ch = EDM2_CHANNELS[size]
    name = EDM2_TEACHERS[kind][size]
    teacher = f"{EDM2_URL}/edm2-{kind}-{name}.pkl" if name else None
    arch = dict(res=64, img_channels=4 if kind == "img512" else 3, latent=kind == "img512", model_channels=ch)
    post = dict(teacher=teacher)
    if (kind, size) in EDM2_AUTOGUIDED:
        net, gnet, w = EDM2_AUTOGUIDED[kind, size]
        post = dict(teacher=f"{EDM2_URL}/edm2-{kind}-{net}.pkl", guide=f"{EDM2_URL}/edm2-{kind}-{gnet}.pkl", guidance=w)
    return dict(arch, teacher=teacher, post=post, sample=post)  # sample --init teacher: the guided reference


PRESETS = {f"{kind}-{size}": _edm2_preset(kind, size) for kind in ("img512", "img64") for size in EDM2_CHANNELS}
PRESETS["tiny"] = dict(  # CPU demo on the built-in class-conditional Gaussian mixture (ToyMixture)
    res=8, img_channels=3, latent=False, label_dim=6, model_channels=16, channel_mult=[1, 2], num_blocks=1,
    attn_res=[4], data="toy", teacher="pretrain", batch=128, ckpt_every=200, snap_every=0, sample_every=0,
    log_every=50, workers=0, huber_c=0.00054 * math.sqrt(3 * 8 * 8), mid_t=0.821, heun_steps=18, num=4096,
    pretrain=dict(iters=800, lr=1e-2, ema=0.99),
    mid=dict(iters=400, lr=2e-3, ema=0.99),
    post=dict(iters=400, lr=1e-5, ema=0.99, ect_q=256.0),
)
DEFAULT_PRESET = "img512-xxl"
SCRIPT = "cmt_imagenet.py"  # recorded in every checkpoint: --init/--resume/--teacher refuse other scripts' files
# Config fields a resumed run may change: how long it runs, how often it logs, checkpoints and samples,
# and speed switches. Every other field defines the run and must match the checkpoint's.
RESUME_MAY_CHANGE = {"outdir", "resume", "iters", "mimg", "batch_gpu", "log_every", "ckpt_every", "snap_every",
                     "sample_every", "grid", "traj_buffer", "max_nonfinite", "workers", "bf16", "tf32", "compile",
                     "channels_last", "fid_ref", "num", "sample_steps", "heun_steps", "vae", "eval_num",
                     "cudnn_benchmark"}


def resolve_config(args):
    """COMMON <- stage defaults <- preset <- preset[stage] <- command line (flags left unset skip)."""
    if args.preset not in PRESETS:
        raise SystemExit(f"--preset: unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[args.preset]
    cfg = dict(COMMON)
    cfg.update(STAGES.get(args.stage, dict(STAGES["mid"], init=None)))  # sample/encode: no default --init
    cfg.update({k: v for k, v in preset.items() if not isinstance(v, dict)})  # dict values: per-stage overrides
    cfg.update(preset.get(args.stage, {}))
    cfg.update({k: v for k, v in vars(args).items() if v is not None})
    cfg["resume"] = args.resume
    if args.iters is not None and args.mimg is not None:
        raise SystemExit("--iters and --mimg: give at most one (the other is derived)")
    if args.mimg is not None or cfg.get("iters") is None:
        cfg["iters"] = max(1, math.ceil(cfg["mimg"] * 1e6 / cfg["batch"]))
    cfg["mimg"] = cfg["iters"] * cfg["batch"] / 1e6
    if args.stage == "post":
        check_post_precision(cfg)
    if cfg["guide"] in ("none", ""):
        cfg["guide"] = None
    if cfg["metric"] == "elatentlpips":
        if not cfg["elpips_weights"]:
            raise SystemExit("--metric elatentlpips: give the latent VGG's state dict with --elpips-weights PATH (none is "
                             "published; experiments/train_latent_vgg.py trains one as sony/cmt's train_latent_vgg.py)")
        if cfg["img_channels"] != 4 or cfg["res"] < 22:
            raise SystemExit(f"--metric elatentlpips: compares 4-channel SD latents of at least 22x22; preset "
                             f"{args.preset} trains on {cfg['img_channels']}x{cfg['res']}x{cfg['res']}")
    elif cfg["elpips_weights"]:
        raise SystemExit("--elpips-weights: only --metric elatentlpips uses it")
    return cfg


# ----------------------------------------------------------------------------- data
class ToyMixture:
    """Class-conditional Gaussian mixture in image space, class k ~ N(mu_k, s_k^2 I) with smooth coloured cosine
    means: the denoiser and the PF-ODE flow of each class are closed-form, so the tiny demo measures exact errors."""

    def __init__(self, num_classes=6, res=8, channels=3):
        i, j = torch.meshgrid(torch.arange(res, dtype=torch.float64), torch.arange(res, dtype=torch.float64),
                              indexing="ij")
        means, stds = [], []
        for k in range(num_classes):
            fi, fj = 1 + k % 2, 1 + (k // 2) % 3
            chans = [0.6 * torch.cos(2 * math.pi * (fi * i + fj * j) / res + 2.1 * c + 0.9 * k) for c in range(channels)]
            means.append(torch.stack(chans))
            stds.append(0.08 + 0.04 * (k % 3))
        self.mu, self.std = torch.stack(means), torch.tensor(stds, dtype=torch.float64)  # [K, C, H, W], [K] float64
        self.num_classes = num_classes

    def sample(self, n, generator=None, device="cpu", labels=None):
        if labels is None:
            labels = torch.randint(self.num_classes, (n,), generator=generator, device=device)
        eps = torch.randn((n, *self.mu.shape[1:]), generator=generator, device=device)
        mu, std = self.moments(torch.device(device))
        return mu[labels] + std[labels].reshape(-1, 1, 1, 1) * eps, labels

    @functools.lru_cache(maxsize=4)  # copied once per device: no host->device copy (a GPU sync) per batch
    def moments(self, device):
        return self.mu.to(device, torch.float32), self.std.to(device, torch.float32)

    def denoise(self, x, sigma, labels=None):
        """Ideal denoiser E[y | x_sigma (, c)]: conditional (one Gaussian) or, labels=None, the mixture."""
        x64 = x.to(torch.float64)
        s2 = sigma.to(torch.float64).reshape(-1, 1, 1, 1) ** 2
        mu, v = self.mu.to(x.device), self.std.to(x.device) ** 2
        if labels is not None:
            m, vk = mu[labels], v[labels].reshape(-1, 1, 1, 1)
            return (m + vk / (vk + s2) * (x64 - m)).to(x.dtype)
        vk = v.reshape(1, -1, 1, 1, 1)
        d = x64[:, None] - mu[None]  # [N, K, C, H, W]
        dim = d[0, 0].numel()
        logw = -0.5 * (d ** 2).flatten(2).sum(-1) / (vk.flatten(1) + s2.flatten(1)) \
            - 0.5 * dim * torch.log(vk.flatten(1) + s2.flatten(1))
        w = torch.softmax(logw, dim=1).reshape(*logw.shape, 1, 1, 1)
        return (w * (mu[None] + vk / (vk + s2[:, None]) * d)).sum(1).to(x.dtype)

    def flow(self, x, s_from, s_to, labels):
        """Exact PF-ODE map of class `labels` from noise level s_from to s_to: for a Gaussian the
        PF-ODE (EDM Eq. 1) keeps x - mu proportional to sqrt(s^2 + s_k^2)."""
        m, v = self.mu.to(x.device)[labels], (self.std.to(x.device)[labels] ** 2).reshape(-1, 1, 1, 1)
        s_from, s_to = (torch.as_tensor(s, dtype=torch.float64, device=x.device).reshape(-1, 1, 1, 1)
                        for s in (s_from, s_to))
        return (m + (x.to(torch.float64) - m) * torch.sqrt((v + s_to ** 2) / (v + s_from ** 2))).to(x.dtype)


class ToyDenoiser(nn.Module):
    """`--teacher analytic`: the toy's closed-form conditional denoiser behind the network interface."""

    def __init__(self, toy, conditional=True):
        super().__init__()
        self.toy, self.conditional = toy, conditional

    def forward(self, x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        return self.toy.denoise(x, sigma, labels if self.conditional else None)


class ImageFolderDataset(torch.utils.data.Dataset):
    """EDM/EDM2 dataset: a zip or folder of PNGs (pixels) or of .npy [mean, std] VAE latents
    (8 x 64 x 64, EDM2 dataset_tool.py), with labels from dataset.json {"labels": [[name, class], ...]}."""

    def __init__(self, path, latent, res, img_channels, label_dim):
        self.path, self.latent = path, latent
        if os.path.isdir(path):
            names = [os.path.relpath(os.path.join(root, f), path).replace("\\", "/") for root, _, fs in os.walk(path) for f in fs]
        elif path.endswith(".zip") and os.path.isfile(path):
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        else:
            raise SystemExit(f"--data: {path} is neither a folder nor a .zip file")
        ext = ".npy" if latent else ".png"
        self.files = sorted(n for n in names if n.lower().endswith(ext))
        if not self.files:
            other = "PNG images (this preset works in pixels)" if not latent else ".npy latents (run --stage encode)"
            raise SystemExit(f"--data: no {ext} files in {path}; expected {other}")
        if "dataset.json" not in names:
            raise SystemExit(f"--data: {path} has no dataset.json with class labels")
        try:
            labels = json.loads(self._read("dataset.json"))["labels"]
            labels = None if labels is None else dict(labels)
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--data: {path}/dataset.json is not {{\"labels\": [[file, class], ...]}} ({e})") from None
        if labels is None:
            raise SystemExit(f"--data: {path}/dataset.json has no labels (this script is class-conditional)")
        missing = [f for f in self.files if f not in labels]
        if missing:
            raise SystemExit(f"--data: {path}/dataset.json has no label for {missing[0]} "
                             f"({len(missing)} of {len(self.files)} files unlabelled)")
        self.labels = np.array([labels[f] for f in self.files], dtype=np.int64)
        if self.labels.min() < 0 or self.labels.max() >= label_dim:
            raise SystemExit(f"--data: {path}/dataset.json labels must be classes 0..{label_dim - 1}, "
                             f"found {self.labels.min()}..{self.labels.max()}")
        want = (2 * img_channels, res, res) if latent else (img_channels, res, res)
        for name in self.files:  # headers only: a bad file stops the run here, not in a DataLoader worker
            got = self._shape(name)
            if got != want:
                what = "VAE [mean, std] latents (8 channels)" if latent else "RGB images (grayscale is converted)"
                raise SystemExit(f"--data: {name} in {path} has shape {got}, expected {want} ({what})")
        self._zip = None

    def _shape(self, name):  # (C, H, W) from a file's header; pixel images count as RGB, as __getitem__ converts them
        try:
            if self.latent:
                f = io.BytesIO(self._read(name, 4096))
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape = read_header(f)[0]
                return (int(np.prod(shape[:-2])), *shape[-2:]) if len(shape) >= 2 else tuple(shape)
            with PIL.Image.open(io.BytesIO(self._read(name, 4096))) as img:
                return (3, img.size[1], img.size[0])
        except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise SystemExit(f"--data: {name} in {self.path} is not a readable "
                             f"{'.npy array' if self.latent else 'PNG'} ({' '.join(str(e).split())[:100]})") from None

    def _read(self, name, size=-1):  # the file's bytes (its first `size` bytes: enough for a header)
        if os.path.isdir(self.path):
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read(size)
        if getattr(self, "_zip", None) is None:
            self._zip = zipfile.ZipFile(self.path)
        with self._zip.open(name) as f:
            return f.read(size)

    def __getstate__(self):  # DataLoader workers open their own zip handle
        return dict(self.__dict__, _zip=None)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, idx):
        raw = self._read(self.files[idx])
        if self.latent:
            arr = np.load(io.BytesIO(raw), allow_pickle=False).astype(np.float32)
            arr = arr.reshape(-1, *arr.shape[-2:])
        else:
            arr = np.asarray(PIL.Image.open(io.BytesIO(raw)).convert("RGB")).transpose(2, 0, 1).copy()
        return torch.from_numpy(arr), int(self.labels[idx])


def rank_seed(seed, rank):
    """Seed of a rank's global RNG (dropout): distinct per rank, never equal to a micro_seed."""
    return micro_seed(seed, 1 << 40, rank)


def micro_seed(seed, it, slot, stream=0):
    """Seed of one micro-batch. slot = micro_step * world_size + rank, so the global batch of an
    iteration depends on (seed, iter, batch_gpu) only, not on how it is spread over GPUs. stream 1: an
    independent second stream of the same micro-batch (E-LatentLPIPS's augmentation)."""
    entropy = [seed, it, slot] + ([stream] if stream else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] & ((1 << 63) - 1))


class BatchSource:
    """Training inputs of one micro-batch, (y [bg, C, H, W] or None, labels [bg]): data-free (mid) uniform labels
    and no y; toy: mixture samples; dataset: rows it*batch + slot*bg + j of an epoch-wise permutation (no sampler
    state to save)."""

    def __init__(self, cfg, kind, device, rank, world, accum, start_iter, toy=None):
        self.cfg, self.kind, self.device, self.toy = cfg, kind, device, toy
        self.bg = cfg["batch_gpu"]
        if kind == "dataset":
            ds = ImageFolderDataset(cfg["data"], cfg["latent"], cfg["res"], cfg["img_channels"], cfg["label_dim"])
            n, seed, batch, bg = len(ds), cfg["seed"], cfg["batch"], self.bg
            perms = {}

            def plan():  # the index lists this rank consumes, in order, from start_iter on
                for it in range(start_iter, cfg["iters"]):
                    for m in range(accum):
                        first = it * batch + (m * world + rank) * bg
                        rows = []
                        for g in range(first, first + bg):
                            epoch = g // n
                            if epoch not in perms:
                                perms.clear()
                                perms[epoch] = np.random.RandomState((seed + epoch) % (1 << 31)).permutation(n)
                            rows.append(int(perms[epoch][g % n]))
                        yield rows
            self.loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=plan(), num_workers=cfg["workers"],
                                                           pin_memory=device.type == "cuda",
                                                           persistent_workers=cfg["workers"] > 0))

    def next(self, gen):
        bg, dev = self.bg, self.device
        if self.kind == "labels":
            return None, torch.randint(self.cfg["label_dim"], (bg,), generator=gen, device=dev)
        if self.kind == "toy":
            return self.toy.sample(bg, generator=gen, device=dev)
        raw, labels = next(self.loader)
        raw, labels = raw.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
        y = edm2_encode_latents(raw, gen) if self.cfg["latent"] else raw.to(torch.float32) / 127.5 - 1
        return y, labels


def check_latent_stats(cfg, num=256):
    """Refuse a latent dataset whose normalised latents are far from EDM2's mean 0 / std 0.5 per
    channel (e.g. another VAE, latents already scaled by 0.18215, or a broken encode)."""
    ds = ImageFolderDataset(cfg["data"], True, cfg["res"], cfg["img_channels"], cfg["label_dim"])
    idx = np.linspace(0, len(ds) - 1, min(num, len(ds))).astype(np.int64)
    raw = torch.stack([ds[int(i)][0] for i in idx])
    z = edm2_encode_latents(raw, torch.Generator().manual_seed(0))
    mean, rms = z.mean((0, 2, 3)), z.square().mean((0, 2, 3)).sqrt()
    # ImageNet-512 gives |mean| < 0.1 and rms 0.45..0.55 per channel; the bounds leave room for
    # small subsets while catching scale errors (0.18215-scaled or raw latents are off by >2x).
    if (mean.abs() > 0.25).any() or (rms < 0.3).any() or (rms > 0.8).any():
        raise SystemExit(f"--data: latents of {cfg['data']} do not look like EDM2-normalised sd-vae-ft-mse latents: "
                         f"per-channel mean {mean.tolist()}, rms {rms.tolist()} (expected mean ~0, rms ~0.5). "
                         "Re-encode the images with --stage encode.")
    return mean, rms


# ----------------------------------------------------------------------------- network
# EDM2 U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
# Models"), magnitude-preserving: every layer keeps unit expected magnitude, weights are normalised
# (and re-normalised in place while training: "forced weight normalisation"), no biases, no norms.
# Module and tensor names match NVlabs/edm2 so that official pickles load by name.

def normalize(x, dim=None, eps=1e-4):
    """Scale to unit RMS over `dim` (default: all but the first)."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def resample(x, mode="keep"):
    """2x box-filter down/up-sampling (EDM2 resample_filter [1, 1])."""
    if mode == "keep":
        return x
    c = x.shape[1]
    if mode == "down":
        return F.conv2d(x, x.new_full([c, 1, 2, 2], 0.25), groups=c, stride=2)
    return F.conv_transpose2d(x, x.new_ones([c, 1, 2, 2]), groups=c, stride=2)


# mp_silu and mp_sum divide in place: the backward of silu and of lerp needs only their inputs, and one
# activation-sized allocation fewer per call is measurable on CPU (experiments/bench_parity.py).
def mp_silu(x):
    return F.silu(x).div_(0.596)  # 0.596 = RMS of silu(N(0, 1)) (EDM2 Eq. 81)


def mp_sum(x1, x2, frac=0.5):  # EDM2's mp_sum(a, b, t)
    return x1.lerp(x2, frac).div_(math.sqrt((1 - frac) ** 2 + frac ** 2))  # EDM2 Eq. 88


def mp_cat(x1, x2, dim=1, frac=0.5):  # EDM2's mp_cat(a, b, dim, t)
    n1, n2 = x1.shape[dim], x2.shape[dim]
    scale = math.sqrt((n1 + n2) / ((1 - frac) ** 2 + frac ** 2))  # EDM2 Eq. 103
    return torch.cat([scale / math.sqrt(n1) * (1 - frac) * x1, scale / math.sqrt(n2) * frac * x2], dim=dim)


class MPFourier(nn.Module):
    """Unit-magnitude random Fourier features of the noise level (EDM2 Eq. 75)."""

    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x):
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving conv / linear (EDM2 Eq. 47) with forced weight normalisation (Eq. 66): in train mode
    the stored weight is overwritten by its normalised self before use, so Adam's steps start from unit-norm rows.
    `no_forced_wn` skips that write for the second, no-grad student call of ECT/ECD (official sony/cmt loss.py)."""

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self.force_wn = True

    def forward(self, x, gain=1):
        w = self.weight.to(torch.float32)
        if self.training and self.force_wn:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = (normalize(w) * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        return x @ w.t() if w.ndim == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)


@contextlib.contextmanager
def no_forced_wn(module):
    convs = [m for m in module.modules() if isinstance(m, MPConv)]
    for m in convs:
        m.force_wn = False
    try:
        yield
    finally:
        for m in convs:
            m.force_wn = True


class Block(nn.Module):
    """EDM2 encoder/decoder block: (resample) -> residual branch modulated by the embedding ->
    mp_sum -> optional self-attention (cosine attention, pixel-normalised q/k/v) -> clip."""

    def __init__(self, in_channels, out_channels, emb_channels, flavor="enc", resample_mode="keep",
                 attention=False, channels_per_head=64, dropout=0.0, res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        self.out_channels, self.flavor, self.resample_mode = out_channels, flavor, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x, emb):
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.unsqueeze(2).unsqueeze(3).to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, frac=self.res_balance)
        if self.num_heads:
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)
            w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", w, v)
            x = mp_sum(x, self.attn_proj(y.reshape(*x.shape)), frac=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


class UNet(nn.Module):
    """EDM2 U-Net (Figure 21): the image gets a constant-ones channel; encoder blocks per
    resolution (+ a downsampling block), decoder with mp_cat skips; output gain starts at 0."""

    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192, channel_mult=(1, 2, 3, 4),
                 num_blocks=3, attn_resolutions=(16, 8), label_balance=0.5, concat_balance=0.5, **block_kwargs):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise, cemb = cblock[0], max(cblock)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None
        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, "enc", "down", **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, "enc", attention=res in attn_resolutions,
                                                            **block_kwargs)
        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, "dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, "dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, "dec", "up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, "dec", attention=res in attn_resolutions,
                                                            **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), frac=self.label_balance)
        emb = mp_silu(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), frac=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


def edm_precond(sigma, sigma_data=0.5):
    """EDM preconditioning (Karras et al. 2022, Table 1): c_skip, c_out, c_in, c_noise."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    return c_skip, c_out, c_in, sigma.log() / 4


def ecm_precond(sigma, sigma_data=0.5, s_min=0.0, train=True):
    """ECM preconditioning (sony/cmt training/networks.py, ECMPrecond): EDM's in train mode (and for every
    training target); in eval mode shifted by s_min so that f(x, s_min) = x. The official ImageNet-512
    code uses s_min = 0."""
    c_skip, c_out, c_in, c_noise = edm_precond(sigma, sigma_data)
    if not train and s_min > 0:
        c_skip = sigma_data ** 2 / ((sigma - s_min) ** 2 + sigma_data ** 2)
        c_out = (sigma - s_min) * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out, c_in, c_noise


class Precond(nn.Module):
    """EDM2 Precond: D(x, s | c) = c_skip x + c_out F(c_in x, ln(s)/4, onehot(c)). `logvar` adds EDM2's uncertainty
    head, used only by the pre-training loss (official teachers carry it, CMT students drop it); `eval_mode`
    selects ECM's eval-mode coefficients (s_min > 0 only); `use_fp16` runs the U-Net in float16 on CUDA, as
    EDM2's Precond does when its pickle says so (only an official guiding network sets it)."""

    def __init__(self, img_resolution, img_channels, label_dim, sigma_data=0.5, s_min=0.0, logvar=False,
                 logvar_channels=128, **unet_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_data, self.s_min, self.use_fp16 = sigma_data, s_min, False
        self.unet = UNet(img_resolution, img_channels, label_dim, **unet_kwargs)
        if logvar:
            self.logvar_fourier = MPFourier(logvar_channels)
            self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, x, sigma, labels=None, eval_mode=False, return_logvar=False):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(x.shape[0], 1, 1, 1)
        onehot = None
        if self.label_dim:
            onehot = torch.zeros([x.shape[0], self.label_dim], device=x.device)
            if labels is not None:
                onehot = F.one_hot(labels.reshape(-1), self.label_dim).to(torch.float32)
        c_skip, c_out, c_in, c_noise = ecm_precond(sigma, self.sigma_data, self.s_min, train=not eval_mode)
        dtype = torch.float16 if self.use_fp16 and x.device.type == "cuda" else torch.float32
        F_x = self.unet((c_in * x).to(dtype), c_noise.flatten(), onehot)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            return D_x, self.logvar_linear(self.logvar_fourier(c_noise.flatten())).reshape(-1, 1, 1, 1)
        return D_x


def build_net(cfg, logvar=False, s_min=None):
    return Precond(cfg["res"], cfg["img_channels"], cfg["label_dim"], sigma_data=cfg["sigma_data"],
                   s_min=cfg["s_min"] if s_min is None else s_min, logvar=logvar,
                   model_channels=cfg["model_channels"], channel_mult=cfg["channel_mult"],
                   num_blocks=cfg["num_blocks"], attn_resolutions=cfg["attn_res"], dropout=cfg["dropout"])


# Official EDM/EDM2 .pkl loading, downloads and copy_by_name: see the appendix at the end of this file.
# The SD-VAE, its safetensors reader and its latent conventions: see the appendix at the end of this file.

# ----------------------------------------------------------------------------- teacher and solver
def load_network(spec, cfg, what):
    """A frozen denoiser from an official .pkl (path or URL), one of our .pt checkpoints (its EMA),
    or `analytic` (the toy's closed-form denoiser). Returns an eval-mode module."""
    if spec == "analytic":
        if cfg["data"] != "toy":
            raise SystemExit(f"--{what} analytic needs the toy data (--preset tiny)")
        return ToyDenoiser(ToyMixture(cfg["label_dim"], cfg["res"], cfg["img_channels"]), conditional=what != "guide")
    if spec is None or spec == "pretrain":
        raise SystemExit(f"--{what}: give an EDM2 .pkl (path or URL), a checkpoint .pt, or 'analytic' (toy only)")
    if spec.endswith(".pt"):
        state = read_checkpoint(spec, f"--{what}")["ema"]
    else:
        state, init_kwargs, class_name = read_official_pkl(spec, f"--{what}")
        if class_name != "Precond":
            raise SystemExit(f"--{what}: {spec} holds a {class_name}, expected an EDM2 Precond")
        # What the pickle must record (or default to) to fit this config; an autoguidance net is smaller (or
        # unconditional): it keeps its own size.
        expected = dict(img_resolution=cfg["res"], img_channels=cfg["img_channels"], label_dim=cfg["label_dim"],
                        model_channels=cfg["model_channels"], channel_mult=cfg["channel_mult"],
                        num_blocks=cfg["num_blocks"], attn_resolutions=cfg["attn_res"])
        if what == "guide":
            expected.update({k: init_kwargs.get(k, expected[k]) for k in ("model_channels", "label_dim")})
        try:
            check_init_kwargs(init_kwargs, expected, spec, dict(channel_mult=[1, 2, 3, 4], num_blocks=3,
                                                                attn_resolutions=[16, 8]))
        except ValueError as e:
            raise SystemExit(f"--{what} {spec}: {' '.join(str(e).split())}") from None
        cfg = dict(cfg, model_channels=expected["model_channels"], label_dim=expected["label_dim"])
    net = build_net(cfg, logvar=any(k.startswith("logvar_") for k in state), s_min=0.0)
    copy_into(state, net, f"--{what} {spec}", ignore=())
    if what == "guide":  # sony/cmt imagenet512/training/cd_guid_training_loop_512.py unpickles the guide unchanged
        # (pickle.load(f)['ema']): float16 on CUDA when its use_fp16 says so; the teacher is rebuilt in float32.
        official = not spec.endswith(".pt") and bool(init_kwargs.get("use_fp16", False))
        net.use_fp16 = official if cfg["guide_fp16"] is None else cfg["guide_fp16"]
    return net.eval().requires_grad_(False)


def read_official_pkl(spec, flag):
    """load_official_pkl with its errors (missing, damaged, refused, hash mismatch) as one line naming the flag."""
    try:
        return load_official_pkl(spec)
    except (OSError, ValueError, pickle.UnpicklingError) as e:
        raise SystemExit(f"{flag} {spec}: {' '.join(str(e).split())}") from None


def copy_into(state, net, source, **kw):
    """copy_by_name; a checkpoint of another architecture lists the keys that do not fit."""
    try:
        copy_by_name(state, net, **kw)
    except ValueError as e:
        raise SystemExit(f"{source}: {e}") from None


def guided_denoiser(net, gnet=None, w=1.0):
    """D_g = D_gnet + w (D_net - D_gnet) (autoguidance, Karras et al. 2024; CFG). w = 1: the plain teacher."""
    if gnet is None or w == 1:
        return net
    return lambda x, s, labels: gnet(x, s, labels).lerp(net(x, s, labels), w)


def load_teachers(cfg, device):
    """(--teacher, the denoiser D_g that guides it with --guide, or the teacher itself)."""
    teacher = load_network(cfg["teacher"], cfg, "teacher").to(device)
    gnet = load_network(cfg["guide"], cfg, "guide").to(device) if cfg["guide"] else None
    return teacher, guided_denoiser(teacher, gnet, cfg["guidance"])


@functools.lru_cache(maxsize=8)  # built once per device: no host->device copy in the training step
def logsnr_grid(n=16, s_max=80.0, s_min=0.002, device="cpu", dtype=torch.float32):
    """logSNR-uniform grid s_i = s_max (s_min/s_max)^(i/n), i = 0..n (sony/cmt training/loss.py,
    DPMSolverLoss, get_time_steps "logSNR"). Do not modify it in place."""
    i = torch.arange(n + 1, dtype=torch.float64)
    return (s_max * (s_min / s_max) ** (i / n)).to(device, dtype)


@torch.no_grad()
def dpm_solver_pp(denoise, x, labels, sigmas, order=3):
    """Multistep DPM-Solver++ (data prediction) with warm-up and lower-order final steps
    (orders 1, 2, 3, ..., 3, 2, 1; sony/cmt training/dpm_solver.py, lower_order_final).
    Returns all len(sigmas) states, x first."""
    n = len(sigmas) - 1
    lam = -torch.log(sigmas.to(torch.float64))
    states, ms, hs = [x], [], []
    for k in range(n):
        s_cur, s_next = sigmas[k], sigmas[k + 1]
        ms.append(denoise(x, s_cur.expand(x.shape[0]), labels).to(x.dtype))
        h = lam[k + 1] - lam[k]  # float64 0-dim tensors on the grid's device: no host-device sync per step
        phi_1 = torch.expm1(-h)
        o = min(order, k + 1, n - k)
        x_next = (s_next / s_cur) * x - phi_1 * ms[-1]
        if o == 2:
            r0 = hs[-1] / h
            x_next = x_next - 0.5 * phi_1 * (ms[-1] - ms[-2]) / r0
        elif o == 3:
            r0, r1 = hs[-1] / h, hs[-2] / h
            d1_0, d1_1 = (ms[-1] - ms[-2]) / r0, (ms[-2] - ms[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = phi_1 / h + 1
            phi_3 = phi_2 / h - 0.5
            x_next = x_next + phi_2 * d1 - phi_3 * d2
        hs.append(h)
        ms = ms[-2:]
        x = x_next
        states.append(x)
    return states


def karras_grid(num_steps, s_max=80.0, s_min=0.002, rho=7.0, device="cpu"):
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (s_max ** (1 / rho) + i / (num_steps - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)]).to(device)


@torch.no_grad()
def heun_sampler(denoise, noise, labels, num_steps=32, s_max=80.0, s_min=0.002, rho=7.0):
    """EDM Algorithm 2 without churn (the reference sampler of the guided teacher; 2N-1 NFE)."""
    t = karras_grid(num_steps, s_max, s_min, rho, noise.device)
    x = noise.to(torch.float64) * t[0]
    for i in range(num_steps):
        x = teacher_step(denoise, x, t[i], t[i + 1], labels, "heun" if t[i + 1] > 0 else "euler")
    return x


def teacher_step(denoise, x, t, r, labels, solver="heun"):
    """One Euler or Heun step of the PF-ODE dx/ds = (x - D(x, s))/s from t to r (per-sample
    tensors or scalars). Rows with r = 0 take the Euler step (Heun's slope at 0 is undefined)."""
    n = x.shape[0]
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1).expand(n, 1, 1, 1)
    r = torch.as_tensor(r, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1).expand(n, 1, 1, 1)
    d = (x - denoise(x, t.flatten(), labels).to(x.dtype)) / t
    x_euler = x + (r - t) * d
    if solver == "euler":
        return x_euler
    r_eval = torch.where(r > 0, r, t)
    d_prime = (x_euler - denoise(x_euler, r_eval.flatten(), labels).to(x.dtype)) / r_eval
    return torch.where(r > 0, x + (r - t) * 0.5 * (d + d_prime), x_euler)


# ----------------------------------------------------------------------------- E-LatentLPIPS
# sony/cmt's ImageNet-512 mid-training distance (run_cmt_512.sh --loss_metric=ELatentLPIPS; training/loss.py
# builds elatentlpips/models.py ELatentLPIPS2 with aug_type "bgcfnc", strength 1):
#   d(a, b) = sum over 5 VGG taps of mean_hw sum_c (n(f(A a)) - n(f(A b)))^2,  n = unit norm over channels,
# f a VGG16 with GroupNorm trained to classify EDM2 latents, A one random ADA transform shared by a and b.
# Its augmentation file is not in sony/cmt's public tree; we follow SNU-VGILab/e-latentlpips
# augmentations/ada_aug.py, the package whose models.py sony/cmt's extends.
#
# sony/cmt imagenet512/elatentlpips/models.py cfg['VGG16_Latent']: VGG16 without its first two pools
# (64x64 latents keep their resolution through the 256-channel block) and without the last pool.
VGG16_LATENT_CFG = [64, 64, 128, 128, 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
TAPS = (6, 12, 21, 31, 41)  # ends of features[0:6], [6:12], [12:21], [21:31], [31:41] (after a ReLU)


class LatentVGG16GN(nn.Module):
    """VGG16_Latent_GN: conv3x3 -> GroupNorm(32) -> ReLU per cfg entry, max-pool at 'M', and the
    torchvision VGG head (adaptive 7x7 pool, 3 linears with dropout) that only the class loss uses
    (`head=False` leaves out its 103M parameters). Module indices, hence state_dict keys, match the
    official VGGBase (features.N / classifier.N)."""

    def __init__(self, in_channels=4, num_classes=1000, groups=32, head=True):
        super().__init__()
        layers, c = [], in_channels
        for v in VGG16_LATENT_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.GroupNorm(groups, v), nn.ReLU(inplace=True)]
            c = v
        self.features = nn.Sequential(*layers)
        if not head:
            return
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(512 * 49, 4096), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, num_classes))

    def forward(self, x):  # class logits
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    def taps(self, x):
        """The 5 feature maps E-LatentLPIPS compares: [64, H], [128, H], [256, H], [512, H/2], [512, H/4]."""
        out, start = [], 0
        for end in TAPS:
            x = self.features[start:end](x)
            out.append(x)
            start = end
        return out


def load_latent_vgg(path, device):
    """The frozen E-LatentLPIPS backbone from a state dict (--elpips-weights; experiments/train_latent_vgg.py
    writes one). The official vgg.pt pickles the whole module ({'model': VGGBase}); convert it once where the
    official code imports: torch.save(torch.load('vgg.pt', weights_only=False)['model'].state_dict(), PATH)."""
    net = LatentVGG16GN(head=False)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")})
    except (OSError, RuntimeError, pickle.UnpicklingError, AttributeError, TypeError) as e:
        raise SystemExit(f"--elpips-weights {path}: not a VGG16_Latent_GN state dict ({' '.join(str(e).split())[:160]})") from None
    return net.to(device).eval().requires_grad_(False)


def unit_channels(f, eps=1e-8):
    # sony/cmt elatentlpips/models.py normalize_tensor: eps inside the sqrt
    return f / torch.sqrt(f.square().sum(1, keepdim=True) + eps)


def elatentlpips_distance(taps, pred, target, generator=None, p=1.0):
    """ELatentLPIPS2 per sample [N]: no learned 1x1 heads, channel sum, spatial mean, sum over taps.
    generator=None: no augmentation. Both inputs go through `taps` (e.g. LatentVGG16GN.taps) in one
    batch (GroupNorm is per sample); gradients reach both through augmentation and backbone."""
    if generator is not None:
        pred, target = augment_pair(pred, target, generator, p)
    d = 0
    for f in taps(torch.cat([pred, target])):
        fa, fb = unit_channels(f).chunk(2)
        d = d + (fa - fb).square().sum(1).mean((1, 2))
    return d


# ADA 'bgcfnc' (Karras et al. 2020, NVlabs/stylegan2-ada-pytorch training/augment.py) as adapted to
# latent pairs in SNU-VGILab/e-latentlpips elatentlpips/augmentations/ada_aug.py, the package whose
# models.py sony/cmt copied. Every op fires with probability p (official aug_strength = 1).
SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148]
SYM2 = [-0.12940952255092145, 0.22414386804185735, 0.836516303737469, 0.48296291314469025]


# The augmentation runs every micro-step on the GPU: its constants are made there by a fill kernel or once per
# device (_const), since each tensor built from host values is a copy that waits for the GPU.
@functools.lru_cache(maxsize=64)
def _const(values, dtype, device):  # a small constant tensor, made once per (values, dtype, device): never modify it
    return torch.tensor(values, dtype=dtype, device=device)


def aug_matrix(n, like, *e):  # row-major entries (floats or [n] tensors) -> [n, k, k]
    k = math.isqrt(len(e))
    return torch.stack([v.to(like.dtype).expand(n) if torch.is_tensor(v) else
                        torch.full((n,), v, dtype=like.dtype, device=like.device) for v in e], -1).view(n, k, k)


def aug_scale(sx, sy, n, like):
    return aug_matrix(n, like, sx, 0, 0, 0, sy, 0, 0, 0, 1)


def aug_shift(tx, ty, n, like):
    return aug_matrix(n, like, 1, 0, tx, 0, 1, ty, 0, 0, 1)


def aug_rotate(angle, n, like):
    return aug_matrix(n, like, angle.cos(), -angle.sin(), 0, angle.sin(), angle.cos(), 0, 0, 0, 1)


def sample_aug(shape, gen, p, like):
    """Random parameters of one bgcfnc transform per sample: G [n,3,3] (output pixel -> input pixel,
    centred pixel units), C [n,4,4] (colour), gain [n,4] (filter bands), noise [n,c,h,w], cutout."""
    n, c, h, w = shape
    u = lambda *s: torch.rand(s or (n,), generator=gen, device=like.device, dtype=like.dtype)
    g = lambda *s: torch.randn(s or (n,), generator=gen, device=like.device, dtype=like.dtype)
    gate = lambda v, off, q=p: torch.where((u(n) < q).view(-1, *[1] * (v.dim() - 1)), v, torch.full_like(v, off))
    one = torch.ones(n, dtype=like.dtype, device=like.device)
    G = torch.eye(3, dtype=like.dtype, device=like.device).expand(n, 3, 3)
    G = G @ aug_scale(1 - 2 * gate(u().mul(2).floor(), 0), 1, n, like)                   # xflip
    G = G @ aug_rotate(math.pi / 2 * gate(u().mul(4).floor(), 0), n, like)                  # rotate90
    shift = gate((u(n, 2) * 2 - 1) * 0.125, 0)                                        # xint
    G = G @ aug_shift(-(shift[:, 0] * w).round(), -(shift[:, 1] * h).round(), n, like)
    s = gate(torch.exp2(g() * 0.2), 1)                                                # scale
    G = G @ aug_scale(1 / s, 1 / s, n, like)
    p_rot = 1 - math.sqrt(min(max(1 - p, 0), 1))  # pre or post rotation: P(either) = p
    G = G @ aug_rotate(gate((u() * 2 - 1) * math.pi, 0, p_rot), n, like)                    # rotate (pre)
    s = gate(torch.exp2(g() * 0.2), 1)                                                # aniso
    G = G @ aug_scale(1 / s, s, n, like)
    G = G @ aug_rotate(gate((u() * 2 - 1) * math.pi, 0, p_rot), n, like)                    # rotate (post)
    shift = gate(g(n, 2) * 0.125, 0)                                                  # xfrac
    G = G @ aug_shift(-shift[:, 0] * w, -shift[:, 1] * h, n, like)
    # Colour: homogeneous 4x4 on (c0, c1, c2, 1); luma axis v = (1, 1, 1, 0)/sqrt(3).
    eye = torch.eye(4, dtype=like.dtype, device=like.device)
    v = _const((1.0, 1, 1, 0), like.dtype, like.device) / math.sqrt(3)
    vv, k = torch.outer(v, v), torch.zeros(4, 4, dtype=like.dtype, device=like.device)
    k[0, 1], k[0, 2], k[1, 0], k[1, 2], k[2, 0], k[2, 1] = -v[2], v[1], v[2], -v[0], -v[1], v[0]  # v x .
    C = eye.expand(n, 4, 4).clone()
    C[:, :3, 3] = gate(g() * 0.2, 0)[:, None]                                         # brightness
    C = torch.diag_embed(torch.stack([gate(torch.exp2(g() * 0.5), 1)] * 3 + [one], 1)) @ C  # contrast
    C = (eye - 2 * vv * gate(u().mul(2).floor(), 0).view(n, 1, 1)) @ C                  # lumaflip
    th, e3 = gate((u() * 2 - 1) * math.pi, 0).view(n, 1, 1), torch.diag(v.ceil())  # hue: Rodrigues about v
    C = (vv + (e3 - vv) * th.cos() + k * th.sin() + eye - e3) @ C
    C = (vv + (eye - vv) * gate(torch.exp2(g() * 1.0), 1).view(n, 1, 1)) @ C          # saturation
    # Filter: 4 octave bands, log2-normal gains (std 1), power normalised to the 1/f spectrum.
    ep = _const((10.0, 1, 1, 1), like.dtype, like.device) / 13
    gain = torch.ones(n, 4, dtype=like.dtype, device=like.device)
    for i in range(4):
        band = torch.ones_like(gain)
        band[:, i] = gate(torch.exp2(g()), 1)
        gain = gain * band / (ep * band.square()).sum(1, keepdim=True).sqrt()
    sigma = gate(g().abs() * 0.1, 0).view(n, 1, 1, 1)                                 # noise
    noise = g(n, c, h, w) * sigma
    return dict(G=G, C=C, gain=gain, noise=noise, cut=(gate(0.5 * one, 0), u(n, 2)))


def upfirdn(x, f, up=1, pad=(0, 0), down=1):
    """Separable upfirdn2d: zero-stuff by `up`, pad (negative crops), correlate rows and columns
    with the 1-D filter f, keep every `down`-th sample."""
    n, c, h, w = x.shape
    if up > 1:
        x = F.pad(x.reshape(n, c, h, 1, w, 1), [0, up - 1, 0, 0, 0, up - 1]).reshape(n, c, h * up, w * up)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    x = x.reshape(n * c, 1, *x.shape[2:])
    x = F.conv2d(F.conv2d(x, f.view(1, 1, 1, -1)), f.view(1, 1, -1, 1))[:, :, ::down, ::down]
    return x.reshape(n, c, *x.shape[2:])


def aug_geometry(x, G):
    """ADA geometry: reflect-pad, 2x upsample (sym6), bilinear resample, 2x downsample (sym6)."""
    n, c, h, w = x.shape
    f = _const(tuple(SYM6), x.dtype, x.device)
    f = f / f.sum()
    cx, cy = (w - 1) / 2, (h - 1) / 2
    corners = _const(((-cx, cx, cx, -cx), (-cy, -cy, cy, cy), (1.0,) * 4), x.dtype, x.device)
    xy = (G @ corners)[:, :2].transpose(0, 1).reshape(2, -1)  # [2, n*4] input positions of output corners
    # The padding depends on the drawn transforms (as in ADA): E-LatentLPIPS's one read from the GPU per call.
    m = (torch.cat([-xy, xy]).amax(1) + _const((6 - cx, 6 - cy) * 2, x.dtype, x.device)).tolist()
    mx0, my0, mx1, my1 = [min(max(math.ceil(v), 0), lim) for v, lim in zip(m, [w - 1, h - 1] * 2)]
    x = F.pad(x, [mx0, mx1, my0, my1], mode="reflect")
    G = aug_shift((mx0 - mx1) / 2, (my0 - my1) / 2, n, x) @ G
    x = upfirdn(x, f.flip(0) * 2, up=2, pad=(6, 5))
    G = aug_scale(2, 2, n, x) @ G @ aug_scale(0.5, 0.5, n, x)
    G = aug_shift(-0.5, -0.5, n, x) @ G @ aug_shift(0.5, 0.5, n, x)
    oh, ow = (h + 6) * 2, (w + 6) * 2
    G = aug_scale(2 / x.shape[3], 2 / x.shape[2], n, x) @ G @ aug_scale(ow / 2, oh / 2, n, x)
    grid = F.affine_grid(G[:, :2], [n, c, oh, ow], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return upfirdn(x, f, pad=(-1, -1), down=2)


@functools.lru_cache(maxsize=8)
def aug_filter_bank(dtype, device):
    """[4, 43] band filters whose sum is a unit impulse (ADA's sym2 octave bank), made once per device."""
    full = lambda a, k: F.conv1d(F.pad(a[:, None], [k.numel() - 1] * 2), k.flip(0).view(1, 1, -1))[:, 0]
    lo = torch.tensor(SYM2, dtype=torch.float64)
    hi = lo * torch.tensor([1.0, -1, 1, -1], dtype=torch.float64)
    lo2, hi2 = full(lo[None], lo.flip(0))[0] / 2, full(hi[None], hi.flip(0))[0] / 2
    bank = torch.eye(4, 1, dtype=torch.float64)
    for i in range(1, 4):
        up = torch.zeros(4, 2 * bank.shape[1] - 1, dtype=torch.float64)
        up[:, ::2] = bank
        bank = full(up, lo2)
        j = (bank.shape[1] - hi2.numel()) // 2
        bank[i, j:j + hi2.numel()] += hi2
    return bank.to(device, dtype)


def apply_aug(x, prm):
    """Apply one sampled transform to x [n, k, c, h, w]: the k stacked images of a sample share it."""
    n, k, c, h, w = x.shape
    x = aug_geometry(x.reshape(n, k * c, h, w), prm["G"]).reshape(n, k, c, h * w)
    C = prm["C"][:, None]
    # Official 4-channel rule (ada_aug.py `num_channels == 4`): C @ x, latent channel 3 standing in
    # for the homogeneous 1 (brightness adds b * x3; saturation also scales x3).
    x = (C @ x) if c == 4 else (C[..., :3, :3] @ x + C[..., :3, 3:])
    hz = (prm["gain"] @ aug_filter_bank(x.dtype, x.device)).repeat_interleave(k * c, 0)  # [n*k*c, 43]
    x = F.pad(x.reshape(1, n * k * c, h, w), [21] * 4, mode="reflect")
    x = F.conv2d(F.conv2d(x, hz[:, None, None], groups=n * k * c), hz[:, None, :, None], groups=n * k * c)
    x = x.reshape(n, k, c, h, w) + prm["noise"][:, None]  # one noise draw for both images
    size, centre = prm["cut"]
    mx = ((torch.arange(w, device=x.device) + 0.5) / w - centre[:, :1]).abs() >= size[:, None] / 2
    my = ((torch.arange(h, device=x.device) + 0.5) / h - centre[:, 1:]).abs() >= size[:, None] / 2
    return x * (mx[:, None, :] | my[:, :, None]).to(x.dtype)[:, None, None]


def augment_pair(pred, target, generator, p=1.0):
    """The same random bgcfnc transform on pred and target (both differentiable); generator on their device."""
    prm = sample_aug(pred.shape, generator, p, pred)
    return apply_aug(torch.stack([pred, target], 1), prm).unbind(1)


# ----------------------------------------------------------------------------- losses
def distance(pred, target, metric, c):
    """Per-sample distance over all elements: l2 (sum of squares), huber (sqrt(sum + c^2) - c),
    cauchy (log(1 + sum / (2 c^2))); pseudo-Huber as in iCT (Song & Dhariwal 2023)."""
    sq = (pred - target).square().flatten(1).sum(1)
    if metric == "l2":
        return sq
    if metric == "huber":
        return torch.sqrt(sq + c ** 2) - c
    if metric == "cauchy":
        return torch.log1p(sq / (2 * c ** 2))
    raise ValueError(f"--metric: unknown metric {metric!r} (huber, cauchy, l2)")


def cmt_pairs(states, sigmas, labels):
    """The CMT training pairs of K trajectories (states [N+1, K, ...], x_T first), stacked step-major: every
    state but the last, at its noise level, with the trajectory's end point as target (sony/cmt training/loss.py,
    DPMSolverLoss). Returns (x [N*K], s [N*K], labels [N*K], target [N*K])."""
    n, trajs = states.shape[0] - 1, states.shape[1]
    x = states[:-1].reshape(n * trajs, *states.shape[2:])
    return x, sigmas[:-1].repeat_interleave(trajs), labels.repeat(n), states[-1].repeat(n, 1, 1, 1)


def cmt_batch(teacher, noise, labels, sigmas):
    """Data-free CMT pairs: the teacher's DPM-Solver++ trajectories from x_T = 80 noise. sony/cmt's
    DPMSolverLoss cleans the trajectory and its target (nan_to_num) before regressing on them."""
    states = torch.stack(dpm_solver_pp(teacher, sigmas[0] * noise, labels, sigmas)).nan_to_num()
    return cmt_pairs(states, sigmas, labels)


def cmt_loss(net, pairs, cfg, vgg=None, gen=None):
    """L_CMT (paper Sec. 3): d(f(x_{s_i}, s_i), sg(x_hat_0)) over the 16 states of each trajectory.
    E-LatentLPIPS (`vgg`, augmentation drawn from `gen`) runs in float32, outside autocast, as sony/cmt's."""
    x, s, labels, target = pairs
    out = net(x, s, labels)
    if cfg["metric"] == "elatentlpips":
        with torch.autocast(out.device.type, enabled=False):
            return elatentlpips_distance(vgg.taps, out.float(), target.float(), gen)
    return distance(out, target, cfg["metric"], cfg["huber_c"])


class TeacherPairs:
    """This rank's CMT pairs, solved in bulk: one DPM-Solver++ run covers `traj_buffer` // (trajectories per
    iteration) iterations. Each micro-step still draws its labels and noise from its own micro_seed generator,
    so the pairs are the official one-at-a-time loop's (to float rounding), each trajectory is used once, and a
    resume re-solves its chunk bit-exactly. A buffer under one iteration's solves each micro-step alone (sony/cmt)."""

    def __init__(self, teacher, source, cfg, device, rank, world, accum):
        self.teacher, self.source, self.cfg, self.device = teacher, source, cfg, device
        self.slot = lambda micro: micro * world + rank
        self.accum, self.trajs = accum, cfg["batch_gpu"] // cfg["teacher_steps"]
        self.chunk = cfg["traj_buffer"] // (accum * self.trajs)  # iterations per solve, 0: one solve per micro-step
        self.sigmas = logsnr_grid(cfg["teacher_steps"], cfg["s_max"], cfg["s_lo"], device)
        self.first, self.states, self.labels = None, None, None

    def draw(self, it, micro):
        gen = torch.Generator(self.device).manual_seed(micro_seed(self.cfg["seed"], it, self.slot(micro)))
        _, labels = self.source.next(gen)
        shape = [self.trajs, self.cfg["img_channels"], self.cfg["res"], self.cfg["res"]]
        return torch.randn(shape, generator=gen, device=self.device), labels[:self.trajs]

    def get(self, it, micro):
        if not self.chunk:
            return cmt_batch(self.teacher, *self.draw(it, micro), self.sigmas)
        first = it - it % self.chunk
        if first != self.first:
            last = min(first + self.chunk, self.cfg["iters"])
            noise, labels = zip(*(self.draw(i, micro_i) for i in range(first, last) for micro_i in range(self.accum)))
            self.labels = torch.cat(labels)
            states = dpm_solver_pp(self.teacher, self.sigmas[0] * torch.cat(noise), self.labels, self.sigmas)
            self.first, self.states = first, torch.stack(states).nan_to_num()
        j = ((it - first) * self.accum + micro) * self.trajs
        return cmt_pairs(self.states[:, j:j + self.trajs], self.sigmas, self.labels[j:j + self.trajs])


def ect_t_to_r(t, q, stage=0, k=8.0, b=1.0):
    """r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))), clamped at 0 (ECT, Geng et al. 2024;
    locuslab/ect training/loss.py, ECMLoss)."""
    return (t * (1 - q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * t)))).clamp(min=0)


def consistency_pair_loss(net, x_t, t, x_r, r, y, labels, c, sigma_data):
    """(t^2 + sd^2)/(t sd)^2 * huber(f(x_t, t), sg(f(x_r, r))), f_r = y where r = 0; the second
    call reuses the first call's dropout mask and leaves the weights alone (sony/cmt loss.py)."""
    dev = x_t.device
    rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else torch.get_rng_state()
    f_t = net(x_t, t, labels)
    with torch.no_grad(), no_forced_wn(net):
        if dev.type == "cuda":
            torch.cuda.set_rng_state(rng, dev)
        else:
            torch.set_rng_state(rng)
        f_r = torch.where((r > 0).reshape(-1, 1, 1, 1), torch.nan_to_num(net(x_r, r, labels)), y)
    weight = (t ** 2 + sigma_data ** 2) / (t * sigma_data) ** 2
    return distance(f_t, f_r, "huber", c) * weight  # c = 0: the plain L2 norm |f_t - f_r|


# sony/cmt imagenet512 ct/cd_train_512 (run_ect_512.sh --tick=6.4 --double 50000) halve Delta t on progress-tick
# boundaries: tick 0 ends after the first iteration, every later tick after ceil(6.4 kimg / batch) iterations,
# and each tick's end starts stage (ticks done - 1) // --double (ct_training_loop_simpleema_512.py).
ECT_TICK_KIMG = 6.4


def ect_stage(it, batch, double, tick_kimg=ECT_TICK_KIMG):
    """Delta t halvings before iteration `it` (0-based) when Delta t halves every `double` ticks (0 = never)."""
    if not double or it == 0:
        return 0
    per_tick = math.ceil(round(tick_kimg * 1000) / batch)
    return (it - 1) // per_tick // double


# Unit round-off of the fast paths' network inputs: bfloat16 keeps 8 significant bits, TF32 11 (float32 24).
FAST_PATH_ROUNDING = {"bf16": ("bfloat16", 2.0 ** -8), "tf32": ("TF32", 2.0 ** -11)}


def check_post_precision(cfg):
    """ECT/ECD divide f(x_t, t) - f(x_r, r) by t - r, with x_t and x_r apart by (t - r)/t >= q^-(stage+1) relative:
    where that gap is below a fast path's rounding of the network's inputs, the loss is rounding noise (the tiny
    U-Net's per-sample ECT loss under bf16 autocast, median error vs float32: 7% at q = 256, where the gap equals
    bfloat16's rounding, 95% at q = 1024, 12x at q = 4096). sony/cmt runs ECT/ECD in float32 (run_ect_512.sh,
    run_ecd_512.sh: --fp16=0; EDM2's training loop turns TF32 off), so these combinations are refused."""
    last = ect_stage(cfg["iters"] - 1, cfg["batch"], cfg["ect_double"])
    gap = cfg["ect_q"] ** -(last + 1)
    for flag, (name, u) in FAST_PATH_ROUNDING.items():
        if cfg[flag] and gap < u:
            q = f"1/{cfg['ect_q']:g}" + (f"^{last + 1} (the last --ect-double stage)" if last else "")
            raise SystemExit(f"--{flag} with --stage post: ECT/ECD's inputs x_t and x_r differ by {q} = {gap:.2g} "
                             f"relative, below {name}'s rounding {u:.2g}: the loss would be rounding noise (drop "
                             f"--{flag}, or raise the gap with a smaller --ect-q)")


def sample_t_r(y, gen, cfg, it):
    t = torch.exp(cfg["p_mean"] + cfg["p_std"] * torch.randn([y.shape[0]], generator=gen, device=y.device))
    return t, ect_t_to_r(t, cfg["ect_q"], ect_stage(it, cfg["batch"], cfg["ect_double"]), cfg["k"], cfg["b"])


def ect_loss(net, y, labels, gen, cfg, it):
    """ECT (Geng et al. 2024; weighting and Huber of sony/cmt imagenet512 ECMLoss): x_r = y + r eps."""
    t, r = sample_t_r(y, gen, cfg, it)
    eps = torch.randn(y.shape, generator=gen, device=y.device)
    x_t, x_r = y + t.reshape(-1, 1, 1, 1) * eps, y + r.reshape(-1, 1, 1, 1) * eps
    return consistency_pair_loss(net, x_t, t, x_r, r, y, labels, cfg["huber_c"], cfg["sigma_data"])


def ecd_loss(net, teacher, y, labels, gen, cfg, it):
    """ECD (sony/cmt imagenet512/cd_train_512.py): x_r = one Heun/Euler step of the guided teacher from
    x_t = y + t eps to r."""
    t, r = sample_t_r(y, gen, cfg, it)
    x_t = y + t.reshape(-1, 1, 1, 1) * torch.randn(y.shape, generator=gen, device=y.device)
    with torch.no_grad(), torch.autocast(y.device.type, enabled=False):  # --bf16 autocasts the student only
        x_r = teacher_step(teacher, x_t, t, r, labels, cfg["solver"])
    return consistency_pair_loss(net, x_t, t, x_r, r, y, labels, cfg["huber_c"], cfg["sigma_data"])


def edm2_loss(net, y, labels, gen, cfg):
    """EDM2 pre-training loss with the learned uncertainty u(s) (EDM2 Eq. 21), per sample."""
    sigma = torch.exp(cfg["p_mean"] + cfg["p_std"] * torch.randn([y.shape[0]], generator=gen, device=y.device))
    noise = torch.randn(y.shape, generator=gen, device=y.device) * sigma.reshape(-1, 1, 1, 1)
    denoised, logvar = net(y + noise, sigma, labels, return_logvar=True)
    s = sigma.reshape(-1, 1, 1, 1)
    weight = (s ** 2 + cfg["sigma_data"] ** 2) / (s * cfg["sigma_data"]) ** 2
    return (weight / logvar.exp() * (denoised - y) ** 2 + logvar).flatten(1).sum(1)


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_fewstep(net, noise, labels, steps=2, mid_t=1.526, s_max=80.0, gen=None):
    """1 step: x = f(80 z, 80); 2 steps: x = f(x + mid_t z', mid_t) (student in eval mode). z' comes from `gen` on
    its own device (a CPU generator gives the same z' to a network on any device)."""
    ts = [s_max, mid_t][:steps]
    x = noise * ts[0]
    for i, t in enumerate(ts):
        if i > 0:
            z = torch.randn(x.shape, generator=gen, device=x.device if gen is None else gen.device)
            x = x + t * z.to(x.device)
        x = net(x, torch.full([x.shape[0]], t, device=x.device), labels, eval_mode=True)
    return x


def to_uint8(x, cfg, vae):
    """Model output -> uint8 NCHW pixels (EDM2 VAE decode for latents; EDM rounding (x 127.5 + 128) for pixels)."""
    if cfg["latent"]:
        return edm2_decode(vae, x)
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def save_grid(images, path, cols):
    """uint8 [N, C, H, W] -> PNG grid with `cols` columns."""
    n, c, h, w = images.shape
    rows = math.ceil(n / cols)
    grid = torch.zeros([rows * cols, c, h, w], dtype=torch.uint8)
    grid[:n] = images.cpu()
    grid = grid.reshape(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c).numpy()
    image = PIL.Image.fromarray(grid[..., 0] if c == 1 else grid[..., :3])
    write_atomic(path, lambda f: image.save(f, format="PNG"))


def sample_grid(net, cfg, device, vae, path, per_class=8):
    """The --grid fixed-noise samples of a training run's samples-*.png at 1 and 2 steps: one class per row of
    per_class, 1-step samples left, 2-step right (a short last row is padded with black)."""
    if cfg["latent"] and vae is None:
        return
    n = cfg["grid"]
    per_class = min(per_class, n)
    classes = -(-n // per_class)
    gen = torch.Generator(device).manual_seed(cfg["seed"])
    labels = torch.linspace(0, cfg["label_dim"] - 1, classes).round().long().repeat_interleave(per_class)[:n].to(device)
    z = torch.randn([n, cfg["img_channels"], cfg["res"], cfg["res"]], generator=gen, device=device)
    rows = []
    for steps in (1, 2):
        x = to_uint8(sample_fewstep(net, z, labels, steps, cfg["mid_t"], cfg["s_max"], gen if steps > 1 else None), cfg, vae)
        x = torch.cat([x, x.new_zeros([classes * per_class - n, *x.shape[1:]])])
        rows.append(x.reshape(classes, per_class, *x.shape[1:]))
    save_grid(torch.cat(rows, 1).flatten(0, 1), path, 2 * per_class)


def generate(cfg, device, rank, world, sampler, vae, tag):
    """Stage `sample`: this rank's share of `--num` images of uniform classes -> samples-<tag>.npz (uint8 NHWC; one
    file per rank if distributed) and a PNG grid, and FID with fid.py when --fid-ref is given."""
    bg = cfg["batch_gpu"]
    batches = [range(i, min(i + bg, cfg["num"])) for i in range(0, cfg["num"], bg)][rank::world]

    kept = []

    def images():  # kept on the CPU as they pass to fid.py
        for idx in batches:
            gen = torch.Generator(device).manual_seed(micro_seed(cfg["seed"], idx[0], 0))
            labels = torch.randint(cfg["label_dim"], (len(idx),), generator=gen, device=device)
            z = torch.randn([len(idx), cfg["img_channels"], cfg["res"], cfg["res"]], generator=gen, device=device)
            x = to_uint8(sampler(z, labels, gen).to(torch.float32), cfg, vae)
            kept.append(x.cpu())
            yield x

    fid_value = None
    if cfg["fid_ref"]:
        import fid
        try:
            mu_ref, sigma_ref = fid.load_ref(cfg["fid_ref"])
        except ValueError as e:
            raise SystemExit(f"--fid-ref {e}") from None
        mu, sigma, n = fid.inception_stats(images(), device=device)
        fid_value = fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)
    else:
        for _ in images():
            pass
    out = torch.cat(kept) if kept else torch.zeros([0, 3, 1, 1], dtype=torch.uint8)
    name = f"samples-{tag}.npz" if world == 1 else f"samples-{tag}-rank{rank}of{world}.npz"
    os.makedirs(cfg["outdir"], exist_ok=True)
    write_atomic(os.path.join(cfg["outdir"], name), lambda f: np.savez(f, images=out.permute(0, 2, 3, 1).numpy()))
    if rank == 0:
        save_grid(out[:64], os.path.join(cfg["outdir"], f"samples-{tag}.png"), 8)
        if fid_value is not None:
            print(f"[sample] FID {fid_value:.3f} ({tag}, {cfg['num']} images vs {cfg['fid_ref']})", flush=True)
            with open(os.path.join(cfg["outdir"], "metrics.jsonl"), "a") as f:
                f.write(json.dumps(dict(tag=tag, fid=fid_value, num=cfg["num"], ref=cfg["fid_ref"])) + "\n")
    return fid_value


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
    """torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) -> (rank, world, device): nccl on CUDA, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if (world > 1 or "LOCAL_RANK" in os.environ) and not torch.distributed.is_initialized():  # torchrun, even 1 process
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def rng_state(device):
    """This process's RNG states in weights_only-loadable form."""
    np_state, py_state = np.random.get_state(), random.getstate()
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                python=[py_state[0], list(py_state[1]), py_state[2]])


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    np.random.set_state((state["numpy"][0], state["numpy"][1].numpy().astype(np.uint32), *state["numpy"][2:]))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))


def write_atomic(path, write):
    """write(file) into a temp file, then os.replace: a crash or SIGKILL mid-write leaves the previous
    file intact, never a half-written one."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_vae(path, device):
    """--vae weights (None: none given), their errors as one line."""
    if path is None:
        return None
    try:
        return load_vae(path, device)
    except Exception as e:  # a missing, damaged or foreign file: the loaders then fail in any way
        raise SystemExit(f"--vae {path}: not readable sd-vae-ft-mse weights ({' '.join(str(e).split())[:200]})") from None


def learning_rate(cfg, it):
    """Linear decay to 0 over the run (official: lr (1 - kimg/total)), or constant."""
    return cfg["lr"] * (1 - it / cfg["iters"]) if cfg["lr_decay"] == "linear" else cfg["lr"]


def format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def init_student(cfg, teacher, logvar=False):
    """The trained network: from the teacher's weights (copy by name, no logvar head), a checkpoint
    .pt (its EMA) or an official .pkl, or random."""
    net = build_net(cfg, logvar=logvar)
    spec = cfg["init"]
    if spec is None:
        raise SystemExit("--init: give the checkpoint to start from (post: the mid-training ckpt-latest.pt), "
                         "or 'teacher' or 'random'")
    if spec == "teacher":
        if not isinstance(teacher, Precond):
            raise SystemExit("--init teacher: the teacher is not an EDM2 network (use --init random or a checkpoint)")
        copy_by_name(teacher.state_dict(), net)
    elif spec.endswith(".pt"):
        copy_into(read_checkpoint(spec, "--init")["ema"], net, f"--init {spec}")
    elif spec != "random":
        copy_into(read_official_pkl(spec, "--init")[0], net, f"--init {spec}")
    return net


def load_checkpoint(ckpt, net, ema, optimizer, cfg, stage, rank, world, device):
    """Weights and optimiser of a checkpoint, and each rank's RNG when it was written by as many processes as
    this run has (the data noise comes from micro_seed); returns (iteration, non-finite count)."""
    net.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    # Adam's moments come back in the checkpoint's memory layout; after a change of --channels-last, CUDA's fused
    # Adam would refuse them beside parameters of the other layout: give each moment its parameter's layout.
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p).copy_(v)
    if len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank], device)
    if rank == 0:
        print(f"[{stage}] resumed from {'ckpt-latest.pt' if cfg['resume'] == 'auto' else cfg['resume']} "
              f"at iteration {ckpt['iter']}", flush=True)
    return ckpt["iter"], ckpt["data_state"]["nonfinite"]


def write_checkpoint(outdir, net, ema, optimizer, it, nonfinite, cfg, stage, rank, world, device, snapshot):
    """ckpt-latest.pt and, if `snapshot`, the kept ckpt-NNNNNNN.pt, with every rank's RNG state (gathered: every
    rank must call this)."""
    rngs = [rng_state(device)]
    if world > 1:
        rngs = [None] * world
        torch.distributed.all_gather_object(rngs, rng_state(device))
    if rank == 0:
        ckpt = dict(model=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(), iter=it,
                    rng=rngs, data_state=dict(images_seen=it * cfg["batch"], seed=cfg["seed"], nonfinite=nonfinite),
                    config=json.loads(json.dumps(cfg)), stage=stage, script=SCRIPT)
        write_atomic(os.path.join(outdir, "ckpt-latest.pt"), lambda f: torch.save(ckpt, f))
        if snapshot:
            write_atomic(os.path.join(outdir, f"ckpt-{it:07d}.pt"), lambda f: torch.save(ckpt, f))


def accumulate_gradients(ddp, micro_loss, it, accum, cfg, rank, world, device):
    """Gradients of the mean loss over this rank's `accum` micro-batches, each from its own micro_seed generator (DDP
    averages over ranks, all-reducing on the last micro-step only); returns the summed loss on the device."""
    loss_acc = torch.zeros([], device=device)
    for micro in range(accum):
        gen = torch.Generator(device).manual_seed(micro_seed(cfg["seed"], it, micro * world + rank))
        sync = micro == accum - 1 or world == 1
        with (contextlib.nullcontext() if sync else ddp.no_sync()):
            loss = micro_loss(gen, it, micro).mean() / accum
            loss.backward()
        loss_acc += loss.detach()
    return loss_acc


def count_nonfinite(nonfinite, it, cfg, stage, rank):
    """One more step with a non-finite loss: say so (rank 0), abort past --max-nonfinite; returns the new count."""
    nonfinite += 1
    if rank == 0:
        print(f"[{stage}] iteration {it}: non-finite loss ({nonfinite}/{cfg['max_nonfinite']}), step "
              f"{'skipped' if cfg['skip_nonfinite'] else 'taken with nan_to_num gradients'}", flush=True)
    if nonfinite > cfg["max_nonfinite"]:
        raise SystemExit(f"[{stage}] aborting: more than --max-nonfinite {cfg['max_nonfinite']} non-finite "
                         "losses (lower --lr, check the teacher and the data)")
    return nonfinite


def apply_update(ema, optimizer, params, cfg, it):
    """nan_to_num the gradients, step at learning_rate(cfg, it), EMA p_ema = lerp(p, p_ema, beta); returns
    the grad norm."""
    for p in params:  # official sony/cmt imagenet512: nan -> 0, +-inf -> 0
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
    gnorm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
    for g in optimizer.param_groups:
        g["lr"] = learning_rate(cfg, it)
    optimizer.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), params, 1 - cfg["ema"])  # = lerp(p, p_ema, beta)
    return gnorm


def log_window(window, done, nonfinite, t_start, cfg, stage, stats_path, rank, world):
    """The stats.jsonl row and progress line of the steps since the last one, then a new window. `window`: its
    start (t, it), summed loss and grad norm (device tensors), steps taken and finite losses in it."""
    sec = time.time() - window["t"]
    if world > 1:  # the logged loss is the global mean (the grad norm already is, after DDP)
        torch.distributed.all_reduce(window["loss"])
        window["loss"] /= world
    loss_v = (window["loss"] / window["finite"]).item() if window["finite"] else None  # None: no finite loss
    gnorm_v = (window["gnorm"] / window["steps"]).item() if window["steps"] else None
    its = (done - window["it"]) / max(sec, 1e-9)
    if rank == 0:
        row = dict(iter=done, kimg=done * cfg["batch"] / 1e3, loss=loss_v, grad_norm=gnorm_v,
                   lr=learning_rate(cfg, done - 1), it_per_s=its, img_per_s=its * cfg["batch"], nonfinite=nonfinite,
                   sec=time.time() - t_start)
        with open(stats_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        eta = (cfg["iters"] - done) / max(its, 1e-9)
        shown = (f"loss {'-' if loss_v is None else f'{loss_v:.4f}'} "
                 f"gnorm {'-' if gnorm_v is None else f'{gnorm_v:.3g}'}")
        print(f"[{stage}] it {done}/{cfg['iters']} ({100 * done / cfg['iters']:.1f}%) {shown} | "
              f"{its:.3g} it/s {its * cfg['batch']:.3g} img/s | lr {row['lr']:.1e} nonfinite {nonfinite} | "
              f"ETA {format_duration(eta)}", flush=True)
    window["loss"].zero_(), window["gnorm"].zero_()
    window.update(steps=0, finite=0, t=time.time(), it=done)


def make_loss(cfg, stage, model, teacher_fn, accum, start, rank, world, device):
    """The stage's loss as micro_loss(gen, it, micro) -> per-sample losses of one micro-batch, its inputs from
    the data (pretrain, post: EDM2 or ECT/ECD), or the teacher's pairs (mid: CMT)."""
    toy = ToyMixture(cfg["label_dim"], cfg["res"], cfg["img_channels"]) if cfg["data"] == "toy" else None
    kind = "labels" if stage == "mid" else "toy" if toy is not None else "dataset"
    if kind == "dataset":
        if not cfg["data"]:
            raise SystemExit(f"--data: stage {stage} trains on data; give an EDM2 dataset (zip or folder)")
        if cfg["latent"]:
            check_latent_stats(cfg)
    source = BatchSource(cfg, kind, device, rank, world, accum, start, toy)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if cfg["bf16"] else contextlib.nullcontext()

    pairs = TeacherPairs(teacher_fn, source, cfg, device, rank, world, accum) if stage == "mid" else None
    vgg = load_latent_vgg(cfg["elpips_weights"], device) if stage == "mid" and cfg["metric"] == "elatentlpips" else None

    def micro_loss(gen, it, micro):
        if stage == "mid":
            aug = torch.Generator(device).manual_seed(micro_seed(cfg["seed"], it, micro * world + rank, 1)) if vgg else None
            batch = pairs.get(it, micro)  # the teacher's trajectories: float32, outside the student's autocast
            with amp:
                return cmt_loss(model, batch, cfg, vgg, aug)
        y, labels = source.next(gen)
        with amp:
            if stage == "pretrain":
                return edm2_loss(model, y, labels, gen, cfg)
            if cfg["post_loss"] == "ect":
                return ect_loss(model, y, labels, gen, cfg, it)
            return ecd_loss(model, teacher_fn, y, labels, gen, cfg, it)
    return micro_loss


def train(cfg, stage):
    """One training loop for every stage: DDP, accumulation, EMA, guard, checkpoints, logging."""
    rank, world, device = init_distributed()
    outdir = cfg["outdir"]
    ckpt = check_outdir(cfg)  # None: a fresh start
    cfg["batch_gpu"] = cfg["batch_gpu"] or cfg["batch"] // world
    accum = cfg["batch"] // (cfg["batch_gpu"] * world)
    if accum < 1 or accum * cfg["batch_gpu"] * world != cfg["batch"]:
        raise SystemExit(f"--batch {cfg['batch']} is not a multiple of --batch-gpu {cfg['batch_gpu']} x {world} GPUs")
    if stage == "mid" and cfg["batch_gpu"] % cfg["teacher_steps"]:
        raise SystemExit(f"--batch-gpu {cfg['batch_gpu']} must be a multiple of --teacher-steps {cfg['teacher_steps']} "
                         "(each micro-batch holds whole trajectories, one pair per teacher step)")
    if rank == 0:
        print(f"[{stage}] {cfg['iters']} iterations x {cfg['batch']} = {cfg['mimg']:.4g} Mimg; "
              f"{world} process(es) x batch-gpu {cfg['batch_gpu']} x accumulation {accum}; device {device}", flush=True)

    # Networks. Construction draws from the global RNG: seed it identically on every rank first.
    torch.manual_seed(cfg["seed"])
    teacher, teacher_fn = load_teachers(cfg, device) if stage in ("mid", "post") else (None, None)
    # A resumed run takes every weight from its checkpoint.
    net = init_student(cfg, teacher, logvar=stage == "pretrain") if ckpt is None else build_net(cfg, logvar=stage == "pretrain")
    net = net.to(device).train().requires_grad_(True)
    if cfg["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=1e-8,
                           fused=device.type == "cuda")
    torch.manual_seed(rank_seed(cfg["seed"], rank))  # dropout streams; data noise comes from micro_seed
    start, nonfinite = 0, 0
    if ckpt is not None:
        start, nonfinite = load_checkpoint(ckpt, net, ema, opt, cfg, stage, rank, world, device)
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                                    broadcast_buffers=False) if world > 1 else net
    if cfg["compile"] and world > 1:
        # Dynamo's DDP graph split (one graph per gradient bucket) breaks AOTAutograd on MPConv's in-forward weight
        # write (EDM2's forced weight normalisation); unsplit, DDP's all-reduce no longer overlaps the backward.
        torch._dynamo.config.optimize_ddp = False
    model = torch.compile(ddp) if cfg["compile"] else ddp

    micro_loss = make_loss(cfg, stage, model, teacher_fn, accum, start, rank, world, device)

    vae = open_vae(cfg["vae"], device) if rank == 0 else None
    if cfg["latent"] and vae is None and rank == 0:
        print(f"[{stage}] no --vae: latent sample grids are skipped", flush=True)
    if world > 1:
        torch.distributed.barrier()  # every rank has checked --outdir and its inputs before rank 0 writes
    if rank == 0:
        os.makedirs(outdir, exist_ok=True)
        write_atomic(os.path.join(outdir, "config.json"), lambda f: f.write(json.dumps(dict(cfg, stage=stage), indent=2).encode()))
    stats_path = os.path.join(outdir, "stats.jsonl")
    params = list(net.parameters())
    t_start = time.time()
    window = dict(loss=torch.zeros([], device=device), gnorm=torch.zeros([], device=device), steps=0, finite=0,
                  t=t_start, it=start)
    for it in range(start, cfg["iters"]):
        opt.zero_grad(set_to_none=True)
        loss_acc = accumulate_gradients(ddp, micro_loss, it, accum, cfg, rank, world, device)
        # Non-finite losses are counted: one device->host read per step (the only per-step sync), agreed over
        # ranks. As sony/cmt's training loops, the step is taken anyway with nan_to_num'd gradients;
        # --skip-nonfinite drops it instead.
        finite = torch.isfinite(loss_acc).to(torch.float32)
        if world > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        finite = finite.item() == 1
        if not finite:
            nonfinite = count_nonfinite(nonfinite, it, cfg, stage, rank)
        if finite or not cfg["skip_nonfinite"]:
            window["gnorm"] += apply_update(ema, opt, params, cfg, it).detach()
            window["steps"] += 1
        if finite:
            window["loss"] += loss_acc
            window["finite"] += 1

        done = it + 1
        if done % cfg["log_every"] == 0 or done == cfg["iters"]:
            log_window(window, done, nonfinite, t_start, cfg, stage, stats_path, rank, world)
        if cfg["ckpt_every"] and done % cfg["ckpt_every"] == 0 or done == cfg["iters"]:
            snapshot = done == cfg["iters"] or (cfg["snap_every"] and done % cfg["snap_every"] == 0)
            write_checkpoint(outdir, net, ema, opt, done, nonfinite, cfg, stage, rank, world, device, snapshot)
        if rank == 0 and stage != "pretrain" and cfg["grid"] and (
                done == cfg["iters"] or (cfg["sample_every"] and done % cfg["sample_every"] == 0)):
            sample_grid(ema, cfg, device, vae, os.path.join(outdir, f"samples-{done:07d}.png"))
    if rank == 0:
        print(f"[{stage}] done in {format_duration(time.time() - t_start)}; {os.path.join(outdir, 'ckpt-latest.pt')}", flush=True)
    return ema


# ----------------------------------------------------------------------------- stages
def run_sample(cfg):
    """--stage sample: --num images of --init (a checkpoint: its EMA, at each --sample-steps count) or --init
    teacher (the guided teacher's Heun reference), with FID through fid.py when --fid-ref is given."""
    rank, world, device = init_distributed()
    cfg["batch_gpu"] = cfg["batch_gpu"] or 32
    check_outdir(dict(cfg, resume=None))  # samples never overwrite an earlier run's files
    vae = open_vae(cfg["vae"], device) if cfg["latent"] else None
    if cfg["latent"] and vae is None:
        raise SystemExit("--vae: decoding latents needs the sd-vae-ft-mse weights (file or folder)")
    torch.manual_seed(cfg["seed"])
    if cfg["init"] == "teacher":
        guided = load_teachers(cfg, device)[1]
        sampler = lambda z, labels, gen: heun_sampler(guided, z, labels, cfg["heun_steps"], cfg["s_max"], cfg["s_lo"])  # noqa: E731
        tag = f"heun{cfg['heun_steps']}"
        return {tag: generate(cfg, device, rank, world, sampler, vae, tag)}
    if not cfg["init"]:
        raise SystemExit("--init: give the checkpoint to sample (ckpt-*.pt), or 'teacher' for the Heun reference")
    net = init_student(cfg, None).to(device).eval().requires_grad_(False)
    fids = {}
    for steps in cfg["sample_steps"]:
        sampler = lambda z, labels, gen: sample_fewstep(net, z, labels, steps, cfg["mid_t"], cfg["s_max"], gen)  # noqa: E731
        fids[f"{steps}step"] = generate(cfg, device, rank, world, sampler, vae, f"{steps}step")
    return fids


def center_crop_arr(img, size):
    """ADM's ImageNet crop (box-halve while >= 2x, bicubic resize of the short side, centre crop)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=PIL.Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=PIL.Image.BICUBIC)
    arr = np.asarray(img.convert("RGB"))
    y0, x0 = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y0:y0 + size, x0:x0 + size]


ENCODE_ENTRIES = re.compile(r"\d{5}|dataset\.json(\.tmp)?")  # what an encode writes into --outdir


def run_encode(cfg):
    """ImageNet folder (one subfolder per class, sorted synsets = class ids) -> EDM2 dataset folder:
    latent presets: NNNNN/img-mean-std-NNNNNNNN.npy ([mean, std], 8 x 64 x 64, pixels in [0, 1]
    through the VAE); pixel presets: NNNNN/img-NNNNNNNN.png at 64 x 64. Plus dataset.json, written last.
    Each file is written whole (temp file, then rename), so --resume auto continues an interrupted encode
    in its folder, skipping the images already there."""
    rank, world, device = init_distributed()
    src, out = cfg["data"], cfg["outdir"]
    if not src or not os.path.isdir(src):
        raise SystemExit("--data: give the ImageNet train folder (class subfolders) to encode")
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise SystemExit(f"--data: {src} has no class subfolders")
    files = [(os.path.join(c, f), k) for k, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(src, c))) if f.lower().endswith((".jpeg", ".jpg", ".png"))]
    if not files:
        raise SystemExit(f"--data: the class subfolders of {src} hold no .JPEG/.jpg/.png images")
    vae = open_vae(cfg["vae"], device) if cfg["latent"] else None
    if cfg["latent"] and vae is None:
        raise SystemExit("--vae: encoding latents needs the sd-vae-ft-mse weights (file or folder)")
    if cfg["resume"] not in (None, "auto"):
        raise SystemExit(f"--resume {cfg['resume']}: --stage encode continues with --resume auto (finished images "
                         "are kept)")
    held = sorted(os.listdir(out)) if cfg["resume"] and os.path.isdir(out) else []
    foreign = [name for name in held if not ENCODE_ENTRIES.fullmatch(name)]
    if foreign:
        raise SystemExit(f"--outdir {out}: holds {', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}, not "
                         "an encode's folders; choose a new --outdir")
    if not held:
        check_outdir(dict(cfg, resume=None))  # a new dataset goes into a new or empty folder
    if world > 1:
        torch.distributed.barrier()  # every rank has checked --outdir before any writes into it
    size = cfg["res"] * 8 if cfg["latent"] else cfg["res"]
    labels = []
    for idx, (name, label) in enumerate(files):
        stem = f"{idx // 1000:05d}/img-mean-std-{idx:08d}.npy" if cfg["latent"] else f"{idx // 1000:05d}/img-{idx:08d}.png"
        labels.append([stem, label])
        if idx % world != rank or os.path.exists(os.path.join(out, stem)):  # this rank's, not written yet
            continue
        try:
            img = center_crop_arr(PIL.Image.open(os.path.join(src, name)), size)
        except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise SystemExit(f"--data: {os.path.join(src, name)} is not a readable image ({e})") from None
        os.makedirs(os.path.join(out, stem.split("/")[0]), exist_ok=True)
        if cfg["latent"]:
            pix = torch.from_numpy(img.copy()).permute(2, 0, 1)[None]
            moments = edm2_encode_pixels(vae, pix)[0].cpu().numpy()
            write_atomic(os.path.join(out, stem), lambda f: np.save(f, moments))
        else:
            write_atomic(os.path.join(out, stem), lambda f: PIL.Image.fromarray(img).save(f, format="PNG"))
        if rank == 0 and idx % (1000 * world) == 0:
            print(f"[encode] {idx}/{len(files)}", flush=True)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        write_atomic(os.path.join(out, "dataset.json"), lambda f: f.write(json.dumps(dict(labels=labels)).encode()))
        print(f"[encode] {len(files)} images of {len(classes)} classes -> {out}", flush=True)


def run_tiny(cfg_base, args):
    """The CPU demo: (pretrain teacher |analytic) -> mid -> post, then the quality table."""
    out = cfg_base["outdir"]
    if args.resume not in (None, "auto"):
        raise SystemExit("--resume: the tiny pipeline continues with --resume auto (each stage from its own folder)")
    if args.resume is None:
        check_outdir(dict(outdir=out, resume=None))  # a fresh demo needs a new or empty folder
    resolve_config(argparse.Namespace(**dict(vars(args), stage="post")))  # refuse a bad post recipe before training
    walls, nets = {"teacher": 0.0}, {}
    teacher_spec = cfg_base["teacher"]
    if teacher_spec == "pretrain":
        t0 = time.time()
        c = resolve_config(argparse.Namespace(**dict(vars(args), stage="pretrain")))
        c.update(outdir=os.path.join(out, "pretrain"), init="random")
        train(c, "pretrain")
        walls["teacher"] = time.time() - t0
        teacher_spec = os.path.join(out, "pretrain", "ckpt-latest.pt")
    for stage in ("mid", "post"):
        t0 = time.time()
        c = resolve_config(argparse.Namespace(**dict(vars(args), stage=stage)))
        c.update(outdir=os.path.join(out, stage), teacher=teacher_spec)
        if stage == "mid" and teacher_spec == "analytic" and c["init"] == "teacher":
            c["init"] = "random"
        if stage == "post" and not args.init:
            c["init"] = os.path.join(out, "mid", "ckpt-latest.pt")
        nets[stage] = train(c, stage)
        walls[stage] = time.time() - t0
    c = resolve_config(argparse.Namespace(**dict(vars(args), stage="mid")))
    toy = ToyMixture(c["label_dim"], c["res"], c["img_channels"])
    return quality_table(c, toy, load_network(teacher_spec, c, "teacher"), nets, walls)


@torch.no_grad()
def quality_table(cfg, toy, teacher, nets, walls, n=None):
    """Flow-map error (MSE per element) vs the exact class-conditional ODE solution from the same noise, and pixel
    FD (of raw pixel vectors) vs fresh toy samples, for the teacher (Heun) and the 1-/2-step students; the 'data'
    row is FD's finite-sample floor. Prints the table, writes quality.txt and comparison.png, returns the rows."""
    import fid
    n = n or cfg["eval_num"]
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    labels = torch.randint(cfg["label_dim"], (n,), generator=gen)
    z = torch.randn([n, cfg["img_channels"], cfg["res"], cfg["res"]], generator=gen)
    exact = toy.flow(z * cfg["s_max"], cfg["s_max"], 0.0, labels)
    mu_ref, sig_ref = fid.mean_cov(toy.sample(n, generator=gen)[0].flatten(1).double().numpy())
    rows = []

    def add(name, steps, x, wall, err=None):
        x = x.to(torch.float32)
        mu, sig = fid.mean_cov(x.flatten(1).double().numpy())
        rows.append(dict(model=name, steps=steps, wall=wall,
                         flow_map_err=(x - exact).square().mean().item() if err is None else err,
                         pixel_fd=fid.frechet_distance(mu, sig, mu_ref, sig_ref)))

    add("data (FD floor)", "-", toy.sample(n, generator=gen)[0], 0.0, err=float("nan"))
    add("teacher (Heun)", 2 * cfg["heun_steps"] - 1,
        heun_sampler(teacher, z, labels, cfg["heun_steps"], cfg["s_max"], cfg["s_lo"]), walls["teacher"])
    names = dict(mid="mid (CMT)", post=f"post (CMT -> {cfg['post_loss'].upper()})")
    for stage, net in nets.items():  # on train()'s device (CUDA if any), from the same CPU-drawn noise
        dev = next(net.parameters()).device
        for steps in (1, 2):
            x = sample_fewstep(net, z.to(dev), labels.to(dev), steps, cfg["mid_t"], cfg["s_max"],
                               torch.Generator().manual_seed(7))
            add(names[stage], steps, x.cpu(), walls[stage])
    table = "\n".join([f"{'model':<26} {'steps':>10} {'flow-map err':>13} {'pixel FD':>10} {'wall time':>10}"] + [
        f"{r['model']:<26} {r['steps']:>10} {r['flow_map_err']:>13.5f} {r['pixel_fd']:>10.4f} {r['wall']:>9.1f}s"
        for r in rows])
    print(f"\nQuality on the toy mixture ({n} samples; flow-map err: MSE per element vs the exact ODE solution "
          "from the same noise and class; pixel FD vs fresh data; wall time of the stage that made the model):\n"
          + table, flush=True)
    write_atomic(os.path.join(cfg["outdir"], "quality.txt"), lambda f: f.write((table + "\n").encode()))
    k = 2 * cfg["label_dim"]  # the picture: two samples per class, the same noise in every row
    zk, lk = z[:k], torch.arange(k) % cfg["label_dim"]
    pics = [("exact flow map", toy.flow(zk * cfg["s_max"], cfg["s_max"], 0.0, lk)),
            ("teacher (Heun)", heun_sampler(teacher, zk, lk, cfg["heun_steps"], cfg["s_max"], cfg["s_lo"]))]
    for stage, net in nets.items():
        dev = next(net.parameters()).device
        for steps in (1, 2):
            x = sample_fewstep(net, zk.to(dev), lk.to(dev), steps, cfg["mid_t"], cfg["s_max"],
                               torch.Generator().manual_seed(7))
            pics.append((f"{names[stage]}, {steps} step{'s' * (steps > 1)}", x.cpu()))
    save_comparison(pics, os.path.join(cfg["outdir"], "comparison.png"))
    return rows


def save_comparison(rows, path, scale=8, gap=4):
    """One labelled row of tiles per (name, x [k, C, H, W] in [-1, 1]), each enlarged `scale` times."""
    import PIL.ImageDraw
    k, _, h, w = rows[0][1].shape
    label_w, th, tw = 190, h * scale, w * scale
    canvas = PIL.Image.new("RGB", (label_w + k * (tw + gap), len(rows) * (th + gap)), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for i, (name, x) in enumerate(rows):
        img = (x[:, :3].float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for j in range(k):
            tile = PIL.Image.fromarray(img[j]).resize((tw, th), PIL.Image.NEAREST)
            canvas.paste(tile, (label_w + j * (tw + gap), i * (th + gap)))
        draw.text((6, i * (th + gap) + th // 2 - 6), name, fill="black")
    write_atomic(path, lambda f: canvas.save(f, format="PNG"))


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
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    bool_flag = dict(action=argparse.BooleanOptionalAction, default=None)
    a("--stage", choices=["pretrain", "mid", "post", "sample", "encode"],
      help="what to run (default: the whole tiny pipeline with --preset tiny)")
    a("--preset", default=DEFAULT_PRESET, choices=list(PRESETS), metavar="PRESET",
      help=f"{', '.join(PRESETS)} (default: {DEFAULT_PRESET}, the paper's recipe)")
    a("--outdir", default="runs/cmt-imagenet", help="output folder (default: runs/cmt-imagenet)")
    a("--data", help="EDM2 dataset zip/folder (.npy latents or PNGs), 'toy', or the ImageNet folder for encode "
      "(default: none; tiny: toy)")
    a("--teacher", help="EDM2 .pkl path or URL, our .pt checkpoint, or 'analytic' (toy) (default: the preset's EDM2 "
      "teacher; tiny: pretrain)")
    a("--guide", help="guiding network for D_g = D_guide + w (D_teacher - D_guide): .pkl/.pt, 'analytic' (toy: the "
      "unconditional mixture) or 'none' (default: the preset's autoguidance net for post)")
    a("--guide-fp16", **bool_flag, help="run the guiding network in float16 on CUDA (default: as its EDM2 pickle's "
      "use_fp16, like sony/cmt; float32 for a .pt)")
    a("--guidance", type=float, help="guidance weight w; 1 = no guidance (default: preset, 2.05 for img512-xxl post)")
    a("--init", help="student init: checkpoint .pt (its EMA), EDM2 .pkl, 'teacher' or 'random'; for sample: the "
      "checkpoint, or 'teacher' for the Heun reference (default: mid teacher; post and sample: none, give one)")
    a("--resume", help="checkpoint to resume, or 'auto' = ckpt-latest.pt in --outdir if present; encode: 'auto' "
                       "continues an interrupted encode in --outdir (default: none)")
    a("--batch", type=int_at_least(1), help="global batch in images (mid: 16 states per trajectory) (default: 128)")
    a("--batch-gpu", type=int_at_least(1), help="per-GPU micro-batch (default: batch / GPUs; sample: 32)")
    a("--iters", type=int_at_least(1), help="training iterations (default: derived from --mimg)")
    a("--mimg", type=float, help="training length in million images (default: mid 12.8, post 16)")
    a("--lr", type=float, help="Adam learning rate (default: mid 2e-4, post 1e-6)")
    a("--lr-decay", choices=["linear", "constant"],
      help="learning rate over the run: linear to 0 or constant (default: mid linear, post constant, as sony/cmt)")
    a("--ema", type=float, help="EMA decay per iteration (default: mid 0.999, post 0.9999)")
    a("--seed", type=int_at_least(0), help="random seed (default: 0)")
    a("--fid-ref", help="reference statistics for FID in stage sample: .npz (mu, sigma) or EDM2 .pkl (default: none)")
    a("--bf16", **bool_flag, help="bfloat16 autocast of the student; the teacher stays float32 (default: off: fp32)")
    a("--tf32", **bool_flag, help="TF32 matmuls and cuDNN convolutions on CUDA (default: off: fp32)")
    a("--compile", **bool_flag, help="torch.compile the student (default: off)")
    a("--channels-last", **bool_flag, help="channels_last weights (default: off)")
    a("--cudnn-benchmark", **bool_flag, help="let cuDNN time its convolution algorithms and keep the fastest (EDM2's "
                                              "--bench, on there); a resume is then exact only to round-off (default: off)")
    a("--ckpt-every", type=int_at_least(0), help="iterations per ckpt-latest.pt, 0 = end only (default: 2000)")
    a("--snap-every", type=int_at_least(0), help="iterations per ckpt-NNNNNNN.pt snapshot, 0 = end only (default: 20000; "
      "tiny 0)")
    a("--sample-every", type=int_at_least(0), help="iterations per samples-NNNNNNN.png grid, 0 = end only (default: 20000)")
    a("--grid", type=int_at_least(0), help="images at each step count in every samples-NNNNNNN.png grid (mid, post), "
      "0 = none (default: 64)")
    a("--log-every", type=int_at_least(1), help="iterations between progress lines / stats.jsonl rows (default: 100)")
    a("--max-nonfinite", type=int_at_least(0), help="abort after this many steps with a non-finite loss (default: 100)")
    a("--skip-nonfinite", action="store_true", default=None, help="drop a step whose loss is non-finite (default: off: "
      "step with nan_to_num'd gradients, as sony/cmt)")
    a("--workers", type=int_at_least(0), help="DataLoader worker processes (default: 2)")
    a("--dropout", type=float, help="student dropout probability (default: 0)")
    a("--s-min", type=float, help="ECM eval-mode shift s_min, a noise level (default: 0, as the official EDM2 code)")
    a("--teacher-steps", type=int_at_least(1),
      help="mid: teacher DPM-Solver++ steps per trajectory = CMT pairs per trajectory (default: 16, official)")
    a("--traj-buffer", type=int_at_least(0), help="mid: teacher trajectories per rank solved in one batch, in whole "
      "iterations; fewer than one iteration's: one solve per micro-step, as sony/cmt (same pairs either way) "
      "(default: 128)")
    a("--metric", choices=["huber", "cauchy", "l2", "elatentlpips"], help="CMT distance; elatentlpips is sony/cmt's "
      "ImageNet-512 choice, but its weights are unpublished (default: huber)")
    a("--elpips-weights", help="--metric elatentlpips: state dict of the latent VGG16-GN "
      "(experiments/train_latent_vgg.py) (default: none)")
    a("--huber-c", type=float, help="Huber/Cauchy constant c, in data units (latent or [-1, 1] pixel values) "
      "(default: 0.06; tiny: 0.00054 sqrt(dim))")
    a("--post-loss", choices=["ecd", "ect"], help="post-training loss (default: ecd)")
    a("--solver", choices=["heun", "euler"], help="ECD teacher step (default: heun)")
    a("--ect-q", type=float, help="ECT/ECD r-mapping: Delta t = 1/q (default: 1024)")
    a("--ect-double", type=int_at_least(0),
      help="halve Delta t every N ticks of 6.4 kimg, as sony/cmt's --double (default: 0 = fixed q)")
    a("--p-mean", type=float, help="post: mean of ln t (default: -0.8)")
    a("--p-std", type=float, help="post: std of ln t (default: 1.6)")
    a("--mid-t", type=float, help="2-step sampling: intermediate noise level (default: 1.526)")
    a("--sample-steps", type=step_counts(2), help="sample stage: comma-separated student step counts, 1 or 2 (default: 2)")
    a("--heun-steps", type=int_at_least(1), help="teacher Heun steps for the reference sampler (default: 32)")
    a("--num", type=int_at_least(1), help="sample stage: number of images (default: 50000; tiny: 4096)")
    a("--eval-num", type=int_at_least(1), help="tiny demo: samples per quality-table row (default: 4096)")
    a("--vae", help="sd-vae-ft-mse weights (.safetensors/.bin or its folder), for latents (default: none)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.stage is None and args.preset != "tiny":
        raise SystemExit("--stage: choose a stage (only --preset tiny runs the whole pipeline by default)")
    cfg = resolve_config(argparse.Namespace(**dict(vars(args), stage=args.stage or "mid")))
    # Both ways: PyTorch's own default lets cuDNN convolutions run in TF32, which an fp32 run must not.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg["tf32"])
    torch.backends.cudnn.benchmark = bool(cfg["cudnn_benchmark"])
    if args.stage is None:
        return run_tiny(cfg, args)
    if args.stage in ("pretrain", "mid", "post"):
        return train(cfg, args.stage)
    return dict(sample=run_sample, encode=run_encode)[args.stage](cfg)


# ============================================================================= appendix
# Plumbing pasted verbatim between the scripts so that each one stays self-contained: here the official
# .pkl loader (also in cmt_cifar10.py) and the SD-VAE (also in meanflow_post.py). It stands after the method
# because a reader needs none of it to follow the method. test_cmt.py checks that the text between the
# marker lines is the same in every copy: edit all copies alike.


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


# >>> pasted: sd-vae
# ----------------------------------------------------------------------------- SD-VAE
# Stability AI's sd-vae-ft-mse in plain PyTorch, with the state_dict names of diffusers' AutoencoderKL
# (block_out_channels 128/256/512/512, layers_per_block 2, 248 tensors, 83,653,863 parameters) so that
# `diffusion_pytorch_model.safetensors` (or `.bin`) of the Hugging Face repo `stabilityai/sd-vae-ft-mse`
# loads strictly. Every norm is GroupNorm(32, eps 1e-6), every activation SiLU, dropout 0. The VAE is frozen
# and never differentiated with a JVP, so its attention may use F.scaled_dot_product_attention.


class VAEResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x))))))."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None  # 1x1 only when widths change

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class VAEAttention(nn.Module):
    """Single-head self-attention over all H*W positions with a GroupNorm in front and a residual."""

    def __init__(self, ch):
        super().__init__()
        self.group_norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # diffusers keeps a Dropout(0) at to_out.1

    def forward(self, x):
        n, c, h, w = x.shape
        seq = self.group_norm(x).reshape(n, c, h * w).transpose(1, 2)  # [N, HW, C]
        a = F.scaled_dot_product_attention(self.to_q(seq), self.to_k(seq), self.to_v(seq))  # scale 1/sqrt(C): one head
        return x + self.to_out[0](a).transpose(1, 2).reshape(n, c, h, w)


class VAEResample(nn.Module):
    """Downsample2D: zero-pad right and bottom by one, 3x3 conv stride 2. Upsample2D: nearest 2x, 3x3 conv."""

    def __init__(self, ch, up):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(ch, ch, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as in the original LDM autoencoder


class VAEBlock(nn.Module):
    """diffusers DownEncoderBlock2D (up=False) / UpDecoderBlock2D (up=True): resnets, then, except in the
    last block, a resampler under diffusers' key `downsamplers.0` / `upsamplers.0`."""

    def __init__(self, cin, cout, num_resnets, up, resample):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnetBlock(cin if i == 0 else cout, cout) for i in range(num_resnets)])
        self.samplers = "upsamplers" if up else "downsamplers"
        setattr(self, self.samplers, nn.ModuleList([VAEResample(cout, up)] if resample else []))

    def forward(self, x):
        for layer in [*self.resnets, *getattr(self, self.samplers)]:
            x = layer(x)
        return x


class VAEMidBlock(nn.Module):
    """diffusers UNetMidBlock2D at the lowest resolution: resnet, attention, resnet."""

    def __init__(self, ch):
        super().__init__()
        self.attentions = nn.ModuleList([VAEAttention(ch)])
        self.resnets = nn.ModuleList([VAEResnetBlock(ch, ch), VAEResnetBlock(ch, ch)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class VAEEncoder(nn.Module):
    def __init__(self, channels=(128, 256, 512, 512), num_resnets=2):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([VAEBlock(ci, co, num_resnets, up=False, resample=i < len(channels) - 1)
                                          for i, (ci, co) in enumerate(zip([channels[0], *channels[:-1]], channels))])
        self.mid_block = VAEMidBlock(channels[-1])
        self.conv_norm_out = nn.GroupNorm(32, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], 8, 3, padding=1)  # 2 x 4 latent channels: mean and logvar

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class VAEDecoder(nn.Module):
    def __init__(self, channels=(128, 256, 512, 512), num_resnets=3):
        super().__init__()
        rev = channels[::-1]
        self.conv_in = nn.Conv2d(4, rev[0], 3, padding=1)
        # Registered before mid_block only to list the keys in diffusers' order; the data flows mid -> up.
        self.up_blocks = nn.ModuleList([VAEBlock(ci, co, num_resnets, up=True, resample=i < len(rev) - 1)
                                        for i, (ci, co) in enumerate(zip([rev[0], *rev[:-1]], rev))])
        self.mid_block = VAEMidBlock(rev[0])
        self.conv_norm_out = nn.GroupNorm(32, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], 3, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """sd-vae-ft-mse. encode: pixels [N, 3, H, W] -> posterior (mean, std), each [N, 4, H/8, W/8]; decode:
    latents [N, 4, h, w] -> pixels [N, 3, 8h, 8w], not clamped. SD feeds and returns pixels in [-1, 1]; EDM2
    deliberately feeds [0, 1] (see edm2_encode_pixels). `batch` bounds memory; GroupNorm is per sample, so
    results do not depend on it. EDM2 and DiT run it in float32: call it outside bf16 autocast to match them."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = VAEEncoder(), VAEDecoder()
        self.quant_conv, self.post_quant_conv = nn.Conv2d(8, 8, 1), nn.Conv2d(4, 4, 1)

    def encode(self, x, batch=None):
        moments = torch.cat([self.quant_conv(self.encoder(c)) for c in x.split(batch or len(x))])
        mean, logvar = moments.chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # diffusers DiagonalGaussianDistribution

    def decode(self, z, batch=None):
        return torch.cat([self.decoder(self.post_quant_conv(c)) for c in z.split(batch or len(z))])


_VAE_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # BF16 read as raw bits


def read_safetensors(path):
    """{name: CPU tensor} of a .safetensors file in its stored dtypes, without the safetensors package. Format:
    8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}
    (offsets into the data that follows; an optional "__metadata__" entry holds strings), then the raw data."""
    with open(path, "rb") as f:
        blob = f.read()
    n = int.from_bytes(blob[:8], "little")
    if len(blob) < 8 or 8 + n > len(blob):
        raise ValueError(f"{path}: not a safetensors file of {len(blob)} bytes (truncated, or its header length "
                         "field is wrong)")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
        entries = [(name, info) for name, info in header.items() if name != "__metadata__"]
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: safetensors header is not a JSON object ({e})") from None
    data = memoryview(blob)[8 + n:]
    tensors = {}
    for name, info in entries:
        try:
            dtype, shape = info["dtype"], [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: malformed safetensors entry for {name!r}: {info!r}") from None
        if dtype not in _VAE_SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}; supported: "
                             f"{', '.join(_VAE_SAFETENSORS_DTYPES)}")
        np_dtype = np.dtype(_VAE_SAFETENSORS_DTYPES[dtype])
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end or end - begin != count * np_dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} has data_offsets {[begin, end]} inconsistent with "
                             f"dtype {dtype} and shape {shape}")
        if end > len(data):
            raise ValueError(f"{path}: tensor {name!r} ends at byte {end} of the data section but the file "
                             f"holds only {len(data)} bytes of data (truncated file)")
        a = np.frombuffer(data, dtype=np_dtype, count=count, offset=begin).astype(np_dtype.newbyteorder("="))
        # bfloat16 = the upper 16 bits of a float32; numpy has no bfloat16
        tensor = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if dtype == "BF16" else torch.from_numpy(a)
        tensors[name] = tensor.reshape(shape)
    return tensors


def load_vae(path, device="cpu"):
    """sd-vae-ft-mse weights in the diffusers layout from a .safetensors file, a .bin/.pt/.pth state_dict
    (torch.load weights_only), or a folder holding diffusion_pytorch_model.* (the Hugging Face repo layout).
    Accepts diffusers' attention names before 0.15 (query/key/value/proj_attn) and attention weights stored
    as 1x1 convs. Returns the frozen float32 model in eval mode."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [p for p in (os.path.join(path, f"diffusion_pytorch_model.{e}") for e in ("safetensors", "bin"))
                 if os.path.isfile(p)]
        if not found:
            raise FileNotFoundError(f"VAE folder {path} holds neither diffusion_pytorch_model.safetensors nor "
                                    "diffusion_pytorch_model.bin (expected the stabilityai/sd-vae-ft-mse layout)")
        path = found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VAE weights not found: {path} (expected sd-vae-ft-mse in the diffusers layout, "
                                "e.g. diffusion_pytorch_model.safetensors from stabilityai/sd-vae-ft-mse)")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        state = read_safetensors(path)
    elif ext in (".bin", ".pt", ".pth"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path}: expected a flat state_dict of tensors (diffusers layout)")
    else:
        raise ValueError(f"{path}: unknown VAE weight format {ext!r}; expected .safetensors, .bin, .pt or .pth "
                         "in the diffusers AutoencoderKL layout")
    converted = {}
    for name, tensor in state.items():
        m = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", name)
        if m:  # older diffusers names, which diffusers itself renames on load (_convert_deprecated_attention_blocks)
            name = f"{m[1]}.{_VAE_OLD_ATTENTION_NAMES[m[2]]}.{m[3]}"
        if name in converted:
            raise ValueError(f"{path}: {name} is present under both its old and its new attention name")
        if re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", name) and tensor.ndim == 4 \
                and tensor.shape[2:] == (1, 1):
            tensor = tensor.reshape(tensor.shape[:2])  # a 1x1 conv over pixels is the same linear map over channels
        converted[name] = tensor
    with torch.device("meta"):  # shapes only: skips a random init that the weights would overwrite
        vae = AutoencoderKL()
    expected = vae.state_dict()
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    if missing or unexpected:
        hint = " (this looks like the original CompVis/LDM layout; use the diffusers export)" \
            if any(k.startswith(("encoder.down.", "first_stage_model.")) for k in unexpected) else ""
        raise ValueError(f"{path}: not an sd-vae-ft-mse state_dict in the diffusers layout{hint}: "
                         f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:5]}")
    bad = [f"{k} {list(converted[k].shape)} != {list(v.shape)}" for k, v in expected.items()
           if converted[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensors have the wrong shape, e.g. {bad[:3]}")
    if not all(tensor.is_floating_point() for tensor in converted.values()):
        raise ValueError(f"{path}: VAE weights must be floating point")
    vae.load_state_dict({k: tensor.to(torch.float32) for k, tensor in converted.items()}, strict=True, assign=True)
    return vae.eval().requires_grad_(False).to(device)


def sample_latents(mean, std, generator=None):
    """One draw from the VAE posterior N(mean, std^2) (generator on mean's device). Datasets store the
    8-channel [mean, std] (NVlabs/edm2 training/encoders.py "raw latents"), so that every epoch sees a fresh
    draw, as EDM2 and MeanFlow do."""
    return mean + torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype) * std


# EDM2 convention (NVlabs/edm2 training/encoders.py, StabilityVAEEncoder): uint8 pixels are divided by 255
# and the VAE sees [0, 1] (not the [-1, 1] it was trained on: EDM2's statistics and checkpoints were made
# that way, so keep it); a latent drawn from [mean, std] is normalised per channel to std 0.5; decoded
# pixels are clamped to [0, 1] and scaled to uint8.
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)  # assumed mean of the raw latents, per channel
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)  # assumed std of the raw latents, per channel
EDM2_FINAL_STD = 0.5  # = sigma_data


@functools.lru_cache(maxsize=8)  # made once per device and dtype: no host->device copy (a GPU sync) per batch
def _edm2_scale_bias(device, dtype):
    scale = np.float32(EDM2_FINAL_STD) / np.array(EDM2_RAW_STD, np.float32)  # float32 as in EDM2
    bias = -np.array(EDM2_RAW_MEAN, np.float32) * scale
    return [torch.as_tensor(a, dtype=dtype, device=device).reshape(1, -1, 1, 1) for a in (scale, bias)]


def edm2_normalize_latents(z_raw):
    """Raw VAE latent [N, 4, h, w] -> EDM2 model latent z * scale + bias (scale 0.5/raw_std, bias -raw_mean*scale)."""
    scale, bias = _edm2_scale_bias(z_raw.device, z_raw.dtype)
    return z_raw * scale + bias


def edm2_unnormalize_latents(z):
    scale, bias = _edm2_scale_bias(z.device, z.dtype)
    return (z - bias) / scale


@torch.no_grad()
def edm2_encode_pixels(vae, images, batch=8):
    """uint8 [N, 3, H, W] -> raw latents [N, 8, H/8, W/8] = [mean, std], from pixels in [0, 1]."""
    mean, std = vae.encode(images.to(next(vae.parameters()).device, torch.float32) / 255, batch=batch)
    return torch.cat([mean, std], dim=1)


def edm2_encode_latents(raw, generator=None):
    """Raw latents [N, 8, h, w] (mean, std) -> EDM2 model latents [N, 4, h, w]: draw, then normalise."""
    return edm2_normalize_latents(sample_latents(*raw.to(torch.float32).chunk(2, dim=1), generator))


@torch.no_grad()
def edm2_decode(vae, z, batch=8):
    """EDM2 model latents [N, 4, h, w] -> uint8 pixels [N, 3, 8h, 8w] (clamp [0, 1], x255, truncate)."""
    x = vae.decode(edm2_unnormalize_latents(z.to(next(vae.parameters()).device, torch.float32)), batch=batch)
    return x.clamp(0, 1).mul(255).to(torch.uint8)


# MeanFlow/DiT convention (facebookresearch/DiT train.py and sample_ddp.py, Gsunshine/meanflow
# utils/vae_util.py): pixels in [-1, 1] (x/127.5 - 1), latent = draw * 0.18215 (diffusers' scaling_factor
# for this VAE); decoded pixels become uint8 as clip(127.5 x + 128, 0, 255).
SD_LATENT_SCALE = 0.18215


def sd_scale_latents(z_raw):
    return z_raw * SD_LATENT_SCALE


def sd_unscale_latents(z):
    return z / SD_LATENT_SCALE


@torch.no_grad()
def sd_encode_pixels(vae, images, batch=8):
    """uint8 [N, 3, H, W] -> raw latents [N, 8, H/8, W/8] = [mean, std], from pixels in [-1, 1]."""
    mean, std = vae.encode(images.to(next(vae.parameters()).device, torch.float32) / 127.5 - 1, batch=batch)
    return torch.cat([mean, std], dim=1)


def sd_encode_latents(raw, generator=None):
    """Raw latents [N, 8, h, w] (mean, std) -> MeanFlow/DiT model latents [N, 4, h, w]: draw, then scale."""
    return sd_scale_latents(sample_latents(*raw.to(torch.float32).chunk(2, dim=1), generator))


@torch.no_grad()
def sd_decode(vae, z, batch=8):
    """MeanFlow/DiT model latents [N, 4, h, w] -> uint8 pixels [N, 3, 8h, 8w] (127.5 x + 128, clip, truncate)."""
    x = vae.decode(sd_unscale_latents(z.to(next(vae.parameters()).device, torch.float32)), batch=batch)
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
# <<< pasted: sd-vae


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        if not isinstance(e.code, str):  # --help, or an exit status
            raise
        print(f"{SCRIPT}: error: {e.code}", file=sys.stderr)
        sys.exit(2)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # a rank that tears gloo down while a peer is still talking aborts
        torch.distributed.destroy_process_group()
