"""Edge cases: the mathematics' harder cases (FID, IS), samplers in eval mode, devices, precision and random
streams, the run schedule's corners, --out and resume hygiene, and other degenerate inputs (bad values:
test_bad_input.py). The short runs that check each script learns in the right direction: test_learning_direction.py.

Each test's docstring names the plausible bug it catches.
"""
import json
import math
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cgan
import common
import dcgan
import sagan
import sngan
import wgan_clip
import wgan_gp
from conftest import run_script

TINY = ["--dataset", "fake", "--batch-size", "32", "--width", "8", "--eval-samples", "100", "--sample-every", "1000"]


def run(module, argv, capsys):
    """module.main(argv) with argv passed as given (Path objects too); returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = 0
    try:
        module.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def steps(rows, key):
    return [r["step"] for r in rows if key in r]


def grids(out):
    return sorted(int(p.stem[5:]) for p in (Path(out) / "samples").glob("step_*.png"))


# ----------------------------------------------------------------------------------------------
# FID and IS: the cases that tell a right formula from a plausible wrong one
# ----------------------------------------------------------------------------------------------

def _sqrtm_sym(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_fid_with_covariances_that_do_not_commute():
    """tr (S1 S2)^(1/2) = sum sqrt(eig(S1 S2)) (real, >= 0: S1 S2 is similar to S1^(1/2) S2 S1^(1/2)). Catches the
    classic tr(sqrtm(S1) sqrtm(S2)), equal to it only when S1 and S2 commute, i.e. in every closed form of
    test_math (diagonal covariances, a scaled copy)."""
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    eig = np.linalg.eigvals(s1 @ s2)
    assert np.abs(eig.imag).max() < 1e-8 and eig.real.min() > 0
    base = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
    expected = base - 2 * np.sqrt(eig.real).sum()
    assert common.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert common.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)  # symmetric
    wrong = base - 2 * np.trace(_sqrtm_sym(s1) @ _sqrtm_sym(s2))
    assert abs(wrong - expected) > 0.1 * expected  # the case really separates the two formulas


def test_inception_score_is_the_exp_of_the_mean_kl():
    """Half confident (one-hot, every class equally often), half uniform predictions: p(y) is uniform, the KLs are
    log 10 and 0, so IS = exp(log(10) / 2) = sqrt(10). Catches mean(exp(KL)) = (10 + 1) / 2 = 5.5, and a KL
    taken against the wrong marginal."""
    probs = torch.cat([torch.eye(10).repeat(10, 1), torch.full((100, 10), 0.1)])
    mean, std = common.inception_score(probs, splits=1)
    assert mean == pytest.approx(math.sqrt(10), rel=1e-9) and std == 0.0
    assert abs(mean - 5.5) > 1


def test_inception_score_uses_exactly_the_splits_asked_for():
    """15 one-hot predictions of 15 different classes: a split of m of them scores exactly m. Ten splits of sizes
    2,2,2,2,2,1,1,1,1,1 give mean 1.5 and (population, as numpy's std in Salimans et al.'s code) std 0.5.
    Catches chunk() (8 splits of 2,...,2,1: mean 1.875), floor(N / splits)-sized splits that drop samples
    (mean 1), and the unbiased std (0.527)."""
    mean, std = common.inception_score(torch.eye(15), splits=10, generator=torch.Generator().manual_seed(0))
    assert mean == pytest.approx(1.5, rel=1e-12) and std == pytest.approx(0.5, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Sampling mode
# ----------------------------------------------------------------------------------------------

SAMPLERS = {
    "dcgan": lambda: (dcgan.Generator(16, 1, 28, width=8), dcgan.sample_images),
    "dcgan-mlp": lambda: (dcgan.MLPGenerator(16, 1, 28), dcgan.sample_images),
    "cgan": lambda: (cgan.Generator(16, 1, 28, 10, width=8),
                     lambda G, z: cgan.sample_images(G, z, torch.arange(len(z)) % 10)),
    "cgan-mlp": lambda: (cgan.MLPGenerator(16, 1, 28, 10, g_cond="embed"),
                         lambda G, z: cgan.sample_images(G, z, torch.arange(len(z)) % 10)),
    "wgan_gp": lambda: (wgan_gp.Generator(16, 1, 28, width=8), wgan_gp.sample_images),
    "wgan_gp-resnet": lambda: (wgan_gp.ResNetGenerator(16, 1, 32, width=8), wgan_gp.sample_images),
    "wgan_clip": lambda: (wgan_clip.Generator(16, 1, 28, width=8), wgan_clip.sample_images),
    "sngan-resnet": lambda: (sngan.ResNetGenerator(16, 1, 32, width=4), sngan.sample_images),
    "sngan-cnn-cond": lambda: (sngan.CNNGenerator(16, 1, 32, width=4, num_classes=10),
                               lambda G, z: sngan.sample_images(G, z, torch.arange(len(z)) % 10)),
    "sagan": lambda: (sagan.Generator(16, 1, 28, width=4, attn_sizes=[7, 14]), sagan.sample_images),
    "sagan-cond": lambda: (sagan.Generator(16, 1, 32, width=4, num_classes=10, attn_sizes=[16]),
                           lambda G, z: sagan.sample_images(G, z, torch.arange(len(z)) % 10)),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_use_eval_mode_and_restore_train_mode(name):
    """sample_images draws with BatchNorm's running statistics: a sample does not depend on the others in its batch
    (G(z[:1]) is the first row of G(z)), the running statistics are not updated, no graph is recorded, and G is
    back in train mode afterwards. Catches sampling in train mode (batch statistics; under no_grad it even
    updates the running statistics), and a sampler that leaves G in eval mode for the next training step."""
    torch.manual_seed(0)
    G, sample = SAMPLERS[name]()
    z = torch.randn(6, 16)
    conditional = name.startswith("cgan") or name.endswith("-cond")
    forward = (lambda zz: G(zz, torch.arange(len(zz)) % 10)) if conditional else G
    forward(torch.randn(8, 16))  # one training-mode forward: running statistics away from their initial (0, 1)
    # The check can fail: in train mode a sample depends on its batch.
    with torch.no_grad():
        assert not torch.allclose(forward(z)[:2], forward(z[:2]), atol=1e-4)
    buffers = {k: v.clone() for k, v in G.named_buffers()}
    batch, one = sample(G, z), sample(G, z[:1])
    assert torch.allclose(batch[:1], one, atol=1e-5)
    assert all(torch.equal(v, buffers[k]) for k, v in G.named_buffers())
    assert not batch.requires_grad
    assert G.training and all(m.training for m in G.modules())


# ----------------------------------------------------------------------------------------------
# The run's schedule: time limit, epochs, in-loop evaluation, --n-gen, the last log rows
# ----------------------------------------------------------------------------------------------

def test_time_limit_stops_the_run_and_each_eval_step_is_evaluated_once(tmp_path, data_root, capsys):
    """--max-minutes ends a run meant for 100000 steps: exit 0, the summary says 'time limit', the checkpoint holds
    the last step. With --eval-every 1 every step is evaluated in the loop, exactly once: catches finish()
    repeating the evaluation of a step just evaluated (the case a time limit creates: in-loop evaluation at
    the last step), a limit that is never checked, and a checkpoint not written at the stop."""
    out = tmp_path / "run"
    code, stdout, _ = run(dcgan, TINY + ["--batch-size", "16", "--max-steps", "100000", "--max-minutes", "0.05",
                                         "--eval-every", "1", "--log-every", "1", "--out", out,
                                         "--data-root", data_root], capsys)
    assert code == 0
    state = common.load_checkpoint(out / "checkpoint.pt", "dcgan")
    last = state["step"]
    assert 0 < last < 1000 and "time limit" in stdout and f" at step {last} " in stdout
    rows = common.read_metrics(out / "metrics.jsonl")
    assert steps(rows, "loss_d") == list(range(1, last + 1))
    assert steps(rows, "cls_fid") == list(range(1, last + 1))


def test_epoch_cap_n_gen_log_tail_eval_fields_and_path_argv(tmp_path, data_root, capsys):
    """One 5-step run, several schedule corners:
    --epochs 1 of 1024 images at batch 100 is 10 batches; with --n-dis 2 that is 5 G steps (catches a cap that
    ignores n_dis or counts G steps as batches); --n-gen 2 makes 2 Adam steps of G per step (catches a loop that
    ignores it); --log-every 2 logs steps 2, 4 and the tail 5 (catches dropping the statistics after the last
    multiple); the evaluation row says what produced it; --no-amp reaches the run; and pathlib.Path objects in
    argv (a notebook's main([...])) give a JSON args.json and a loadable checkpoint (catches Paths leaking into
    json.dumps or torch.save)."""
    out = tmp_path / "run"
    argv = ["--dataset", "fake", "--width", "8", "--eval-samples", "100", "--batch-size", "100", "--epochs", "1",
            "--n-dis", "2", "--n-gen", "2", "--log-every", "2", "--no-amp", "--out", out, "--data-root", data_root]
    code, stdout, _ = run(dcgan, argv, capsys)
    assert code == 0 and "done (--epochs 1 reached) at step 5 (epoch 1," in stdout
    state = common.load_checkpoint(out / "checkpoint.pt", "dcgan")
    assert state["step"] == 5 and state["position"] == 10
    assert all(s["step"] == 10 for s in state["opt_d"]["state"].values())
    assert all(s["step"] == 10 for s in state["opt_g"]["state"].values())
    assert state["args"]["out"] == str(out) and state["args"]["data_root"] == str(data_root)
    rows = common.read_metrics(out / "metrics.jsonl")
    assert steps(rows, "loss_d") == [2, 4, 5]
    evals = [r for r in rows if "cls_fid" in r]
    assert [r["step"] for r in evals] == [5]
    assert "classifier" in evals[0]["eval_source"] and evals[0]["n_gen"] == 100 and evals[0]["n_real"] == 100
    assert evals[0]["real_split"] == "train"
    saved = json.loads((out / "args.json").read_text())
    assert saved["out"] == str(out) and saved["resolved"]["precision"] == "float32 (--no-amp)"


# ----------------------------------------------------------------------------------------------
# --out and metrics.jsonl hygiene
# ----------------------------------------------------------------------------------------------

def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_used_out_is_refused_untouched_and_overwrite_starts_a_clean_log(tmp_path, data_root, capsys):
    """A fresh run into a used --out exits 2 in one line and changes no byte there (catches a check made after
    args.json or metrics.jsonl were rewritten). With --overwrite the old run's rows and grids are gone (catches
    appending to the old metrics.jsonl, or a progress.gif showing the old run's frames) and the user's own
    files stay."""
    out = tmp_path / "run"
    base = TINY + ["--data-root", data_root, "--out", out]
    assert run_script(dcgan, base + ["--max-steps", "4", "--log-every", "2", "--sample-every", "2"])[0] == 0
    before = _snapshot(out)
    code, _, err = run(dcgan, base + ["--max-steps", "3"], capsys)
    assert code == 2 and "already holds a run" in err and err.strip().count("\n") == 0
    assert _snapshot(out) == before
    (out / "notes.txt").write_text("mine")
    (out / "mine.png").write_bytes(b"not the run's")  # a user's picture: --overwrite deletes only the run's by name
    assert run_script(dcgan, base + ["--max-steps", "3", "--log-every", "1", "--overwrite"])[0] == 0
    assert (out / "mine.png").read_bytes() == b"not the run's"
    rows = common.read_metrics(out / "metrics.jsonl")
    assert steps(rows, "loss_d") == [1, 2, 3] and steps(rows, "cls_fid") == [3]
    assert grids(out) == [0, 3]
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_drops_what_came_after_its_checkpoint(tmp_path, data_root):
    """Resuming a checkpoint older than the log (as after a crash between a checkpoint and the next) drops the later
    rows and sample grids: steps strictly increase, no grid beyond the run's end. Resuming into another, empty
    --out takes the rows up to the checkpoint's step along. Catches appending to the old log (repeated steps),
    stale grids in progress.gif, and a resumed run elsewhere whose plots start at the checkpoint."""
    out = tmp_path / "run"
    assert run_script(dcgan, TINY + ["--max-steps", "2", "--log-every", "1", "--sample-every", "2",
                                     "--data-root", data_root, "--out", out])[0] == 0
    shutil.copy(out / "checkpoint.pt", out / "step2.pt")
    assert run_script(dcgan, ["--resume", out / "checkpoint.pt", "--max-steps", "4"])[0] == 0
    rows = common.read_metrics(out / "metrics.jsonl")
    assert steps(rows, "loss_d") == [1, 2, 3, 4] and steps(rows, "cls_fid") == [2, 4] and grids(out) == [0, 2, 4]
    assert run_script(dcgan, ["--resume", out / "step2.pt", "--max-steps", "3"])[0] == 0  # behind the log now
    rows = common.read_metrics(out / "metrics.jsonl")
    assert steps(rows, "loss_d") == [1, 2, 3] and steps(rows, "cls_fid") == [2, 3]
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    assert grids(out) == [0, 2, 3]
    other = tmp_path / "other"
    assert run_script(dcgan, ["--resume", out / "step2.pt", "--max-steps", "3", "--out", other])[0] == 0
    moved = common.read_metrics(other / "metrics.jsonl")
    assert [r for r in moved if r["step"] <= 2] == [r for r in rows if r["step"] <= 2]
    assert steps(moved, "loss_d") == [1, 2, 3] and steps(moved, "cls_fid") == [2, 3] and grids(other) == [3]


# ----------------------------------------------------------------------------------------------
# Devices, precision and random streams (what a CPU can check)
# ----------------------------------------------------------------------------------------------

def test_batches_come_out_on_the_requested_device_dtype_and_layout():
    """Batches of CPU data for another device (meta: no memory, any machine) come out there, as float32 in the
    requested memory format, labels int64. Catches batches left on the data's device and a lost memory format."""
    g = torch.Generator().manual_seed(0)  # 3 channels: with 1, NCHW-contiguous is channels_last-contiguous too
    data = common.ImageData("rgb", torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g),
                            torch.arange(64) % 10, 10)
    x, y = common.Batches(data, 16, seed=0, device="meta", memory_format=torch.channels_last).next()
    assert x.device.type == "meta" and y.device.type == "meta"
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (16, 3, 8, 8)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    x, y = common.Batches(data, 16, seed=0).next()  # default: the data's device, plain layout, values in [-1, 1]
    assert x.device.type == "cpu" and x.is_contiguous() and -1 <= x.min() and x.max() <= 1


