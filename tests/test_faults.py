"""Real faults, made for real: a full file system (a small tmpfs), a file-size limit (RLIMIT_FSIZE, as `ulimit -f`),
and a scheduler's SIGTERM before the training loop. Each ends in one line that says what happened, with nothing
already written lost; none is a traceback."""
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
from conftest import ROOT

TINY = ["--dataset", "fake", "--batch-size", "16", "--width", "8", "--eval-samples", "100", "--eval-every", "0",
        "--no-amp"]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def can_mount_tmpfs():
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"], capture_output=True)
    return r.returncode == 0


def on_tmpfs(size, folder, cmd, then):
    """`cmd`, then `then`, run in a mount namespace of their own where `folder` is a fresh tmpfs of `size` (a disk
    that fills; it goes away with the namespace). Exits with `cmd`'s code."""
    sh = f'mount -t tmpfs -o size={size} none "$0" && {" ".join(map(shlex.quote, cmd))}; code=$?; "$@"; exit $code'
    return ["unshare", "-rm", "sh", "-c", sh, str(folder), *then]


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare and tmpfs mounts in a user namespace")
def test_a_disk_that_fills_mid_run_is_one_line_and_keeps_the_last_checkpoint(tmp_path, data_root):
    """--out on a 1.6 MB tmpfs: the checkpoints of step 0 (0.35 MB: Adam has no state yet) and step 2 (1 MB) fit,
    the save at step 4 (a second 1 MB copy beside the first, as an atomic save needs) finds the disk full. Real
    torch, real ENOSPC: one line that names the cause, exit 1, the step-2 checkpoint intact and loadable, no temp
    file left. Catches torch.save's RuntimeError ('unexpected pos') escaping the OSError handlers as a 28-line
    traceback, and a torn checkpoint."""
    out = tmp_path / "disk"
    out.mkdir()
    # the evaluation classifier is cached beforehand, outside the small disk
    common.get_classifier("fake", data_root, "cpu")
    cmd = [sys.executable, str(ROOT / "dcgan.py"), *TINY, "--max-steps", "6", "--sample-every", "2",
           "--data-root", str(data_root), "--out", str(out / "run")]
    # what the disk holds afterwards is read inside the namespace, before the tmpfs goes away with it
    look = tmp_path / "look.py"
    look.write_text("import pathlib, sys, torch\n"
                    "run = pathlib.Path(sys.argv[1])\n"
                    "print('STEP', torch.load(run / 'checkpoint.pt', weights_only=True)['step'])\n"
                    "print('LEFT', sorted(p.name for p in run.glob('*.tmp')))\n")
    p = subprocess.run(on_tmpfs("1600k", out, cmd, [sys.executable, str(look), str(out / "run")]),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("dcgan.py: error: No space left on device"), p.stderr[-2000:]
    assert "stopped at step 4" in last and "(step 2)" in last, last
    assert "STEP 2" in p.stdout and "LEFT []" in p.stdout, p.stdout[-2000:]


def test_a_file_size_limit_is_one_line(tmp_path, data_root):
    """`ulimit -f` of 0.5 MB: the checkpoint of step 0 fits (0.35 MB: Adam has no state yet), the one of step 2 (1 MB)
    fails with EFBIG. One line that names it, exit 1, the step-0 checkpoint kept, no temp file left.
    Catches torch.save's RuntimeError escaping as a traceback."""
    common.get_classifier("fake", data_root, "cpu")
    out = tmp_path / "run"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000))
    p = subprocess.run([sys.executable, str(ROOT / "dcgan.py"), *TINY, "--max-steps", "4", "--sample-every", "2",
                        "--data-root", str(data_root),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert p.returncode == 1, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("dcgan.py: error: File too large") and "stopped at step 2" in last and "(step 0)" in last, last
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 0 and not list(out.glob("*.tmp"))


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="needs Debian's dataset-fashion-mnist (its classifier trains long enough to be signalled)")
def test_sigterm_while_the_evaluation_classifier_trains_is_one_line(tmp_path):
    """A scheduler's SIGTERM before the loop, while the evaluation classifier trains on an empty data root: exit 143
    and one line that says so, no traceback, nothing half-written (no classifier file, no run files). Catches
    signal handlers installed only when the loop starts (the process dies silently with -15)."""
    root, out = tmp_path / "data", tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "dcgan.py"), "--dataset", "fashion-mnist", "--data-root", str(root),
           "--out", str(out), "--width", "8", "--max-steps", "2", "--no-amp"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.time() + 180
        while time.time() < deadline:
            line = p.stderr.readline()
            lines.append(line)
            if "evaluation classifier once" in line or not line:
                break
        assert "evaluation classifier once" in lines[-1], "".join(lines)
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        _, rest = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGTERM, (p.returncode, rest)
    assert "Traceback" not in rest, rest
    assert rest.strip().splitlines() == ["dcgan.py: stopped by SIGTERM before training began"], rest
    assert not (root / "classifiers").exists() or not list((root / "classifiers").iterdir())
    assert not (out / "checkpoint.pt").exists()


def test_sigusr1_through_torchrun_saves_and_stops_both_processes(tmp_path, data_root):
    """SLURM's warning signal (--signal=USR1@180) to torchrun started with --signals-to-handle ...,SIGUSR1 (as the
    docs' cluster recipe says): torchrun forwards it, both processes stop at one agreed log step, rank 0 saves it
    and says so once. Catches a run that torchrun's default (SIGUSR1 ends torchrun at once, its workers orphaned)
    would lose, and processes that stop apart."""
    from test_cluster import signal_mid_run
    from test_distributed import BASE, TORCHRUN
    out = tmp_path / "run"
    torchrun = TORCHRUN[:3] + ["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"] + TORCHRUN[3:]
    cmd = torchrun + ["dcgan.py", *BASE, "--log-every", "2", "--sample-every", "1000", "--eval-every", "0",
                      "--data-root", str(data_root), "--max-steps", "100000", "--out", str(out)]
    code, err = signal_mid_run(cmd, out, signal.SIGUSR1, at_step=4)
    assert code == 1 and "got signal: 10" in err, (code, err[-3000:])  # torchrun's code after forwarding a signal
    assert err.count("interrupted at step") == 1 and "SIGUSR1" in err, err[-3000:]
    state = common.load_checkpoint(out / "checkpoint.pt", "dcgan")
    assert state["step"] >= 4 and state["step"] % 2 == 0, state["step"]


def test_checkpoint_tensors_are_torch_loadable_after_in_memory_serialisation(tmp_path):
    """save_checkpoint serialises into memory before it writes: the file must still be a torch zip that loads to
    equal tensors. Catches a buffer written from the wrong position (an empty or truncated file)."""
    state = {"script": "dcgan", "w": torch.randn(3, 4), "step": 7}
    common.save_checkpoint(tmp_path / "c.pt", state)
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert back["step"] == 7 and torch.equal(back["w"], state["w"])
    assert os.path.getsize(tmp_path / "c.pt") > 0
