"""Round 2 of the evidence study: when does CMT beat the diffusion (teacher) initialisation at equal compute?

One factor at a time from round 1's default cell, 5 seeds per cell, as pre-registered in experiments/README.md.
Each question is one command that prints its tables and writes QUESTION.json, QUESTION.md and QUESTION.png:

    python experiments/study_round2.py teacher  --outdir runs/round2   # Q1: teacher quality, analytic teacher
    python experiments/study_round2.py width    --outdir runs/round2   # Q2: student (and teacher) width
    python experiments/study_round2.py budget   --outdir runs/round2   # Q3: 4x the budget
    python experiments/study_round2.py recipe   --outdir runs/round2   # Q4: post-training tuned per arm
    python experiments/study_round2.py meanflow --outdir runs/round2   # Q5: MeanFlow, small teacher, big student

Every training run is cached under OUTDIR/runs/ by its settings (a folder with result.json is not run again),
so the questions share the default cell's runs. Runs go to --workers processes of one thread each.
"""

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cmt_cifar10 as cc  # noqa: E402
import meanflow_post as mf  # noqa: E402
from plot import draw_curves, seed_points  # noqa: E402
from study_ect import mean_std, study_cost, study_table  # noqa: E402

SEEDS, TUNING_SEED = [0, 1, 2, 3, 4], 5
# Round 1's default cell: cmt_cifar10.py PRESETS["tiny"] (model_channels 16, pretrain 400 iterations, post Adam 2e-4,
# ect_q 4096, EMA 0.99) and study_ect.py's budget of 600 ECT-iteration equivalents.
DEFAULT = dict(width=16, teacher_iters=400, budget=600, lr=2e-4, q=4096.0, ema=0.99)
RECIPE_GRID = [dict(lr=lr, q=q, ema=0.99) for lr in (1e-4, 2e-4, 4e-4) for q in (256.0, 4096.0)]
STALL = 150  # ECT iterations after the switch at which round 1 saw the CMT arm still stalled
CMT, TEACHER = "CMT -> ECT", "teacher -> ECT"

# ----------------------------------------------------------------------------- training runs (worker side)
# A run is a dict: script ("ect" | "mf"), kind (teacher | mid | post), dir, seed, iters, every (0: no curve)
# and the stage's settings. run_task trains it, evaluates its snapshots and writes DIR/result.json.

_quality = {}  # per worker process: cmt_cifar10.ToyQuality by (mid_t, eval_num); the exact map is solved once


def ect_quality(cfg, eval_num):
    key = (cfg["mid_t"], eval_num)
    if key not in _quality:
        _quality[key] = cc.ToyQuality(cfg, eval_num)
    return _quality[key]


def mf_quality(cfg, eval_num):
    def evaluate(net):  # {err1, fd1, err2, fd2} of 1- and 2-step samples against the closed-form map
        out = {}
        for steps in (1, 2):
            out[f"err{steps}"], out[f"fd{steps}"], _ = mf.quality_row(net, cfg, steps, eval_num)
        return out
    return evaluate


def ect_run(run):
    """cmt_cifar10.py --preset tiny: returns (result, evaluate, load) after training the run."""
    stage = dict(teacher="pretrain", mid="mid", post="post")[run["kind"]]
    over = dict(init=run["init"], teacher=run["teacher"])
    if stage == "post":
        over.update(lr=run["lr"], ect_q=run["q"], ema=run["ema"])
    ns = dict(vars(cc.parse_args(["--preset", "tiny"])), preset="tiny", stage=stage, outdir=run["dir"], seed=run["seed"],
              iters=run["iters"], mimg=None, model_channels=run["width"], log_every=run["iters"], ckpt_every=run["every"],
              snap_every=run["every"], sample_every=0, grid=0, resume=None, **over)
    cfg = cc.resolve_config(argparse.Namespace(**ns))
    evaluate = ect_quality(cfg, run["eval_num"])
    net = cc.build_net(cfg, "ecm", dropout=0.0)

    def load(path):
        net.load_state_dict(cc.read_checkpoint(path, "snapshot")["ema"])
        return net.eval()
    torch.manual_seed(run["seed"])  # the network the stage starts from, as cmt_cifar10.train() builds it
    start = cc.build_net(cfg, "ecm", dropout=0.0)
    if stage != "pretrain":
        cc.init_weights(start, cfg, None)
    start = evaluate(start.eval()) if stage != "pretrain" else None
    _, ema = cc.train(cfg)
    result = dict(start=start)
    if stage == "pretrain":
        result["err"], result["fd"] = evaluate.teacher(ema.eval())  # its own 35-NFE Heun sampler
    return result, evaluate, load


