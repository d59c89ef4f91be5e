"""The device check: one command that proves the GPU paths and measures them, writing one report.

    python tools/gpu_check.py                  # on a GPU machine: the CUDA tests, then real-size benchmarks
    python tools/gpu_check.py --cpu --out DIR  # the same parts at tiny sizes on the CPU (the test suite runs it)

Parts, in order of importance, each in its own process under a share of --budget seconds (a part that
fails or runs out of time is reported as such and the rest go on):
  1. tests: `pytest test_cmt.py -k test_cuda_` (the test_cuda_* tests; on a machine without CUDA they are
     all skipped, "needs CUDA"); with pytest-xdist installed, over 4 processes.
  2. benchmarks of experiments/bench_{cifar10,imagenet,meanflow}.py at the paper's network sizes and
     per-GPU batches, in fp32, bf16 and bf16 + torch.compile: seconds per step, img/s, peak memory
     (torch.cuda.max_memory_allocated) and the mid-step / plain-step ratio.
  3. FID feature extraction (fid.inception_stats, random Inception weights: the speed does not depend
     on them) in images/s.
The report is DIR/report.json (every number) and DIR/report.md (the tables for the README).
Needs nothing but the repository and requirements.txt.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (script, benchmark argv) at the paper's sizes and per-GPU batches; --cpu swaps in the tiny ones.
BENCHES = {
    "cifar10": ["bench_cifar10", "--preset", "cifar10", "--batch-gpu", "16", "--reps", "5"],  # DDPM++ 55.7M, 512/32 GPUs
    # EDM2-S and -XXL; every script's default is fp32 (TF32 off both ways), so the fp32 rows need no flag
    "imagenet": ["bench_imagenet", "--preset", "img512-s", "--sizes", "s,xxl", "--batch-gpu", "16", "--reps", "3"],
    "meanflow": ["bench_meanflow", "--models", "XL/2", "--batch-gpu", "32", "--reps", "5"],  # 256 over 8 GPUs
}
BENCHES_CPU = {
    "cifar10": ["bench_cifar10", "--preset", "tiny", "--batch-gpu", "16", "--reps", "1"],
    "imagenet": ["bench_imagenet", "--preset", "tiny", "--sizes", "tiny", "--batch-gpu", "16", "--reps", "1"],
    # the teacher is MF-B/4 at every size: a buffer of 4 trajectories keeps its bulk solve to seconds on a CPU
    "meanflow": ["bench_meanflow", "--models", "tiny", "--batch-gpu", "8", "--reps", "1", "--traj-buffer", "4"],
}
MODES = {"fp32": [], "bf16": ["--bf16"], "bf16+compile": ["--bf16", "--compile"]}

# A part runs as `python -c CHILD spec.json result.json`, so that a crash, a hang or CUDA's state of one
# part cannot spoil the next.
CHILD = """
import json, sys
sys.path[:0] = [{root!r}, {root!r} + "/experiments", {root!r} + "/tools"]
import gpu_check
spec = json.load(open(sys.argv[1]))
json.dump(gpu_check.run_part(spec), open(sys.argv[2], "w"))
"""


def run_part(spec):
    """In the child: one benchmark or the FID timing; returns a JSON-able dict."""
    import torch
    if spec["kind"] == "bench":
        module = __import__(spec["argv"][0])
        return module.main(spec["argv"][1:])
    return fid_throughput(torch.device(spec["device"]), spec["num"], spec["batch"])


def fid_throughput(device, num, batch):
    """Images/s of fid.inception_stats (Inception at 299x299, fp32 convolutions, float64 statistics) on
    random 256x256 uint8 images, after a warm-up batch."""
    import torch
    import fid
    net = fid.InceptionV3().to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fid.inception_stats([images], weights=net, device=device)
    sync()
    t0 = time.perf_counter()
    _, _, n = fid.inception_stats((images for _ in range(num // batch)), weights=net, device=device)
    sync()
    sec = time.perf_counter() - t0
    return dict(images=n, sec=sec, img_per_s=n / sec, batch=batch)


def spawn(spec, out, timeout, env):
    """Run one part in a child process; (result or None, status line, seconds)."""
    spec_path, res_path = out / f"part-{spec['name']}.json", out / f"part-{spec['name']}.result.json"
    spec_path.write_text(json.dumps(spec))
    res_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(out / f"part-{spec['name']}.log", "w") as log:
        try:
            p = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), str(spec_path), str(res_path)],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            status = "ok" if p.returncode == 0 else f"failed (exit {p.returncode}, see part-{spec['name']}.log)"
        except subprocess.TimeoutExpired:
            status = f"out of time ({timeout:.0f} s)"
    sec = time.perf_counter() - t0
    result = json.loads(res_path.read_text()) if status == "ok" else None
    return result, status, sec


def run_tests(out, timeout, env):
    """pytest -k test_cuda_; its summary line and the per-test outcomes (JUnit XML), or why it did not finish."""
    import importlib.util
    junit = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-k", "test_cuda_", "-p", "no:cacheprovider", f"--junitxml={junit}",
           str(ROOT / "test_cmt.py")]
    if importlib.util.find_spec("xdist"):
        cmd[3:3] = ["-n", "4"]
    t0 = time.perf_counter()
    with open(out / "tests.log", "w") as log:
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = None
    text = (out / "tests.log").read_text()
    summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?|deselected) ", ln)]
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    skips = sorted(set(re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", text, re.M)))
    return dict(exit=rc, summary=summary[-1] if summary else "no summary (see tests.log)", failed=failed,
                skip_reasons=skips, sec=time.perf_counter() - t0,
                status="out of time" if rc is None else ("ok" if rc == 0 else f"exit {rc}"))


def environment():
    import torch
    cuda = torch.cuda.is_available()
    return dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                device=torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
                threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def markdown(report):
    """The report's tables: what was measured, on which device, with which command."""
    e = report["env"]
    lines = [f"Device check on **{e['device']}**, torch {e['torch']} (CUDA {e['cuda']}), {e['date']}; "
             f"`{report['command']}`, {report['sec']:.0f} s.", ""]
    t = report["tests"]
    lines += [f"CUDA tests: {t['summary']} ({t['sec']:.0f} s)"
              + (f"; failed: {', '.join(t['failed'])}" if t["failed"] else "")
              + (f"; skip reasons: {'; '.join(t['skip_reasons'])}" if t["skip_reasons"] else ""), ""]
    lines += ["| script | network | mode | plain step (s) | img/s plain | mid step (s) | mid / plain | img/s mid | "
              "bulk mid / plain | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["benches"]:
        if row["result"] is None:
            lines.append(f"| {row['script']} | | {row['mode']} | {row['status']} | | | | | | |")
            continue
        for net, r in flatten(row["script"], row["result"]):
            bulk = f"{r['mid_bulk_over_plain']:.3f}" if "mid_bulk_over_plain" in r else "-"
            lines.append(f"| {row['script']} | {net} | {row['mode']} | {r['plain_s']:.4f} | {r['img_per_s_plain']:.1f} | "
                         f"{r['mid_s']:.4f} | {r['mid_over_plain']:.3f} | {r['img_per_s_mid']:.1f} | {bulk} | "
                         f"{r['peak_gb']:.2f} |")
    f = report["fid"]
    lines += ["", "FID features: " + (f"{f['result']['img_per_s']:.0f} images/s ({f['result']['images']} images, "
                                       f"batch {f['result']['batch']})" if f["result"] else f["status"])]
    return "\n".join(lines) + "\n"


def flatten(script, result):
    """(network, row) pairs of one benchmark's result, in the report's common columns."""
    if script == "cifar10":
        return [("DDPM++", result)]
    if script == "imagenet":
        return [(f"EDM2-{size.upper()}", r) for size, r in result.items()]
    # bench_meanflow times a CMT-MF step relative to the plain step; with its teacher it is the mid step.
    return [(f"DiT-MF {name}", dict(r, mid_s=r["plain_s"] * r["cmt_teacher_ratio"], mid_over_plain=r["cmt_teacher_ratio"],
                                    img_per_s_mid=r["img_per_s_cmt_teacher"])) for name, r in result.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (what the test suite runs)")
    p.add_argument("--out", default="runs/gpu_check", help="folder of the report (default: runs/gpu_check)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all parts together (default: 420)")
    p.add_argument("--parts", default="tests,benches,fid", help="comma-separated subset of tests,benches,fid")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    args = p.parse_args(argv)
    import torch
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: error: no CUDA device here; --cpu runs the check at tiny sizes on the CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU mode stays on the CPU even on a GPU machine
    parts = set(args.parts.split(","))
    deadline = time.perf_counter() + args.budget
    left = lambda: max(1.0, deadline - time.perf_counter())
    report = dict(command="python tools/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  env=environment() if not args.cpu else dict(environment(), device=f"CPU ({os.cpu_count()} cores)"),
                  tests=dict(summary="not run", failed=[], skip_reasons=[], sec=0.0, status="not run"),
                  benches=[], fid=dict(result=None, status="not run"))
    t0 = time.perf_counter()

    def save():
        report["sec"] = time.perf_counter() - t0
        (out / "report.json").write_text(json.dumps(report, indent=1))
        (out / "report.md").write_text(markdown(report))

    if "tests" in parts:
        report["tests"] = run_tests(out, 0.45 * left(), env)
        print(f"[gpu_check] tests: {report['tests']['summary']}", flush=True)
        save()
    if "benches" in parts:
        modes = args.modes.split(",")
        jobs = [(s, m) for m in modes for s in BENCHES]  # every script in fp32 first: the cheap rows come back first
        for i, (script, mode) in enumerate(jobs):
            argv_ = (BENCHES_CPU if args.cpu else BENCHES)[script] + MODES[mode]
            spec = dict(kind="bench", name=f"{script}-{mode.replace('+', '-')}", argv=argv_)
            result, status, sec = spawn(spec, out, left() / (len(jobs) - i + ("fid" in parts)), env)
            report["benches"].append(dict(script=script, mode=mode, argv=argv_, result=result, status=status, sec=sec))
            print(f"[gpu_check] {script} {mode}: {status} ({sec:.0f} s)", flush=True)
            save()
    if "fid" in parts:
        device = "cpu" if args.cpu else "cuda"
        num, batch = (64, 32) if args.cpu else (10000, 250)
        result, status, sec = spawn(dict(kind="fid", name="fid", device=device, num=num, batch=batch), out, left(), env)
        report["fid"] = dict(result=result, status=status, sec=sec)
        print(f"[gpu_check] fid: {status} ({sec:.0f} s)", flush=True)
    save()
    print(markdown(report), end="")
    return report


if __name__ == "__main__":
    main()
