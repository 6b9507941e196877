"""When D has won, or G's samples all look alike: the run says so once, in one line and one metrics row, and
trains on (a warning, not a stop: a D that won may recover); D's biases follow one rule (a bias exactly where no
BatchNorm follows); the cgan projection recipe does not collapse on several seeds (slow)."""
import types

import pytest
import torch
import torch.nn as nn

import cgan
import common
import dcgan
import infogan
import wgan_clip
from conftest import run_script

TINY = ["--dataset", "fake", "--width", "8", "--batch-size", "32", "--eval-every", "0", "--eval-samples", "100",
        "--sample-every", "1000", "--log-every", "5", "--no-amp"]


def watcher(floor=0.0, **args):
    """Watchers whose log goes to a list (`.rows`, each row with the step it was said at)."""
    w = common.Watchers("cgan", types.SimpleNamespace(**({"lr_d": 2e-4, "n_dis": 1, "spectral_norm": "none"} | args)),
                        log=None, d_loss_floor=floor)
    w.rows = []
    w.log = lambda record: w.rows.append({"step": w.step, **record})
    return w


def feed(run, pairs, start=50, every=50):
    for i, (d, g) in enumerate(pairs):
        run.losses(start + i * every, {"loss_d": d, "loss_g": g})


def test_d_won_is_said_once_with_the_step_and_what_to_try(capsys):
    """Five log lines of loss_d below 0.01 while loss_g climbs: one line naming the first step it is sure of and the
    script's own remedies, one `d_won` row; then silence while D stays on top; said again only after D's loss
    recovered and fell again. Catches a detector that never fires, one that fires every log line, and a message
    naming flags the script does not have."""
    run = watcher()
    feed(run, [(0.6, 1.0)] * 5 + [(0.005, 4 + i) for i in range(10)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "D has won at step 500" in err[0], err
    assert "--lr-d (now 0.0002)" in err[0] and "--spectral-norm d" in err[0] and "--seed" in err[0], err
    assert "--n-dis" not in err[0]  # one D step already: "fewer D steps" would be no advice
    assert [r["step"] for r in run.rows] == [500] and run.rows[0]["d_won"]["loss_g_to"] == 8
    feed(run, [(0.7, 1.0)] * 5 + [(0.001, 5 + i) for i in range(5)], start=1000)
    assert [r["step"] for r in run.rows] == [500, 1450]
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("pairs", [
    [(0.6 + 0.01 * (i % 3), 1.5 + 0.1 * (i % 2)) for i in range(30)],  # healthy: D near 0.6, G near 1.5
    [(0.005, 9 - 0.1 * i) for i in range(30)],  # D near 0, but G's loss falls: G is catching up
    [(0.005, 5 + i) for i in range(4)] + [(0.3, 5)] + [(0.005, 5 + i) for i in range(4)],  # never 5 lines in a row
])
def test_d_won_is_silent_otherwise(pairs, capsys):
    """Catches a detector on loss_d alone (G recovering is not a collapse) or on fewer lines than it says."""
    run = watcher()
    feed(run, pairs)
    assert run.rows == [] and capsys.readouterr().err == ""


def test_d_won_is_silent_for_a_critic(capsys):
    """A Wasserstein critic's loss has no floor (it is negative when training goes well): no verdict there.
    Catches a detector applied to every script's loss_d."""
    run = watcher(floor=None)
    feed(run, [(0.001, 5 + i) for i in range(10)])
    assert run.rows == [] and capsys.readouterr().err == ""


def test_a_run_made_to_collapse_says_so_and_trains_on(tmp_path, data_root, capsys, monkeypatch):
    """dcgan whose G barely learns (--lr-g 1e-9) against a fast D: D wins within a few dozen steps, and G's samples
    stay the untrained network's one texture. The real run prints each line once, writes each row, and still runs
    to --max-steps with exit 0. The same run with the recipe's learning rates is silent. Catches a detector that is
    not wired into the scripts, that stops the run, or that fires on a healthy run. The collapsed run waits 200
    steps for "alike" instead of ALIKE_STEPS (500), to train 400 steps instead of 700; the healthy one keeps 500."""
    base = TINY + ["--data-root", data_root, "--max-steps", 300, "--sample-every", 100]
    with monkeypatch.context() as m:
        m.setattr(common, "ALIKE_STEPS", 200)
        code, err = run_script(dcgan, base + ["--lr-g", "1e-9", "--lr-d", "2e-3", "--max-steps", 400, "--out",
                                              tmp_path / "won"], capsys)
    assert code == 0, err
    assert err.count("D has won at step") == 1 and err.count("samples all look alike at step 300:") == 1, err
    rows = common.read_metrics(tmp_path / "won" / "metrics.jsonl")
    assert len([r for r in rows if "d_won" in r]) == 1 and max(r["step"] for r in rows) == 400
    assert [r["step"] for r in rows if "alike" in r] == [300]  # low from the first grid (100) for 200 steps
    code, err = run_script(dcgan, base + ["--out", tmp_path / "ok"], capsys)
    assert code == 0 and "D has won" not in err and "alike" not in err, err
    assert not [r for r in common.read_metrics(tmp_path / "ok" / "metrics.jsonl") if "d_won" in r or "alike" in r]


def test_spread_sees_layout_not_pixel_noise():
    """`spread`, the measure of "samples all alike": 0 for one image repeated; small for one image with fresh pixel
    noise on each copy (an untrained G's samples differ pixel by pixel yet all look the same); large for images
    whose shapes differ; with labels, within each class only. Catches a plain per-pixel standard deviation (noise
    would pass as variety) and a conditional grid judged across classes (one image per class would pass)."""
    g = torch.Generator().manual_seed(0)
    one = torch.rand(1, 1, 32, 32, generator=g) * 2 - 1
    shapes = -torch.ones(64, 1, 32, 32)
    for i in range(64):  # a bright square at a different place in each image
        r, c = divmod(i, 8)
        shapes[i, :, 3 * r:3 * r + 12, 3 * c:3 * c + 12] = 1
    assert common.spread(one.repeat(64, 1, 1, 1)) == 0
    noisy = (one + 0.4 * torch.randn(64, 1, 32, 32, generator=g)).clamp(-1, 1)
    assert common.spread(noisy) < common.ALIKE * common.spread(shapes)
    assert noisy.std(0).mean() > common.ALIKE * shapes.std(0).mean()  # pixel by pixel, the noise looks like variety
    labels = torch.arange(8).repeat_interleave(8)
    per_class = shapes[::8].repeat_interleave(8, 0)  # one image per class
    assert common.spread(per_class) > 0.5 * common.spread(shapes) and common.spread(per_class, labels) == 0
    assert common.spread(shapes, labels) > 0


def shapes(n=16, size=8):
    """n images, each a bright 2x2 square at its own place: varied layout."""
    x = -torch.ones(n, 1, size, size)
    for i in range(n):
        x[i, :, i // 4 * 2:i // 4 * 2 + 2, i % 4 * 2:i % 4 * 2 + 2] = 1
    return x


def test_alike_is_said_once_after_low_grids_for_500_steps_and_again_only_after_recovery(capsys):
    """Grids whose spread, against the real images', stays below ALIKE for ALIKE_STEPS steps: one line and one
    `alike` row; silent while it stays low and while it has only partly recovered (below twice ALIKE); said again
    once it recovered and fell. Catches a warning at the first low grids (an untrained G's), at every grid, a
    detector that never re-arms and one that re-arms on any small rise."""
    run = watcher()
    run.real_spread = common.spread(shapes())
    ratios = [1, 0.1, 0.1, 0.1, 0.1, 1, 0.1, 0.1, 0.1, 0.3, 0.1, 0.1, 0.5, 0.1, 0.1, 0.1]
    for i, r in enumerate(ratios, 1):  # a grid every 250 steps; spread scales with the images' contrast
        run.grid(250 * i, shapes() * r)
    # low from 500: said at 1000; recovered at 1500; low from 1750: said at 2250; 0.3 at 2500 does not re-arm,
    # 0.5 at 3250 does; low from 3500: said at 4000
    assert [r["step"] for r in run.rows] == [1000, 2250, 4000]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "samples all look alike at step 1000: since step 500" in err[0] and "--seed" in err[0], err


def test_alike_judges_a_conditional_grid_within_each_class(capsys):
    """A conditional grid (10 noises per class, in class order) that draws one image per class varies across the
    grid as much as real images do, yet not at all within a class: said. The same grid with variety inside each
    class: silent. Catches fixed_y not reaching the measure, and a yardstick taken across classes."""
    run = watcher()
    run.fixed_y = torch.arange(4).repeat_interleave(10)
    real = torch.cat([shapes(), shapes()])  # 8 real images per class, 4 layouts each
    run.real_spread = common.spread(real, torch.arange(32) % 4)
    one_each = shapes(16)[[0, 5, 10, 15]].repeat_interleave(10, 0)
    varied = torch.cat([shapes(16)[torch.arange(10) + k] for k in range(4)])
    for step in (500, 1000, 1500):
        run.grid(step, varied)
    assert run.rows == []
    for step in (2000, 2500):
        run.grid(step, one_each)
    assert [r["step"] for r in run.rows] == [2500] and "within each class" in capsys.readouterr().err


def test_alike_is_off_without_two_real_images_in_a_class():
    """A yardstick needs 2 real images in some class: with none, spread is NaN and Run turns the check off rather
    than compare within-class samples with a between-class spread or with NaN."""
    assert common.math.isnan(common.spread(shapes(4), torch.arange(4)))
    run = watcher()
    run.real_spread = None
    run.grid(1000, shapes()[:1].repeat(16, 1, 1, 1))
    assert run.rows == []


@pytest.mark.parametrize("make", [
    lambda bn: dcgan.Discriminator(1, 28, 8),
    lambda bn: cgan.Discriminator(1, 28, 10, 8, "projection", batchnorm=bn),
    lambda bn: wgan_clip.Critic(1, 28, 8, batchnorm=bn),
    lambda bn: infogan.Discriminator(1, 28, 10, 2, 8),
])
@pytest.mark.parametrize("bn", [True, False])
def test_every_d_conv_has_a_bias_unless_a_batchnorm_follows(make, bn):
    """D's bias rule, layer by layer: a conv feeding a BatchNorm has no bias (it would be subtracted away),
    every other conv has one. Catches the biases of the first conv and of the output being dropped again (the
    cgan projection D then collapsed at seed 0 on MNIST)."""
    net = make(bn)
    mods = [m for m in net.modules() if not isinstance(m, (nn.Sequential, nn.Identity, nn.LeakyReLU, nn.Dropout))]
    mods = [m for m in mods if m is not net and not isinstance(m, nn.Embedding)]
    convs = [i for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]
    assert len(convs) >= 2
    for i in convs:
        followed_by_bn = i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d)
        assert (mods[i].bias is None) == followed_by_bn, (i, mods[i], mods[i + 1] if i + 1 < len(mods) else None)


@pytest.mark.slow
def test_the_cgan_projection_recipe_trains_on_several_seeds(tmp_path, data_root, capsys):
    """The README's cgan CPU recipe (projection D, width 32, batch 64) on the fake data, 4 seeds x 800 steps: D must
    not win on any (no `d_won` row, D's loss over the last log lines above 0.05) and the samples must not all look
    alike (no `alike` row: grids every 250 steps) nor fall in one class. Catches a network change that
    lets D win at some seed, as dropping D's first and last biases did on MNIST at seed 0."""
    for seed in range(4):
        out = tmp_path / f"s{seed}"
        code, err = run_script(cgan, ["--dataset", "fake", "--d-cond", "projection", "--width", "32", "--batch-size",
                                      "64", "--max-steps", 800, "--eval-every", "0", "--eval-samples", "500",
                                      "--sample-every", "250", "--seed", seed, "--data-root", data_root, "--out", out],
                               capsys)
        assert code == 0, err
        rows = common.read_metrics(out / "metrics.jsonl")
        train = [r for r in rows if "loss_d" in r]
        assert not [r for r in rows if "d_won" in r or "alike" in r], (seed, err)
        assert sum(r["loss_d"] for r in train[-5:]) / 5 > 0.05, (seed, train[-5:])
        hist = [r for r in rows if "cls_hist" in r][-1]["cls_hist"]
        assert max(hist) <= 0.5, (seed, hist)
