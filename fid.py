"""Frechet Inception Distance (FID) with the protocol of EDM, ECT and CMT.

FID compares two image sets through the 2048-d pool features of Inception-v3 (the TF graph
inception-2015-12-05). With mu, S the mean and covariance of the features of each set,

    FID = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

The CMT paper (like EDM and ECT) reports FID-50K: 50,000 generated images against the statistics of
the full training set, the minimum over 3 sampling seeds. What this file pins down, because each
item moves the number:

* network: pytorch-fid's port of the TF graph, `pt_inception-2015-12-05-6726825d.pth` (torchvision
  Inception3 layout, 1008-way fc, BatchNorm eps 1e-3, TF's pooling quirks); the features are the
  global average pool in front of the fc. Loaded with strict=True; the download is SHA-256 verified.
* resize to 299x299, two modes:
    tf1 (default; EDM/StyleGAN/ECT/CMT): uint8 pixels, bilinear with source pixel j*W/299 (TF1's
        legacy resize, no half-pixel offset), clamped at the border, then (x - 128) / 128;
    pytorch-fid: x / 255, F.interpolate(bilinear, align_corners=False), then 2x - 1.
  Compare numbers only within one mode; the paper's numbers use tf1.
* statistics: running sum and sum of outer products in float64, unbiased covariance (N - 1).
  Reference files are .npz with keys `mu`, `sigma`; EDM's and ADM's .npz and EDM2's .pkl load as is.
* distance: the trace term from the eigenvalues of the symmetric matrix S_1^(1/2) S_2 S_1^(1/2) in
  float64 (real and finite even for singular covariances); the classic scipy sqrtm path (EDM,
  pytorch-fid) is kept as a cross-check (`calc --crosscheck`).

Usage:
    python fid.py ref  --data cifar-10-python.tar.gz --out cifar10-train.npz
    python fid.py calc --images samples.npz --ref cifar10-train.npz --num 50000 --seed 0
    torchrun --nproc_per_node=8 fid.py calc --images samples/ --ref cifar10-32x32.npz
    python fid.py bench   # img/s of resize + network at batch 50 on 32x32 inputs (random weights)

--data / --images take a folder of PNG/JPG images (searched recursively), an .npz of uint8 NHWC
images (key `images`, or its only array) or a quoted pattern matching several (read in sorted order:
cmt_imagenet.py's per-rank 'samples-2step-rank*of8.npz'), the CIFAR-10 python tarball (its 50,000
training images) or an EDM dataset zip. `--num N --seed S` picks N images the way EDM's fid.py does
(a seeded shuffle of the sorted file list), so subsets match EDM's; without --num every image is used.
Weights: `--weights PATH`, else $FID_WEIGHTS, else the cache folder ($CMT_CACHE or ~/.cache/cmt),
filled on first use by a verified download. Under torchrun every rank takes a shard and the
float64 sums are all-reduced.

In-process API (the training scripts import this module lazily for evaluation):
    mean_cov(x) -> (mu, sigma)                     float64 statistics of an [N, D] array
    frechet_distance(mu1, sigma1, mu2, sigma2)     -> float
    load_ref(path) -> (mu, sigma);  save_ref(path, mu, sigma)
    inception_stats(batches, weights=None, resize="tf1", device=None, num=None) -> (mu, sigma, n)
    open_images(path) -> dataset of uint8 [3, H, W] images;  image_batches(...) -> uint8 batches
"""

import argparse
import contextlib
import functools
import glob
import hashlib
import os
import pickle
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
# SHA-256 of that release file (95,628,359 bytes); its first 8 hex digits are the name's suffix.
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FEATURE_DIM = 2048
INPUT_SIZE = 299
RESIZE_MODES = ("tf1", "pytorch-fid")
MIN_IMAGES = 2048  # fewer samples than feature dims: singular covariance, FID biased upwards
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
LOG_EVERY_S = 10.0


def cache_dir():
    return Path(os.environ.get("CMT_CACHE") or Path.home() / ".cache" / "cmt")


# ----------------------------------------------------------------------------- data

