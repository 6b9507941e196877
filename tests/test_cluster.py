"""Runs that survive a cluster: SIGTERM / SIGUSR1 end a run as Ctrl-C does (checkpoint first, exit 128 + signal),
`--resume auto` makes one command serve every requeue, `--checkpoint-minutes` saves on the clock, and a full disk,
a torn metrics line or an unwritable cache costs one line and nothing already written."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_distributed import BASE as DDP_BASE
from test_distributed import PROBE, SCRIPT_FLAGS, TORCHRUN, launch, max_gap, probe

import common
import dcgan
import infogan
from conftest import ROOT, assert_same_training_state, run_script

SCRIPTS = ("dcgan", "cgan", "wgan_clip", "wgan_gp", "sngan", "infogan", "sagan")
TINY = ["--dataset", "fake", "--batch-size", "16", "--width", "8", "--eval-samples", "100", "--eval-every", "0",
        "--no-amp"]


def logged_step(out):
    path = out / "metrics.jsonl"
    return max([r["step"] for r in common.read_metrics(path) if "loss_d" in r] or [0]) if path.exists() else 0


def signal_mid_run(cmd, out, sig, at_step, cwd=ROOT, times=1, env=None):
    """Start `cmd`, send `sig` (`times` times) once it has logged `at_step`, return (exit code, stderr)."""
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and logged_step(out) < at_step and p.poll() is None:
            time.sleep(0.2)
        for _ in range(times):
            p.send_signal(sig)
            time.sleep(0.05)
        _, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return p.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_the_last_step_and_auto_resume_ends_where_a_straight_run_ends(sig, tmp_path, data_root):
    """SIGTERM (schedulers, torchrun) and SIGUSR1 (SLURM's --signal warning) mid-run: exit 128 + the signal, one line
    and no traceback, the checkpoint holds the last finished step (the last logged one, with --log-every 1); the
    SAME command with --resume auto (a requeue) continues it, and a shorter --max-steps ends it bit for bit where
    an uninterrupted run ends. The signal is sent twice, as SLURM (to every process of the step) and torchrun
    (forwarding) may deliver it. Catches an unhandled signal (killed at once: exit -15, checkpoint of step 0), a
    repeat that kills the save, a save before the step finished, and a requeue refused for repeating its flags."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "dcgan.py")] + TINY + [
        "--log-every", "1", "--sample-every", "1000", "--data-root", str(data_root), "--out", str(out), "--resume", "auto"]
    code, err = signal_mid_run(cmd + ["--max-steps", "100000"], out, sig, at_step=4, times=2)
    assert code == 128 + sig, err
    assert "interrupted at step" in err and signal.Signals(sig).name in err and "Traceback" not in err, err
    state = common.load_checkpoint(out / "checkpoint.pt", "dcgan")
    assert state["step"] == logged_step(out) >= 4
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    end = state["step"] + 3
    code, err = run_script(dcgan, cmd[2:] + ["--max-steps", end])  # the requeued job: same command, --resume auto
    assert code == 0, err
    straight = tmp_path / "straight"
    assert run_script(dcgan, TINY + ["--log-every", "1", "--sample-every", "1000", "--data-root", data_root,
                                     "--out", straight, "--max-steps", end])[0] == 0
    assert_same_training_state(torch.load(out / "checkpoint.pt"), torch.load(straight / "checkpoint.pt"))
    steps = [r["step"] for r in common.read_metrics(out / "metrics.jsonl") if "loss_d" in r]
    assert steps == list(range(1, end + 1))  # no step twice, none missing