def mf_run(run):
    """meanflow_post.py --preset tiny: returns (result, evaluate, load) after training the run."""
    stage = dict(teacher="pretrain", mid="mid", post="post")[run["kind"]]
    cfg = dict(mf.resolve_config(mf.parse_args(["--preset", "tiny"]), stage), seed=run["seed"], iters=run["iters"],
               log_every=run["iters"], snap_every=run["every"], resume=None, **run["cfg"])
    evaluate = mf_quality(cfg, run["eval_num"])
    load = lambda path: mf.load_ema_net(path, "snapshot")[0].eval()  # noqa: E731
    torch.manual_seed(run["seed"])  # the network the stage starts from, as meanflow_post.train() builds it
    start = mf.build_net(cfg)
    if cfg["init"] not in (None, "random"):
        start = load(cfg["teacher"] if cfg["init"] == "teacher" else cfg["init"])
    result = dict(start=evaluate(start.eval()))
    mf.train(cfg, stage, run["dir"])
    if stage == "pretrain":
        result.update(evaluate(load(Path(run["dir"]) / "ckpt-latest.pt")))  # the teacher as a 1-/2-step model
    return result, evaluate, load


def run_task(run):
    """One training run -> its result dict {start, curve [(iteration, metrics)], wall, ...}, cached on disk."""
    torch.set_num_threads(1)
    folder = Path(run["dir"])
    if (folder / "result.json").is_file():
        return json.loads((folder / "result.json").read_text())
    shutil.rmtree(folder, ignore_errors=True)  # a run cut off earlier starts again
    t0 = time.time()
    result, evaluate, load = (ect_run if run["script"] == "ect" else mf_run)(run)
    result["wall"] = time.time() - t0  # training (and the start point), not the curve evaluation below
    result["curve"] = [(0, result["start"])] if run["every"] else []
    for k in range(run["every"], run["iters"] + 1, run["every"]) if run["every"] else ():
        path = folder / f"ckpt-{k:07d}.pt"
        result["curve"].append((k, evaluate(load(path))))
        path.unlink()
    (folder / "result.json").write_text(json.dumps(result))
    return result


def run_all(pool, runs):
    """Runs the missing runs in phases (teachers, then mids, then posts); returns {dir: result}."""
    results = {}
    for kind in ("teacher", "mid", "post"):  # longest first, so that the last runs of a phase are short ones
        todo = sorted([r for r in runs.values() if r["kind"] == kind], key=lambda r: -r["iters"] * r.get("width", 16) ** 2)
        results.update(zip([r["dir"] for r in todo], pool.map(run_task, todo, chunksize=1)))
    return results

# ----------------------------------------------------------------------------- arms (main side)


def ect_arm(runs, root, eval_num, arm, seed, width, teacher_iters, budget, lr, q, ema, analytic=False):
    """Adds the runs of one ECT arm to `runs`; returns the dirs (mid or None, post). The CMT arm spends a third
    of the budget on mid-training; runs are named by their settings, so cells share what they have in common."""
    every = budget // 12 if budget <= DEFAULT["budget"] else budget // 24
    def add(kind, name, **fields):
        run = dict(dict(script="ect", kind=kind, dir=str(Path(root) / "runs" / name), seed=seed, width=width,
                        eval_num=eval_num, every=every, teacher=None, init="random"), **fields)
        runs[run["dir"]] = run
        return run["dir"]
    tname = f"teacher-w{width}-i{teacher_iters}-s{seed}"
    teacher = str(Path(add("teacher", tname, iters=teacher_iters, every=0)) / "ckpt-latest.pt")
    recipe = dict(lr=lr, q=q, ema=ema)
    tag = f"lr{lr:g}-q{q:g}-ema{ema:g}"
    if arm == CMT:
        mid_iters = budget // 3
        mid = add("mid", f"mid-{tname}{'-analytic' if analytic else ''}-i{mid_iters}", iters=mid_iters,
                  teacher="analytic" if analytic else teacher, init=teacher if analytic else "teacher")
        post = add("post", f"post-{Path(mid).name}-i{budget - mid_iters}-{tag}", iters=budget - mid_iters,
                   init=str(Path(mid) / "ckpt-latest.pt"), **recipe)
        return mid, post
    return None, add("post", f"post-teacher-{tname}-i{budget}-{tag}", iters=budget, init="teacher", teacher=teacher, **recipe)


