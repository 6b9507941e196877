"""Does each script's README CPU recipe train on every seed? (not collected by pytest)

    python tests/seed_sweep.py --make-digits DIGITS               # a second data set: digits rendered from fonts
    python tests/seed_sweep.py --scripts cgan --seeds 8           # Fashion-MNIST, seeds 0..7
    python tests/seed_sweep.py --scripts cgan --seeds 8 --dataset mnist --data-root DIGITS
    python tests/seed_sweep.py --scripts dcgan cgan --steps 2000 --jobs 2 --out SWEEP_DIR
    python tests/seed_sweep.py --scripts dcgan --root OTHER_CHECKOUT   # the scripts of another checkout (before/after)

(DIGITS, SWEEP_DIR, OTHER_CHECKOUT: folders of your choice.)

Each run is the recipe of the script's README row (its model flags), cut to a fixed number of steps so that
every seed gets the same training, then evaluated once (2,000 samples through the data set's classifier). A run
counts as collapsed when its D has won (the run's own detector wrote a `d_won` line into metrics.jsonl, or D's
loss over its last log lines averages below 0.05 for a classifier D) or when its samples all look alike (the
run's own detector wrote an `alike` line: it judges the grids at half and at all of the steps, when they are
500 steps apart or more; or the classifier puts over half of them in one class: the data's classes are balanced). One line per
run, then per script: seeds that trained / collapsed and the spread (min, median, max) of the final cls-FID.

--make-digits writes a data set that is not Fashion-MNIST and not MNIST, in MNIST's file format (so the scripts
load it with `--dataset mnist --data-root DIR` and train its classifier on it): the ten digits drawn in the
DejaVu fonts (sans, serif, mono; book, bold, oblique, condensed), white on black at 28 px, each randomly
scaled, rotated (±15°), shifted and stroke-thickened, 20,000 training and 4,000 test images.
"""
import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

# Each script's README recipe (its front-page row) without the length and evaluation flags, and the steps a
# sweep run makes: enough for D to win where it will (the cgan projection D that had lost two of its biases
# had won by step 1000 on MNIST at seed 0).
RECIPES = {
    "dcgan": (["--width", "32", "--batch-size", "64"], 2000),
    "cgan": (["--d-cond", "projection", "--width", "32", "--batch-size", "64"], 3000),
    "wgan_clip": (["--width", "32", "--lr-g", "2e-4", "--lr-d", "2e-4"], 600),
    "wgan_gp": (["--width", "32"], 600),
    "sngan": (["--loss", "hinge", "--n-dis", "5", "--arch", "cnn", "--width", "16", "--batch-size", "32"], 1000),
    "infogan": (["--width", "32", "--batch-size", "64"], 2000),
    "sagan": (["--width", "16", "--batch-size", "32"], 1000),
}
CLASSIFIER_D = {"dcgan", "cgan", "infogan"}  # D outputs a logit of "real": its cross-entropy can go to 0
FONTS = "/usr/share/fonts/truetype/dejavu"


