"""The mathematics of common.py against closed forms and reference computations."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import common


@pytest.mark.parametrize("make", [lambda: nn.Linear(20, 30), lambda: nn.Conv2d(3, 8, 3)])
def test_spectral_norm_matches_svd(make):
    torch.manual_seed(0)
    layer = make()
    w = layer.weight.detach().clone()
    sigma_svd = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2)
    sn = common.spectral_norm(layer, n_power_iterations=1)
    x = torch.randn(2, *((20,) if isinstance(layer, nn.Linear) else (3, 8, 8)))
    for _ in range(200):  # one power iteration per training forward, u carried over
        sn(x)
    w_sn = sn.weight.detach()
    # The normalised weight has largest singular value 1, and the estimate of sigma matches SVD.
    assert torch.linalg.matrix_norm(w_sn.reshape(w.shape[0], -1), ord=2).item() == pytest.approx(1.0, abs=1e-3)
    assert (w / w_sn).mean().item() == pytest.approx(sigma_svd.item(), rel=1e-3)


def test_spectral_norm_power_iterations_are_used():
    errs = {}
    for n in (1, 10):
        torch.manual_seed(1)
        layer = nn.Linear(50, 50)
        sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
        sn = common.spectral_norm(layer, n_power_iterations=n)
        sn(torch.randn(1, 50))
        errs[n] = abs((layer.parametrizations.weight.original / sn.weight).mean().item() - sigma.item())
    assert errs[10] < errs[1]


def test_inception_score_known_cases():
    k = 10
    onehot = torch.eye(k).repeat(100, 1)  # 1000 confident predictions, uniform over classes
    assert common.inception_score(onehot, splits=1)[0] == pytest.approx(k, rel=1e-9)
    same = torch.softmax(torch.randn(1, k), 1).repeat(1000, 1)  # identical predictions carry no information
    assert common.inception_score(same, splits=10)[0] == pytest.approx(1.0, abs=1e-9)


def test_inception_score_shuffles_before_splitting():
    # Samples ordered class by class: unshuffled splits would each hold one class and score 1.
    ordered = torch.eye(10).repeat_interleave(100, 0)
    mean, std = common.inception_score(ordered, splits=10, generator=torch.Generator().manual_seed(0))
    assert mean > 8.0 and std < 1.0


def test_fid_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(0).normal(size=(500, 16))
    mu, s = common.feature_stats(f)
    assert abs(common.frechet_distance(mu, s, mu, s)) < 1e-8


def test_fid_closed_forms():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))  # diagonal Gaussians
    assert common.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    m = rng.normal(size=(6, 6))
    s1 = m @ m.T + 0.1 * np.eye(6)  # a full covariance and a scaled copy: FID = (1 - sqrt c)^2 tr S
    c = 3.0
    assert common.frechet_distance(mu1, s1, mu1, c * s1) == pytest.approx((1 - np.sqrt(c)) ** 2 * np.trace(s1), rel=1e-9)


def test_fid_from_samples_approaches_the_closed_form():
    rng = np.random.default_rng(2)
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    x, y = rng.normal(size=(40000, 4)), rng.normal(size=(40000, 4)) + shift
    fid = common.frechet_distance(*common.feature_stats(x), *common.feature_stats(y))
    assert fid == pytest.approx(shift @ shift, abs=0.05)


def test_fid_statistics_are_float64():
    mu, s = common.feature_stats(np.ones((10, 3), dtype=np.float32) + np.arange(10)[:, None])
    assert mu.dtype == np.float64 and s.dtype == np.float64


@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_interpolation_ends(mode):
    z0, z1 = torch.randn(2, 100, generator=torch.Generator().manual_seed(0))
    path = common.interpolate(z0, z1, 10, mode)
    assert path.shape == (10, 100)
    assert torch.allclose(path[0], z0, atol=1e-5) and torch.allclose(path[-1], z1, atol=1e-5)


def test_slerp_keeps_the_norm():
    z0, z1 = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    z1 = z1 / z1.norm() * z0.norm()
    norms = common.interpolate(z0, z1, 7, "slerp").norm(dim=1)
    assert torch.allclose(norms, z0.norm().expand(7), rtol=1e-4)
    assert common.interpolate(z0, z1, 7, "linear").norm(dim=1)[3] < 0.95 * z0.norm()  # linear cuts the corner


def test_checkpoint_roundtrip_and_errors(tmp_path):
    path = tmp_path / "checkpoint.pt"
    common.save_checkpoint(path, {"script": "dcgan", "x": torch.arange(3)})
    assert torch.equal(common.load_checkpoint(path, "dcgan")["x"], torch.arange(3))
    with pytest.raises(common.UsageError, match="written by dcgan.py, not wgan_gp.py"):
        common.load_checkpoint(path, "wgan_gp")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(common.UsageError, match="cannot be read"):
        common.load_checkpoint(path, "dcgan")
    with pytest.raises(common.UsageError, match="does not exist"):
        common.load_checkpoint(tmp_path / "missing.pt", "dcgan")


def test_evaluation_never_shifts_the_callers_rng(tmp_path):
    """Building the evaluator (training or loading the classifier) must leave a run's random stream alone."""
    data = common.load_dataset("fake")
    for _ in range(2):  # first call trains and caches the classifier, the second loads it
        torch.manual_seed(0)
        before = torch.get_rng_state()
        evaluator = common.Evaluator(data, tmp_path, "cpu", n_samples=100)
        evaluator(lambda n, g: (torch.zeros(n, 1, 28, 28), None))
        assert torch.equal(before, torch.get_rng_state())
