"""Image files as users have them: every odd PIL mode decoded to the right values, unreadable files skipped and
named, the decoded cache reused and rebuilt, a cache that cannot be written, memory-mapped training equal to
in-memory training (1 and 2 processes, resumed across the two), and sagan at 128 px on a folder larger than a
real memory limit (RLIMIT_DATA)."""
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_distributed import PROBE, launch, max_gap, probe

import common
import dcgan
from conftest import ROOT, assert_same_training_state, run_script


def save(img, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def solid(rgb, size=(40, 30)):
    return Image.new("RGB", size, rgb)


def odd_folder(root):
    """Good files of every mode (name -> the RGB value every pixel must decode to, and a tolerance), and bad ones."""
    good = {}

    def add(name, img, rgb, tol=0, **kw):
        save(img, root / name, **kw)
        good[name] = (rgb, tol)
    add("a_rgb.png", solid((10, 200, 30)), (10, 200, 30))
    add("b_gray16.png", Image.fromarray(np.full((30, 40), 128 * 257, np.uint16)), (128, 128, 128))  # 16-bit mid-grey
    add("c_gray16_dark.png", Image.fromarray(np.full((30, 40), 20 * 257, np.uint16)), (20, 20, 20))
    add("d_gray8.png", Image.new("L", (40, 30), 77), (77, 77, 77))
    add("e_bilevel.png", Image.new("1", (40, 30), 1), (255, 255, 255))
    pal = Image.new("P", (40, 30), 3)
    pal.putpalette([0, 0, 0] * 3 + [250, 120, 5] + [0, 0, 0] * 252)
    add("f_palette.png", pal, (250, 120, 5))
    add("g_rgba_clear.png", Image.new("RGBA", (40, 30), (255, 0, 0, 0)), common.BACKGROUND)  # invisible red
    add("h_rgba_half.png", Image.new("RGBA", (40, 30), (0, 0, 0, 128)), (127, 127, 127), tol=1)  # half black on white
    add("i_la.png", Image.new("LA", (40, 30), (0, 255)), (0, 0, 0))
    ptr = Image.new("P", (40, 30), 1)
    ptr.putpalette([9, 9, 9, 0, 255, 0] + [0, 0, 0] * 254)
    add("j_palette_transparent.png", ptr, common.BACKGROUND, transparency=1)  # palette entry 1 transparent
    add("k_cmyk.jpg", Image.new("CMYK", (40, 30), (0, 255, 255, 0)), (255, 0, 0), tol=12, quality=95)  # red
    add("l_rgb.jpg", solid((60, 90, 200), (500, 375)), (60, 90, 200), tol=6, quality=95)  # draft-decoded
    # EXIF orientation 6 (shown turned 90 degrees clockwise): stored left half black, right half white, so the
    # upright picture is black on top, white below
    side = np.zeros((30, 60, 3), np.uint8)
    side[:, 30:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    save(Image.fromarray(side), root / "m_exif_rotated.jpg", exif=exif, quality=95)
    # Unreadable: a truncated JPEG, a macOS AppleDouble sidecar, an empty file, text named .png
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "n_truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    (root / "._a_rgb.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (root / "o_empty.png").write_bytes(b"")
    (root / "p_notes.png").write_text("not an image\n")
    bad = ["._a_rgb.png", "n_truncated.jpg", "o_empty.png", "p_notes.png"]
    return good, bad


def test_every_odd_file_decodes_to_its_values_and_bad_files_are_skipped_by_name(tmp_path, capsys):
    """A folder with each odd mode (16-bit grey, 8-bit grey, bilevel, palette, RGBA, LA, palette transparency, CMYK,
    a large JPEG decoded by libjpeg's reduced-size path, EXIF rotation) and each bad file (truncated, sidecar, empty,
    not an image) loads: every good image is there with the right values, the bad ones are named in one warning
    line and all listed beside the cache. Catches convert("RGB") on 16-bit grey (white instead of mid-grey), alpha
    dropped instead of composited (invisible red shows red), EXIF ignored (black left, white right), a PIL traceback
    on the first bad file, or a bad file's blank row left in the data (one image too many, a black image)."""
    good, bad = odd_folder(tmp_path / "imgs")
    data = common.load_dataset("folder", tmp_path / "imgs", 16, decode_workers=1)
    err = capsys.readouterr().err
    files = sorted(p.name for p in (tmp_path / "imgs").iterdir() if p.is_file())
    kept = [f for f in files if f not in bad]
    assert len(data) == len(kept) == len(good) + 1
    for name, (rgb, tol) in good.items():
        img = data.images[kept.index(name)].int()
        gap = (img - torch.tensor(rgb).view(3, 1, 1)).abs().max().item()
        assert gap <= tol, (name, img[:, 8, 8].tolist(), rgb)
    rotated = data.images[kept.index("m_exif_rotated.jpg")].float()
    assert rotated[:, :6].mean() < 30 and rotated[:, -6:].mean() > 225  # black on top, white below
    line = next(line for line in err.splitlines() if line.startswith("warning:"))
    assert f"{len(bad)} of {len(files)} files" in line and all(b in line for b in sorted(bad)[:3])
    listed = (tmp_path / "imgs" / ".gan-cache" / "folder-train-16px" / "skipped.txt").read_text()
    assert sorted(line.split("\t")[0].rsplit("/", 1)[-1] for line in listed.splitlines()) == sorted(bad)
    assert "Traceback" not in err


def test_a_folder_with_no_readable_image_is_one_line_and_exit_2(tmp_path, capsys, data_root):
    """Only unreadable files: one line, exit 2, no traceback. Catches an empty (0, 3, H, W) dataset reaching
    training (a ZeroDivisionError or an empty-batch crash) or PIL's exception escaping."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"")
    (tmp_path / "imgs" / "b.png").write_text("no")
    code, err = run_script(dcgan, ["--dataset", "folder", "--data-root", tmp_path / "imgs", "--image-size", "16",
                                   "--out", tmp_path / "run", "--decode-workers", "1"], capsys)
    assert code == 2 and "no readable image under" in err and "Traceback" not in err


def write_images(folder, n, size=24, seed=0, ext="png"):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)  # smooth enough to compress well
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"{i:05d}.{ext}")


def test_the_cache_is_reused_and_rebuilt_when_a_file_changes_or_appears(tmp_path, monkeypatch):
    """Second load decodes nothing; a changed file (new content and time) and an added file each rebuild the
    cache, whose contents then match the files. Catches a cache keyed on the folder name only (stale images after an
    edit), a signature that never matches (every run decodes again), and temp folders left behind."""
    folder = tmp_path / "imgs"
    write_images(folder / "cats", 6)
    write_images(folder / "dogs", 5, seed=1)
    decoded = []
    chunk = common._decode_chunk
    monkeypatch.setattr(common, "_decode_chunk", lambda job: (decoded.append(len(job[1])), chunk(job))[1])
    first = common.load_dataset("folder", folder, 16, decode_workers=1)
    assert decoded == [11] and first.num_classes == 2 and first.labels.tolist() == [0] * 6 + [1] * 5
    again = common.load_dataset("folder", folder, 16, decode_workers=1)
    assert decoded == [11] and torch.equal(again.images, first.images)
    solid((255, 0, 0), (24, 24)).save(folder / "dogs" / "00002.png")
    os.utime(folder / "dogs" / "00002.png", ns=(1, 1))  # an edit that keeps the size would still change the time
    changed = common.load_dataset("folder", folder, 16, decode_workers=1)
    assert decoded == [11, 11] and changed.images[8].float().mean(dim=(1, 2)).tolist() == [255, 0, 0]
    write_images(folder / "cats", 7)  # one more cat
    grown = common.load_dataset("folder", folder, 16, decode_workers=1)
    assert decoded == [11, 11, 12] and len(grown) == 12 and grown.labels.tolist() == [0] * 7 + [1] * 5
    assert sorted(p.name for p in (folder / ".gan-cache").iterdir()) == ["folder-train-16px"]


def test_decoding_in_worker_processes_gives_what_one_process_gives(tmp_path):
    """Two worker processes (more than one chunk each) decode the same array as one process, in file order.
    Catches chunks written at the wrong offset when they come back out of order."""
    write_images(tmp_path / "imgs", 300, ext="jpg")
    two = common.load_dataset("folder", tmp_path / "imgs", 16, decode_workers=2, cache_dir=tmp_path / "c2")
    one = common.load_dataset("folder", tmp_path / "imgs", 16, decode_workers=1, cache_dir=tmp_path / "c1")
    assert len(two) == 300 and torch.equal(one.images, two.images)


def test_a_cache_that_cannot_be_written_decodes_into_memory_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """A full disk (the space reservation fails) or a failure while finishing the cache: one warning line, the data
    decoded into memory, training goes on, and no temp file or folder is left; --data-in-memory no then says in one
    line that it needs a writable cache; images decoded before the failure are kept, not decoded again. Catches a
    crash on a read-only data root, half-written caches left behind, a later run reading a half-written cache, and
    a failure after decoding that decodes everything a second time."""
    write_images(tmp_path / "imgs", 8)

    def full(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    data = common.load_dataset("folder", tmp_path / "imgs", 16, decode_workers=1)
    err = capsys.readouterr().err
    assert len(data) == 8 and data.where == "host RAM" and "cannot write the decoded cache" in err
    assert list((tmp_path / "imgs" / ".gan-cache").iterdir()) == []
    with pytest.raises(common.UsageError, match="needs a decoded cache"):
        common.load_dataset("folder", tmp_path / "imgs", 16, in_memory="no", decode_workers=1)
    monkeypatch.undo()
    monkeypatch.setattr(common.np, "save", full)  # fails after decoding, while the cache is being finished
    decoded, chunk = [], common._decode_chunk
    monkeypatch.setattr(common, "_decode_chunk", lambda job: (decoded.append(len(job[1])), chunk(job))[1])
    data = common.load_dataset("folder", tmp_path / "imgs", 16, decode_workers=1)
    assert len(data) == 8 and list((tmp_path / "imgs" / ".gan-cache").iterdir()) == []
    assert decoded == [8] and "kept in memory" in capsys.readouterr().err
    monkeypatch.undo()
    ok = common.load_dataset("folder", tmp_path / "imgs", 16, decode_workers=1)
    assert torch.equal(ok.images, data.images)


def test_memory_mapped_batches_equal_in_memory_batches(tmp_path):
    """Same seed: every batch from the memory map (rows read in file order, then put back in the batch's order) is
    bit-identical to the batch from memory, over epochs, from a resumed position, and for each of 2 processes'
    shares. Catches the sorted read changing the batch's order, and a map that is not the cache's contents."""
    write_images(tmp_path / "imgs" / "a", 40)
    write_images(tmp_path / "imgs" / "b", 30, seed=2)
    ram = common.load_dataset("folder", tmp_path / "imgs", 16, in_memory="yes", decode_workers=1)
    mapped = common.load_dataset("folder", tmp_path / "imgs", 16, in_memory="no")
    assert ram.where == "host RAM" and mapped.mapped and not ram.mapped
    for rank, world, position in ((0, 1, 0), (0, 1, 5), (0, 2, 0), (1, 2, 3)):
        a = common.Batches(ram, 16, seed=3, position=position, rank=rank, world=world)
        b = common.Batches(mapped, 16, seed=3, position=position, rank=rank, world=world)
        for _ in range(10):  # 4 batches per epoch: crosses epochs
            (xa, ya), (xb, yb) = a.next(), b.next()
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    idx = torch.tensor([5, 60, 2, 33])
    assert torch.equal(common.Batches(mapped, 4, 0)._gather(idx), ram.images[idx])


DCGAN = ["--dataset", "folder", "--image-size", "16", "--width", "4", "--batch-size", "8", "--no-amp",
         "--eval-samples", "20", "--log-every", "1", "--sample-every", "2", "--eval-every", "0"]


def test_a_memory_mapped_run_resumes_bit_identically_from_ram_and_back(tmp_path, capsys):
    """One process: 4 steps from memory equal 2 steps from the memory map resumed for 2 from memory, and 2 from
    memory resumed from the map (the checkpoint's data position, the same batches); args.json and the summary say
    where the data lived. Catches --data-in-memory refused on --resume, or a map whose batches differ."""
    write_images(tmp_path / "imgs", 40)
    base = DCGAN + ["--data-root", tmp_path / "imgs"]
    assert run_script(dcgan, base + ["--max-steps", "4", "--data-in-memory", "yes", "--out", tmp_path / "ram"])[0] == 0
    assert "data in host RAM" in capsys.readouterr().out
    straight = torch.load(tmp_path / "ram" / "checkpoint.pt")
    for first, then in (("no", "yes"), ("yes", "no")):
        out = tmp_path / f"{first}-{then}"
        assert run_script(dcgan, base + ["--max-steps", "2", "--data-in-memory", first, "--out", out])[0] == 0
        assert run_script(dcgan, ["--resume", out / "checkpoint.pt", "--max-steps", "4", "--data-in-memory", then])[0] == 0
        assert_same_training_state(straight, torch.load(out / "checkpoint.pt"))
        where = json.loads((out / "args.json").read_text())["resolved"]["data"]
        assert where.startswith("memory map") == (then == "no"), where
    assert "data in memory map of" in capsys.readouterr().out


def test_two_processes_decode_once_and_train_the_same_from_the_map(tmp_path, monkeypatch):
    """2 processes on a fresh folder: one decodes (one progress line), the other maps what it wrote; 4 steps from
    the map end where one process ends from memory on the same whole batches (tests/ddp_probe.py without
    BatchNorm's statistics, as in test_distributed.py). Catches a cache built twice (both processes decoding), a
    process reading a half-written cache, and a map whose shares differ from memory's. (Resuming under torchrun is
    checked after a SIGTERM in test_cluster.py, from the map in
    test_a_memory_mapped_run_resumes_bit_identically_from_ram_and_back.)"""
    write_images(tmp_path / "imgs", 40)
    base = DCGAN + ["--data-root", tmp_path / "imgs", "--max-steps", "4"]
    two = launch([PROBE, "dcgan"] + base + ["--data-in-memory", "no", "--out", "map"], tmp_path,
                 env={"PROBE_NO_BATCHNORM": "1", "PROBE_DUMP": str(tmp_path)})
    assert two.returncode == 0 and two.stderr.count("decoding 40 folder images") == 1, two.stderr[-3000:]
    assert json.loads((tmp_path / "map" / "args.json").read_text())["resolved"]["data"].startswith("memory map")
    (one,), start = probe("dcgan", base + ["--data-in-memory", "yes", "--out", "ram"], tmp_path, tmp_path / "one", 1,
                          monkeypatch)
    assert json.loads((tmp_path / "ram" / "args.json").read_text())["resolved"]["data"] == "host RAM"
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(torch.equal(rank0[n][k], rank1[n][k]) for n in rank0 for k in rank0[n])
    assert max_gap(one, rank0) < 1e-3 * max_gap(one, start), max_gap(one, rank0)


LIMITED = """import re, resource, sys
sys.path.insert(0, {root!r})
import common, sagan  # torch imported before the limit: the limit is the room left for the run itself
used = int(re.search(r"VmData:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (used + {room}, resource.getrlimit(resource.RLIMIT_DATA)[1]))
sagan.main(sys.argv[1:])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc/self/status are Linux's")
def test_sagan_at_128_px_trains_on_a_folder_larger_than_its_memory_limit(tmp_path):
    """sagan.py --dataset folder --image-size 128 under a real RLIMIT_DATA (anonymous memory; a file's shared
    read-only map is not counted) that leaves the run 600 MB, on 650 MB of decoded images: --data-in-memory auto sees
    the limit, maps the cache and trains; `yes` stops in one line (exit 2) because the images do not fit, which
    shows the limit is real. Catches `auto` deciding by the machine's free RAM alone (it would load into memory and
    die), and a mapped array copied into memory somewhere on the way (an allocation failure)."""
    room, n = 600 * 2**20, 650 * 2**20 // (3 * 128 * 128) + 1
    write_images(tmp_path / "imgs", n, size=32)
    (tmp_path / "limited.py").write_text(LIMITED.format(root=str(ROOT), room=room))
    argv = [sys.executable, tmp_path / "limited.py", "--dataset", "folder", "--data-root", tmp_path / "imgs",
            "--image-size", "128", "--width", "2", "--attn-res", "8", "--batch-size", "4", "--max-steps", "2",
            "--eval-samples", "10", "--no-amp", "--log-every", "1", "--sample-every", "100"]
    run = subprocess.run([str(a) for a in argv + ["--out", tmp_path / "run"]], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    resolved = json.loads((tmp_path / "run" / "args.json").read_text())["resolved"]
    assert resolved["data"].startswith("memory map") and "data in memory map" in run.stdout
    assert os.path.getsize(tmp_path / "imgs" / ".gan-cache" / "folder-train-128px" / "images.u8") > room
    yes = subprocess.run([str(a) for a in argv + ["--out", tmp_path / "yes", "--data-in-memory", "yes"]],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert yes.returncode == 2 and re.search(r"do not fit in memory here", yes.stderr), yes.stderr[-3000:]
    assert "Traceback" not in yes.stderr


def test_celeba_is_the_centre_140_px_of_each_face_at_any_decode_scale(tmp_path):
    """CelebA's 178 x 218 JPEGs: the centre 140 x 140 (blue here, a red frame around it) resized to 64 px, through
    libjpeg's half-size decoding, into the cache under the data root. Catches the 140 px crop applied to the reduced
    image without scaling (the red frame shows at the sides) and the old decoded-<size>.pt path."""
    folder = tmp_path / "celeba" / "img_align_celeba"
    img = np.zeros((218, 178, 3), np.uint8)
    img[..., 0] = 255
    img[39:179, 19:159] = (0, 0, 255)
    for i in range(3):
        save(Image.fromarray(img), folder / f"{i:06d}.jpg", quality=95)
    data = common.load_dataset("celeba", tmp_path, 64, decode_workers=1)
    assert data.images.shape == (3, 3, 64, 64) and data.num_classes == 1
    inner = data.images[:, :, 3:61, 3:61].int()
    assert inner[:, 0].max() < 60 and inner[:, 2].min() > 190, (inner[:, 0].max(), inner[:, 2].min())
    assert (tmp_path / ".gan-cache" / "celeba-train-64px" / "images.u8").exists()