def make_digits(root, n_train=20000, n_test=4000, seed=0):
    """Digits 0-9 rendered from the DejaVu fonts into MNIST's four idx files under root/MNIST/raw."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont
    fonts = sorted(p for p in Path(FONTS).glob("DejaVu*.ttf") if "ExtraLight" not in p.name)
    if not fonts:
        raise SystemExit(f"no DejaVu fonts in {FONTS} (apt-get install fonts-dejavu-core)")
    rng = np.random.default_rng(seed)
    out = Path(root) / "MNIST" / "raw"
    out.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = np.zeros((n, 28, 28), np.uint8), rng.integers(0, 10, n).astype(np.uint8)
        for i, y in enumerate(labels):
            font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(rng.integers(70, 100)))
            canvas = Image.new("L", (112, 112))
            draw = ImageDraw.Draw(canvas)
            draw.text((56, 56), str(y), fill=255, font=font, anchor="mm", stroke_width=int(rng.integers(0, 5)),
                      stroke_fill=255)
            canvas = canvas.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
            box = canvas.getbbox() or (0, 0, 112, 112)  # MNIST: the digit fit in 20x20, centred in 28x28
            digit = canvas.crop(box)
            scale = 20 * rng.uniform(0.8, 1.0) / max(digit.size)
            digit = digit.resize((max(1, round(digit.width * scale)), max(1, round(digit.height * scale))),
                                 Image.LANCZOS).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6)))
            img = Image.new("L", (28, 28))
            dx, dy = rng.integers(-2, 3, 2)
            img.paste(digit, ((28 - digit.width) // 2 + dx, (28 - digit.height) // 2 + dy))
            images[i] = np.asarray(img)
        with gzip.open(out / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(np.array([0x803, n, 28, 28], ">i4").tobytes() + images.tobytes())
        with gzip.open(out / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(np.array([0x801, n], ">i4").tobytes() + labels.tobytes())
    print(f"wrote {n_train} + {n_test} rendered digits ({len(fonts)} fonts) to {out}")


def one_run(script, seed, dataset, data_root, out, extra, root=ROOT):
    flags, steps = RECIPES[script]
    cmd = [sys.executable, str(Path(root) / f"{script}.py"), "--dataset", dataset, *flags, "--max-steps", str(steps),
           "--seed", str(seed), "--eval-every", "0", "--eval-samples", "2000", "--sample-every", str(max(1, steps // 2)),
           "--out", str(out), "--overwrite", *extra]
    if data_root:
        cmd += ["--data-root", str(data_root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the jobs share the cores
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = common.read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    train = [r for r in rows if "loss_d" in r]
    evals = [r for r in rows if any(k.startswith("cls_fid") or k == "fid" for k in r)]
    won = [r for r in rows if "d_won" in r]
    alike = [r for r in rows if "alike" in r]
    last = train[-5:]
    r = {"script": script, "seed": seed, "code": p.returncode, "minutes": (time.time() - t) / 60,
         "steps": train[-1]["step"] if train else 0,
         "loss_d": statistics.mean(x["loss_d"] for x in last) if last else float("nan"),
         "loss_g": statistics.mean(x["loss_g"] for x in last) if last else float("nan"),
         "d_won_step": won[0]["step"] if won else None,
         "alike_step": alike[0]["step"] if alike else None, "err": p.stderr.strip().splitlines()[-1:] if p.returncode else []}
    if evals:
        e = evals[-1]
        r.update({k: e[k] for k in ("cls_fid", "cls_is", "cls_acc") if k in e})
        r["class_max_share"] = max(e.get("cls_hist", [0]))
    collapsed = (r["d_won_step"] is not None or r["alike_step"] is not None
                 or (script in CLASSIFIER_D and r["loss_d"] < 0.05))
    if r.get("class_max_share", 0) > 0.5:
        collapsed = True
    r["collapsed"] = collapsed or p.returncode != 0
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--make-digits", metavar="DIR", help="write the rendered-digits data set into DIR and stop")
    p.add_argument("--scripts", nargs="*", default=list(RECIPES))
    p.add_argument("--seeds", type=int, default=8, help="seeds 0 .. N-1 (default 8)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--steps", type=int, default=None, help="override every recipe's steps")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--root", default=ROOT, help="the checkout whose scripts run (default: this one)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for every run (last)")
    args = p.parse_args(argv)
    if args.make_digits:
        return make_digits(args.make_digits)
    if args.steps:
        for k, (flags, _) in RECIPES.items():
            RECIPES[k] = (flags, args.steps)
    base = Path(args.out or tempfile.mkdtemp(prefix="sweep-"))
    root = args.data_root or "data"
    common.get_classifier(args.dataset, root, "cpu")  # trained once here, not raced by the parallel runs
    results = []
    jobs = [(s, seed) for s in args.scripts for seed in range(args.first_seed, args.first_seed + args.seeds)]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one_run, s, seed, args.dataset, args.data_root, base / f"{s}-{args.dataset}-{seed}",
                               args.extra, args.root) for s, seed in jobs]
        for f in futures:
            r = f.result()
            results.append(r)
            print(json.dumps(r), flush=True)
    for s in args.scripts:
        rs = [r for r in results if r["script"] == s]
        fids = sorted(r["cls_fid"] for r in rs if "cls_fid" in r and not r["collapsed"])
        spread = f"cls-FID min {fids[0]:.1f} median {statistics.median(fids):.1f} max {fids[-1]:.1f}" if fids else ""
        bad = [r["seed"] for r in rs if r["collapsed"]]
        print(f"{s} on {args.dataset}: {len(rs) - len(bad)}/{len(rs)} seeds trained, collapsed: {bad or 'none'}; "
              f"{spread} ({RECIPES[s][1]} steps)")


if __name__ == "__main__":
    main()