class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays and refuses everything else (no code execution):
    for the CIFAR-10 batches and EDM2's reference statistics."""
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2 (re-exported CIFAR files)
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _image_to_chw(file, name):
    try:
        with PIL.Image.open(file) as img:
            array = np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for truncated or corrupt files
        raise ValueError(f"{name}: cannot read image ({e})") from e
    return array.transpose(2, 0, 1)


class ImageFiles(torch.utils.data.Dataset):
    """PNG/JPG files of a folder (recursive) or of an EDM dataset zip, in sorted path order."""

    def __init__(self, path):
        self.path = Path(path)
        self.is_zip = self.path.is_file()
        if self.is_zip:
            with zipfile.ZipFile(self.path) as z:
                names = z.namelist()
        else:
            names = [str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file()]
        self.names = sorted(n for n in names if n.lower().endswith(IMAGE_EXTS))
        if not self.names:
            raise ValueError(f"{path}: no PNG/JPG images found (searched recursively)")
        self._zip = None

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        name = self.names[i]
        if not self.is_zip:
            return _image_to_chw(self.path / name, self.path / name)
        if self._zip is None:  # opened lazily: one handle per DataLoader worker
            self._zip = zipfile.ZipFile(self.path)
        with self._zip.open(name) as f:
            return _image_to_chw(f, f"{self.path}:{name}")

    def __getstate__(self):
        return dict(self.__dict__, _zip=None)


class NpzImages(torch.utils.data.Dataset):
    """uint8 NHWC images in an .npz (key `images`, or its only array), read image by image."""

    def __init__(self, path):
        self.path = path
        try:
            with zipfile.ZipFile(path) as z:
                keys = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
                key = "images" if "images" in keys else keys[0] if len(keys) == 1 else None
                if key is None:
                    raise ValueError(f"{path}: expected an array named 'images' or a single array, "
                                     f"found {keys}")
                with z.open(key + ".npy") as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(f)
                    self.offset = f.tell()
        except (OSError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: cannot read .npz ({e})") from e
        if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3) or fortran:
            raise ValueError(f"{path}: expected uint8 images [N, H, W, 3] (NHWC) in {key!r}, "
                             f"got {dtype} {list(shape)}")
        self.key, self.shape = key, shape
        self._file = None

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, i):
        if self._file is None:
            self._file = zipfile.ZipFile(self.path).open(self.key + ".npy")
        _, h, w, c = self.shape
        self._file.seek(self.offset + i * h * w * c)  # forward seeks only: indices are sorted
        image = np.frombuffer(self._file.read(h * w * c), np.uint8).reshape(h, w, c)
        return np.repeat(image, 3, axis=2).transpose(2, 0, 1) if c == 1 else image.transpose(2, 0, 1)

    def __getstate__(self):
        return dict(self.__dict__, _file=None)


class Cifar10Train(torch.utils.data.Dataset):
    """The 50,000 training images of the CIFAR-10 python tarball (cifar-10-python.tar.gz)."""

    def __init__(self, path):
        members = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
        try:
            with tarfile.open(path, "r:gz") as tar:
                batches = [_NumpyUnpickler(tar.extractfile(m), encoding="bytes").load()[b"data"]
                           for m in members]
        except (OSError, KeyError, tarfile.TarError, pickle.UnpicklingError) as e:
            raise ValueError(f"{path}: not the CIFAR-10 python tarball ({e})") from e
        self.images = np.concatenate(batches).reshape(-1, 3, 32, 32)  # rows are CHW, uint8

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def open_images(path):
    """Dataset of uint8 [3, H, W] images from a folder, .npz (or a pattern matching several), CIFAR-10 tarball
    or EDM zip."""
    p = Path(path)
    if not p.exists() and any(c in str(path) for c in "*?["):  # e.g. a torchrun sample stage's per-rank files
        files = sorted(glob.glob(str(path)))
        if not files or not all(f.lower().endswith(".npz") for f in files):
            raise ValueError(f"{path}: a pattern must match .npz files only (it matched {files or 'nothing'})")
        parts = [NpzImages(Path(f)) for f in files]
        if len({part.shape[1:] for part in parts}) > 1:
            raise ValueError(f"{path}: the matched .npz files hold images of different sizes")
        return torch.utils.data.ConcatDataset(parts)
    if p.is_dir():
        return ImageFiles(p)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    name = p.name.lower()
    if name.endswith(".npz"):
        return NpzImages(p)
    if name.endswith((".tar.gz", ".tgz")):
        return Cifar10Train(p)
    if name.endswith(".zip"):
        return ImageFiles(p)
    raise ValueError(f"{path}: expected a folder of PNG/JPG, an .npz of uint8 NHWC images, "
                     "cifar-10-python.tar.gz or an EDM dataset .zip")


