"""cgan.py: losses against their formulas, conditioning, and real training runs on the fake data."""
import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import cgan
import common
from conftest import assert_same_training_state, check_bare_resume_kept_logging_flags, run_script, without

FAST = ["--dataset", "fake", "--batch-size", "32", "--width", "8", "--eval-samples", "200", "--log-every", "2"]


def test_generator_losses_equal_their_formulas():
    logits = torch.tensor([-3.0, -0.5, 0.0, 2.0])
    d = torch.sigmoid(logits)
    # vanilla: G minimises E log(1 - D(G(z))); ns: G minimises -E log D(G(z))
    assert cgan.g_loss(logits, "vanilla").item() == pytest.approx(torch.log(1 - d).mean().item(), rel=1e-6)
    assert cgan.g_loss(logits, "ns").item() == pytest.approx(-torch.log(d).mean().item(), rel=1e-6)
    real = torch.tensor([1.0, -2.0])
    assert cgan.d_loss(real, logits[:2]).item() == pytest.approx(
        (-torch.log(torch.sigmoid(real)).mean() - torch.log(1 - d[:2]).mean()).item(), rel=1e-6)
    big = torch.tensor([-200.0, 200.0])  # stable where sigmoid + log would give inf
    assert all(math.isfinite(cgan.g_loss(big, k).item()) for k in ("vanilla", "ns"))


def test_vanilla_loss_saturates_where_ns_does_not():
    """When D confidently rejects fakes (logit -10), the minimax loss gives G almost no gradient."""
    grads = {}
    for kind in ("vanilla", "ns"):
        logit = torch.tensor([-10.0], requires_grad=True)
        cgan.g_loss(logit, kind).backward()
        grads[kind] = logit.grad.abs().item()
    assert grads["vanilla"] < 1e-4 < 0.99 < grads["ns"]


@pytest.mark.parametrize("d_cond", ["none", "concat", "projection"])
@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
def test_discriminator_conditioning(d_cond, arch):
    torch.manual_seed(0)
    args = argparse.Namespace(arch=arch, image_size=28, width=8, d_cond=d_cond, d_dropout=0.0,
                              spectral_norm="none", sn_iters=1, latent_dim=16, g_cond="onehot")
    D = cgan.build_discriminator(args, 1, 10).eval()
    G = cgan.build_generator(args, 1, 10)
    x = G(torch.randn(4, 16), torch.arange(4))
    assert x.shape == (4, 1, 28, 28)
    with torch.no_grad():
        a, b = D(x, torch.zeros(4, dtype=torch.long)), D(x, torch.full((4,), 7))
    assert a.shape == (4,)
    # The label changes D's output exactly when D is conditional.
    assert torch.allclose(a, b) == (d_cond == "none")


def test_generator_uses_the_label():
    torch.manual_seed(0)
    for g_cond in ("onehot", "embed"):
        G = cgan.Generator(16, 1, 28, 10, width=8, g_cond=g_cond).eval()
        z = torch.randn(2, 16)
        with torch.no_grad():
            assert not torch.allclose(G(z, torch.tensor([0, 0])), G(z, torch.tensor([3, 3])))


WEIGHT_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)


@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
def test_spectral_norm_placement(arch):
    """Every conv/linear/embedding weight of a normalised net is spectrally normalised, and none of the other net's.
    Catches add_spectral_norm missing a layer type (e.g. the projection embedding or G's class embedding: an
    any() check passes as soon as one layer is normalised) or normalising the wrong network."""
    base = dict(arch=arch, image_size=28, width=8, d_cond="projection", d_dropout=0.0, sn_iters=3,
                latent_dim=16, g_cond="embed")
    for where, in_g, in_d in (("none", False, False), ("d", False, True), ("g", True, False), ("both", True, True)):
        args = argparse.Namespace(spectral_norm=where, **base)
        G, D = cgan.build_generator(args, 1, 10), cgan.build_discriminator(args, 1, 10)
        for net, wanted in ((G, in_g), (D, in_d)):
            layers = [m for m in net.modules() if isinstance(m, WEIGHT_LAYERS)]
            assert any(isinstance(m, nn.Embedding) for m in layers)  # G's class embedding, D's projection
            normalised = [nn.utils.parametrize.is_parametrized(m, "weight") for m in layers]
            assert normalised == [wanted] * len(layers), (where, type(net).__name__, normalised)
            if wanted:  # power iterations as asked, in every layer
                assert all(m.parametrizations.weight[0].n_power_iterations == 3 for m in layers)
        if in_d:  # a spectrally normalised D drops its BatchNorm
            assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())


