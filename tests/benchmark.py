"""Training speed of every script's step against this machine's matmul rates (not collected by pytest).

    python tests/benchmark.py                  # every script, float32 and (where native) bf16
    python tests/benchmark.py --steps 100 --scripts dcgan wgan_gp
    python tests/benchmark.py --processes             # also: 1 process vs torchrun with 2 (CPU: gloo)
    python tests/benchmark.py --compile --scripts dcgan   # also: G and D compiled (torch.compile), default precision
    python tests/benchmark.py --data                  # only: decoding speed, and dcgan from RAM vs a memory map

Images/s come from each script's own training loop (its metrics.jsonl, data batching included)
on the generated `fake` data, at the script's default width and batch size (WGAN-clip without
its critic warm-up). FLOPs per iteration (n_dis D steps + n_gen G steps) are counted by
torch.utils.flop_counter on the script's own loop: the count of a run of k + 1 iterations
minus that of a run of k, so everything outside the loop cancels. The share is given against
the float32 and the bfloat16 matmul rate of the machine (2048 x 2048). With --processes, one line per
script compares one process with `torchrun --nproc_per_node 2` at the same whole batch (on a CPU the
two processes split its cores: torchrun gives each one thread).

With --data: decoding throughput of ImageNet-sized JPEGs (500 x 375, quality 90) cut from a real photograph
(matplotlib's sample grace_hopper.jpg), per core at 64 and 128 px, with libjpeg's reduced-size decoding (PIL's
draft, as common.decode_image does) and without it (full decode, then resize, as before the cache); the whole
cache build with 1 and all cores; and dcgan's training images/s at 64 px on that folder from RAM
(--data-in-memory yes) and from the memory map (no), interleaved, with the cache warm in the page cache.
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


def photos(folder, n, seed=0):
    """n different 500 x 375 JPEGs (ImageNet's typical size) from one real photograph: random crops, scales, flips,
    colour shifts and a little grain, so that files neither repeat nor compress unlike photographs."""
    import matplotlib.cbook
    import numpy as np
    from PIL import Image
    src = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w = int(rng.integers(300, 513))
        h = min(int(w * 0.75), 600)
        x, y = int(rng.integers(0, 513 - w)), int(rng.integers(0, 601 - h))
        im = src.crop((x, y, x + w, y + h)).resize((500, 375), Image.BICUBIC)
        a = np.asarray(im, np.float32) * rng.uniform(0.8, 1.2, 3) + rng.normal(0, 3, (375, 500, 3))
        im = Image.fromarray(a.clip(0, 255).astype(np.uint8))
        (im.transpose(Image.FLIP_LEFT_RIGHT) if i % 2 else im).save(folder / f"{i:05d}.jpg", quality=90)
    return sorted(folder.glob("*.jpg"))


def full_decode(paths, size):
    """The decode before the cache (PIL, full size, convert, centre crop, bicubic resize), for comparison."""
    from PIL import Image
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            c = min(w, h)
            im.crop(((w - c) // 2, (h - c) // 2, (w + c) // 2, (h + c) // 2)).resize((size, size), Image.BICUBIC)


def data_main(steps, tmp):
    tmp = Path(tmp)
    paths = photos(tmp / "photos", 2000)
    mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e3
    print(f"{len(paths)} JPEGs, 500 x 375, mean {mb:.0f} kB; {common.decode_workers()} cores")
    print("| what | 64 px images/s | 128 px images/s |")
    print("| --- | --- | --- |")
    for p in paths:
        p.read_bytes()  # the files in the page cache: decoding, not the disk, is timed
    sample = [str(p) for p in paths[:400]]
    rates = {}
    for name, fn in (("per core, PIL draft (common.decode_image)", lambda s: common._decode_chunk((0, sample, s, None))),
                     ("per core, full decode then resize (before)", lambda s: full_decode(sample, s))):
        rates[name] = []
        for size in (64, 128):
            t = time.perf_counter()
            fn(size)
            rates[name].append(len(sample) / (time.perf_counter() - t))
        print(f"| {name} | {rates[name][0]:.0f} | {rates[name][1]:.0f} |", flush=True)
    for workers in sorted({1, common.decode_workers()}):
        row = []
        for size in (64, 128):
            t = time.perf_counter()
            common.load_dataset("folder", tmp / "photos", size, decode_workers=workers,
                                cache_dir=tmp / f"cache{workers}")
            row.append(len(paths) / (time.perf_counter() - t))
        print(f"| cache build, {workers} process{'es' * (workers > 1)} (decode + write) | {row[0]:.0f} | "
              f"{row[1]:.0f} |", flush=True)
    # dcgan from RAM vs the memory map, interleaved (the machine may be shared), cache warm
    common.load_dataset("folder", tmp / "photos", 64)
    base = [sys.executable, "dcgan.py", "--dataset", "folder", "--data-root", str(tmp / "photos"), "--image-size", "64",
            "--device", "cpu", "--log-every", "10", "--sample-every", "100000", "--eval-every", "0",
            "--eval-samples", "100", "--max-steps", str(steps + 10)]
    seen = {"yes": [], "no": []}
    for _ in range(2):
        for mode in seen:
            seen[mode].append(images_per_s(base + ["--data-in-memory", mode], Path(tempfile.mkdtemp(dir=tmp))))
    ram, mapped = (sum(v) / len(v) for v in seen.values())
    print(f"\ndcgan 64 px on the {len(paths)} photos, images/s (runs {seen}): RAM {ram:.0f}, memory map {mapped:.0f} "
          f"({100 * (mapped / ram - 1):+.1f}%)", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed iterations per case (after 10 warm-up iterations)")
    p.add_argument("--scripts", nargs="*", default=None, help="only these scripts")
    p.add_argument("--device", default="auto")
    p.add_argument("--processes", action="store_true", help="also compare 1 process with torchrun's 2 (CPU, gloo)")
    p.add_argument("--compile", action="store_true", help="also time each case with G and D compiled")
    p.add_argument("--data", action="store_true", help="only the data benchmark: decoding, RAM vs memory map")
    args = p.parse_args(argv)
    if args.data:
        with tempfile.TemporaryDirectory() as tmp:
            return data_main(args.steps, tmp)
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
