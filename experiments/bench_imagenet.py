"""Speed of cmt_imagenet.py: seconds per training micro-step at real size, random weights, batch
--batch-gpu on one device. A plain step is a student forward+backward+Adam on given noisy inputs;
a mid step adds the teacher's 16-step DPM-Solver++ solve of batch/16 trajectories (the CMT loss), solved
alone as sony/cmt does or amortised over a --traj-buffer of trajectories solved together (mid_bulk);
a post step is one ECD step (one Heun step of the teacher, guided as the preset of that size guides it:
the official autoguidance pair's smaller network, float16 on CUDA, 4 forwards; 2 where there is none; plus
the student's two). Teacher and guide have random weights of the official sizes.
Trains nothing.

    python experiments/bench_imagenet.py --preset img512-xs --batch-gpu 16 --sizes xs,s
    python experiments/bench_imagenet.py --preset img512-xs --batch-gpu 16 --sizes xxl --bf16 --compile

Flags other than --sizes / --reps go to cmt_imagenet.py (--preset, --batch-gpu, --teacher-steps, --bf16,
--compile, --tf32, --cudnn-benchmark). Each measurement follows one warm-up step.
"""

import argparse
import contextlib
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cmt_imagenet as inet  # noqa: E402
from timing import time_it  # noqa: E402