def select_indices(total, num=None, seed=0):
    """EDM's subset rule: `num` of `total` indices by a seeded shuffle, then sorted."""
    if num is None or num == total:
        return np.arange(total)
    if num > total:
        raise ValueError(f"--num {num}: only {total} images found")
    idx = np.arange(total)
    np.random.RandomState(seed % (1 << 31)).shuffle(idx)
    return np.sort(idx[:num])


def _stack(images):
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes in one batch: {sorted(shapes)}; resize them first")
    return torch.from_numpy(np.stack(images))


def image_batches(dataset, indices, batch=50, rank=0, world_size=1, workers=0):
    """uint8 [B, 3, H, W] batches of `dataset[indices]` for this rank (EDM's round-robin shards)."""
    num_batches = max((len(indices) - 1) // (batch * world_size) + 1, 1) * world_size
    shards = [s.tolist() for s in np.array_split(indices, num_batches)[rank::world_size] if len(s)]
    return torch.utils.data.DataLoader(dataset, batch_sampler=shards, num_workers=workers,
                                       collate_fn=_stack, pin_memory=torch.cuda.is_available())


# ----------------------------------------------------------------------------- weights

def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, dest, sha256):
    """Fetch `url` into `dest` atomically; content whose SHA-256 is not `sha256` is discarded."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        except (OSError, urllib.error.URLError) as e:
            raise RuntimeError(f"could not download {url}: {e}") from e
        if digest.hexdigest() != sha256:
            raise RuntimeError(f"download of {url} has sha256 {digest.hexdigest()}, expected {sha256}; "
                               "the file was discarded")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def resolve_weights(weights=None, url=WEIGHTS_URL):
    """Path of the Inception weights: `weights`, else $FID_WEIGHTS, else the cache (downloading)."""
    for value, name in ((weights, "--weights"), (os.environ.get("FID_WEIGHTS"), "$FID_WEIGHTS")):
        if value:
            if not Path(value).is_file():
                raise FileNotFoundError(f"{name} {value}: no such file (expected {WEIGHTS_FILE}, "
                                        f"from {WEIGHTS_URL})")
            return Path(value)
    cached = cache_dir() / WEIGHTS_FILE
    if not cached.is_file():
        try:
            download(url, cached, WEIGHTS_SHA256)
        except RuntimeError as e:
            raise RuntimeError(
                f"Inception weights are not in the cache and the download failed ({e}). "
                f"Offline: fetch {WEIGHTS_URL} elsewhere (sha256 {WEIGHTS_SHA256}) and pass "
                f"--weights PATH, set FID_WEIGHTS=PATH, or copy it into {cache_dir()}/") from e
    return cached


@functools.lru_cache(maxsize=2)
def _load_inception(path, device):
    sha = sha256_file(path)
    official = sha == WEIGHTS_SHA256
    if not official and Path(path).resolve().parent == cache_dir().resolve():
        raise RuntimeError(f"{path} is corrupt (sha256 {sha}, expected {WEIGHTS_SHA256}): delete it "
                           "to download it again")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict in pytorch-fid's Inception layout, "
                         f"got {type(state).__name__}")
    net = InceptionV3()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not in pytorch-fid's Inception layout ({WEIGHTS_FILE}): {e}") from e
    net.weights_name = Path(path).name
    net.official = official
    if not official:
        warnings.warn(f"{path} is not the official {WEIGHTS_FILE} (sha256 {sha[:12]}...): "
                      "its FID values are not comparable with published numbers")
    return net.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


def load_inception(weights=None, device="cpu"):
    """The FID network with weights from `weights` / $FID_WEIGHTS / the cache, in eval mode."""
    return _load_inception(str(resolve_weights(weights)), str(torch.device(device)))


# ----------------------------------------------------------------------------- network
# torchvision's Inception3 with pytorch-fid's FIDInceptionA/C/E changes. Module names match the
# official state_dict (566 tensors incl. BatchNorm statistics and the unused 1008-way fc).

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        # Inference only: BatchNorm with running statistics is an affine map, so it is folded into
        # the conv (one pass over the activations instead of two; about 15% faster on CPU).
        scale = self.bn.weight * torch.rsqrt(self.bn.running_var + self.bn.eps)
        weight = self.conv.weight * scale.view(-1, 1, 1, 1)
        bias = self.bn.bias - self.bn.running_mean * scale
        return F.relu_(F.conv2d(x, weight, bias, self.conv.stride, self.conv.padding))


def avg_pool_3x3(x):
    # TF's average pool divides by the number of real (unpadded) pixels: count_include_pad=False.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_3x3(x)),
        ], dim=1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
            self.branch_pool(avg_pool_3x3(x)),
        ], dim=1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(b7),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionE(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # The 2015 graph's last block (Mixed_7c) max-pools where the paper's network average-pools.
        pooled = avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], dim=1)


class InceptionV3(nn.Module):
    """Inception-v3 of the TF graph inception-2015-12-05; forward gives the 2048-d pool features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # the graph's classifier: not used for FID, kept for strict loading

    def forward(self, x):
        """x: [N, 3, 299, 299] float, already resized and scaled to [-1, 1] (see `preprocess`)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def random_inception(seed=0):
    """The network with He-initialised random weights (tests and timing; FID values meaningless)."""
    gen = torch.Generator().manual_seed(seed)
    net = InceptionV3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):  # non-trivial statistics so the folding is exercised
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
    net.weights_name = f"random weights (seed {seed})"
    net.official = False
    return net.to(memory_format=torch.channels_last).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- resize

def _tf1_resize_axis(x, dim):
    # TF1 legacy bilinear (align_corners=False, half_pixel_centers=False): output pixel j reads
    # source position j * n / 299, interpolating between floor and floor + 1, clamped at the border.
    n = x.shape[dim]
    src = torch.arange(INPUT_SIZE, dtype=torch.float64, device=x.device) * (n / INPUT_SIZE)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    shape = [1] * x.ndim
    shape[dim] = INPUT_SIZE
    frac = (src - lo).to(x.dtype).view(shape)
    a = x.index_select(dim, lo)
    return a + (x.index_select(dim, hi) - a) * frac


def preprocess(images, resize="tf1"):
    """uint8 [N, 3, H, W] -> float32 [N, 3, 299, 299] in [-1, 1] (channels_last), per the
    module docstring's resize modes."""
    if resize == "tf1":
        x = _tf1_resize_axis(_tf1_resize_axis(images.float(), 3), 2)
        x = (x - 128) / 128
    elif resize == "pytorch-fid":
        x = F.interpolate(images.float() / 255, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                          align_corners=False)
        x = 2 * x - 1
    else:
        raise ValueError(f"--resize {resize!r}: expected one of {RESIZE_MODES}")
    return x.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- statistics

