"""wgan_gp.py and wgan_clip.py: the penalty and the clipping against closed forms, and real training runs."""
import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import wgan_clip
import wgan_gp
from conftest import assert_same_training_state, check_bare_resume_kept_logging_flags, run_script, without

FAST = ["--dataset", "fake", "--batch-size", "16", "--width", "8", "--eval-samples", "200", "--log-every", "2"]


class LinearCritic(nn.Module):
    """D(x) = <w, x>: its gradient is w everywhere, so ||grad|| = ||w|| over all of (C, H, W)."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return (x * self.w).flatten(1).sum(1)


def test_gradient_penalty_equals_its_closed_form_on_a_linear_critic():
    torch.manual_seed(0)
    w = torch.randn(3, 5, 4)  # different values across channels, rows and columns
    critic = LinearCritic(w.clone())
    real, fake = torch.randn(8, 3, 5, 4), torch.randn(8, 3, 5, 4)
    gp, norms = wgan_gp.gradient_penalty(critic, real, fake)
    assert torch.allclose(norms, w.norm().expand(8), rtol=1e-5)  # the norm spans C, H and W together
    assert gp.item() == pytest.approx((w.norm().item() - 1) ** 2, rel=1e-5)
    # create_graph=True: the penalty's gradient reaches the critic's weights, d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    gp.backward()
    assert torch.allclose(critic.w.grad, 2 * (w.norm() - 1) * w / w.norm(), rtol=1e-4, atol=1e-6)


def test_one_sided_penalty_ignores_norms_below_one():
    w = torch.full((1, 4, 4), 0.1)  # ||w|| = 0.4
    real, fake = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    assert wgan_gp.gradient_penalty(LinearCritic(w), real, fake, one_sided=True)[0].item() == 0.0
    assert wgan_gp.gradient_penalty(LinearCritic(w), real, fake)[0].item() == pytest.approx(0.36, rel=1e-5)


def test_interpolation_weight_is_drawn_per_sample():
    """x_hat - fake = eps (real - fake) with one eps per sample: a per-pixel eps fails this."""
    torch.manual_seed(1)
    critic = LinearCritic(torch.randn(2, 6, 6))
    real, fake = torch.randn(16, 2, 6, 6), torch.randn(16, 2, 6, 6)
    wgan_gp.gradient_penalty(critic, real, fake)
    ratio = ((critic.seen - fake) / (real - fake)).flatten(1)
    eps = ratio[:, 0]
    assert torch.allclose(ratio, eps[:, None].expand_as(ratio), atol=1e-4)  # constant within a sample
    assert (eps >= 0).all() and (eps <= 1).all() and eps.std() > 0.1  # and varies between samples


def test_wasserstein_losses():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    assert wgan_gp.critic_loss(real, fake).item() == pytest.approx(-2.5)
    assert wgan_gp.generator_loss(fake).item() == pytest.approx(0.5)
    assert wgan_clip.critic_loss(real, fake).item() == pytest.approx(-2.5)


def test_gp_critic_has_no_batchnorm():
    for arch in ("dcgan", "resnet", "mlp"):
        args = argparse.Namespace(arch=arch, image_size=32, width=8, critic_norm="layer")
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in wgan_gp.build_critic(args, 3).modules())


def test_clipping_keeps_every_critic_weight_in_bounds():
    torch.manual_seed(0)
    critic = wgan_clip.Critic(1, 28, width=8)
    opt = torch.optim.RMSprop(critic.parameters(), lr=1.0)  # a huge step pushes weights far out
    critic(torch.randn(8, 1, 28, 28)).mean().backward()
    opt.step()
    assert max(p.abs().max().item() for p in critic.parameters()) > 0.5
    wgan_clip.clip_weights(critic, 0.01)
    assert all(p.abs().max().item() <= 0.01 for p in critic.parameters())
    assert wgan_clip.share_at_bound(critic, 0.01).item() > 0.5


def test_warmup_schedule():
    steps = [wgan_clip.critic_steps(g, 5, True) for g in range(1002)]
    assert steps[:25] == [100] * 25 and steps[25:500] == [5] * 475 and steps[500] == 100 and steps[1000] == 100
    assert steps[501] == 5 and wgan_clip.critic_steps(0, 5, False) == 5


@pytest.mark.figures
@pytest.mark.parametrize("arch, size", [("dcgan", 28), ("resnet", 32), ("mlp", 28)])
def test_wgan_gp_trains(arch, size, tmp_path, data_root):
    out = tmp_path / "run"
    flags = FAST if arch != "mlp" else without(FAST, "--width")  # the MLP has no width
    code, _ = run_script(wgan_gp, flags + ["--arch", arch, "--image-size", size, "--max-steps", "4", "--n-dis", "2",
                                          "--sample-every", "2", "--out", out, "--data-root", data_root])
    assert code == 0
    for name in ("metrics.jsonl", "checkpoint.pt", "losses.png", "interpolation.png", "progress.gif"):
        assert (out / name).exists(), name
    rows = common.read_metrics(out / "metrics.jsonl")
    logged = [r for r in rows if "loss_d" in r]
    assert len(logged) == 2 and all(math.isfinite(r["w_estimate"]) and r["gp"] >= 0 for r in logged)
    assert "cls_fid" in rows[-1]
    state = common.load_checkpoint(out / "checkpoint.pt", "wgan_gp")
    assert all(s["step"] == 8 for s in state["opt_d"]["state"].values())  # n_dis critic steps per G step
    assert all(s["step"] == 4 for s in state["opt_g"]["state"].values())


@pytest.mark.figures
@pytest.mark.parametrize("arch, bn", [("dcgan", "batch"), ("dcgan", "none"), ("mlp", None)])
def test_wgan_clip_trains_and_stays_clipped(arch, bn, tmp_path, data_root):
    out = tmp_path / "run"
    flags = FAST + ["--critic-norm", bn] if bn else without(FAST, "--width")
    code, _ = run_script(wgan_clip, flags + ["--arch", arch, "--max-steps", "3",
                                            "--sample-every", "3", "--out", out, "--data-root", data_root])
    assert code == 0
    state = common.load_checkpoint(out / "checkpoint.pt", "wgan_clip")
    # The warm-up ran 100 critic steps before each of the 3 G steps; RMSProp counted them.
    assert all(s["step"] == 300 for s in state["opt_d"]["state"].values())
    assert all(s["step"] == 3 for s in state["opt_g"]["state"].values())
    assert state["position"] == 300
    c = state["args"]["clip"]
    critic_params = [v for k, v in state["D"].items() if "running" not in k and "num_batches" not in k]
    assert all(v.abs().max().item() <= c for v in critic_params)
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "clip_share" in r]
    assert rows and 0 < rows[-1]["clip_share"] <= 1
    for name in ("losses.png", "interpolation.png", "progress.gif"):
        assert (out / name).exists(), name


@pytest.mark.parametrize("module", [wgan_gp, wgan_clip])
def test_wgan_resume_is_exact_and_generate_works(module, tmp_path, data_root):
    args = FAST + ["--sample-every", "2", "--data-root", data_root, "--eval-samples", "100", "--warmup-critic", "off"]
    if module is wgan_gp:
        args = [a for a in args if a not in ("--warmup-critic", "off")]
    args += ["--eval-every", "3"]
    assert run_script(module, args + ["--max-steps", "4", "--out", tmp_path / "full"])[0] == 0
    assert run_script(module, args + ["--max-steps", "2", "--out", tmp_path / "part"])[0] == 0
    first = json.loads((tmp_path / "part" / "args.json").read_text())
    assert run_script(module, ["--resume", tmp_path / "part" / "checkpoint.pt", "--max-steps", "4"])[0] == 0
    full, part = (common.load_checkpoint(tmp_path / r / "checkpoint.pt", module.SCRIPT) for r in ("full", "part"))
    assert part["step"] == 4
    # G, D, both optimisers (Adam's exp_avg / RMSProp's square_avg), position, RNG: as if never interrupted
    assert_same_training_state(full, part)
    check_bare_resume_kept_logging_flags(module, tmp_path / "part", first)
    assert run_script(module, ["--generate", "10", "--checkpoint", tmp_path / "full" / "checkpoint.pt",
                               "--data-root", tmp_path / "empty", "--out", tmp_path / "gen"])[0] == 0
    images = np.load(tmp_path / "gen" / "generated.npz")["images"]
    assert images.shape == (10, 1, 28, 28) and images.dtype == np.uint8


@pytest.mark.parametrize("module, argv, message", [
    (wgan_gp, ["--arch", "resnet", "--image-size", "28"], "cannot make 28x28"),
    (wgan_clip, ["--image-size", "30"], "cannot make 30x30"),
])
def test_wgan_bad_sizes(module, argv, message, tmp_path, capsys):
    code, err = run_script(module, ["--dataset", "fake", "--out", tmp_path / "x"] + argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err


def write_usps(path, n, seed):
    """A file in the format torchvision's USPS reads: `label i:v ...`, labels 1..10, values in [-1, 1]."""
    import bz2
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        img = -np.ones((16, 16))
        k = i % 10
        img[k:k + 4, 2:14] = 1.0  # a bar whose row says the class
        img += rng.uniform(0, 0.1, img.shape)
        lines.append(f"{k + 1} " + " ".join(f"{j + 1}:{v:.4f}" for j, v in enumerate(img.clip(-1, 1).flat)))
    with bz2.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")


def test_usps_16px_through_the_same_loader(tmp_path):
    write_usps(tmp_path / "usps.bz2", 200, 0)
    write_usps(tmp_path / "usps.t.bz2", 100, 1)
    data = common.load_dataset("usps", tmp_path)
    assert data.images.shape == (200, 1, 16, 16) and data.num_classes == 10
    assert data.labels[:3].tolist() == [0, 1, 2]
    out = tmp_path / "run"
    code, _ = run_script(wgan_gp, ["--dataset", "usps", "--data-root", tmp_path, "--batch-size", "16", "--width", "8",
                                   "--max-steps", "2", "--eval-samples", "100", "--out", out])
    assert code == 0
    assert common.read_metrics(out / "metrics.jsonl")[-1]["cls_fid"] >= 0  # the 16 px classifier was trained and used
    assert (tmp_path / "classifiers" / "usps-16px.pt").exists()
