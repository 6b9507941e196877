"""Two CPU processes (gloo) on --dataset fake train one model, with one run directory, and equal to one process on
the same whole batches; checkpoints move between 1 and 2 processes; a crash or Ctrl-C ends them all.

Each launch of two processes costs about 4-8 s here (each imports torch); torchrun's agent, which imports torch
before it starts them, runs only in the tests of what it does (`launch`)."""
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

import common
import ddp_probe
import sngan
from conftest import ROOT, run_script

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
PROBE = str(ROOT / "tests" / "ddp_probe.py")
BASE = ["--dataset", "fake", "--batch-size", "16", "--width", "4", "--eval-samples", "100", "--no-amp",
        "--device", "cpu"]  # gloo on CPU processes; a GPU or Mac would otherwise put the one-process reference there
SCRIPT_FLAGS = {  # the configurations with the DDP traps: SN's u buffers and G's batch (sngan), the penalty's
    # double backward (wgan_gp), two D forwards before one backward (dcgan, cgan, wgan_clip), labels (cgan, sngan)
    "sngan": ["--arch", "cnn", "--n-dis", "2", "--conditional"],
    "wgan_gp": ["--n-dis", "2"],
    "dcgan": [],
    "cgan": ["--d-cond", "projection"],
    "wgan_clip": ["--warmup-critic", "off", "--n-dis", "2"],
    "infogan": [],  # D called on real, then on fake with Q's head: two forwards with different parameters used
    "sagan": ["--conditional"],  # SN in G too (G's u under DDP), attention blocks in G and D
}


def launch(argv, cwd, processes=2, env=None, timeout=180, torchrun=False):
    """Run `python SCRIPT.py argv` in `processes` processes; return a CompletedProcess whose returncode is the first
    process's non-zero exit code (else 0), whose stdout and stderr are every process's in rank order, and whose
    `codes` are every process's exit code. Two processes start with the environment torchrun gives its workers
    (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT, OMP_NUM_THREADS=1) but without its agent,
    which imports torch before it starts them (about 4 s of each launch here): these tests are of what the
    processes agree on, and each must end by itself, as no agent ends the peers of a process that failed.
    `torchrun=True` runs the real torchrun, for the tests of what it does (a crash ending the other process, the
    real script end to end; the signal tests start it themselves). On timeout (a hang) every process started here
    is killed with its process group (torchrun is first sent SIGTERM, which it passes on to its workers), and the
    test fails with what they wrote. The free port is picked here and released before rank 0 binds it: another
    program could take it in between (rank 0 would then fail to start, and the test with it)."""
    argv = [str(a) for a in argv]
    env = {**os.environ, **({"PROBE_NO_FIGURES": "1"} if argv[0] == PROBE else {}), **(env or {})}  # as in-process
    if processes == 1 or torchrun:
        envs, cmd = [env], (TORCHRUN if torchrun else [sys.executable]) + argv
    else:
        with socket.socket() as s:  # a free port for rank 0's store, as torchrun --standalone picks one
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        envs, cmd = [{**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(processes),
                      "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                      "OMP_NUM_THREADS": "1"} for r in range(processes)], [sys.executable] + argv
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in envs]  # no pipe to fill up
    ps = [subprocess.Popen(cmd, cwd=cwd, env=e, stdout=o, stderr=r, text=True, start_new_session=True)
          for e, (o, r) in zip(envs, files)]
    hung = False
    try:
        deadline = time.time() + timeout
        codes = [p.wait(timeout=max(0.1, deadline - time.time())) for p in ps]
    except subprocess.TimeoutExpired:
        hung = True
    finally:
        if torchrun and ps[0].poll() is None:
            ps[0].terminate()  # torchrun passes SIGTERM on to its workers
            try:
                ps[0].wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for p in ps:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    out, err = ("".join(f[i].seek(0) or f[i].read() for f in files) for i in (0, 1))
    for pair in files:
        for f in pair:
            f.close()
    if hung:
        pytest.fail(f"still running after {timeout} s (a hang), killed; their stderr:\n{err[-3000:]}")
    result = subprocess.CompletedProcess(cmd, next((c for c in codes if c), 0), out, err)
    result.codes = codes
    return result


def probe(script, argv, tmp_path, dump, processes, monkeypatch):
    """tests/ddp_probe.py: the script's main() with BatchNorm's batch statistics removed (N processes' BatchNorms
    see N smaller batches, and CPUs have no SyncBatchNorm) and each process's final G and D written to `dump`.
    One process runs inside this one (with the probe's changes undone after it): a launched Python would spend
    longer importing torch than the run takes."""
    dump.mkdir(exist_ok=True)
    env = {"PROBE_NO_BATCHNORM": "1", "PROBE_DUMP": str(dump)}
    if processes == 1:
        with monkeypatch.context() as m:
            m.chdir(tmp_path)
            ddp_probe.install(env, m.setattr)
            code, _ = run_script(importlib.import_module(script), argv)
        assert code == 0
    else:
        result = launch([PROBE, script] + argv, tmp_path, processes, env)
        assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(dump / f"rank{r}.pt") for r in range(processes)], torch.load(dump / "start0.pt")


