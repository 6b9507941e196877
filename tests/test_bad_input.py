"""Bad input, on every model script that exists: exit code 2, one line `<script>.py: error: ...` on stderr, no
traceback, and a run directory passed as --out left exactly as it was.

Every case types --overwrite (except the one that checks the refusal without it), so the guard that protects a
used --out cannot stand in for the check a case is about; and every message must name what was wrong (the flag and
its value, the file, the folder), so an error about something else does not pass either. A case whose check is
missing would train (on --dataset fake, one step) and replace the run files: the snapshot comparison then fails.
"""
import contextlib
import importlib
import io
import json
import re

import pytest
import torch

from conftest import ROOT, run_script

SCRIPTS = [s for s in ("dcgan", "cgan", "wgan_clip", "wgan_gp", "sngan", "infogan", "sagan") if (ROOT / f"{s}.py").exists()]


def option_strings(script):
    """The flags in the usage line of `script.py --help` (the parser's own list, not its prose)."""
    module = importlib.import_module(script)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        module.parse_args(["--help"])
    usage = out.getvalue().split("\n\n")[0]
    found = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", usage))
    if "--out" not in found:
        raise RuntimeError(f"could not read the flags of {script}.py from its --help usage:\n{usage}")
    return found


# Placeholders, replaced per test: @RUN@ the existing run directory, @DATA@ a data root, @TRUNC@ a truncated checkpoint
# of this script, @FOREIGN@ a checkpoint of another script (@OTHER@).
TRAIN = ["--dataset", "fake", "--data-root", "@DATA@", "--device", "cpu", "--max-steps", "1", "--eval-samples", "64",
         "--out", "@RUN@", "--overwrite"]
RESUME = ["--data-root", "@DATA@", "--device", "cpu", "--max-steps", "1", "--out", "@RUN@", "--overwrite", "--resume"]
GENERATE = ["--device", "cpu", "--out", "@RUN@", "--generate"]
INTERNAL = ("Traceback", "list index", "Unpickling", "zip", "PytorchStreamReader", "KeyError", "Errno")


def bad_value(flag, value):
    """The message names the flag, then the value (as a token of its own: `1` in `--beta1` does not count)."""
    return rf"{re.escape(flag)}\b.*(?<![\w.-]){re.escape(value)}(?![\w.])"


def empty_path(flag, value=""):
    """The message names the flag and shows the typed value quoted, so an empty or blank one is visible."""
    return rf"{re.escape(flag)}\b.*{re.escape(repr(value))}"


def below_minimum(flag, value):
    """The message names the flag and the value, and states the minimum (10: IS's splits)."""
    return rf"^(?=.*\bat least 10\b).*{bad_value(flag, value)}"


GENERIC = [("--max-minutes", "-1"), ("--max-minutes", "0"), ("--lr-g", "-1"), ("--lr-d", "0"), ("--beta1", "1"),
           ("--beta2", "-0.1"), ("--batch-size", "0"), ("--eval-every", "-1"), ("--eval-samples", "0"),
           ("--dataset", "imagenet"), ("--lr-g", "abc"), ("--max-minutes", "nan"), ("--max-minutes", "inf")]
SPECIFIC = [("--gp-weight", "-1"), ("--drift", "-1"), ("--clip", "0"), ("--clip", "-0.01"), ("--d-dropout", "1"),
            ("--info-weight", "-1"), ("--ema", "1"), ("--n-dis", "0")]


