"""Learning direction: short real runs of every script on the fake data, after which D (the critic) scores real
images above fakes and G's samples have moved toward the data. The slow tier checks that these checks fail on
broken losses.

Each test's docstring names the plausible bug it catches.
"""
import argparse
import math

import pytest
import torch

import cgan
import common
import dcgan
import sngan
import wgan_clip
import wgan_gp
from conftest import run_script

# ----------------------------------------------------------------------------------------------
# Learning direction: short real runs of every script on the fake data
# ----------------------------------------------------------------------------------------------
#
# Measured 2026-11-24 on this 2-core CPU, seeds 0-5 (tests use seed 0), --batch-size 32 --width 8, with the
# flags of LEARN below; "pix" = |mean sample image - mean data image| / the same for the untrained G (same seed):
#
#   script     correct code                          D loss args swapped          G loss sign flipped
#   dcgan      d_real-d_fake 0.44..0.85, acc_real 1  d_real-d_fake ~ -9, acc 0   pix 1.16..1.32
#              pix 0.64..0.74, cls_fid/untrained 0.82..0.90                        cls_fid/untrained 3.3..4.5
#   cgan       d_real-d_fake 4.9..5.5, acc 1 / 1     ~ -7.5, acc 0 / 0            pix 1.14..1.23
#              pix 0.67..0.76
#   wgan_gp    d_real-d_fake 3.7..9.2 (= w_estimate) -16..-19 (w_estimate > 0!)  pix 1.21..1.42
#              pix 0.30..0.51, cls_fid/untrained 0.76..0.89                        cls_fid/untrained 6..10
#   wgan_clip  d_real-d_fake 0.020..0.022            -0.07..-0.11                 pix 1.43..1.49
#              pix 0.49..0.55
#
# So the thresholds: d_real > d_fake; pix < 0.9 (worst correct run 0.76, best broken one 1.14). cls_fid only where it
# fell in every seed (dcgan, wgan_gp: below the untrained G's); in 60 steps it did not fall for cgan (ratio
# 0.83..0.92, but a broken G reached 0.77) or wgan_clip (1.00..1.05), so there the mean image is the G signal
# (the slow test_learning.py checks FID over 1000 steps). dcgan's acc_fake is ~0 at --lr-g 8e-4 (G fools D
# by the end), so only acc_real is asserted for it. The raised G learning rates (dcgan 8e-4, wgan_gp 4e-4,
# wgan_clip 2e-4) let G move measurably in 60-120 steps; at the defaults the margins were 2-5x smaller.
# The WGANs' logged w_estimate is computed from the loss, so a swapped critic loss still logs a positive
# "estimate": the critic's direction is checked on d_real and d_fake, and w_estimate against their difference.

LEARN_BASE = ["--dataset", "fake", "--batch-size", "32", "--width", "8", "--eval-samples", "100", "--seed", "0",
              "--sample-every", "100000", "--eval-every", "0", "--log-every", "20"]
LEARN = {
    "dcgan": (dcgan, ["--max-steps", "60", "--lr-g", "8e-4"]),
    "cgan": (cgan, ["--max-steps", "60"]),
    "wgan_gp": (wgan_gp, ["--max-steps", "120", "--n-dis", "2", "--lr-g", "4e-4"]),
    "wgan_clip": (wgan_clip, ["--max-steps", "60", "--lr-g", "2e-4", "--warmup-critic", "off"]),
    "sngan": (sngan, ["--max-steps", "120", "--arch", "cnn", "--n-dis", "1", "--lr-g", "4e-4", "--lr-decay", "none"]),
}


def _generator(module, args):
    if module is sngan:
        return sngan.build_generator(args, 1, 10)
    return cgan.build_generator(args, 1, 10) if module is cgan else module.build_generator(args, 1)


def _sampler(module, G):
    if module is cgan:
        return lambda z: cgan.sample_images(G, z, common.balanced_labels(len(z), 10, z.device))
    return lambda z: module.sample_images(G, z)