def max_gap(a, b):
    return max((a[net][k].float() - b[net][k].float()).abs().max().item() for net in a for k in a[net])


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s in ("cgan", "wgan_clip", "infogan") else s
                                    for s in SCRIPT_FLAGS])
def test_two_processes_train_what_one_process_trains(script, tmp_path, data_root, monkeypatch):
    """3 steps on 2 processes x 8 images equal 3 steps of one process on the same 16 (same data slices, same
    noise, gradients averaged by DDP), to float rounding, with rank 0 sampling and evaluating alone in between;
    and both processes end with identical G and D, buffers included (spectral norm's u). Catches every process
    drawing the same noise or the same images (a share not taken), gradients not averaged (G's step through a
    plain G, a D step outside DDP), rank 0's sampling or evaluation shifting its random stream, buffers drifting
    apart, and a hang: the G step through DDP's D, or the penalty's double backward, never finishes."""
    argv = BASE + SCRIPT_FLAGS[script] + ["--max-steps", "3", "--log-every", "1", "--sample-every", "2",
                                          "--eval-every", "2", "--data-root", data_root]
    (one,), start = probe(script, argv + ["--out", "one"], tmp_path, tmp_path / "d1", 1, monkeypatch)
    (rank0, rank1), _ = probe(script, argv + ["--out", "two"], tmp_path, tmp_path / "d2", 2, monkeypatch)
    moved = max_gap(one, start)
    assert moved > 1e-4, "training did not move the weights: the comparison would prove nothing"
    assert max_gap(one, rank0) < 1e-3 * moved, (max_gap(one, rank0), moved)
    assert all(torch.equal(rank0[net][k], rank1[net][k]) for net in rank0 for k in rank0[net]), "processes differ"
    rows = common.read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss_d" in r] == [1, 2, 3]  # one line per log step, not one per process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d1", "d2", "one", "two"]


def test_a_checkpoint_moves_between_one_and_two_processes(tmp_path, data_root, monkeypatch):
    """2 processes for 2 steps, then resumed in one process for 2 more, end where one process running all 4 ends
    (and 1 -> 2 likewise): the data position, the noise stream and the optimiser states carry over. Catches a
    checkpoint holding one process's view (its share of the position, its device's random state)."""
    argv = BASE + SCRIPT_FLAGS["sngan"] + ["--log-every", "1", "--sample-every", "2", "--eval-every", "0",
                                           "--data-root", data_root, "--lr-decay", "none"]
    (straight,), _ = probe("sngan", argv + ["--max-steps", "4", "--out", "straight"], tmp_path, tmp_path / "s", 1, monkeypatch)
    for first, second in ((2, 1), (1, 2)):
        out = tmp_path / f"run{first}{second}"
        probe("sngan", argv + ["--max-steps", "2", "--out", out], tmp_path, tmp_path / f"a{first}", first, monkeypatch)
        resumed, _ = probe("sngan", ["--resume", out / "checkpoint.pt", "--max-steps", "4"], tmp_path,
                           tmp_path / f"b{first}{second}", second, monkeypatch)
        moved = max_gap(straight, torch.load(tmp_path / f"a{first}" / "rank0.pt"))
        assert max_gap(straight, resumed[0]) < 1e-3 * moved, (first, second)


