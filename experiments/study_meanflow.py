"""The evidence study of meanflow_post.py: MeanFlow post-training from the CMT-MF initialisation vs from
random weights, at equal total compute counted from the teacher on, on the toy mixture (every class one
Gaussian, so the 1- and 2-step flow maps have a closed form and "quality" is the error against it).

    python experiments/study_meanflow.py --outdir runs/mf-study                  # 3 seeds, tiny MeanFlow teacher
    python experiments/study_meanflow.py --teacher flow --outdir runs/mf-flow    # + the diffusion-initialised arm

`--teacher meanflow` uses the tiny preset's smaller MeanFlow teacher (no teacher-initialised arm: its
weights do not fit the student); `flow` pre-trains a student-sized flow-matching (diffusion) teacher
(ratio_neq = 0), solves with Heun, and adds the teacher-initialised arm. Writes study.json, study.md and
study-convergence.png. Flags this script does not define go to meanflow_post.py (always --preset tiny),
e.g. `--iters 600 --eval-num 512`.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import meanflow_post as mf  # noqa: E402
from plot import draw_curves, seed_points  # noqa: E402


def study_cost(stage, iters, cfg):
    """Compute in MeanFlow-iteration equivalents at equal batch B, counting network passes in forwards
    (backward = 2; a jvp carries primal and tangent, 3): a MeanFlow step is jvp + backward = 5B (+1B per
    CFG forward, none in the tiny recipe); a CMT-MF step is the student's forward+backward, 3B, plus
    the teacher's NFE (teacher_steps, twice that for Heun) on B/pairs trajectories, charged as
    student-sized passes (the meanflow teacher is smaller)."""
    if stage == "post":
        return float(iters)
    nfe = cfg["teacher_steps"] * (2 if cfg["teacher_solver"] == "heun" else 1)
    return iters * (3 + nfe / cfg["pairs"]) / 5


def run_study(cfg_for, outdir, seeds, every, teacher_kind="meanflow"):
    """Per seed a teacher, then CMT-MF mid + MeanFlow post, and MeanFlow
    from random weights given the same counted compute; writes study.json, study.md, study-convergence.png."""
    outdir, t_study = Path(outdir), time.time()
    flow = teacher_kind == "flow"
    teacher_extra = dict(model=cfg_for("post")["model"], ratio_neq=0.0) if flow else {}
    mid_extra = dict(teacher_solver="heun") if flow else {}
    mid_cfg, post_cfg = dict(cfg_for("mid"), **mid_extra), cfg_for("post")
    mid_iters, post_iters = mid_cfg["iters"], post_cfg["iters"]
    offset = study_cost("mid", mid_iters, mid_cfg)
    random_iters = post_iters + int(round(offset / every)) * every
    num = post_cfg["eval_num"]
    def evaluate(net, cfg):  # {err1, fd1, err2, fd2}: flow-map error and pixel FD of 1- and 2-step samples
        out = {}
        for steps in (1, 2):
            out[f"err{steps}"], out[f"fd{steps}"], _ = mf.quality_row(net, cfg, steps, num)
        return out
    results = dict(config=dict(mid_iters=mid_iters, post_iters=post_iters, random_iters=random_iters, mid_cost=offset, every=every,
                               seeds=list(seeds), eval_num=num, teacher=teacher_kind), curves={}, wall={})

    def run(stage, name, seed, iters, **extra):
        cfg = dict(cfg_for(stage), seed=seed, iters=iters, snap_every=every, resume=None, **extra)
        t0 = time.time()
        tr = mf.train(cfg, stage, outdir / f"seed{seed}" / name)
        points = []
        for k in range(every, iters + 1, every):  # each snapshot's EMA, evaluated, then deleted
            path = outdir / f"seed{seed}" / name / f"ckpt-{k:07d}.pt"
            points.append((k, evaluate(mf.load_ema_net(path, "snapshot")[0], cfg)))
            path.unlink()
        torch.manual_seed(seed)  # the network every arm starts from, as meanflow_post builds it
        return tr, points, time.time() - t0, evaluate(mf.build_net(cfg), cfg)

    for seed in seeds:
        s = f"seed{seed}"
        teacher, _, results["wall"][f"{s}/teacher"], _ = run("pretrain", "teacher", seed, cfg_for("pretrain")["iters"],
                                                             **teacher_extra)
        teacher_ckpt = str(teacher.outdir / "ckpt-latest.pt")
        _, mid, t_mid, start = run("mid", "cmt-mid", seed, mid_iters, teacher=teacher_ckpt, **mid_extra)
        _, post, t_post, _ = run("post", "cmt-post", seed, post_iters, init=str(outdir / s / "cmt-mid" / "ckpt-latest.pt"))
        results["curves"].setdefault("CMT-MF -> MeanFlow", {})[s] = (
            [(0.0, start)] + [(study_cost("mid", k, mid_cfg), m) for k, m in mid] + [(offset + k, m) for k, m in post])
        results["wall"][f"{s}/CMT-MF -> MeanFlow"] = t_mid + t_post
        _, rnd, t_rnd, start = run("post", "random-post", seed, random_iters, init="random")
        results["curves"].setdefault("random -> MeanFlow", {})[s] = [(0.0, start)] + [(float(k), m) for k, m in rnd]
        results["wall"][f"{s}/random -> MeanFlow"] = t_rnd
        if flow:
            _, fm, t_fm, _ = run("post", "teacher-post", seed, random_iters, init="teacher", teacher=teacher_ckpt)
            start = evaluate(mf.load_ema_net(teacher_ckpt, "--teacher")[0], post_cfg)
            results["curves"].setdefault("teacher (flow) -> MeanFlow", {})[s] = [(0.0, start)] + [(float(k), m) for k, m in fm]
            results["wall"][f"{s}/teacher (flow) -> MeanFlow"] = t_fm
    results["wall"]["total"] = time.time() - t_study
    (outdir / "study.json").write_text(json.dumps(results, indent=1))
    report = study_report(results)
    (outdir / "study.md").write_text(report)
    draw_curves([(f"{k}-step flow-map error (MSE vs exact map), {len(seeds)} seeds: mean, min-max band",
                  {arm: seed_points(runs, f"err{k}") for arm, runs in results["curves"].items()}) for k in (1, 2)],
                outdir / "study-convergence.png", "compute since the teacher (MeanFlow-iteration equivalents)",
                marker_x=offset, marker_label="CMT-MF: mid | post")
    print(report + f"\nstudy: {time.time() - t_study:.0f} s; wrote {outdir}/study.json, study.md, study-convergence.png", flush=True)
    return results


def study_report(results):
    """Markdown tables (mean +- std over seeds) at equal counted compute and at equal post iterations."""
    c, curves = results["config"], results["curves"]
    seeds = [f"seed{s}" for s in c["seeds"]]
    at = lambda arm, s, x: min(curves[arm][s], key=lambda pt: abs(pt[0] - x))[1]
    ms = lambda v, f="{:.4f}": (f + " ± " + f).format(np.mean(v), np.std(v, ddof=1) if len(v) > 1 else 0.0)
    cmt, rnd = "CMT-MF -> MeanFlow", "random -> MeanFlow"
    end, offset = float(c["random_iters"]), c["mid_cost"]
    lines = ["**MeanFlow: flow-map error at equal counted compute "
             f"(CMT-MF spends {offset:.0f} of {end:.0f} MeanFlow-iteration equivalents on mid-training)**", "",
             "| initialisation | metric | at init | at " + f"{offset:.0f} | at {end:.0f} (end) | CMT-MF better at end (seeds) |",
             "|---|---|---|---|---|---|"]
    for arm in curves:
        for key in ("err1", "err2", "fd1", "fd2"):
            f = "{:.4f}" if key.startswith("err") else "{:.2f}"
            row = [ms([at(arm, s, x)[key] for s in seeds], f) for x in (0, offset, end)]
            wins = "-" if arm == cmt else f"{sum(at(cmt, s, end)[key] < at(arm, s, end)[key] for s in seeds)}/{len(seeds)}"
            lines.append(f"| {arm} | {key[:-1]} {key[-1]}-step | " + " | ".join(row) + f" | {wins} |")
    lines += ["", f"**MeanFlow: the same runs at equal post-training iterations ({c['post_iters']}; mid not charged)**", "",
              "| initialisation | 1-step err | 2-step err | 1-step FD | wall s |", "|---|---|---|---|---|"]
    for arm in curves:
        x = (offset if arm == cmt else 0) + c["post_iters"]
        vals = [ms([at(arm, s, x)[k] for s in seeds], "{:.4f}" if k.startswith("err") else "{:.2f}") for k in ("err1", "err2", "fd1")]
        lines.append(f"| {arm} | " + " | ".join(vals) + f" | {ms([results['wall'][f'{s}/{arm}'] for s in seeds], '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--outdir", default="runs/mf-study", help="output folder (default: runs/mf-study)")
    a("--seeds", type=int, default=3, help="seeds per arm (default: 3)")
    a("--eval-every", type=int, default=60, help="iterations between curve points (default: 60)")
    a("--teacher", choices=["meanflow", "flow"], default="meanflow",
      help="the tiny MeanFlow teacher, or a student-sized flow-matching teacher (+ a teacher-init arm) (default: meanflow)")
    args, rest = p.parse_known_args(argv)
    mf_args = mf.parse_args(["--preset", "tiny", *rest])
    return run_study(lambda s: mf.resolve_config(mf_args, s), args.outdir, range(args.seeds), args.eval_every, args.teacher)


if __name__ == "__main__":
    main()
