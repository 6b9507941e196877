"""Shared mechanics for the GAN scripts: data, spectral norm, evaluation, run bookkeeping.

Nothing here is a model's story (networks, losses and the loop's body live in each script). The sections, in
file order, each readable alone; what the scripts call is named, the rest serves it:

  0 (top)          UsageError, Diverged, out_of_memory, fail: what ends a script in one line  every script
  1 command line   ArgumentParser, add_common_args, refuse_unused, the argparse types (positive_int, ...)
                                                                                              every script
  2 data           load_dataset, data_options -> ImageData (uint8 images on the device, or a memory map of
                   the decoded cache for celeba, folder, stl10); Batches: the batches, by indexing  every script
                   the decoded cache: built once in a temp folder of its own, published by a rename, checked
                   by checksums on every use; a stopped build is continued, gone builders' folders removed
  3 networks       conv_plan (DCGAN's size arithmetic)                                        every script
                   spectral_norm (torch's, with a chosen number of power iterations)   cgan, sngan, sagan
  4 evaluation     Evaluator: classifier-IS/FID for MNIST-like data, torch-fidelity's IS/FID/KID for RGB;
                   inception_score, frechet_distance: the mathematics       through Run; `score` below
  5 devices        pick_device, precision, device_settings: CUDA/MPS/CPU, bf16 only where it computes fast
  6 a run          Run: the face the scripts use (Run(args, script), restore, start, the `with run:` loop's
                   should_stop and end_step, finish); inside it, parts of one job each:    every script
                   part 1 checkpoints and --out (atomic writes, resume's loading)
                   part 2 StopSignals: Ctrl-C, SIGTERM, SIGUSR1 end the loop after its step; before the
                          loop they raise Stopped (one line, exit 128 + n)
                   part 3 Processes: torchrun's devices, shares of each batch, agreement on stopping
                   part 4 Watchers: NaN stops the run; D's win and look-alike samples are said once
                   part 5 Meter, MetricsLog: statistics, metrics.jsonl, the progress line
                   part 6 Run, and what it calls: saving, evaluating, the loop's end and the finish
                   EMA (an average of G's weights)                                       sngan, sagan
                   generate: --generate N from a checkpoint                               every script
  7 pictures       save_grid, make_gif, plot_metrics, save_predictions, interpolate, write_generated
                   (infogan draws its own figures with some of these)

Run `python common.py --dataset fashion-mnist` to train and cache the evaluation classifier
(the scripts do it on first use otherwise) and print its test accuracy, and
`python common.py score --dataset cifar10 --samples generated.npz` to score any samples as a run does.
"""

import argparse
import contextlib
import datetime
import functools
import gzip
import hashlib
import inspect
import io
import json
import math
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import sys
import time
import types
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import distributed as dist

DATASETS = ("mnist", "fashion-mnist", "usps", "cifar10", "stl10", "celeba", "folder", "fake")
NATIVE_SIZE = {"mnist": 28, "fashion-mnist": 28, "usps": 16, "cifar10": 32, "stl10": 48,
               "celeba": 64, "folder": 64, "fake": 28}
# Datasets whose images a small CNN classifies well: evaluation uses it instead of Inception.
DIGIT_LIKE = ("mnist", "fashion-mnist", "usps", "fake")
SYSTEM_DATA = Path("/usr/share/datasets")  # where Debian's dataset-* packages put files
# The fewest images (generated, and real) an evaluation scores: IS takes 10 splits of at least one image each, and
# FID's covariance needs at least 2 (with 1 it is NaN and FID's eigendecomposition fails).
MIN_EVAL_IMAGES = 10


class UsageError(Exception):
    """Bad input from the user: the scripts print it as one line and exit with code 2."""


class Diverged(Exception):
    """Training produced NaN/inf: the scripts stop, keep the last good checkpoint, exit 1."""


def out_of_memory(err):
    """For an allocation that failed (a --width or --batch-size too large for the device), a line that names its
    size and the flags that set it; else None. torch's CPU allocator raises a plain RuntimeError."""
    text = str(err)
    if not (isinstance(err, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text):
        return None
    n = re.search(r"allocate (\d+) bytes", text)  # the CPU allocator's words; CUDA and MPS say "1.20 GiB"
    size = f"{int(n[1]) / 2**30:,.1f} GiB" if n else (re.findall(r"allocate ([\d.]+ [KMGT]i?B)", text) or ["memory"])[0]
    return f"cannot allocate {size}: the networks (--width) or a batch (--batch-size, --image-size) are too large here"


def fail(prog, err):
    """Print `prog: error: message` on stderr and exit with 2 (argparse's convention); a Stopped run says how it
    stopped and exits with 128 + the signal's number. Either way the run's signal handlers are put back. Any other
    RuntimeError is a bug, raised again with its traceback."""
    StopSignals.restore_all()
    if isinstance(err, (RuntimeError, MemoryError)):
        if out_of_memory(err) is None:
            raise err
        err = out_of_memory(err)
    if isinstance(err, Stopped):
        print(f"{prog}: {err}", file=sys.stderr)
        raise SystemExit(128 + err.signum)
    print(f"{prog}: error: {err}", file=sys.stderr)
    raise SystemExit(2)


# ----------------------------------------------------------------------------------------------
# 1 Command line: the flags of every script, typed so that bad values stop at parsing
# ----------------------------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`dcgan.py: error: ... (see --help)`), no abbreviated flags, and a record
    of which flags the user typed (`args._typed`), so that `--resume` lets only those override the checkpoint."""

    def __init__(self, *a, **kw):
        kw.setdefault("allow_abbrev", False)  # --lr would silently mean --lr-g or fail: spell flags out
        super().__init__(*a, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]
        ns = super().parse_args(argv, namespace)
        flags = {tok.split("=", 1)[0] for tok in argv if tok.startswith("--")}
        ns._typed = {a.dest for a in self._actions if set(a.option_strings) & flags}
        if getattr(ns, "checkpoint", None) and not getattr(ns, "generate", None):
            self.error("--checkpoint is read only with --generate N (to continue training, use --resume PATH)")
        if getattr(ns, "generate", None) and getattr(ns, "resume", None):
            self.error("--generate and --resume exclude each other (--generate takes --checkpoint PATH)")
        return ns


def _number(kind, test, wanted):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        try:
            ok = math.isfinite(value) and test(value)
        except OverflowError:  # an integer too large for a float
            raise argparse.ArgumentTypeError(f"must be {wanted}, got a {len(text)}-digit number") from None
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value
    parse.__name__ = wanted  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "at least 1")
nonneg_int = _number(int, lambda v: v >= 0, "at least 0")
positive_float = _number(float, lambda v: v > 0, "> 0")
nonneg_float = _number(float, lambda v: v >= 0, ">= 0")
unit_float = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")  # Adam's betas, dropout
open_unit_float = _number(float, lambda v: 0 < v < 1, "in (0, 1)")  # EMA decay
# torch takes 64-bit seeds, and Batches seeds epoch e with seed * 100003 + e: |seed| < 2**40 keeps that in range
seed_int = _number(int, lambda v: abs(v) < 2**40, "between -2**40 and 2**40")
eval_count = _number(int, lambda v: v >= MIN_EVAL_IMAGES,
                     f"at least {MIN_EVAL_IMAGES} (IS's 10 splits need one image each, FID's covariance two)")


def path_arg(text):
    """A path flag's value: refuses an empty (or all-blank) one, which would silently mean the current folder
    (--out, --data-root: run files or downloads in the source tree) or nothing at all (--resume: a fresh run)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"needs a path, got {text!r}")
    return text


path_arg.__name__ = "path"


def add_common_args(p, script):
    """The flags of every script, spelled the same everywhere (model flags stay in the script)."""
    g = p.add_argument_group("data, run length and output (common to every script)")
    g.add_argument("--dataset", default="mnist", choices=DATASETS,
                   help="fake = tiny generated blobs for smoke tests; folder = images under --data-root")
    g.add_argument("--data-root", type=path_arg, default="./data",
                   help="where datasets live and downloads go (default ./data)")
    g.add_argument("--image-size", type=positive_int, default=None,
                   help="default: the dataset's native size (MNIST 28, USPS 16, CIFAR-10 32, STL-10 48, CelebA 64)")
    g.add_argument("--data-in-memory", default="auto", choices=("auto", "yes", "no"),
                   help="celeba, folder, stl10: train from memory (yes), from a memory map of the decoded cache (no), "
                        "or from memory when it takes under half the available RAM, else the map (auto, default)")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where celeba, folder and stl10 keep their decoded cache (default: DATA_ROOT/.gan-cache; "
                        "name one when the data root is read-only)")
    g.add_argument("--decode-workers", type=positive_int, default=None, metavar="N",
                   help="processes that decode image files into the cache (default: this machine's cores)")
    g.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many iterations (the logs' `step`: each has the script's D steps and G steps)")
    g.add_argument("--max-minutes", type=positive_float, default=None,
                   help="stop after this much training-loop wall time (data loading not counted)")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="seed of every random draw (torch only); the same run for any number of torchrun processes")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="auto: CUDA if present, else MPS, else CPU")
    g.add_argument("--no-sync-bn", action="store_true",
                   help="under torchrun on CUDA: BatchNorm statistics per process (over --batch-size / processes "
                        "images) instead of over the whole batch (SyncBatchNorm, the default, so that N processes "
                        "train the network one process would). CPU processes (gloo) cannot sync: always per process")
    g.add_argument("--dist-timeout-minutes", type=positive_float, default=30,
                   help="under torchrun: how long a process waits for the others in a collective before it stops with "
                        "an error (default 30): a dead machine's peers stop after that long. It must exceed rank 0's "
                        "longest lone work, which the others wait for: an evaluation of --eval-samples images, and on "
                        "first use the evaluation classifier's training or the real images' Inception features")
    g.add_argument("--no-amp", action="store_true",
                   help="train in float32 even where the hardware computes bfloat16 natively (CUDA with compute "
                        "capability >= 8, CPUs with AMX or AVX512-BF16), where bf16 autocast is the default")
    g.add_argument("--out", type=path_arg, default=None, help=f"run directory (default runs/{script}-<dataset>-<time>)")
    g.add_argument("--overwrite", action="store_true",
                   help="let a fresh run replace the run files of a used --out (refused otherwise)")
    g.add_argument("--log-every", type=positive_int, default=50, help="steps between metrics.jsonl lines (default 50)")
    g.add_argument("--sample-every", type=positive_int, default=500,
                   help="steps between sample grids and checkpoints (default 500)")
    g.add_argument("--eval-every", type=nonneg_int, default=2000,
                   help="steps between evaluations (default 2000; 0: only at the end)")
    g.add_argument("--eval-samples", type=eval_count, default=10000,
                   help=f"generated images per evaluation (default 10000; 2000 is enough on a CPU; "
                        f"at least {MIN_EVAL_IMAGES})")
    g.add_argument("--eval-real", type=eval_count, default=None,
                   help="real training images each evaluation compares against (default: as many as --eval-samples; "
                        "the SNGAN paper's FID: 10000 real vs 5000 generated, later tables 50000 vs 50000)")
    g.add_argument("--inception-weights", type=path_arg, default=None, metavar="PATH",
                   help=f"local copy of torch-fidelity's TF-ported Inception weights ({INCEPTION_FILE}) for IS/FID/KID "
                        "on RGB data; default: torch-fidelity's download (its torch hub cache when offline)")
    g.add_argument("--resume", type=path_arg, default=None, metavar="PATH|auto",
                   help="continue from a checkpoint.pt with its settings; only the length, device, output and "
                        "logging flags you type may change them. auto: continue the run in --out if it holds a "
                        "checkpoint, else start it (one command for a job's first submission and every requeue)")
    g.add_argument("--allow-changed-data", action="store_true",
                   help="let --resume continue on data that differs from the checkpoint's (images added or removed); "
                        "refused otherwise, since the run would silently train on other data")
    g.add_argument("--checkpoint-minutes", type=nonneg_float, default=30,
                   help="also save checkpoint.pt when this many minutes of wall clock have passed since the last save "
                        "(default 30; 0: only every --sample-every steps), so a node that dies unannounced loses "
                        "at most this much")
    g.add_argument("--generate", type=positive_int, default=None, metavar="N",
                   help="no training: load --checkpoint and write N samples to generated.npz in --out "
                        "(default: the checkpoint's folder)")
    g.add_argument("--checkpoint", type=path_arg, default=None, metavar="PATH", help="checkpoint for --generate")
    return p


def refuse_unused(p, args, used, why):
    """Exit 2 for a typed flag that this configuration would silently ignore. `used`: dest -> bool."""
    for dest, ok in used.items():
        if not ok and dest in args._typed:
            p.error(f"--{dest.replace('_', '-')} is not used with {why}")


def flags(args):
    """The flags of a namespace, without the parser's bookkeeping (`_typed`)."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


# Flags a resumed run may change; everything else comes from the checkpoint.
RESUMABLE = {"resume", "max_steps", "epochs", "max_minutes", "device", "out", "log_every", "sample_every",
             "eval_every", "eval_samples", "eval_real", "inception_weights", "no_amp", "no_sync_bn", "data_root",
             "overwrite", "generate", "checkpoint", "checkpoint_minutes", "dist_timeout_minutes", "cache_dir",
             "decode_workers", "data_in_memory", "allow_changed_data"}


def resume(args, script, procs=None):
    """With --resume: (the checkpoint's settings, overridden by the RESUMABLE flags typed on this command line,
    and the checkpoint). A typed flag that would change the model or its training is refused, unless it repeats the
    checkpoint's value (a requeued job runs its first command again). Without: (args, None).

    --resume auto: --out's checkpoint.pt when it exists (resume), else a fresh run (args.resume becomes None). Under
    torchrun (`procs`), rank 0's look decides for every process: machines may see a shared folder differently."""
    auto = args.resume == "auto"
    if auto:
        if not args.out or "out" not in args._typed:
            raise UsageError("--resume auto needs --out DIR: the run to continue, or to start when DIR holds none")
        if args.overwrite:
            raise UsageError("--resume auto and --overwrite exclude each other (a requeued job would replace its own run)")
        found = Path(args.out) / "checkpoint.pt"
        exists = found.exists()
        args.resume = str(found) if (procs.from_rank0(exists) if procs else exists) else None
        # no checkpoint: nothing was saved (a run saves at step 0), so run files left by a start that failed
        # (a full disk, a kill before the first save) are replaced rather than refused
        args.overwrite = args.resume is None
    if not args.resume:
        return args, None
    try:
        state, error = load_checkpoint(args.resume, script), None
    except UsageError as e:
        state, error = None, e
    if procs and procs.agree(error is not None)[0] and not error:  # every process stops, not the one alone
        error = UsageError("another process could not read the checkpoint (its error is printed above)")
    if error:
        raise error
    saved = state["args"]
    def same(a, b):  # a list flag may be saved normalised (sagan's --attn-res: sorted, without repeats)
        return a == b or (isinstance(a, list) and isinstance(b, list) and sorted(set(a)) == sorted(set(b)))
    fixed = sorted(f for f in args._typed - RESUMABLE if f not in saved or not same(getattr(args, f), saved[f]))
    if fixed:
        raise UsageError(f"--resume keeps the checkpoint's settings; {', '.join('--' + f.replace('_', '-') for f in fixed)} "
                         f"cannot change (allowed: length, device, output and logging flags)")
    merged = {**flags(args), **state["args"]}  # parser defaults fill flags the checkpoint predates
    merged.update({k: getattr(args, k) for k in args._typed | {"overwrite", "generate", "checkpoint"}})
    merged["resume"] = args.resume
    if "out" not in args._typed:  # by default a resumed run goes on in its own directory
        merged["out"] = str(Path(args.resume).parent)
    ns = argparse.Namespace(**merged)
    ns._typed, ns._auto = args._typed, auto
    return ns, state


# ----------------------------------------------------------------------------------------------
# 2 Data
# ----------------------------------------------------------------------------------------------

@dataclass
class ImageData:
    """A whole dataset as uint8 images (N, C, H, W) and int64 labels, on one device (or memory-mapped)."""
    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    where: str = "host RAM"  # or "cuda memory", or "memory map of FILE" (the decoded cache)
    files: str = None  # a decoded set's files: a hash of their names and sizes (times differ in a copy of them)
    class_names: list = None  # a folder's class folders

    @property
    def mapped(self):
        return self.where.startswith("memory map")

    @property
    def channels(self):
        return self.images.shape[1]

    @property
    def image_size(self):
        return self.images.shape[-1]

    def __len__(self):
        return self.images.shape[0]


