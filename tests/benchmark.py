"""Training speed of every script's step against this machine's matmul rates (not collected by pytest).

    python tests/benchmark.py                  # every script, float32 and (where native) bf16
    python tests/benchmark.py --steps 100 --scripts dcgan wgan_gp
    python tests/benchmark.py --processes             # also: 1 process vs torchrun with 2 (CPU: gloo)
    python tests/benchmark.py --compile --scripts dcgan   # also: G and D compiled (torch.compile), default precision

Images/s come from each script's own training loop (its metrics.jsonl, data batching included)
on the generated `fake` data, at the script's default width and batch size (WGAN-clip without
its critic warm-up). FLOPs per iteration (n_dis D steps + n_gen G steps) are counted by
torch.utils.flop_counter on the script's own loop: the count of a run of k + 1 iterations
minus that of a run of k, so everything outside the loop cancels. The share is given against
the float32 and the bfloat16 matmul rate of the machine (2048 x 2048). With --processes, one line per
script compares one process with `torchrun --nproc_per_node 2` at the same whole batch (on a CPU the
two processes split its cores: torchrun gives each one thread).
"""
import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

# (script, extra flags): each script's default network at 28 px, and DCGAN's 64 px stack
CASES = [("dcgan", []), ("dcgan", ["--image-size", "64"]), ("cgan", []), ("wgan_gp", []),
         ("wgan_clip", ["--warmup-critic", "off"]), ("sngan", []), ("sngan", ["--arch", "cnn"]), ("infogan", []),
         ("sagan", [])]
ROOT = Path(__file__).resolve().parent.parent


def matmul_rate(device, dtype, n=2048, reps=10):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def run(module, argv, tmp):
    out = Path(tempfile.mkdtemp(dir=tmp))
    module.main(argv + ["--out", str(out)])
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


class GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker, whose backward hooks break torch.autograd.grad
    (the gradient penalty); we need only the global count."""
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def compiled(module, argv, tmp):
    """The same run with every network the script distributes (G and D) compiled in place (`nn.Module.compile`),
    so all its calls, the plain D of the G step included, go through torch.compile; compile time falls in the
    warm-up window. Returns the run's rows, or the error that stopped it."""
    distribute = common.Run.distribute

    def compile_then_distribute(self, net):
        net.compile()
        return distribute(self, net)
    common.Run.distribute = compile_then_distribute
    try:
        return run(module, argv, tmp)
    except Exception as e:  # e.g. the gradient penalty's double backward
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    finally:
        common.Run.distribute = distribute


def flops_per_iteration(module, argv, tmp):
    run(module, argv + ["--max-steps", "1", "--eval-samples", "10"], tmp)  # trains the classifier outside the count
    counts = []
    for steps in (1, 2):
        counter = FlopCounterMode(display=False)
        counter.mod_tracker = GlobalOnly()
        with counter:
            run(module, argv + ["--max-steps", str(steps), "--eval-samples", "10", "--no-amp"], tmp)
        counts.append(counter.get_total_flops())
    return counts[1] - counts[0]


def images_per_s(cmd, out):
    """Mean images/s of a run's log lines after the first (warm-up) one."""
    subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    train = [r["images_per_s"] for r in rows if "images_per_s" in r][1:]
    return sum(train) / len(train)


def processes_line(script, extra, steps, data_root, tmp):
    """One process against torchrun with two, same flags (the whole batch split over the two)."""
    base = [f"{script}.py", "--dataset", "fake", "--device", "cpu", "--data-root", data_root, "--log-every", "10",
            "--sample-every", "100000", "--eval-every", "0", "--eval-samples", "100", "--max-steps", str(steps + 10),
            *extra]
    one = images_per_s([sys.executable] + base, Path(tempfile.mkdtemp(dir=tmp)))
    two = images_per_s([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + base,
                       Path(tempfile.mkdtemp(dir=tmp)))
    print(f"| {script} | {' '.join(extra) or '(defaults)'} | {one:.0f} | {two:.0f} | {two / one:.2f} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed iterations per case (after 10 warm-up iterations)")
    p.add_argument("--scripts", nargs="*", default=None, help="only these scripts")
    p.add_argument("--device", default="auto")
    p.add_argument("--processes", action="store_true", help="also compare 1 process with torchrun's 2 (CPU, gloo)")
    p.add_argument("--compile", action="store_true", help="also time each case with G and D compiled")
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    fp32, bf16 = matmul_rate(device, torch.float32), matmul_rate(device, torch.bfloat16)
    native = common.precision(device)[1]
    print(f"device {device}, {torch.get_num_threads()} threads; matmul 2048^2: fp32 {fp32 / 1e9:.0f} GFLOP/s, "
          f"bf16 {bf16 / 1e9:.0f} GFLOP/s; default precision here: {native}")
    print("| script | flags | precision | images/s | GFLOP per iteration | GFLOP/s | % of fp32 matmul | % of bf16 matmul |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        data_root = str(Path(tmp) / "data")  # the fake data's evaluation classifier is trained once, here
        cases = [(s, e) for s, e in CASES if (ROOT / f"{s}.py").exists() and (not args.scripts or s in args.scripts)]
        for script, extra in cases:
            module = importlib.import_module(script)
            base = ["--dataset", "fake", "--device", str(device), "--data-root", data_root, "--log-every", "10",
                    "--sample-every", "100000", "--eval-every", "0", *extra]
            flops = flops_per_iteration(module, base, tmp)
            for amp in ([] if common.precision(device)[0] is None else [[]]) + [["--no-amp"]] + \
                    ([["compile"]] if args.compile else []):
                timed = base + ["--max-steps", str(args.steps + 10), "--eval-samples", "100"]
                rows = compiled(module, timed, tmp) if amp == ["compile"] else run(module, timed + amp, tmp)
                if isinstance(rows, str):
                    print(f"| {script} | {' '.join(extra) or '(defaults)'} | compiled | {rows} | | | | |", flush=True)
                    continue
                train = [r for r in rows if "images_per_s" in r][1:]  # drop the warm-up window
                ips = sum(r["images_per_s"] for r in train) / len(train)
                saved = vars(module.parse_args(base))
                per_iter = saved["batch_size"] * saved["n_dis"]  # real images per iteration (D's batch)
                rate = flops * ips / per_iter
                name = {"": "bf16 autocast", "--no-amp": "float32", "compile": f"compiled, {native}"}[" ".join(amp)]
                print(f"| {script} | {' '.join(extra) or '(defaults)'} | {name} | {ips:.0f} | {flops / 1e9:.2f} | "
                      f"{rate / 1e9:.0f} | {100 * rate / fp32:.0f}% | {100 * rate / bf16:.0f}% |", flush=True)
        if args.processes:
            print("\n| script | flags | 1 process images/s | 2 processes (torchrun) images/s | ratio |")
            print("| --- | --- | --- | --- | --- |")
            for script, extra in cases:
                processes_line(script, extra, args.steps, data_root, tmp)


if __name__ == "__main__":
    main()
