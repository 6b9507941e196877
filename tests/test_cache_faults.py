"""The decoded cache under real faults: two builders at once (both pid 1, in pid namespaces of their own), a byte
flipped in a published cache, SIGTERM to a build's process group and SIGKILL of a builder (the next build
continues what they decoded), temp folders of builders that are gone, dangling and looping links, links from a
class folder back to the data root, and an empty class folder added after the cache was built."""
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import common
from conftest import ROOT

# A build in a process of its own, with the stop signals handled as Run handles them before the training loop (a
# signal raises common.Stopped). Argv: data root, cache dir, decode workers, file for the images (.npy).
BUILD = """import sys
sys.path.insert(0, {root!r})
import numpy as np
import common
common.StopSignals().install()  # as Run(args, script) does: before the loop a signal raises Stopped
root, cache, workers, out = sys.argv[1:5]
try:
    data = common.load_dataset("folder", root, 16, "cpu", cache_dir=cache, decode_workers=int(workers))
except (common.Stopped, common.UsageError) as e:
    print(f"build: {{e}}", file=sys.stderr)
    raise SystemExit(128 + e.signum if isinstance(e, common.Stopped) else 2)
np.save(out, data.images.numpy())
print(len(data), data.num_classes)
"""


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory):
    """448 PNGs of 1000 x 1000 pixels in 2 classes (7 blocks of 64): about 25 ms each to decode, so that a build with
    2 workers takes several seconds. 40 different pictures, copied under new names (encoding each would take
    longer than decoding)."""
    root = tmp_path_factory.mktemp("slow")
    pictures = []
    for i in range(40):
        a = np.zeros((1000, 1000, 3), np.uint8)
        a[:, : 25 * i] = (6 * i, 255 - 6 * i, 100)
        a[25 * i:, :] += np.uint8(i)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        pictures.append(buf.getvalue())
    for i in range(448):
        folder = root / ("a" if i % 3 else "b")
        folder.mkdir(exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(pictures[i % 40])
    return root


@pytest.fixture(scope="module")
def clean_entry(slow_folder, tmp_path_factory):
    """The cache entry of an uninterrupted build of slow_folder, which the continued builds must equal."""
    cache = tmp_path_factory.mktemp("clean")
    common.load_dataset("folder", slow_folder, 16, cache_dir=cache, decode_workers=2)
    return entry_of(cache)


def write_images(folder, n, size=24, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size)).save(folder / f"{i:05d}.png")


def entry_of(cache):
    entries = [p for p in cache.iterdir() if p.name.endswith("px")]
    assert len(entries) == 1, sorted(p.name for p in cache.iterdir())
    return entries[0]


def same_cache(a, b):
    """Two published cache entries hold the same bytes (images, labels) and the same checksums."""
    ma, mb = (json.loads((e / "manifest.json").read_text()) for e in (a, b))
    assert (ma["shape"], ma["checksums"], ma["num_classes"]) == (mb["shape"], mb["checksums"], mb["num_classes"])
    assert (a / "images.u8").read_bytes() == (b / "images.u8").read_bytes()
    assert np.array_equal(np.load(a / "labels.npy"), np.load(b / "labels.npy"))


