"""sngan.py: spectral norm against SVD, the three losses and the conditional pieces against their formulas, the EMA
against its closed form, and real runs on the fake data (every architecture, loss and size, resume, generate)."""
import argparse
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import sngan
from conftest import assert_same_training_state, run_script

FAST = ["--dataset", "fake", "--batch-size", "16", "--width", "4", "--eval-samples", "100", "--log-every", "2",
        "--n-dis", "2", "--sample-every", "2"]


def net_args(**kw):
    base = dict(arch="resnet", image_size=32, width=4, conditional=False, g_block="preact", d_arch="resnet",
                sn_iters=1, latent_dim=16)
    return argparse.Namespace(**{**base, **kw})


WEIGHT_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)


@pytest.mark.parametrize("arch, d_arch, size", [("resnet", "resnet", 32), ("resnet", "strided", 48),
                                                ("cnn", "resnet", 32), ("resnet", "resnet", 28)])
def test_spectral_norm_keeps_every_d_layer_at_sigma_one(arch, d_arch, size):
    """After a few training-mode forwards (power iterations), every D weight, reshaped to (out, in*k*k) as the
    paper does, has largest singular value 1 by SVD, while the raw weights do not. Every conv, linear and
    embedding weight of D is normalised (catches a layer left out, e.g. the projection's embedding or the
    shortcut convs), and no layer of G is (the paper normalises D only)."""
    torch.manual_seed(0)
    args = net_args(arch=arch, d_arch=d_arch, image_size=size, conditional=True)
    D, G = sngan.build_discriminator(args, 3, 10), sngan.build_generator(args, 3, 10)
    layers = [m for m in D.modules() if isinstance(m, WEIGHT_LAYERS)]
    assert any(isinstance(m, nn.Embedding) for m in layers)
    assert all(nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in G.modules())
    assert all(m.parametrizations.weight[0].n_power_iterations == 1 for m in layers)  # --sn-iters reaches them
    raw = [torch.linalg.matrix_norm(m.parametrizations.weight.original.flatten(1), ord=2).item() for m in layers]
    assert max(abs(s - 1) for s in raw) > 0.3  # unnormalised weights are far from 1
    # A rank-one spike in every weight (as a large update would make): the stored u, v no longer fit, so in eval
    # mode (no power iteration) sigma is off 1; training-mode forwards must iterate it back.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in layers:
            w = m.parametrizations.weight.original
            a, b = torch.randn(w.shape[0], 1, generator=g), torch.randn(1, w[0].numel(), generator=g)
            w += 3 * w.flatten(1).norm() / (a.norm() * b.norm()) * (a @ b).view_as(w)
    D.eval()
    assert max(abs(s - 1) for s in sngan.singular_values(D).values()) > 0.1
    D.train()
    x, y = torch.randn(4, 3, size, size), torch.arange(4)
    for _ in range(10):
        D(x, y)
    sigma = sngan.singular_values(D)
    assert len(sigma) == len(layers)
    assert all(abs(s - 1) < 0.02 for s in sigma.values()), sigma


def test_spectral_norm_survives_a_deep_copy():
    """A deep copy of a spectrally normalised D (as a user makes for an EMA of D, or to move it to another device)
    iterates its own u, not the original's, and follows its own train/eval mode. Catches a forward wrapper that
    stays bound to the original module."""
    D = sngan.build_discriminator(net_args(), 1, 10)
    E = copy.deepcopy(D)
    u_d = {k: v.clone() for k, v in D.state_dict().items() if k.endswith("_u")}
    E(torch.randn(2, 1, 32, 32))
    assert all(torch.equal(v, D.state_dict()[k]) for k, v in u_d.items())  # the original untouched
    assert any(not torch.equal(v, E.state_dict()[k]) for k, v in u_d.items())  # the copy iterated


def test_reading_singular_values_does_not_change_training():
    """singular_values reads the weights in eval mode: no extra power iteration (u unchanged), D back in train mode."""
    D = sngan.build_discriminator(net_args(), 1, 10)
    D(torch.randn(2, 1, 32, 32))
    before = {k: v.clone() for k, v in D.state_dict().items()}
    sngan.singular_values(D)
    assert D.training and all(torch.equal(v, before[k]) for k, v in D.state_dict().items())