def cases(script):
    """(id, argv, regex the error line must match, substrings it must not contain) for one script."""
    opts = option_strings(script)
    out = []
    for flag, value in GENERIC + [fv for fv in SPECIFIC if fv[0] in opts]:
        context = []
        if flag in ("--beta1", "--beta2") and "--optimizer" in opts:
            context = ["--optimizer", "adam"]  # Adam's betas: where the optimiser is a choice, they need Adam
        out.append((f"{flag}={value}", TRAIN + context + [flag, value], bad_value(flag, value), ()))
    out += [
        ("--image-size=30", TRAIN + ["--image-size", "30"], r"(?<!\d)30(?!\d)", ()),
        ("--out=/proc/forbidden", TRAIN + ["--out", "/proc/forbidden"], re.escape("/proc/forbidden"), ()),
        ("--inception-weights=missing", TRAIN + ["--inception-weights", "/nonexistent/w.pth"],
         r"--inception-weights /nonexistent/w\.pth does not exist", ()),
        ("--eval-real=0", TRAIN + ["--eval-real", "0"], bad_value("--eval-real", "0"), ()),
        # an integer too large for a float: math.isfinite's OverflowError was a traceback
        ("--max-steps=huge", TRAIN + ["--max-steps", "1" + "0" * 400], r"--max-steps\b.*401-digit number", INTERNAL),
        # Counts the metrics cannot use: 1 ended in FID's "Eigenvalues did not converge" traceback (a covariance
        # of one sample is NaN); 9 gave IS fewer than its 10 splits.
        ("--eval-samples=1", TRAIN + ["--eval-samples", "1"], below_minimum("--eval-samples", "1"), INTERNAL),
        ("--eval-samples=9", TRAIN + ["--eval-samples", "9"], below_minimum("--eval-samples", "9"), ()),
        ("--eval-real=1", TRAIN + ["--eval-real", "1"], below_minimum("--eval-real", "1"), INTERNAL),
        # Empty paths: --out "" wrote the run into the current folder (the checkout), --data-root "" put the data and
        # the classifier cache there, --resume "" started a fresh run, --inception-weights "" and --checkpoint ""
        # were ignored as if not typed.
        ("--out=empty", TRAIN + ["--out", ""], empty_path("--out"), ()),
        ("--out=blank", TRAIN + ["--out", "  "], empty_path("--out", "  "), ()),
        ("--data-root=empty", TRAIN + ["--data-root", ""], empty_path("--data-root"), ()),
        ("--resume=empty", TRAIN + ["--resume", ""], empty_path("--resume"), ()),
        ("--inception-weights=empty", TRAIN + ["--inception-weights", ""], empty_path("--inception-weights"), ()),
        ("--checkpoint=empty", TRAIN + ["--checkpoint", ""], empty_path("--checkpoint"), ()),
        ("--generate-checkpoint=empty", GENERATE + ["3", "--checkpoint", ""], empty_path("--checkpoint"), ()),
        ("fresh-run-into-used-out", [a for a in TRAIN if a != "--overwrite"], r"@RUN@\b.*\brun\b|\brun\b.*@RUN@", ()),
        ("--resume=/etc/passwd", RESUME + ["/etc/passwd"], r"/etc/passwd\b.*not a PyTorch checkpoint", INTERNAL),
        ("--resume=truncated", RESUME + ["@TRUNC@"], r"@TRUNC@\b.*(truncat|damag|corrupt|cannot be read)", INTERNAL),
        ("--generate-foreign-checkpoint", GENERATE + ["3", "--checkpoint", "@FOREIGN@"], r"@FOREIGN@\b.*\b@OTHER@\.py", INTERNAL),
        ("--generate-without-checkpoint", GENERATE + ["5"], r"--checkpoint\b", ()),
        ("--checkpoint-without-generate", TRAIN + ["--checkpoint", "@TRUNC@"], r"--checkpoint\b.*--generate", ()),
        ("--generate-with-resume", GENERATE + ["3", "--checkpoint", "@FOREIGN@", "--resume", "@TRUNC@"],
         r"--generate\b.*--resume\b", ()),
    ]
    return out


PARAMS = [pytest.param(script, *case, id=f"{script}:{case[0]}") for script in SCRIPTS for case in cases(script)]


