"""MeanFlow post-training initialised by Consistency Mid-Training (CMT-MF) on ImageNet-256 latents.

Reference implementation of the MeanFlow part of "Consistency Mid-Training" (CMT, arXiv 2509.24526), built on
MeanFlow (Geng et al., arXiv 2505.13447). Convention (MeanFlow): t = 1 is noise, t = 0 is data,

    z_t = (1 - t) x + t e,   v = e - x,   e ~ N(0, I),   x = SD-VAE latent * 0.18215.

Average velocity and flow map (a network u_theta(z, r, t) learns u):

    u(z_t, r, t) = 1/(t - r) * int_r^t v(z_s, s) ds,     z_r = z_t - (t - r) u(z_t, r, t),   u(z, t, t) = v(z, t).

MeanFlow identity (differentiate (t - r) u = int_r^t v in t):

    u(z_t, r, t) = v(z_t, t) - (t - r) du/dt,    du/dt = v . grad_z u + d_t u

du/dt is ONE forward-mode JVP of u_theta with tangents (v, 0, 1) in (z, r, t). `meanflow_loss`:

    u, du/dt = jvp(u_theta, (z, r, t), (v_g, 0, 1))              # one call gives both
    u_tgt    = sg(v_g - clip(t - r, 0, 1) du/dt)
    l        = sum (u - u_tgt)^2  per sample;   loss = mean( l / sg((l + c)^p) ),  p = 1, c = 0.01
               (so the logged MeanFlow loss stays near 1 while l >> c: watch samples, not the loss)
    t, r     = max/min of two sigmoid(N(-0.4, 1)) draws; r = t on 75% of each batch
    v_g      = omega v + kappa u(z, t, t | y) + (1 - omega - kappa) u(z, t, t | null)   (t in [t_start, t_end])
               (CFG inside training; v_g = v for the 10% of rows whose label is dropped to the null class)

CMT-MF mid-training (`cmt_mf_loss`): a cheap teacher (a small MeanFlow model run for M steps, or a
flow-matching velocity model with Euler/Heun) maps e to states z_{t_M} = e, ..., z_{t_0} (t_0 = 0).
Every ordered pair i > j of one trajectory gives an exact flow-map target for the student:

    u_theta(z_{t_i}, r = t_j, t = t_i)  ~  (z_{t_i} - z_{t_j}) / (t_i - t_j)        plain MSE, no JVP

(j = 0 is CMT-CM's "trajectory point -> endpoint"). Labels are dropped (prob 0.1) before the teacher runs,
so the student also learns the unconditional map; the teacher solves many micro-steps' trajectories in one
batch (`--traj-buffer`). The mid-trained student initialises MeanFlow post-training, which converges far
faster than from random init (paper: MF-XL/2 1-NFE FID 3.34 in 760 GPU-h vs 3.43 in 1520 GPU-h from scratch).

Stages (`--stage`): pretrain (MeanFlow from scratch: the small CMT teacher, e.g. MF-B/4, or a baseline), mid
(CMT-MF from --teacher, a checkpoint of this script), post (MeanFlow from --init PATH: its EMA weights, or
random), sample (1- and 2-NFE samples -> samples-*.png and samples-*.npz for fid.py), encode (ImageNet folder
-> latent shards of the SD-VAE posterior mean and std). Benchmark and evidence study:
experiments/bench_meanflow.py, experiments/study_meanflow.py.

Usage (8 GPUs; the `xl2` preset is the paper's recipe, `b4` the MeanFlow B/4 recipe):
    python meanflow_post.py --stage encode --data /data/imagenet/train --vae sd-vae-ft-mse.safetensors --outdir latents
    torchrun --nproc_per_node=8 meanflow_post.py --preset b4 --stage pretrain --data latents --outdir runs/teacher-b4
    torchrun --nproc_per_node=8 meanflow_post.py --stage mid --teacher runs/teacher-b4/ckpt-latest.pt --outdir runs/mid-xl2
    torchrun --nproc_per_node=8 meanflow_post.py --stage post --data latents --init runs/mid-xl2/ckpt-latest.pt --outdir runs/post-xl2
    torchrun --nproc_per_node=8 meanflow_post.py --stage sample --init runs/post-xl2/ckpt-latest.pt --vae VAE --num 50000 --outdir runs/post-xl2-samples
    python meanflow_post.py --preset tiny          # CPU demo: teacher -> mid -> post (+ baseline) -> quality table

Notes. --teacher takes only a checkpoint of this script: no official PyTorch MeanFlow checkpoint exists, and
the tiny preset trains its own teacher, as the paper does. Every micro-batch's randomness derives from (seed,
iteration, global micro-batch slot), so resume is exact and 2 GPUs compute the step of 1 GPU with 2
accumulation steps. torch.func.jvp does not work through DistributedDataParallel: every rank runs the
unwrapped module and the gradients (and the loss, for the non-finite guard) are all-reduced in buckets after
the last micro-step, as DDP's no_sync + final reduction would. --compile compiles plain forwards only; the
JVP path stays eager. --bf16 autocasts the network forwards (the jvp's primal and tangent alike); the tangent
inputs, u, du/dt, the target and the loss reductions stay float32. Outputs and run folders: see README.md;
ckpt-latest.pt comes every --ckpt-every, kept ckpt-NNNNNNN.pt snapshots every --snap-every; sample, encode and
the tiny pipeline also refuse a folder holding an earlier run (encode and the pipeline continue with --resume auto).
Details taken from the official MeanFlow code (Gsunshine/meanflow): r = t on exactly the first 75% of each
per-device batch; the dropped labels are the first k ~ Binomial(B, 0.1) rows; the CFG forwards use the
undropped labels; the per-sample loss sums over latent elements. Our choices where the papers are silent:
uniform t grids for the teacher and for 2-NFE sampling, Heun's correction on every step (v is finite at
t = 0), CMT-MF MSE as a mean over elements, and the same optimiser/EMA in every stage.
"""

import argparse
import copy
import functools
import json
import math
import os
import pickle
import random
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config
SCRIPT = "meanflow_post.py"  # recorded in every checkpoint: --init/--teacher/--resume refuse other scripts' files
# Config fields a resumed run may change (length, cadences, what sample and the tiny table compute, speed
# switches, the per-process split of the batch); every other field defines the run and must match the checkpoint's.
RESUME_MAY_CHANGE = {"iters", "mimg", "log_every", "ckpt_every", "snap_every", "sample_every", "grid", "resume", "outdir",
                     "max_nonfinite", "eval_num", "bf16", "tf32", "compile", "fid_ref", "num", "sample_steps", "vae",
                     "batch_gpu", "traj_buffer"}

# DiT sizes (depth, hidden, heads, patch); MeanFlow paper / official JAX models_dit.py. `tiny` is the CPU demo.
MODELS = {
    "B/4": dict(depth=12, hidden_size=768, num_heads=12, patch_size=4),
    "B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "M/2": dict(depth=16, hidden_size=1024, num_heads=16, patch_size=2),
    "L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    "tiny": dict(depth=2, hidden_size=96, num_heads=4, patch_size=2),
    "tiny-teacher": dict(depth=2, hidden_size=64, num_heads=4, patch_size=2),
}

IMAGENET_IMAGES = 1_281_167
EPOCH_ITERS_256 = IMAGENET_IMAGES / 256  # iterations per epoch at batch 256

# Shared defaults (MeanFlow ImageNet recipe, Gsunshine/meanflow configs/default.py).
BASE = dict(
    model="XL/2", data=None, res=32, channels=4, num_classes=1000, batch=256, batch_gpu=None,
    lr=1e-4, ema=0.9999, adam_betas=(0.9, 0.95), seed=0,
    p_mean=-0.4, p_std=1.0, ratio_neq=0.25, label_drop=0.1, norm_p=1.0, norm_eps=0.01,
    omega=1.0, kappa=0.5, t_start=0.0, t_end=1.0,
    teacher=None, teacher_solver="meanflow", teacher_steps=8, pairs=8, traj_buffer=128,
    init="random", log_every=100, ckpt_every=5000, snap_every=50000, sample_every=20000, grid=64, max_nonfinite=100,
)

# Per preset, per stage. Iteration counts marked * are our estimates (not published); see README.
PRESETS = {
    # The CMT paper's recipe: MF-B/4 teacher (8 steps) -> CMT-MF XL/2 -> MeanFlow XL/2 post-training.
    "xl2": dict(BASE, model="XL/2", omega=0.2, kappa=0.92, t_start=0.0, t_end=0.75, stages=dict(
        pretrain=dict(model="B/4", omega=1.0, kappa=0.5, t_end=1.0, iters=round(240 * EPOCH_ITERS_256)),
        mid=dict(iters=100_000),                                     # * 25.6 Mimg
        post=dict(iters=round(240 * EPOCH_ITERS_256 * 587 / 1520)),  # * paper's post GPU-h share of 240 epochs
    )),
    # MeanFlow B/4 from scratch, official run_b4.yml (240 epochs, omega 1.0, kappa 0.5): FID 11.35.
    "b4": dict(BASE, model="B/4", stages=dict(
        pretrain=dict(iters=round(240 * EPOCH_ITERS_256)),
        mid=dict(iters=100_000), post=dict(iters=round(240 * EPOCH_ITERS_256)),
    )),
    # CPU demo on the built-in class-conditional Gaussian mixture (4x8x8 "latents", 8 classes).
    # No guidance (omega 1, kappa 0), so every model targets the exact class-conditional flow map.
    "tiny": dict(BASE, model="tiny", data="toy", res=8, channels=4, num_classes=8, batch=64, lr=1e-3,
                 ema=0.995, omega=1.0, kappa=0.0, teacher_steps=4, pairs=4, log_every=100, ckpt_every=500, snap_every=0,
                 sample_every=0, eval_num=2000, stages=dict(
        pretrain=dict(model="tiny-teacher", iters=1000),
        mid=dict(iters=600),
        post=dict(iters=600),
    )),
}