def test_losses_equal_their_formulas():
    """Hinge, non-saturating and Wasserstein losses on given outputs. Catches a swapped sign or argument, a missing
    margin, or softplus written the wrong way round."""
    real, fake = torch.tensor([2.0, -0.5]), torch.tensor([0.5, -3.0])
    # hinge: mean(relu(1 - real)) = (0 + 1.5) / 2, mean(relu(1 + fake)) = (1.5 + 0) / 2
    assert sngan.d_loss(real, fake, "hinge").item() == pytest.approx(1.5)
    assert sngan.g_loss(fake, "hinge").item() == pytest.approx(1.25)
    sp = lambda v: math.log1p(math.exp(v))
    assert sngan.d_loss(real, fake, "ns").item() == pytest.approx((sp(-2) + sp(0.5)) / 2 + (sp(0.5) + sp(-3)) / 2)
    assert sngan.g_loss(fake, "ns").item() == pytest.approx((sp(-0.5) + sp(3)) / 2)
    assert sngan.d_loss(real, fake, "wasserstein").item() == pytest.approx(-1.25 - 0.75)
    assert sngan.g_loss(fake, "wasserstein").item() == pytest.approx(1.25)


def test_conditional_batchnorm_uses_the_asked_class_and_nothing_else():
    """Output = gamma[y] * BN(x) + beta[y]; the gradient reaches only row y of gamma and beta, and changing another
    class's row changes nothing. Catches an index mix-up (e.g. gamma[y] broadcast the wrong way) or a shared affine."""
    torch.manual_seed(0)
    cbn = sngan.CondBatchNorm2d(4, 3)
    nn.init.normal_(cbn.gamma.weight)
    nn.init.normal_(cbn.beta.weight)
    x, y = torch.randn(6, 4, 5, 5), torch.tensor([1, 0, 1, 1, 0, 1])  # class 2 absent, 0 and 1 mixed
    out = cbn(x, y)
    x_hat = F.batch_norm(x, None, None, training=True, eps=cbn.bn.eps)
    g, b = cbn.gamma.weight[y], cbn.beta.weight[y]  # each sample its own class's row
    assert torch.allclose(out, g[:, :, None, None] * x_hat + b[:, :, None, None], atol=1e-5)
    out.square().sum().backward()
    for emb in (cbn.gamma, cbn.beta):
        assert emb.weight.grad[2].abs().max() == 0 and emb.weight.grad[[0, 1]].abs().min() > 0
    with torch.no_grad():
        cbn.gamma.weight[2] += 5
        cbn.beta.weight[2] -= 5
    assert torch.allclose(cbn(x, y), out, atol=1e-5)
    assert not cbn.bn.affine  # the only affine is the class's


@pytest.mark.parametrize("arch", ["resnet", "cnn"])
def test_projection_term_is_the_inner_product_with_the_class_embedding(arch):
    """D(x, y) = psi(phi(x)) + <embed(y), phi(x)>, with phi the ReLU'd last features summed over space and embed the
    normalised embedding (Miyato & Koyama 2018, Eq. 3). Checked on constructed inputs in eval mode (no power
    iteration between the calls)."""
    torch.manual_seed(0)
    D = sngan.build_discriminator(net_args(arch=arch, conditional=True), 1, 10).eval()
    x, y = torch.randn(5, 1, 32, 32), torch.tensor([0, 3, 3, 7, 9])
    with torch.no_grad():
        h = D.features(x) if arch == "cnn" else F.relu(D.blocks(x))
        phi = h.sum((2, 3))
        psi = D.fc(h.flatten(1) if arch == "cnn" else phi).view(-1)
        V = D.embed.weight  # the spectrally normalised embedding
        assert torch.allclose(D(x, y), psi + (V[y] * phi).sum(1), rtol=1e-4, atol=1e-4)
        # and only through the class: swapping y changes the output by <V[y'] - V[y], phi>
        y2 = torch.tensor([1, 1, 2, 2, 0])
        assert torch.allclose(D(x, y2) - D(x, y), ((V[y2] - V[y]) * phi).sum(1), rtol=1e-4, atol=1e-4)