def build_script(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(BUILD.format(root=str(ROOT)))
    return script


def blocks_done(cache):
    """Blocks recorded in the progress files of the temp folders under `cache`."""
    n = 0
    for p in cache.glob("*.tmp/progress"):
        try:
            n += sum('"start"' in line for line in p.read_text().splitlines()[1:])
        except OSError:
            pass
    return n


def start_and_signal(tmp_path, root, cache, sig):
    """A build (2 decode workers) in a session of its own, sent `sig` to its whole process group (as a scheduler or
    a terminal does) once its progress shows a decoded block. Returns (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, build_script(tmp_path), root, cache, "2", tmp_path / "stopped.npy"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    deadline = time.time() + 120
    while blocks_done(cache) == 0 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert blocks_done(cache) > 0 or proc.returncode != 0, f"the build ended with no progress recorded:\n{err}"
    return proc.returncode, err


def decoded_count(err):
    return sum(int(n) for n in re.findall(r"^decoding (\d+) folder images", err, re.M))


def test_sigterm_to_a_builds_process_group_keeps_its_blocks_and_the_next_build_continues_them(tmp_path, slow_folder,
                                                                                             clean_entry):
    """SIGTERM to the process group of a build with 2 decode workers, once a block is recorded: exit 143, one
    stderr line beside the progress lines (what was stopped and how many images were kept), no traceback; the
    temp folder stays; the next build decodes only the images not kept (counted in its 'decoding N' line), and
    the cache it publishes equals a clean build's byte for byte. Catches workers that die of the group's signal
    with tracebacks (BrokenPipeError, KeyboardInterrupt) or that hang the parent's exit, a temp folder removed on a
    stop (all the work lost; on today's code there is no progress at all: the build runs to its end), a resumed
    build that decodes everything again or writes blocks at the wrong place, and a progress record written before
    its rows (a continued cache that differs from a clean one)."""
    cache = tmp_path / "cache"
    code, err = start_and_signal(tmp_path, slow_folder, cache, signal.SIGTERM)
    lines = [line for line in err.splitlines() if not line.startswith(("decoding ", "  "))]
    assert code == 143 and "Traceback" not in err, err
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], err
    kept = int(re.search(r"while decoding folder: (\d+) of 448 images kept, the next run continues them", lines[0])[1])
    assert 0 < kept < 448 and len(list(cache.glob("*.tmp"))) == 1
    again = subprocess.run([sys.executable, build_script(tmp_path), slow_folder, cache, "2", tmp_path / "again.npy"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert decoded_count(again.stderr) == 448 - kept, again.stderr
    assert not list(cache.glob("*.tmp")) and not list(cache.glob("*.old"))
    same_cache(entry_of(cache), clean_entry)
    assert np.load(tmp_path / "again.npy").tobytes() == (entry_of(cache) / "images.u8").read_bytes()


def test_a_killed_builders_temp_folder_is_continued_by_the_next_build(tmp_path, slow_folder, clean_entry):
    """SIGKILL (the out-of-memory killer, a scheduler past its grace time) of a build's process group once a block
    is recorded: nothing could be written at the end, yet the next build on this machine sees that the builder's
    process no longer runs, continues its folder (decodes fewer than all 448 images) and publishes a cache equal
    to a clean build's. Catches a dead builder's folder left forever beside the cache (a new build from zero each
    time), and a pid check that takes a reused or dead pid for the builder."""
    cache = tmp_path / "cache"
    code, _ = start_and_signal(tmp_path, slow_folder, cache, signal.SIGKILL)
    assert code == -9 and len(list(cache.glob("*.tmp"))) == 1
    again = subprocess.run([sys.executable, build_script(tmp_path), slow_folder, cache, "2", tmp_path / "again.npy"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert 0 < decoded_count(again.stderr) < 448, again.stderr
    assert not list(cache.glob("*.tmp"))
    same_cache(entry_of(cache), clean_entry)


OWNER = """import sys
from pathlib import Path
sys.path.insert(0, {root!r})
import common
folder = Path(sys.argv[1])
folder.mkdir()
getattr(common, "_write_owner", lambda folder: None)(folder)  # what a builder writes first
(folder / "progress").write_text('{{"signature": "an older listing", "shape": [1, 3, 16, 16], "block": 64}}\\n')
"""


def test_temp_folders_of_gone_builders_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    """Beside a cache entry: the temp folder of a process of this machine that has ended (a real process wrote its
    owner record and exited), one of a builder on another machine that shows no sign of life for longer than
    CACHE_STALE (made 2 s here, and waited for), one of a builder on another machine that is recent, and one
    of this very process's pid and machine (a live builder). A build of the entry removes the first two and
    leaves the last two. Catches dead builders' folders piling up (today every killed build leaves its
    folder, as large as the cache, for good), and a clean-up that removes a live builder's folder (a build on
    another machine, or a container whose Python is pid 1 too)."""
    write_images(tmp_path / "imgs", 8)
    entry = common._cache_entry("folder", tmp_path / "imgs", 16, True, tmp_path / "cache")
    entry.parent.mkdir(parents=True)
    (tmp_path / "owner.py").write_text(OWNER.format(root=str(ROOT)))
    dead = entry.with_name(f"{entry.name}.{socket.gethostname()}.12345.0badcafe.tmp")
    subprocess.run([sys.executable, tmp_path / "owner.py", dead], check=True, timeout=120)
    far_old, far_new = (entry.with_name(f"{entry.name}.elsewhere.7.{tag}.tmp") for tag in ("00000001", "00000002"))
    for folder in (far_old, far_new):
        folder.mkdir()
        (folder / "owner.json").write_text(json.dumps({"host": "elsewhere", "pid": 7, "name": folder.name}))
        (folder / "progress").write_text("{}\n")
    # (a folder's ctime cannot be set back: the test waits it out, and then has 2 s for the build of 8 images below)
    monkeypatch.setattr(common, "CACHE_STALE", 2.0)
    time.sleep(2.5)
    os.utime(far_new / "progress")  # its builder wrote a block just now
    mine = entry.with_name(f"{entry.name}.{socket.gethostname()}.{os.getpid()}.deadbeef.tmp")
    mine.mkdir()
    common._write_owner(mine)
    data = common.load_dataset("folder", tmp_path / "imgs", 16, cache_dir=tmp_path / "cache", decode_workers=1)
    assert len(data) == 8
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([entry.name, far_new.name, mine.name])


TWO = """import os, sys, time
sys.path.insert(0, {root!r})
import numpy as np
import common
go, root, cache, out = sys.argv[1:5]
open(out + ".ready", "w").close()  # imports done: at the start line
while not os.path.exists(go):
    time.sleep(0.005)