class FeatureStats:
    """Mean and covariance of a stream of [N, D] features: float64 sums, constant memory."""

    def __init__(self, dim, device="cpu"):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, x):
        x = torch.as_tensor(x).to(self.sum.device, torch.float64)
        if x.ndim != 2 or x.shape[1] != self.sum.shape[0]:
            raise ValueError(f"expected features [N, {self.sum.shape[0]}], got {list(x.shape)}")
        self.n += x.shape[0]
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x

    def all_reduce(self):
        """Sum over the ranks of torch.distributed (no-op when it is not initialised)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            n = torch.tensor([self.n], dtype=torch.int64, device=self.sum.device)
            for t in (n, self.sum, self.outer):
                torch.distributed.all_reduce(t)
            self.n = int(n.item())

    def mean_cov(self):
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def mean_cov(x, chunk=4096):
    """float64 mean and unbiased covariance of an [N, D] array or tensor (e.g. raw pixels)."""
    x = torch.as_tensor(x)
    x = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
    stats = FeatureStats(x.shape[1])
    for start in range(0, x.shape[0], chunk):
        stats.update(x[start:start + chunk])
    return stats.mean_cov()


def _duration(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Rank-0 progress line every LOG_EVERY_S seconds: images, img/s, ETA."""

    def __init__(self, total=None, label="fid"):
        self.total, self.label, self.start, self.last = total, label, time.time(), time.time()

    def __call__(self, n, final=False):
        now = time.time()
        if not final and now - self.last < LOG_EVERY_S:
            return
        self.last = now
        rate = n / max(now - self.start, 1e-9)
        line = f"[{self.label}] {n} img | {rate:.1f} img/s"
        if self.total:
            eta = max(self.total - n, 0) / max(rate, 1e-9)
            line = (f"[{self.label}] {n}/{self.total} img ({100 * n / self.total:.1f}%) | "
                    f"{rate:.1f} img/s | " + (f"done in {_duration(now - self.start)}" if final
                                              else f"ETA {_duration(eta)}"))
        print(line, flush=True)