def arm_curve(results, mid, post, mid_cost=lambda k: study_cost("mid", k)):
    """An arm's curve over counted compute: its mid run (if any) then its post run from where the mid run's
    compute ends. The post run's own start point is the mid run's end, so it is not repeated."""
    if mid is None:
        return [(float(k), m) for k, m in results[post]["curve"]]
    curve = [(mid_cost(k), m) for k, m in results[mid]["curve"]]
    offset = curve[-1][0]
    return curve + [(offset + k, m) for k, m in results[post]["curve"][1:]]


def ect_cells(pool, args, settings, seeds=None):
    """{cell: {arm: {seedN: curve}}}, results and runs, for cells {name: [(arm, settings over DEFAULT), ...]}."""
    runs, names = {}, {}
    for cell, arms in settings.items():
        for arm, over in arms:
            for s in seeds or SEEDS:
                names[cell, arm, s] = ect_arm(runs, args.outdir, args.eval_num, arm, s, **dict(DEFAULT, **over))
    results = run_all(pool, runs)
    cells = {}
    for (cell, arm, s), (mid, post) in names.items():
        cells.setdefault(cell, {}).setdefault(arm, {})[f"seed{s}"] = arm_curve(results, mid, post)
    return cells, results, runs

# ----------------------------------------------------------------------------- tables and figures


def at(curve, x):
    return min(curve, key=lambda pt: abs(pt[0] - x))[1]


def paired(cmt, other, key):
    """CMT minus another arm at the end of the budget, paired by seed: (mean +- std, 'CMT wins k/n')."""
    d = np.array([cmt[s][-1][1][key] - other[s][-1][1][key] for s in cmt])
    f = "{:+.4f} ± {:.4f}" if key.startswith("err") else "{:+.3f} ± {:.3f}"
    return f.format(d.mean(), d.std(ddof=1) if len(d) > 1 else 0.0), f"{sum(d < 0)}/{len(d)}"


def cell_tables(title, cells, budget_of, cmt=CMT):
    """Every arm of every cell at the end of its budget, then CMT against each other arm, paired by seed."""
    rows, crows = [], []
    for name, arms in cells.items():
        for arm, curves in arms.items():
            end = [c[-1][1] for c in curves.values()]
            half = [at(c, budget_of(name) / 2)["err2"] for c in curves.values()]
            rows.append([name, arm, mean_std([m["err2"] for m in end]), mean_std([m["err1"] for m in end]),
                         mean_std([m["fd2"] for m in end], "{:.3f}"), mean_std(half)])
        for other in arms:
            if other != cmt and cmt in arms:
                cols = [x for key in ("err2", "err1", "fd2") for x in paired(arms[cmt], arms[other], key)]
                crows.append([name, f"{cmt} vs {other}"] + cols)
    out = study_table(f"{title}: flow-map error at the end of the budget (mean ± std over {len(SEEDS)} seeds)",
                      ["cell", "arm", "2-step err", "1-step err", "2-step pixel FD", "2-step err at half budget"], rows)
    return out + "\n" + study_table(f"{title}: differences paired by seed, at the end (negative: CMT better)",
                                    ["cell", "comparison", "Δ 2-step err", "CMT wins", "Δ 1-step err", "CMT wins",
                                     "Δ 2-step FD", "CMT wins"], crows)


def stall_table(cells, switch_of, cmt=CMT):
    """The CMT arm's 2-step error at the switch to post-training and STALL iterations later (round 1's stall)."""
    rows = []
    for name, arms in cells.items():
        a = [at(c, switch_of(name))["err2"] for c in arms[cmt].values()]
        b = [at(c, switch_of(name) + STALL)["err2"] for c in arms[cmt].values()]
        rows.append([name, mean_std(a), mean_std(b), f"{sum(v > u for u, v in zip(a, b))}/{len(a)}"])
    return study_table(f"{cmt}: 2-step error at the switch and {STALL} post-training iterations later",
                       ["cell", "at the switch", f"switch + {STALL}", "seeds that got worse"], rows)