def test_sigterm_under_torchrun_stops_both_processes_at_one_step_and_resumes_exactly(tmp_path, data_root, monkeypatch):
    """SIGTERM to torchrun (it forwards it to both processes, as when a scheduler ends the job): both stop at one
    agreed log step, rank 0 saves it, every process exits 143; resuming with 2 processes to a later step ends where
    one uninterrupted process ends on the same whole batches (tests/ddp_probe.py without BatchNorm's statistics, as
    in the equality tests of test_distributed.py). Catches a process that stops alone (the other waits in its next
    all-reduce until the timeout), processes that stop at different steps, and a checkpoint saved on a signal that
    lacks part of the training state (the resumed run drifts from the straight one)."""
    out = tmp_path / "run"
    # --lr-decay none: the linear decay runs to --max-steps, which differs between the two runs compared
    flags = DDP_BASE + SCRIPT_FLAGS["sngan"] + ["--lr-decay", "none", "--log-every", "2", "--sample-every", "1000",
                                                "--eval-every", "0", "--data-root", str(data_root)]
    env = {**os.environ, "PROBE_NO_BATCHNORM": "1", "PROBE_NO_FIGURES": "1"}
    code, err = signal_mid_run(TORCHRUN + [PROBE, "sngan"] + flags + ["--max-steps", "100000", "--out", str(out)],
                               out, signal.SIGTERM, at_step=6, cwd=tmp_path, env=env)
    assert err.count("interrupted at step") == 1 and "SIGTERM" in err, err[-3000:]
    assert "exitcode  : 143" in err or code in (143, -15, 1), err[-3000:]  # torchrun reports its workers' codes
    state = common.load_checkpoint(out / "checkpoint.pt", "sngan")
    assert state["step"] >= 6 and state["step"] % 2 == 0, state["step"]
    end = state["step"] + 2
    resumed, _ = probe("sngan", ["--resume", out / "checkpoint.pt", "--max-steps", end], tmp_path, tmp_path / "r", 2,
                       monkeypatch)
    (straight,), start = probe("sngan", flags + ["--max-steps", end, "--out", "straight"], tmp_path, tmp_path / "s",
                               1, monkeypatch)
    assert all(torch.equal(resumed[0][n][k], resumed[1][n][k]) for n in resumed[0] for k in resumed[0][n])
    assert max_gap(straight, resumed[0]) < 1e-3 * max_gap(straight, start), max_gap(straight, resumed[0])
    assert common.load_checkpoint(out / "checkpoint.pt", "sngan")["position"] == 2 * end  # n_dis 2 batches a step


def test_resume_auto_starts_then_continues(tmp_path, data_root, capsys):
    """--resume auto: with no checkpoint in --out it starts fresh; the same command again continues that run (its
    steps go on, nothing is logged twice); without --out, or with --overwrite, it is one line. Catches an `auto`
    taken for a path ("checkpoint auto does not exist") and a second run that starts over."""
    out = tmp_path / "run"
    cmd = TINY + ["--log-every", "1", "--data-root", data_root, "--out", out, "--resume", "auto"]
    assert run_script(dcgan, cmd + ["--max-steps", "2"])[0] == 0
    assert common.load_checkpoint(out / "checkpoint.pt", "dcgan")["step"] == 2
    assert run_script(dcgan, cmd + ["--max-steps", "4"])[0] == 0
    assert common.load_checkpoint(out / "checkpoint.pt", "dcgan")["step"] == 4
    assert [r["step"] for r in common.read_metrics(out / "metrics.jsonl") if "loss_d" in r] == [1, 2, 3, 4]
    capsys.readouterr()
    code, err = run_script(dcgan, TINY + ["--resume", "auto"], capsys)
    assert code == 2 and "--resume auto needs --out" in err
    code, err = run_script(dcgan, cmd + ["--overwrite"], capsys)
    assert code == 2 and "--overwrite" in err and "Traceback" not in err
    code, err = run_script(dcgan, cmd + ["--max-steps", "5", "--lr-g", "1e-3"], capsys)  # a changed model flag
    assert code == 2 and "--lr-g" in err