# ----------------------------------------------------------------------------- data
def toy_mixture(num_classes=8, channels=4, res=8):
    """Built-in toy data: one isotropic Gaussian N(mu_k, s_k^2 I) per class, smooth patterned means."""
    g = np.random.RandomState(0)  # fixed: the toy data set is part of the program
    ii, jj = np.meshgrid(np.arange(res), np.arange(res), indexing="ij")
    mu = np.zeros((num_classes, channels, res, res))
    for k in range(num_classes):
        for c in range(channels):
            fi, fj = g.randint(0, 3, size=2)
            mu[k, c] = g.uniform(0.5, 1.0) * np.cos(2 * np.pi * (fi * ii + fj * jj) / res + g.uniform(0, 2 * np.pi))
    std = g.uniform(0.2, 0.5, size=num_classes)
    return torch.tensor(mu, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def toy_sample(mu, std, n, gen, device):
    """Class-balanced draw from the toy mixture: returns (x, y)."""
    y = torch.randint(0, mu.shape[0], (n,), generator=gen, device=device)
    x = mu.to(device)[y] + std.to(device)[y].view(-1, 1, 1, 1) * torch.randn((n, *mu.shape[1:]), generator=gen, device=device)
    return x, y


def gaussian_sigma(t, s):
    """Std of z_t for data N(mu, s^2 I): sig(t) = sqrt((1-t)^2 s^2 + t^2)."""
    return ((1 - t) ** 2 * s ** 2 + t ** 2).sqrt()


def gaussian_average_velocity(z, r, t, mu, s):
    """Exact u(z, r, t) for data N(mu, s^2 I), finite at r = t: each trajectory is z_t = (1-t) mu + sig(t) xi
    with xi fixed, so u = (z_t - z_r)/(t - r) in closed form. t, r, s broadcast against z."""
    xi = (z - (1 - t) * mu) / gaussian_sigma(t, s)
    return -mu + ((1 + s ** 2) * (t + r) - 2 * s ** 2) / (gaussian_sigma(t, s) + gaussian_sigma(r, s)) * xi


class LatentShards:
    """`--stage encode`'s shards: latents-NNNNN.npy ([n, 8, H, W] float32, the SD-VAE posterior mean and std, as
    the official MeanFlow pipeline stores) and labels-NNNNN.npy ([n] int64). A training latent is a fresh
    posterior draw times 0.18215; a batch is a function of a global sample counter, so resume continues it."""

    def __init__(self, path):
        path = Path(path)
        if not path.is_dir():
            raise SystemExit(f"--data {path}: no such folder (expected latent shards from --stage encode, or toy)")
        files = sorted(path.glob("latents-*.npy"))
        if not files:
            raise SystemExit(f"--data {path}: no latents-*.npy shards (make them with --stage encode)")
        try:
            self.lat = [np.load(f, mmap_mode="r") for f in files]
            self.lab = [np.load(f.with_name(f.name.replace("latents-", "labels-"))) for f in files]
        except (OSError, ValueError, EOFError) as e:  # a missing labels file, a damaged or truncated shard
            raise SystemExit(f"--data {path}: unreadable latent shards ({' '.join(str(e).split())[:160]})") from None
        self.offsets = np.cumsum([0] + [len(a) for a in self.lat])
        self.n, self._perm = int(self.offsets[-1]), (-1, None)
        if self.lat[0].shape[1] != 8:
            raise SystemExit(f"--data {path}: expected 8 channels (posterior mean and std), got {self.lat[0].shape[1:]}")

    def batch(self, start, n, seed, gen, device):
        """Rows [start, start + n) of the infinite stream of per-epoch permutations."""
        rows = []
        for pos in range(start, start + n):
            epoch, k = divmod(pos, self.n)
            if self._perm[0] != epoch:  # a fresh permutation per epoch, a function of (seed, epoch)
                self._perm = (epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)))
            rows.append(int(self._perm[1][k]))
        shards = np.searchsorted(self.offsets, rows, side="right") - 1
        moments = np.stack([self.lat[s][i - self.offsets[s]] for s, i in zip(shards, rows)])
        labels = np.array([self.lab[s][i - self.offsets[s]] for s, i in zip(shards, rows)])
        x = sd_encode_latents(to_device(torch.from_numpy(moments.astype(np.float32)), device), gen)
        return x, to_device(torch.from_numpy(labels.astype(np.int64)), device)


def to_device(x, device):
    """Host -> GPU copy that leaves the host free to queue more work: a copy from pageable memory waits until
    the GPU has finished everything queued before it, one from pinned memory need not."""
    return x.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else x.to(device)


# The SD-VAE, its safetensors reader and its latent conventions: see the appendix at the end of this file.

# ----------------------------------------------------------------------------- network
def timestep_embedding(t, dim=256, max_period=10000):
    """DiT/GLIDE sinusoidal embedding [cos, sin] of raw values (MeanFlow feeds t and h = t - r in [0, 1])."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)  # float32 at least, as DiT (float64 in tests)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t[:, None].to(dtype) * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim, grid):
    """MAE/DiT fixed 2-D sin-cos position embedding, [grid*grid, dim] (w coordinate first, as in DiT)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)


# modulate and DiTBlock's gated residuals are DiT's x * (1 + scale) + shift and x + gate * y, each as one
# torch.addcmul: the same values up to float rounding, and a MeanFlow jvp step at B/4 is 8% faster than with
# mul-then-add (fewer elementwise passes over the activations in the primal and in forward-mode's tangent).
def modulate(x, shift, scale):
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, freq_size=256):
        super().__init__()
        self.freq_size = freq_size
        self.mlp = nn.Sequential(nn.Linear(freq_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_size))


class LabelEmbedder(nn.Module):
    """num_classes + 1 rows; the last row is the null class used for CFG."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Plain tensor ops (no fused SDPA kernel): forward-mode AD (torch.func.jvp) must pass through."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * (C // self.num_heads) ** -0.5) @ k.transpose(-2, -1)
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block: the conditioning c regresses shift/scale/gate of both sub-layers."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = torch.addcmul(x, gate1.unsqueeze(1),
                          self.attn(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift1, scale1)))
        return torch.addcmul(x, gate2.unsqueeze(1),
                             self.mlp(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift2, scale2)))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale))


class DiTMF(nn.Module):
    """DiT-MF: DiT with adaLN-Zero and two timestep embedders (t and h = t - r), u_theta(z, r, t).
    State-dict names follow facebookresearch/DiT plus `h_embedder` (official MeanFlow models_dit.py)."""

    def __init__(self, input_size=32, in_channels=4, num_classes=1000, depth=28, hidden_size=1152,
                 num_heads=16, patch_size=2, mlp_ratio=4.0):
        super().__init__()
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        grid = input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.h_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        # Fixed, saved under the DiT key `pos_embed` (a buffer: it never receives gradients).
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed(hidden_size, grid)).float().unsqueeze(0))
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT initialisation: xavier linears, N(0, 0.02) label table and timestep MLPs, adaLN-Zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for emb in (self.t_embedder, self.h_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, h, y):
        """x [B, C, H, W]; t, h = t - r [B] raw in [0, 1]; y [B] class (num_classes = null). Returns u."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.h_embedder(h) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        B, T, _ = x.shape
        p, g = self.patch_size, int(T ** 0.5)
        x = x.reshape(B, g, g, p, p, self.in_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, self.in_channels, g * p, g * p)


def build_net(cfg):
    return DiTMF(input_size=cfg["res"], in_channels=cfg["channels"], num_classes=cfg["num_classes"], **MODELS[cfg["model"]])


def average_velocity(net, z, r, t, y):
    """u_theta(z, r, t | y): the network is fed t and h = t - r (official MeanFlow)."""
    return net(z, t, t - r, y)


# ----------------------------------------------------------------------------- teacher and solver
def load_ema_net(path, flag):
    """A network (architecture from the checkpoint's config) holding the checkpoint's EMA weights."""
    ckpt = read_checkpoint(path, flag)
    try:
        net = build_net(ckpt["config"])
        net.load_state_dict(ckpt["ema"])
    except (KeyError, TypeError, RuntimeError) as e:  # a config or weights this version cannot rebuild
        raise SystemExit(f"{flag} {path}: its config/EMA weights do not build a DiT-MF "
                         f"({' '.join(str(e).split())[:160]})") from None
    return net, ckpt["config"]


