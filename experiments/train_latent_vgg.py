"""Train the latent VGG16-GN backbone that cmt_imagenet.py's `--metric elatentlpips` needs
(`--elpips-weights`), with the recipe of sony/cmt imagenet512/train_latent_vgg.py: 1000-way ImageNet
classification of EDM2-normalised SD latents (a fresh posterior draw per batch, no augmentation),
SGD lr 0.1, momentum 0.9, weight decay 1e-4, lr x 0.1 every 30 epochs, 100 epochs at batch 256, fp32,
one GPU. No trained copy of the official backbone is published.

    python cmt_imagenet.py --stage encode --data /data/imagenet/train --vae sd-vae-ft-mse/ --outdir img512-sd
    python experiments/train_latent_vgg.py --data img512-sd --out vgg16gn-latent.pt
    torchrun --nproc_per_node=8 cmt_imagenet.py --stage mid --metric elatentlpips --elpips-weights vgg16gn-latent.pt

The output is a plain state dict (the official VGGBase key layout), written atomically every 390
iterations as the official script saves; an existing --out is never overwritten.
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cmt_imagenet as inet  # noqa: E402

SAVE_EVERY = 390  # int(1e5 / 256): the official report/save interval
SEED = 4727       # the official InfiniteSampler seed


def batches(ds, batch, device, gen):
    """Endless (latents, labels) batches in reshuffled epochs; each batch a fresh posterior draw."""
    order = torch.Generator().manual_seed(SEED)
    while True:
        perm = torch.randperm(len(ds), generator=order).tolist()
        for i in range(0, len(perm) - batch + 1, batch):
            raw, labels = zip(*(ds[j] for j in perm[i:i + batch]))
            yield inet.edm2_encode_latents(torch.stack(raw).to(device), gen), torch.as_tensor(labels, device=device)


def train(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = inet.ImageFolderDataset(args.data, latent=True, res=64, img_channels=4, label_dim=1000)
    per_epoch = max(1, len(ds) // args.batch)
    iters = args.iters or per_epoch * args.epochs
    torch.manual_seed(0)
    net = inet.LatentVGG16GN().to(device).train()  # train mode: the classifier's dropout is on, as officially
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)  # stepped once per epoch
    data = batches(ds, args.batch, device, torch.Generator(device).manual_seed(SEED))
    print(f"[vgg] {len(ds)} latents, batch {args.batch}, {iters} iterations ({per_epoch} per epoch) on {device}",
          flush=True)
    t0 = time.time()
    for it in range(1, iters + 1):
        y, labels = next(data)
        logits = net(y)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % per_epoch == 0:
            sched.step()
        if it % SAVE_EVERY == 0 or it == iters:
            acc = (logits.argmax(1) == labels).float().mean().item()
            eta = (time.time() - t0) / it * (iters - it)
            print(f"[vgg] it {it}/{iters} loss {loss.item():.4f} top-1 {acc:.3f} lr {sched.get_last_lr()[0]:.1e} "
                  f"ETA {inet.format_duration(eta)}", flush=True)
            state = net.state_dict()
            inet.write_atomic(args.out, lambda f: torch.save(state, f))
    return net


def main(argv=None):
    p = inet.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="EDM2 latent dataset (zip or folder of 8x64x64 .npy), as "
                                                 "cmt_imagenet.py --stage encode writes it")
    p.add_argument("--out", required=True, help="state dict to write (must not exist)")
    p.add_argument("--batch", type=int, default=256, help="batch size (default: 256, official)")
    p.add_argument("--epochs", type=int, default=100, help="epochs (default: 100, official)")
    p.add_argument("--iters", type=int, default=0, help="stop after this many iterations (default: --epochs)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default: 0.1, official)")
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        p.error(f"--out {args.out}: exists; choose a new file (an earlier backbone is never overwritten)")
    if args.batch < 1 or args.epochs < 1 or args.iters < 0 or not math.isfinite(args.lr) or args.lr <= 0:
        p.error("--batch, --epochs: at least 1; --iters: at least 0; --lr: a positive number")
    return train(args)


if __name__ == "__main__":
    main()