def test_resume_auto_replaces_a_start_that_never_saved_and_refuses_old_networks(tmp_path, data_root, capsys):
    """A start that died before its first checkpoint (a full disk at step 0, a kill) leaves run files but no
    checkpoint.pt: the requeue with --resume auto starts over there instead of refusing a used --out (which would
    end the requeue chain). A checkpoint whose D lacks a parameter the networks now have (as one written by a
    version whose D had no bias on its first conv) is refused in one line, not a load_state_dict traceback. Catches both exits."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text("{}")
    (out / "metrics.jsonl").write_text("")
    cmd = TINY + ["--log-every", "1", "--data-root", data_root, "--out", out, "--resume", "auto", "--max-steps", "2"]
    code, err = run_script(dcgan, cmd, capsys)
    assert code == 0, err
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["D"].pop("net.0.bias")
    torch.save(state, out / "checkpoint.pt")
    code, err = run_script(dcgan, cmd[:-1] + ["4"], capsys)
    assert code == 2 and "net.0.bias" in err and "older version" in err and "Traceback" not in err, err


def test_checkpoint_minutes_saves_on_the_clock_without_changing_training(tmp_path, data_root, monkeypatch):
    """--checkpoint-minutes: with --sample-every far away, a checkpoint at each log step once the minutes have
    passed (here 6 ms: every log step), no sample grid for those, and the run's final state equal to one without
    them. Catches a clock that is never read, a save that draws from the random stream, and grids between the
    --sample-every steps."""
    saved = []
    save = common.save_checkpoint
    monkeypatch.setattr(common, "save_checkpoint", lambda path, state: saved.append(state["step"]) or save(path, state))
    flags = TINY + ["--log-every", "2", "--sample-every", "1000", "--max-steps", "7", "--data-root", data_root]
    assert run_script(dcgan, flags + ["--checkpoint-minutes", "0.0001", "--out", tmp_path / "a"])[0] == 0
    assert saved == [0, 2, 4, 6, 7]
    assert sorted(p.name for p in (tmp_path / "a" / "samples").iterdir()) == ["step_0000000.png", "step_0000007.png"]
    saved.clear()
    assert run_script(dcgan, flags + ["--checkpoint-minutes", "0", "--out", tmp_path / "b"])[0] == 0
    assert saved == [0, 7]
    assert_same_training_state(torch.load(tmp_path / "a" / "checkpoint.pt"), torch.load(tmp_path / "b" / "checkpoint.pt"))


def test_a_disk_that_fills_during_a_save_costs_one_line_and_nothing_written(tmp_path, data_root, monkeypatch, capsys):
    """The disk fills while the step-4 checkpoint is written (half a file, then ENOSPC): exit 1 with one line naming
    the error and the last good checkpoint, no temp file left, checkpoint.pt still the step-2 one and loadable, and
    `--resume auto` continues once space is back. Catches a torn checkpoint.pt, a *.tmp left per failed save, and
    a traceback."""
    out = tmp_path / "run"
    real_save = torch.save

    def filling_save(state, f, *a, **kw):
        if isinstance(state, dict) and state.get("step") == 4:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, f, *a, **kw)
    monkeypatch.setattr(torch, "save", filling_save)
    cmd = TINY + ["--log-every", "1", "--sample-every", "2", "--max-steps", "6", "--data-root", data_root,
                  "--out", out, "--resume", "auto"]
    code, err = run_script(dcgan, cmd, capsys)
    assert code == 1 and "No space left on device" in err and "(step 2)" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    assert common.load_checkpoint(out / "checkpoint.pt", "dcgan")["step"] == 2
    monkeypatch.setattr(torch, "save", real_save)
    assert run_script(dcgan, cmd)[0] == 0
    assert common.load_checkpoint(out / "checkpoint.pt", "dcgan")["step"] == 6


def test_a_torn_metrics_line_does_not_block_a_resume(tmp_path, data_root, capsys):
    """A last metrics.jsonl line cut short (power lost mid-append): the resume drops it with a one-line note and goes
    on; every row after is whole and no step is logged twice. Catches json.loads on every line (JSONDecodeError,
    after data loading and the evaluator's set-up)."""
    out = tmp_path / "run"
    cmd = TINY + ["--log-every", "1", "--data-root", data_root, "--out", out, "--resume", "auto"]
    assert run_script(dcgan, cmd + ["--max-steps", "3"])[0] == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss_d": 1.3')
    capsys.readouterr()
    code, err = run_script(dcgan, cmd + ["--max-steps", "5"], capsys)
    assert code == 0, err
    assert "dropped 1 line(s) that do not parse" in err and "Traceback" not in err
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line parses now
    assert [r["step"] for r in rows if "loss_d" in r] == [1, 2, 3, 4, 5]


def test_an_unwritable_classifier_cache_is_used_from_memory(tmp_path, monkeypatch, capsys):
    """A --data-root where the evaluation classifier cannot be cached (read-only, full): one warning line, the run
    trains and evaluates with the classifier from memory. Catches an OSError traceback after the classifier's
    training (every run on a read-only data root)."""
    save = common.save_checkpoint

    def read_only(path, state):
        if "classifiers" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return save(path, state)
    monkeypatch.setattr(common, "save_checkpoint", read_only)
    out = tmp_path / "run"
    code, err = run_script(dcgan, TINY + ["--max-steps", "2", "--data-root", tmp_path / "data", "--out", out], capsys)
    assert code == 0, err
    assert "cannot cache the evaluation classifier" in err and "Read-only file system" in err
    assert "cls_fid" in common.read_metrics(out / "metrics.jsonl")[-1]


def test_infogan_saves_its_last_step_before_measuring_the_codes(tmp_path, data_root, monkeypatch):
    """A second Ctrl-C (or torchrun's kill after its grace period) while infogan measures the codes at the end must
    not lose the last steps: the final checkpoint is written first. Catches measuring inside `with run` (the
    checkpoint on disk would be step 0's)."""
    def second_ctrl_c(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(infogan, "categorical_accuracy", second_ctrl_c)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        infogan.main([str(a) for a in ["--dataset", "fake", "--batch-size", "16", "--width", "4", "--eval-samples",
                                       "100", "--eval-every", "0", "--max-steps", "3", "--data-root", data_root,
                                       "--out", out]])
    assert common.load_checkpoint(out / "checkpoint.pt", "infogan")["step"] == 3


@pytest.mark.parametrize("script", SCRIPTS)
def test_batch_size_one_trains_or_is_refused_in_one_line(script, tmp_path, data_root, capsys):
    """--batch-size 1 on every script (and dcgan's, cgan's MLP): it trains, or, where a network has BatchNorm1d
    (statistics of one image are undefined), it is one line, exit 2, with no run directory left. Catches torch's
    `Expected more than 1 value per channel` traceback and a used --out left behind."""
    import importlib
    module = importlib.import_module(script)
    archs = [["--arch", "mlp"], []] if script in ("dcgan", "cgan") else [[]]
    for arch in archs:
        out = tmp_path / f"run{len(arch)}"
        flags = ["--dataset", "fake", "--batch-size", "1", "--eval-samples", "20", "--eval-every", "0",
                 "--max-steps", "1", "--data-root", data_root, "--out", out] + arch
        code, err = run_script(module, flags, capsys)
        if code == 0:
            assert common.load_checkpoint(out / "checkpoint.pt", script)["step"] == 1
        else:
            assert code == 2 and "--batch-size 1" in err and "BatchNorm1d" in err, err
            assert "Traceback" not in err and not out.exists()
    if script == "infogan":  # its D and Q heads have BatchNorm1d
        assert code == 2


def test_a_batch_of_one_per_process_is_refused_under_torchrun(tmp_path, data_root):
    """infogan with --batch-size 2 over 2 processes: one image per process for its BatchNorm1d layers, refused in
    one line (per process, not per whole batch). Catches a check of the whole batch only."""
    r = launch(["infogan.py", "--dataset", "fake", "--batch-size", "2", "--width", "4", "--data-root", data_root,
                "--out", tmp_path / "run"], ROOT)
    assert r.returncode != 0
    assert "--batch-size 2: infogan's networks have BatchNorm1d layers" in r.stderr and "(--batch-size 4 or more)" in \
        r.stderr, r.stderr[-3000:]
    assert 'File "' + str(ROOT / "common.py") not in r.stderr
