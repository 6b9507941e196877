"""The smoke tier (`python -m pytest`): every script, through its real `main(argv)` on `--dataset fake`, trains a
few steps, writes its run files, generates from its checkpoint, resumes to more steps, and refuses one bad input.
Tiny widths, batches and step counts, so the whole tier takes a few minutes on a 2-core CPU; the full tier
(`python -m pytest -m full`) checks each of these things in depth."""
import json
import math

import numpy as np
import pytest
import torch

import cgan
import common
import dcgan
import infogan
import sagan
import sngan
import wgan_clip
import wgan_gp
from conftest import run_script

# Flags every script takes: the fake data set, tiny batches, a metrics line every step, a sample grid every 2
# steps, no evaluation during training (the final one still runs, on few samples).
BASE = ["--dataset", "fake", "--batch-size", "8", "--eval-samples", "20", "--log-every", "1", "--sample-every", "2",
        "--eval-every", "0"]

# script -> (module, its own flags, whether --generate writes labels, whether 2 steps make images that are not
# one grey: InfoGAN's G, from its N(0, 0.02) initialisation, still outputs ~0 everywhere, 127 in 8 bits).
# n_dis 2 where the default is more, so a D step counted as a G step (or the reverse) shows in the optimisers'
# step counts; wgan_clip without its 100-critic-step warm-up.
SCRIPTS = {
    "dcgan": (dcgan, ["--width", "4"], False, True),
    "cgan": (cgan, ["--width", "4"], True, True),
    "wgan_gp": (wgan_gp, ["--width", "4", "--n-dis", "2"], False, True),
    "wgan_clip": (wgan_clip, ["--width", "4", "--n-dis", "2", "--warmup-critic", "off"], False, True),
    "sngan": (sngan, ["--width", "2", "--n-dis", "2", "--conditional"], True, True),
    "infogan": (infogan, ["--width", "4"], True, False),
    "sagan": (sagan, ["--width", "2"], False, True),
}
STEPS, MORE = 2, 4


def train(name, tmp_path, data_root, steps=STEPS):
    module, own = SCRIPTS[name][:2]
    out = tmp_path / "run"
    code, _ = run_script(module, BASE + own + ["--max-steps", steps, "--out", out, "--data-root", data_root])
    assert code == 0
    return module, out


def optimiser_steps(state):
    """{opt_d, opt_g} -> the set of per-parameter step counts their state holds (Adam's and RMSProp's `step`)."""
    return {opt: {int(torch.as_tensor(s["step"]).item()) for s in state[opt]["state"].values()}
            for opt in ("opt_d", "opt_g")}


def is_weight(key):
    """A weight in a state dict, plain or under spectral norm (`...weight.original`), not SN's u/v buffers."""
    return key.endswith(("weight", "weight.original", "weight_orig"))


