"""Speed of cmt_imagenet.py: seconds per training step at real size (one CMT mid step with its 16-step
teacher solve, one ECD post step with autoguidance), random weights, batch --batch-gpu on one device.
Trains nothing.

    python experiments/bench_imagenet.py --preset img512-xs --batch-gpu 16 --sizes xs,s
    python experiments/bench_imagenet.py --preset img512-xs --batch-gpu 16 --sizes xxl --bf16

Flags other than --sizes go to cmt_imagenet.py (--preset, --batch-gpu, --nfe, --bf16, --tf32).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cmt_imagenet as inet  # noqa: E402


def bench(cfg, sizes):
    """Seconds per training step (one mid step, one post step with autoguidance) at real size for
    each size in --sizes, random weights, batch --batch-gpu on one device."""
    device, _, _ = inet.dist_setup()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg["tf32"])
    bg = cfg["batch_gpu"] or cfg["nfe"]
    if bg % cfg["nfe"]:
        raise SystemExit(f"--batch-gpu {bg} must be a multiple of --nfe {cfg['nfe']}")
    print(f"[bench] device {device}, {torch.get_num_threads()} threads, batch {bg}, "
          f"{cfg['img_channels']}x{cfg['res']}x{cfg['res']}", flush=True)
    results = {}
    for size in sizes:
        c = dict(cfg, model_channels=inet.EDM2_CHANNELS.get(size, cfg["model_channels"]))
        torch.manual_seed(0)
        teacher = inet.build_net(c).to(device).eval().requires_grad_(False)
        gnet = inet.build_net(c).to(device).eval().requires_grad_(False)
        net = inet.build_net(c).to(device).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-6)
        gen = torch.Generator(device).manual_seed(0)
        labels = torch.randint(c["label_dim"], (bg,), device=device)
        y = 0.5 * torch.randn([bg, c["img_channels"], c["res"], c["res"]], device=device)
        guided = inet.guided_denoiser(teacher, gnet, 2.05)
        steps = dict(mid=lambda: inet.cmt_loss(net, teacher, gen, labels, c),
                     post=lambda: inet.ecd_loss(net, guided, y, labels, gen, c, 0))
        for name, fn in steps.items():
            times = []
            for _ in range(2 if device.type == "cuda" else 1):  # on GPU the first step warms up kernels
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                fn().mean().backward()
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            results[f"{size}/{name}"] = times[-1]
            print(f"[bench] {size:>4} {name:>4}: {times[-1]:.2f} s/step "
                  f"({sum(p.numel() for p in net.parameters()) / 1e6:.1f}M params)", flush=True)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="xs,s", help=f"comma-separated EDM2 sizes of {sorted(inet.EDM2_CHANNELS)}, "
                                                   "or 'tiny' for the preset's own width (default: xs,s)")
    args, rest = p.parse_known_args(argv)
    cfg = inet.resolve_config(inet.parse_args(["--stage", "sample", *rest]))  # a stage that needs no data
    return bench(cfg, args.sizes.split(","))


if __name__ == "__main__":
    main()
