"""The device check: one command that proves the GPU paths and measures them, writing one report.

    timeout 530 python tools/gpu_check.py      # on a GPU machine: the CUDA tests, then real-size benchmarks
    python tools/gpu_check.py --cpu --out DIR  # the same parts at tiny sizes on the CPU (the test suite runs it)

Parts, in order of importance, each in its own process under a share of --budget seconds (a part that
fails or runs out of time is reported as such and the rest go on):
  1. tests: `pytest -v test_cmt.py -k test_cuda_` (the test_cuda_* tests; on a machine without CUDA they are
     all skipped, "needs CUDA"); with pytest-xdist installed, over 4 processes; with pytest-timeout, a test is
     stopped after half the part's time. Half the budget is theirs when other parts follow. The report names
     the tests that passed, failed and were not reached (when the part ran out of time).
  2. benchmarks of experiments/bench_{cifar10,imagenet,meanflow}.py at the paper's network sizes and
     per-GPU batches, in fp32, bf16 and bf16 + torch.compile: seconds per step, img/s, peak memory
     (torch.cuda.max_memory_allocated) and the mid-step / plain-step ratio.
  3. FID feature extraction (fid.inception_stats, random Inception weights: the speed does not depend
     on them) in images/s.
The default budget, 480 s, fits one device command of at most 600 s with the start of Python and the last
clean-up; --parts runs a subset (e.g. `--parts tests`, then `--parts benches,fid`) to give each more time.
When a part ends, whatever processes it started end with it: none is left to hold the GPU.
The report is DIR/report.json (every number) and DIR/report.md (the tables for the README).
Needs nothing but the repository and requirements.txt.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

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
DEFAULT_BUDGET = 480.0
TESTS_SHARE = 0.5  # the tests' share of the budget when benchmarks or FID follow them

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
    rc = run_child([sys.executable, "-c", CHILD.format(root=str(ROOT)), str(spec_path), str(res_path)],
                   out / f"part-{spec['name']}.log", timeout, env)
    sec = time.perf_counter() - t0
    status = ("ok" if rc == 0 else f"out of time ({timeout:.0f} s)" if rc is None
              else f"failed (exit {rc}, see part-{spec['name']}.log)")
    result = json.loads(res_path.read_text()) if status == "ok" else None
    return result, status, sec


def run_child(cmd, log_path, timeout, env):
    """Run cmd in ROOT, its output into log_path, for at most timeout seconds: its exit code, or None when it ran
    out of time. When it ends, on time or not, every process it started is ended too (end_all)."""
    with open(log_path, "w") as log:
        # a session of its own: its process group holds it and what it starts, and nothing of this process
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            end_all(p)


def end_all(p):
    """Kill the child p and every process it started, and wait until all are gone, so that none keeps the GPU
    busy during the parts that follow. os.killpg reaches p's process group (pytest's xdist workers, the scripts
    the tests run); a process that started a session of its own (torchrun starts each worker so) is not in it,
    but when its parent dies it is handed to this process, the subreaper (become_subreaper), and is killed here
    as this process's child, until no child is left. Parts run one at a time: every child is the part's."""
    with contextlib.suppress(ProcessLookupError):  # the group may have ended already
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    while pids := children():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:  # once reaped, its own children are this process's: the next round finds them
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def children():
    """The pids of this process's children, read from /proc (Linux; elsewhere there is none to read)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):  # a process that ended while being read
            # "pid (command) state ppid ...": the command may hold spaces and parentheses, so split after the last ")"
            if int(stat.read_text().rpartition(")")[2].split()[1]) == os.getpid():
                pids.append(int(stat.parent.name))
    return pids