def to_float(images_uint8):
    """uint8 [0, 255] -> float [-1, 1] (the range of G's tanh output)."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def spread(images, labels=None, pool=8):
    """How much images differ in their coarse layout: each image averaged down to pool x pool, the standard deviation
    of each of those values across the images, averaged (0 when all look the same). Pixel noise, which makes an
    untrained G's samples differ pixel by pixel while they all look alike, averages away. With `labels`: within
    each class that has 2 images or more, averaged over those classes (NaN if none has). Images: uint8 or float in
    [-1, 1], on any device; computed on the CPU, in chunks (MPS pools only sizes divisible by `pool`)."""
    x = torch.cat([F.adaptive_avg_pool2d(to_float(c.cpu()) if c.dtype == torch.uint8 else c.detach().cpu().float(), pool)
                   for c in images.split(256)]).flatten(1)
    if labels is None:
        return x.std(0).mean().item()
    labels = labels.cpu()
    groups = [g for g in (x[labels == c] for c in labels.unique()) if len(g) > 1]
    return torch.stack([g.std(0).mean() for g in groups]).mean().item() if groups else math.nan


def to_uint8(images):
    """float [-1, 1] -> uint8 [0, 255], rounding to the nearest level."""
    return images.detach().float().add(1).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)


def _read_idx(path):
    """Read one IDX file (the MNIST format), gzipped or not, into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(name, root, train):
    """Look for the four MNIST-format files in the places a user or Debian would put them."""
    prefix = "train" if train else "t10k"
    tv_name = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    for folder in (Path(root) / tv_name / "raw", Path(root) / name, Path(root), SYSTEM_DATA / name):
        for ext in (".gz", ""):
            img = folder / f"{prefix}-images-idx3-ubyte{ext}"
            lab = folder / f"{prefix}-labels-idx1-ubyte{ext}"
            if img.exists() and lab.exists():
                return img, lab
    return None


def _download(attempt, root):
    """torchvision's download attempt; one that fails leaves no empty folders behind (a refused run writes nothing)."""
    root = Path(root)
    made = [p for p in [root, *root.parents] if not p.exists()]
    before = set(root.iterdir()) if root.is_dir() else set()
    try:
        return attempt()
    except Exception:
        for p in [*(set(root.iterdir()) - before if root.is_dir() else ()), *made]:
            if p.is_dir() and not any(q.is_file() for q in p.rglob("*")):
                shutil.rmtree(p, ignore_errors=True)
        raise


def _load_mnist_like(name, root, train):
    found = _find_idx(name, root, train)
    if found is None:  # not on disk: let torchvision download into root (works when online)
        import torchvision.datasets as tvd
        cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
        try:
            _download(lambda: cls(root, train=train, download=True), root)
        except Exception as e:
            raise UsageError(
                f"{name} not found and could not be downloaded ({type(e).__name__}); put the four "
                f"*-idx?-ubyte.gz files in {Path(root) / cls.__name__ / 'raw'} or {SYSTEM_DATA / name}"
                + (" (apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else "")
            ) from None
        found = _find_idx(name, root, train)
    images = torch.from_numpy(_read_idx(found[0]).copy()).unsqueeze(1)
    return images, torch.from_numpy(_read_idx(found[1]).astype(np.int64)), 10


def _load_torchvision(name, root, train):
    """USPS, CIFAR-10, STL-10: torchvision reads (and when online downloads) the archives."""
    import torchvision.datasets as tvd

    def make(download):
        # STL-10 for training: the 100k unlabelled images and the 5k labelled training images, as the SNGAN
        # authors trained (their labels are dropped: one class, as CelebA, so --conditional is refused).
        if name == "stl10":
            return tvd.STL10(root, split="train+unlabeled" if train else "test", download=download)
        return {"usps": tvd.USPS, "cifar10": tvd.CIFAR10}[name](root, train=train, download=download)

    try:
        try:
            ds = make(download=False)
        except Exception:
            ds = _download(lambda: make(download=True), root)
    except Exception as e:
        raise UsageError(f"{name} not found in {root} and could not be downloaded ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}); run once online or copy torchvision's "
                         f"{name} files into {root}") from None
    data = np.asarray(ds.data)
    if data.ndim == 3:  # (N, H, W) grayscale
        data = data[:, None]
    elif data.shape[-1] == 3:  # (N, H, W, 3) -> (N, 3, H, W)
        data = data.transpose(0, 3, 1, 2)
    images = torch.from_numpy(np.ascontiguousarray(data))
    if name == "stl10" and train:  # labels are -1 on the unlabelled images: the training set has no classes
        return images, torch.zeros(len(images), dtype=torch.int64), 1
    labels = np.asarray(ds.targets if hasattr(ds, "targets") else ds.labels)
    return images, torch.as_tensor(labels, dtype=torch.int64), 10


# Image files (celeba, folder) and STL-10's arrays are decoded once into a cache on disk: a raw uint8 array
# (N, C, H, W) at the asked size that training reads into memory or maps (see load_dataset).
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
BACKGROUND = (255, 255, 255)  # transparent pixels (RGBA, LA, palette transparency) are composited on white
CACHE_FORMAT = 1  # bump when decoding changes what a file decodes to: old caches are then rebuilt
CACHED = ("celeba", "folder", "stl10")  # the datasets with a decoded cache (and so a memory map)


def decode_image(path, size, crop=None):
    """One image file -> uint8 array (3, size, size): upright (EXIF orientation), RGB, the centre square (or the
    centre `crop` x `crop` of the full-size image) resized with bicubic filtering. Raises on an unreadable file.

    Every mode PIL reads ends as 8-bit RGB: 16-bit grayscale scaled by 255/65535 (PIL's convert("RGB") clips it,
    which turns a mid-grey white), 16-bit RGB(A) PNGs keep their high byte (PIL's own reading), alpha composited on
    BACKGROUND, palette and CMYK through PIL's conversions. JPEGs are decoded by libjpeg at 1/2, 1/4 or 1/8 scale
    when that still leaves at least `size` pixels across the crop (PIL's draft): most of a large JPEG's decode
    time saved, for a box-filtered reduction before the bicubic resize."""
    from PIL import Image, ImageOps
    with Image.open(path) as im:
        w, h = im.size
        c = min(crop or min(w, h), w, h)
        if im.format == "JPEG":
            im.draft("RGB", (math.ceil(w * size / c), math.ceil(h * size / c)))
        scale = im.size[0] / w  # the draft's reduction
        im.load()
        if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation: phones store rotated pixels and a tag
            im = ImageOps.exif_transpose(im)
        im = _to_rgb(im)
        w, h = im.size
        c = min(c * scale, w, h)
        im = im.resize((size, size), Image.BICUBIC, box=((w - c) / 2, (h - c) / 2, (w + c) / 2, (h + c) / 2))
        return np.asarray(im).transpose(2, 0, 1)


def _to_rgb(im):
    from PIL import Image
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit grayscale (PNG): scale, do not clip
        a = np.asarray(im).astype(np.float64).clip(0, 65535) / 257
        im = Image.fromarray(a.round().astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba)
    return im if im.mode == "RGB" else im.convert("RGB")


def _decode_chunk(job):
    """Worker: decode one chunk of files; unreadable ones are left blank and reported as (index, reason)."""
    start, paths, size, crop = job
    out, bad = np.zeros((len(paths), 3, size, size), np.uint8), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's per-file warnings (EXIF, bombs): a bad file is counted, not printed
        for j, p in enumerate(paths):
            try:
                if os.path.getsize(p) == 0:
                    raise ValueError("empty file")
                out[j] = decode_image(p, size, crop)
            except Exception as e:  # any failure of one file (truncated, not an image, empty, too large): skip it
                reason = str(e).replace(repr(p), "").replace(p, "").strip(" :") or type(e).__name__
                bad.append((start + j, reason[:100]))
    return start, out, bad


def _decode_worker(tasks, results, parent):
    """A decode process: the chunks `tasks` gives, until None. It ignores stop signals: a scheduler's SIGTERM and a
    terminal's Ctrl-C reach the whole process group, and a worker ended by one dies mid-write with a traceback of
    its own; the parent alone decides, and ends its workers. It also ends when its parent is gone."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    results.cancel_join_thread()  # a parent killed alone (the OOM killer) reads no more: exit without flushing
    while os.getppid() == parent:
        try:
            job = tasks.get(timeout=1)
        except queue.Empty:
            continue
        if job is None:
            return
        results.put(_decode_chunk(job))


def decode_workers(n=None):
    """--decode-workers, default: the cores this process may run on."""
    return n or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _decode_all(paths, size, crop, out, workers, what, chunk=64, starts=None, on_chunk=None):
    """Decode `paths` into the uint8 array `out` (N, 3, size, size), in worker processes when there is more than
    one chunk; a progress line every 10 s. `starts`: the first index of each chunk to decode (default: all of
    them; a resumed build has some already); `on_chunk(start, rows, bad)` is called once each chunk's rows are in
    `out`. Returns the sorted [(index, reason)] of the unreadable files among those decoded."""
    starts = range(0, len(paths), chunk) if starts is None else starts
    jobs = [(s, [str(p) for p in paths[s:s + chunk]], size, crop) for s in starts]
    n = sum(len(files) for _, files, _, _ in jobs)
    workers = max(1, min(decode_workers(workers), len(jobs)))
    t0 = t_print = time.time()
    done, bad = 0, []
    before = f" (the other {len(paths) - n} were decoded before, by a build that stopped)" if n < len(paths) else ""
    print(f"decoding {n} {what} images at {size} px with {workers} process{'es' * (workers > 1)}{before}",
          file=sys.stderr, flush=True)

    def collect(result):
        nonlocal done, t_print
        start, arr, b = result
        out[start:start + len(arr)] = arr
        bad.extend(b)
        if on_chunk is not None:
            on_chunk(start, arr, b)
        done += len(arr)
        if time.time() - t_print > 10:
            t_print, rate = time.time(), done / (time.time() - t0)
            print(f"  {done}/{n} decoded, {rate:.0f} images/s, about {(n - done) / rate:.0f} s left",
                  file=sys.stderr, flush=True)
    if workers > 1:
        # Worker processes of our own rather than multiprocessing.Pool: workers that ignore SIGTERM would hang
        # Pool.terminate (it ends them with SIGTERM and waits), and a dead worker hangs Pool's results forever.
        import multiprocessing as mp
        # fork where it exists: the workers need nothing but PIL and numpy, and start without importing torch again
        ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
        tasks, results = ctx.Queue(), ctx.Queue()
        procs = [ctx.Process(target=_decode_worker, args=(tasks, results, os.getpid()), daemon=True)
                 for _ in range(workers)]
        pending = iter(jobs)
        try:
            for p in procs:
                p.start()
            for _ in jobs[:2 * workers]:  # two chunks ahead per worker: a stop leaves little queued
                tasks.put(next(pending))
            for _ in jobs:
                while True:
                    try:
                        result = results.get(timeout=1)
                        break
                    except queue.Empty:
                        ended = [p.exitcode for p in procs if p.exitcode is not None]
                        if ended:
                            raise RuntimeError(f"a decode worker process ended (exit code {ended[0]}; a negative "
                                               f"code is the signal that killed it, -9 often the out-of-memory "
                                               f"killer): --decode-workers 1 decodes in this process") from None
                job = next(pending, None)
                if job is not None:
                    tasks.put(job)
                collect(result)
            for _ in procs:
                tasks.put(None)
            for p in procs:
                p.join()
        finally:
            for p in procs:  # stopped or failed: whatever they were decoding is not needed
                if p.pid is not None and p.exitcode is None:
                    p.kill()
                    p.join()
            for q in (tasks, results):
                q.cancel_join_thread()  # what is still queued is dropped, not waited for at exit
                q.close()
    else:
        for job in jobs:
            collect(_decode_chunk(job))
    t = time.time() - t0
    print(f"  decoded {n} files in {t:.1f} s ({n / max(t, 1e-9):.0f} images/s)", file=sys.stderr, flush=True)
    return sorted(bad)


def _compact(out, bad):
    """Drop the rows of unreadable files from `out` in place (rows only move down); returns the kept indices."""
    keep = np.setdiff1d(np.arange(len(out)), np.array([i for i, _ in bad], dtype=np.int64))
    for k in range(0, len(keep) if bad else 0, 1024):  # keep[j] >= j: no block overwrites a row still to be read
        block = keep[k:k + 1024]
        out[k:k + len(block)] = out[block]
    return keep


def _source(name, root, train):
    """What a cached dataset is made of: (files or None, labels, classes, crop, listing for the signature, class
    names or None)."""
    root = Path(root)
    if name == "stl10":  # torchvision reads its binary arrays: the signature covers those files
        folder = root / "stl10_binary"
        listing = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.bin"))
        return None, None, None, None, listing, None
    classes = None
    if name == "celeba":
        folder = root / "celeba" / "img_align_celeba"
        if not folder.is_dir():
            import torchvision.datasets as tvd
            try:
                _download(lambda: tvd.CelebA(root, split="all", download=True), root)
            except Exception as e:
                raise UsageError(f"celeba not found and could not be downloaded ({type(e).__name__}); "
                                 f"put the aligned images in {folder}/") from None
        groups, crop, k = [(0, folder)], 140, 1  # the usual 140 px face crop of the 178x218 images
    else:
        if not root.is_dir():
            raise UsageError(f"--data-root {root} is not a folder of images (subfolders are classes)")
        classes = _class_folders(root)
        groups, crop, k = [(i, root / c) for i, c in enumerate(classes)] or [(0, root)], None, max(1, len(classes))
    paths, labels = [], []
    for i, folder in groups:
        # hidden folders (our .gan-cache, .git, a Trash) are not data; hidden files (macOS ._ sidecars) are tried
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts[:-1]))
        paths += files
        labels += [i] * len(files)
    if not paths:
        raise UsageError(f"no images ({', '.join(IMAGE_EXTS)}) found under {groups[0][1] if name == 'celeba' else root}")
    listing = []
    for p, y in zip(paths, labels):
        try:
            st = p.stat()
            listing.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns, y))
        except OSError as e:  # a dangling link, a link loop, a file deleted since the listing: decoding it fails,
            listing.append((str(p.relative_to(root)), "unreadable", e.errno, y))  # and names it as a bad file
    return paths, np.array(labels, dtype=np.int64), k, crop, listing, classes


def _class_folders(root):
    """The class folders of a folder data set: its subfolders, by name, but for hidden ones and links that lead
    back to the root or above it (each is said in one line: every image below would count again, as a class)."""
    above, classes = {root.resolve(), *root.resolve().parents}, []
    for d in sorted(root.iterdir(), key=lambda d: d.name):
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            target = d.resolve(strict=True)
        except (OSError, RuntimeError) as e:  # a link loop
            target = e
        if isinstance(target, Exception) or target in above:
            if distributed_env()[0] == 0:
                print(f"warning: class folder {d} is skipped: it links to "
                      f"{target if isinstance(target, Path) else 'itself (a loop)'}, the data root or a folder "
                      f"above it, so its images would count again as one more class", file=sys.stderr, flush=True)
            continue
        classes.append(d.name)
    return classes


def _cache_entry(name, root, size, train, cache_dir):
    """The cache folder of one dataset at one size: beside the data, or in --cache-dir (named after the data's
    absolute path there, so two folders never share an entry)."""
    split = "train" if train else "test"
    if cache_dir is None:
        return Path(root) / ".gan-cache" / f"{name}-{split}-{size}px"
    tag = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"{name}-{tag}-{split}-{size}px"


def _signature(name, size, crop, listing, classes=None):
    """What a cache was decoded from: the decoding's settings, the class names (an empty class folder is a class:
    it changes the model's number of classes, not the images) and every file's name, size and time."""
    h = hashlib.sha256(json.dumps([CACHE_FORMAT, name, size, crop, BACKGROUND, classes]).encode())
    for row in listing:
        h.update(("\t".join(map(str, row)) + "\n").encode())
    return h.hexdigest()


def _read_manifest(entry, signature):
    """entry's manifest when it is a cache of `signature` that carries its checksums (an older cache has none:
    it is outdated). Whether its files match them is _check_cache's question."""
    try:
        m = json.loads((entry / "manifest.json").read_text())
        return m if m["signature"] == signature and "checksums" in m else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


# A cache is checked on every use, cheaply: its files' sizes, the labels' checksum, and the first, the last and
# CHECKED_BLOCKS other blocks of images (chosen at random: over many runs every block is read); every block when
# images.u8 is not the file the manifest was written with (another size, time or inode: copied, or written to).
CACHE_BLOCK = 64  # images per block: the unit of decoding, of a stopped build's progress and of the checksums
CHECKED_BLOCKS = 2


def _file_record(path):
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _block_sums(file, shape, blocks=None):
    """{block: crc32 of its bytes} of the uint8 array of `shape` in `file`, for `blocks` (default: all)."""
    row = math.prod(shape[1:])
    sums = {}
    with open(file, "rb") as f:
        for b in range(math.ceil(shape[0] / CACHE_BLOCK)) if blocks is None else blocks:
            f.seek(b * CACHE_BLOCK * row)
            sums[b] = zlib.crc32(f.read(min(CACHE_BLOCK, shape[0] - b * CACHE_BLOCK) * row))
    return sums