def learning_run(name, out, data_root):
    """Train `name` briefly; return the last training row, final and untrained cls_fid, and the distance of the
    final and the untrained G's mean image to the data's."""
    module, extra = LEARN[name]
    code, _ = run_script(module, LEARN_BASE + extra + ["--out", out, "--data-root", data_root])
    assert code == 0
    rows = common.read_metrics(out / "metrics.jsonl")
    state = common.load_checkpoint(out / "checkpoint.pt", module.SCRIPT)
    args = argparse.Namespace(**state["args"])
    G = _generator(module, args)
    G.load_state_dict(state["G"])
    torch.manual_seed(args.seed)  # an untrained G like the run's first (its exact draw does not matter much:
    G0 = _generator(module, args)  # untrained G's mean images were 24.3..25.1 from the data's in every seed)
    data = common.load_dataset("fake")
    target = common.to_float(data.images).mean(0)
    z = torch.randn(256, args.latent_dim, generator=torch.Generator().manual_seed(123))
    pix, pix0 = ((_sampler(module, g)(z).mean(0) - target).norm().item() for g in (G, G0))
    evaluator = common.Evaluator(data, data_root, "cpu", args.eval_samples, args.seed)

    def sample0(n, gen):
        zz = torch.randn(n, args.latent_dim, generator=gen)
        y = common.balanced_labels(n, 10, "cpu") if module is cgan else None
        return _sampler(module, G0)(zz), y
    return {"last": [r for r in rows if "loss_d" in r][-1], "fid": [r for r in rows if "cls_fid" in r][-1]["cls_fid"],
            "fid0": evaluator(sample0)["cls_fid"], "pix": pix, "pix0": pix0}


def direction_checks(name, m):
    """(what, holds) for each check of a learning run `m` (see the table above)."""
    last = m["last"]
    checks = {"D scores real above fake": last["d_real"] > last["d_fake"],
              "G's mean image moved toward the data's": m["pix"] < 0.9 * m["pix0"]}
    if name in ("dcgan", "cgan"):
        checks["D calls real images real"] = last["acc_real"] > 0.5
    if name == "cgan":
        checks["D calls fakes fake"] = last["acc_fake"] > 0.5
    if name in ("wgan_gp", "wgan_clip"):
        checks["critic's estimate is positive"] = last["w_estimate"] > 0
        checks["w_estimate = d_real - d_fake"] = math.isclose(last["w_estimate"], last["d_real"] - last["d_fake"],
                                                              rel_tol=1e-3, abs_tol=1e-5)
    if name in ("dcgan", "wgan_gp"):
        checks["cls_fid below the untrained G's"] = m["fid"] < m["fid0"]
    return checks


@pytest.mark.parametrize("name", list(LEARN))
def test_learning_direction(name, tmp_path, data_root):
    """After 60-120 steps D (the critic) scores real images above fakes and G's samples have moved toward the data.
    Catches a D loss with its arguments swapped, a G loss with the wrong sign (test_learning_direction_catches_
    broken_losses shows both fail here), and wiring errors such as stepping the wrong optimiser or a G step
    that never reaches G."""
    m = learning_run(name, tmp_path / name, data_root)
    failed = [what for what, ok in direction_checks(name, m).items() if not ok]
    assert not failed, (failed, m)


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["d_swapped", "g_flipped"])
@pytest.mark.parametrize("name", list(LEARN))
def test_learning_direction_catches_broken_losses(name, broken, tmp_path, data_root, monkeypatch):
    """The checks of test_learning_direction fail on broken copies: D's loss with real and fake swapped fails
    'D scores real above fake'; G's loss with its sign flipped fails the mean-image check."""
    module = LEARN[name][0]
    if broken == "d_swapped":
        attr = "d_loss" if hasattr(module, "d_loss") else "critic_loss"
        orig = getattr(module, attr)
        monkeypatch.setattr(module, attr, lambda real, fake, *kind: orig(fake, real, *kind))
        must_fail = "D scores real above fake"
    else:
        attr = "g_loss" if hasattr(module, "g_loss") else "generator_loss"
        orig = getattr(module, attr)
        monkeypatch.setattr(module, attr, lambda *a: -orig(*a))
        must_fail = "G's mean image moved toward the data's"
    m = learning_run(name, tmp_path / name, data_root)
    assert not direction_checks(name, m)[must_fail], m
