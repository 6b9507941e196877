"""bf16 autocast: decided once per run, recorded, numerically safe where it matters, and resumable.

bf16 is forced on whatever CPU runs the suite by mocking the capability query (autocast works on
any CPU, only slowly where bf16 is emulated), so these tests mean the same on every machine.
"""
import json

import pytest
import torch

import common
import dcgan
import sngan
import wgan_clip
import wgan_gp
from conftest import run_script

FAST = ["--dataset", "fake", "--batch-size", "32", "--width", "8", "--eval-samples", "100", "--log-every", "1",
        "--sample-every", "100"]


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(common, "cpu_bf16_units", lambda: ["AVX512-BF16 (mocked)"])


def train_rows(out):
    return [r for r in common.read_metrics(out / "metrics.jsonl") if "loss_d" in r]


def test_bf16_losses_stay_finite_and_close_to_float32(tmp_path, data_root, native_bf16):
    """Catches a precision path that breaks the losses (e.g. a loss reduced in bf16, or autocast around the
    optimiser step): step 1 sees the same weights and batches in both runs, so only rounding differs."""
    rows = {}
    for name, extra in (("bf16", []), ("fp32", ["--no-amp"])):
        out = tmp_path / name
        assert run_script(dcgan, FAST + extra + ["--max-steps", "4", "--out", out, "--data-root", data_root])[0] == 0
        rows[name] = train_rows(out)
        precision = json.loads((out / "args.json").read_text())["resolved"]["precision"]
        assert precision.startswith("bf16" if name == "bf16" else "float32"), precision
    for key in ("loss_d", "loss_g"):
        b, f = rows["bf16"][0][key], rows["fp32"][0][key]
        assert abs(b - f) < 0.03 * abs(f), (key, b, f)
        assert all(abs(r[key]) < 1e3 for r in rows["bf16"])


def test_wasserstein_losses_are_reduced_in_float32(tmp_path, data_root, native_bf16, monkeypatch):
    """Scores near 50 keep 2-3 significant digits in bf16: the critic's means must be taken in float32.
    Catches a removed `.float()` before the loss in either WGAN script."""
    for module in (wgan_gp, wgan_clip):
        seen = []
        real_loss = module.critic_loss

        def spy(real, fake, real_loss=real_loss, seen=seen):
            seen.append((real.dtype, fake.dtype))
            return real_loss(real, fake)
        monkeypatch.setattr(module, "critic_loss", spy)
        extra = ["--warmup-critic", "off"] if module is wgan_clip else []
        out = tmp_path / module.SCRIPT
        assert run_script(module, FAST + extra + ["--max-steps", "2", "--out", out, "--data-root", data_root])[0] == 0
        assert seen and all(d == (torch.float32, torch.float32) for d in seen), seen
        # and the G step ran under bf16 autocast: the critic saw bf16 activations somewhere (precision recorded)
        assert json.loads((out / "args.json").read_text())["resolved"]["precision"].startswith("bf16")


def test_gradient_penalty_is_computed_in_float32(native_bf16, monkeypatch, tmp_path, data_root):
    """The penalty differentiates through a gradient; under autocast its inputs must still be float32."""
    seen = []
    real_gp = wgan_gp.gradient_penalty

    def spy(critic, real, fake, one_sided=False, eps=None):
        seen.append((real.dtype, fake.dtype, torch.is_autocast_enabled("cpu")))
        return real_gp(critic, real, fake, one_sided, eps)
    monkeypatch.setattr(wgan_gp, "gradient_penalty", spy)
    assert run_script(wgan_gp, FAST + ["--max-steps", "1", "--n-dis", "2", "--out", tmp_path / "r",
                                       "--data-root", data_root])[0] == 0
    assert seen == [(torch.float32, torch.float32, False)] * 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_in_each_precision(precision, tmp_path, data_root, native_bf16):
    """float32: resume is bit-exact. bf16: resume works and lands on the same weights (CPU kernels are
    deterministic); catches state (RNG, data position, optimiser) that is not saved or not restored."""
    extra = ["--no-amp"] if precision == "fp32" else []
    base = FAST + extra + ["--sample-every", "2", "--data-root", data_root]
    assert run_script(dcgan, base + ["--max-steps", "4", "--out", tmp_path / "full"])[0] == 0
    assert run_script(dcgan, base + ["--max-steps", "2", "--out", tmp_path / "part"])[0] == 0
    assert run_script(dcgan, ["--resume", tmp_path / "part" / "checkpoint.pt", "--max-steps", "4"])[0] == 0
    full, part = (common.load_checkpoint(tmp_path / r / "checkpoint.pt", "dcgan") for r in ("full", "part"))
    assert part["step"] == 4
    for net in ("G", "D"):
        for k, v in full[net].items():
            if precision == "fp32":
                assert torch.equal(v, part[net][k]), k
            else:
                assert torch.allclose(v.float(), part[net][k].float(), atol=1e-3), k


def test_sngan_heads_and_spectral_norm_stay_float32_under_autocast(native_bf16, monkeypatch):
    """Under bf16 autocast D's body runs in bf16, but its head (sum pooling, linear, projection) is float32, and the
    spectral norm's power iteration and sigma (torch.mv, which CUDA autocast would run in bf16) run with autocast
    off. Catches a removed `autocast(enabled=False)` in either place."""
    import argparse

    calls = []
    mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda *a, **k: calls.append(torch.is_autocast_enabled("cpu")) or mv(*a, **k))
    for arch, conditional in (("resnet", True), ("cnn", True), ("resnet", False), ("cnn", False)):
        # unconditional too: there a bf16 linear output has no float32 projection term to promote it
        args = argparse.Namespace(arch=arch, image_size=32, width=4, conditional=conditional, g_block="preact",
                                  d_arch="resnet", sn_iters=1, latent_dim=16)
        D = sngan.build_discriminator(args, 1, 10)
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = D(torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3]) if conditional else None)
        assert out.dtype == torch.float32, arch
        assert calls and not any(calls), (arch, calls)  # every power iteration ran with autocast off
