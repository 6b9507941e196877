"""Longer runs (pytest -m slow): the scripts learn the fake data, and conditioning works as the reports say.

`--epochs 1000` in BASE lets `--max-steps` decide the length (the fake set has 16 batches per epoch,
so the scripts' default epochs would stop dcgan at 400 and wgan_gp at 800 steps).
"""
import pytest

import cgan
import common
import dcgan
import wgan_gp
from conftest import run_script, without

pytestmark = pytest.mark.slow
BASE = ["--dataset", "fake", "--width", "16", "--batch-size", "64", "--eval-samples", "2000", "--log-every", "50",
        "--sample-every", "1000", "--epochs", "1000"]


def last_eval(out):
    return [r for r in common.read_metrics(out / "metrics.jsonl") if "cls_fid" in r]


@pytest.mark.parametrize("module, extra", [(dcgan, []), (wgan_gp, ["--n-dis", "2"])])
def test_fid_falls(module, extra, tmp_path, data_root):
    out = tmp_path / "run"
    code, _ = run_script(module, BASE + extra + ["--max-steps", "1000", "--eval-every", "200", "--out", out,
                                                 "--data-root", data_root])
    assert code == 0
    evals = last_eval(out)
    assert evals[-1]["cls_fid"] < 0.5 * evals[0]["cls_fid"]
    # No collapse to one or two blobs (step 200 of dcgan draws one class 96% of the time). Not "all ten": measured
    # 2026-11-24, dcgan keeps 6 of the 10 blobs above 3% at step 1000, in bf16 and in fp32 alike (it drew 9 at
    # step 400, then dropped some: partial mode dropping, which a GAN is allowed on this toy set).
    assert sum(h > 0.03 for h in evals[-1]["cls_hist"]) >= 5


def test_conditional_discriminator_makes_g_obey_the_label(tmp_path, data_root):
    """A conditional D (concat, projection) makes G draw the asked class; an unconditional one does not.

    Measured 2026-11-24 (seeds 0 and 1): none 0.11 / 0.11, concat 1.00 / 1.00, projection (MLP) 1.00 / 1.00.
    Two things about the fake blobs, found by measurement (this test was once an expected failure): at equal LRs D
    rejects G's blobs by realism alone, so the label never matters to it and G ignores y (accuracy 0.14-0.18
    for every D); a faster G (--lr-g 4e-4 --lr-d 1e-4) fixes that. And the class here is only the blob's
    position, which the conv projection D's spatially pooled features barely carry (0.16 at 1000 steps);
    the MLP's features keep position, so projection is tested with --arch mlp. Catches a D that ignores y,
    a G that ignores y, or labels mixed up between G's and D's step.
    """
    acc = {}
    fast_g = ["--lr-g", "4e-4", "--lr-d", "1e-4", "--eval-every", "0"]
    for d_cond, arch, steps in (("none", "dcgan", 800), ("concat", "dcgan", 800), ("projection", "mlp", 400)):
        out = tmp_path / d_cond
        base = BASE if arch == "dcgan" else without(BASE, "--width")
        code, _ = run_script(cgan, base + fast_g + ["--arch", arch, "--d-cond", d_cond, "--max-steps", steps,
                                                    "--out", out, "--data-root", data_root])
        assert code == 0
        acc[d_cond] = last_eval(out)[-1]["cls_acc"]
    assert acc["concat"] > 0.9 and acc["projection"] > 0.9, acc
    assert acc["none"] < 0.4, acc  # ten classes: chance is 0.1
