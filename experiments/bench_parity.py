"""Speed parity with the official networks, measured in one process: our DDPM++ SongUNet (cmt_cifar10.py)
against NVlabs/edm's training/networks.py SongUNet, and our EDM2 UNet (cmt_imagenet.py) against NVlabs/edm2's
training/networks_edm2.py UNet, with the same weights (copied by name; outputs checked equal first),
forward and forward+backward, repetitions alternating between the two (and which goes first) so that machine
noise hits both.

    git clone https://github.com/NVlabs/edm /src/edm && git clone https://github.com/NVlabs/edm2 /src/edm2
    python experiments/bench_parity.py --edm-src /src/edm --edm2-src /src/edm2 --batch 8 --reps 10

The official code is imported from the checkout you name and never copied into this repository.
Prints one line per network and returns {network: {ours_fwd_s, theirs_fwd_s, fwd_ratio, ours_fwdbwd_s,
theirs_fwdbwd_s, fwdbwd_ratio, max_abs_diff}}; a ratio < 1 means ours is faster.
"""

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cmt_cifar10 as cc  # noqa: E402
import cmt_imagenet as inet  # noqa: E402


def import_official(src, name):
    """`training.<name>` of an official checkout (its own dnnlib/torch_utils come with it)."""
    src = str(Path(src).resolve())
    if not (Path(src) / "training" / f"{name}.py").is_file():
        raise SystemExit(f"{src}: no training/{name}.py here; pass the root of an NVlabs checkout")
    for mod in [m for m in sys.modules if m == "training" or m.startswith(("training.", "torch_utils", "dnnlib"))]:
        del sys.modules[mod]  # edm and edm2 both name their packages training/torch_utils/dnnlib
    sys.path.insert(0, src)
    try:
        return importlib.import_module(f"training.{name}")
    finally:
        sys.path.remove(src)


def songunet_pair(edm_src, res=32):
    """Ours and EDM's DDPM++ at the CIFAR-10 configuration (dropout 0, so both are deterministic)."""
    networks = import_official(edm_src, "networks")
    torch.manual_seed(0)
    theirs = networks.SongUNet(img_resolution=res, in_channels=3, out_channels=3, model_channels=128,
                               channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.0)
    ours = cc.SongUNet(res, 3, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,))
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, (lambda net, x, s: net(x, s, None)), 3


def edm2_pair(edm2_src, res=64, size="xs"):
    """Ours and EDM2's U-Net at an img512 size (4x64x64 latents, 1000 classes)."""
    networks = import_official(edm2_src, "networks_edm2")
    ch = inet.EDM2_CHANNELS[size]
    torch.manual_seed(0)
    theirs = networks.UNet(img_resolution=res, img_channels=4, label_dim=1000, model_channels=ch)
    ours = inet.UNet(res, 4, 1000, model_channels=ch)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, (lambda net, x, s: net(x, s, torch.eye(1000)[: x.shape[0]])), 4


def time_pair(ours, theirs, call, channels, res, batch, reps):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn([batch, channels, res, res], generator=gen)
    s = torch.randn([batch], generator=gen)
    ours.train(), theirs.train()  # training mode: EDM2's forced weight normalisation runs, as in a step
    with torch.no_grad():
        diff = (call(ours, x, s) - call(theirs, x, s)).abs().max().item()

    def fwd(net):
        with torch.no_grad():
            call(net, x, s)

    def fwdbwd(net):
        net.zero_grad(set_to_none=True)
        call(net, x, s).square().mean().backward()

    row = dict(max_abs_diff=diff)
    for name, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        fn(ours), fn(theirs)  # warm-up
        times = {"ours": [], "theirs": []}
        for rep in range(reps):  # who goes first alternates, so that neither inherits the other's allocator state
            for who, net in (("ours", ours), ("theirs", theirs))[::1 if rep % 2 == 0 else -1]:
                t0 = time.perf_counter()
                fn(net)
                times[who].append(time.perf_counter() - t0)
        row[f"ours_{name}_s"] = statistics.median(times["ours"])
        row[f"theirs_{name}_s"] = statistics.median(times["theirs"])
        row[f"{name}_ratio"] = row[f"ours_{name}_s"] / row[f"theirs_{name}_s"]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edm-src", help="root of an NVlabs/edm checkout (DDPM++ comparison)")
    p.add_argument("--edm2-src", help="root of an NVlabs/edm2 checkout (EDM2 U-Net comparison)")
    p.add_argument("--edm2-size", default="xs", choices=sorted(inet.EDM2_CHANNELS), help="EDM2 size (default: xs)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each, alternating (default: 5)")
    args = p.parse_args(argv)
    if not (args.edm_src or args.edm2_src):
        p.error("give --edm-src and/or --edm2-src")
    results = {}
    pairs = [("DDPM++", lambda: songunet_pair(args.edm_src), 32)] if args.edm_src else []
    pairs += [(f"EDM2-{args.edm2_size.upper()}", lambda: edm2_pair(args.edm2_src, size=args.edm2_size), 64)] \
        if args.edm2_src else []
    for name, make, res in pairs:
        ours, theirs, call, channels = make()
        r = time_pair(ours, theirs, call, channels, res, args.batch, args.reps)
        print(f"[parity] {name} batch {args.batch}: forward {r['ours_fwd_s']:.3f} s vs {r['theirs_fwd_s']:.3f} s "
              f"({r['fwd_ratio']:.3f}x), forward+backward {r['ours_fwdbwd_s']:.3f} s vs {r['theirs_fwdbwd_s']:.3f} s "
              f"({r['fwdbwd_ratio']:.3f}x); max |ours - theirs| {r['max_abs_diff']:.2e}", flush=True)
        results[name] = r
    return results


if __name__ == "__main__":
    main()