def wall_table(results, runs):
    rows = {}
    for d, run in runs.items():
        rows.setdefault(run["kind"], []).append(results[d]["wall"])
    return study_table("Wall time per run (one thread; training, not the evaluation of its curve's snapshots)",
                       ["run", "count", "seconds (mean ± std)"],
                       [[k, len(v), mean_std(v, "{:.1f}")] for k, v in rows.items()])


def write_outputs(args, question, report, cells, data, marker, xlabel):
    """QUESTION.md / .json / .png (the 2-step error curves of every cell, mean line and min-max band)."""
    out = Path(args.outdir)
    (out / f"{question}.md").write_text(report)
    (out / f"{question}.json").write_text(json.dumps(dict(data, cells=cells), indent=1))
    draw_curves([(f"{name}: 2-step error", {arm: seed_points(cv, "err2") for arm, cv in arms.items()})
                 for name, arms in cells.items()], out / f"{question}.png", xlabel, marker_x=marker,
                marker_label="CMT: mid | post")
    print(report + f"\nwrote {out}/{question}.md, .json, .png", flush=True)

# ----------------------------------------------------------------------------- the questions


def both(**over):
    """The two arms of a cell, with the same settings over DEFAULT."""
    return [(CMT, over), (TEACHER, over)]


def q_teacher(pool, args):
    """Q1: teachers pre-trained 1x, 4x, 16x as long; and CMT on the analytic teacher's trajectories."""
    it = DEFAULT["teacher_iters"]
    settings = {f"teacher {it} (default)": both(), f"teacher {4 * it}": both(teacher_iters=4 * it),
                f"teacher {16 * it}": both(teacher_iters=16 * it),
                "analytic trajectories": [(CMT, dict(analytic=True)), (TEACHER, {})]}
    cells, results, runs = ect_cells(pool, args, settings)
    trows = []
    for n in (it, 4 * it, 16 * it):
        tr = [results[d] for d, r in runs.items() if r["kind"] == "teacher" and r["iters"] == n]
        trows.append([n, mean_std([r["err"] for r in tr]), mean_std([r["fd"] for r in tr], "{:.3f}"),
                      mean_std([r["wall"] for r in tr], "{:.1f}")])
    report = study_table("Q1: each teacher's own 35-NFE Heun sampler", ["pre-training iterations", "flow-map error",
                                                                       "pixel FD", "wall s"], trows)
    report += "\n" + cell_tables("Q1", cells, lambda c: DEFAULT["budget"])
    report += "\n" + stall_table(cells, lambda c: DEFAULT["budget"] // 3) + "\n" + wall_table(results, runs)
    write_outputs(args, "teacher", report, cells, dict(teachers=trows), DEFAULT["budget"] // 3,
                  "compute since the teacher (ECT-iteration equivalents)")


def q_width(pool, args):
    """Q2: the student twice as wide, its teacher too."""
    w = DEFAULT["width"]
    settings = {f"width {w} (default)": both(), f"width {2 * w}": both(width=2 * w)}
    cells, results, runs = ect_cells(pool, args, settings)
    report = cell_tables("Q2", cells, lambda c: DEFAULT["budget"]) + "\n" + wall_table(results, runs)
    write_outputs(args, "width", report, cells, {}, DEFAULT["budget"] // 3,
                  "compute since the teacher (ECT-iteration equivalents at the cell's width)")


def q_budget(pool, args):
    """Q3: four times the budget, the CMT arm's mid share a third in both."""
    b = DEFAULT["budget"]
    settings = {f"budget {b} (default)": both(), f"budget {4 * b}": both(budget=4 * b)}
    cells, results, runs = ect_cells(pool, args, settings)
    budget_of = lambda c: 4 * b if c == f"budget {4 * b}" else b  # noqa: E731
    report = cell_tables("Q3", cells, budget_of) + "\n" + stall_table(cells, lambda c: budget_of(c) // 3)
    write_outputs(args, "budget", report + "\n" + wall_table(results, runs), {f"budget {4 * b}": cells[f"budget {4 * b}"]},
                  {}, 4 * b // 3, "compute since the teacher (ECT-iteration equivalents)")


def q_recipe(pool, args):
    """Q4: each arm's post-training recipe chosen from RECIPE_GRID on TUNING_SEED, then compared on SEEDS."""
    tag = lambda r: f"lr {r['lr']:g}, q {r['q']:g}, EMA {r['ema']:g}"  # noqa: E731
    grid = {tag(r): both(**r) for r in RECIPE_GRID}
    tuning, results, runs = ect_cells(pool, args, grid, seeds=[TUNING_SEED])
    end = lambda cell, arm: tuning[cell][arm][f"seed{TUNING_SEED}"][-1][1]  # noqa: E731
    best = {arm: min(RECIPE_GRID, key=lambda r: end(tag(r), arm)["err2"]) for arm in (CMT, TEACHER)}
    report = study_table(f"Q4: the recipe grid on the tuning seed {TUNING_SEED}, flow-map error at the end",
                         ["recipe", "CMT 2-step", "CMT 1-step", "teacher 2-step", "teacher 1-step"],
                         [[c, *(f"{end(c, a)[k]:.4f}" for a in (CMT, TEACHER) for k in ("err2", "err1"))] for c in grid])
    report += "\n" + "".join(f"Chosen for {arm}: {tag(r)}.\n" for arm, r in best.items())
    settings = {"default recipe": both(), "tuned per arm": list(best.items())}
    cells, res2, runs2 = ect_cells(pool, args, settings)
    report += "\n" + cell_tables("Q4", cells, lambda c: DEFAULT["budget"]) + "\n"
    report += stall_table(cells, lambda c: DEFAULT["budget"] // 3) + "\n" + wall_table({**results, **res2}, {**runs, **runs2})
    write_outputs(args, "recipe", report, cells, dict(best={a: tag(r) for a, r in best.items()}, tuning=tuning),
                  DEFAULT["budget"] // 3, "compute since the teacher (ECT-iteration equivalents)")

# ----------------------------------------------------------------------------- Q5: MeanFlow

MF_CMT, MF_RANDOM, MF_TEACHER = "CMT-MF -> MeanFlow", "random -> MeanFlow", "teacher (flow) -> MeanFlow"
# A 128-wide student (the tiny preset's is 96), twice the 64-wide teacher's width: the teacher costs about a
# quarter of the student's FLOPs (the paper's MF-B/4 teacher is 5% of its XL/2 student).
mf.MODELS.setdefault("tiny-wide", dict(depth=2, hidden_size=128, num_heads=4, patch_size=2))
MF_CELLS = {  # teacher model, its training and iterations, student, mid solver, iterations, curve step
    "(a) 64-wide MeanFlow teacher, 128-wide student": dict(
        arms=(MF_CMT, MF_RANDOM), teacher=dict(model="tiny-teacher"), teacher_iters=1000, student="tiny-wide",
        solver="meanflow", mid=600, post=600, every=60),
    "(b) flow-matching teacher, 2x round 1's budget": dict(
        arms=(MF_CMT, MF_TEACHER), teacher=dict(model="tiny", ratio_neq=0.0), teacher_iters=1000, student="tiny",
        solver="heun", mid=600, post=1800, every=120),
}


def flop_ratio(teacher_model, student_model):
    """Forward FLOPs of the teacher over the student's (torch's FLOP counter, one toy image)."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = mf.resolve_config(mf.parse_args(["--preset", "tiny"]), "post")
    flops = []
    for model in (teacher_model, student_model):
        net, x = mf.build_net(dict(cfg, model=model)), torch.zeros(1, cfg["channels"], cfg["res"], cfg["res"])
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(x, torch.ones(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))
        flops.append(counter.get_total_flops())
    return flops[0] / flops[1]


def mf_mid_cost(iters, cfg, ratio):
    """CMT-MF iterations in MeanFlow-iteration equivalents (a MeanFlow step, jvp 3 + backward 2, is 5B): the
    student's forward+backward 3B plus the teacher's NFE on B/pairs trajectories at `ratio` of the student's FLOPs."""
    nfe = cfg["teacher_steps"] * (2 if cfg["solver"] == "heun" else 1)
    return iters * (3 + nfe / cfg["pairs"] * ratio) / 5


def q_meanflow(pool, args):
    """Q5: MeanFlow from the CMT-MF initialisation vs from random / the flow teacher's weights, equal compute."""
    base = mf.resolve_config(mf.parse_args(["--preset", "tiny"]), "mid")
    runs, names, costs = {}, {}, {}
    for cell, c in MF_CELLS.items():
        ratio = flop_ratio(c["teacher"]["model"], c["student"])
        offset = mf_mid_cost(c["mid"], dict(base, solver=c["solver"]), ratio)
        other_iters = c["post"] + round(offset / c["every"]) * c["every"]
        costs[cell] = dict(flop_ratio=ratio, mid_cost=offset, budget=offset + c["post"], other_iters=other_iters)
        for s in SEEDS:
            def add(kind, name, iters, every, **cfg):
                run = dict(script="mf", kind=kind, dir=str(Path(args.outdir) / "runs" / f"mf-{name}-s{s}"), seed=s,
                           iters=iters, every=every, eval_num=args.mf_eval_num, cfg=cfg)
                runs[run["dir"]] = run
                return run["dir"]
            tname = f"teacher-{c['teacher']['model']}{'-flow' if c['solver'] == 'heun' else ''}"
            teacher = str(Path(add("teacher", tname, c["teacher_iters"], 0, **c["teacher"])) / "ckpt-latest.pt")
            for arm in c["arms"]:
                if arm == MF_CMT:
                    mid = add("mid", f"mid-{c['student']}-{tname}", c["mid"], c["every"], model=c["student"],
                              teacher=teacher, teacher_solver=c["solver"])
                    post = add("post", f"post-{c['student']}-{Path(mid).name[:-3]}-i{c['post']}", c["post"], c["every"],
                               model=c["student"], init=str(Path(mid) / "ckpt-latest.pt"))
                    names[cell, arm, s] = (mid, post, lambda k, c=c, r=ratio: mf_mid_cost(k, dict(base, solver=c["solver"]), r))
                else:
                    init = "random" if arm == MF_RANDOM else "teacher"
                    post = add("post", f"post-{c['student']}-{init}-{tname}-i{other_iters}", other_iters, c["every"],
                               model=c["student"], init=init, teacher=teacher if init == "teacher" else None)
                    names[cell, arm, s] = (None, post, None)
    results = run_all(pool, runs)
    cells = {}
    for (cell, arm, s), (mid, post, cost) in names.items():
        cells.setdefault(cell, {}).setdefault(arm, {})[f"seed{s}"] = (
            arm_curve(results, mid, post, cost) if mid else arm_curve(results, None, post))
    trows = [[cell, f"{costs[cell]['flop_ratio']:.3f}", f"{costs[cell]['mid_cost']:.0f}", f"{costs[cell]['budget']:.0f}",
              *(mean_std([results[d][k] for d, r in runs.items() if r["kind"] == "teacher" and
                          Path(d).name.startswith(f"mf-teacher-{c['teacher']['model']}{'-flow' if c['solver'] == 'heun' else ''}-s")])
                for k in ("err1", "err2"))] for cell, c in MF_CELLS.items()]
    report = study_table("Q5: compute and teachers", ["cell", "teacher/student FLOPs", "CMT-MF mid cost",
                                                      "budget (MeanFlow-iteration equivalents)", "teacher 1-step err",
                                                      "teacher 2-step err"], trows)
    report += "\n" + cell_tables("Q5", cells, lambda c: costs[c]["budget"], cmt=MF_CMT)
    report += "\n" + stall_table(cells, lambda c: costs[c]["mid_cost"], cmt=MF_CMT) + "\n" + wall_table(results, runs)
    write_outputs(args, "meanflow", report, cells, dict(costs=costs), None, "compute since the teacher "
                  "(MeanFlow-iteration equivalents)")


QUESTIONS = dict(teacher=q_teacher, width=q_width, budget=q_budget, recipe=q_recipe, meanflow=q_meanflow)


class InProcess:  # --workers 0: every run in this process (for debugging and the tests)
    def map(self, fn, items, chunksize=1):
        return [fn(x) for x in items]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("question", choices=list(QUESTIONS), help="which question to run")
    p.add_argument("--outdir", default="runs/round2", help="output folder, shared by the questions (default: runs/round2)")
    p.add_argument("--workers", type=int, default=2, help="processes of one thread each; 0 = in this process (default: 2)")
    p.add_argument("--eval-num", type=int, default=1000, help="ECT questions: fixed noises of the flow-map error (default: 1000)")
    p.add_argument("--mf-eval-num", type=int, default=2000, help="Q5: the same for MeanFlow (default: 2000, as its tiny preset)")
    args = p.parse_args(argv)
    Path(args.outdir).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.workers == 0:
        QUESTIONS[args.question](InProcess(), args)
    else:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            QUESTIONS[args.question](pool, args)
    print(f"{args.question}: {time.time() - t0:.0f} s wall", flush=True)


if __name__ == "__main__":
    main()