def test_data_home_decides_by_free_memory(monkeypatch):
    """CUDA: the dataset goes to the GPU when under half of the free memory, else stays on the host; MPS: below 2**31
    bytes. Catches a comparison the wrong way round and total instead of free memory."""
    nbytes = 1000
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2002, 10**9))  # half: 1001 > 1000
    assert common.data_home(nbytes, "cuda").type == "cuda"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1998, 10**9))
    assert common.data_home(nbytes, "cuda").type == "cpu"
    assert common.data_home(2**31, "mps").type == "cpu"
    assert common.data_home(nbytes, "mps").type == "mps"
    assert common.data_home(nbytes, "cpu").type == "cpu"


def test_precision_decides_per_device(monkeypatch):
    """bf16 autocast only where the hardware computes bf16: CUDA capability >= 8.0, a CPU with AMX or AVX512-BF16;
    float32 on older GPUs (V100/T4 emulate bf16), plain CPUs, MPS and with --no-amp. Catches using
    torch.cuda.is_bf16_supported() (True on a V100), an inverted CPU check, and --no-amp being ignored."""
    caps = {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: caps["cap"])
    cuda = torch.device("cuda")
    for cap, dtype in (((7, 0), None), ((7, 5), None), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        caps["cap"] = cap
        assert common.precision(cuda)[0] is dtype, cap
    assert common.precision(cuda, enabled=False) == (None, "float32 (--no-amp)")
    monkeypatch.setattr(common, "cpu_bf16_units", lambda: [])
    assert common.precision(torch.device("cpu"))[0] is None
    monkeypatch.setattr(common, "cpu_bf16_units", lambda: ["AMX"])
    dtype, why = common.precision(torch.device("cpu"))
    assert dtype is torch.bfloat16 and "AMX" in why
    assert common.precision(torch.device("cpu"), enabled=False)[0] is None
    assert common.precision(torch.device("mps"))[0] is None


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    """rng_state()/set_rng_state() replay the CPU stream, also after a weights_only checkpoint round trip. Catches a
    state that is not restored (or not restorable from a checkpoint: e.g. a torch.Generator object in it)."""
    torch.manual_seed(3)
    torch.rand(7)
    common.save_checkpoint(tmp_path / "c.pt", {"script": "dcgan", "rng": common.rng_state()})
    a = torch.rand(5)
    common.set_rng_state(common.load_checkpoint(tmp_path / "c.pt", "dcgan")["rng"])
    assert torch.equal(torch.rand(5), a)


def test_evaluation_classifier_does_not_depend_on_the_callers_seed(tmp_path):
    """Training the evaluation classifier leaves the caller's stream alone and gives the same network whatever the
    caller's seed (it seeds itself, inside fork_rng). Catches a classifier, and so every cls_* metric, that
    changes with --seed, and a classifier trained on the caller's stream."""
    data = common.load_dataset("fake")
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        evaluator = common.Evaluator(data, tmp_path / f"root{seed}", "cpu", n_samples=50)  # an empty root: trains
        assert torch.equal(before, torch.get_rng_state())
        nets.append(evaluator.classifier.state_dict())
    assert all(torch.equal(v, nets[1][k]) for k, v in nets[0].items())


# ----------------------------------------------------------------------------------------------
# Degenerate cases: slerp's parallel and opposite points, resume and save corners, IS on few samples, plot panels
# (bad values: test_bad_input.py)
# ----------------------------------------------------------------------------------------------

def test_slerp_between_opposite_and_parallel_points_is_the_straight_line():
    """z and -z (the great circle is undefined: sin(omega) = 0), z and itself, z and 2z: finite, the right end points,
    and (as documented) the straight line. Catches dividing by sin(omega) without the fallback: NaN where
    omega is exactly 0, and for z, -z float noise divided by sin(pi) ~ -9e-8 (points that are multiples of z,
    but not the linear ones)."""
    z = torch.randn(64, generator=torch.Generator().manual_seed(0))
    for end in (-z, z, 2 * z):
        path = common.interpolate(z, end, 7, "slerp")
        assert path.shape == (7, 64) and torch.isfinite(path).all()
        assert torch.allclose(path[0], z, atol=1e-5) and torch.allclose(path[-1], end, atol=1e-5)
        assert torch.allclose(path, common.interpolate(z, end, 7, "linear"), atol=1e-4)


def test_resume_does_not_inherit_overwrite(tmp_path, data_root, capsys):
    """A run started with --overwrite, resumed into another run's --out, is refused there and changes nothing.
    Catches a resume that takes --overwrite from the checkpoint's flags and replaces the other run."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_script(dcgan, TINY + ["--max-steps", "2", "--data-root", data_root, "--out", a, "--overwrite"])[0] == 0
    assert run_script(dcgan, TINY + ["--max-steps", "2", "--data-root", data_root, "--out", b])[0] == 0
    before = _snapshot(b)
    code, _, err = run(dcgan, ["--resume", a / "checkpoint.pt", "--max-steps", "3", "--out", b], capsys)
    assert code == 2 and "already holds a run" in err and _snapshot(b) == before


def test_optimizer_state_loads_on_another_device_layout(tmp_path):
    """An optimiser saved by a fused (CUDA) run and with contiguous state loads into a non-fused optimiser of
    channels_last parameters: it stays non-fused (a fused Adam cannot step on a CPU or a Mac) and its state takes
    each parameter's memory format. Catches a plain load_state_dict, which keeps the saved fused=True."""
    conv = torch.nn.Conv2d(3, 8, 3)
    opt = torch.optim.Adam(conv.parameters(), 1e-3)
    conv(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    state = opt.state_dict()
    for g in state["param_groups"]:
        g["fused"] = True
    conv2 = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    opt2 = torch.optim.Adam(conv2.parameters(), 1e-3)
    common.load_optimizer(opt2, state)
    assert not opt2.param_groups[0]["fused"]
    w = conv2.weight
    assert opt2.state[w]["exp_avg"].stride() == w.stride() and torch.equal(opt2.state[w]["exp_avg"],
                                                                           opt.state[conv.weight]["exp_avg"])
    conv2(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)).sum().backward()
    opt2.step()  # and it steps


def test_adam_step_counter_goes_where_this_devices_optimiser_wants_it():
    """A CPU run's checkpoint resumed where Adam is fused (CUDA): the step counter must be on the parameters'
    device, or fused Adam stops with 'Expected all tensors to be on the same device'. `meta` parameters stand in
    for the GPU's. Catches a plain load_state_dict, which places the counter by the saved group's flags. (The
    reverse, a CUDA counter kept on an MPS device, needs two real devices to show.)"""
    p = torch.nn.Parameter(torch.randn(3, 3))
    opt = torch.optim.Adam([p], 1e-3)
    p.grad = torch.randn(3, 3)
    opt.step()
    saved = opt.state_dict()
    q = torch.nn.Parameter(torch.empty(3, 3, device="meta"))
    fused = torch.optim.Adam([q], 1e-3)
    fused.param_groups[0]["fused"] = True  # as pick_device's CUDA runs build it
    common.load_optimizer(fused, saved)
    assert fused.state[q]["step"].device == q.device and fused.state[q]["step"].dtype == torch.float32


def test_inception_score_with_fewer_samples_than_splits_is_finite():
    """5 one-hot samples of 5 classes: 5 splits of 1 (IS 1 each), not 10 with 5 empty ones (NaN)."""
    mean, std = common.inception_score(torch.eye(5), splits=10, generator=torch.Generator().manual_seed(0))
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0)


