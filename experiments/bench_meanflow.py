"""Speed of meanflow_post.py: one MeanFlow (jvp) step, one with CFG, one CMT-MF student step and one CMT-MF
step including its teacher (MF-B/4, --teacher-steps), each relative to a plain forward+backward of the same
network at the same batch (32x32x4 latents, 1000 classes, random weights); the teacher's trajectories solved
alone per micro-step (CMT+teach) and amortised over a --traj-buffer solved together (mid_bulk = the CMT-MF
student step + batch/pairs x the teacher's cost per trajectory in the buffer). Trains nothing; run it on a
quiet machine.

    python experiments/bench_meanflow.py --models B/4,XL/2 --batch-gpu 32
    python experiments/bench_meanflow.py --models XL/2 --batch-gpu 32 --bf16

Flags other than --models / --reps go to meanflow_post.py (--batch-gpu, --pairs, --teacher-steps, --traj-buffer,
--bf16, --compile).
"""

import argparse
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import meanflow_post as mf  # noqa: E402
from timing import time_it  # noqa: E402


def bench(cfg, device, models, reps):
    """Time one MeanFlow (jvp) step, one MeanFlow step with CFG, one CMT-MF student step and one CMT-MF
    step including its teacher (MF-B/4 teacher, cfg teacher_steps), each relative to a plain
    forward+backward of the same network at the same batch. Prints a table; run on a quiet machine.
    --compile compiles the plain forwards (plain step, CFG forwards, CMT-MF student) as the training
    loop does; the jvp stays eager. Returns {model: {plain_s, <step>_ratio, img_per_s_*, peak_gb}}."""
    bs = cfg["batch_gpu"] or 32
    if bs % cfg["pairs"]:  # CMT-MF rows = trajectories x pairs must equal the plain step's batch
        raise SystemExit(f"--batch-gpu {bs}: must be a multiple of --pairs {cfg['pairs']}")
    res, ch = 32, 4
    lines = [f"{'model':<6} {'batch':>5} {'plain f+b':>10} {'MF jvp':>8} {'MF+CFG':>8} {'CMT-MF':>8} {'CMT+teach':>9}  (ratios to "
             f"plain; CMT-MF: {bs // cfg['pairs']} trajectories x {cfg['pairs']} pairs, B/4 teacher {cfg['teacher_steps']} steps)"]
    out = {}
    for name in models:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        mcfg = dict(cfg, model=name, res=res, channels=ch, num_classes=1000)
        net = mf.build_net(mcfg).to(device).train()
        for p in net.parameters():
            p.data.normal_(0, 0.02)  # non-zero outputs: zero-init adaLN would make every block the identity
        fwd = torch.compile(net) if cfg["compile"] else net
        teacher = mf.build_net(dict(mcfg, model="B/4")).to(device).eval().requires_grad_(False)
        gen = torch.Generator(device).manual_seed(0)
        x = torch.randn((bs, ch, res, res), generator=gen, device=device)
        e = torch.randn_like(x)
        y = torch.randint(0, 1000, (bs,), generator=gen, device=device)
        t, r = mf.sample_t_r(bs, -0.4, 1.0, 0.25, gen, device)
        drop = mf.label_drop_mask(bs, 0.1, gen, device)
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg.get("bf16")))
        nocfg = dict(mcfg, omega=1.0, kappa=0.0)
        withcfg = dict(mcfg, omega=1.0, kappa=0.5)
        pairs, steps = cfg["pairs"], cfg["teacher_steps"]

        def plain():
            with autocast():
                u = mf.average_velocity(fwd, x, r, t, y)
            u.float().square().mean().backward()

        def meanflow_step(c):
            return lambda: mf.meanflow_loss(fwd, x, y, e, t, r, drop, c, eager_net=net, autocast=autocast())[0].backward()

        def cmt(with_teacher):
            def step():
                g = torch.Generator(device).manual_seed(1)
                b = bs // pairs
                if with_teacher:
                    with autocast():
                        states, grid = mf.teacher_trajectory(teacher, e[:b], y[:b], steps, "meanflow")
                else:
                    states, grid = torch.randn((steps + 1, b, ch, res, res), device=device), mf.time_grid(steps, device)
                z, rr, tt, u_tgt, n = mf.cmt_mf_pairs(states.float(), grid, pairs, g)
                with autocast():
                    loss = mf.cmt_mf_loss(fwd, z, rr, tt, y[n], u_tgt)
                loss.backward()
            return step

        times = [time_it(f, device, reps=reps) for f in (plain, meanflow_step(nocfg), meanflow_step(withcfg), cmt(False), cmt(True))]
        lines.append(f"{name:<6} {bs:>5} {times[0] * 1e3:>8.1f}ms " + " ".join(f"{tm / times[0]:>8.2f}" for tm in times[1:]))
        print(lines[-1], flush=True)
        kinds = ("plain", "jvp", "cfg", "cmt", "cmt_teacher")
        row = dict(plain_s=times[0], peak_gb=peak_memory_gb(device))
        row.update({f"{k}_ratio": tm / times[0] for k, tm in zip(kinds[1:], times[1:])})
        row.update({f"img_per_s_{k}": bs / tm for k, tm in zip(kinds, times)})
        row.update(bulk_rates(teacher, cfg, bs, times, autocast, device))
        print(f"{name:<6} teacher per trajectory {row['teacher_s_per_traj_1'] * 1e3:.2f}ms alone, "
              f"{row['teacher_s_per_traj_bulk'] * 1e3:.2f}ms in a buffer of {row['traj_buffer']}; CMT+teacher step "
              f"{row['cmt_teacher_ratio']:.2f}x plain, {row['mid_bulk_over_plain']:.2f}x with the buffer", flush=True)
        out[name] = row
    print("\n".join(lines))
    return out