def test_ema_equals_its_closed_form_and_recomputes_batchnorm_statistics():
    """With G's weights held at p, k updates give e_k = d^k e_0 + (1 - d^k) p. Before use, the average's BatchNorm
    statistics are recomputed from its own forwards (not G's running statistics), from a fixed noise stream that
    leaves the global RNG alone. Catches lerp with d and 1 - d swapped, averaging only some tensors, and an
    average whose BatchNorm statistics belong to G."""
    torch.manual_seed(0)
    G = sngan.build_generator(net_args(), 1, 10)
    ema = common.EMA(G, 0.9, 16)  # its statistics from 2 x 256 noise vectors here (conftest), 8 in runs
    e0 = {k: v.clone() for k, v in ema.module.named_parameters()}
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn_like(p))
    for _ in range(5):
        ema.update(G)
    for k, p in G.named_parameters():
        expected = 0.9 ** 5 * e0[k] + (1 - 0.9 ** 5) * p
        assert torch.allclose(dict(ema.module.named_parameters())[k], expected, atol=1e-6), k
    G(torch.randn(8, 16))  # G's running statistics now follow G's weights
    rng = torch.get_rng_state()
    module = ema.ready()
    assert torch.equal(rng, torch.get_rng_state()) and not module.training
    bn_e, bn_g = module.bn.bn, G.bn.bn
    # recomputed: neither the copy's initial (0, 1) nor G's statistics
    assert bn_e.running_mean.abs().min() > 0 and not torch.allclose(bn_e.running_var, torch.ones_like(bn_e.running_var))
    assert not torch.allclose(bn_e.running_mean, bn_g.running_mean) and bn_e.momentum == bn_g.momentum
    # and they are the average's own: in eval mode it now matches its train-mode output on a large batch
    z = torch.randn(512, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ev = module(z)
        tr = copy.deepcopy(module).train()(z)  # a copy: a train-mode forward would update the statistics
    assert (ev - tr).abs().mean() < 0.01 * tr.abs().mean()  # 0.3% here; 4% with G's statistics
    again = common.EMA(G, 0.9, 16)
    again.load_state_dict(ema.state_dict())
    again.stale = True  # recompute: the same statistics (a fixed noise stream)
    assert torch.equal(again.ready().bn.bn.running_var, bn_e.running_var)


RUNS = [  # (arch, loss, conditional, size, extra flags): every arch, loss and size at least once
    ("resnet", "hinge", False, 32, []),
    ("resnet", "ns", True, 48, ["--d-arch", "strided", "--g-block", "postact"]),
    ("cnn", "wasserstein", True, 32, []),
    ("cnn", "hinge", False, 48, ["--ema", "0.9"]),
    ("resnet", "wasserstein", False, 28, ["--ema", "0.9", "--lr-decay", "none"]),
]


@pytest.mark.figures
@pytest.mark.parametrize("arch, loss, conditional, size, extra", RUNS)
def test_sngan_trains(arch, loss, conditional, size, extra, tmp_path, data_root):
    """D and G stepped (Adam's counts: n_dis D steps per G step), weights moved, losses finite, the learning rate
    decayed linearly (or not, with --lr-decay none), sigma logged and ~1 for every D layer, files written."""
    out = tmp_path / "run"
    argv = FAST + ["--arch", arch, "--loss", loss, "--image-size", size, "--max-steps", "4", "--out", out,
                   "--data-root", data_root] + (["--conditional"] if conditional else []) + extra
    assert run_script(sngan, argv)[0] == 0
    state = common.load_checkpoint(out / "checkpoint.pt", "sngan")
    assert state["step"] == 4 and state["position"] == 8
    assert all(s["step"] == 8 for s in state["opt_d"]["state"].values())
    assert all(s["step"] == 4 for s in state["opt_g"]["state"].values())
    lr = state["opt_g"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(0.0 if "none" not in extra else 2e-4, abs=1e-12)  # 4 of 4 steps: decayed to 0
    rows = common.read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss_d" in r]
    assert train_rows and all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in train_rows)
    assert [r["lr_g"] for r in train_rows][0] < 2e-4 or "none" in extra
    sigma_rows = [r for r in rows if "sigma_0" in r]
    assert sigma_rows and all(abs(v - 1) < 0.1 for k, v in sigma_rows[-1].items() if k.startswith("sigma_"))
    args = argparse.Namespace(**state["args"])
    torch.manual_seed(args.seed)
    G0 = sngan.build_generator(args, 1, 10)
    assert all(not torch.equal(p, state["G"][k]) for k, p in G0.state_dict().items() if k.endswith("weight"))
    assert ("G_ema" in state) == ("--ema" in extra)
    for f in ("args.json", "losses.png", "interpolation.png", "progress.gif", "samples/step_0000004.png"):
        assert (out / f).exists(), f
    assert state["data"]["conditional"] == conditional


def test_sngan_resume_is_exact_with_schedules_and_ema(tmp_path, data_root, monkeypatch):
    """A 4-step run stopped after 2 (as by --max-minutes or Ctrl-C) and resumed ends where an uninterrupted one does:
    G, D, both optimisers, both LR schedules (decaying over the same 4 steps), the EMA, position, RNG."""
    args = FAST + ["--conditional", "--ema", "0.9", "--sample-every", "2", "--data-root", data_root, "--max-steps", "4"]
    assert run_script(sngan, args + ["--out", tmp_path / "full"])[0] == 0
    should_stop = common.Run.should_stop
    with monkeypatch.context() as m:  # (monkeypatch.undo() would undo conftest's figure no-op too)
        m.setattr(common.Run, "should_stop", lambda self, step: step >= 2 or should_stop(self, step))
        assert run_script(sngan, args + ["--out", tmp_path / "part"])[0] == 0
    assert common.load_checkpoint(tmp_path / "part" / "checkpoint.pt", "sngan")["step"] == 2
    assert run_script(sngan, ["--resume", tmp_path / "part" / "checkpoint.pt"])[0] == 0
    full, part = (common.load_checkpoint(tmp_path / r / "checkpoint.pt", "sngan") for r in ("full", "part"))
    assert_same_training_state(full, part)
    assert full["sched_g"] == part["sched_g"] and full["sched_d"] == part["sched_d"]
    assert all(torch.equal(v, part["G_ema"][k]) for k, v in full["G_ema"].items())


def test_sngan_generate_writes_balanced_labels_from_the_ema(tmp_path, data_root):
    """--generate on a conditional run with --ema: balanced labels, no dataset needed, and the images are the
    EMA's, not G's (they differ when the two differ)."""
    out = tmp_path / "run"
    assert run_script(sngan, FAST + ["--conditional", "--ema", "0.5", "--max-steps", "3", "--out", out,
                                     "--data-root", data_root])[0] == 0
    assert run_script(sngan, ["--generate", "20", "--checkpoint", out / "checkpoint.pt", "--out", tmp_path / "gen",
                              "--data-root", tmp_path / "empty"])[0] == 0
    arrays = np.load(tmp_path / "gen" / "generated.npz")
    assert arrays["images"].shape == (20, 1, 28, 28) and list(arrays["labels"]) == [i % 10 for i in range(20)]
    state = common.load_checkpoint(out / "checkpoint.pt", "sngan")
    args = argparse.Namespace(**state["args"])
    G = sngan.build_generator(args, 1, 10)
    G.load_state_dict(state["G"])
    z = torch.randn(20, args.latent_dim, generator=torch.Generator().manual_seed(0))
    y = torch.arange(20) % 10
    from_g = common.to_uint8(sngan.sample_images(G, z, y)).numpy()
    assert not np.array_equal(from_g, arrays["images"])
    ema = common.EMA(G, args.ema, args.latent_dim, 10)
    ema.load_state_dict(state["G_ema"])
    assert np.array_equal(common.to_uint8(sngan.sample_images(ema.ready(), z, y)).numpy(), arrays["images"])


def test_resnet_shapes_at_every_supported_size():
    """G makes, and D takes, every size the plan allows, in both resnet layouts and the cnn."""
    for size in (16, 28, 32, 48, 64, 96):
        for arch in ("resnet", "cnn"):
            args = net_args(arch=arch, image_size=size, conditional=True)
            G, D = sngan.build_generator(args, 3, 10), sngan.build_discriminator(args, 3, 10)
            y = torch.tensor([1, 2])
            x = G(torch.randn(2, 16), y)
            assert x.shape == (2, 3, size, size), (arch, size)
            assert D(x, y).shape == (2,)


def test_paper_channel_counts_and_resolutions():
    """At the default width 64: CIFAR-10 ResNet G 256 channels from 4x4, D 128 channels in 4 blocks ending at 8x8;
    STL-10 (48 px) G 512..64 from 6x6, D 64..1024 in 5 blocks ending at 3x3; standard CNN D 64..512 at 4x4 (the
    paper's App. B and Table 3). Catches a D that pools too often (sum pooling over 4x4 instead of 8x8)."""
    for size, g_first, d_shapes in ((32, (256, 4, 4), [(128, 16, 16), (128, 8, 8), (128, 8, 8), (128, 8, 8)]),
                                    (48, (512, 6, 6), [(64, 24, 24), (128, 12, 12), (256, 6, 6), (512, 3, 3),
                                                       (1024, 3, 3)])):
        G = sngan.ResNetGenerator(128, 3, size)
        assert G.fc.out_features == math.prod(g_first) and G.s0 == g_first[1]
        assert [b.conv2.out_channels for b in G.blocks] == [g_first[0] // (1 if size == 32 else 2 ** (i + 1))
                                                             for i in range(3)]
        D = sngan.ResNetDiscriminator(3, size)
        h, shapes = torch.zeros(1, 3, size, size), []
        for block in D.blocks:
            h = block(h)
            shapes.append(tuple(h.shape[1:]))
        assert shapes == d_shapes, size
    D = sngan.CNNDiscriminator(3, 32, 64)
    assert [m.out_channels for m in D.modules() if isinstance(m, nn.Conv2d)] == [64, 64, 128, 128, 256, 256, 512]
    assert D.fc.in_features == 512 * 4 * 4


@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("loss", ["hinge", "ns", "wasserstein"])
@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_every_arch_loss_condition_and_size_takes_real_steps(arch, loss, conditional, size, tmp_path, data_root):
    """Every architecture, loss, conditioning and size together, 2 steps each: D stepped n_dis times per G step
    and G stepped (Adam's counts cover every parameter, so a layer left out of the graph, e.g. an unused
    embedding, fails), losses finite."""
    out = tmp_path / "run"
    argv = ["--dataset", "fake", "--batch-size", "8", "--width", "2", "--eval-samples", "20", "--log-every", "1",
            "--n-dis", "2", "--arch", arch, "--loss", loss, "--image-size", size, "--max-steps", "2", "--out", out,
            "--data-root", data_root, "--eval-every", "0"] + (["--conditional"] if conditional else [])
    assert run_script(sngan, argv)[0] == 0
    state = common.load_checkpoint(out / "checkpoint.pt", "sngan")
    args = argparse.Namespace(**state["args"])
    assert len(state["opt_d"]["state"]) == len(list(sngan.build_discriminator(args, 1, 10).parameters()))
    assert len(state["opt_g"]["state"]) == len(list(sngan.build_generator(args, 1, 10).parameters()))
    assert all(s["step"] == 4 for s in state["opt_d"]["state"].values())
    assert all(s["step"] == 2 for s in state["opt_g"]["state"].values())
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss_d" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in rows)


def test_g_step_batch_is_twice_d_batch_and_d_sees_each_image_with_its_label(tmp_path, data_root, monkeypatch):
    """The authors' batch sizes: D steps on --batch-size real + as many fake, G steps on 2x --batch-size (or
    --g-batch-size). And in the conditional D step, each real image reaches D with its own dataset label and each
    fake with the label G made it for. Catches G stepping on D's batch size, and a misaligned concatenation
    (labels shuffled against images, or real and fake halves swapped) that still runs without error."""
    calls = []
    build_g, build_d = sngan.build_generator, sngan.build_discriminator

    def record(name):
        def hook(m, inp, out):
            if m.training:  # training forwards only (sampling runs G in eval mode)
                calls.append((name, torch.is_grad_enabled(), inp[1] if name == "G" else inp[0],
                              out if name == "G" else inp[1]))
        return hook

    def spy_g(*a, **kw):
        G = build_g(*a, **kw)
        G.register_forward_hook(record("G"))
        return G

    def spy_d(*a, **kw):
        D = build_d(*a, **kw)
        D.register_forward_hook(record("D"))
        return D
    monkeypatch.setattr(sngan, "build_generator", spy_g)
    monkeypatch.setattr(sngan, "build_discriminator", spy_d)
    data = common.load_dataset("fake", data_root)
    for extra, g_batch in (([], 32), (["--g-batch-size", "24"], 24)):
        calls.clear()
        out = tmp_path / f"run{g_batch}"
        argv = FAST + ["--conditional", "--arch", "cnn", "--max-steps", "1", "--eval-every", "0", "--out", out,
                       "--data-root", data_root] + extra
        assert run_script(sngan, argv)[0] == 0
        training = calls
        assert len(training) == 2 * 2 + 2
        d_steps = [(training[i], training[i + 1]) for i in (0, 2)]  # n_dis 2: (G under no_grad, D) twice
        for (g, d) in d_steps:
            assert g[0] == "G" and not g[1] and d[0] == "D" and d[1]
            x, y = d[2], d[3]
            assert x.shape[0] == 32 and y.shape[0] == 32  # 16 real + 16 fake in one forward
            real = common.to_uint8(x[:16])
            for img, label in zip(real, y[:16]):
                match = (data.images == img).flatten(1).all(1).nonzero().flatten()
                assert len(match) == 1 and data.labels[match[0]] == label, "a real image with another label"
            assert torch.equal(x[16:], g[3].to(x.dtype)) and torch.equal(y[16:], g[2]), "fake half misaligned"
        g_step = training[4]
        assert g_step[0] == "G" and g_step[1] and g_step[3].shape[0] == g_batch
        assert training[5][0] == "D" and training[5][2].shape[0] == g_batch