@pytest.mark.figures
@pytest.mark.parametrize("d_cond, loss", [("none", "vanilla"), ("concat", "ns"), ("projection", "ns"),
                                          ("concat", "vanilla")])
def test_cgan_trains(d_cond, loss, tmp_path, data_root):
    out = tmp_path / "run"
    code, _ = run_script(cgan, FAST + ["--d-cond", d_cond, "--loss", loss, "--max-steps", "4", "--sample-every", "2",
                                       "--out", out, "--data-root", data_root])
    assert code == 0
    for name in ("metrics.jsonl", "checkpoint.pt", "losses.png", "interpolation.png", "progress.gif",
                 "class_histogram.png", "predictions.png", "samples/step_0000004.png"):
        assert (out / name).exists(), name
    rows = common.read_metrics(out / "metrics.jsonl")
    assert all(math.isfinite(r["loss_g"]) for r in rows if "loss_g" in r)
    assert 0 <= rows[-1]["cls_acc"] <= 1 and abs(sum(rows[-1]["cls_hist"]) - 1) < 1e-9
    if loss == "vanilla":
        assert all(r["loss_g"] < 0 for r in rows if "loss_g" in r)  # log(1 - D) is negative
    state = common.load_checkpoint(out / "checkpoint.pt", "cgan")
    assert all(s["step"] == 4 for s in state["opt_d"]["state"].values())
    assert all(s["step"] == 4 for s in state["opt_g"]["state"].values())


def test_cgan_spectral_norm_mlp_embed_run(tmp_path, data_root):
    out = tmp_path / "run"
    mlp = without(FAST, "--width")  # the MLP has no width
    code, _ = run_script(cgan, mlp + ["--arch", "mlp", "--g-cond", "embed", "--spectral-norm", "both", "--sn-iters", "2",
                                       "--n-dis", "2", "--d-dropout", "0.3", "--max-steps", "3", "--out", out,
                                       "--data-root", data_root])
    assert code == 0
    state = common.load_checkpoint(out / "checkpoint.pt", "cgan")
    assert any("parametrizations" in k for k in state["D"]) and any("parametrizations" in k for k in state["G"])
    assert all(s["step"] == 6 for s in state["opt_d"]["state"].values())


def test_cgan_resume_and_balanced_generate(tmp_path, data_root):
    """Resume ends in the uninterrupted run's state (G, D, both optimisers, position, RNG), keeps the logging flags;
    --generate writes balanced labels."""
    args = FAST + ["--sample-every", "2", "--data-root", data_root, "--eval-samples", "100", "--d-cond", "projection",
                   "--eval-every", "3"]
    assert run_script(cgan, args + ["--max-steps", "4", "--out", tmp_path / "full"])[0] == 0
    assert run_script(cgan, args + ["--max-steps", "2", "--out", tmp_path / "part"])[0] == 0
    first = json.loads((tmp_path / "part" / "args.json").read_text())
    assert run_script(cgan, ["--resume", tmp_path / "part" / "checkpoint.pt", "--max-steps", "4"])[0] == 0
    full, part = (common.load_checkpoint(tmp_path / r / "checkpoint.pt", "cgan") for r in ("full", "part"))
    assert_same_training_state(full, part)
    check_bare_resume_kept_logging_flags(cgan, tmp_path / "part", first)
    assert run_script(cgan, ["--generate", "25", "--checkpoint", tmp_path / "full" / "checkpoint.pt",
                             "--data-root", tmp_path / "empty", "--out", tmp_path / "gen"])[0] == 0
    arrays = np.load(tmp_path / "gen" / "generated.npz")
    assert arrays["images"].shape == (25, 1, 28, 28) and arrays["images"].dtype == np.uint8
    assert arrays["labels"].dtype == np.int64
    assert np.bincount(arrays["labels"], minlength=10).tolist() == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]