data = common.load_dataset("folder", root, 16, "cpu", cache_dir=cache, decode_workers=1)
np.save(out, data.images.numpy())
print(os.getpid())
"""


def test_two_builders_with_the_same_pid_at_once_publish_one_correct_cache(tmp_path, slow_folder):
    """Two real processes, each pid 1 in a pid namespace of its own (two containers, or Python as a container's
    first process) on one machine and one cache, start building the same entry at the same moment: both exit 0
    with no warning, both get the images of a clean build, and the one published cache equals a clean build's byte
    for byte, with no temp folder left. Catches a temp folder named by the pid alone (both write into
    <entry>.1.tmp: one truncates the other's array, renames it away or removes it mid-build), and a publish that
    moves the other builder's fresh cache aside while that builder reads it."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("unshare cannot make pid namespaces here (needs root or user namespaces)")
    (tmp_path / "two.py").write_text(TWO.format(root=str(ROOT)))
    go, cache = tmp_path / "go", tmp_path / "cache"
    root = slow_folder / "b"  # 150 of the slow images, one class: 2 blocks and a part
    procs = [subprocess.Popen(["unshare", "-p", "-f", "--mount-proc", sys.executable, tmp_path / "two.py", go,
                               root, cache, tmp_path / f"{i}.npy"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.time() + 300
    while time.time() < deadline and not all((tmp_path / f"{i}.npy.ready").exists() for i in range(2)):
        time.sleep(0.05)  # both at the start line, whatever their imports took
    go.touch()
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and out.split() == ["1"], err
        assert "warning" not in err and "Traceback" not in err, err
    assert sum(decoded_count(err) for _, err in results) == 150 * 2  # both decoded: they did run at once
    clean = common.load_dataset("folder", root, 16, cache_dir=tmp_path / "clean", decode_workers=2)
    for i in range(2):
        assert np.array_equal(np.load(tmp_path / f"{i}.npy"), clean.images.numpy())
    assert [p.name for p in cache.iterdir()] == [entry_of(cache).name]
    same_cache(entry_of(cache), entry_of(tmp_path / "clean"))


def flip(file, offset, keep_time):
    st = os.stat(file)
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))
    if keep_time:  # as a disk's bit rot: the file's size and time are those the manifest recorded
        os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("where", ["last block, time kept", "second block, time changed"])
def test_a_byte_flipped_in_a_published_cache_is_found_and_the_cache_rebuilt(tmp_path, capsys, where):
    """200 images at 16 px (4 blocks of 64 images: 0-63, 64-127, 128-191, 192-199); one byte flipped in images.u8:
    in the last block with the file's time put back (bit rot: the cheap check of every use reads the first and the
    last block, so it is found for certain), or in the second block with the file's new time (written to: the
    manifest's record of the file no longer matches, so every block is checked). The next load says in one line
    that the cache is damaged, rebuilds it, and returns the images of the clean build. Catches a cache served
    however its bytes came to be (today: the flipped byte reaches training), a check that misses either case, and
    a damaged cache reused by the rebuild's publish as 'another builder's' cache of the same signature."""
    write_images(tmp_path / "imgs", 200)
    first = common.load_dataset("folder", tmp_path / "imgs", 16, decode_workers=1)
    file = tmp_path / "imgs" / ".gan-cache" / "folder-train-16px" / "images.u8"
    row = 3 * 16 * 16
    flip(file, (195 if where.startswith("last") else 70) * row + 11, keep_time=where.endswith("kept"))
    capsys.readouterr()
    again = common.load_dataset("folder", tmp_path / "imgs", 16, decode_workers=1)
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "is damaged" in warned[0] and "decoding it again" in warned[0], err
    assert np.array_equal(again.images.numpy(), first.images.numpy())
    assert np.array_equal(np.fromfile(file, np.uint8).reshape(200, 3, 16, 16), first.images.numpy())
    capsys.readouterr()
    common.load_dataset("folder", tmp_path / "imgs", 16, decode_workers=1)
    assert "decoding" not in capsys.readouterr().err  # the rebuilt cache passes its check


def test_a_dangling_link_and_a_link_loop_are_skipped_and_named_as_unreadable_files(tmp_path, capsys):
    """A class folder with 5 images, a link to a file that was deleted, and two links that point at each other: the
    load keeps the 5 images, and the warning line and skipped.txt name the 3 links with their reason as for any
    unreadable file. Catches the FileNotFoundError (or ELOOP) of stat() in the listing that stops the run today."""
    write_images(tmp_path / "imgs" / "cats", 5)
    write_images(tmp_path / "imgs" / "dogs", 2, seed=1)
    (tmp_path / "imgs" / "cats" / "gone.png").symlink_to(tmp_path / "deleted.png")
    (tmp_path / "imgs" / "cats" / "loop1.png").symlink_to("loop2.png")
    (tmp_path / "imgs" / "cats" / "loop2.png").symlink_to("loop1.png")
    data = common.load_dataset("folder", tmp_path / "imgs", 16, decode_workers=1)
    err = capsys.readouterr().err
    assert len(data) == 7 and data.num_classes == 2 and "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith("warning:"))
    assert "3 of 10 files" in line and all(f"cats/{n}" in line for n in ("gone.png", "loop1.png", "loop2.png")), line
    listed = (tmp_path / "imgs" / ".gan-cache" / "folder-train-16px" / "skipped.txt").read_text().splitlines()
    assert sorted(row.split("\t")[0].rsplit("/", 1)[-1] for row in listed) == ["gone.png", "loop1.png", "loop2.png"]
    assert all("No such file" in row or "symbolic links" in row for row in listed), listed


def test_class_folders_that_link_back_to_the_data_root_or_above_are_skipped_in_one_line_each(tmp_path, capsys):
    """Beside the class folders cats (3 images) and dogs (2): `again` -> the data root itself and `up` -> its parent
    folder (real symlinks). The load has 2 classes and 5 images, and one warning line names each skipped link.
    Catches every image counted a second time as one more class (today: 3 classes and 10 images from `again`, and
    `up` adds the root's parent folder's images again)."""
    write_images(tmp_path / "imgs" / "cats", 3)
    write_images(tmp_path / "imgs" / "dogs", 2, seed=1)
    (tmp_path / "imgs" / "again").symlink_to(tmp_path / "imgs", target_is_directory=True)
    (tmp_path / "imgs" / "up").symlink_to("..", target_is_directory=True)
    data = common.load_dataset("folder", tmp_path / "imgs", 16, decode_workers=1)
    err = capsys.readouterr().err
    assert (len(data), data.num_classes) == (5, 2) and data.labels.tolist() == [0, 0, 0, 1, 1]
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 2, err
    assert any(str(tmp_path / "imgs" / "again") in w for w in warned)
    assert any(str(tmp_path / "imgs" / "up") in w for w in warned)


def test_an_empty_class_folder_added_after_the_cache_counts_as_without_a_cache(tmp_path):
    """Build a cache of 2 classes, add an empty class folder (last by name, so no label of a file changes), load
    again: the number of classes (the model's conditional size) is the 3 a load without any cache gives. Catches a
    signature that covers the files and not the class list (today the old cache's 2 is served)."""
    write_images(tmp_path / "imgs" / "cats", 3)
    write_images(tmp_path / "imgs" / "dogs", 2, seed=1)
    assert common.load_dataset("folder", tmp_path / "imgs", 16, decode_workers=1).num_classes == 2
    (tmp_path / "imgs" / "zebras").mkdir()
    cached = common.load_dataset("folder", tmp_path / "imgs", 16, decode_workers=1)
    fresh = common.load_dataset("folder", tmp_path / "imgs", 16, decode_workers=1, cache_dir=tmp_path / "fresh")
    assert cached.num_classes == fresh.num_classes == 3