def open_vae(path, device="cpu"):
    """load_vae for a user's --vae: a missing, truncated or foreign file is one line."""
    try:
        return load_vae(path, device)
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise SystemExit(f"--vae {path}: not readable sd-vae-ft-mse weights ({reason})") from None


def time_grid(steps, device, dtype=torch.float32):
    """t_0 = 0 < t_1 < ... < t_M = 1, uniform (few-step MeanFlow sampling and the CMT-MF teacher)."""
    return torch.linspace(0, 1, steps + 1, device=device, dtype=dtype)


@torch.no_grad()
def teacher_trajectory(teacher, e, y, steps, solver):
    """States z_{t_M} = e, ..., z_{t_0} of the teacher's few-step sampler, returned as [M+1, B, ...]
    indexed by grid position (index 0 = t_0 = 0). `meanflow`: z_r = z_t - (t - r) u(z_t, r, t);
    `euler` / `heun`: the teacher is used as a flow-matching velocity v(z, t) = u(z, t, t)."""
    grid = time_grid(steps, e.device, e.dtype)
    ones = torch.ones(e.shape[0], device=e.device, dtype=e.dtype)
    states = [e]
    z = e
    for i in range(steps, 0, -1):
        t, r = grid[i] * ones, grid[i - 1] * ones
        dt = (grid[i] - grid[i - 1])
        if solver == "meanflow":
            z = z - dt * average_velocity(teacher, z, r, t, y).to(e.dtype)
        elif solver in ("euler", "heun"):
            v = average_velocity(teacher, z, t, t, y).to(e.dtype)
            if solver == "heun":
                v = 0.5 * (v + average_velocity(teacher, z - dt * v, r, r, y).to(e.dtype))
            z = z - dt * v
        else:
            raise ValueError(f"--teacher-solver {solver}: expected meanflow, euler or heun")
        states.append(z)
    return torch.stack(states[::-1]), grid


# ----------------------------------------------------------------------------- losses
def sample_t_r(n, p_mean, p_std, ratio_neq, gen, device):
    """MeanFlow (t, r): two i.i.d. sigmoid(N(p_mean, p_std)) draws, t = max, r = min; then the first
    int(n (1 - ratio_neq)) rows of the batch get r = t (official `data_proportion` = 0.75 per device batch)."""
    draw1 = torch.sigmoid(torch.randn(n, generator=gen, device=device) * p_std + p_mean)
    draw2 = torch.sigmoid(torch.randn(n, generator=gen, device=device) * p_std + p_mean)
    t, r = torch.maximum(draw1, draw2), torch.minimum(draw1, draw2)
    same = torch.arange(n, device=device) < int(n * (1 - ratio_neq))
    return t, torch.where(same, t, r)


def label_drop_mask(n, p, gen, device):
    """Official MeanFlow cond_drop: k ~ Binomial(n, p) rows are dropped, and they are the FIRST k rows
    (so with the time sampler above, unconditional rows are flow-matching rows r = t)."""
    k = (torch.rand(n, generator=gen, device=device) < p).sum()
    return torch.arange(n, device=device) < k


def guided_velocity(net, z, t, v, y, y_null, omega, kappa, t_start, t_end):
    """CFG inside training (Gsunshine/meanflow meanflow.py, MeanFlow.guidance_fn): v_g = w v + k u(z,t,t|y)
    + (1-w-k) u(z,t,t|null) with (w, k) = (omega, kappa) for t in [t_start, t_end] and (1, 0) outside.
    Both extra evaluations without grad."""
    if omega == 1.0 and kappa == 0.0:
        return v
    inside = ((t >= t_start) & (t <= t_end)).view(-1, 1, 1, 1)
    w = torch.where(inside, omega, 1.0)
    k = torch.where(inside, kappa, 0.0)
    null = torch.full_like(y, y_null)
    with torch.no_grad():
        if kappa != 0.0:
            u_both = average_velocity(net, z.repeat(2, 1, 1, 1), t.repeat(2), t.repeat(2), torch.cat([y, null])).to(v.dtype)
            u_cond, u_null = u_both.chunk(2)
        else:
            u_cond, u_null = 0.0, average_velocity(net, z, t, t, null).to(v.dtype)
    return w * v + k * u_cond + (1 - w - k) * u_null


def meanflow_target(v_g, dudt, t, r):
    """u_tgt = sg(v_g - clip(t - r, 0, 1) du/dt), the MeanFlow identity as a regression target."""
    return (v_g - (t - r).clamp(0, 1).view(-1, 1, 1, 1) * dudt).detach()


def adaptive_weight(l, p, c):
    """Adaptive loss weight 1 / sg((l + c)^p) (MeanFlow, p = 1, c = 0.01)."""
    return 1.0 / (l.detach() + c) ** p


def meanflow_loss(net, x, y, e, t, r, drop, cfg, eager_net=None, autocast=None):
    """MeanFlow loss for one micro-batch; all randomness comes in (x, y, e, t, r, drop) so the loss is a
    pure function (DDP and resume tests). `net` serves the no-grad CFG forwards (may be compiled),
    `eager_net` (default: net) the jvp. Returns (mean loss, per-sample l)."""
    eager_net = net if eager_net is None else eager_net
    autocast = autocast or torch.autocast(x.device.type, enabled=False)
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
    v = e - x
    with autocast:
        v_g = guided_velocity(net, z, t, v, y, eager_net.num_classes, cfg["omega"], cfg["kappa"], cfg["t_start"], cfg["t_end"])
    y_in = torch.where(drop, eager_net.num_classes, y)
    v_g = torch.where(drop.view(-1, 1, 1, 1), v, v_g)
    # A second autocast region: leaving the first cleared its cache of bf16 weight copies, made by the no-grad
    # forwards above without autograd history (torch releases with pytorch/pytorch#65766 reuse such copies
    # under grad mode: the weights would get no gradient).
    with autocast:
        # One jvp gives u and du/dt; tangents (v_g, 0, 1) in (z, r, t), the zero one by holding r fixed.
        u, dudt = torch.func.jvp(lambda z_, t_: average_velocity(eager_net, z_, r, t_, y_in), (z, t), (v_g, torch.ones_like(t)))
    dudt = dudt.detach().to(x.dtype)  # free the tangent graph at once: it is never backpropagated
    u_tgt = meanflow_target(v_g, dudt, t, r)
    l = (u.to(x.dtype) - u_tgt).square().sum(dim=(1, 2, 3))
    return (l * adaptive_weight(l, cfg["norm_p"], cfg["norm_eps"])).mean(), l


def cmt_mf_pairs(states, grid, pairs, gen):
    """CMT-MF training rows from teacher states [M+1, K, ...]: for each of the K trajectories `pairs` distinct
    ordered pairs i > j; returns (z_{t_i}, r = t_j, t = t_i, target (z_{t_i} - z_{t_j}) / (t_i - t_j), trajectory index)."""
    M, trajs = states.shape[0] - 1, states.shape[1]
    all_i, all_j = torch.tril_indices(M + 1, M + 1, offset=-1, device=states.device)  # i > j
    if pairs > all_i.numel():
        raise ValueError(f"--pairs {pairs}: at most M(M+1)/2 = {all_i.numel()} pairs for --teacher-steps {M}")
    pick = torch.rand(trajs, all_i.numel(), generator=gen, device=states.device).argsort(dim=1)[:, :pairs].flatten()
    n = torch.arange(trajs, device=states.device).repeat_interleave(pairs)
    i, j = all_i[pick], all_j[pick]
    z_i, z_j = states[i, n], states[j, n]
    t, r = grid[i], grid[j]
    return z_i, r, t, (z_i - z_j) / (t - r).view(-1, 1, 1, 1), n


def cmt_mf_loss(net, z, r, t, y, u_tgt):
    """CMT-MF: plain MSE between u_theta(z_{t_i}, t_j, t_i) and the teacher's chord velocity (no JVP, no sg
    needed: the target does not depend on theta)."""
    return (average_velocity(net, z, r, t, y).to(u_tgt.dtype) - u_tgt).square().mean()


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_fewstep(net, e, y, steps):
    """MeanFlow few-step sampler on the uniform grid: z_r = z_t - (t - r) u(z_t, r, t); 1 NFE: x = e - u(e, 0, 1)."""
    grid = time_grid(steps, e.device, e.dtype)
    ones = torch.ones(e.shape[0], device=e.device, dtype=e.dtype)
    z = e
    for i in range(steps, 0, -1):
        z = z - (grid[i] - grid[i - 1]) * average_velocity(net, z, grid[i - 1] * ones, grid[i] * ones, y).to(e.dtype)
    return z