def become_subreaper():
    """Linux: have the orphans among this process's descendants handed to it rather than to init, so that
    end_all finds them. Elsewhere, or if the kernel refuses, end_all kills the child's process group only."""
    if sys.platform == "linux":
        import ctypes
        PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def run_tests(out, timeout, env):
    """pytest -k test_cuda_ for at most timeout seconds: each test's outcome (read_outcomes), exit status, seconds."""
    junit, log, collected = out / "tests.xml", out / "tests.log", out / "tests.collected"
    for stale in (junit, collected):  # an earlier run's into the same folder would be read as this one's
        stale.unlink(missing_ok=True)
    # -v writes each test's outcome to the log as the test ends: what is left to read when pytest is stopped.
    # -p gpu_check loads this module into pytest, for its hook pytest_collection_finish.
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfEs", "-k", "test_cuda_", "-p", "no:cacheprovider", "-p", "gpu_check",
           f"--junitxml={junit}", str(ROOT / "test_cmt.py")]
    if importlib.util.find_spec("xdist"):
        cmd += ["-n", "4"]
    per_test = None
    if importlib.util.find_spec("pytest_timeout"):
        # A hung test is stopped after half the part's time, and under xdist the other workers' tests go on.
        # "thread" ends the test's process (xdist starts a new worker): a signal cannot interrupt a hang inside
        # a C call (a CUDA kernel, an NCCL collective).
        per_test = max(1, int(timeout / 2))
        cmd += [f"--timeout={per_test}", "--timeout-method=thread"]
    env = dict(env, GPU_CHECK_COLLECTED=str(collected),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tools"), env.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    rc = run_child(cmd, log, timeout, env)
    status = "ok" if rc == 0 else f"out of time ({timeout:.0f} s)" if rc is None else f"exit {rc}"
    return dict(read_outcomes(out), exit=rc, status=status, per_test_timeout=per_test, sec=time.perf_counter() - t0)


def pytest_collection_finish(session):
    """pytest hook, run in the pytest that run_tests starts: the selected tests' ids into $GPU_CHECK_COLLECTED, so
    that the report can name the tests a stopped run did not reach. Under xdist each worker collects the same
    tests; each writes the whole list and renames it into place, so the file is always one whole list."""
    path = os.environ.get("GPU_CHECK_COLLECTED")
    if path:
        Path(f"{path}.{os.getpid()}").write_text("".join(item.nodeid + "\n" for item in session.items))
        os.replace(f"{path}.{os.getpid()}", path)


OUTCOME = {"PASSED": "passed", "FAILED": "failed", "ERROR": "failed", "SKIPPED": "skipped"}
# The lines pytest -v writes as each test ends: under xdist `[gw0] [ 50%] PASSED test_cmt.py::test_x[a]`,
# without it `test_cmt.py::test_x[a] SKIPPED (needs CUDA)    [ 50%]` (a parametrized id may hold spaces).
XDIST_LINE = re.compile(r"^\[gw\d+\] \[ *\d+%\] (?P<outcome>PASSED|FAILED|ERROR|SKIPPED) (?P<id>\S+::.*?) *$", re.M)
PLAIN_LINE = re.compile(r"^(?P<id>\S+::.*?) (?P<outcome>PASSED|FAILED|ERROR|SKIPPED)(?: \((?P<reason>.*?)\))?"
                        r"(?: +\[ *\d+%\])? *$", re.M)


def read_outcomes(out):
    """The tests' outcomes from a run_tests folder: their names as passed, failed (an error included), skipped and
    not_reached (selected, with no outcome: pytest ran out of time first), and the skip reasons. From tests.xml,
    pytest's JUnit XML, when pytest finished and wrote it; otherwise from the lines -v streamed to tests.log
    (under xdist those name no skip reason). The selected tests are in tests.collected."""
    outcomes, reasons = {}, set()
    if (out / "tests.xml").exists():
        source = "tests.xml"
        for case in ElementTree.parse(out / "tests.xml").iter("testcase"):
            skip = case.find("skipped")
            if case.find("failure") is not None or case.find("error") is not None:
                outcomes[case.get("name")] = "failed"
            elif skip is not None:
                outcomes[case.get("name")] = "skipped"
                reasons.add(skip.get("message"))
            else:
                outcomes[case.get("name")] = "passed"
    else:
        source = "tests.log"
        text = (out / "tests.log").read_text() if (out / "tests.log").exists() else ""
        for m in [*XDIST_LINE.finditer(text), *PLAIN_LINE.finditer(text)]:
            name, outcome = m["id"].partition("::")[2], OUTCOME[m["outcome"]]
            # a test can end twice, passed and then an error in its teardown: the failure stands
            outcomes[name] = "failed" if "failed" in (outcome, outcomes.get(name)) else outcome
            if m.groupdict().get("reason"):
                reasons.add(m["reason"])
    selected = (out / "tests.collected").read_text().split("\n") if (out / "tests.collected").exists() else []
    names = {o: sorted(n for n, got in outcomes.items() if got == o) for o in ("passed", "failed", "skipped")}
    names["not_reached"] = sorted(nodeid.partition("::")[2] for nodeid in selected if nodeid
                                  and nodeid.partition("::")[2] not in outcomes)
    summary = ", ".join(f"{len(n)} {o.replace('_', ' ')}" for o, n in names.items() if n) or "no test ran (see tests.log)"
    return dict(names, summary=summary, skip_reasons=sorted(reasons), outcomes_from=source)


def environment():
    import torch
    cuda = torch.cuda.is_available()
    return dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                device=torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
                threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def versions(env):
    """Python, torch and the CUDA version torch was built with ("none": a CPU build)."""
    return f"Python {env['python']}, torch {env['torch']}, CUDA {env['cuda'] or 'none'}"


def markdown(report):
    """The report's tables: what was measured, on which device, with which command."""
    e = report["env"]
    lines = [f"Device check on **{e['device']}**, {versions(e)}, {e['date']}; `{report['command']}`, "
             f"{report['sec']:.0f} s.", ""]
    t = report["tests"]
    lines += [f"CUDA tests: {t['summary']} ({t['status']}, {t['sec']:.0f} s)"
              + (f"; failed: {', '.join(t['failed'])}" if t["failed"] else "")
              + (f"; not reached: {', '.join(t['not_reached'])}" if t["not_reached"] else "")
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
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help=f"seconds for all parts together (default: {DEFAULT_BUDGET:.0f})")
    p.add_argument("--parts", default="tests,benches,fid", help="comma-separated subset of tests,benches,fid")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    left = lambda: max(1.0, deadline - time.perf_counter())
    import torch
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: error: no CUDA device here; --cpu runs the check at tiny sizes on the CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU mode stays on the CPU even on a GPU machine
    parts = set(args.parts.split(","))
    become_subreaper()
    # The parts run in sessions of their own, out of reach of a signal sent to this process's group (`timeout`
    # sends SIGTERM so): exiting on SIGTERM unwinds through run_child, which ends the running part (Ctrl-C too).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    report = dict(command="python tools/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  env=environment() if not args.cpu else dict(environment(), device=f"CPU ({os.cpu_count()} cores)"),
                  tests=dict(summary="not run", status="not run", sec=0.0, passed=[], failed=[], skipped=[],
                             not_reached=[], skip_reasons=[]),
                  benches=[], fid=dict(result=None, status="not run"))
    print(f"[gpu_check] {report['env']['device']}: {versions(report['env'])}", flush=True)

    def save():
        report["sec"] = time.perf_counter() - t0
        (out / "report.json").write_text(json.dumps(report, indent=1))
        (out / "report.md").write_text(markdown(report))

    if "tests" in parts:
        # the tests are the check's first purpose: half of the budget when other parts follow, else all of it
        report["tests"] = run_tests(out, left() * (TESTS_SHARE if parts - {"tests"} else 1.0), env)
        t = report["tests"]
        print(f"[gpu_check] tests: {t['summary']} ({t['status']})" + "".join(
            f"\n[gpu_check]   {what}: {', '.join(t[what])}" for what in ("failed", "not_reached") if t[what]), flush=True)
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
