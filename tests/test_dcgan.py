"""dcgan.py: networks, losses, and real training runs on the fake data set."""
import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import dcgan
from conftest import ROOT, assert_same_training_state, check_bare_resume_kept_logging_flags, run_script, without

FAST = ["--dataset", "fake", "--batch-size", "32", "--width", "16", "--eval-samples", "500", "--log-every", "2"]


@pytest.mark.parametrize("size", [16, 28, 32, 48, 64])
def test_networks_make_the_size(size):
    G = dcgan.Generator(100, 3, size, width=8)
    D = dcgan.Discriminator(3, size, width=8)
    x = G(torch.randn(4, 100))
    assert x.shape == (4, 3, size, size) and x.abs().max() <= 1
    assert D(x).shape == (4,)


@pytest.mark.parametrize("size", [30, 27, 8])
def test_impossible_sizes_are_refused(size):
    with pytest.raises(common.UsageError, match="cannot make"):
        dcgan.Generator(100, 1, size)


def test_batchnorm_is_not_misconfigured():
    """Guards against BatchNorm2d(n, 0.8), which sets eps = 0.8, not the momentum."""
    for net in (dcgan.Generator(100, 1, 28), dcgan.Discriminator(1, 28), dcgan.MLPGenerator(100, 1, 28)):
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert m.eps == 1e-5 and m.momentum == 0.1
    first = dcgan.Discriminator(1, 64).net
    assert not any(isinstance(m, nn.BatchNorm2d) for m in first[:2])  # none on D's input layer