def to_uint8(images):
    """[-1, 1] NCHW -> uint8 NHWC, (x * 127.5 + 128).clip(0, 255) (as NVlabs/edm generate.py)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images_nhwc, path, cols=None):
    """uint8 [N, H, W, C] -> PNG grid with `cols` columns (default: a square)."""
    from PIL import Image
    n, h, w, c = images_nhwc.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for k in range(n):
        grid[(k // cols) * h:(k // cols + 1) * h, (k % cols) * w:(k % cols + 1) * w] = images_nhwc[k]
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    write_atomic(path, lambda f: image.save(f, format="PNG"))


def latents_to_uint8(x, vae):
    """Model latents -> uint8 NHWC images: through the SD-VAE decoder, or (toy data, vae None) the first
    three latent channels shown as RGB."""
    if vae is None:
        return to_uint8(x[:, :3].clamp(-1, 1))
    return sd_decode(vae, x).permute(0, 2, 3, 1).cpu().numpy()


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
def micro_seed(seed, it, slot):
    """Seed of one micro-batch: a function of (seed, iteration, global slot) only, so resume is exact and
    the data and noise of a step do not depend on how it is split over ranks and accumulation."""
    return (seed * 1_000_003 + it) * 10_007 + slot


def init_distributed():
    """torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) -> (rank, world, device): nccl on CUDA, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if (world > 1 or "LOCAL_RANK" in os.environ) and not dist.is_initialized():  # torchrun, even 1 process
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def allreduce_grads(params, extra, world, bucket_numel=25_000_000):
    """Average gradients over ranks in flat buckets (the jvp runs on the unwrapped module, so DDP cannot
    do this). `extra` (the summed loss) rides along in the first bucket: every rank then sees the same
    loss and takes the same skip decision."""
    buckets, size = [[extra.view(1)]], 1
    for g in (p.grad for p in params):
        if size + g.numel() > bucket_numel:
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += g.numel()
    for bucket in buckets:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    return extra


class TeacherPairs:
    """This rank's CMT-MF teacher trajectories, solved in bulk: one teacher run covers a chunk of `traj_buffer` //
    (trajectories per iteration) iterations. Each micro-step still draws its labels, noise and pair picks from
    its own micro_seed generator, so the pairs are those of the one-at-a-time loop (to float rounding) and each
    trajectory is used once. Chunks start at multiples of their length: a resumed run re-solves its chunk and
    continues bit-exactly. A buffer under one iteration's trajectories solves each micro-step alone, when it is
    used (as sony/cmt training/loss.py, DPMSolverLoss, does for CMT)."""

    def __init__(self, solve, inputs, cfg, rank, accum, trajs):
        self.solve, self.inputs, self.iters, self.trajs = solve, inputs, cfg["iters"], trajs
        self.slots = range(rank * accum, (rank + 1) * accum)  # this rank's micro-batch slots (accumulate_gradients)
        self.chunk = cfg["traj_buffer"] // (accum * trajs)  # iterations per solve, 0: one solve per micro-step
        self.first, self.states, self.grid, self.y, self.gens = None, None, None, None, None

    def get(self, it, slot):
        """(states [M+1, trajs, ...], grid, y, gen) of one micro-step; gen goes on to pick its pairs."""
        if not self.chunk:
            gen, y, e = self.inputs(it, slot)
            return (*self.solve(e, y), y, gen)
        first = it - it % self.chunk
        if first != self.first:
            last = min(first + self.chunk, self.iters)
            self.gens, ys, es = zip(*(self.inputs(i, s) for i in range(first, last) for s in self.slots))
            self.y = torch.cat(ys)
            (self.states, self.grid), self.first = self.solve(torch.cat(es), self.y), first
        k = (it - first) * len(self.slots) + slot - self.slots[0]
        rows = slice(k * self.trajs, (k + 1) * self.trajs)
        return self.states[:, rows], self.grid, self.y[rows], self.gens[k]


def load_teacher(cfg, device):
    """--stage mid's teacher: the frozen EMA net of a checkpoint of this script (e.g. the MF-B/4 run)."""
    if not cfg["teacher"]:
        raise SystemExit("--teacher: --stage mid needs --teacher PATH (a checkpoint of this script, e.g. the MF-B/4 run)")
    teacher, tcfg = load_ema_net(cfg["teacher"], "--teacher")
    if tcfg["num_classes"] != cfg["num_classes"] or tcfg["res"] != cfg["res"] or tcfg["channels"] != cfg["channels"]:
        raise SystemExit(f"--teacher {cfg['teacher']}: expected the student's latent shape and classes "
                         f"({cfg['channels']}x{cfg['res']}x{cfg['res']}, {cfg['num_classes']} classes), got "
                         f"{tcfg['channels']}x{tcfg['res']}x{tcfg['res']}, {tcfg['num_classes']} classes")
    teacher = teacher.to(device).eval().requires_grad_(False)
    return torch.compile(teacher) if cfg.get("compile") else teacher


def init_weights(net, cfg):
    """--init: random (as built), `teacher` (the --teacher checkpoint) or a checkpoint PATH, whose EMA weights
    the student starts from (CMT: post-training continues from the mid-trained EMA)."""
    init = cfg["init"]
    if init == "random":
        return
    if init == "teacher":
        if not cfg["teacher"]:
            raise SystemExit("--init teacher: needs --teacher PATH (a checkpoint of this script)")
        init = cfg["teacher"]
    ckpt = read_checkpoint(init, "--init")
    try:
        net.load_state_dict(ckpt["ema"])
    except RuntimeError as e:  # another size or resolution
        raise SystemExit(f"--init {init}: its EMA weights do not fit --model {cfg['model']} "
                         f"({' '.join(str(e).split())[:160]})") from None


def make_optimizer(cfg, params, device):
    """Adam without weight decay (Gsunshine/meanflow configs/default.py); fused on CUDA."""
    return torch.optim.Adam(params, lr=cfg["lr"], betas=tuple(cfg["adam_betas"]), weight_decay=0,
                            fused=device.type == "cuda" or None)


def bf16_autocast(cfg, device):
    """--bf16: the forwards (and the jvp's tangents) in bfloat16 autocast; a no-op context without it."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg.get("bf16")))


def open_data(cfg, device):
    """Pretrain and post's images as batch(start, n, gen) -> (x, y): the toy mixture, or the latent shards
    from the global sample index `start` on."""
    if cfg["data"] == "toy":
        mu, std = (a.to(device) for a in toy_mixture(cfg["num_classes"], cfg["channels"], cfg["res"]))  # once
        return lambda start, n, gen: toy_sample(mu, std, n, gen, device)
    if not cfg["data"]:
        raise SystemExit(f"--data: --stage {cfg['stage']} needs --data PATH (latent shards from --stage encode) "
                         "or --data toy")
    shards = LatentShards(cfg["data"])
    return lambda start, n, gen: shards.batch(start, n, cfg["seed"], gen, device)


def mf_inputs(cfg, data, it, slot, batch_gpu, slots, device):
    """Everything random in one MeanFlow micro-batch, from its own micro_seed generator: (x, y, e, t, r, drop).
    `slots`: micro-batches per iteration over all ranks, which places this one's data."""
    gen = torch.Generator(device).manual_seed(micro_seed(cfg["seed"], it, slot))
    x, y = data((it * slots + slot) * batch_gpu, batch_gpu, gen)
    e = torch.randn(x.shape, generator=gen, device=device)
    t, r = sample_t_r(x.shape[0], cfg["p_mean"], cfg["p_std"], cfg["ratio_neq"], gen, device)
    return x, y, e, t, r, label_drop_mask(x.shape[0], cfg["label_drop"], gen, device)