def test_a_failing_first_save_leaves_ctrl_c_alone(tmp_path, data_root, monkeypatch, capsys):
    """If the checkpoint at step 0 fails (disk full), the run stops in one line (exit 1) and its signal handlers are
    not left installed: a notebook's next Ctrl-C must still interrupt. Catches installing the handlers before that
    save, or a traceback instead of the line."""
    import errno
    import signal

    before = {s: signal.getsignal(s) for s in common.STOP_SIGNALS}

    def broken_save(run, grid=True):
        raise OSError(errno.ENOSPC, "No space left on device", str(run.dir / "checkpoint.pt"))
    monkeypatch.setattr(common, "save_run", broken_save)
    with pytest.raises(SystemExit) as stop:
        dcgan.main([str(a) for a in TINY + ["--max-steps", "2", "--data-root", data_root, "--out", tmp_path / "r"]])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "dcgan.py: error: No space left on device: " in err and "no checkpoint was saved" in err, err
    assert {s: signal.getsignal(s) for s in common.STOP_SIGNALS} == before


def test_plots_draw_every_key_of_a_panel(tmp_path, monkeypatch):
    """A panel with many series (SNGAN's sigma of every D layer) draws all of them, and a right-hand axis its own.
    Catches a fixed list of colours that silently drops series past the fourth."""
    figures = []
    make = common._figure
    monkeypatch.setattr(common, "_figure", lambda w, h: figures.append(make(w, h)) or figures[-1])
    rows = [{"step": s, **{f"sigma_{i}": 1 + i / 100 for i in range(6)}, "a": s, "b": 2 * s, "c": 3 * s}
            for s in (1, 2, 3)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common.plot_metrics(tmp_path / "m.jsonl", tmp_path / "l.png",
                        [("sigma", [f"sigma_{i}" for i in range(6)]), ("two axes", ["a"], ["b", "c"])])
    sigma_ax, left_ax, right_ax = figures[0].axes
    assert [ln.get_label() for ln in sigma_ax.get_lines()] == [f"sigma_{i}" for i in range(6)]
    assert len(left_ax.get_lines()) == 1 and len(right_ax.get_lines()) == 2


@pytest.mark.parametrize("channels, n", [(1, 20), (3, 7)])
def test_predictions_figure_shows_every_sample_and_marks_mismatches_red(tmp_path, channels, n):
    """save_predictions' one picture: every sample's pixels are drawn (a mid-grey sample shows as grey), and a
    label that differs from the asked-for class is red, none when all match. Catches a canvas left white, samples
    drawn over one another, and the mismatch colour lost."""
    from PIL import Image
    images = torch.zeros(n, channels, 28, 28)  # 0 in [-1, 1]: grey 0.5
    evaluator = types.SimpleNamespace(_classify=lambda x: (None, F.one_hot(torch.arange(len(x)) % 10, 10).float()))
    for asked, red in ((torch.arange(n) % 10, False), ((torch.arange(n) + 1) % 10, True)):
        path = tmp_path / f"p{red}.png"
        common.save_predictions(evaluator, images, path, asked)
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
        grey = (abs(rgb - 128) < 8).all(-1)
        assert grey.sum() > 0.9 * n * 28 * 28 * (rgb.shape[1] / (10 * 30)) ** 2, "samples missing"
        is_red = (rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
        assert is_red.any() == red