def snapshot(folder):
    """Every file's bytes and every folder under `folder`, by relative path."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(folder.rglob("*"))}


def make_run_dir(folder, script):
    """A used run directory with known contents."""
    (folder / "samples").mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"dataset": "fake", "seed": 0, "note": "known"}, indent=2) + "\n")
    (folder / "metrics.jsonl").write_text('{"step": 50, "loss_d": 1.25, "loss_g": 0.75}\n')
    torch.save({"script": script, "step": 50, "note": torch.arange(4)}, folder / "checkpoint.pt")
    (folder / "samples" / "step_0000000.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(64)))
    return snapshot(folder)


@pytest.mark.parametrize("script,case,argv,pattern,forbidden", PARAMS)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(script, case, argv, pattern, forbidden, tmp_path, capsys,
                                                          monkeypatch):
    """Each case of the table; a missing check shows as a run that trains (exit 0), a traceback, a message about
    something else, or files written: into --out, or (the cases run in tmp_path) into the current folder."""
    monkeypatch.chdir(tmp_path)  # a case that writes relative to the current folder writes here, not into the checkout
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    before = make_run_dir(run_dir, script)
    elsewhere.mkdir()
    trunc = elsewhere / "truncated.pt"
    torch.save({"script": script, "step": 50, "G": {"w": torch.randn(64, 64)}}, trunc)
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    other = next(s for s in ("dcgan", "cgan", "wgan_gp") if s != script)
    foreign = elsewhere / f"{other}.pt"
    torch.save({"script": other, "step": 50, "args": {"latent_dim": 100}, "G": {"w": torch.randn(4, 4)}}, foreign)
    values = {"@RUN@": str(run_dir), "@DATA@": str(tmp_path / "data"), "@TRUNC@": str(trunc), "@FOREIGN@": str(foreign),
              "@OTHER@": other}

    argv = [values.get(a, a) for a in argv]
    for k, v in values.items():
        pattern = pattern.replace(k, re.escape(v))
    code, err = run_script(importlib.import_module(script), argv, capsys)

    lines = err.splitlines()
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert len(lines) == 1 and lines[0].strip(), f"not exactly one line on stderr: {err!r}"
    assert lines[0].startswith(f"{script}.py: error: "), lines[0]
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), f"the message does not say what was wrong ({pattern!r}): {lines[0]}"
    assert not [w for w in forbidden if w in lines[0]], f"internal error text in the message: {lines[0]}"
    assert snapshot(run_dir) == before, "the run directory changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "run"], "files written outside --out"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_that_fails_at_start_leaves_no_empty_folder(script, tmp_path, capsys):
    """A missing dataset or an impossible size fails after --out was checked: no empty run folder stays behind."""
    module = importlib.import_module(script)
    for argv in (["--dataset", "cifar10", "--data-root", str(tmp_path / "nodata")], ["--dataset", "fake", "--image-size", "30"]):
        code, err = run_script(module, argv + ["--out", tmp_path / "new"], capsys)
        assert code == 2 and not (tmp_path / "new").exists(), err


def test_score_refuses_too_few_samples_and_empty_paths(tmp_path, capsys, monkeypatch):
    """`python common.py score` on a generated.npz of fewer than 10 images, or with an empty path: one line, exit 2,
    the minimum stated. Catches the FID traceback ("Eigenvalues did not converge") on a 1-image file, and an empty
    --data-root that would read and cache data in the current folder."""
    import numpy as np

    import common
    monkeypatch.chdir(tmp_path)
    tiny = tmp_path / "tiny.npz"
    np.savez(tiny, images=np.zeros((1, 1, 28, 28), np.uint8))
    cases = [(["--samples", tiny], rf"{re.escape(str(tiny))} holds 1 image\b.*at least 10"),
             (["--samples", ""], r"--samples\b.*''"),
             (["--samples", tiny, "--data-root", ""], r"--data-root\b.*''"),
             (["--samples", tiny, "--eval-real", "1"], r"--eval-real\b.*at least 10.*\b1\b")]
    for argv, pattern in cases:
        with pytest.raises(SystemExit) as e:
            common.main(["score", "--dataset", "fake", "--data-root", tmp_path / "data", *argv])
        lines = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("common.py score: error: "), lines
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.npz"], "files written by a refused command"


def test_an_evaluation_with_too_few_real_images_is_skipped_in_words(data_root):
    """A dataset of fewer than 10 images (a tiny image folder) still trains, and its evaluation says why it has no
    metrics instead of failing in FID. Catches the covariance of a single real image (NaN) reaching FID's
    eigendecomposition: "numpy.linalg.LinAlgError: Eigenvalues did not converge" at the run's first evaluation."""
    import common
    fake = common.load_dataset("fake", data_root)
    one = common.ImageData("fake", fake.images[:1], fake.labels[:1], fake.num_classes)
    evaluator = common.Evaluator(one, data_root, "cpu", n_samples=20)
    assert evaluator.score(fake.images[:20]) == {}
    assert re.search(r"metrics skipped\b.*\b10\b.*\bfake has 1\b", evaluator.source), evaluator.source