def mid_inputs(cfg, it, slot, batch_gpu, device):
    """Everything random in one CMT-MF micro-batch before its teacher runs: (gen, y, e), one label and noise per
    trajectory; gen goes on to pick the pairs."""
    gen = torch.Generator(device).manual_seed(micro_seed(cfg["seed"], it, slot))
    y = torch.randint(0, cfg["num_classes"], (batch_gpu // cfg["pairs"],), generator=gen, device=device)
    drop = torch.rand(y.shape[0], generator=gen, device=device) < cfg["label_drop"]
    y = torch.where(drop, cfg["num_classes"], y)  # dropped before the teacher runs
    e = torch.randn((y.shape[0], cfg["channels"], cfg["res"], cfg["res"]), generator=gen, device=device)
    return gen, y, e


def solve_teacher(teacher, e, y, cfg):
    """The teacher's trajectories from e (any number of them) -> (states [M+1, B, ...], grid)."""
    with bf16_autocast(cfg, e.device):
        states, grid = teacher_trajectory(teacher, e, y, cfg["teacher_steps"], cfg["teacher_solver"])
    # As sony/cmt training/loss.py (DPMSolverLoss), the trajectory is cleaned before it becomes targets.
    return torch.nan_to_num(states.float()), grid


def make_loss(cfg, stage, net, teacher, batch_gpu, accum, rank, world, device):
    """The stage's loss as micro_loss(it, slot) -> the mean loss of micro-batch `slot` (global over ranks) of
    iteration `it`: MeanFlow (pretrain, post) or CMT-MF on the teacher's pairs (mid)."""
    fwd_net = torch.compile(net) if cfg.get("compile") else net  # plain forwards only: the jvp runs on `net`
    if stage != "mid":
        data = open_data(cfg, device)
        return lambda it, slot: meanflow_loss(fwd_net, *mf_inputs(cfg, data, it, slot, batch_gpu, world * accum, device),
                                              cfg, eager_net=net, autocast=bf16_autocast(cfg, device))[0]
    pairs = TeacherPairs(lambda e, y: solve_teacher(teacher, e, y, cfg),
                         lambda it, slot: mid_inputs(cfg, it, slot, batch_gpu, device), cfg, rank, accum,
                         batch_gpu // cfg["pairs"])

    def micro_loss(it, slot):
        states, grid, y, gen = pairs.get(it, slot)
        z, r, t, u_tgt, n = cmt_mf_pairs(states, grid, cfg["pairs"], gen)
        with bf16_autocast(cfg, device):
            return cmt_mf_loss(fwd_net, z, r, t, y[n], u_tgt)
    return micro_loss


def accumulate_gradients(params, micro_loss, it, rank, accum, world, device):
    """Gradients of one optimiser step (this rank's `accum` micro-batches, averaged over ranks) left in .grad;
    returns the global mean loss (a tensor, no host sync)."""
    for p in params:
        p.grad = torch.zeros_like(p)
    total = torch.zeros((), device=device)
    for micro in range(accum):
        loss = micro_loss(it, rank * accum + micro) / accum
        loss.backward()
        total += loss.detach()
    if world > 1:
        total = allreduce_grads(params, total, world)
    return total


def apply_update(net, ema, optimizer, params, ema_beta):
    """nan_to_num the gradients (as sony/cmt's training loops), step, EMA p_ema = lerp(p, p_ema, beta);
    returns the grad norm."""
    for p in params:
        p.grad.nan_to_num_(nan=0, posinf=1e5, neginf=-1e5)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
    optimizer.step()
    with torch.no_grad():  # one multi-tensor kernel, not one per parameter
        torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - ema_beta)
    return grad_norm


def count_nonfinite(nonfinite, it, cfg, is0):
    """One more non-finite step: say so (rank 0), abort past --max-nonfinite; returns the new count."""
    nonfinite += 1
    if is0:
        print(f"[{cfg['stage']}] it {it}: non-finite loss ({nonfinite} so far), step "
              f"{'skipped' if cfg['skip_nonfinite'] else 'taken with nan_to_num gradients'}", flush=True)
    if nonfinite > cfg["max_nonfinite"]:
        raise SystemExit(f"[{cfg['stage']}] aborting: more than --max-nonfinite {cfg['max_nonfinite']} "
                         "non-finite losses (lower --lr, or check the data/teacher)")
    return nonfinite


def log_window(window, done, nonfinite, t_start, cfg, outdir, is0):
    """The stats.jsonl row and progress line of the steps since the last one, then a new window. `window`:
    its start (t, it), summed loss and grad norm (device tensors), steps taken and finite losses in it."""
    iters, now = cfg["iters"], time.time()
    ips = (done - window["it"]) / max(now - window["t"], 1e-9)
    loss = (window["loss"] / window["finite"]).item() if window["finite"] else None
    row = dict(iter=done, kimg=done * cfg["batch"] / 1e3, loss=loss,
               grad_norm=(window["gnorm"] / max(window["steps"], 1)).item(), lr=cfg["lr"], it_per_s=ips,
               img_per_s=ips * cfg["batch"], nonfinite=nonfinite, sec=now - t_start)
    if is0:
        eta = (iters - done) / max(ips, 1e-9)
        shown = "-" if loss is None else f"{loss:.4f}"  # -: no finite loss in the window
        print(f"[{cfg['stage']}] it {done}/{iters} ({100 * done / iters:.1f}%) loss {shown} "
              f"gnorm {row['grad_norm']:.2f} | {ips:.1f} it/s {row['img_per_s']:.0f} img/s | "
              f"lr {cfg['lr']:.1e} nonfinite {nonfinite} | ETA {format_duration(eta)}", flush=True)
        with open(outdir / "stats.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    window.update(t=now, it=done, steps=0, finite=0)
    window["loss"].zero_()
    window["gnorm"].zero_()


def write_checkpoint(outdir, net, ema, optimizer, it, nonfinite, cfg, latest, snapshot):
    """One checkpoint (rank 0's RNG state) as ckpt-latest.pt (the one --resume auto reads) and/or as the kept
    snapshot ckpt-NNNNNNN.pt (an XL/2 checkpoint with Adam state is ~11 GB)."""
    ckpt = dict(model=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(), iter=it,
                rng=rng_state(), data_state=dict(samples=it * cfg["batch"], nonfinite=nonfinite), config=cfg,
                stage=cfg["stage"], script=SCRIPT)
    if latest:
        write_atomic(outdir / "ckpt-latest.pt", lambda f: torch.save(ckpt, f))
    if snapshot:
        write_atomic(outdir / f"ckpt-{it:07d}.pt", lambda f: torch.save(ckpt, f))


def load_checkpoint(ckpt, net, ema, optimizer):
    """Weights, optimiser and RNG of a checkpoint; returns (iteration, non-finite count)."""
    net.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return int(ckpt["iter"]), int(ckpt["data_state"]["nonfinite"])


def train(cfg, stage, outdir, rank=0, world=1, device=torch.device("cpu")):
    """One loop for every training stage: pretrain and post (MeanFlow), mid (CMT-MF); only the micro-batch loss
    differs (make_loss). Returns the run: net, ema, optimizer, teacher, it, nonfinite, outdir, device."""
    # The folder and stage of the run are part of its config (config.json, checkpoints).
    cfg = dict(cfg, outdir=str(outdir), stage=stage, resume=cfg.get("resume"))
    outdir, is0, iters = Path(outdir), rank == 0, cfg["iters"]
    batch_gpu = cfg["batch_gpu"] or cfg["batch"] // world
    if batch_gpu < 1 or cfg["batch"] % (batch_gpu * world):
        raise SystemExit(f"--batch {cfg['batch']}: expected a multiple of --batch-gpu {batch_gpu} x world size {world}")
    accum = cfg["batch"] // (batch_gpu * world)
    if stage == "mid" and batch_gpu % cfg["pairs"]:
        raise SystemExit(f"--batch-gpu {batch_gpu}: expected a multiple of --pairs {cfg['pairs']} "
                         "(rows = trajectories x pairs)")
    torch.manual_seed(cfg["seed"])  # same init on every rank
    net = build_net(cfg).to(device)
    init_weights(net, cfg)
    ema = copy.deepcopy(net).requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, device)
    teacher = load_teacher(cfg, device) if stage == "mid" else None
    micro_loss = make_loss(cfg, stage, net, teacher, batch_gpu, accum, rank, world, device)

    start, nonfinite = 0, 0
    ckpt = check_outdir(cfg)  # before any byte is written; None: a fresh start
    if ckpt is not None:
        start, nonfinite = load_checkpoint(ckpt, net, ema, optimizer)
    if world > 1:
        dist.barrier()  # every rank has checked --outdir before rank 0 writes into it
    if is0:
        outdir.mkdir(parents=True, exist_ok=True)
        write_atomic(outdir / "config.json", lambda f: f.write(json.dumps(cfg, indent=2).encode()))
    if world > 1:  # identical start on every rank
        for tensor in list(net.state_dict().values()) + list(ema.state_dict().values()):
            dist.broadcast(tensor, 0)
    if is0:
        print(f"[{stage}] {cfg['model']} {sum(p.numel() for p in params) / 1e6:.1f}M params | "
              f"batch {cfg['batch']} = {batch_gpu} x {world} ranks x {accum} accum | "
              f"{iters} it = {iters * cfg['batch'] / 1e6:.3f} Mimg | from it {start}", flush=True)

    net.train()
    t_start = time.time()
    window = dict(t=t_start, it=start, loss=torch.zeros((), device=device), gnorm=torch.zeros((), device=device),
                  steps=0, finite=0)
    done = start
    for it in range(start, iters):
        loss = accumulate_gradients(params, micro_loss, it, rank, accum, world, device)
        # Non-finite losses are counted: the one host sync per step (the loss is identical on all ranks). As
        # sony/cmt's training loops, the step is taken anyway with nan_to_num'd gradients; --skip-nonfinite
        # drops it instead.
        finite = bool(torch.isfinite(loss))
        if not finite:
            nonfinite = count_nonfinite(nonfinite, it, cfg, is0)
        if finite or not cfg["skip_nonfinite"]:
            window["gnorm"] += apply_update(net, ema, optimizer, params, cfg["ema"])
            window["steps"] += 1
        else:
            optimizer.zero_grad(set_to_none=True)
        if finite:
            window["loss"] += loss
            window["finite"] += 1

        done = it + 1
        if done % cfg["log_every"] == 0 or done == iters:
            log_window(window, done, nonfinite, t_start, cfg, outdir, is0)
        latest = cfg["ckpt_every"] and done % cfg["ckpt_every"] == 0 or done == iters
        snapshot = cfg["snap_every"] and done % cfg["snap_every"] == 0 or done == iters
        if is0 and (latest or snapshot):
            write_checkpoint(outdir, net, ema, optimizer, done, nonfinite, cfg, latest, snapshot)
        if is0 and cfg["grid"] and (done == iters or cfg["sample_every"] and done % cfg["sample_every"] == 0):
            sample_grid(ema, cfg, outdir / f"samples-{done:07d}.png", device)
    return SimpleNamespace(net=net, ema=ema, optimizer=optimizer, teacher=teacher, it=done, nonfinite=nonfinite,
                           outdir=outdir, device=device)


def sample_grid(ema, cfg, path, device):
    """The --grid fixed-noise 1-NFE samples of the EMA model in `path` (toy: first three latent channels; else
    VAE-decoded if --vae)."""
    gen = torch.Generator(device).manual_seed(cfg["seed"])
    n = cfg["grid"]
    e = torch.randn((n, cfg["channels"], cfg["res"], cfg["res"]), generator=gen, device=device)
    y = torch.arange(n, device=device) % cfg["num_classes"]
    x = sample_fewstep(ema.eval(), e, y, 1)
    vae = open_vae(cfg["vae"], device) if cfg.get("vae") else None
    save_grid(latents_to_uint8(x, vae), path, cols=min(8, n))


def write_atomic(path, write):
    """write(file) into a temp file, then os.replace: a crash or SIGKILL mid-write leaves the previous
    file intact, never a half-written one."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state():
    """Torch (CPU and CUDA), numpy and python RNG states in a weights_only-loadable form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    # CUDA: this process's device only (set_device ran), so a run may resume where fewer GPUs are visible
    return dict(torch=torch.get_rng_state(), cuda=[torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
                numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss),
                           gauss=float(gauss)),
                python=[version, list(internal), py_gauss])


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:  # checkpoints before 2026-12: every visible device's state
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda[0] if len(cuda) == 1 else cuda[torch.cuda.current_device()])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))


