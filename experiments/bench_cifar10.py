"""Speed of cmt_cifar10.py: DDPM++ forward+backward FLOP rate against this machine's fp32 matmul peak,
and the cost of one mid-training step (the teacher's 16-step solve on B/16 trajectories, plus the
student's step) against a plain student step at the same batch: with the trajectories solved alone per
micro-step as sony/cmt does (mid), and amortised over a --traj-buffer of trajectories solved together
(mid_bulk = the student's step on ready pairs + B/16 x the teacher's cost per trajectory in the buffer).
Trains nothing.

    python experiments/bench_cifar10.py --batch-gpu 16                     # the paper's per-GPU batch
    python experiments/bench_cifar10.py --batch-gpu 16 --bf16 --compile    # GPU fast paths

Flags other than --reps go to cmt_cifar10.py (network from --preset, default cifar10; --bf16, --tf32,
--channels-last, --compile, --cudnn-benchmark, --metric, --lpips-weights, --teacher-steps, --traj-reuse,
--traj-buffer, --seed).
"""

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cmt_cifar10 as cc  # noqa: E402


def peak_memory_gb(device):
    """Peak memory since the last reset: CUDA allocations, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def bench(cfg, reps):
    """DDPM++ forward+backward GFLOP/s as a fraction of this machine's fp32 matmul peak, and one
    mid-training step relative to a plain student step at the same batch. Returns the numbers."""
    from torch.utils.flop_counter import FlopCounterMode
    _, _, device = cc.init_distributed()
    # Both ways, as cmt_cifar10.py's main(): the fp32 rows must not run cuDNN convolutions in TF32 (PyTorch's default).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg["tf32"])
    torch.backends.cudnn.benchmark = bool(cfg["cudnn_benchmark"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, reps):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t0) / reps

    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    peak = 2 * n ** 3 / min(timed(lambda: torch.mm(a, b), 3) for _ in range(3))
    del a, b  # not part of the network's peak memory below

    bs = cfg["batch_gpu"] or 16
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg["seed"])
    net = cc.build_net(cfg, "ecm", dropout=cfg["dropout"]).to(device).train()
    if cfg["channels_last"]:
        net.to(memory_format=torch.channels_last)
    x = torch.randn(bs, 3, cfg["resolution"], cfg["resolution"], device=device)
    sigma = torch.full((bs,), 1.0, device=device)
    step_net = torch.compile(net) if cfg["compile"] else net

    def fwd_bwd(m):
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg["bf16"]):
            m(x, sigma, train=True).square().mean().backward()
    # FLOPs of the eager network: Dynamo skips (for good) the frames it first meets inside a dispatch mode such
    # as the FLOP counter, so the compiled module must not be called there.
    with FlopCounterMode(display=False) as counter:
        fwd_bwd(net)
    flops = counter.get_total_flops()
    sec = timed(lambda: fwd_bwd(step_net), reps)
    print(f"DDPM++ {cfg['preset']} forward+backward, batch {bs}: {flops / bs / 1e9:.2f} GFLOP/img, "
          f"{flops / sec / 1e9:.1f} GFLOP/s = {flops / sec / peak:.3f} of fp32 matmul peak "
          f"({peak / 1e9:.1f} GFLOP/s, {n}^3 torch.mm)")

    images = torch.randint(0, 256, (max(64, bs), 3, cfg["resolution"], cfg["resolution"]), dtype=torch.uint8)
    teacher = cc.build_net(cfg, "edm", dropout=0.0).to(device).eval().requires_grad_(False)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = cc.make_optimizer(cfg, net, device)
    plain_src = cc.PlainBatches(cc.DataStream((images, None), 0), device)
    plain = lambda m, it, r: cc.distance(m(plain_src.get(bs)[0], sigma, train=True), x, "l2")

    def step(loss_fn, it):
        opt.zero_grad(set_to_none=True)
        cc.accumulate_gradients(step_net, loss_fn, it, 1, cfg["bf16"])
        cc.apply_update(net, ema, opt, 1e-6, 0.999)
    t_plain = timed(lambda: step(plain, 0), reps)
    print(f"plain student step (batch {bs}): {t_plain:.3f} s")
    out = dict(gflop_per_img=flops / bs / 1e9, frac_peak=flops / sec / peak, plain_s=t_plain, img_per_s_plain=bs / t_plain)
    metric = cfg["metric"] if cfg["metric"] != "lpips" or cfg["lpips_weights"] else "l2"
    if metric != cfg["metric"]:
        print("mid steps use --metric l2: no --lpips-weights given (LPIPS adds a VGG16 pass per step)")
    for reuse in sorted({1, 4, cfg["traj_reuse"]}):  # the official schedule: one teacher solve per micro-step
        mid_cfg = dict(cfg, stage="mid", traj_reuse=reuse, metric=metric, traj_buffer=0, iters=10 ** 9)
        mid, _ = cc.make_loss(mid_cfg, cc.DataStream((images, None), 0), teacher, bs, 1, device)
        counter_it = iter(range(10 ** 9))
        t_mid = timed(lambda: [step(mid, next(counter_it)) for _ in range(reuse)], reps) / reuse
        print(f"mid step, --traj-reuse {reuse}: {t_mid:.3f} s = {t_mid / t_plain:.3f}x the plain step")
        out[f"mid_s_reuse{reuse}"] = t_mid
    out.update(mid_s=out["mid_s_reuse1"], img_per_s_mid=bs / out["mid_s_reuse1"],
               mid_over_plain=out["mid_s_reuse1"] / t_plain)
    out.update(bulk_rates(dict(cfg, metric=metric), teacher, bs, device, timed, step, reps, t_plain, out["mid_s"]))
    print(f"teacher per trajectory {out['teacher_s_per_traj_1']:.4f} s alone, {out['teacher_s_per_traj_bulk']:.4f} s "
          f"in a buffer of {out['traj_buffer']}; mid step {out['mid_over_plain']:.3f}x the plain step, "
          f"{out['mid_bulk_over_plain']:.3f}x with the buffer ({out['mid_bulk_s']:.3f} s)")
    out["peak_gb"] = peak_memory_gb(device)
    print(f"peak memory {out['peak_gb']:.2f} GB")
    if cfg["compile"]:  # a compile row that compiled nothing would time eager code under the compile label
        out["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        if not out["compiled_graphs"]:
            raise SystemExit("--compile: torch.compile compiled no graph, so these timings would be eager ones")
    return out


def bulk_rates(cfg, teacher, bs, device, timed, step, reps, t_plain, t_mid):
    """Bulk trajectories (--traj-buffer): the student's step on ready pairs plus the teacher's cost per
    trajectory in one solve of the buffer, against the teacher's cost per trajectory solved alone."""
    steps = cfg["teacher_steps"]
    b, res = bs // steps, cfg["resolution"]
    n = max(b, cfg["traj_buffer"] // b * b)  # rounded down to whole micro-steps, as TeacherPairs does
    gen = torch.Generator(device).manual_seed(0)
    draw = lambda k: (0.5 * torch.randn(k, 3, res, res, generator=gen, device=device),  # noqa: E731
                      torch.randn(k, 3, res, res, generator=gen, device=device))
    y, eps = draw(b)
    states, target = cc.cmt_trajectories(teacher, y, None, steps, eps)
    lpips = cc.make_lpips(cfg, device)
    ready = lambda m, it, r: cc.cmt_loss(m, states, target, None, cfg["metric"], cfg["huber_c"], lpips)  # noqa: E731
    t_student = timed(lambda: step(ready, 0), reps)
    y, eps = draw(n)
    t_solve = timed(lambda: cc.cmt_trajectories(teacher, y, None, steps, eps), 1)  # float32, as training solves it
    out = dict(mid_student_s=t_student, teacher_s_per_traj_1=(t_mid - t_student) / b,
               teacher_s_per_traj_bulk=t_solve / n, traj_buffer=n, mid_bulk_s=t_student + b * t_solve / n)
    return dict(out, mid_bulk_over_plain=out["mid_bulk_s"] / t_plain, img_per_s_mid_bulk=bs / out["mid_bulk_s"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (default: 3)")
    args, rest = p.parse_known_args(argv)
    cc_args = cc.parse_args(["--stage", "sample", *rest])  # the sample stage's config: mid's network, no data
    return bench(cc.resolve_config(cc_args), args.reps)


if __name__ == "__main__":
    main()