def bulk_rates(teacher, cfg, bs, times, autocast, device):
    """Bulk trajectories (--traj-buffer): the CMT-MF student step on ready states plus the teacher's cost per
    trajectory in one solve of the buffer (mid_bulk), against its cost per trajectory when one micro-step's
    trajectories are solved by themselves. Both solves are timed directly: a difference of two step times
    drowns in noise where the teacher is a few percent of the step (XL/2)."""
    b, steps = bs // cfg["pairs"], cfg["teacher_steps"]
    n = max(b, cfg["traj_buffer"] // b * b)  # rounded down to whole micro-steps, as TeacherPairs does
    gen = torch.Generator(device).manual_seed(2)
    e = torch.randn((n, 4, 32, 32), generator=gen, device=device)
    y = torch.randint(0, 1000, (n,), generator=gen, device=device)

    def seconds_per_trajectory(k):
        def solve():
            with autocast():
                mf.teacher_trajectory(teacher, e[:k], y[:k], steps, "meanflow")
        return time_it(solve, device, reps=1, warmup=1) / k
    plain, student = times[0], times[3]
    row = dict(teacher_s_per_traj_1=seconds_per_trajectory(b), teacher_s_per_traj_bulk=seconds_per_trajectory(n),
               traj_buffer=n)
    row["mid_bulk_s"] = student + b * row["teacher_s_per_traj_bulk"]
    return dict(row, mid_bulk_over_plain=row["mid_bulk_s"] / plain, img_per_s_mid_bulk=bs / row["mid_bulk_s"])


def peak_memory_gb(device):
    """Peak memory since the last reset: CUDA allocations, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20




def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="B/4,XL/2", help=f"comma-separated DiT-MF sizes of {sorted(mf.MODELS)} (default: B/4,XL/2)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement, after 2 warm-up steps (default: 5)")
    args, rest = p.parse_known_args(argv)
    mf_args = mf.parse_args(["--stage", "mid", *rest])
    _, _, device = mf.init_distributed()
    cfg = mf.resolve_config(mf_args, "mid")
    # Both ways, as meanflow_post.py's main(): the fp32 rows must not run in TF32 (cuDNN's default in PyTorch).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg["tf32"])
    return bench(cfg, device, args.models.split(","), args.reps)


if __name__ == "__main__":
    main()