def peak_memory_gb(device):
    """Peak memory since the last reset: CUDA allocations, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def official_guide(cfg, size):
    """(guide width, w) of the preset's autoguidance pair for ECD (cmt_imagenet.EDM2_AUTOGUIDED: XXL is guided
    by M, S by XS), or None where the preset guides nothing (its post step runs the teacher alone)."""
    pair = inet.EDM2_AUTOGUIDED.get(("img512" if cfg["latent"] else "img64", size))
    return (inet.EDM2_CHANNELS[pair[1].split("-")[0]], pair[2]) if pair else None


def bench(cfg, sizes, reps=1):
    """{size: {plain_s, mid_s, mid_student_s, post_s, mid_bulk_s, mid_over_plain, mid_bulk_over_plain,
    teacher_s_per_traj_{1,bulk}, traj_buffer, img_per_s_{plain,mid,mid_student,post,mid_bulk}, peak_gb, params_m}}."""
    _, _, device = inet.init_distributed()
    # Both ways, as cmt_imagenet.py's main(): the fp32 rows must not run cuDNN convolutions in TF32 (PyTorch's default).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg["tf32"])
    torch.backends.cudnn.benchmark = bool(cfg["cudnn_benchmark"])
    bg = cfg["batch_gpu"] or cfg["teacher_steps"]
    if bg % cfg["teacher_steps"]:
        raise SystemExit(f"--batch-gpu {bg}: must be a multiple of --teacher-steps {cfg['teacher_steps']} (whole trajectories)")
    print(f"[bench] device {device}, {torch.get_num_threads()} threads, batch {bg}, "
          f"{cfg['img_channels']}x{cfg['res']}x{cfg['res']}, bf16 {bool(cfg['bf16'])}, compile {bool(cfg['compile'])}",
          flush=True)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg["bf16"] else contextlib.nullcontext
    results = {}
    for size in sizes:
        c = dict(cfg, model_channels=inet.EDM2_CHANNELS.get(size, cfg["model_channels"]))
        torch.manual_seed(0)
        with device:  # built in place: initialising a 1.5B-parameter XXL on the CPU takes longer than timing it
            teacher = inet.build_net(c).eval().requires_grad_(False)
            guide = official_guide(cfg, size)
            gnet = inet.build_net(dict(c, model_channels=guide[0])).eval().requires_grad_(False) if guide else None
            if gnet is not None:  # EDM2's pickles record use_fp16 = True (train_edm2.py --fp16); load_network keeps it
                gnet.use_fp16 = True
            net = inet.build_net(c).train()
        model = torch.compile(net) if cfg["compile"] else net
        opt = torch.optim.Adam(net.parameters(), lr=1e-6, fused=device.type == "cuda")
        gen = torch.Generator(device).manual_seed(0)
        labels = torch.randint(c["label_dim"], (bg,), device=device)
        y = 0.5 * torch.randn([bg, c["img_channels"], c["res"], c["res"]], device=device)
        sigma = torch.exp(torch.randn([bg], device=device) * 1.2 - 1.2)
        guided = inet.guided_denoiser(teacher, gnet, guide[1] if guide else 1.0)
        b, sigmas = bg // c["teacher_steps"], inet.logsnr_grid(c["teacher_steps"], c["s_max"], c["s_lo"], device)
        noise = lambda n: torch.randn([n, c["img_channels"], c["res"], c["res"]], generator=gen, device=device)  # noqa: E731

        def solve(n, lab):  # the teacher in float32 also under --bf16, as train() runs it
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                return inet.cmt_batch(teacher, noise(n), lab, sigmas)
        pairs = solve(b, labels[:b])
        losses = dict(plain=lambda: (model(y + sigma.view(-1, 1, 1, 1) * torch.randn_like(y), sigma, labels) - y).square(),
                      mid=lambda: inet.cmt_loss(model, solve(b, labels[:b]), c),
                      mid_student=lambda: inet.cmt_loss(model, pairs, c),  # pairs ready: the bulk path's step
                      post=lambda: inet.ecd_loss(model, guided, y, labels, gen, c, 0))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = dict(params_m=sum(p.numel() for p in net.parameters()) / 1e6)
        for name, loss_fn in losses.items():
            def step():
                opt.zero_grad(set_to_none=True)
                with amp():
                    loss = loss_fn().mean()
                loss.backward()
                opt.step()
            row[f"{name}_s"] = time_it(step, device, reps, warmup=1)  # warm-up: kernels, autotuning, compilation
            row[f"img_per_s_{name}"] = bg / row[f"{name}_s"]
            print(f"[bench] {size:>4} {name:>5}: {row[f'{name}_s']:.3f} s/step, {row[f'img_per_s_{name}']:.1f} img/s "
                  f"({row['params_m']:.1f}M params)", flush=True)
        # Bulk trajectories (--traj-buffer): one solve of the buffer, amortised over the micro-steps it serves.
        n = max(b, c["traj_buffer"] // b * b)
        row["teacher_s_per_traj_1"] = (row["mid_s"] - row["mid_student_s"]) / b
        row["teacher_s_per_traj_bulk"] = time_it(lambda: solve(n, labels[:1].repeat(n)), device, 1, warmup=1) / n
        row["traj_buffer"] = n
        row["mid_bulk_s"] = row["mid_student_s"] + b * row["teacher_s_per_traj_bulk"]
        row["img_per_s_mid_bulk"] = bg / row["mid_bulk_s"]
        row["mid_over_plain"] = row["mid_s"] / row["plain_s"]
        row["mid_bulk_over_plain"] = row["mid_bulk_s"] / row["plain_s"]
        row["peak_gb"] = peak_memory_gb(device)
        print(f"[bench] {size:>4} teacher per trajectory {row['teacher_s_per_traj_1']:.4f} s alone, "
              f"{row['teacher_s_per_traj_bulk']:.4f} s in a buffer of {n}; mid step {row['mid_over_plain']:.3f}x "
              f"the plain step, {row['mid_bulk_over_plain']:.3f}x with the buffer", flush=True)
        print(f"[bench] {size:>4} peak memory "
              f"{row['peak_gb']:.2f} GB", flush=True)
        results[size] = row
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="xs,s", help=f"comma-separated EDM2 sizes of {sorted(inet.EDM2_CHANNELS)}, "
                                                   "or 'tiny' for the preset's own width (default: xs,s)")
    p.add_argument("--reps", type=int, default=1, help="timed steps per measurement (default: 1)")
    args, rest = p.parse_known_args(argv)
    cfg = inet.resolve_config(inet.parse_args(["--stage", "sample", *rest]))  # a stage that needs no data
    return bench(cfg, args.sizes.split(","), args.reps)


if __name__ == "__main__":
    main()
