"""The evidence study of cmt_cifar10.py: does CMT beat the diffusion (teacher) initialisation of ECT?

On the toy mixture the flow map is the exact ODE solution, so "quality" is the flow-map error itself,
not a proxy. Every arm runs once per seed (the teacher too); tables report mean +- std over seeds.
Post-training always uses the tiny preset's recipe; only the initialisation and the mid stage vary.

    python experiments/study_ect.py --outdir runs/study              # 3 seeds, the README's study
    python experiments/study_ect.py --seeds 5 --outdir runs/study5

Q1: post-training from CMT vs teacher vs random initialisation at equal compute counted from the
    teacher on (the CMT arm spends part of the budget on mid-training), curves over the budget.
Q2: the CMT arm's knobs at the same budget: mid/post split, teacher solver steps, metric, trajectory reuse.
Q3: gradient bias at the start of post-training (the paper's analysis) for the three initialisations.
Writes study.json, study.md and study-convergence.png. Flags this script does not define go to
cmt_cifar10.py (always with --preset tiny), e.g. `--eval-num 2000`.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cmt_cifar10 as cc  # noqa: E402
from plot import draw_curves, seed_points  # noqa: E402


def study_cost(stage, iters, traj_reuse=1):
    """Compute in ECT-iteration equivalents at equal batch B, counting network passes in forwards
    (backward = 2 forwards): an ECT iteration is a gradient pass (3B) plus the no-grad target pass (B),
    4B; a CMT iteration is the student's gradient pass (3B) plus the teacher's NFE on B/NFE trajectories
    (B whatever the step count, shared by K iterations under --traj-reuse K)."""
    return iters * (1.0 if stage == "post" else (3 + 1 / traj_reuse) / 4)


@torch.no_grad()
def exact_flow_map(toy, x, t, steps=256):
    """Psi(x_t): the toy's exact PF-ODE from per-sample levels t down to 0.002. Each sample has its own
    geometric grid, so every step-size ratio r0 of DPM-Solver++ (Lu et al. 2022, Alg. 2) is 1: second-order multistep DPM-Solver++ with
    first-order first and last steps, vectorised over samples."""
    t = t.double().flatten().clamp(min=cc.CMT_SIGMA_MIN)
    h = (t / cc.CMT_SIGMA_MIN).log() / steps
    hx = h.view(-1, *[1] * (x.dim() - 1))
    x, m_prev = x.double(), None
    for k in range(steps):
        m = toy.denoise(x, t * (-k * h).exp())
        x_next = (-hx).exp() * x - torch.expm1(-hx) * m
        if m_prev is not None and k < steps - 1:
            x_next = x_next - 0.5 * torch.expm1(-hx) * (m - m_prev)
        x, m_prev = x_next, m
    return x


def gradient_bias(net, toy, n, seed, q):
    """Gradient bias at the start of post-training, in the paper's analysis setting (squared l2,
    uniform weighting, ECT's (t, r) sampling): practical g = grad E|f(x_t, t) - sg f(x_r, r)|^2, oracle
    g* = grad E|f(x_t, t) - Psi(x_t)|^2. Their difference is 2 E[J^T (Psi(x_t) - f(x_r, r))], so the
    target error E|sg f(x_r, r) - Psi(x_t)|^2 (per element) is the quantity an initialisation controls."""
    g = torch.Generator().manual_seed(seed)
    y = toy.sample(n, g)
    t = (torch.randn(n, 1, 1, 1, generator=g) * 2.0 - 1.1).exp()
    r = cc.ect_t_to_r(t, q)
    eps = torch.randn(y.shape, generator=g)
    net = copy.deepcopy(net).requires_grad_(True)
    params = list(net.parameters())
    with torch.no_grad():
        f_r = torch.where(r > 0, torch.nan_to_num(net(y + r * eps, r, train=True)), y)
    psi = exact_flow_map(toy, y + t * eps, t).float()

    def grad(target):
        loss = (net(y + t * eps, t, train=True) - target).square().flatten(1).sum(1).mean()
        return torch.cat([p.flatten() for p in torch.autograd.grad(loss, params)]).double()
    g_p, g_o = grad(f_r), grad(psi)
    return dict(rel_bias=float((g_p - g_o).norm() / g_o.norm()), cosine=float(F.cosine_similarity(g_p, g_o, 0)),
                target_err=float((f_r - psi).square().mean()))


def study_table(title, header, rows):
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]) + "\n"


def mean_std(values, fmt="{:.4f}"):
    a = np.asarray(values, dtype=np.float64)
    return (fmt + " ± " + fmt).format(a.mean(), a.std(ddof=1) if len(a) > 1 else 0.0)


def run_study(args, base):
    """The evidence study on the toy mixture, every arm for every seed.

    Q1: post-training from CMT vs teacher (diffusion) vs random initialisation at equal compute counted
        from the teacher on (the CMT arm spends part of the budget on mid-training), curves over time.
    Q2: the CMT arm's knobs at the same budget: mid/post split, teacher solver steps, metric, trajectory reuse.
    Q3: gradient bias at the start of post-training for the three initialisations."""
    root = Path(args.outdir)
    root.mkdir(parents=True, exist_ok=True)
    budget, every, seeds = args.budget, args.eval_every, list(range(args.seeds))
    mid_iters = round(budget * args.mid_frac / every) * every
    t_study = time.time()

    def stage(name, sub, seed, iters, snapshots=True, **over):
        ns = dict(base, preset="tiny", stage=name, outdir=str(root / sub), seed=seed, iters=iters, mimg=None,
                  log_every=max(every, 50), ckpt_every=every if snapshots else 0,
                  snap_every=every if snapshots else 0, sample_every=0, resume=None, **over)
        cfg = cc.resolve_config(argparse.Namespace(**ns))
        t0 = time.time()
        _, ema = cc.train(cfg)
        return cfg, ema.eval(), time.time() - t0

    def snapshots(cfg, sub, iters):
        """EMA of each ckpt-NNNNNNN.pt of a run, evaluated, then deleted (ckpt-latest.pt stays)."""
        net = cc.build_net(cfg, "ecm", dropout=0.0)
        out = []
        for k in range(every, iters + 1, every):
            path = root / sub / f"ckpt-{k:07d}.pt"
            net.load_state_dict(cc.read_checkpoint(path, "snapshot")["ema"])
            out.append((k, evaluate(net)))
            path.unlink()
        return out

    def initial(cfg, init, teacher_ckpt, seed):
        torch.manual_seed(seed)  # as cmt_cifar10.train() seeds before building the network (one process)
        net = cc.build_net(cfg, "ecm", dropout=0.0)
        cc.init_weights(net, dict(cfg, init=init, teacher=teacher_ckpt), None)
        return net.eval()

    results = dict(config=dict(budget=budget, mid_iters=mid_iters, eval_every=every, seeds=seeds,
                               eval_num=base["eval_num"]), q1={}, q2={}, q3={}, wall={})
    evaluate = None
    for seed in seeds:
        s = f"seed{seed}"
        _, _, t_teacher = stage("pretrain", f"{s}/teacher", seed, args.teacher_iters, snapshots=False,
                                init="random", teacher=None)
        teacher_ckpt = str(root / s / "teacher" / "ckpt-latest.pt")
        results["wall"][f"{s}/teacher"] = t_teacher
        # Q1: three arms at one budget; the curves start from each arm's initialisation.
        mcfg, mid_ema, t_mid = stage("mid", f"{s}/cmt-mid", seed, mid_iters, teacher=teacher_ckpt, init="teacher")
        evaluate = evaluate or cc.ToyQuality(mcfg, base["eval_num"])
        start = evaluate(initial(mcfg, "teacher", teacher_ckpt, seed))
        curve = [(0.0, start)] + [(study_cost("mid", k), m) for k, m in snapshots(mcfg, f"{s}/cmt-mid", mid_iters)]
        mid_ckpt = str(root / s / "cmt-mid" / "ckpt-latest.pt")
        pcfg, _, t_post = stage("post", f"{s}/cmt-post", seed, budget - mid_iters, init=mid_ckpt, teacher=None)
        offset = study_cost("mid", mid_iters)
        curve += [(offset + k, m) for k, m in snapshots(pcfg, f"{s}/cmt-post", budget - mid_iters)]
        results["q1"].setdefault("CMT -> ECT", {})[s] = curve
        results["wall"][f"{s}/CMT -> ECT"] = t_mid + t_post
        for arm, init in (("teacher -> ECT", "teacher"), ("random -> ECT", "random")):
            cfg, _, wall = stage("post", f"{s}/{init}-post", seed, budget, init=init, teacher=teacher_ckpt)
            curve = [(0.0, evaluate(initial(cfg, init, teacher_ckpt, seed)))]
            curve += [(float(k), m) for k, m in snapshots(cfg, f"{s}/{init}-post", budget)]
            results["q1"].setdefault(arm, {})[s] = curve
            results["wall"][f"{s}/{arm}"] = wall
        # Q3: gradient bias of the three initialisations (the CMT one is the mid-trained EMA).
        for arm, net in (("CMT", mid_ema), ("teacher", initial(mcfg, "teacher", teacher_ckpt, seed)),
                         ("random", initial(mcfg, "random", teacher_ckpt, seed))):
            results["q3"].setdefault(arm, {})[s] = gradient_bias(net.train(), evaluate.toy, 512, 1000 + seed,
                                                                 pcfg["ect_q"])
        # Q2: knobs of the CMT arm at the same budget, final quality only.
        variants = {f"split mid {f:.0%}": dict(mid=round(budget * f / every) * every) for f in args.splits}
        variants.update({f"solver steps {n}": dict(teacher_steps=n) for n in (8, 32)})
        variants.update({"metric huber": dict(metric="huber")})
        variants.update({f"traj-reuse {k}": dict(traj_reuse=k) for k in (4, 16)})
        for name, over in variants.items():
            m_it = over.pop("mid", mid_iters)
            sub = f"{s}/q2-{name.replace(' ', '-').replace('%', '')}"
            _, _, t_m = stage("mid", sub + "-mid", seed, m_it, snapshots=False, teacher=teacher_ckpt, init="teacher", **over)
            _, ema, t_p = stage("post", sub + "-post", seed, budget - m_it, snapshots=False,
                                init=str(root / (sub + "-mid") / "ckpt-latest.pt"), teacher=None)
            results["q2"].setdefault(name, {})[s] = dict(evaluate(ema), mid_iters=m_it, wall=t_m + t_p,
                                                         cost=study_cost("mid", m_it, over.get("traj_reuse", 1)) + budget - m_it)
        (root / "study.json").write_text(json.dumps(results, indent=1))
    results["wall"]["total"] = time.time() - t_study
    (root / "study.json").write_text(json.dumps(results, indent=1))
    report = study_report(results)
    (root / "study.md").write_text(report)
    draw_curves([(f"{k}-step flow-map error (MSE vs exact ODE), {len(seeds)} seeds: mean, min-max band",
                  {arm: seed_points(runs, f"err{k}") for arm, runs in results["q1"].items()}) for k in (1, 2)],
                root / "study-convergence.png", "compute since the teacher (ECT-iteration equivalents)",
                marker_x=study_cost("mid", mid_iters), marker_label="CMT: mid | post")
    print(report + f"\nstudy: {time.time() - t_study:.0f} s; wrote {root}/study.json, study.md, study-convergence.png")
    return results


def study_report(results):
    """Markdown tables of the study (mean +- std over seeds; 'wins' counts seeds where CMT is better)."""
    seeds = [f"seed{s}" for s in results["config"]["seeds"]]
    budget, mid_iters = results["config"]["budget"], results["config"]["mid_iters"]
    q1 = results["q1"]
    at = lambda arm, s, x, key: min(q1[arm][s], key=lambda pt: abs(pt[0] - x))[1][key]
    marks = [study_cost("mid", mid_iters), budget / 2, budget]
    rows = []
    for arm in q1:
        for key in ("err1", "err2"):
            row = [arm, f"{key[-1]}-step", mean_std([q1[arm][s][0][1][key] for s in seeds])]
            row += [mean_std([at(arm, s, x, key) for s in seeds]) for x in marks]
            if arm != "CMT -> ECT":
                row.append(f"{sum(at('CMT -> ECT', s, budget, key) < at(arm, s, budget, key) for s in seeds)}/{len(seeds)}")
            else:
                row.append("-")
            rows.append(row)
    # The same curves by post-training iterations alone (the mid stage not charged): the paper's view.
    post_its = budget - mid_iters
    at_post = lambda arm, s, k, key: at(arm, s, k + (marks[0] if arm == "CMT -> ECT" else 0), key)
    prow = []
    for arm in q1:
        for key in ("err1", "err2"):
            row = [arm, f"{key[-1]}-step"] + [mean_std([at_post(arm, s, k, key) for s in seeds])
                                              for k in (0, post_its // 2, post_its)]
            wins = sum(at_post("CMT -> ECT", s, post_its, key) < at_post(arm, s, post_its, key) for s in seeds)
            prow.append(row + (["-"] if arm == "CMT -> ECT" else [f"{wins}/{len(seeds)}"]))
    fds = [[arm, f"{k}-step", mean_std([q1[arm][s][-1][1][f"fd{k}"] for s in seeds], "{:.3f}")]
           for arm in q1 for k in (1, 2)]
    out = study_table(f"Q1: flow-map error over post-training at equal compute (budget {budget} ECT-iteration "
                      f"equivalents; CMT spends {marks[0]:.0f} of them on mid-training)",
                      ["initialisation", "sampler", "at init", f"at {marks[0]:.0f}", f"at {marks[1]:.0f}",
                       f"at {marks[2]:.0f} (end)", "CMT better at end (seeds)"], rows)
    out += "\n" + study_table("Q1: the same runs at equal post-training iterations (mid-training not charged)",
                              ["initialisation", "sampler", "post it 0", f"post it {post_its // 2}", f"post it {post_its}",
                               f"CMT better at it {post_its} (seeds)"], prow)
    out += "\n" + study_table("Q1: pixel FD at the end of the budget", ["initialisation", "sampler", "pixel FD"], fds)
    wall = results["wall"]
    out += "\n" + study_table("Q1: wall time per arm (2-core CPU)", ["arm", "seconds (mean ± std)"],
                              [[arm, mean_std([wall[f"{s}/{arm}"] for s in seeds], "{:.1f}")] for arm in q1])
    base = {s: dict(err1=at("CMT -> ECT", s, budget, "err1"), err2=at("CMT -> ECT", s, budget, "err2")) for s in seeds}
    q2rows = [["default (split 33%, 16 steps, l2, reuse 1)", f"{budget:.0f}", mean_std([base[s]["err1"] for s in seeds]),
               mean_std([base[s]["err2"] for s in seeds]), mean_std([wall[f"{s}/CMT -> ECT"] for s in seeds], "{:.1f}")]]
    for name, runs in results["q2"].items():
        q2rows.append([name, f"{np.mean([runs[s]['cost'] for s in seeds]):.0f}", mean_std([runs[s]["err1"] for s in seeds]),
                       mean_std([runs[s]["err2"] for s in seeds]), mean_std([runs[s]["wall"] for s in seeds], "{:.1f}")])
    out += "\n" + study_table("Q2: CMT variants, final flow-map error (post-training fills the rest of the budget)",
                              ["variant", "counted compute", "1-step err", "2-step err", "wall s"], q2rows)
    q3rows = [[arm, mean_std([r[s]["target_err"] for s in seeds], "{:.4g}"), mean_std([r[s]["rel_bias"] for s in seeds], "{:.3f}"),
               mean_std([r[s]["cosine"] for s in seeds], "{:.3f}")] for arm, r in results["q3"].items()]
    out += "\n" + study_table("Q3: start of post-training: target error E|sg f(x_r,r) - Psi(x_t)|^2 and gradient bias",
                              ["initialisation", "target error", "|g - g*| / |g*|", "cos(g, g*)"], q3rows)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--outdir", default="runs/study", help="output folder (default: runs/study)")
    a("--seeds", type=int, default=3, help="seeds per arm (default: 3)")
    a("--budget", type=int, default=600, help="compute per arm from the teacher on, in ECT-iteration "
                                              "equivalents (default: 600)")
    a("--mid-frac", type=float, default=1 / 3, help="CMT arm's share of the budget spent on mid-training (default: 1/3)")
    a("--splits", type=lambda s: [float(v) for v in s.split(",")], default=[1 / 6, 2 / 3],
      help="Q2: other mid shares to compare (default: 1/6,2/3)")
    a("--teacher-iters", type=int, default=cc.PRESETS["tiny"]["pretrain"]["iters"],
      help="EDM pre-training iterations of each seed's teacher (default: 400, as --preset tiny)")
    a("--eval-every", type=int, default=50, help="iterations between curve points (default: 50)")
    args, rest = p.parse_known_args(argv)
    return run_study(args, vars(cc.parse_args(["--preset", "tiny", *rest])))


if __name__ == "__main__":
    main()