def format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------- evaluation and stages
@torch.no_grad()
def eval_batch(cfg, num):
    """The evaluation's fixed noise e, labels taking the classes in turn, and the exact class-conditional flow
    map z_0 = e - u(e, 0, 1) (toy data: every class is one Gaussian, so u is gaussian_average_velocity in
    closed form). Every row of the quality table and of comparison.png starts from this e."""
    mu, std = toy_mixture(cfg["num_classes"], cfg["channels"], cfg["res"])
    y = torch.arange(num) % cfg["num_classes"]
    e = torch.randn((num, cfg["channels"], cfg["res"], cfg["res"]), generator=torch.Generator().manual_seed(12345))
    s = std[y].double().view(-1, 1, 1, 1)  # per-sample class std, broadcast over C, H, W
    u = gaussian_average_velocity(e.double(), torch.zeros(()), torch.ones(()), mu[y].double(), s)
    return e, y, e - u.float()


def toy_fd(x, cfg, seed=54321):
    """Frechet distance of raw pixel vectors between x and as many fresh toy samples (drawn from `seed`)."""
    import fid
    mu, std = toy_mixture(cfg["num_classes"], cfg["channels"], cfg["res"])
    ref, _ = toy_sample(mu, std, len(x), torch.Generator().manual_seed(seed), "cpu")
    return fid.frechet_distance(*fid.mean_cov(x.flatten(1).double().numpy()), *fid.mean_cov(ref.flatten(1).double().numpy()))


@torch.no_grad()
def quality_row(net, cfg, steps, num):
    """Flow-map error of `steps`-step sampling against the exact map from the same noise (eval_batch) and
    pixel Frechet distance against fresh toy samples. Returns (err, fd, x), x the samples."""
    e, y, z0 = eval_batch(cfg, num)
    x = sample_fewstep(net.eval(), e, y, steps)
    return (x - z0).square().mean().item(), toy_fd(x, cfg), x


TINY_PIPELINE_ENTRIES = {"teacher", "mid", "post", "post-random", "quality.txt", "quality.txt.tmp", "comparison.png"}


def check_continued_outdir(outdir, resume, owned, what):
    """The folder of a job of several parts (the tiny pipeline, encode's shards): new or empty, or with --resume
    auto one that holds only its own parts (names `owned` accepts), which the job then continues."""
    out = Path(outdir)
    held = sorted(q.name for q in out.iterdir()) if out.is_dir() else []
    if resume is None or not held:
        return check_outdir(dict(outdir=str(out), resume=None))
    foreign = [name for name in held if not owned(name)]
    if foreign:
        raise SystemExit(f"--outdir {out}: holds {', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}, "
                         f"not {what}; choose a new --outdir")
    if not os.access(out, os.W_OK | os.X_OK):
        raise SystemExit(f"--outdir {out}: {out} is not a writable folder")
    return None


def run_tiny_pipeline(cfg_for, outdir, baseline=True):
    """--preset tiny without --stage: teacher (pretrain) -> mid -> post, plus post from random init at the
    same budget, then the quality table and comparison.png (for the same noise and labels: the exact map,
    the teacher, each student at 1 and 2 steps). With --resume auto (in cfg) every stage continues its folder."""
    outdir, post = Path(outdir), cfg_for("post")
    resume = post.get("resume")
    if resume not in (None, "auto"):
        raise SystemExit(f"--resume {resume}: the tiny pipeline continues with --resume auto (each stage from "
                         "its own folder's ckpt-latest.pt)")
    check_continued_outdir(outdir, resume, TINY_PIPELINE_ENTRIES.__contains__, "a run of the tiny pipeline")
    times, nets = {}, {}
    plan = [("pretrain", "teacher", {}), ("mid", "mid", {"teacher": str(outdir / "teacher" / "ckpt-latest.pt")}),
            ("post", "post", {"init": str(outdir / "mid" / "ckpt-latest.pt")})]
    if baseline:
        plan.append(("post", "post-random", {"init": "random"}))
    for stage, name, extra in plan:
        cfg, t0 = dict(cfg_for(stage), **extra), time.time()
        nets[name] = (train(cfg, stage, outdir / name).ema, cfg)
        times[name] = time.time() - t0
    names = {"teacher": "teacher (MF, pretrain)", "mid": "CMT-MF mid", "post": "MeanFlow post from mid",
             "post-random": "MeanFlow post from random (baseline)"}
    teacher_steps = cfg_for("mid")["teacher_steps"]
    rows = [("teacher", 1), ("teacher", teacher_steps), ("mid", 1), ("post", 1), ("post", 2)]
    rows += [("post-random", 1)] * baseline
    num, k = post["eval_num"], 2 * post["num_classes"]  # comparison.png: the first k samples, two per class
    lines = [f"{'model':<38} {'steps':>5} {'flow-map err':>13} {'pixel FD':>10} {'wall time':>10}"]
    shown = {}
    for name, steps in rows:
        net, cfg = nets[name]
        err, fd, x = quality_row(net, cfg, steps, num)
        shown[name, steps] = x[:k]
        lines.append(f"{names[name]:<38} {steps:>5} {err:>13.5f} {fd:>10.4f} {times[name]:>9.1f}s")
    mu, std = toy_mixture(post["num_classes"], post["channels"], post["res"])
    ref = toy_fd(toy_sample(mu, std, num, torch.Generator().manual_seed(1), "cpu")[0], post)  # the FD floor
    lines.append(f"{'(toy data vs fresh toy data)':<38} {'-':>5} {0.0:>13.5f} {ref:>10.4f} {'-':>10}")
    table = "\n".join(lines)
    print("\nQuality on the toy mixture (flow-map err: MSE per element vs the exact map from the same noise;\n"
          f"pixel FD: Frechet distance of raw {post['channels']}x{post['res']}x{post['res']} vectors vs {num} fresh "
          "samples)\n" + table, flush=True)
    write_atomic(outdir / "quality.txt", lambda f: f.write((table + "\n").encode()))
    # The picture reuses the table's samples; the rows the table leaves out are drawn from the same noise.
    e, y, z0 = (v[:k] for v in eval_batch(post, num))
    pics = [("exact flow map", z0)]
    students = [(name, steps) for name in nets if name != "teacher" for steps in (1, 2)]
    for name, steps in [("teacher", teacher_steps)] + students:
        x = shown[name, steps] if (name, steps) in shown else sample_fewstep(nets[name][0].eval(), e, y, steps)
        pics.append((f"{names[name]}, {steps} step{'s' * (steps > 1)}", x))
    save_comparison(pics, outdir / "comparison.png")
    return table