def test_torchrun_run_has_one_directory_and_generate_needs_no_torchrun(tmp_path):
    """The real script under torchrun (BatchNorm per process): exit 0, one run directory with every promised file,
    one summary line (rank 0 speaks), the log's images/s counting the whole batch; --generate from its checkpoint
    in a plain process, and under torchrun by one process. A fresh data root: rank 0 trains the evaluation
    classifier alone while the other process trains on. Catches every process writing (duplicated lines, racing
    files) or none, and a collective in rank 0's solitary work (a deadlock: the timeout fails the test)."""
    out = tmp_path / "run"
    r = launch(["sngan.py"] + BASE + SCRIPT_FLAGS["sngan"] + ["--max-steps", "4", "--log-every", "2",
               "--sample-every", "2", "--eval-every", "2", "--data-root", tmp_path / "data", "--out", out], ROOT,
               torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("sngan: done") == 1 and "2 processes" in r.stdout
    for f in ("args.json", "metrics.jsonl", "checkpoint.pt", "losses.png", "progress.gif", "samples/step_0000004.png"):
        assert (out / f).exists(), f
    rows = common.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss_d" in r] == [2, 4] and len([r for r in rows if "cls_fid" in r]) == 2
    assert json.loads((out / "args.json").read_text())["batch_size"] == 16
    assert common.load_checkpoint(out / "checkpoint.pt", "sngan")["position"] == 8  # 4 steps x n_dis 2 batches
    assert run_script(sngan, ["--generate", "20", "--checkpoint", out / "checkpoint.pt", "--out", tmp_path / "gen"])[0] == 0
    assert np.load(tmp_path / "gen" / "generated.npz")["images"].shape == (20, 1, 28, 28)
    g2 = launch(["sngan.py", "--generate", "20", "--checkpoint", out / "checkpoint.pt", "--out", tmp_path / "gen2"],
                ROOT)  # started as torchrun's workers anyway: one process writes, one line says so
    assert g2.returncode == 0 and g2.stdout.count("wrote 20 samples") == 1, g2.stdout + g2.stderr
    assert sorted(p.name for p in (tmp_path / "gen2").iterdir()) == ["generated.npz"]


def test_a_crashing_process_ends_every_process(tmp_path, data_root):
    """Process 1 raises at step 3: torchrun ends process 0 too (no hang: the timeout would fail the test) and exits
    non-zero; the checkpoint of step 2 is intact."""
    out = tmp_path / "run"
    r = launch([PROBE, "sngan"] + BASE + SCRIPT_FLAGS["sngan"] + ["--max-steps", "1000", "--sample-every", "2",
               "--eval-every", "0", "--data-root", data_root, "--out", out], tmp_path,
               env={"PROBE_FAIL": "1:3"}, timeout=120, torchrun=True)
    assert r.returncode != 0
    assert common.load_checkpoint(out / "checkpoint.pt", "sngan")["step"] == 2


def test_a_process_without_data_stops_every_process_in_words(tmp_path, data_root):
    """Process 1 cannot load the data (its turn comes after process 0's): both stop at that turn, process 1 with
    its reason, process 0 in one line saying another process failed; nobody trains on into a dead peer (a gloo
    connection error) or waits. Catches processes that agree on nothing after loading."""
    r = launch([PROBE, "sngan"] + BASE + SCRIPT_FLAGS["sngan"] + ["--max-steps", "4", "--data-root", data_root,
               "--out", tmp_path / "run"], tmp_path, env={"PROBE_DATA_FAIL": "1"}, timeout=120)
    assert r.codes == [2, 2], r.stderr[-3000:]
    assert "sngan.py: error: probe: rank 1 finds no data" in r.stderr, r.stderr[-3000:]
    assert "sngan.py: error: another process could not load fake" in r.stderr, r.stderr[-3000:]
    assert "Connection" not in r.stderr and 'File "' + str(ROOT / "common.py") not in r.stderr, r.stderr[-3000:]


def test_non_finite_weights_stop_every_process_alike(tmp_path, data_root):
    """G's weights turn NaN at step 3, a sample step but not a log step: every process finds it in the weights and
    stops (exit 1, the reason in words, the checkpoint of the last good step kept), none is left in a collective
    with a peer gone. Catches the check on rank 0 alone: the other process dies in gloo with a connection error."""
    out = tmp_path / "run"
    r = launch([PROBE, "sngan"] + BASE + SCRIPT_FLAGS["sngan"] + ["--max-steps", "20", "--log-every", "2",
               "--sample-every", "3", "--eval-every", "0", "--data-root", data_root, "--out", out], tmp_path,
               env={"PROBE_NAN_AT": "3"}, timeout=120)
    assert r.returncode != 0 and "G's weights or statistics became non-finite by step 3" in r.stderr, r.stderr[-3000:]
    assert r.codes == [1, 1] and "Connection" not in r.stderr and "gloo" not in r.stderr, r.stderr[-3000:]
    assert common.load_checkpoint(out / "checkpoint.pt", "sngan")["step"] == 0


def test_rank_0s_long_setup_neither_times_the_others_out_nor_eats_max_minutes(tmp_path, data_root):
    """Rank 0 works alone while the others wait: it loads the data first (decodes, caches), then builds its
    evaluator (a first run trains the classifier, RGB data computes Inception features of the real images). A load
    14 s longer than usual with --dist-timeout-minutes 0.15 (9 s), an evaluator 3 s longer, and --max-minutes 0.1:
    the run ends well, after about 6 s of training. Catches the turns waiting in the default process group, whose
    timeout (meant for a dead peer in training) cut a long cache build short, and clocks started before the setup:
    the others' clocks run out first and stop rank 0 after the budget minus its setup (nothing, or about 3 s)."""
    common.get_classifier("fake", data_root, "cpu")  # the evaluator's real work stays short beside the 9 s
    out = tmp_path / "run"
    r = launch([PROBE, "sngan"] + BASE + SCRIPT_FLAGS["sngan"] + ["--max-minutes", "0.1", "--log-every", "2",
               "--sample-every", "1000", "--eval-every", "0", "--dist-timeout-minutes", "0.15", "--data-root",
               data_root, "--out", out], tmp_path, env={"PROBE_SLOW_DATA": "14", "PROBE_SLOW_START": "3"}, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "checkpoint.pt").exists()
    # the training rows' clock (the final summary row also carries elapsed_s, after the setup too)
    elapsed = [row["elapsed_s"] for row in common.read_metrics(out / "metrics.jsonl") if "loss_d" in row]
    assert elapsed and elapsed[-1] - elapsed[0] >= 4, elapsed


def test_ctrl_c_ends_every_process_at_one_step_and_keeps_the_checkpoint(tmp_path, data_root):
    """Ctrl-C (SIGINT to torchrun, which passes it on) during a long run: both processes stop at the same log step
    (they agree there), rank 0 saves that step, and everything exits within seconds. Catches a process that goes
    on alone and waits forever in its next all-reduce."""
    out = tmp_path / "run"
    cmd = TORCHRUN + ["sngan.py"] + BASE + SCRIPT_FLAGS["sngan"] + [
        "--max-steps", "100000", "--max-minutes", "5", "--log-every", "5", "--sample-every", "1000",
        "--eval-every", "0", "--data-root", str(data_root), "--out", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        def logged_step():
            path = out / "metrics.jsonl"
            return max([r["step"] for r in common.read_metrics(path) if "loss_d" in r] or [0]) if path.exists() else 0
        deadline = time.time() + 120
        while time.time() < deadline and logged_step() < 20:
            time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert "interrupted at step" in err
    state = common.load_checkpoint(out / "checkpoint.pt", "sngan")
    assert state["step"] >= 20 and state["step"] % 5 == 0, state["step"]


def test_bad_input_under_torchrun_is_one_line_from_each_process(tmp_path, data_root):
    """A --batch-size that does not split over the processes: exit non-zero, the one-line reason, no traceback of
    ours, and no run directory."""
    r = launch(["sngan.py"] + BASE + ["--batch-size", "15", "--data-root", data_root, "--out", tmp_path / "run"], ROOT)
    assert r.codes == [2, 2], r.stderr[-3000:]
    assert "--batch-size 15 (the whole batch) does not split evenly over 2 processes" in r.stderr
    assert 'File "' + str(ROOT / "common.py") not in r.stderr
    assert not (tmp_path / "run").exists()


def test_devices_under_torchrun(monkeypatch):
    """One CUDA device per local rank (set as the current device; cuda:0 where each process sees one), MPS refused
    in words (PyTorch has no process group backend for it), `auto` on a Mac falls back to CPU processes, a local
    rank beyond the machine's GPUs is refused, and so are several processes on a machine's only GPU (NCCL would
    fail with "Duplicate GPU detected"). Mocked: this machine has no GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert common.pick_device("auto", 1) == torch.device("cuda", 1) and chosen == [1]
    with pytest.raises(common.UsageError, match="2 CUDA devices"):
        common.pick_device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one visible device per process (a scheduler's way)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert common.pick_device("cuda", 3) == torch.device("cuda", 0) and chosen[-1] == 0
    for chooser in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        monkeypatch.delenv(chooser, raising=False)  # a machine with one GPU, torchrun asked for 4 processes on it
    with pytest.raises(common.UsageError, match="4 processes on this machine, but it has 1 CUDA device"):
        common.pick_device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert common.pick_device("auto", 0) == torch.device("cpu") and common.pick_device("auto") == torch.device("mps")
    with pytest.raises(common.UsageError, match="no process-group backend for MPS"):
        common.pick_device("mps", 0)


@pytest.mark.parametrize("rank,local_rank,turn", [(0, 0, 0), (8, 0, 1), (9, 1, 2), (1, 1, 2)])
def test_dataset_is_loaded_in_turns(monkeypatch, rank, local_rank, turn):
    """Process 0 loads first, then the first process of each other machine, then the rest, agreeing after each turn
    whether one failed. A failure of this process (ours or any other exception) is raised right after its turn's
    agreement; a failure elsewhere stops this process in one line, before its own turn (no retried download).
    Catches every machine's first process writing a shared --data-root at once, a process that leaves the turns
    (the others would wait for hours), and processes that go on training after another failed. The process group
    is mocked: the agreement's all-reduce sees the flag of this process and, when asked, of a failing other."""
    calls, loaded_after, other_fails_at = [], [], [None]

    def all_reduce(flag, op=None, group=None):
        if other_fails_at[0] == len(calls):
            flag.fill_(1.0)
        calls.append(1)
    monkeypatch.setattr(common, "_patient_group", lambda: None)  # the turns' own process group
    monkeypatch.setattr(common.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(common.dist, "get_world_size", lambda: 16)
    monkeypatch.setattr(common.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(common.dist, "all_reduce", all_reduce)
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    real = common._load_dataset

    def load(*a):
        loaded_after.append(len(calls))
        return real(*a)
    monkeypatch.setattr(common, "_load_dataset", load)
    data = common.load_dataset("fake")
    assert loaded_after == [turn] and len(calls) == 3 and len(data) == 1024

    for error in (common.UsageError("no such data"), EOFError("truncated archive")):
        calls.clear()

        def failing(*a, error=error):
            raise error
        monkeypatch.setattr(common, "_load_dataset", failing)
        with pytest.raises(type(error), match=str(error)):
            common.load_dataset("fake")
        assert len(calls) == turn + 1  # raised at its own turn's agreement, the later turns not taken

    if turn > 0:  # another process fails in turn 0: this one stops there, one line, without loading
        calls.clear(), loaded_after.clear()
        monkeypatch.setattr(common, "_load_dataset", load)
        other_fails_at[0] = 0
        with pytest.raises(common.UsageError, match="another process could not load fake"):
            common.load_dataset("fake")
        assert loaded_after == [] and len(calls) == 1
