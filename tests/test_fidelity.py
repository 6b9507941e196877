"""RGB metrics through torch-fidelity's TF-ported Inception, tested without the real weights: a weights file of the
same network with random weights goes through exactly the code users run, and the results must equal
torch-fidelity's own calculate_metrics on the same images."""
import json
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
from conftest import run_script

fidelity = pytest.importorskip("torch_fidelity")
from torch_fidelity import feature_extractor_inceptionv3 as fe  # noqa: E402


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """A state dict of torch-fidelity's inception-v3-compat with random weights (variance-keeping He init, so the
    features are far from degenerate), saved as users' --inception-weights file would be."""
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5
        elif isinstance(m, nn.Linear):
            m.weight.data = torch.randn(m.weight.shape, generator=g) * 100 / m.weight.shape[1] ** 0.5  # confident logits
    path = tmp_path_factory.mktemp("inception") / common.INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def small_inception_input(request, monkeypatch):
    """The network at 75x75 input (its smallest) instead of 299x299: the same layers and code path, 16x fewer
    multiply-adds, so these tests take seconds on a CPU. Tests marked `full_size` keep 299."""
    if "full_size" not in request.keywords:
        monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)


def rgb_data(n, seed, size=32):
    """Structured RGB images: coloured squares at random places on noise, so Inception features vary."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 60, (n, 3, size, size), generator=g, dtype=torch.uint8)
    for i in range(n):
        r, c = torch.randint(0, size - 12, (2,), generator=g).tolist()
        x[i, :, r:r + 12, c:c + 12] = torch.randint(100, 256, (3, 1, 1), generator=g, dtype=torch.uint8)
    return common.ImageData("folder", x, torch.zeros(n, dtype=torch.int64), 1)


class Images(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=[pytest.mark.slow, pytest.mark.full_size])])
def test_rgb_metrics_equal_torch_fidelity_called_directly(random_inception, full):
    """IS, FID and KID of our Evaluator equal torch_fidelity.calculate_metrics on the same uint8 images with the same
    weights (to 1e-6). Catches images fed as floats in [-1, 1] instead of uint8, a grayscale/RGB or size
    mix-up, our own IS (other splits, no shuffle) or FID formula in place of the library's, KID subsets of
    the wrong size, and real images other than the ones named."""
    real, gen = rgb_data(60, 0), rgb_data(50, 1).images
    ev = common.Evaluator(real, "unused", "cpu", n_samples=50, seed=0, n_real=60, inception_weights=random_inception)
    ours = ev.score(gen)
    idx = torch.randperm(60, generator=torch.Generator().manual_seed(0))  # the evaluator's real draw
    theirs = fidelity.calculate_metrics(
        input1=Images(gen), input2=Images(real.images[idx]), isc=True, fid=True, kid=True, cuda=False,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(random_inception),
        kid_subset_size=50, verbose=False, cache=False, save_cpu_ram=True, batch_size=50)
    assert ours["fid"] > 1e-3 and ours["is"] > 1.001  # not degenerate: the checks below can fail
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6, abs=1e-9)
    assert (ours["n_gen"], ours["n_real"], ours["real_split"]) == (50, 60, "train")
    assert "torch-fidelity" in ours["eval_source"] and "inception-v3-compat" in ours["eval_source"]


def test_real_against_the_same_real_images_scores_zero(random_inception):
    """FID of the real images against themselves is 0 (to float rounding), far below that of other images. Catches
    a constant offset or a mean/covariance taken over the wrong axis. (KID's unbiased estimator is not 0 on one
    set against itself; its equality with torch-fidelity is tested above.)"""
    real = rgb_data(40, 0)
    ev = common.Evaluator(real, "unused", "cpu", n_samples=40, seed=0, inception_weights=random_inception)
    same, other = ev.score(real.images), ev.score(rgb_data(40, 5).images)
    assert abs(same["fid"]) < 1e-3 * other["fid"] and other["fid"] > 0


def test_without_torch_fidelity_or_its_weights_metrics_are_skipped_in_one_line(monkeypatch):
    """Offline without --inception-weights (the download fails), or without torch-fidelity: training goes on, the
    record says why there are no RGB metrics. A broken --inception-weights file is a usage error."""
    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
    ev = common.Evaluator(rgb_data(20, 0), "unused", "cpu", n_samples=20)
    assert ev.inception is None and ev.score(rgb_data(20, 1).images) == {}
    assert "skipped" in ev.source and common.INCEPTION_FILE in ev.source
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    ev = common.Evaluator(rgb_data(20, 0), "unused", "cpu", n_samples=20)
    assert "pip install torch-fidelity" in ev.source


def test_a_broken_weights_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "w.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    with pytest.raises(common.UsageError, match="not torch-fidelity's Inception weights"):
        common.load_inception(bad, "cpu")


def test_score_command_equals_the_evaluator_and_reads_labels(random_inception, tmp_path, capsys, data_root):
    """`python common.py score` on a generated.npz: RGB (a folder dataset) gives the Evaluator's IS/FID/KID on
    those images; MNIST-like (fake) gives classifier metrics, with the conditional accuracy from `labels`.
    Catches a command that scores other images than the file's, or drops the labels."""
    folder = tmp_path / "folder"
    folder.mkdir()
    from PIL import Image
    real = rgb_data(30, 0, size=64).images
    for i, img in enumerate(real):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    gen = rgb_data(30, 1, size=64).images
    npz = common.write_generated(tmp_path / "g", common.to_float(gen))
    out = common.main(["score", "--dataset", "folder", "--data-root", folder, "--samples", npz,
                       "--inception-weights", random_inception, "--eval-real", 30])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data = common.load_dataset("folder", folder, 64)
    ev = common.Evaluator(data, folder, "cpu", 30, 0, 30, random_inception)
    assert printed["fid"] == pytest.approx(ev.score(gen)["fid"], rel=1e-9) and out["n_real"] == 30
    fake = common.load_dataset("fake", data_root, train=False)
    npz = common.write_generated(tmp_path / "f", common.to_float(fake.images[:200]), fake.labels[:200])
    res = common.main(["score", "--dataset", "fake", "--data-root", data_root, "--samples", npz])
    assert res["cls_acc"] > 0.9 and res["cls_fid"] < 20
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(SystemExit) as e:
        common.main(["score", "--dataset", "fake", "--samples", tmp_path / "bad.npz"])
    assert e.value.code == 2 and "uint8" in capsys.readouterr().err


def test_a_run_on_rgb_data_records_torch_fidelity_metrics(random_inception, tmp_path, monkeypatch):
    """A script's run on RGB data evaluates through --inception-weights and records is/fid/kid with the protocol
    (network, n_gen, n_real from --eval-real). The RGB folder data stand in for CIFAR-10."""
    import dcgan
    folder = tmp_path / "folder"
    folder.mkdir()
    from PIL import Image
    for i, img in enumerate(rgb_data(32, 0).images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    out = tmp_path / "run"
    assert run_script(dcgan, ["--dataset", "folder", "--data-root", folder, "--image-size", "32", "--width", "4",
                              "--batch-size", "16", "--max-steps", "2", "--eval-samples", "30", "--eval-real", "20",
                              "--inception-weights", random_inception, "--out", out])[0] == 0
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "fid" in r]
    assert rows and all(k in rows[-1] for k in ("is", "fid", "kid"))
    assert (rows[-1]["n_gen"], rows[-1]["n_real"]) == (30, 20) and "torch-fidelity" in rows[-1]["eval_source"]