def expected_steps(state, steps):
    args = state["args"]
    return {"opt_d": {steps * args.get("n_dis", 1)}, "opt_g": {steps * args.get("n_gen", 1)}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    """One short training run per script, shared by the checks below (each script trains once per tier)."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = train(name, tmp_path_factory.mktemp(name), data_root)
        return made[name]
    return get


@pytest.mark.parametrize("name", SCRIPTS)
def test_training_steps_both_networks_and_writes_its_files(name, runs):
    """A few steps on fake data: D and G were each stepped the expected number of times (catches a loop that
    never calls one optimiser, or calls D's n_dis times per G step the wrong way round), every parameter of each
    has optimiser state (catches a layer left out of the graph), Adam/RMSProp saw non-zero gradients (catches
    detached losses), the logged losses are finite, and args.json, checkpoint.pt, the sample grids and
    losses.png are written (catches a run that trains but loses its output)."""
    module, out = runs(name)
    for f in ("args.json", "metrics.jsonl", "checkpoint.pt", "losses.png", "samples/step_0000002.png"):
        assert (out / f).is_file(), f
    assert json.loads((out / "args.json").read_text())["max_steps"] == STEPS
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss_d" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in rows)
    state = common.load_checkpoint(out / "checkpoint.pt", module.SCRIPT)
    assert state["step"] == STEPS
    assert optimiser_steps(state) == expected_steps(state, STEPS)
    for opt in ("opt_d", "opt_g"):
        n_params = sum(len(g["params"]) for g in state[opt]["param_groups"])
        assert len(state[opt]["state"]) == n_params, f"{opt}: some parameters never had a gradient"
        moments = [s[k] for s in state[opt]["state"].values() for k in ("exp_avg", "square_avg") if k in s]
        assert moments and any(m.abs().sum() > 0 for m in moments), f"{opt} saw only zero gradients"


@pytest.mark.parametrize("name", SCRIPTS)
def test_generate_from_the_checkpoint(name, runs, tmp_path):
    """--generate N --checkpoint writes generated.npz: N uint8 images of the data's shape (1x28x28 for fake),
    not all one value, with no dataset at hand; conditional models (and InfoGAN's categorical code) add N
    balanced int labels, unconditional ones none. Catches a generator rebuilt with the wrong shape or not
    loaded, float or [-1, 1] images, a --generate that needs the data set, and missing or unbalanced labels."""
    module, out = runs(name)
    conditional, varied = SCRIPTS[name][2:]
    code, _ = run_script(module, ["--generate", "20", "--checkpoint", out / "checkpoint.pt", "--out", tmp_path / "gen",
                                  "--data-root", tmp_path / "empty"])
    assert code == 0
    arrays = np.load(tmp_path / "gen" / "generated.npz")
    images = arrays["images"]
    assert images.shape == (20, 1, 28, 28) and images.dtype == np.uint8
    if varied:
        assert images.std() > 0
    if conditional:
        labels = arrays["labels"]
        assert labels.shape == (20,) and labels.dtype == np.int64
        counts = np.bincount(labels)
        assert counts.max() - counts.min() <= 1 and len(counts) >= 2, counts
    else:
        assert "labels" not in arrays.files


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_continues_to_more_steps(name, runs, tmp_path):
    """A bare `--resume run/checkpoint.pt --max-steps 4` on a 2-step run goes on in that run's directory to step 4:
    the optimisers' counts continue from the checkpoint's (not from zero), both networks' weights move again,
    and metrics.jsonl gains steps 3 and 4 after steps 1 and 2. Catches a resume that starts over, that restores
    the weights but not the optimisers, or that runs zero steps."""
    import shutil

    module, first = runs(name)
    out = tmp_path / "run"
    shutil.copytree(first, out)
    before = common.load_checkpoint(out / "checkpoint.pt", module.SCRIPT)
    assert run_script(module, ["--resume", out / "checkpoint.pt", "--max-steps", MORE])[0] == 0
    after = common.load_checkpoint(out / "checkpoint.pt", module.SCRIPT)
    assert after["step"] == MORE
    assert optimiser_steps(after) == expected_steps(after, MORE)
    for net in ("G", "D"):
        weights = [k for k in before[net] if is_weight(k)]
        assert weights and any(not torch.equal(before[net][k], after[net][k]) for k in weights), f"{net} did not move on resume"
    rows = [r["step"] for r in common.read_metrics(out / "metrics.jsonl") if "loss_d" in r]
    assert rows == list(range(1, MORE + 1))


@pytest.mark.parametrize("name", SCRIPTS)
def test_an_impossible_image_size_is_one_line_exit_2(name, tmp_path, capsys):
    """`--image-size 3` (no network makes 3x3 images) exits 2 with one line on stderr naming the problem, before
    any data is loaded or any file written. Catches a traceback, a crash deep in the first forward pass, or a
    run directory left behind by a refused command."""
    module = SCRIPTS[name][0]
    out = tmp_path / "x"
    code, err = run_script(module, ["--dataset", "fake", "--image-size", "3", "--out", out,
                                    "--data-root", tmp_path / "data"], capsys)
    assert code == 2, err
    assert "3x3" in err and "Traceback" not in err
    assert err.strip().count("\n") == 0, err
    assert not out.exists()
