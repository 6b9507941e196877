"""What a requeued or hurried run must get right: a finished run is not trained again, the watchers remember what
they said, a damaged checkpoint and changed data are refused in one line, and a refused run writes nothing."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import dcgan
from conftest import ROOT, run_script

TINY = ["--dataset", "fake", "--batch-size", "16", "--width", "8", "--eval-samples", "100", "--eval-every", "0",
        "--no-amp"]


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_auto_of_a_finished_run_does_nothing(tmp_path, data_root, capsys):
    """A requeue of a run that reached its --max-steps: 'finished', exit 0, and metrics.jsonl, the checkpoint and the
    grids untouched. Catches a final evaluation appended again at every requeue (3 evaluation rows at one step
    after 3 runs)."""
    out = tmp_path / "run"
    cmd = TINY + ["--max-steps", "3", "--data-root", data_root, "--out", out, "--resume", "auto"]
    assert run_script(dcgan, cmd)[0] == 0
    before = (out / "metrics.jsonl").read_text(), (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    code = run_script(dcgan, cmd)[0]
    said = capsys.readouterr()
    assert code == 0, said.err
    assert "is finished (step 3 of 3); nothing to do" in said.out, said
    assert ((out / "metrics.jsonl").read_text(), (out / "checkpoint.pt").read_bytes()) == before
    # a longer --max-steps continues it
    assert run_script(dcgan, TINY + ["--max-steps", "5", "--data-root", data_root, "--out", out, "--resume", "auto"])[0] == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 5


def test_rank_0_decides_resume_auto_for_every_process(tmp_path, data_root):
    """Under torchrun, process 1 does not see the checkpoint that process 0 sees (a shared folder whose view lags on
    one machine): --resume auto must resume in both, from rank 0's decision, and end at the asked step. Catches
    a decision per process: process 1 starts afresh at step 0 while process 0 continues at step 2, and their
    collectives no longer pair (a hang until the timeout, or an error)."""
    from test_distributed import BASE, PROBE, launch
    out = tmp_path / "run"
    flags = [*BASE, "--eval-every", "0", "--data-root", data_root, "--out", out, "--resume", "auto"]
    assert run_script(dcgan, flags + ["--max-steps", "2"])[0] == 0
    r = launch([PROBE, "dcgan", *flags, "--max-steps", "4", "--dist-timeout-minutes", "1"], ROOT,
               env={"PROBE_NO_CHECKPOINT_ON": "1"}, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    steps = [row["step"] for row in rows(out) if "loss_d" in row]
    assert steps == sorted(set(steps)), steps  # one log, continued: no second run from step 0


def test_a_checkpoint_one_process_cannot_read_stops_every_process_in_one_line(tmp_path, data_root):
    """Under torchrun with --resume auto, process 1 cannot read the checkpoint that process 0 reads: both stop at
    once, process 1 with its reason and process 0 in one line that says why, exit 2. Catches a load decided per
    process: process 0 goes on alone into its next collective, and ends only when torchrun kills it, with no word of
    why (or, without torchrun's agent, after --dist-timeout-minutes)."""
    from test_distributed import BASE, PROBE, launch
    out = tmp_path / "run"
    flags = [*BASE, "--eval-every", "0", "--data-root", data_root, "--out", out, "--resume", "auto"]
    assert run_script(dcgan, flags + ["--max-steps", "2"])[0] == 0
    r = launch([PROBE, "dcgan", *flags, "--max-steps", "4", "--dist-timeout-minutes", "1"], ROOT,
               env={"PROBE_NO_READ_ON": "1"}, timeout=100)
    assert r.codes == [2, 2] and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "dcgan.py: error: probe: checkpoint" in r.stderr, r.stderr[-3000:]
    assert "dcgan.py: error: another process could not read the checkpoint" in r.stderr, r.stderr[-3000:]


def test_the_watchers_state_survives_a_resume(tmp_path, data_root):
    """The watchers' counters are in the checkpoint and come back: a resumed run continues the look-alike count from
    where it was (a run preempted more often than every ALIKE_STEPS could never say it otherwise) and does not say
    'D has won' again. Catches watchers built afresh at every resume."""
    out = tmp_path / "run"
    assert run_script(dcgan, TINY + ["--max-steps", "4", "--sample-every", "2", "--data-root", data_root,
                                     "--out", out])[0] == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(state["watch"]) == {"d_window", "d_won", "alike", "alike_since"}
    state["watch"] = {"d_window": [[0.001, 1.0]], "d_won": True, "alike": False, "alike_since": 2}
    torch.save(state, out / "checkpoint.pt")
    assert run_script(dcgan, ["--resume", out / "checkpoint.pt", "--max-steps", "6"])[0] == 0
    after = torch.load(out / "checkpoint.pt", weights_only=True)["watch"]
    assert after["d_window"][0] == [0.001, 1.0], after  # the window goes on from the saved lines


def test_a_checkpoint_with_nan_in_it_is_refused_in_one_line(tmp_path, data_root, capsys):
    """NaN written into G of a valid checkpoint: --resume and --generate refuse it in one line (exit 2) naming the
    tensor. Catches a resume that trains on, then blames training and calls the corrupt file 'the last good
    checkpoint'."""
    out = tmp_path / "run"
    assert run_script(dcgan, TINY + ["--max-steps", "2", "--data-root", data_root, "--out", out])[0] == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    key = next(k for k, v in state["G"].items() if v.is_floating_point())
    state["G"][key][(0,) * state["G"][key].dim()] = float("nan")
    torch.save(state, out / "checkpoint.pt")
    capsys.readouterr()
    for argv in (["--resume", out / "checkpoint.pt", "--max-steps", "4"],
                 ["--generate", "4", "--checkpoint", out / "checkpoint.pt", "--out", tmp_path / "gen"]):
        code, err = run_script(dcgan, argv, capsys)
        assert code == 2, err
        assert err.strip() == f"dcgan.py: error: checkpoint {out / 'checkpoint.pt'} is damaged: G.{key} holds NaN " \
                              f"or inf; resume from an earlier copy", err


def make_folder(root, classes, n=8, size=16):
    g = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(g.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_a_resume_on_changed_data_is_refused_unless_asked(tmp_path, capsys):
    """Images removed from a folder under a run: --resume says the data differs (count then and now), exit 2; with
    --allow-changed-data it goes on. A class folder added to a conditional run's data: refused even with the flag
    (the networks are built for the old classes). Catches a silent resume on other data, and a resume that dies in
    load_state_dict with a size mismatch."""
    import cgan
    root, out = tmp_path / "photos", tmp_path / "run"
    make_folder(root, ["a", "b"])
    base = ["--dataset", "folder", "--data-root", root, "--image-size", "16", "--batch-size", "8", "--width", "8",
            "--eval-every", "0", "--eval-samples", "10", "--no-amp"]
    assert run_script(dcgan, base + ["--max-steps", "2", "--out", out])[0] == 0
    (root / "b" / "0.png").unlink()
    capsys.readouterr()
    code, err = run_script(dcgan, ["--resume", out / "checkpoint.pt", "--max-steps", "4"], capsys)
    said = ("dcgan.py: error: --resume: the data differs from the checkpoint's (images 16 then, 15 now); resume on "
            "the same data, or add --allow-changed-data to go on with this data")
    assert code == 2 and err.strip().splitlines()[-1] == said, err
    assert run_script(dcgan, ["--resume", out / "checkpoint.pt", "--max-steps", "4", "--allow-changed-data"])[0] == 0

    cout = tmp_path / "crun"
    assert run_script(cgan, base + ["--d-cond", "projection", "--max-steps", "2", "--out", cout])[0] == 0
    make_folder(root, ["c"])
    capsys.readouterr()
    code, err = run_script(cgan, ["--resume", cout / "checkpoint.pt", "--max-steps", "4", "--allow-changed-data"], capsys)
    assert code == 2 and "num classes 2 then, 3 now" in err and "built for 2 classes" in err, err
    assert "Traceback" not in err, err


def test_the_largest_seed_trains(tmp_path, data_root):
    """The largest --seed the parser takes trains (each epoch's data order is seeded with seed * 100003 + epoch).
    Catches a range wider than that arithmetic allows (a traceback at the first batch, after files were written)."""
    assert run_script(dcgan, TINY + ["--seed", 2**40 - 1, "--max-steps", "1", "--data-root", data_root,
                                     "--out", tmp_path / "r"])[0] == 0


@pytest.mark.parametrize("argv, says", [
    (["--seed", "99999999999999999999999"], "argument --seed: must be between -2**40 and 2**40"),
    (["--seed", str(2**40)], "argument --seed: must be between -2**40 and 2**40"),
    # G's first layer already fails (365 GiB): a width whose first layers fit spends seconds filling them first
    (["--dataset", "fake", "--width", "10000000"], "cannot allocate 365.1 GiB: the networks (--width)"),
    (["--max-steps", "1"], "mnist not found and could not be downloaded"),
])
def test_a_refused_run_is_one_line_and_writes_nothing(tmp_path, argv, says, monkeypatch, capsys):
    """Hurried inputs, run in an empty folder as a user would (defaults: ./data, runs/): one line, exit 2, and the
    folder still empty. Catches the seed's OverflowError and the allocator's RuntimeError as tracebacks, and the
    runs/ and data/ folders a refused run left behind (the out folder's parent; a failed download's folders). The
    mnist case needs no network: offline, its download fails."""
    if "mnist" in says and any((common.SYSTEM_DATA / "mnist").glob("*")):
        pytest.skip("MNIST is installed here: the run would not be refused")
    if "allocate" in says and Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("this kernel overcommits any allocation: the allocator would not refuse it")
    cwd = tmp_path / "empty"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for proxy in ("http_proxy", "https_proxy"):  # no download, even online
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    capsys.readouterr()
    code, err = run_script(dcgan, argv, capsys)  # an exception other than SystemExit fails the test here
    assert code == 2, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and says in err, err[-2000:]
    assert list(cwd.iterdir()) == [], list(cwd.iterdir())
    shutil.rmtree(cwd)