def _check_cache(entry, manifest, full=False):
    """None when entry's files match the manifest's checksums, else what does not (a few words)."""
    shape, sums, file = manifest["shape"], manifest["checksums"], entry / "images.u8"
    try:
        record = _file_record(file)
        if record[0] != math.prod(shape):
            return f"images.u8 has {record[0]} bytes, not {math.prod(shape)}"
        if zlib.crc32((entry / "labels.npy").read_bytes()) != manifest["labels_crc"]:
            return "labels.npy does not match its checksum"
        full = full or record != manifest["file"]
        blocks = range(len(sums)) if full or not sums else sorted(
            {0, len(sums) - 1, *(secrets.randbelow(len(sums)) for _ in range(CHECKED_BLOCKS))})
        found = _block_sums(file, shape, blocks)
    except OSError as e:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    wrong = [b for b, crc in found.items() if crc != sums[b]]
    if wrong:
        b = wrong[0]
        return (f"images {b * CACHE_BLOCK} to {min((b + 1) * CACHE_BLOCK, shape[0]) - 1} do not match their "
                f"checksum{f', nor do {len(wrong) - 1} more blocks' if len(wrong) > 1 else ''}")
    if full and record != manifest["file"]:  # all of it read and right: the next use need not read it all again
        with contextlib.suppress(OSError):
            _write_json(entry / "manifest.json", {**manifest, "file": record})
    return None