def save_comparison(rows, path, scale=8, gap=4):
    """One labelled row of tiles per (name, x [k, C, H, W] toy latents, the first three channels shown as RGB),
    each enlarged `scale` times so that 8x8 samples can be seen; as cmt_imagenet.py's save_comparison."""
    from PIL import Image, ImageDraw
    k, _, h, w = rows[0][1].shape
    label_w, th, tw = 290, h * scale, w * scale  # 290: the longest label in PIL's bitmap font (6 px a letter)
    canvas = Image.new("RGB", (label_w + k * (tw + gap), len(rows) * (th + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, x) in enumerate(rows):
        img = latents_to_uint8(x, None)
        for j in range(k):
            tile = Image.fromarray(img[j]).resize((tw, th), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (tw + gap), i * (th + gap)))
        draw.text((6, i * (th + gap) + th // 2 - 6), name, fill="black")
    write_atomic(path, lambda f: canvas.save(f, format="PNG"))


@torch.no_grad()
def run_sample(cfg, outdir, rank, world, device):
    """--stage sample: 1- and 2-step samples of the EMA model of --init PATH (a checkpoint of any stage) or
    --init teacher (= --teacher PATH): samples-<steps>step.npz (uint8 NHWC, key images) and a grid. Each
    rank samples its own chunks and writes them to a part file that rank 0 merges; with --fid-ref every rank
    feeds its own images to fid.inception_stats, which all-reduces the statistics."""
    init = cfg["teacher"] if cfg["init"] == "teacher" else cfg["init"]
    if not init or init == "random":
        raise SystemExit(f"--init {cfg['init']}: --stage sample needs --init PATH (a checkpoint of this script) or "
                         "--init teacher with --teacher PATH" + (" (no --teacher given)" if cfg["init"] == "teacher" else ""))
    if cfg.get("resume") is not None:
        raise SystemExit("--resume: --stage sample writes into a new or empty --outdir; it has nothing to resume")
    check_outdir(dict(cfg, outdir=str(outdir), resume=None))  # samples never overwrite an earlier run's files
    ref = read_fid_ref(cfg["fid_ref"]) if cfg.get("fid_ref") else None
    net, ncfg = load_ema_net(init, "--teacher" if cfg["init"] == "teacher" else "--init")
    net = net.to(device).eval()
    vae = None
    if ncfg["data"] != "toy":
        if not cfg.get("vae"):
            raise SystemExit("--vae: --stage sample on ImageNet latents needs --vae PATH (sd-vae-ft-mse weights)")
        vae = open_vae(cfg["vae"], device)
    if world > 1:
        dist.barrier()  # every rank has checked --outdir before any writes into it
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    num, bs = cfg["num"], cfg["batch_gpu"] or 64
    for steps in cfg["sample_steps"]:
        starts, chunks = [], []
        for start in range(rank * bs, num, world * bs):
            n = min(bs, num - start)
            gen = torch.Generator(device).manual_seed(micro_seed(cfg["seed"], 0, start))
            e = torch.randn((n, ncfg["channels"], ncfg["res"], ncfg["res"]), generator=gen, device=device)
            y = torch.randint(0, ncfg["num_classes"], (n,), generator=gen, device=device)
            with bf16_autocast(cfg, device):
                x = sample_fewstep(net, e, y, steps)
            starts.append(start)
            chunks.append(latents_to_uint8(x.float(), vae))
        mine = np.concatenate(chunks) if chunks else np.zeros((0,), np.uint8)
        part = outdir / f"samples-{steps}step.part{rank}.npz"
        sizes = np.array([len(c) for c in chunks], np.int64)
        write_atomic(part, lambda f: np.savez(f, images=mine, starts=np.array(starts, np.int64), sizes=sizes))
        if world > 1:
            dist.barrier()
        if rank == 0:
            pieces = []
            for peer in range(world):
                p = np.load(outdir / f"samples-{steps}step.part{peer}.npz")
                offsets = np.cumsum(np.concatenate([[0], p["sizes"]]))
                pieces += [(s, p["images"][offsets[k]:offsets[k + 1]]) for k, s in enumerate(p["starts"])]
            images = np.concatenate([img for _, img in sorted(pieces, key=lambda c: c[0])])
            write_atomic(outdir / f"samples-{steps}step.npz", lambda f: np.savez(f, images=images))
            save_grid(images[:64], outdir / f"samples-{steps}step.png", cols=8)
            for peer in range(world):
                (outdir / f"samples-{steps}step.part{peer}.npz").unlink()
            print(f"[sample] {num} images at {steps} steps (NFE) -> {outdir}/samples-{steps}step.npz", flush=True)
        if ref is not None:
            score = _fid(mine, ref, device)
            if rank == 0:
                print(f"[sample] FID ({steps} steps, {num} images): {score:.3f}", flush=True)


def read_fid_ref(path):
    """--fid-ref statistics (mu, sigma) through fid.py, read before any image is made, with the Inception weights
    found (or downloaded) then, so that a bad file or an offline machine is one line naming the flag instead of a
    traceback after sampling."""
    import fid
    try:
        ref = fid.load_ref(path)
        fid.resolve_weights()
    except ValueError as e:
        raise SystemExit(f"--fid-ref {e}") from None
    except (OSError, RuntimeError) as e:
        raise SystemExit(f"--fid-ref: FID needs the Inception weights: {' '.join(str(e).split())}") from None
    return ref


def _fid(images, ref, device):
    """FID of this rank's uint8 NHWC images against ref = (mu, sigma); inception_stats all-reduces over ranks."""
    import fid
    mu_ref, sigma_ref = ref
    batches = (torch.from_numpy(images[i:i + 250]).permute(0, 3, 1, 2) for i in range(0, len(images), 250))
    mu, sigma, _ = fid.inception_stats(batches, device=device)
    return fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)


def center_crop_arr(pil_image, image_size):
    """ADM center crop (used by DiT and MeanFlow to prepare ImageNet): halve with BOX while the short side
    is >= 2x the target, BICUBIC-resize the short side to the target, crop the center."""
    from PIL import Image
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image.convert("RGB"))
    cy, cx = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[cy:cy + image_size, cx:cx + image_size]


IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp", ".bmp")
SHARD_SIZE = 10_000  # images per latent shard
ENCODE_OUTPUTS = re.compile(r"(latents|labels)-\d{5}\.npy(\.tmp)?|dataset\.json(\.tmp)?")


@torch.no_grad()
def run_encode(cfg, outdir, rank, world, device):
    """ImageNet train folder (one subfolder per class, sorted names = labels 0..K-1) -> latent shards:
    latents-NNNNN.npy [n, 8, res/8, res/8] float32 (SD-VAE posterior mean, std of the ADM center crop
    in [-1, 1]) and labels-NNNNN.npy. Shards are split over ranks; with --resume auto, an --outdir that holds
    shards of an interrupted encode continues (finished shards are skipped)."""
    from PIL import Image
    root = Path(cfg["data"] or "")
    if not root.is_dir():
        raise SystemExit(f"--data {root}: expected an ImageNet train folder with one subfolder per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = [(f, k) for k, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not classes or not files:
        raise SystemExit(f"--data {root}: no class subfolders with images ({', '.join(IMAGE_EXTENSIONS)})")
    if not cfg.get("vae"):
        raise SystemExit("--vae: --stage encode needs --vae PATH (sd-vae-ft-mse weights, diffusers layout)")
    if cfg.get("resume") not in (None, "auto"):
        raise SystemExit(f"--resume {cfg['resume']}: --stage encode continues with --resume auto (finished shards "
                         "are kept)")
    check_continued_outdir(outdir, cfg.get("resume"), ENCODE_OUTPUTS.fullmatch, "latent shards of --stage encode")
    vae = open_vae(cfg["vae"], device)
    if world > 1:
        dist.barrier()  # every rank has checked --outdir before any writes into it
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    image_size, bs = cfg["res"] * 8, cfg["batch_gpu"] or 64
    for shard in range(rank, (len(files) + SHARD_SIZE - 1) // SHARD_SIZE, world):
        target = outdir / f"latents-{shard:05d}.npy"
        if target.is_file():
            continue
        part = files[shard * SHARD_SIZE:(shard + 1) * SHARD_SIZE]
        moments = []
        for i in range(0, len(part), bs):
            pixels = np.stack([center_crop_arr(Image.open(f), image_size) for f, _ in part[i:i + bs]])
            moments.append(sd_encode_pixels(vae, torch.from_numpy(pixels).permute(0, 3, 1, 2)).cpu().numpy())
        for name, array in ((f"labels-{shard:05d}.npy", np.array([k for _, k in part], np.int64)),
                            (target.name, np.concatenate(moments).astype(np.float32))):  # latents last: marks done
            write_atomic(outdir / name, lambda f: np.save(f, array))
        print(f"[encode] rank {rank}: shard {shard} ({len(part)} images) -> {target}", flush=True)
    if rank == 0:
        meta = dict(classes=classes, num_images=len(files), resolution=image_size, latent_scale=SD_LATENT_SCALE)
        write_atomic(outdir / "dataset.json", lambda f: f.write(json.dumps(meta).encode()))


# ----------------------------------------------------------------------------- entry point
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' only where the help text does not already state the default."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


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
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    a("--stage", choices=["pretrain", "mid", "post", "sample", "encode"],
      help="stage to run; none with --preset tiny = the whole CPU pipeline")
    a("--preset", choices=sorted(PRESETS), default="xl2", help="recipe: xl2 = CMT-MF XL/2 (paper), b4 = MeanFlow B/4, "
      "tiny = CPU demo")
    a("--outdir", default="runs/meanflow", help="output folder")
    a("--data", help="latent shards folder (encode: ImageNet train folder) or 'toy'; default: preset")
    a("--model", choices=sorted(MODELS), help="DiT-MF size; default: preset (per stage)")
    a("--teacher", help="mid: teacher checkpoint PATH (ckpt-*.pt of this script)")
    a("--teacher-solver", choices=["meanflow", "euler", "heun"], help="mid: teacher sampler; default: preset (meanflow)")
    a("--teacher-steps", type=int_at_least(1), help="mid: teacher steps M per trajectory on a uniform t grid (one "
      "network pass each; heun: two); default: preset (8; tiny 4)")
    a("--pairs", type=int_at_least(1), help="mid: ordered pairs (i > j) per trajectory per step; default: preset (8)")
    a("--traj-buffer", type=int_at_least(0), help="mid: teacher trajectories per rank solved in one batch, in whole "
      "iterations; fewer than one iteration's: one solve per micro-step (same pairs either way) (default: 128)")
    a("--init", help="post: PATH (a checkpoint: its EMA weights) | teacher | random; sample: the checkpoint PATH to "
      "sample, or teacher; default: random")
    a("--resume", help="PATH | auto (= outdir/ckpt-latest.pt if present, else a fresh start in an empty --outdir); "
      "the checkpoint must be of the same stage and recipe")
    a("--batch", type=int_at_least(1), help="global batch (images); default: preset (256)")
    a("--batch-gpu", type=int_at_least(1), help="per-GPU micro-batch; default: batch / world size")
    a("--iters", type=int_at_least(1), help="training iterations; default: preset (per stage)")
    a("--mimg", type=float, help="training length in million images (sets --iters = mimg*1e6/batch)")
    a("--lr", type=float, help="Adam learning rate, constant; default: preset (1e-4)")
    a("--ema", type=float, help="EMA decay per step; default: preset (0.9999)")
    a("--seed", type=int_at_least(0), help="random seed; per-rank and per-step seeds derive from it (default: 0)")
    a("--omega", type=float, help="training CFG omega; default: preset (xl2 0.2, b4 1.0)")
    a("--kappa", type=float, help="training CFG kappa; default: preset (xl2 0.92, b4 0.5)")
    a("--t-start", type=float, help="CFG interval start (t units) (default: 0)")
    a("--t-end", type=float, help="CFG interval end (t units); default: preset (xl2 0.75, b4 1.0)")
    a("--ratio-neq", type=float, help="fraction of rows with r != t (default: 0.25)")
    a("--label-drop", type=float, help="label dropout probability (default: 0.1)")
    a("--norm-p", type=float, help="adaptive weight power p (default: 1.0)")
    a("--norm-eps", type=float, help="adaptive weight constant c (default: 0.01)")
    a("--fid-ref", help="sample: reference .npz (mu, sigma) -> print FID via fid.py")
    a("--vae", help="SD-VAE weights (sd-vae-ft-mse, diffusers layout; .safetensors/.bin/.pt)")
    a("--num", type=int_at_least(1), default=50000, help="sample: number of images")
    a("--sample-steps", type=step_counts(), default=[1, 2], help="sample: comma-separated step counts (1 step = 1 NFE) "
      "(default: 1,2)")
    a("--eval-num", type=int_at_least(1), help="tiny: samples per quality-table row (default: 2000)")
    a("--bf16", action=argparse.BooleanOptionalAction, default=False,
      help="bfloat16 autocast for network forwards (tangents/targets/loss in fp32) (default: off: fp32)")
    a("--tf32", action=argparse.BooleanOptionalAction, default=False,
      help="TF32 matmuls and cuDNN convolutions on CUDA (default: off: fp32)")
    a("--compile", action=argparse.BooleanOptionalAction, default=False,
      help="torch.compile plain forwards (never the jvp path) (default: off)")
    a("--ckpt-every", type=int_at_least(0), help="iterations per ckpt-latest.pt, 0 = end only (default: 5000)")
    a("--snap-every", type=int_at_least(0), help="iterations per ckpt-NNNNNNN.pt snapshot, 0 = end only (default: "
      "50000; tiny 0)")
    a("--sample-every", type=int_at_least(0), help="iterations per samples-NNNNNNN.png grid, 0 = end only (default: "
      "20000; tiny 0)")
    a("--grid", type=int_at_least(0), help="images in each samples-NNNNNNN.png grid (1-NFE), 0 = none (default: 64)")
    a("--log-every", type=int_at_least(1), help="iterations per progress line / stats.jsonl row (default: 100)")
    a("--max-nonfinite", type=int_at_least(0), help="abort after this many steps with a non-finite loss (default: 100)")
    a("--skip-nonfinite", action="store_true", help="drop a step whose loss is non-finite (default: step with "
      "nan_to_num'd gradients, as sony/cmt)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


FLAG_KEYS = ["data", "model", "teacher", "teacher_solver", "teacher_steps", "pairs", "traj_buffer", "init", "batch",
             "batch_gpu", "iters", "lr", "ema", "seed", "omega", "kappa", "t_start", "t_end", "ratio_neq", "label_drop",
             "norm_p", "norm_eps", "ckpt_every", "snap_every", "sample_every", "grid", "log_every", "max_nonfinite",
             "eval_num"]


def check_values(cfg):
    """Numbers a user sets that argparse cannot check alone: one line naming the flag instead of a failure mid-run.
    (Integer flags are checked by their argparse type, int_at_least.)"""
    flag = lambda k: "--" + k.replace("_", "-")
    if not cfg["lr"] > 0:
        raise SystemExit(f"--lr {cfg['lr']}: expected a positive learning rate")
    if not 0 <= cfg["ema"] < 1:
        raise SystemExit(f"--ema {cfg['ema']}: expected a decay in [0, 1)")
    for k in ("ratio_neq", "label_drop"):
        if not 0 <= cfg[k] <= 1:
            raise SystemExit(f"{flag(k)} {cfg[k]}: expected a fraction in [0, 1]")
    most = cfg["teacher_steps"] * (cfg["teacher_steps"] + 1) // 2
    if cfg["pairs"] > most:
        raise SystemExit(f"--pairs {cfg['pairs']}: expected at most M(M+1)/2 = {most} pairs for --teacher-steps "
                         f"{cfg['teacher_steps']}")


def resolve_config(args, stage=None):
    """Preset -> its stage overrides -> flags that were set; for `stage` (default: --stage)."""
    stage = stage or args.stage
    preset = PRESETS[args.preset]
    cfg = {k: v for k, v in preset.items() if k != "stages"}
    cfg.update(preset["stages"].get(stage, {}))
    for k in FLAG_KEYS:
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    cfg.update(stage=stage, outdir=args.outdir, resume=args.resume, skip_nonfinite=args.skip_nonfinite, bf16=args.bf16,
               tf32=args.tf32, compile=args.compile, vae=args.vae, fid_ref=args.fid_ref, num=args.num,
               sample_steps=args.sample_steps)
    check_values(cfg)
    if args.mimg is not None:
        cfg["iters"] = int(round(args.mimg * 1e6 / cfg["batch"]))
        if not cfg["iters"] > 0:
            raise SystemExit(f"--mimg {args.mimg}: expected a positive length (it gives {cfg['iters']} iterations "
                             f"at --batch {cfg['batch']})")
    cfg["adam_betas"] = list(cfg["adam_betas"])
    cfg["mimg"] = cfg.get("iters", 0) * cfg["batch"] / 1e6
    if cfg["model"] not in MODELS:
        raise SystemExit(f"--model {cfg['model']}: expected one of {sorted(MODELS)}")
    return cfg


def main(argv=None):
    args = parse_args(argv)
    if args.stage is None and args.preset != "tiny":
        raise SystemExit("--stage is required (only --preset tiny runs the whole pipeline without it)")
    rank, world, device = init_distributed()
    # Both ways: PyTorch's own default lets cuDNN convolutions run in TF32, which an fp32 run must not.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    if args.stage is None:
        return run_tiny_pipeline(lambda s: resolve_config(args, s), args.outdir)
    cfg = resolve_config(args, args.stage)
    if args.stage in ("pretrain", "mid", "post"):
        return train(cfg, args.stage, args.outdir, rank, world, device)
    if args.stage == "sample":
        return run_sample(cfg, args.outdir, rank, world, device)
    return run_encode(cfg, args.outdir, rank, world, device)


def cli():
    """The command line: a user's mistake (SystemExit with a message) is one stderr line and exit code 2."""
    try:
        main()
    except SystemExit as e:
        if not isinstance(e.code, str):  # --help, or an explicit exit status
            raise
        print(f"{SCRIPT}: error: {e.code}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2)
    if dist.is_initialized():
        dist.barrier()  # a rank that tears gloo down while a peer is still talking aborts
        dist.destroy_process_group()


# ============================================================================= appendix
# Plumbing pasted verbatim between the scripts so that each one stays self-contained: here the SD-VAE
# (also in cmt_imagenet.py). It stands after the method because a reader needs none of it to follow the
# method. test_cmt.py checks that the text between the marker lines is the same in every copy: edit all
# copies alike.


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
    cli()