def test_losses_equal_their_formulas_and_are_stable():
    real, fake = torch.tensor([2.0, -1.0, 0.3]), torch.tensor([-0.5, 1.5, 0.0])
    d = -(torch.log(torch.sigmoid(real)).mean() + torch.log(1 - torch.sigmoid(fake)).mean())
    g = -torch.log(torch.sigmoid(fake)).mean()
    assert dcgan.d_loss(real, fake).item() == pytest.approx(d.item(), rel=1e-6)
    assert dcgan.g_loss(fake).item() == pytest.approx(g.item(), rel=1e-6)
    bce = F.binary_cross_entropy_with_logits
    expected = bce(real, torch.ones(3)) + bce(fake, torch.zeros(3))
    assert dcgan.d_loss(real, fake).item() == pytest.approx(expected.item(), rel=1e-6)
    big = torch.tensor([100.0, -100.0])
    assert math.isfinite(dcgan.d_loss(big, -big).item()) and math.isfinite(dcgan.g_loss(-big).item())


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.figures
@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
def test_training_really_happens(arch, tmp_path, data_root):
    out = tmp_path / "run"
    flags = FAST if arch == "dcgan" else without(FAST, "--width")  # the MLP has no width
    code, _ = run_script(dcgan, flags + ["--arch", arch, "--max-steps", "8", "--n-dis", "2", "--sample-every", "4",
                                        "--out", out, "--data-root", data_root])
    assert code == 0
    for name in ("args.json", "metrics.jsonl", "checkpoint.pt", "losses.png", "interpolation.png", "progress.gif",
                 "class_histogram.png", "predictions.png",
                 "samples/step_0000000.png", "samples/step_0000004.png", "samples/step_0000008.png"):
        assert (out / name).exists(), name
    rows = read_jsonl(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss_d" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) and r["images_per_s"] > 0 for r in train_rows)
    assert "cls_fid" in rows[-1] and len(rows[-1]["cls_hist"]) == 10
    state = common.load_checkpoint(out / "checkpoint.pt", "dcgan")
    assert state["step"] == 8 and state["position"] == 16  # 2 real batches per step
    # Adam counted its updates: 2 D steps and 1 G step per iteration.
    assert all(s["step"] == 16 for s in state["opt_d"]["state"].values())
    assert all(s["step"] == 8 for s in state["opt_g"]["state"].values())
    # And the weights moved away from their initialisation.
    args = argparse.Namespace(**state["args"])
    torch.manual_seed(args.seed)
    G0 = dcgan.build_generator(args, 1)
    moved = [not torch.equal(p0, state["G"][k]) for k, p0 in G0.state_dict().items() if k.endswith("weight")]
    assert all(moved)


def test_resume_is_exact(tmp_path, data_root, capsys):
    """A run stopped at step 3 and resumed to 6 ends in the state of an uninterrupted 6-step run: G, D, both
    optimisers (exp_avg etc.), data position, RNG. A bare --resume keeps the checkpoint's logging flags; a typed
    one overrides; a typed model flag is refused in one line."""
    common_args = FAST + ["--width", "8", "--sample-every", "3", "--data-root", data_root, "--eval-samples", "100",
                          "--eval-every", "5"]
    assert run_script(dcgan, common_args + ["--max-steps", "6", "--out", tmp_path / "full"])[0] == 0
    assert run_script(dcgan, common_args + ["--max-steps", "3", "--out", tmp_path / "part"])[0] == 0
    ckpt = tmp_path / "part" / "checkpoint.pt"
    first = json.loads((tmp_path / "part" / "args.json").read_text())
    # Only typed RESUMABLE flags override (catches a merge that takes every RESUMABLE flag's parser default).
    typed, _ = common.resume(dcgan.parse_args(["--resume", str(ckpt), "--log-every", "3"]), "dcgan")
    assert typed.log_every == 3 and typed.eval_samples == 100 and typed.sample_every == 3 and typed.eval_every == 5
    assert typed.width == 8 and typed.out == str(tmp_path / "part")
    # A model flag cannot change on resume: one line, exit 2, nothing run.
    capsys.readouterr()
    code, err = run_script(dcgan, ["--resume", ckpt, "--max-steps", "6", "--lr-g", "1e-3"], capsys)
    assert code == 2 and "--lr-g" in err and "Traceback" not in err and err.strip().count("\n") == 0
    assert run_script(dcgan, ["--resume", ckpt, "--max-steps", "6"])[0] == 0
    full = common.load_checkpoint(tmp_path / "full" / "checkpoint.pt", "dcgan")
    part = common.load_checkpoint(ckpt, "dcgan")
    assert part["step"] == 6
    assert_same_training_state(full, part)
    check_bare_resume_kept_logging_flags(dcgan, tmp_path / "part", first)


def test_generate_needs_no_dataset(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    assert run_script(dcgan, FAST + ["--max-steps", "2", "--out", out, "--data-root", data_root])[0] == 0
    code, _ = run_script(dcgan, ["--generate", "37", "--checkpoint", out / "checkpoint.pt",
                                 "--data-root", tmp_path / "empty", "--out", tmp_path / "gen"], capsys)
    assert code == 0
    arrays = np.load(tmp_path / "gen" / "generated.npz")
    assert arrays["images"].shape == (37, 1, 28, 28) and arrays["images"].dtype == np.uint8
    assert arrays["images"].std() > 0


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--dataset", "fake", "--image-size", "30"], "cannot make 30x30"),
    (["--dataset", "fake", "--batch-size", "0"], "must be at least 1"),
    (["--generate", "5"], "needs --checkpoint"),
])
def test_bad_input_is_one_clear_line(argv, message, tmp_path, capsys):
    code, err = run_script(dcgan, argv + ["--out", tmp_path / "x", "--data-root", tmp_path], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.strip().count("\n") == 0


def test_missing_dataset_and_foreign_checkpoint(tmp_path, monkeypatch, capsys):
    import torchvision.datasets as tvd
    monkeypatch.setattr(tvd.MNIST, "download", lambda self: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(common, "SYSTEM_DATA", tmp_path / "nowhere")
    code, err = run_script(dcgan, ["--dataset", "mnist", "--data-root", tmp_path, "--out", tmp_path / "x"], capsys)
    assert code == 2 and "mnist not found" in err and str(tmp_path / "MNIST" / "raw") in err
    foreign = tmp_path / "foreign.pt"
    common.save_checkpoint(foreign, {"script": "wgan_gp", "args": {}})
    code, err = run_script(dcgan, ["--resume", foreign], capsys)
    assert code == 2 and "written by wgan_gp.py, not dcgan.py" in err
    foreign.write_bytes(foreign.read_bytes()[:50])
    code, err = run_script(dcgan, ["--generate", "3", "--checkpoint", foreign], capsys)
    assert code == 2 and "cannot be read" in err and "Traceback" not in err


@pytest.mark.figures
def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_root, monkeypatch, capsys):
    calls = {"n": 0}
    real_loss = dcgan.d_loss

    def poisoned(r, f):
        calls["n"] += 1
        loss = real_loss(r, f)
        return loss * float("nan") if calls["n"] > 7 else loss  # the 8th D step diverges
    monkeypatch.setattr(dcgan, "d_loss", poisoned)
    out = tmp_path / "run"
    code, err = run_script(dcgan, FAST + ["--max-steps", "20", "--sample-every", "3", "--log-every", "1",
                                          "--out", out, "--data-root", data_root], capsys)
    assert code == 1
    assert re.search(r"loss_d.* became non-finite at step 8; stopped", err) and "(step 6)" in err
    state = common.load_checkpoint(out / "checkpoint.pt", "dcgan")
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["G"].values() if v.is_floating_point())
    assert (out / "losses.png").exists()


def test_ctrl_c_keeps_a_loadable_checkpoint_and_plots(tmp_path, data_root):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "dcgan.py")] + FAST + ["--max-steps", "100000", "--log-every", "1",
                                                              "--out", str(out), "--data-root", str(data_root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "Traceback" not in err
    state = common.load_checkpoint(out / "checkpoint.pt", "dcgan")
    assert state["step"] > 0
    assert (out / "losses.png").exists() and (out / "progress.gif").exists()
    assert not any(name.endswith(".tmp") for name in os.listdir(out))