def _world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _fp32_convolutions():
    """The protocol is fp32: cuDNN's default TF32 convolutions would move the features."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9 (do not mix the APIs)
        saved, conv.fp32_precision = conv.fp32_precision, "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = saved
    else:
        saved, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = saved


def inception_stats(batches, *, weights=None, resize="tf1", device=None, num=None, total=None,
                    progress=False):
    """(mu, sigma, n) of the Inception features of `batches` (uint8 [N, 3, H, W] tensors).

    weights: path, None ($FID_WEIGHTS or the cache) or an InceptionV3 already loaded.
    num: stop after this many images of this process. Under torch.distributed every rank passes
    its own shard; the float64 sums are all-reduced and every rank gets the same result.
    total: images expected over all ranks (progress line only).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if resize not in RESIZE_MODES:
        raise ValueError(f"--resize {resize!r}: expected one of {RESIZE_MODES}")
    net = weights.to(device) if isinstance(weights, InceptionV3) else load_inception(weights, device)
    rank, world_size = _world()
    report = Progress(total) if progress and rank == 0 else None
    stats = FeatureStats(FEATURE_DIM, device)
    with torch.inference_mode(), _fp32_convolutions():
        for images in batches:
            if num is not None and stats.n >= num:
                break
            images = torch.as_tensor(images)
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
                raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} "
                                 f"{list(images.shape)}")
            if num is not None:
                images = images[:num - stats.n]
            images = images.to(device, non_blocking=True).expand(-1, 3, -1, -1)
            stats.update(net(preprocess(images, resize)))
            if report:
                report(stats.n * world_size)
    stats.all_reduce()
    if report:
        report(stats.n, final=True)
    if stats.n < MIN_IMAGES and rank == 0:
        warnings.warn(f"\n{'!' * 78}\n!! FID from only {stats.n} images (< {MIN_IMAGES}): the covariance "
                      f"is singular and FID is biased\n!! upwards. Not comparable with FID-50K.\n{'!' * 78}")
    mu, sigma = stats.mean_cov()
    return mu, sigma, stats.n


def describe(net, resize, n, seed=None, ref=None):
    """The protocol that goes with every printed FID."""
    weights = net.weights_name + ("" if net.official else " (NOT the official weights)")
    text = f"Inception {weights}, resize {resize}, {n} images"
    text += f" (subset seed {seed})" if seed is not None else " (all)"
    return text + (f", ref {ref}" if ref is not None else "")


# ----------------------------------------------------------------------------- frechet distance

def _check_stats(mu1, sigma1, mu2, sigma2):
    arrays = []
    for name, mu, sigma in (("1", mu1, sigma1), ("2", mu2, sigma2)):
        mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise ValueError(f"mu{name} must be [D] and sigma{name} [D, D], got {mu.shape} and {sigma.shape}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"mu{name} / sigma{name} contain NaN or inf")
        arrays += [mu, (sigma + sigma.T) / 2]
    if arrays[0].size != arrays[2].size:
        raise ValueError(f"dimension mismatch: the first statistics have {arrays[0].size} dims, "
                         f"the second {arrays[2].size} (both must come from the same feature extractor)")
    return arrays


def trace_sqrt_product(sigma1, sigma2):
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, in float64.

    S1 S2 = S1^(1/2) (S1^(1/2) S2) has the same eigenvalues as M = S1^(1/2) S2 S1^(1/2), which is
    symmetric PSD, so the trace is sum(sqrt(eig(M))): real and finite even for singular or
    ill-conditioned covariances. Rounding leaves eigenvalues of size ~eps * |M| where 0 is exact
    (tiny negatives are clipped to 0); their square roots bound the error by D * sqrt(eps * |M|)
    when the covariances are singular (fewer samples than dimensions). No threshold is applied:
    it would drop genuine small eigenvalues of well-estimated covariances.
    """
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017), trace term via `trace_sqrt_product`."""
    mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * trace_sqrt_product(sigma1, sigma2))


def frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The classic computation (EDM, pytorch-fid): scipy sqrtm of S1 S2; if that is not finite,
    eps * I is added to both covariances; the real part is taken. Kept as a cross-check."""
    mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm's "singular matrix" notes: handled below
        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(root).all():
            offset = np.eye(mu1.size) * eps
            root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(np.real(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root)))


def save_ref(path, mu, sigma):
    """Write reference statistics as .npz with exactly the keys mu, sigma (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_ref(path):
    """(mu, sigma) of a reference file: .npz with keys mu, sigma (ours, EDM's, ADM's; other keys
    ignored) or EDM2's .pkl {"fid": {"mu", "sigma"}, ...} (read by a numpy-only unpickler)."""
    try:
        if str(path).lower().endswith(".pkl"):
            with open(path, "rb") as f:
                data = _NumpyUnpickler(f).load()
            data = data.get("fid", data) if isinstance(data, dict) else {}
        else:
            with np.load(path) as f:
                data = {k: f[k] for k in ("mu", "sigma") if k in f.files} or {k: None for k in f.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: cannot read reference statistics ({e})") from e
    if not {"mu", "sigma"} <= set(data):
        raise ValueError(f"{path}: expected keys 'mu' and 'sigma', found {sorted(data)}")
    try:
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: mu and sigma must be numeric arrays ({e})") from e
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{path}: expected mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu / sigma contain NaN or inf")
    return mu, sigma


# ----------------------------------------------------------------------------- entry point

def _init_distributed():
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    return _world()


def _dataset_stats(args, path, label):
    rank, world_size = _init_distributed()
    device = args.device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    dataset = open_images(path)  # bad inputs fail before the network loads
    indices = select_indices(len(dataset), args.num, args.seed)
    net = load_inception(args.weights, device)
    if rank == 0:
        print(f"[{label}] {len(indices)} of {len(dataset)} images from {path} | "
              f"{describe(net, args.resize, len(indices))} | {world_size} process(es) on {device}",
              flush=True)
    batches = image_batches(dataset, indices, args.batch, rank, world_size, args.workers)
    mu, sigma, n = inception_stats(batches, weights=net, resize=args.resize, device=device,
                                   total=len(indices), progress=True)
    subset_seed = args.seed if len(indices) < len(dataset) else None
    return rank, net, mu, sigma, n, subset_seed


def cmd_ref(args):
    if os.path.exists(args.out):  # reference statistics are never overwritten
        raise ValueError(f"--out {args.out}: already exists; remove it or choose another name")
    rank, net, mu, sigma, n, seed = _dataset_stats(args, args.data, "ref")
    if rank == 0:
        save_ref(args.out, mu, sigma)
        print(f"saved {args.out} (mu, sigma of {n} images) | {describe(net, args.resize, n, seed)}")


def cmd_calc(args):
    try:
        ref_mu, ref_sigma = load_ref(args.ref)  # fail on a bad reference before computing anything
    except ValueError as e:
        raise ValueError(f"--ref {e}") from e
    if ref_mu.size != FEATURE_DIM:
        raise ValueError(f"--ref {args.ref}: {ref_mu.size}-d statistics, expected the {FEATURE_DIM}-d "
                         "Inception pool features")
    rank, net, mu, sigma, n, seed = _dataset_stats(args, args.images, "calc")
    if rank != 0:
        return
    fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    print(f"FID {fid:.4f} | {describe(net, args.resize, n, seed, args.ref)}")
    if args.crosscheck:
        classic = frechet_distance_sqrtm(mu, sigma, ref_mu, ref_sigma)
        print(f"FID (classic scipy sqrtm path) {classic:.4f} | difference {classic - fid:+.2e}")


def cmd_bench(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = load_inception(args.weights, device) if args.weights else random_inception().to(device)
    images = torch.randint(0, 256, (args.batch, 3, args.res, args.res), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    print(f"[bench] {net.weights_name} (timing only) | batch {args.batch} of {args.res}x{args.res} "
          f"uint8 | resize {args.resize} | {device} | {torch.get_num_threads()} threads", flush=True)
    times = []
    with torch.inference_mode():
        for i in range(args.iters + 1):  # the first batch warms up oneDNN / cuDNN
            start = time.perf_counter()
            net(preprocess(images, args.resize)).cpu()
            times.append(time.perf_counter() - start)
            if i:
                print(f"[bench] batch {i}: {args.batch / times[-1]:.2f} img/s", flush=True)
    print(f"[bench] {args.batch / np.median(times[1:]):.2f} img/s (median of {args.iters} batches, "
          f"best {args.batch / min(times[1:]):.2f})")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line and exit code 2, like every other input error
        sys.exit(print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr) or 2)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's layout and appends real defaults (not None/False) to the help."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in action.help:
            return action.help
        return action.help + " (default: %(default)s)"


def main(argv=None):
    parser = ArgumentParser(description=__doc__[:__doc__.index("\n\n")],
                                     epilog=__doc__[__doc__.index("Usage:"):__doc__.index("In-process API")],
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--weights", help="pt_inception-2015-12-05-6726825d.pth (default: $FID_WEIGHTS, "
                        f"else {cache_dir()}, downloading and verifying it)")
    common.add_argument("--resize", default="tf1", choices=RESIZE_MODES,
                        help="resize to 299: tf1 = EDM/paper protocol, pytorch-fid = F.interpolate")
    common.add_argument("--batch", type=int, default=50, help="images per batch per process")
    common.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--num", type=int, help="number of images to use (default: all), chosen with --seed")
    data.add_argument("--seed", type=int, default=0, help="seed of the --num subset (EDM's rule)")
    data.add_argument("--workers", type=int, default=2 if torch.cuda.is_available() else 0,
                      help="DataLoader worker processes per rank")

    p = sub.add_parser("ref", parents=[common, data], formatter_class=_HelpFormatter,
                       help="reference statistics (mu, sigma) of a dataset -> .npz",
                       description="Inception statistics (mu, sigma) of a dataset, saved as .npz.")
    p.add_argument("--data", required=True, help="folder / .npz / cifar-10-python.tar.gz / EDM .zip")
    p.add_argument("--out", required=True, help="output .npz with keys mu, sigma")
    p.set_defaults(func=cmd_ref)
    p = sub.add_parser("calc", parents=[common, data], formatter_class=_HelpFormatter,
                       help="FID of generated images against reference statistics",
                       description="FID of generated images against reference statistics; the printed "
                       "line states the protocol (weights, resize, number of images, seed, reference).")
    p.add_argument("--images", required=True, help="folder / .npz (or a quoted pattern of .npz files) / EDM .zip of "
                                                   "generated images")
    p.add_argument("--ref", required=True, help=".npz with keys mu, sigma (ours, EDM's, ADM's); EDM2's .pkl")
    p.add_argument("--crosscheck", action="store_true",
                   help="also print the classic scipy sqrtm value (slow: minutes on a CPU)")
    p.set_defaults(func=cmd_calc)
    p = sub.add_parser("bench", parents=[common], formatter_class=_HelpFormatter,
                       help="img/s of resize + network (random weights unless --weights)",
                       description="img/s of resize + network on random uint8 images (random weights "
                       "unless --weights; the speed does not depend on the weight values).")
    p.add_argument("--res", type=int, default=32, help="input resolution in pixels")
    p.add_argument("--iters", type=int, default=3, help="timed batches after one warm-up batch")
    p.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    for name, low in (("batch", 1), ("num", 2), ("iters", 1), ("res", 1)):
        if getattr(args, name, None) is not None and getattr(args, name) < low:
            parser.error(f"--{name} must be >= {low}")
    try:
        args.func(args)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # a rank that tears gloo down while a peer is still talking aborts
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # a user's input: one line, exit code 2
        print(f"fid.py {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