def _fsync_write(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


class _CacheUnwritable(Exception):
    """The cache could not be written; `decoded` holds (images, labels, classes, bad files) when the decoding had
    finished before the failure, so that it need not be done again."""
    decoded = None


# A cache is built in a temp folder beside its entry, named so that no other process can hold the name (this
# machine, this process and a random part: two containers, or two machines, may both run Python as pid 1), and
# renamed into place when complete. It holds owner.json (who builds) and `progress`: a header line (signature,
# shape), then one line per decoded block (its first index, checksum and unreadable files) written once the
# block's rows are in the mapped file, so that a build stopped by a signal or killed can be continued by the next
# build of the same signature. A builder that is gone (its process no longer runs, it recorded that it stopped,
# or no sign of it for CACHE_STALE seconds: a live builder writes a line every block) leaves its folder to the
# next build of the entry, which continues it or removes it.
CACHE_STALE = 30 * 60


def _unique(path, kind):
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.{kind}")


def _start_time(pid):
    """When process `pid` started (clock ticks since boot: Linux's /proc/PID/stat, field 22)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _owner():
    """Who this process is, for another process on this machine to tell whether it still runs: its pid, and on
    Linux the boot, the pid namespace and its start time (a pid is reused after a reboot, in another container,
    or by a later process)."""
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    with contextlib.suppress(OSError, ValueError, IndexError):
        if os.readlink("/proc/self") == str(os.getpid()):  # /proc shows our own pid namespace
            me.update(boot=Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                      pidns=os.readlink("/proc/self/ns/pid"), start=_start_time(os.getpid()))
    return me


def _owner_alive(owner):
    """True or False when this process can tell whether `owner` (an _owner()) still runs, None when it cannot
    (another machine or pid namespace)."""
    me = _owner()
    if owner.get("host") != me["host"] or [owner.get(k) for k in ("boot", "pidns")] != [me.get("boot"), me.get("pidns")]:
        return None
    try:
        if "start" in me:
            return _start_time(owner["pid"]) == owner["start"]
        os.kill(owner["pid"], 0)
        return True
    except (FileNotFoundError, ProcessLookupError):
        return False
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _write_owner(folder):
    _write_json(folder / "owner.json", {**_owner(), "name": folder.name})


def _read_progress(folder):
    """A build's progress: (header, {first index of a block: (checksum, unreadable files)}, last record)."""
    lines = (folder / "progress").read_text().splitlines()
    header, blocks, last = json.loads(lines[0]), {}, {}
    for line in lines[1:]:
        try:
            last = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if "start" in last:
            blocks[last["start"]] = (last["crc"], [tuple(b) for b in last["bad"]])
    return header, blocks, last


def _gone(folder):
    """Whether the builder of the temp folder is gone: no sign of it for CACHE_STALE seconds, it recorded that it
    stopped, or it ran on this machine and no longer runs."""
    signs = [folder.stat().st_ctime] + [f.stat().st_mtime for f in (folder / "progress", folder / "owner.json")
                                        if f.exists()]
    if time.time() - max(signs) > CACHE_STALE:
        return True
    try:
        owner = json.loads((folder / "owner.json").read_text())
        if owner["name"] != folder.name:  # just renamed by a builder that continues it, and not yet rewritten
            return False
        if (folder / "progress").exists() and "stopped" in _read_progress(folder)[2]:
            return True
    except (OSError, ValueError, KeyError, IndexError, TypeError):  # being created: only time tells
        return False
    return _owner_alive(owner) is False


def _move_aside(folder, entry):
    """Remove `folder` (an outdated or damaged cache, or a gone builder's temp folder): renamed first, so that
    readers that have its files open keep them and no other process continues it meanwhile."""
    old = _unique(entry, "old")
    try:
        os.rename(folder, old)
    except FileNotFoundError:  # another process was first
        return False
    shutil.rmtree(old, ignore_errors=True)
    return True


def _tidy(entry, header, tmp):
    """Remove what gone builders of `entry` left beside it; the first gone build of `header` (the same signature
    and shape) is renamed to `tmp` instead, and its progress returned, to be continued. Folders of builders that
    may still run are left alone."""
    adopted = None
    for old in entry.parent.glob(f"{entry.name}.*.old"):  # what a process killed while removing it left
        shutil.rmtree(old, ignore_errors=True)
    for folder in sorted(entry.parent.glob(f"{entry.name}.*.tmp")):
        with contextlib.suppress(OSError):
            if not _gone(folder):
                continue
            progress = None
            with contextlib.suppress(OSError, ValueError, IndexError, KeyError, TypeError):
                progress = _read_progress(folder)
            if adopted is None and progress and progress[0] == header and "finishing" not in progress[2]:
                with contextlib.suppress(FileNotFoundError):  # another build took it first
                    os.rename(folder, tmp)
                    adopted = progress
                    continue
            _move_aside(folder, entry)
    return adopted


def _publish(tmp, entry, signature):
    """Rename the complete temp folder to `entry`. Returns None, or the manifest of the cache of the same signature
    that another builder published first (ours is then dropped). An outdated or damaged cache is replaced."""
    import errno
    for _ in range(10):
        try:
            os.rename(tmp, entry)  # fails while entry is a folder with files: of two builders, one publishes
            return None
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        theirs = _read_manifest(entry, signature)
        if theirs is not None and _check_cache(entry, theirs) is None:
            shutil.rmtree(tmp, ignore_errors=True)
            return theirs
        _move_aside(entry, entry)
    raise OSError(errno.EBUSY, "other processes keep replacing it", str(entry))


def _decode_resumably(tmp, header, adopted, paths, size, crop, workers, name):
    """Decode into tmp/images.u8 the blocks `adopted` (a stopped build's progress) does not hold, recording each
    block in tmp/progress as it is written. Returns ({block: checksum}, unreadable files). On a
    stop signal the folder is left to be continued, and the exception says what was kept."""
    shape, n = tuple(header["shape"]), header["shape"][0]
    blocks = {}
    if adopted is None:
        tmp.mkdir(parents=True)
        _write_owner(tmp)
        with open(tmp / "images.u8", "wb") as f:
            if hasattr(os, "posix_fallocate"):  # no space: an error now, not a SIGBUS while writing the map
                os.posix_fallocate(f.fileno(), 0, math.prod(shape))
            else:
                f.truncate(math.prod(shape))
        _fsync_write(tmp / "progress", (json.dumps(header) + "\n").encode())
    else:
        try:
            _write_owner(tmp)
            # the blocks whose rows are as recorded: a power cut may have lost rows whose record reached the disk
            found = _block_sums(tmp / "images.u8", shape, [s // CACHE_BLOCK for s in adopted[1]])
            blocks = {s: v for s, v in adopted[1].items() if found[s // CACHE_BLOCK] == v[0]}
        except BaseException as e:  # stopped while reading what it continues: that stays for the next run
            if isinstance(e, (KeyboardInterrupt, Stopped)):  # a stop signal: Stopped (see StopSignals), or Ctrl-C's
                e.args, e.resumable = (f"{str(e) or 'interrupted'} while continuing a stopped decode of {name}: "
                                       f"what it decoded is kept for the next run",), True
            raise
    fd = os.open(tmp / "progress", os.O_WRONLY | os.O_APPEND)
    out = np.memmap(tmp / "images.u8", np.uint8, "r+", shape=shape)
    recording = [True]

    def record(entry):
        if recording[0]:
            try:
                os.write(fd, (json.dumps(entry) + "\n").encode())
            except OSError:  # a full disk: the build goes on, only its later blocks cannot be continued
                recording[0] = False

    def on_chunk(start, rows, bad):
        # The rows are in the file's pages, shared with any later process even if this one is killed now
        crc = zlib.crc32(np.ascontiguousarray(rows))
        blocks[start] = (crc, [tuple(b) for b in bad])
        record({"start": start, "crc": crc, "bad": bad})
    try:
        if adopted is not None:
            record({"resumed": tmp.name})
        todo = [s for s in range(0, n, CACHE_BLOCK) if s not in blocks]
        _decode_all(paths, size, crop, out, workers, name, CACHE_BLOCK, todo, on_chunk)
        record({"finishing": True})  # from here the file's rows move (_compact): not to be continued
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, Stopped)) and recording[0]:
            record({"stopped": getattr(e, "signum", int(signal.SIGINT))})
            kept = sum(min(CACHE_BLOCK, n - s) for s in blocks)
            e.args = (f"{str(e) or 'interrupted'} while decoding {name}: {kept} of {n} images kept, the next run "
                      f"continues them",)
            e.resumable = True
        raise
    finally:
        os.close(fd)
        out.flush()
        del out
    return {s // CACHE_BLOCK: crc for s, (crc, _) in blocks.items()}, sorted(b for _, bad in blocks.values() for b in bad)


def _build_cache(entry, name, root, size, train, signature, paths, labels, k, crop, workers):
    """Decode into entry/ (via a temp folder of this process, renamed into place when complete, so a reader never
    sees half a cache; a stopped build's folder is continued by the next build). Returns the manifest: ours, or
    that of another process that published the same cache first. When the cache cannot be written (read-only data
    root, full disk), raises _CacheUnwritable after cleaning up, before decoding anything where that can be known
    (the array's space is reserved first)."""
    tmp, decoded = _unique(entry, "tmp"), None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        if paths is None:  # STL-10: the resized arrays torchvision gives
            _tidy(entry, None, tmp)
            images, labels, k = _load_torchvision(name, root, train)
            images, labels = resize_uint8(images, size).numpy(), labels.numpy()
            shape, bad = images.shape, []
            decoded = (images, labels, k, bad)
            tmp.mkdir()
            _fsync_write(tmp / "images.u8", images.tobytes())
            sums = _block_sums(tmp / "images.u8", shape)
        else:
            shape = (len(paths), 3, size, size)
            header = {"signature": signature, "shape": list(shape), "block": CACHE_BLOCK}
            sums, bad = _decode_resumably(tmp, header, _tidy(entry, header, tmp), paths, size, crop, workers, name)
            with open(tmp / "images.u8", "r+b") as f:
                if bad:
                    out = np.memmap(f, np.uint8, "r+", shape=shape)
                    keep = _compact(out, bad)
                    out.flush()
                    del out
                else:
                    keep = np.arange(len(paths))
                shape = (len(keep), *shape[1:])
                f.truncate(math.prod(shape))
                os.fsync(f.fileno())
            # the blocks' checksums as decoded, unless rows moved up over unreadable files: then read again
            sums = _block_sums(tmp / "images.u8", shape) if bad else sums
            labels = labels[keep]
            decoded = (tmp / "images.u8", labels, k, bad)
            _fsync_write(tmp / "skipped.txt", "".join(f"{paths[i]}\t{r}\n" for i, r in bad).encode())
            for f in ("progress", "owner.json"):
                os.unlink(tmp / f)
        np.save(tmp / "labels.npy", labels)
        manifest = {"format": CACHE_FORMAT, "dataset": name, "root": str(Path(root).resolve()), "size": size,
                    "crop": crop, "background": BACKGROUND, "shape": list(shape), "num_classes": k,
                    "signature": signature, **_skipped(bad, paths, root),
                    "block_rows": CACHE_BLOCK, "checksums": [sums[b] for b in range(len(sums))],
                    "labels_crc": zlib.crc32((tmp / "labels.npy").read_bytes()), "file": _file_record(tmp / "images.u8")}
        _fsync_write(tmp / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
        return _publish(tmp, entry, signature) or manifest
    except OSError as e:
        err = _CacheUnwritable(f"{e.strerror or type(e).__name__}: {e.filename or entry}")
        if decoded is not None and isinstance(decoded[0], Path):  # decoded, then the cache could not be finished:
            with contextlib.suppress(OSError, MemoryError):      # keep the work (it is in the page cache)
                err.decoded = (np.fromfile(decoded[0], np.uint8).reshape(shape), *decoded[1:])
        elif decoded is not None:
            err.decoded = decoded
        shutil.rmtree(tmp, ignore_errors=True)
        raise err from None
    except BaseException as e:
        if not getattr(e, "resumable", False):
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _skipped(bad, paths, root):
    """A manifest's record of the unreadable files: their number and the first three, with their reasons."""
    return {"skipped": len(bad), "skipped_examples": [f"{Path(paths[i]).relative_to(root)} ({r})" for i, r in bad[:3]]}


def _skipped_warning(m, where):
    if m["skipped"]:
        print(f"warning: {m['skipped']} of {m['skipped'] + m['shape'][0]} files are not readable images and are "
              f"left out: {'; '.join(m['skipped_examples'])}{' ...' if m['skipped'] > 3 else ''} (all: {where})",
              file=sys.stderr, flush=True)


def available_memory():
    """Bytes this process can still allocate, as far as the system says: MemAvailable (Linux; elsewhere the free
    physical pages), capped by the room left under RLIMIT_DATA and RLIMIT_AS (what `ulimit -d/-v`, a batch
    scheduler or a container sets). None when unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        with contextlib.suppress(ValueError, OSError, AttributeError):
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        import resource
        status = Path("/proc/self/status").read_text()
        used = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines()
                if line.startswith(("VmData:", "VmSize:"))}
        for limit, key in ((resource.RLIMIT_DATA, "VmData"), (resource.RLIMIT_AS, "VmSize")):
            soft = resource.getrlimit(limit)[0]
            if soft != resource.RLIM_INFINITY and key in used:
                room = max(0, soft - used[key])
                avail = room if avail is None else min(avail, room)
    except (ImportError, OSError, ValueError):
        pass
    return avail


def _fits_in_ram(nbytes):
    """Half of the available memory, shared by the processes torchrun starts on this machine (each would hold
    its own copy; a memory map's pages are shared by all of them)."""
    avail = available_memory()
    return avail is None or nbytes * int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= avail // 2


def _load_cached(name, root, size, train, device, opts):
    """celeba, folder, stl10: from the decoded cache (built now when missing or outdated), then in memory or
    mapped, as --data-in-memory says. Returns ImageData."""
    paths, labels, k, crop, listing, classes = _source(name, root, train)
    signature = _signature(name, size, crop, listing, classes)
    files = hashlib.sha256("".join(f"{row[0]}\t{row[1]}\n" for row in listing).encode()).hexdigest()[:16]
    known = {"files": files, "class_names": classes}  # for the checkpoint: what this data is
    entry = _cache_entry(name, root, size, train, opts.get("cache_dir"))
    manifest = _read_manifest(entry, signature)
    problem = manifest and _check_cache(entry, manifest)
    if problem:
        print(f"warning: the decoded cache {entry} is damaged ({problem}): decoding it again", file=sys.stderr,
              flush=True)
        with contextlib.suppress(OSError):  # when it cannot be removed, the build cannot be written either
            _move_aside(entry, entry)
        manifest = None
    if manifest is not None:
        if distributed_env()[0] == 0:
            _skipped_warning(manifest, entry / "skipped.txt")
    else:
        try:
            manifest = _build_cache(entry, name, root, size, train, signature, paths, labels, k, crop,
                                    opts.get("workers"))
            _skipped_warning(manifest, entry / "skipped.txt")
        except _CacheUnwritable as e:
            if opts.get("in_memory") == "no":
                raise UsageError(f"--data-in-memory no needs a decoded cache, and {entry} cannot be written ({e}); "
                                 f"name a writable folder with --cache-dir") from None
            print(f"warning: cannot write the decoded cache {entry} ({e}): {'kept' if e.decoded else 'decoding'} in "
                  f"memory for this run only (--cache-dir DIR keeps it)", file=sys.stderr, flush=True)
            data = _decode_in_memory(name, root, size, train, device, paths, labels, k, crop, opts, e.decoded)
            data.files, data.class_names = files, classes
            return data
    shape, file = tuple(manifest["shape"]), entry / "images.u8"
    labels = torch.from_numpy(np.load(entry / "labels.npy"))
    if shape[0] == 0:
        raise UsageError(f"no readable image under {root}: all {manifest['skipped']} files failed to decode "
                         f"(see {entry / 'skipped.txt'})")
    mode, nbytes = opts.get("in_memory", "auto"), math.prod(shape)
    if mode == "no" or (mode == "auto" and data_home(nbytes, device).type == "cpu" and not _fits_in_ram(nbytes)):
        # A memory map of the cache: the OS page cache keeps what fits, shared by every process of the machine.
        # Mode "r" maps the file shared and read-only, which RLIMIT_DATA does not count (a copy-on-write map
        # would); torch warns that the array is not writable, and nothing ever writes to it.
        mapped = np.memmap(file, np.uint8, "r", shape=shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            images = torch.from_numpy(mapped)
        return ImageData(name, images, labels, manifest["num_classes"], f"memory map of {file}", **known)
    home = data_home(nbytes, device)
    try:
        if home.type == "cpu":
            images = torch.from_numpy(np.fromfile(file, np.uint8).reshape(shape))
        else:  # straight to the device, a slice at a time: never the whole array in host memory
            mapped = np.memmap(file, np.uint8, "r", shape=shape)
            images = torch.empty(shape, dtype=torch.uint8, device=home)
            for i in range(0, shape[0], 4096):
                images[i:i + 4096] = torch.from_numpy(np.array(mapped[i:i + 4096])).to(home)
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "alloc" not in str(e):
            raise
        raise UsageError(f"{nbytes / 2**30:.1f} GB of decoded {name} images do not fit in memory here: use "
                         f"--data-in-memory auto or no (a memory map of {file})") from None
    return ImageData(name, images, labels.to(home), manifest["num_classes"], _where(home), **known)


def _decode_in_memory(name, root, size, train, device, paths, labels, k, crop, opts, decoded=None):
    """No writable cache: decode (or load) into memory for this run, as before caches existed, unless `decoded`
    already holds the (images, labels, classes, bad files) of a build that could not be finished."""
    if decoded is None and paths is None:  # STL-10: torchvision's arrays
        images, labels, k = _load_torchvision(name, root, train)
        images = resize_uint8(images, size)
    else:
        if decoded is None:
            out = np.empty((len(paths), 3, size, size), np.uint8)
            bad = _decode_all(paths, size, crop, out, opts.get("workers"), name)
            keep = _compact(out, bad)
            decoded = (out[:len(keep)], labels[keep], k, bad)
        images, labels, k, bad = decoded
        images, labels = torch.from_numpy(images), torch.from_numpy(labels)
        _skipped_warning({**_skipped(bad, paths, root), "shape": [len(images)]}, "not written: no cache")
        if not len(images):
            raise UsageError(f"no readable image under {root}: all {len(bad)} files failed to decode")
    home = data_home(images.numel(), device)
    return ImageData(name, images.to(home), labels.to(home), k, _where(home))


def make_fake(n=1024, size=28, seed=0, num_classes=10):
    """A tiny structured data set for smoke tests: class k is a bright blob at position k.

    Learnable in a few hundred steps (so tests can check that learning happens), and its
    classes are separable, so the evaluation classifier reaches ~100% accuracy on it.
    """
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    cy = 7 + 14 * (labels // 5) + torch.randint(-1, 2, (n,), generator=g)  # two rows of five positions on a 28x28 canvas
    cx = 4 + 5 * (labels % 5) + torch.randint(-1, 2, (n,), generator=g)
    radius = 2.0 + 1.5 * torch.rand(n, generator=g)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    d2 = (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2
    img = (torch.sigmoid(3.0 * (radius[:, None, None] - d2.sqrt())) + 0.05 * torch.rand(n, 28, 28, generator=g)).clamp(0, 1)
    return resize_uint8((img * 255).round().to(torch.uint8).unsqueeze(1), size), labels, num_classes


def resize_uint8(images, size, chunk=4096):
    """Resize a uint8 (N, C, H, W) tensor once, with antialiasing when shrinking."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = images[i:i + chunk].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i:i + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


def data_home(nbytes, device):
    """Where a dataset of `nbytes` lives: on the accelerator `device` when it fits, else in host memory.

    CUDA: on the GPU if it takes under half of the free memory (`torch.cuda.mem_get_info`), so CelebA at 64 px
    (2.5 GB) sits on any recent GPU. MPS: on the device below 2**31 bytes (larger MPS buffers fail). Otherwise
    Batches copies each batch over through pinned staging buffers.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return device if nbytes < free // 2 else torch.device("cpu")
    if device.type == "mps":
        return device if nbytes < 2**31 else torch.device("cpu")
    return torch.device("cpu")


def _where(home):
    """Where a dataset lives, in words (args.json and the summary say it)."""
    return "host RAM" if home.type == "cpu" else f"{home.type} memory"


def load_dataset(name, root="./data", image_size=None, device="cpu", train=True, alone=False, cache_dir=None,
                 decode_workers=None, in_memory="auto"):
    """Load a dataset as one uint8 tensor at `image_size`: on `device` when it fits (see data_home), else in host
    memory, else (celeba, folder, stl10) a memory map of its decoded cache. `in_memory` is --data-in-memory:
    auto decides by the available memory (see _fits_in_ram), yes never maps, no always maps.

    Decoded and resized once (image files by `decode_workers` processes, into a cache under `root` or
    `cache_dir`, reused while the files are unchanged); batches are then made by indexing, with no per-sample
    transforms and no loader workers. Under torchrun every process calls it together, unless `alone`
    (rank 0's evaluation classifier: a barrier there would wait for processes that are training).
    """
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if name not in CACHED:  # their arrays are read as they are: no decoding, no cache, nothing to map
        for flag, value in (("--cache-dir", cache_dir), ("--decode-workers", decode_workers),
                            ("--data-in-memory no", in_memory == "no" or None)):
            if value is not None:
                raise UsageError(f"{flag} is used only with {', '.join(CACHED)} (decoded caches), not {name}")
    opts = {"cache_dir": cache_dir, "workers": decode_workers, "in_memory": in_memory}
    if alone or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return _load_dataset(name, root, image_size, device, train, opts)
    # Under torchrun, in three turns: process 0 loads first (downloads, decodes, writes caches: a --data-root shared
    # between machines is written once), then the first process of each other machine (its own disk), then the
    # rest, which map or read what was written. After each turn the processes agree whether one failed: then all stop
    # (the failed one with its error, the others in one line), and no later turn retries the download.
    # The turns wait in a process group of their own, whose timeout is a day, not --dist-timeout-minutes: decoding
    # a large folder into the cache may take hours, while the others wait.
    patient = _patient_group()
    rank, _, local_rank = distributed_env()
    turn, data, error = 0 if rank == 0 else 1 if local_rank == 0 else 2, None, None
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    for t in range(3):
        if t == turn:
            try:
                data = _load_dataset(name, root, image_size, device, train, opts)
            except BaseException as e:  # any failure or a stop: a process leaving the turns would hang the others
                error = e
        failed = torch.tensor([float(error is not None)], device=on)
        dist.all_reduce(failed, dist.ReduceOp.MAX, group=patient)
        if error is not None:
            raise error
        if failed.item():
            raise UsageError(f"another process could not load {name} (its error is printed above, or in its "
                             f"machine's log)")
    return data


@functools.cache
def _patient_group():
    return dist.new_group(timeout=datetime.timedelta(hours=24))


def data_options(args):
    """load_dataset's keyword arguments from the data flags."""
    return {"cache_dir": args.cache_dir, "decode_workers": args.decode_workers, "in_memory": args.data_in_memory}


def _load_dataset(name, root, image_size, device, train, opts=None):
    size = image_size or NATIVE_SIZE[name]
    if name in CACHED:
        return _load_cached(name, root, size, train, device, opts or {})
    if name == "fake":
        images, labels, k = make_fake(size=size, seed=0 if train else 1, n=1024 if train else 512)
    elif name in ("mnist", "fashion-mnist"):
        images, labels, k = _load_mnist_like(name, root, train)
    else:
        images, labels, k = _load_torchvision(name, root, train)
    images = resize_uint8(images, size)
    home = data_home(images.numel(), device)
    return ImageData(name, images.to(home), labels.to(home), k, _where(home))


class Batches:
    """Endless batches in shuffled epochs on `device`; the shuffle of epoch e depends only on (seed, e).

    Under torchrun every process draws the same permutation and takes its own disjoint slice of each
    batch (`batch_size` is the whole batch, over all processes). So a resumed run that knows how many
    batches it has consumed (`position`) continues with exactly the batches an uninterrupted run would
    have drawn, with any number of processes. The last partial batch of an epoch is dropped, as
    DataLoader(drop_last=True) does. A memory-mapped dataset gives the same batches (see _gather).

    Data kept in host memory for a GPU (too large for it) is gathered into one of two
    pinned staging buffers and copied asynchronously: indexing a pinned tensor returns pageable
    memory, from which `non_blocking` copies are synchronous. A CUDA event per buffer keeps the
    host from refilling a buffer whose copy has not finished.
    """

    def __init__(self, data, batch_size, seed, position=0, device=None, memory_format=torch.contiguous_format,
                 rank=0, world=1):
        if batch_size > len(data):
            raise UsageError(f"--batch-size {batch_size} is larger than the dataset ({len(data)} images)")
        self.data, self.batch_size, self.seed, self.position = data, batch_size, seed, position
        self.rank, self.world, self.local = rank, world, batch_size // world  # this process's share of a batch
        self.device = torch.device(device) if device is not None else data.images.device
        self.memory_format = memory_format
        self.per_epoch = len(data) // batch_size
        self._perm_epoch, self._perm = None, None
        self._staged = data.images.device.type == "cpu" and self.device.type == "cuda"
        if self._staged:
            self._buffers = [(torch.empty((self.local, *data.images.shape[1:]), dtype=torch.uint8).pin_memory(),
                              torch.empty(self.local, dtype=torch.int64).pin_memory(), torch.cuda.Event())
                             for _ in range(2)]

    @property
    def epoch(self):
        return self.position // self.per_epoch

    def _gather(self, idx, out=None):
        """The images at `idx`, in that order. From a memory map the rows are read in file order (the page cache
        reads ahead, a disk seeks less), then put back in the batch's order: the same batch as from memory."""
        if not self.data.mapped:
            return torch.index_select(self.data.images, 0, idx, out=out)
        order = idx.argsort()
        return torch.index_select(self.data.images[idx[order]], 0, order.argsort(), out=out)

    def next(self):
        """The next (images in [-1, 1], labels) batch on the training device."""
        epoch, i = divmod(self.position, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(len(self.data), generator=g).to(self.data.images.device)
            self._perm_epoch = epoch
        idx = self._perm[i * self.batch_size:(i + 1) * self.batch_size]  # the whole batch, as in one process
        idx = idx[self.rank * self.local:(self.rank + 1) * self.local]  # under torchrun: this process's share
        self.position += 1
        if self._staged:
            x_pin, y_pin, done = self._buffers[self.position % 2]
            done.synchronize()  # this buffer's previous copy has finished
            self._gather(idx, x_pin)
            torch.index_select(self.data.labels, 0, idx, out=y_pin)
            x, y = x_pin.to(self.device, non_blocking=True), y_pin.to(self.device, non_blocking=True)
            done.record()
        else:
            x, y = self._gather(idx).to(self.device), self.data.labels[idx].to(self.device)
        return to_float(x).contiguous(memory_format=self.memory_format), y


def balanced_labels(n, num_classes, device):
    """0, 1, ..., K-1, 0, 1, ...: every class equally often (to within one)."""
    return torch.arange(n, device=device) % num_classes


# ----------------------------------------------------------------------------------------------
# 3 Networks: DCGAN's size arithmetic and spectral normalisation (Miyato et al. 2018)
# ----------------------------------------------------------------------------------------------

def conv_plan(image_size, arch="--arch dcgan", smallest=3):
    """Conv stacks start (G) or end (D) at s0 x s0 and double n times: image_size = s0 * 2**n, with s0 the
    smallest start in smallest..7 (DCGAN: 3; SNGAN's nets start at 4 or 6, as the paper's 32 and 48 px)."""
    s0, n = image_size, 0
    while s0 % 2 == 0 and s0 // 2 >= smallest:
        s0, n = s0 // 2, n + 1
    if n < 2 or s0 > 7:
        raise UsageError(f"{arch} cannot make {image_size}x{image_size} images: the size must be "
                         f"s*2^n with s in {smallest}..7 and n >= 2 (e.g. 16, 28, 32, 48, 64, 96, 128)")
    return s0, n


def spectral_norm(module, n_power_iterations=1):
    """Divide `module.weight` by its largest singular value, estimated by power iteration.

    A thin wrapper over torch.nn.utils.parametrizations.spectral_norm (which reshapes a conv
    weight to (out, in*kh*kw) as the paper does, and runs `n_power_iterations` per training
    forward, reusing u between steps; the paper uses 1).
    """
    nn.utils.parametrizations.spectral_norm(module, n_power_iterations=n_power_iterations)
    sn = module.parametrizations.weight[0]
    sn.forward = types.MethodType(_forward_in_float32, sn)  # a bound method: copy.deepcopy rebinds it to the copy
    return module


def _forward_in_float32(self, weight):
    """The parametrization's forward outside autocast: under CUDA bf16 autocast torch.mv (the power iteration and
    sigma = u^T W v) would run in bf16. The normalised weight is float32; the layer then casts it as usual."""
    with torch.autocast(weight.device.type, enabled=False):
        return type(self).forward(self, weight)


# ----------------------------------------------------------------------------------------------
# 4 Evaluation: Inception Score, FID, and a classifier for MNIST-like data
# ----------------------------------------------------------------------------------------------

def inception_score(probs, splits=10, generator=None):
    """IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), mean and std over exactly `splits` splits.

    `probs` (N, K) are class probabilities. Samples are shuffled before splitting so that a
    caller that generated them class by class does not get per-class splits.
    """
    p = torch.as_tensor(probs, dtype=torch.float64)
    p = p[torch.randperm(p.shape[0], generator=generator)]
    splits = min(splits, p.shape[0])  # fewer samples than splits: no empty split (whose score would be NaN)
    scores = []
    for part in torch.tensor_split(p, splits):  # sizes differ by at most one (chunk() may give fewer parts)
        py = part.mean(0, keepdim=True)
        kl = (torch.special.xlogy(part, part) - torch.special.xlogy(part, py)).sum(1).mean()
        scores.append(kl.exp())
    scores = torch.stack(scores)
    return scores.mean().item(), (scores.std(unbiased=False).item() if len(scores) > 1 else 0.0)


def feature_stats(features):
    """Mean and covariance of (N, D) features in float64 (float32 loses FID's small terms)."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))  (Heusel et al. 2017, Eq. 6).

    numpy float64 without scipy: tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2), and the
    inner matrix is symmetric PSD, so two `eigh` calls give it exactly, with no complex parts
    to discard (scipy's sqrtm route needs that clean-up).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    w, v = np.linalg.eigh(s1)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = s1_half @ s2 @ s1_half
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


class Classifier(nn.Module):
    """Small CNN for MNIST-like images; its 128-d penultimate layer gives classifier-FID."""

    def __init__(self, channels, image_size, num_classes):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (image_size // 4) ** 2, 128), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.head(self.body(x))


CLASSIFIER_EPOCHS = 3


def get_classifier(dataset, data_root, device):
    """The evaluation classifier of an MNIST-like dataset, trained once and cached under data_root.

    Trained on the real training split at the dataset's native size; generated images are
    resized to that size before they are classified.
    """
    size = NATIVE_SIZE[dataset]
    path = Path(data_root) / "classifiers" / f"{dataset}-{size}px.pt"
    if path.exists():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        net = Classifier(*ckpt["shape"])
        net.load_state_dict(ckpt["model"])
        net.test_accuracy = ckpt["test_accuracy"]
        return net.to(device).eval()
    train, test = (load_dataset(dataset, data_root, size, device, train=t, alone=True) for t in (True, False))
    print(f"training the {dataset} evaluation classifier once ({CLASSIFIER_EPOCHS} epochs, cached in {path})",
          file=sys.stderr)
    torch.manual_seed(1234)  # the caller forks the RNG (Evaluator): the cached network does not depend on the run
    net = Classifier(train.channels, size, train.num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    batches = Batches(train, min(256, len(train)), seed=1234, device=device)
    steps = CLASSIFIER_EPOCHS * batches.per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    net.train()
    for _ in range(steps):
        x, y = batches.next()
        x = x + 0.05 * torch.randn_like(x)  # a little robustness to the noise in GAN samples
        loss = F.cross_entropy(net(x), y)  # logits, not softmax, into cross-entropy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        correct = sum((net(to_float(test.images[i:i + 1000].to(device))).argmax(1).cpu() == test.labels[i:i + 1000].cpu())
                      .sum().item() for i in range(0, len(test), 1000))
    net.test_accuracy = correct / len(test)
    print(f"  {dataset} classifier test accuracy {net.test_accuracy:.4f}", file=sys.stderr)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, {"model": {k: v.cpu() for k, v in net.state_dict().items()},
                               "shape": (train.channels, size, train.num_classes), "test_accuracy": net.test_accuracy})
    except OSError as e:  # a read-only --data-root or a full disk: this run uses it from memory, the next trains again
        print(f"warning: cannot cache the evaluation classifier in {path} ({e.strerror or e}); using it from memory",
              file=sys.stderr)
    return net


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for the TF-ported weights


def load_inception(weights, device):
    """torch-fidelity's `inception-v3-compat`: the Inception-v3 graph and weights of the original TF IS/FID
    code, ported to PyTorch, whose IS/FID/KID match the TF reference to about 1e-3 (so they compare with
    papers' tables). Returns (network taking uint8 images -> (2048-d pool features, 1008 unbiased logits)
    or None, the words for the evaluation records). `weights`: a local copy of its weights file (else
    torch-fidelity's download, from the torch hub cache when offline)."""
    try:
        import torch_fidelity
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        return None, "IS/FID/KID skipped: torch-fidelity is not installed (pip install torch-fidelity)"
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=weights, verbose=False)
    except Exception as e:
        if weights is not None:
            raise UsageError(f"--inception-weights {weights} is not torch-fidelity's Inception weights file "
                             f"({type(e).__name__})") from None
        return None, (f"IS/FID/KID skipped: torch-fidelity's Inception weights could not be downloaded "
                      f"({type(e).__name__}); pass --inception-weights PATH to a copy of {INCEPTION_FILE}")
    return net.to(device), (f"IS/FID/KID: torch-fidelity {torch_fidelity.__version__} inception-v3-compat (TF "
                            f"Inception weights{', ' + Path(weights).name if weights else ''}), 2048-d pool features")


def fidelity_metrics(gen_features, gen_logits, real_features, real_stats):
    """IS, FID and KID with torch-fidelity's own functions and defaults (IS: 10 splits of the shuffled samples;
    FID: float64 covariances, float32 means as the reference TF code; KID: 100 subsets of min(1000, N) samples,
    cubic polynomial kernel), so that the numbers equal torch_fidelity.calculate_metrics on the same images.
    `real_stats`: the real side's FID statistics, which the caller computes once."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    n = min(len(gen_features), len(real_features))
    isc = isc_features_to_metric(gen_logits, splits=min(10, len(gen_logits)))  # fewer splits only below 10 samples
    fid = fid_statistics_to_metric(fid_features_to_statistics(gen_features), real_stats, verbose=False)
    out = {"is": isc["inception_score_mean"], "is_std": isc["inception_score_std"],
           "fid": fid["frechet_inception_distance"]}
    if n >= 2:  # KID's unbiased estimator needs two samples per subset
        kid = kid_features_to_metric(gen_features, real_features, verbose=False, kid_subset_size=min(1000, n))
        out.update(kid=kid["kernel_inception_distance_mean"], kid_std=kid["kernel_inception_distance_std"],
                   kid_subset_size=min(1000, n))
    return out


class Evaluator:
    """Computes the metrics of the README for generated images against one real data set.

    MNIST-like data (mnist, fashion-mnist, usps, fake): classifier-IS, classifier-FID (128-d
    penultimate features), the class histogram of the samples and, when the sampler says
    which class it asked for, the conditional accuracy. RGB data: IS, FID and KID through
    torch-fidelity's TF-ported Inception (`load_inception`), when it and its weights are there.
    Every result carries `eval_source`, `n_gen`, `n_real` and `real_split`: what produced it.
    `n_samples` generated images against `n_real` real training images (default as many).

    Building it draws nothing from the run's random streams (CPU and device): the whole
    constructor runs under fork_rng, so whether the classifier is cached or trained now, or
    the Inception weights are in the hub cache, never changes a seeded run.
    """

    def __init__(self, data, data_root, device, n_samples=10000, seed=0, n_real=None, inception_weights=None):
        self.device, self.n, self.seed = torch.device(device), n_samples, seed
        self.n_real = min(n_real or n_samples, len(data))
        with fork_rng(self.device):
            self.classifier, self.inception = None, None
            # A tiny image folder (or a checkpoint from before --eval-samples had its minimum): train anyway, say why
            # there are no metrics. The flags themselves refuse counts below the minimum.
            if min(self.n, self.n_real) < MIN_EVAL_IMAGES:
                self.source = (f"metrics skipped: IS and FID need at least {MIN_EVAL_IMAGES} generated and real images, "
                               f"not {self.n} and {self.n_real} ({data.name} has {len(data)})")
                return
            idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.seed))[:self.n_real]
            real = data.images[idx.to(data.images.device)]
            if data.name in DIGIT_LIKE:
                self.classifier = get_classifier(data.name, data_root, self.device)
                self.cls_size = NATIVE_SIZE[data.name]
                self.cls_real = feature_stats(self._classify(real)[0])
                self.source = f"cls_*: {data.name} CNN classifier (test acc {self.classifier.test_accuracy:.3f}), 128-d features"
            else:
                self.inception, self.source = load_inception(inception_weights, self.device)
                if self.inception is not None:
                    self.inc_real, _ = self._inception_features(real)
                    self.inc_real_stats = None

    @torch.no_grad()
    def _inception_features(self, images):
        """(2048-d features, unbiased logits) of uint8 images, in float32 on the CPU (torch-fidelity's layout)."""
        feats, logits = [], []
        # TF32 off (Ampere's default for cuDNN convolutions, and --no-amp's only effect here): the same numbers
        # in a run, in `common.py score` and on any GPU
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            for i in range(0, images.shape[0], 100):
                x = images[i:i + 100].to(self.device)
                if x.shape[1] == 1:  # grayscale: the same image in R, G and B
                    x = x.expand(-1, 3, -1, -1)
                f, g = self.inception(x)
                feats.append(f.float().cpu())
                logits.append(g.float().cpu())
        torch.backends.cuda.matmul.allow_tf32 = tf32
        return torch.cat(feats), torch.cat(logits)

    @torch.no_grad()
    def _classify(self, images):
        feats, probs = [], []
        for i in range(0, images.shape[0], 1000):
            x = images[i:i + 1000]
            x = to_float(x.cpu()) if x.dtype == torch.uint8 else x.float().cpu()
            if x.shape[-1] != self.cls_size:  # on the CPU: MPS has no antialiased resize in older torch
                x = F.interpolate(x, size=(self.cls_size, self.cls_size), mode="bilinear",
                                  antialias=True, align_corners=False)
            x = x.to(self.device)
            f = self.classifier.body(x)
            # To the CPU first, then float64: MPS has no float64.
            feats.append(f.cpu().double())
            probs.append(F.softmax(self.classifier.head(f).cpu().double(), 1))
        return torch.cat(feats).numpy(), torch.cat(probs)

    @torch.no_grad()
    def __call__(self, sample):
        """`sample(n, generator)` -> (images in [-1, 1], asked-for labels or None). Returns a dict."""
        if self.classifier is None and self.inception is None:
            return {}
        gen = torch.Generator(self.device).manual_seed(self.seed + 1)  # same noise at every evaluation
        images, labels = [], []
        for i in range(0, self.n, 500):
            x, y = sample(min(500, self.n - i), gen)
            images.append(to_uint8(x).cpu())  # score what a user would save: 8-bit images
            if y is not None:
                labels.append(y.cpu())
        return self.score(torch.cat(images), torch.cat(labels) if labels else None)

    @torch.no_grad()
    def score(self, images, labels=None):
        """The metrics of uint8 images (N, C, H, W) (and the labels they were asked for, if any)."""
        if self.classifier is None and self.inception is None:
            return {}
        out, split_gen = {}, torch.Generator().manual_seed(self.seed + 2)
        if self.classifier is not None:
            feats, probs = self._classify(images)
            out["cls_fid"] = frechet_distance(*feature_stats(feats), *self.cls_real)
            out["cls_is"], out["cls_is_std"] = inception_score(probs, 10, split_gen)
            pred = probs.argmax(1)
            out["cls_hist"] = (torch.bincount(pred, minlength=probs.shape[1]).double() / len(pred)).tolist()
            if labels is not None:
                out["cls_acc"] = (pred == labels.to(pred.device)).double().mean().item()
        if self.inception is not None:
            from torch_fidelity.metric_fid import fid_features_to_statistics
            self.inc_real_stats = self.inc_real_stats or fid_features_to_statistics(self.inc_real)
            out.update(fidelity_metrics(*self._inception_features(images), self.inc_real, self.inc_real_stats))
        out.update(eval_source=self.source, n_gen=len(images), n_real=self.n_real, real_split="train")
        return out


# ----------------------------------------------------------------------------------------------
# 5 Devices, precision and random streams
# ----------------------------------------------------------------------------------------------

def pick_device(name="auto", local_rank=None):
    """`auto` -> CUDA when present, else Apple MPS, else CPU. Turns on cuDNN autotuning on CUDA.
    Under torchrun (`local_rank` given): CUDA device `local_rank` of this machine, or the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        if local_rank is not None and name == "mps":
            name = "cpu"  # no multi-process backend drives MPS: several CPU processes (gloo)
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps asked for, but torch sees no MPS device")
    if name == "mps" and local_rank is not None:
        raise UsageError("torchrun with --device mps: PyTorch has no process-group backend for MPS; "
                         "run one process (python SCRIPT.py), or --device cpu")
    if name == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        if local_rank is not None:
            count = torch.cuda.device_count()
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            chosen = any(os.environ.get(v) for v in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"))
            if count == 1 and local_world > 1 and not chosen:  # (a per-process device choice shows one device each)
                raise UsageError(f"torchrun started {local_world} processes on this machine, but it has 1 CUDA "
                                 f"device: --nproc_per_node 1, or --device cpu")
            index = 0 if count == 1 else local_rank  # one visible device per process (CUDA_VISIBLE_DEVICES): cuda:0
            if index >= count:
                raise UsageError(f"torchrun started local rank {local_rank}, but this machine has {count} CUDA "
                                 f"devices: --nproc_per_node at most that")
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
    return torch.device(name)


def distributed_env():
    """(rank, number of processes, local rank) as torchrun sets them; (0, 1, None) for a plain `python` run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device, timeout_minutes=30):
    """Join torchrun's process group: NCCL between CUDA devices, gloo between CPU processes. The timeout is how long
    a process waits in a collective: for a machine that died (the others then stop with an error after that long,
    and the job can be requeued from the last checkpoint), and while rank 0 alone trains the evaluation classifier,
    computes the real images' Inception features or evaluates (--dist-timeout-minutes)."""
    import atexit
    import gc
    if not dist.is_initialized():
        # DDP's reducer and the process group sit in reference cycles, freed by the garbage collector; left to the
        # interpreter's shutdown, a gloo thread then releases the last all-reduce's tensors after Python has
        # stopped taking threads, and the process aborts ("terminate called without an active exception", about
        # 1 run in 4 here when one process had waited long). Collected at exit, before that point, they close.
        atexit.register(gc.collect)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)


def cpu_bf16_units():
    """The CPU's native bf16 instruction sets (AMX, AVX512-BF16) as torch sees them, or []."""
    return [unit for unit, test in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
            if getattr(torch.cpu, test, lambda: False)()]


def precision(device, enabled=True):
    """Decide once per run: bf16 autocast where the hardware computes bf16 natively, else float32.

    Returns (torch.bfloat16 or None, the reason in words). CUDA: compute capability >= 8 (Ampere
    on); `torch.cuda.is_bf16_supported()` is also True on V100/T4, where bf16 is emulated and
    slower. CPU: AMX or AVX512-BF16. MPS: float32 (bf16 support differs between Apple GPUs and
    was not measured here). bf16 needs no loss scaling, unlike float16.
    """
    if not enabled:
        return None, "float32 (--no-amp)"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return torch.bfloat16, f"bf16 autocast (CUDA compute capability {major}.{minor})"
        return None, f"float32 (CUDA compute capability {major}.{minor} < 8.0 has no native bf16)"
    if device.type == "cpu":
        units = cpu_bf16_units()
        if units:
            return torch.bfloat16, f"bf16 autocast (CPU with {' and '.join(units)})"
        return None, "float32 (this CPU has no AMX or AVX512-BF16; emulated bf16 is slower)"
    return None, f"float32 ({device.type})"


def device_settings(device, no_amp=False):
    """(autocast dtype or None, precision in words, fused Adam?, memory format) of a run on `device`."""
    amp_dtype, words = precision(device, not no_amp)
    if device.type == "cuda":  # cuDNN convolutions default to TF32 on Ampere: --no-amp means float32
        torch.backends.cudnn.allow_tf32 = not no_amp
    # fused Adam: one kernel per step for all parameters. channels_last (NHWC) for conv networks and batches:
    # 1.1-2x more images/s on this project's CPU (docs/results.md) and the layout tensor cores want on CUDA; MPS
    # keeps the default layout.
    memory_format = torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format
    return amp_dtype, words, device.type == "cuda", memory_format


def fork_rng(device):
    """A context that restores the CPU generator and that of `device` (CUDA or MPS) on exit."""
    device = torch.device(device)
    if device.type in ("cuda", "mps"):
        return torch.random.fork_rng(devices=[device], device_type=device.type)
    return torch.random.fork_rng(devices=[])


def rng_state(device="cpu"):
    """The CPU generator's state and that of the training device, the one this process draws from (under
    torchrun, every process's device generator is in the same state: see Run.randn)."""
    device = torch.device(device)
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device="cpu"):
    """Restore rng_state()'s CPU state, and its device state into this process's device of the same type."""
    device = torch.device(device)
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # checkpoints before one state per process: every device's state
        cuda = cuda[0] if cuda else None
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    if device.type == "mps" and state.get("mps") is not None:
        torch.mps.set_rng_state(state["mps"])


# ----------------------------------------------------------------------------------------------
# 6 A run, part 1: checkpoints (written atomically) and the run directory
# ----------------------------------------------------------------------------------------------

def write_atomic(path, data):
    """Replace the file `path` by `data` (bytes or text) atomically: a temp file no other process can hold (see
    _unique), flushed to disk, then renamed over the old file, so that a crash, a power cut, a full disk or a second
    Ctrl-C mid-write keeps the previous file, and no torn temp file stays behind."""
    tmp = _unique(Path(path), "tmp")
    try:
        _fsync_write(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(path, state):
    """Write atomically (write_atomic). torch serialises into memory and Python writes the file: a full disk or a
    file-size limit is then an OSError that names its cause (torch.save into a file turns it into a RuntimeError
    about stream positions)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getbuffer())


def load_checkpoint(path, script):
    """Load a checkpoint written by `script`; any other file is a UsageError with a clear reason."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        raise UsageError(f"{path} is not a PyTorch checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UsageError(f"checkpoint {path} cannot be read (truncated or damaged)") from None
    if not isinstance(state, dict) or "script" not in state:
        raise UsageError(f"{path} is not a checkpoint of these scripts")
    if state["script"] != script:
        raise UsageError(f"checkpoint {path} was written by {state['script']}.py, not {script}.py")
    bad = non_finite(state)
    if bad:  # saved runs are checked first (save_run): so the file was damaged after it was written
        raise UsageError(f"checkpoint {path} is damaged: {bad} holds NaN or inf; resume from an earlier copy")
    return state


def non_finite(state, prefix=""):
    """The name of the first floating-point tensor in a (nested) state that holds NaN or inf, or None."""
    for k, v in state.items():
        if isinstance(v, dict):
            bad = non_finite(v, f"{prefix}{k}.")
            if bad:
                return bad
        elif torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
            return f"{prefix}{k}"
    return None


def data_identity(data):
    """What identifies a run's data, kept in its checkpoint: a resume on other data is refused (data_changed)."""
    labels = hashlib.sha256(data.labels.cpu().numpy().tobytes()).hexdigest()[:16]  # each image's class, in order
    return {"dataset": data.name, "images": len(data), "num_classes": data.num_classes, "labels": labels,
            "channels": data.channels, "image_size": data.image_size, "class_names": data.class_names,
            "files": data.files}


def data_changed(saved, now, args):
    """Why a resume on this data is refused, or None: a class count that changes the networks always, other
    differences (images added or removed, classes reassigned, files renamed or resized) unless
    --allow-changed-data."""
    keys = [k for k in ("dataset", "num_classes", "images", "class_names", "labels", "files")
            if saved.get(k) is not None and saved[k] != now[k]]
    if not keys:
        return None
    said = {"labels": "the images' classes differ", "files": "files changed: their names or sizes"}.get(
        keys[0], f"{keys[0].replace('_', ' ')} {saved[keys[0]]} then, {now[keys[0]]} now")  # the first difference
    if "num_classes" in keys and saved.get("conditional"):
        return (f"--resume: the data changed ({said}) and the networks are built for "
                f"{saved['num_classes']} classes: resume on the checkpoint's data, or start a new run")
    if not args.allow_changed_data:
        return (f"--resume: the data differs from the checkpoint's ({said}); resume on the same data, "
                f"or add --allow-changed-data to go on with this data")
    return None


def load_states(objects, state, path, script):
    """Load what a checkpoint holds into `objects` (networks, optimisers, schedulers, EMA: by name)."""
    for name, obj in objects.items():
        if isinstance(obj, torch.optim.Optimizer):
            load_optimizer(obj, state[name])
            continue
        missing = set(obj.state_dict()) - set(state[name])
        if missing:  # e.g. D's first and last biases, which older versions of the DCGAN-family D's lacked
            raise UsageError(f"{path}: its {name} lacks {', '.join(sorted(missing)[:3])}: it was written by an "
                             f"older version of {script}.py's networks; resume it with the version that wrote it")
        obj.load_state_dict(state[name])


def check_batch_norm_1d(objects, batch_size, world, script):
    """A BatchNorm1d's training statistics over one image are undefined (torch raises deep in the forward)."""
    nets = [m for obj in objects.values() if isinstance(obj, nn.Module) for m in obj.modules()]
    if any(isinstance(m, nn.BatchNorm1d) for m in nets) and batch_size // world < 2:
        raise UsageError(f"--batch-size {batch_size}: {script}'s networks have BatchNorm1d layers, which train on "
                         f"at least 2 images per process (--batch-size {2 * world} or more)")


def load_optimizer(opt, state):
    """Load an optimiser's state saved on any device: keep this device's `fused` choice (a CUDA run's fused Adam
    cannot step on a CPU or a Mac), put Adam's step counter where this device's choice wants it (torch places it
    by the SAVED flags: a CPU checkpoint's CPU counter would stop CUDA's fused Adam, a CUDA checkpoint's device
    counter would cost an MPS sync per parameter per step), and give each state tensor its parameter's layout."""
    fused = [g.get("fused") for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, f in zip(opt.param_groups, fused):
        if "fused" in group:
            group["fused"] = f
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if k == "step" and torch.is_tensor(v):
                    on_device = group.get("fused") or group.get("capturable")
                    opt.state[p][k] = v.to(dtype=torch.float32, device=p.device if on_device else "cpu")
                elif torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


RUN_FILES = ("args.json", "metrics.jsonl", "checkpoint.pt", "progress.gif", "generated.npz")
RUN_PICTURES = ("losses.png", "interpolation.png", "class_histogram.png", "predictions.png",
                "attention.png")  # and more per script


def out_dir_problem(out, args, state):
    """What is wrong with --out (or --inception-weights) for this run, in words, or None."""
    if args.inception_weights and not Path(args.inception_weights).is_file():
        return f"--inception-weights {args.inception_weights} does not exist"
    made = [p for p in [out, *out.parents] if not p.exists()]  # what mkdir makes (runs/ too), undone if refused
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create --out {out} ({e.strerror or type(e).__name__})"
    if not os.access(out, os.W_OK):
        return f"cannot write into --out {out}"
    used = any((out / f).exists() for f in RUN_FILES[:3])
    resuming_here = state is not None and out.resolve() == Path(args.resume).resolve().parent
    for p in made:  # made again by prepare_out_dir: a run that fails before (bad data, size) leaves no empty folder
        try:
            p.rmdir()
        except OSError:  # another job's run folder appeared in it meanwhile
            break
    if used and not resuming_here and not args.overwrite:
        return (f"--out {out} already holds a run: choose another --out, continue it with "
                f"--resume {out / 'checkpoint.pt'}, or replace it with --overwrite")
    return None


def prepare_out_dir(out, args, state, step, resolved):
    """A fresh run's --out (with --overwrite: only the files a run writes are removed, never the folder), or a
    resumed run's: the log up to the checkpoint's step (taken along when resumed elsewhere), no later grids.
    Writes args.json with `resolved` (device, precision, ...)."""
    if state is None:
        if args.overwrite:
            for p in [out / f for f in RUN_FILES + RUN_PICTURES] + [*out.glob("samples/step_*.png")]:
                p.unlink(missing_ok=True)
        rows = []
    else:
        old = Path(args.resume).parent / "metrics.jsonl"
        rows = [r for r in read_metrics(old, warn=True) if r["step"] <= step] if old.exists() else []
        for p in out.glob("samples/step_*.png"):
            if int(p.stem[5:]) > step:
                p.unlink()
    (out / "samples").mkdir(parents=True, exist_ok=True)
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_atomic(out / "args.json", json.dumps({**flags(args), "resolved": resolved}, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# 6 A run, part 2: signals that stop it
# ----------------------------------------------------------------------------------------------

# Ctrl-C, and the signals schedulers send before they end a job (SLURM, Kubernetes and torchrun: SIGTERM; SLURM's
# --signal=USR1@120 warning). SIGUSR1 is not on Windows.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


class Stopped(BaseException):
    """A stop signal before the training loop began (while the data is decoded or the evaluation classifier trains):
    the work in progress is left as it is (a cache build continues next time), the script says so in one line and
    exits with 128 + the signal's number. A BaseException, as KeyboardInterrupt: no `except Exception` swallows it."""

    def __init__(self, signum):
        super().__init__(f"stopped by {signal.Signals(signum).name} before training began")
        self.signum = signum


# What the scripts' main() turns into one line (fail): bad input, memory that cannot be had, a signal before the loop.
ENDINGS = (UsageError, RuntimeError, MemoryError, Stopped)


class StopSignals:
    """Installed from the run's first moment. Before the loop (`raising`), a stop signal raises Stopped where the
    program is; in the loop it only sets `caught` (its number): the loop finishes its step, the run saves its
    checkpoint and exits with 128 + the number (130, 143, 138), the shell's code for "ended by that signal"."""

    installed = []  # of every process: fail() restores them

    def __init__(self):
        self.caught, self._old, self.raising = 0, {}, True

    def install(self):
        try:
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._on_signal)
            StopSignals.installed.append(self)
        except ValueError:  # not the main thread: leave the signals alone
            self.restore()

    def _on_signal(self, signum, frame):
        first = not self.caught
        self.caught = self.caught or signum
        if self.raising and first:
            raise Stopped(signum)
        # A second Ctrl-C ends the process as it would without us (KeyboardInterrupt): the user typed it twice.
        # SIGTERM and SIGUSR1 may arrive twice by design (SLURM signals every process of a job step and torchrun
        # forwards the same signal again): a repeat is ignored; a scheduler follows its grace time with SIGKILL.
        if signum == signal.SIGINT:
            signal.signal(signum, signal.default_int_handler)

    def restore(self):
        for sig, handler in reversed(self._old.items()):  # also after an error: a notebook's next Ctrl-C must work
            signal.signal(sig, handler)
        self._old = {}
        if self in StopSignals.installed:
            StopSignals.installed.remove(self)

    @staticmethod
    def restore_all():
        for s in reversed(StopSignals.installed):
            s.restore()

    @property
    def name(self):
        return signal.Signals(self.caught).name


# ----------------------------------------------------------------------------------------------
# 6 A run, part 3: torchrun's processes (one device each), their shares and their agreement
# ----------------------------------------------------------------------------------------------

class Processes:
    """The processes that train one model (one, for a plain `python` run). Each has its device, takes its share of
    every batch (`--batch-size` is the whole batch) and of every noise draw (`share`: the whole draw is made in
    every process, each keeps its rows, so the run is the same for any number of processes); they agree on
    stopping at log steps (`agree`); rank 0 alone writes, samples and evaluates, with the plain networks."""

    def __init__(self, args):
        self.rank, self.world, local_rank = distributed_env()
        self.device = pick_device(args.device, local_rank)
        if self.world > 1:
            init_distributed(self.device, args.dist_timeout_minutes)
            if args.batch_size % self.world:
                raise UsageError(f"--batch-size {args.batch_size} (the whole batch) does not split evenly over "
                                 f"{self.world} processes")
        # SyncBatchNorm needs CUDA (PyTorch has none for CPU processes)
        self.sync_bn = self.world > 1 and self.device.type == "cuda" and not args.no_sync_bn

    def distribute(self, net):
        """`net` wrapped in DistributedDataParallel under torchrun (its gradients averaged over the processes in
        backward), `net` itself in a single process. No buffer sync per forward, so that rank 0 may sample alone
        without a collective: spectral norm's u stays equal in every process (the same power iteration on the
        same weights), SyncBatchNorm's statistics too; per-process BatchNorm statistics (CPU processes,
        --no-sync-bn) differ, and rank 0's are the ones saved and sampled with."""
        if self.world == 1:
            return net
        if self.sync_bn:  # in place: `net`'s BatchNorms become SyncBatchNorms, with the same parameters
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        from torch.nn.parallel import DistributedDataParallel as DDP
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})  # the older name
        return DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None, **no_sync)

    def per_process(self, n, what="--batch-size"):
        """This process's share of a batch of n (n itself in a single process)."""
        if n % self.world:
            raise UsageError(f"{what} {n} does not split evenly over {self.world} processes")
        return n // self.world

    def share(self, x):
        """This process's rows of a draw for the whole batch."""
        k = self.per_process(x.shape[0], "a batch of")
        return x[self.rank * k:(self.rank + 1) * k]

    def agree(self, *values):
        """The largest of each value over the processes (a collective: every process calls it at the same step)."""
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], device=self.device)
        dist.all_reduce(t, dist.ReduceOp.MAX)
        return t.tolist()

    def stop(self, signals, timed_out):
        """Whether to stop now: a signal caught or the time is up, in any process (its machine's clock or signal
        stops them all, for the same reason). From locals: a signal handled during the all-reduce must neither be
        overwritten by the agreed 0 nor stop this process alone (it is agreed on at the next log step)."""
        if self.world == 1:
            return bool(signals.caught) or timed_out
        caught, timed_out = self.agree(signals.caught, timed_out)
        signals.caught = signals.caught or int(caught)
        return bool(caught) or bool(timed_out)

    def from_rank0(self, obj):
        """Rank 0's `obj` in every process."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# ----------------------------------------------------------------------------------------------
# 6 A run, part 4: watchers. NaN stops the run; D's win and look-alike samples are said once
# ----------------------------------------------------------------------------------------------

def check_weights(objects, step, procs=None):
    """Diverged if a model's weights or statistics are non-finite. With `procs`, every process takes the verdict of
    all (weights are equal in every process, BatchNorm statistics need not be)."""
    tensors = {n: [*obj.parameters(), *obj.buffers()] for n, obj in objects.items() if isinstance(obj, nn.Module)}
    bad = [torch.stack([~torch.isfinite(t).all() for t in ts]).any() for ts in tensors.values()]
    bad = torch.stack(bad).float().tolist()  # one sync
    if procs is not None:
        bad = procs.agree(*bad)
    for name, b in zip(tensors, bad):
        if b:
            raise Diverged(f"{name}'s weights or statistics became non-finite by step {step}")


# D has won when its loss stays this close to its floor (0 for cross-entropy and hinge) for this many log lines
# in a row while G's loss climbs: D then separates real from fake with certainty, G's gradient vanishes
# (cross-entropy) or points nowhere useful, and the samples stop improving. A healthy D's loss sits near
# 2 log 2 = 1.39 (cross-entropy at equilibrium) and rarely below 0.3; a collapsed cgan run had 1e-3 by step 1000.
D_WON_LOSS, D_WON_LINES = 0.01, 5
# G's samples all look alike (mode collapse) when the sample grid's spread (`spread`: how much its images differ
# in their coarse layout; within each class for a conditional G) stays below this fraction of the real images'
# at every grid for ALIKE_STEPS steps: an untrained G's samples look alike too, for a hundred steps or two. Judged
# whatever the losses say: a G can collapse while D's loss looks healthy. Measurements behind 0.2: docs/seeds.md.
ALIKE, ALIKE_STEPS = 0.2, 500


def real_spread(data, seed, conditional):
    """The yardstick of look-alike samples: the spread of 1024 real images (within each class for a conditional
    G), or None when no class has 2 of them (the check is then off)."""
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:1024]
    idx = idx.sort().values  # in file order: a memory map reads forward
    real = spread(data.images[idx.to(data.images.device)], data.labels[idx.to(data.labels.device)] if conditional
                  else None)
    return real if math.isfinite(real) and real > 0 else None


class Watchers:
    """Says, once, what a user would want to know while training goes on: D has won (`losses`, at log steps, in
    every process: they see the same averaged statistics) and G's samples all look alike (`grid`, at each sample
    grid, rank 0). Each is one line on stderr with the script's remedies and a row in metrics.jsonl (`log`), and
    is said again only after it recovered. Training goes on: the user decides."""

    def __init__(self, script, args, log, d_loss_floor=None, real_spread=None, fixed_y=None, rank=0):
        self.script, self.args, self.log, self.rank = script, args, log, rank
        self.d_loss_floor, self.real_spread, self.fixed_y = d_loss_floor, real_spread, fixed_y
        self.step, self._d_window, self._d_won, self._alike, self._alike_since = 0, [], False, False, None

    def losses(self, step, stats):
        """D has won (D_WON_LOSS); off for a critic's loss, which has no floor (d_loss_floor None)."""
        self.step = step
        if self.d_loss_floor is None or "loss_d" not in stats or "loss_g" not in stats:
            return
        w = self._d_window
        w.append((stats["loss_d"] - self.d_loss_floor, stats["loss_g"]))
        del w[:-D_WON_LINES]
        if self._d_won:
            self._d_won = min(d for d, _ in w) < 10 * D_WON_LOSS  # re-armed once D's loss is well off its floor
            return
        if len(w) < D_WON_LINES or max(d for d, _ in w) >= D_WON_LOSS or w[-1][1] <= w[0][1]:
            return
        self._d_won = True
        if self.rank == 0:
            print(f"{self.script}.py: D has won at step {step}: its loss has stayed below {D_WON_LOSS} for "
                  f"{D_WON_LINES} log lines while G's rose from {w[0][1]:.3g} to {w[-1][1]:.3g}, so G learns little "
                  f"more. Training goes on; what usually helps: {self.remedies()}", file=sys.stderr, flush=True)
        self.log({"d_won": {"loss_d": w[-1][0] + self.d_loss_floor, "loss_g_from": w[0][1], "loss_g_to": w[-1][1]}})

    def grid(self, step, images):
        """The grid's samples have all looked alike (ALIKE) for ALIKE_STEPS steps. A conditional grid (10 noises per
        class) is judged within each class: a G that draws one image per class has collapsed too. Re-armed when
        the spread is back above twice ALIKE."""
        self.step = step
        if self.real_spread is None:
            return
        ratio = spread(images, self.fixed_y) / self.real_spread
        if self._alike:
            self._alike = ratio < 2 * ALIKE
            return
        if ratio >= ALIKE:
            self._alike_since = None
            return
        if self._alike_since is None:
            self._alike_since = step
        if step - self._alike_since < ALIKE_STEPS:
            return
        since, self._alike, self._alike_since = self._alike_since, True, None
        within = " within each class" if self.fixed_y is not None else ""
        print(f"{self.script}.py: G's samples all look alike at step {step}: since step {since} its sample "
              f"grids have varied{within} less than {ALIKE} times as much as real images do (now {ratio:.2g}: mode "
              f"collapse). Training goes on; what usually helps: {self.remedies()}", file=sys.stderr, flush=True)
        self.log({"alike": {"spread": ratio}})

    def state_dict(self):  # in the checkpoint: a resumed run neither repeats a verdict nor restarts its count
        return {"d_window": [list(w) for w in self._d_window], "d_won": self._d_won, "alike": self._alike,
                "alike_since": self._alike_since}

    def load_state_dict(self, state):
        self._d_window = [tuple(w) for w in state["d_window"]]
        self._d_won, self._alike, self._alike_since = state["d_won"], state["alike"], state["alike_since"]

    def remedies(self):
        a = self.args
        tries = [f"a lower --lr-d (now {a.lr_d:g})" if "lr_d" in vars(a) else "",
                 f"fewer D steps (--n-dis, now {a.n_dis})" if getattr(a, "n_dis", 1) > 1 else "",
                 {"none": "spectral norm on D (--spectral-norm d)", "g": "spectral norm on D as well (--spectral-norm "
                  "both)"}.get(getattr(a, "spectral_norm", None), ""),
                 "another --seed"]
        return ", ".join(t for t in tries if t)


# ----------------------------------------------------------------------------------------------
# 6 A run, part 5: statistics, metrics.jsonl and the progress line
# ----------------------------------------------------------------------------------------------

class Meter:
    """Sums per-step statistics on the device; `.read()` syncs once and returns each one's mean.

    A statistic given only at some steps (e.g. one computed at log steps) is averaged over those.
    """

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, **stats):
        for k, v in stats.items():
            v = torch.as_tensor(v).detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def read(self, world=1):
        """Each statistic's mean; under torchrun (world > 1) also averaged over the processes (a collective:
        every process calls it at the same step, with the same statistics)."""
        keys = list(self.sums)
        values = torch.stack([(self.sums[k] / self.counts[k]).to(self.sums[keys[0]].device) for k in keys])
        if world > 1:
            dist.all_reduce(values)
            values /= world
        self.sums, self.counts = {}, {}
        return dict(zip(keys, values.tolist()))


class MetricsLog:
    """Rows of metrics.jsonl (step, epoch, the record, elapsed time) and a progress line on stdout. A row of
    training statistics also gets the real images/s since the last such row, not counting the time spent saving
    and evaluating (`pause`)."""

    def __init__(self, path, script, batches, total, max_seconds, step, rank):
        self.path, self.script, self.batches, self.total, self.max_seconds = path, script, batches, total, max_seconds
        self.tty = sys.stdout.isatty() and rank == 0
        self._last_print = 0.0
        self.restart(step)

    def restart(self, step):
        """The clock starts (again) now, at `step`."""
        self.t0 = self._t_rate = time.time()
        self.paused = self._paused_rate = 0.0
        self.first_step, self._step_rate, self._pos_rate = step, step, self.batches.position

    def elapsed(self):
        return time.time() - self.t0

    @contextlib.contextmanager
    def pause(self):
        t = time.time()
        try:
            yield
        finally:
            self.paused += time.time() - t

    def write(self, step, record, rate=False):
        now = time.time()
        record = {"step": step, "epoch": self.batches.epoch, **record}
        if rate and step > self._step_rate:
            images = (self.batches.position - self._pos_rate) * self.batches.batch_size
            work = (now - self._t_rate) - (self.paused - self._paused_rate)
            record["images_per_s"] = round(images / max(work, 1e-9), 1)
            self._t_rate, self._step_rate, self._pos_rate = now, step, self.batches.position
            self._paused_rate = self.paused
        record["elapsed_s"] = round(self.elapsed(), 1)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._progress(step, record)

    def _progress(self, step, record):
        left = (self.total - step) * (self.elapsed() / max(step - self.first_step, 1))
        if self.max_seconds is not None:
            left = min(left, self.max_seconds - self.elapsed())
        losses = " ".join(f"{k}={v:.3g}" for k, v in record.items()
                          if isinstance(v, float) and k.startswith(("loss", "w_", "cls_fid", "fid")))
        line = (f"{self.script} step {step}/{self.total if self.total < 10**12 else '?'} ep {self.batches.epoch} "
                f"{losses} {record.get('images_per_s', 0):.0f} img/s ETA {left / 60:.1f} min")
        if self.tty:
            print("\r" + line[:150].ljust(150), end="", flush=True)
        elif time.time() - self._last_print > 30:  # logs and CI: a line every 30 s at most
            print(line, flush=True)
            self._last_print = time.time()


# ----------------------------------------------------------------------------------------------
# 6 A run, part 6: Run, which the scripts use; its finish; --generate
# ----------------------------------------------------------------------------------------------

class Run:
    """One training run, in the few moves every script makes (its own file then shows only its model):

        run = common.Run(args, SCRIPT)  # --resume, device, precision, --out checked; seeds torch
        batches = run.restore(data, G=G, D=D, opt_g=opt_g, opt_d=opt_d)  # what checkpoint.pt holds
        step = run.start(total, sample, panels, latent_dim)  # evaluator, fixed grid noise, args.json
        with run:  # a signal ends the loop after its step; NaN stops the run (exit 1)
            while not run.should_stop(step):
                ...  # D and G steps (the script's story); step += 1
                run.end_step(step, loss_d=loss_d, ...)  # log, sample + checkpoint, evaluate: as scheduled
        return run.finish()  # final evaluation, plots, interpolation, predictions, summary

    `sample(z, y)`: G's images for noise z (and labels y), G in eval mode. Parts: part 1's checkpoint and --out
    functions, StopSignals, Processes (`distribute`, `randn`, `rand`, `randint`; `procs`), Watchers, MetricsLog."""

    def __init__(self, args, script):
        procs = Processes(args) if args.resume == "auto" else None  # the command line's device: the original's
        args, self.state = resume(args, script, procs)
        self.procs = procs or Processes(args)  # a bare --resume PATH: on the checkpoint's device unless typed
        self.rank, self.world, self.device = self.procs.rank, self.procs.world, self.procs.device
        self.amp_dtype, self.precision, self.fused, self.memory_format = device_settings(self.device, args.no_amp)
        args.image_size = args.image_size or NATIVE_SIZE[args.dataset]
        if args.out is None:
            args.out = str(Path("runs") / f"{script}-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.args, self.script, self.dir = args, script, Path(args.out)
        self.step = self.state["step"] if self.state else 0
        self.saved_step = self.step if self.state else None  # the checkpoint on disk
        self.metrics, self._eval_step, self.meter = {}, None, Meter()
        error = self.procs.from_rank0(out_dir_problem(self.dir, args, self.state) if self.rank == 0 else None)
        if error:  # in every process, not only rank 0
            raise UsageError(error)
        if_finished(self, args.max_steps)  # before the data is loaded, which may take long
        torch.manual_seed(args.seed)  # every generator (CPU, CUDA, MPS); the same in every process: the same networks
        self.signals = StopSignals()
        self.signals.install()  # from here: a scheduler's SIGTERM may come while the data is decoded

    def restore(self, data, **objects):
        """Remember what checkpoint.pt holds (models, optimisers, schedulers: anything with a state_dict);
        with --resume, load their states and the RNG states. Returns the data stream at the run's position."""
        self.data, self.objects, self.data_id = data, objects, data_identity(data)
        check_batch_norm_1d(objects, self.args.batch_size, self.world, self.script)
        if self.state is not None:
            error = self.procs.from_rank0(self.rank == 0 and data_changed(self.state["data"], self.data_id, self.args))
            if error:  # rank 0's data decides for all (per-node copies of it may differ)
                raise UsageError(error)
            load_states(objects, self.state, self.args.resume, self.script)
            set_rng_state(self.state["rng"], self.device)  # last: building the networks drew from the RNG
        self.batches = Batches(data, self.args.batch_size, self.args.seed, self.state["position"] if self.state else 0,
                               self.device, self.memory_format, self.rank, self.world)
        return self.batches

    def distribute(self, net):  # see Processes.distribute
        return self.procs.distribute(net)

    def randn(self, n, *shape):  # normal noise for a batch of n: this process's rows of one draw made alike in all
        return self.procs.share(torch.randn(n, *shape, device=self.device))

    def rand(self, n, *shape):  # uniform [0, 1) draws for a batch of n, shared out as `randn`
        return self.procs.share(torch.rand(n, *shape, device=self.device))

    def randint(self, high, n):  # labels in [0, high) for a batch of n, shared out as `randn`
        return self.procs.share(torch.randint(0, high, (n,), device=self.device))

    def autocast(self):
        """bf16 autocast where `precision` chose it, else a no-op."""
        return contextlib.nullcontext() if self.amp_dtype is None else torch.autocast(self.device.type, self.amp_dtype)

    def noise(self, n, generator=None):
        return torch.randn(n, self.latent_dim, device=self.device, generator=generator)

    def start(self, total, sample, panels, latent_dim, num_classes=None, d_loss_floor=None):
        """Set the schedule's length and what it draws with; build the evaluator; write args.json. Returns the step.
        `d_loss_floor`: the least value D's loss can take (0 for cross-entropy and hinge losses), to say when D
        has won; None for a critic's loss, which has no floor (Wasserstein)."""
        self.total, self.sample, self.panels, self.num_classes, self.latent_dim = total, sample, panels, num_classes, latent_dim
        if_finished(self, total)  # --epochs may end it before --max-steps
        # The sample grids' noise: 64, or one row of the same 10 per class; its own generator shifts no training stream
        g = torch.Generator(self.device).manual_seed(self.args.seed + 4)
        z = self.noise(10, g).repeat(num_classes, 1) if num_classes else self.noise(64, g)
        self.fixed_z = self.state["fixed_z"].to(self.device) if self.state is not None else z
        self.fixed_y = torch.arange(num_classes, device=self.device).repeat_interleave(10) if num_classes else None
        self.watch = Watchers(self.script, self.args, self.log, d_loss_floor, None, self.fixed_y, self.rank)
        if self.state is not None and "watch" in self.state:
            self.watch.load_state_dict(self.state["watch"])
        max_seconds = None if self.args.max_minutes is None else 60 * self.args.max_minutes
        self.logfile = MetricsLog(self.dir / "metrics.jsonl", self.script, self.batches, total, max_seconds, self.step,
                                  self.rank)
        if self.rank == 0:  # rank 0 alone evaluates and writes
            start_rank0(self)
        return self.step

    # -- the loop ---------------------------------------------------------------------------------
    def __enter__(self):
        begin_loop(self)
        return self

    def should_stop(self, step):
        if step >= self.total:
            return True
        if self.world > 1 and step % self.args.log_every:  # processes agree on the clock and signals at log steps
            return False
        timed_out = self.logfile.max_seconds is not None and self.logfile.elapsed() >= self.logfile.max_seconds
        return self.procs.stop(self.signals, timed_out)

    def end_step(self, step, **stats):
        """After each generator step: collect the step's statistics (tensors, left on the device), then log,
        sample and checkpoint, and evaluate when their steps come. Only log steps sync with the device."""
        self.step = step
        self.meter.add(**stats)
        log_step = step % self.args.log_every == 0
        if log_step:
            self._log_stats()
        sample = step % self.args.sample_every == 0
        # --checkpoint-minutes: at a log step, when that much wall clock has passed since the last save (rank 0's
        # clock decides for every process). No sample grid: grids between the --sample-every steps would make
        # progress.gif uneven.
        timed = (not sample and self.args.checkpoint_minutes and log_step and self.procs.agree(
            self.rank == 0 and time.time() - self._t_saved >= 60 * self.args.checkpoint_minutes)[0])
        if (sample or timed) and self.world > 1:
            check_weights(self.objects, step, self.procs)  # before rank 0 saves: all processes stop together on NaN
        if self.rank:  # the others go on training while rank 0 saves and evaluates
            return
        if sample or timed:
            save_run(self, grid=sample)
        if self.args.eval_every and step % self.args.eval_every == 0 and step < self.total:
            evaluate_run(self)

    def _log_stats(self):
        stats = self.meter.read(self.world)  # the one host sync of a log step (averaged over the processes)
        bad = [k for k, v in stats.items() if k.startswith("loss") and not math.isfinite(v)]
        if bad:  # the same verdict in every process
            raise Diverged(f"{', '.join(bad)} became non-finite at step {self.step}")
        self.log(stats, rate=True)
        self.watch.losses(self.step, stats)

    def log(self, record, rate=False):
        """Append one row to metrics.jsonl (rank 0 only); `rate`: training statistics, which get images/s."""
        if self.rank == 0:
            self.logfile.write(self.step, record, rate)

    def __exit__(self, kind, err, tb):
        return end_run(self, kind, err)

    def finish(self):
        """Final evaluation (unless this step was just evaluated), plots, interpolation.png, predictions.png
        (MNIST-like data), and the one-line summary. Returns the run directory. Rank 0 only. The checkpoint of the
        last step is already saved (`__exit__`)."""
        return finish_run(self) if self.rank == 0 else self.dir


def begin_loop(run):
    """Run.__enter__: from here a signal ends the loop after its step, with a checkpoint. A fresh run's checkpoint
    of step 0; under torchrun the clocks start together (not while rank 0 still trains its classifier)."""
    run.signals.raising = False
    if run.state is None and run.rank == 0:
        try:
            save_run(run)
        except OSError as e:
            cannot_write(run, e)
    if run.world > 1:
        try:
            dist.barrier()
        except Exception:  # a peer ended: by the signal that this process caught too, or by its own error
            if not run.signals.caught:
                raise
            print(f"{run.script}.py: stopped by {run.signals.name} before training began (another process ended "
                  f"first)", file=sys.stderr)
            raise SystemExit(128 + run.signals.caught) from None
    run.logfile.restart(run.step)
    run._t_saved = time.time()


def if_finished(run, total):
    """A requeue (--resume auto) of a run that reached its length: say so, exit 0, write nothing."""
    if run.state is None or not run.args._auto or not total or run.step < total:
        return
    if run.rank == 0:
        print(f"{run.script}: the run in {run.dir} is finished (step {run.step} of {total}); nothing to do")
    if run.world > 1:
        dist.destroy_process_group()
    StopSignals.restore_all()
    raise SystemExit(0)


def evaluate_run(run):
    """The evaluator's metrics of G now, logged (the time it takes is not training time)."""
    def sample_n(n, generator):
        y = balanced_labels(n, run.num_classes, run.device) if run.num_classes else None
        return run.sample(run.noise(n, generator), y), y
    with run.logfile.pause():
        run.metrics, run._eval_step = run.evaluator(sample_n), run.step
        if run.metrics:
            run.log(run.metrics)
    return run.metrics


def save_run(run, grid=True):
    """checkpoint.pt (everything needed to continue exactly) and, with `grid`, the sample grid of this step."""
    with run.logfile.pause():
        if run.step > 0:  # never overwrite the last good checkpoint with a diverged model
            check_weights(run.objects, run.step)
        images = run.sample(run.fixed_z, run.fixed_y) if grid else None  # G in eval mode: no training state moves
        if grid and run.step > 0:
            run.watch.grid(run.step, images)  # before the checkpoint, which holds the watchers' state
        save_checkpoint(run.dir / "checkpoint.pt", {
            "script": run.script, "args": flags(run.args), "step": run.step, "position": run.batches.position,
            "data": {**run.data_id, "conditional": bool(run.num_classes)},
            "rng": rng_state(run.device), "fixed_z": run.fixed_z, "watch": run.watch.state_dict(),
            **{k: v.state_dict() for k, v in run.objects.items()}})
        run.saved_step, run._t_saved = run.step, time.time()
        if grid:
            save_grid(images, run.dir / "samples" / f"step_{run.step:07d}.png", nrow=10 if run.num_classes else 8)


def start_rank0(run):
    """Run.start's part for rank 0: the look-alike yardstick, the evaluator, --out's files."""
    run.watch.real_spread = real_spread(run.data, run.args.seed + 5, bool(run.num_classes))
    run.evaluator = Evaluator(run.data, run.args.data_root, run.device, run.args.eval_samples, run.args.seed, run.args.eval_real,
                              run.args.inception_weights)
    resolved = {"device": str(run.device), "precision": run.precision, "torch": torch.__version__,
                "data": run.data.where}
    try:
        prepare_out_dir(run.dir, run.args, run.state, run.step, resolved)
    except OSError as e:
        cannot_write(run, e)
    if run.world > 1:
        print(f"{run.script}: {run.world} processes ({run.device.type}, "
              f"{'SyncBatchNorm' if run.procs.sync_bn else 'BatchNorm statistics per process'}), "
              f"{run.batches.local} images per process of each --batch-size {run.args.batch_size}", flush=True)


def cannot_write(run, e):
    """A file operation failed (a full disk, a quota, a read-only file system): one line, exit 1. The checkpoint
    on disk is the last one saved in full (save_checkpoint replaces it only by a complete file)."""
    run.signals.restore()
    kept = (f"last good checkpoint: {run.dir / 'checkpoint.pt'} (step {run.saved_step})"
            if run.saved_step is not None else "no checkpoint was saved")
    print(f"{run.script}.py: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}; stopped at "
          f"step {run.step}, {kept}", file=sys.stderr)
    raise SystemExit(1) from None


def plot_run(run):
    plot_metrics(run.dir / "metrics.jsonl", run.dir / "losses.png", run.panels)
    plot_class_histogram(run.dir / "metrics.jsonl", run.dir / "class_histogram.png",
                         CLASS_NAMES.get(run.args.dataset))
    make_gif(run.dir / "samples", run.dir / "progress.gif")


def end_run(run, kind, err):
    """How the loop ended decides what happens (Run.__exit__): after the last step, the last statistics and the
    checkpoint of the last step; after a signal, that too, then exit 128 + its number; on NaN, the last good
    checkpoint stays and the run exits 1; on a failed write, one line and exit 1. The signal handlers are restored
    only at the end: a repeated SIGTERM during the final save must not kill it."""
    try:
        if run.logfile.tty:
            print()
        if kind is not None and run.signals.caught and run.world > 1 and not issubclass(kind, (Diverged, OSError)):
            # Under torchrun a signal also comes when torchrun ends the survivors of a process that failed: the
            # next collective then fails here (a peer is gone). Nothing to add to the failed process's message.
            print(f"{run.script}.py: stopped by {run.signals.name} at step {run.step} (another process ended first)",
                  file=sys.stderr)
            raise SystemExit(128 + run.signals.caught) from None
        if kind is not None and issubclass(kind, OSError):
            raise err
        if kind is None:
            try:
                if run.meter.sums:  # the steps after the last log step
                    run._log_stats()  # the last collective of the run
            except Diverged as e:
                kind, err = Diverged, e
        if kind in (None, Diverged) and run.world > 1:
            dist.destroy_process_group()  # every process at the same point; rank 0 then finishes alone
        if kind is None:
            try:
                if run.step != run.saved_step and run.rank == 0:
                    save_run(run)  # first: what comes after (evaluation, figures) may be cut short
            except Diverged as e:
                kind, err = Diverged, e
        if kind is Diverged:
            if run.rank == 0:
                plot_run(run)
                print(f"{run.script}.py: error: {err}; stopped. Last good checkpoint: {run.dir / 'checkpoint.pt'} "
                      f"(step {run.saved_step})", file=sys.stderr)
            raise SystemExit(1) from None
        if kind is None and run.signals.caught:
            if run.rank == 0:
                plot_run(run)
                print(f"{run.script}.py: interrupted at step {run.step} by {run.signals.name}; checkpoint and plots "
                      f"in {run.dir} (continue: the same command with --resume auto, or --resume "
                      f"{run.dir / 'checkpoint.pt'})", file=sys.stderr)
            raise SystemExit(128 + run.signals.caught)
    except OSError as e:
        if run.rank == 0:
            cannot_write(run, e)
        raise
    finally:
        run.signals.restore()
    return False


def finish_run(run):
    """Run.finish: the final evaluation, plots and figures, and the summary line; a failed write is one line."""
    try:
        metrics = run.metrics if run._eval_step == run.step else evaluate_run(run)
        plot_run(run)
        g = torch.Generator(run.device).manual_seed(run.args.seed + 3)
        rows = run.num_classes or 8  # conditional: one class per row
        z0, z1 = run.noise(rows, g), run.noise(rows, g)
        path = torch.stack([interpolate(a, b, 10, "slerp") for a, b in zip(z0, z1)])  # (rows, 10 steps, latent)
        y = torch.arange(rows, device=run.device).repeat_interleave(10) if run.num_classes else None
        save_grid(run.sample(path.flatten(0, 1), y), run.dir / "interpolation.png", nrow=10)
        if run.evaluator.classifier is not None:
            y20 = balanced_labels(20, run.num_classes, run.device) if run.num_classes else None
            save_predictions(run.evaluator, run.sample(run.noise(20, g), y20), run.dir / "predictions.png",
                             y20, CLASS_NAMES.get(run.args.dataset))
        summary = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_std"))
        source = f"{metrics['eval_source']}; {metrics['n_gen']} generated vs {metrics['n_real']} real" if metrics else \
            run.evaluator.source
        reason = ("time limit (--max-minutes)" if run.step < run.total
                  else "done (--max-steps)" if run.args.max_steps and run.step >= run.args.max_steps
                  else f"done (--epochs {run.args.epochs} reached)")  # --epochs caps --max-steps silently otherwise: say so
        print(f"{run.script}: {reason} at step {run.step} (epoch {run.batches.epoch}, {run.logfile.elapsed() / 60:.1f} min, "
              f"{run.precision}, data in {run.data.where}) {summary or 'no metrics'} [{source}] -> {run.dir}", flush=True)
        return run.dir
    except OSError as e:
        cannot_write(run, e)


class EMA:
    """An exponential moving average of G's weights, theta_ema <- d theta_ema + (1 - d) theta after every G step
    (Yazici et al. 2019), for sngan's and sagan's --ema. BatchNorm's running statistics are not averaged: they
    describe G's current weights, not the average; before the average is used they are recomputed from its own
    forward passes (`ready`), with a fixed noise stream so that sampling shifts no training randomness. A G with
    spectral norm (sagan's): the power-iteration vectors u, v are not averaged but copied from G at every update
    (G's weights are close to the average's), and the train-mode forwards of `ready` iterate them on the average's
    weights. So the average's state depends only on G's and the averaged weights, not on how often it was used: a
    resumed run matches an uninterrupted one whatever the checkpoint steps."""

    batches, batch_size = 8, 256  # the noise that `ready` recomputes BatchNorm's statistics from

    def __init__(self, G, decay, latent_dim, num_classes=0):
        import copy
        self.module = copy.deepcopy(G).requires_grad_(False)
        self.decay, self.latent_dim, self.num_classes, self.stale = decay, latent_dim, num_classes, True

    @staticmethod
    def sn_vectors(net):
        return [b for name, b in net.named_buffers() if name.endswith(("._u", "._v"))]

    @torch.no_grad()
    def update(self, G):
        torch._foreach_lerp_(list(self.module.parameters()), list(G.parameters()), 1 - self.decay)
        if self.sn_vectors(G):
            torch._foreach_copy_(self.sn_vectors(self.module), self.sn_vectors(G))
        self.stale = True

    @torch.no_grad()
    def ready(self):
        """The averaged G, with BatchNorm statistics recomputed if it changed since (cumulative mean over
        `batches` batches in train mode)."""
        if self.stale:
            device = next(self.module.parameters()).device
            g = torch.Generator(device).manual_seed(1234)
            bns = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]  # Sync too
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative average over the batches below
            self.module.train()
            for _ in range(self.batches):
                z = torch.randn(self.batch_size, self.latent_dim, device=device, generator=g)
                y = balanced_labels(self.batch_size, self.num_classes, device) if self.num_classes else None
                self.module(z, y)
            for bn in bns:
                bn.momentum = 0.1
            self.stale = False
        return self.module.eval()

    def state_dict(self):  # saved with its statistics recomputed: they then belong to the saved weights
        return self.ready().state_dict()

    def load_state_dict(self, state):
        self.module.load_state_dict(state)
        self.stale = False


def generate(args, script, load_sampler, noise_dim=None, num_labels=None):
    """--generate N: OUT/generated.npz with N uint8 images (and balanced `labels` for conditional models).

    `load_sampler(saved_args, checkpoint, device)` rebuilds G from the checkpoint and returns
    `sample(z, y)`, as given to Run.start. Needs no dataset and no torchrun. `noise_dim(saved_args)` and
    `num_labels(saved_args)`, when given, replace latent_dim as the noise's width and a conditional run's classes
    as the labels' range (infogan: z with its codes' noise, and the values of the categorical code)."""
    if not args.checkpoint:
        raise UsageError("--generate needs --checkpoint PATH")
    if distributed_env()[0]:  # started under torchrun anyway: the first process writes, the others would repeat it
        return None
    state = load_checkpoint(args.checkpoint, script)
    saved, device = argparse.Namespace(**state["args"]), pick_device(args.device)
    sample = load_sampler(saved, state, device)
    g = torch.Generator(device).manual_seed(args.seed)
    z = torch.randn(args.generate, noise_dim(saved) if noise_dim else saved.latent_dim, device=device, generator=g)
    k = state["data"]["num_classes"] if state["data"].get("conditional") else None
    k = num_labels(saved) if num_labels else k
    y = balanced_labels(args.generate, k, device) if k else None
    images = torch.cat([sample(zc, None if y is None else y[i:i + len(zc)]).cpu()  # N images need not fit the device
                        for i, zc in zip(range(0, len(z), 500), z.split(500))])
    path = write_generated(args.out or Path(args.checkpoint).parent, images, y)
    print(f"{script}: wrote {args.generate} samples{' with balanced labels' if k else ''} to {path}")
    return path


# ----------------------------------------------------------------------------------------------
# 7 Pictures and files (matplotlib's Figure API: never switches the backend of a notebook that imports us)
# ----------------------------------------------------------------------------------------------

def save_grid(images, path, nrow=8):
    """Save images in [-1, 1] as one PNG grid."""
    import torchvision.utils as vutils
    vutils.save_image(images.detach().float().cpu(), path, nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)


def make_gif(sample_dir, path, ms_per_frame=250):
    """progress.gif from the step_*.png grids, in step order; the last frame is held longer."""
    from PIL import Image
    frames = sorted(Path(sample_dir).glob("step_*.png"))
    if not frames:
        return
    images = [Image.open(f).convert("P", palette=Image.ADAPTIVE) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=[ms_per_frame] * (len(images) - 1) + [2000], loop=0)


def read_metrics(path, warn=False):
    """The rows of a metrics.jsonl. A line that does not parse (torn by a full disk or a power cut mid-write) is
    dropped; `warn`: say so in one line."""
    rows, torn = [], []
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    torn.append(number)
    if torn and warn:
        print(f"note: {path}: dropped {len(torn)} line(s) that do not parse (line {', '.join(map(str, torn[:3]))}"
              f"{', ...' if len(torn) > 3 else ''}; a write cut short)", file=sys.stderr)
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def _figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height))


def plot_metrics(metrics_path, out_path, panels):
    """One figure, one subplot per panel, against the generator step.

    A panel is (title, [keys]) or (title, [keys], [keys on a right-hand axis]); the second form
    puts two quantities of different scale on one time axis (e.g. a critic's estimate and FID).
    """
    rows = read_metrics(metrics_path)

    def series(k):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        return list(zip(*pts)) if pts else None

    panels = [(p[0], p[1], p[2] if len(p) > 2 else []) for p in panels]
    panels = [p for p in panels if any(series(k) for k in p[1] + p[2])]
    if not panels:
        return
    fig = _figure(4.4 * len(panels), 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, left, right) in zip(axes[0], panels):
        lines = []
        first_right = max(3, len(left))  # right-hand colours after the left's (C3 with up to 3 on the left)
        for axis, keys, first in ((ax, left, 0), (ax.twinx() if right else None, right, first_right)):
            for k, color in zip(keys, [f"C{(first + i) % 10}" for i in range(len(keys))]):
                if s := series(k):
                    lines += axis.plot(s[0], s[1], color=color, label=k, marker="o" if len(s[0]) < 30 else None, ms=3)
            if right and axis is not ax:
                axis.set_ylabel(", ".join(right))
        ax.set_title(title)
        ax.set_xlabel("generator step")
        ax.grid(alpha=0.3)
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)


def save_predictions(evaluator, images, path, asked=None, class_names=None):
    """A figure of samples, each titled with the evaluation classifier's label (and the asked-for one). One picture
    with the labels written on it: an axes per sample would cost a second per run's end."""
    _, probs = evaluator._classify(images)
    pred = probs.argmax(1).tolist()
    asked = None if asked is None else asked.tolist()  # one device sync, not one per sample
    name = (lambda k: class_names[k]) if class_names else str
    (n, _, h, w), cols = images.shape, 10
    rows, band = math.ceil(n / cols), max(h // 3, 6)  # a band of white above each sample holds its label
    canvas = np.ones((rows * (h + band), cols * (w + 2), 3))
    fig = _figure(1.3 * cols, 1.3 * cols * canvas.shape[0] / canvas.shape[1] + 0.4)
    ax = fig.add_axes((0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    for i, img in enumerate(images.detach().float().cpu().add(1).div(2).clamp(0, 1)):
        y, x = (i // cols) * (h + band) + band, (i % cols) * (w + 2) + 1
        canvas[y:y + h, x:x + w] = img.permute(1, 2, 0).expand(h, w, 3).numpy()  # gray shows as gray
        ok = asked is None or pred[i] == asked[i]
        label = name(pred[i]) if asked is None else f"{name(asked[i])}->{name(pred[i])}"
        ax.text(x + w / 2, y - 1, label, ha="center", va="bottom", fontsize=7, color="black" if ok else "red")
    ax.imshow(canvas, vmin=0, vmax=1)
    ax.axis("off")
    fig.suptitle("classifier's label" + ("" if asked is None else " (asked->seen; red: mismatch)"), fontsize=9)
    fig.savefig(path, dpi=100)


def plot_class_histogram(metrics_path, out_path, class_names=None):
    """Bar chart of the class histogram of samples at the last evaluation (uniform = every class made)."""
    rows = [r for r in read_metrics(metrics_path) if "cls_hist" in r]
    if not rows:
        return
    hist = rows[-1]["cls_hist"]
    fig = _figure(6, 3)
    ax = fig.subplots()
    ax.bar(range(len(hist)), hist)
    ax.axhline(1 / len(hist), color="gray", ls="--", lw=1, label="uniform")
    ax.set_xticks(range(len(hist)), class_names or [str(k) for k in range(len(hist))], fontsize=7)
    ax.set_ylabel("share of samples")
    ax.set_title(f"classes of generated images (classifier), step {rows[-1]['step']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)


CLASS_NAMES = {
    "fashion-mnist": ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"],
}


def interpolate(z0, z1, steps, mode="slerp"):
    """Points from z0 to z1 (both ends included): (steps, *z0.shape).

    `slerp` follows the great circle (White 2016), which keeps Gaussian latents at a typical
    norm; `linear` passes near the origin, where a Gaussian prior has little mass. Where the
    great circle is undefined (z0, z1 parallel or antiparallel: sin(omega) ~ 0), it is linear.
    """
    t = torch.linspace(0, 1, steps, device=z0.device, dtype=z0.dtype).view(-1, *([1] * z0.dim()))
    if mode == "linear":
        return (1 - t) * z0 + t * z1
    # The angle in float64 on the CPU (MPS has no float64): in float32, arccos near -1 is off by ~3e-4, so z, -z
    # would not be caught as antiparallel and the division by sin(omega) would amplify float noise.
    a, b = z0.detach().flatten().cpu().double(), z1.detach().flatten().cpu().double()
    omega = torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1, 1)).item()
    if abs(math.sin(omega)) < 1e-4:
        return (1 - t) * z0 + t * z1
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / math.sin(omega)


def write_generated(out_dir, images, labels=None):
    """--generate's output: OUT/generated.npz with uint8 `images` (N, C, H, W) [and int64 `labels`]."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {out_dir} ({e.strerror or type(e).__name__})") from None
    arrays = {"images": to_uint8(images).cpu().numpy()}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy().astype(np.int64)
    path = out_dir / "generated.npz"
    np.savez_compressed(path, **arrays)
    return path


def score(argv):
    """`python common.py score --dataset cifar10 --samples generated.npz`: the evaluation of a run, for any file."""
    p = ArgumentParser(prog="common.py score", description="Score a generated.npz (uint8 `images` (N, C, H, W), "
                       "optional `labels`) against a dataset's real training images, as the scripts evaluate.")
    p.add_argument("--samples", type=path_arg, required=True, metavar="NPZ",
                   help=f"a generated.npz (e.g. from --generate) of at least {MIN_EVAL_IMAGES} images")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--data-root", type=path_arg, default="./data")
    p.add_argument("--eval-real", type=eval_count, default=None,
                   help="real training images to compare with (default: as many as the samples)")
    p.add_argument("--inception-weights", type=path_arg, default=None, metavar="PATH",
                   help=f"local copy of {INCEPTION_FILE} (RGB data)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--seed", type=seed_int, default=0, help="which real images are drawn, and IS's split shuffle")
    args = p.parse_args(argv)
    try:
        if not Path(args.samples).is_file():
            raise UsageError(f"--samples {args.samples} does not exist")
        try:
            arrays = np.load(args.samples)
            images = torch.from_numpy(arrays["images"])
            labels = torch.from_numpy(arrays["labels"]).long() if "labels" in arrays.files else None
        except Exception as e:
            raise UsageError(f"--samples {args.samples} is not a generated.npz with uint8 `images` "
                             f"({type(e).__name__})") from None
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise UsageError(f"--samples {args.samples}: `images` must be uint8 (N, C, H, W), "
                             f"not {images.dtype} {tuple(images.shape)}")
        if len(images) < MIN_EVAL_IMAGES:
            raise UsageError(f"--samples {args.samples} holds {len(images)} image{'s' * (len(images) != 1)}; "
                             f"scoring needs at least {MIN_EVAL_IMAGES} (IS's 10 splits need one image each, "
                             f"FID's covariance two)")
        if args.inception_weights and not Path(args.inception_weights).is_file():
            raise UsageError(f"--inception-weights {args.inception_weights} does not exist")
        device = pick_device(args.device)
        data = load_dataset(args.dataset, args.data_root, images.shape[-1], "cpu")
        with fork_rng(device):
            evaluator = Evaluator(data, args.data_root, device, len(images), args.seed, args.eval_real,
                                  args.inception_weights)
            out = evaluator.score(images, labels)
    except UsageError as e:
        fail("common.py score", e)
    print(json.dumps(out or {"skipped": evaluator.source}))
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["score"]:
        return score(argv[1:])
    p = ArgumentParser(description="Train and cache the evaluation classifier of an MNIST-like dataset. "
                       "`python common.py score --help`: score a generated.npz.")
    p.add_argument("--dataset", default="fashion-mnist", choices=DIGIT_LIKE)
    p.add_argument("--data-root", type=path_arg, default="./data")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
        with fork_rng(device):
            net = get_classifier(args.dataset, args.data_root, device)
    except UsageError as e:
        fail("common.py", e)
    print(f"{args.dataset} classifier: test accuracy {net.test_accuracy:.4f}")


if __name__ == "__main__":
    main()
