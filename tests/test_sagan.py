"""sagan.py: the self-attention block against its formula (weights sum to 1 over the keys, gamma = 0 is the identity,
odd sizes, float32 softmax under bf16), attention at the asked sizes for every supported image size, spectral norm on
every layer of G and D against SVD, the hinge loss, and real runs on the fake data (with and without attention,
conditional and not, resume, generate, the attention figure). Each test's docstring names the bug it catches."""
import argparse
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import sagan
from conftest import assert_same_training_state, run_script

FAST = ["--dataset", "fake", "--batch-size", "8", "--width", "2", "--eval-samples", "50", "--log-every", "1",
        "--sample-every", "100", "--eval-every", "0"]


def net_args(**kw):
    base = dict(image_size=32, width=4, conditional=False, sn_iters=1, latent_dim=16, attn_res=[16])
    return argparse.Namespace(**{**base, **kw})


def attention_block(channels=16, seed=0):
    """A block with random (not SN'd) weights, so that the weights are far from uniform."""
    torch.manual_seed(seed)
    m = sagan.SelfAttention(channels)
    for conv in (m.query, m.key, m.value, m.out):
        nn.init.normal_(conv.weight)
    return m


SIZES = [(8, 8), (7, 7), (7, 6), (5, 9)]  # even, odd, and non-square maps with odd sides


@pytest.mark.parametrize("h, w", SIZES)
def test_attention_weights_sum_to_one_over_the_keys(h, w):
    """For every query the weights over the (2x2-pooled, ceil mode) key positions are >= 0 and sum to 1, and there are
    ceil(h/2) * ceil(w/2) keys. Catches the softmax taken over the query axis (sums over keys then differ from 1),
    pooling that drops an odd side's last row or column, and weights kept during an ordinary forward."""
    m = attention_block()
    x = torch.randn(3, 16, h, w)
    m(x)
    assert m.weights is None  # nothing kept unless asked (no cost during training)
    m.keep = True
    m(x)
    beta, (qh, qw), (hk, wk) = m.weights
    assert (qh, qw) == (h, w) and (hk, wk) == (math.ceil(h / 2), math.ceil(w / 2))
    assert beta.shape == (3, h * w, hk * wk) and beta.dtype == torch.float32
    assert beta.min() >= 0
    assert torch.allclose(beta.sum(-1), torch.ones(3, h * w), atol=1e-5)
    assert not torch.allclose(beta.sum(1), torch.ones(3, hk * wk), atol=1e-2)  # the other axis does not: can fail


def _pool(t):
    """2x2 max-pool with an odd side's last row / column pooled alone, written out."""
    B, C, H, W = t.shape
    out = torch.empty(B, C, math.ceil(H / 2), math.ceil(W / 2), dtype=t.dtype)
    for a in range(out.shape[2]):
        for b in range(out.shape[3]):
            out[:, :, a, b] = t[:, :, 2 * a:2 * a + 2, 2 * b:2 * b + 2].amax((2, 3))
    return out


@pytest.mark.parametrize("h, w", [(6, 6), (7, 6)])
def test_attention_equals_its_formula(h, w):
    """y_i = x_i + gamma * W_o sum_j softmax_j(q_i . k_j) v_j with q = W_q x, k = pool(W_k x), v = pool(W_v x), written
    out position by position (gamma 0.7). Catches q and k swapped (a softmax over queries), queries pooled
    too, a key grid read in the wrong order (the non-square map), W_o or the residual left out, gamma ignored."""
    m = attention_block()
    with torch.no_grad():
        m.gamma.fill_(0.7)
    x = torch.randn(2, 16, h, w)
    got = m(x).detach()
    wq, wk, wv, wo = (c.weight[:, :, 0, 0] for c in (m.query, m.key, m.value, m.out))
    q = torch.einsum("oc,bchw->bohw", wq, x)
    k, v = _pool(torch.einsum("oc,bchw->bohw", wk, x)), _pool(torch.einsum("oc,bchw->bohw", wv, x))
    want = torch.empty_like(x)
    for b in range(2):
        keys, values = k[b].flatten(1), v[b].flatten(1)  # (C/8, M), (C/2, M)
        for i in range(h):
            for j in range(w):
                beta = torch.softmax(q[b, :, i, j] @ keys, 0)
                want[b, :, i, j] = x[b, :, i, j] + 0.7 * wo @ (values @ beta)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def _without_attention(net, plain):
    """`plain` (the network --no-attention builds) loaded with `net`'s weights, attention blocks left out."""
    prefixes = tuple(name + "." for name, m in net.named_modules() if isinstance(m, sagan.SelfAttention))
    kept = [v for k, v in net.state_dict().items() if not k.startswith(prefixes)]
    target = plain.state_dict()
    assert [t.shape for t in target.values()] == [v.shape for v in kept]  # the same network otherwise
    plain.load_state_dict(dict(zip(target, kept)))
    return plain


def test_gamma_starts_at_zero_so_the_networks_start_as_without_attention():
    """Every block's gamma is a trainable parameter equal to 0, so a fresh G and D compute exactly what the networks of
    --no-attention compute with the same weights; and gamma gets a gradient (it can grow). Catches gamma initialised
    to anything but 0, gamma as a buffer or detached (never learns), and --no-attention changing anything but the
    blocks."""
    torch.manual_seed(0)
    args = net_args(conditional=True, attn_res=[8, 16])
    G, D = sagan.build_generator(args, 1, 10), sagan.build_discriminator(args, 1, 10)
    plain_args = net_args(conditional=True, attn_res=[])
    G0 = _without_attention(G, sagan.build_generator(plain_args, 1, 10))
    D0 = _without_attention(D, sagan.build_discriminator(plain_args, 1, 10))
    blocks = sagan.attention_layers(G) + sagan.attention_layers(D)
    assert len(blocks) == 4 and all(b.gamma.item() == 0 and b.gamma.requires_grad for b in blocks)
    assert all(any(b.gamma is p for p in net.parameters()) for net, bs in ((G, blocks[:2]), (D, blocks[2:])) for b in bs)
    for net in (G, D, G0, D0):
        net.eval()  # no power iteration between the calls
    z, y = torch.randn(4, 16), torch.tensor([0, 3, 5, 9])
    x = G(z, y)
    assert torch.equal(x, G0(z, y)) and torch.equal(D(x, y), D0(x, y))
    G.train(), D.train()
    D(G(z, y), y).mean().backward()
    assert all(b.gamma.grad is not None and b.gamma.grad.abs() > 0 for b in blocks)


def test_default_attention_size_per_image_size():
    """Default: the largest feature-map size both networks have, up to 32 (the paper's 32 at 128 px, CIFAR-10's 16 at
    32 px). Catches a default hard-wired to one size (it must exist at every size) or one that picks a size only G
    has (32 at 32 px)."""
    want = {16: [8], 28: [14], 32: [16], 48: [24], 64: [32], 96: [24], 128: [32], 256: [32]}
    assert {s: sagan.attention_sizes(s) for s in want} == want
    assert sagan.attention_sizes(32, [16], off=True) == []


CASES = [(28, None), (28, [7, 14]), (32, None), (32, [8]), (32, [8, 16]), (48, None), (48, [6, 12]),
         (64, None), (64, [4, 16]), (128, None), (128, [32, 64])]


@pytest.mark.parametrize("size, asked", CASES)
def test_attention_sits_at_the_asked_sizes(size, asked):
    """G makes, and D takes, images of every supported size (28 px MNIST-like data included), with one attention block
    in G and one in D on a feature map of each asked size (two at once too), on that map's channels. Catches a block
    skipped or placed after the wrong layer, a size reached twice in D getting two blocks (32 px: three 8x8 blocks),
    and odd maps (7x7) that fail."""
    res = sagan.attention_sizes(size, asked)
    args = net_args(image_size=size, width=1 if size == 128 else 2, conditional=True, attn_res=res)
    G, D = sagan.build_generator(args, 3, 10), sagan.build_discriminator(args, 3, 10)
    seen = {"G": [], "D": []}
    for name, net in (("G", G), ("D", D)):
        for m in sagan.attention_layers(net):
            m.register_forward_hook(lambda m, i, o, name=name: seen[name].append((i[0].shape[-1], i[0].shape[1] ==
                                                                                  m.query.in_channels, o.shape == i[0].shape)))
    y = torch.tensor([1, 2])
    x = G(torch.randn(2, 16), y)
    assert x.shape == (2, 3, size, size)
    assert D(x, y).shape == (2,)
    assert sorted(seen["G"]) == sorted(seen["D"]) == [(r, True, True) for r in res], seen


def test_d_attention_follows_the_first_block_of_its_size():
    """At 32 px D has three blocks at 8x8: attention at 8 goes after the first (the down-block), as the authors'
    blocks go after the block that reaches the size. Catches a block placed at the end of the stack."""
    D = sagan.build_discriminator(net_args(attn_res=[8]), 1, 10)
    assert [type(m).__name__ for m in D.blocks] == ["DBlock", "DBlock", "SelfAttention", "DBlock", "DBlock"]


@pytest.mark.parametrize("argv, said", [
    (["--image-size", "32", "--attn-res", "32"], "32 px.*both have one: 8, 16"),
    (["--attn-res", "16", "14"], "--attn-res 16:.*28 px.*both have one: 7, 14"),
    (["--no-attention", "--attn-res", "16"], "--attn-res is not used with --no-attention"),
])
def test_attention_sizes_the_networks_lack_are_a_one_line_usage_error(argv, said, tmp_path, capsys):
    """An --attn-res that G or D never reaches (32 at 32 px: G has it, D does not) exits 2 with one line naming the
    sizes both networks have, before any data is loaded and without leaving a run folder; --attn-res with
    --no-attention is refused. Catches a size silently ignored (a run without the attention asked for)."""
    import re
    code, err = run_script(sagan, ["--dataset", "fake", "--data-root", tmp_path / "data", "--out", tmp_path / "run",
                                   *argv], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("sagan.py: error: "), err
    assert re.search(said, err), err
    assert not (tmp_path / "run").exists()


def test_spectral_norm_keeps_every_g_and_d_layer_at_sigma_one():
    """Every conv and linear weight of G and D (the attention's four 1x1 convs, G's first linear and last conv, the
    shortcuts) and D's class embedding is normalised; G's conditional BatchNorm embeddings are not (the authors'
    code). After weights are pushed off (a rank-one spike), train-mode forwards iterate sigma back to 1, checked by
    SVD of each weight reshaped to (out, in*k*k). Catches a layer left out (SN in D only, as sngan.py) or a block
    whose convs escape the normalisation."""
    torch.manual_seed(0)
    args = net_args(conditional=True, attn_res=[8, 16])
    G, D = sagan.build_generator(args, 3, 10), sagan.build_discriminator(args, 3, 10)
    g_layers = [m for m in G.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    d_layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    assert len([m for b in sagan.attention_layers(G) for m in b.modules() if m in g_layers]) == 8
    layers = g_layers + d_layers
    assert all(nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in G.modules() if isinstance(m, nn.Embedding))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in layers:
            w = m.parametrizations.weight.original
            a, b = torch.randn(w.shape[0], 1, generator=g), torch.randn(1, w[0].numel(), generator=g)
            w += 3 * w.flatten(1).norm() / (a.norm() * b.norm()) * (a @ b).view_as(w)

    def sigmas():
        G.eval(), D.eval()  # reading .weight in eval mode runs no power iteration
        out = [torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2).item() for m in layers]
        G.train(), D.train()
        return out
    assert max(abs(s - 1) for s in sigmas()) > 0.1
    z, y = torch.randn(8, 16), torch.arange(8)
    with torch.no_grad():
        for _ in range(10):
            D(G(z, y), y)
    assert all(abs(s - 1) < 0.02 for s in sigmas()), sigmas()


def test_hinge_losses_equal_their_formula():
    """D: mean(relu(1 - real)) + mean(relu(1 + fake)); G: -mean(fake). Catches a swapped sign or argument, a missing
    margin, and G's loss written as the hinge on fakes (relu(1 - fake))."""
    real, fake = torch.tensor([2.0, -0.5]), torch.tensor([0.5, -3.0])
    assert sagan.d_loss(real, fake).item() == pytest.approx((0 + 1.5) / 2 + (1.5 + 0) / 2)
    assert sagan.g_loss(fake).item() == pytest.approx(1.25)
    assert sagan.d_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0])).item() == 0  # beyond the margins


def test_attention_logits_and_d_head_stay_float32_under_bf16_autocast():
    """Under bf16 autocast the block's logits (q . k) and softmax are float32 from the bf16 q and k, and D's head is
    float32 (conditional or not). Here the logits are tens, where bf16 rounds them by up to 0.25, which moves the
    weights by far more than the tolerance (checked). Catches a removed autocast(enabled=False) around the logits,
    or a .float() only after them."""
    m = attention_block(32)
    x = torch.randn(2, 32, 8, 8)
    m.keep = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        q = m.query(x).flatten(2)
        k = F.max_pool2d(m.key(x), 2, ceil_mode=True).flatten(2)
    assert q.dtype == torch.bfloat16 and y.dtype == torch.float32
    beta = m.weights[0]
    want = torch.softmax(q.float().transpose(1, 2) @ k.float(), -1)
    assert beta.dtype == torch.float32 and torch.allclose(beta, want, atol=1e-5)
    in_bf16 = torch.softmax((q.transpose(1, 2) @ k).float(), -1)  # logits rounded to bf16
    assert (in_bf16 - want).abs().max() > 1e-2
    for y in (torch.tensor([0, 1]), None):
        D = sagan.build_discriminator(net_args(conditional=y is not None), 1, 10)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert D(torch.randn(2, 1, 32, 32), y).dtype == torch.float32


@pytest.mark.figures
def test_attention_figure_reads_every_block_and_changes_nothing(tmp_path):
    """attention_maps returns the weights of every block of G then D for G's images, leaves both networks in their
    modes with no block keeping weights, and changes no state (eval mode: no BatchNorm statistics or SN vectors
    updated, no random draw); the figure is written. Catches the figure's forward in train mode (it would shift
    training) and weights kept afterwards (memory during training)."""
    torch.manual_seed(0)
    args = net_args(conditional=True, attn_res=[8, 16])
    G, D = sagan.build_generator(args, 1, 10), sagan.build_discriminator(args, 1, 10)
    G(torch.randn(8, 16), torch.arange(8))  # running statistics away from (0, 1)
    before = [{k: v.clone() for k, v in net.state_dict().items()} for net in (G, D)]
    z = torch.randn(3, 16)
    rng = torch.get_rng_state()
    images, maps = sagan.attention_maps(G, D, z, torch.tensor([0, 1, 2]))
    assert torch.equal(rng, torch.get_rng_state())  # no random draw inside
    assert [(name, hw) for name, _, hw, _ in maps] == [("G0", (8, 8)), ("G1", (16, 16)), ("D0", (16, 16)), ("D1", (8, 8))]
    assert all(torch.allclose(w.sum(-1), torch.ones(3, hw[0] * hw[1]), atol=1e-5) for _, w, hw, _ in maps)
    for net, saved in zip((G, D), before):
        assert net.training and all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    assert all(not m.keep and m.weights is None for m in sagan.attention_layers(G) + sagan.attention_layers(D))
    sagan.save_attention_figure(tmp_path / "a.png", images, maps, "test")
    assert (tmp_path / "a.png").stat().st_size > 1000


RUNS = [  # (attention, conditional, size, extra)
    (True, False, 28, []),
    (False, False, 28, []),
    (True, True, 32, ["--attn-res", "8", "16", "--ema", "0.9"]),
    (False, True, 32, []),
]


@pytest.mark.figures
@pytest.mark.parametrize("attention, conditional, size, extra", RUNS)
def test_sagan_trains(attention, conditional, size, extra, tmp_path, data_root):
    """4 steps: D and G stepped once per step (Adam's counts cover every parameter, gamma and the attention's convs
    included: a parameter outside the graph has no Adam state), every weight moved, gamma moved off 0 and logged
    for every block, losses finite, the resolved --attn-res recorded, and the files written: attention.png only with
    attention. Catches gamma or a block left out of the optimiser, an attention run without attention (and the
    reverse), and a run that writes no figure."""
    out = tmp_path / "run"
    argv = FAST + ["--image-size", size, "--max-steps", "4", "--out", out, "--data-root", data_root] + \
        (["--conditional"] if conditional else []) + ([] if attention else ["--no-attention"]) + extra
    assert run_script(sagan, argv)[0] == 0
    state = common.load_checkpoint(out / "checkpoint.pt", "sagan")
    args = argparse.Namespace(**state["args"])
    res = [8, 16] if "--attn-res" in extra else ([size // 2] if attention else [])
    assert args.attn_res == res
    assert state["step"] == 4 and state["position"] == 4
    torch.manual_seed(args.seed)
    G0, D0 = sagan.build_generator(args, 1, 10), sagan.build_discriminator(args, 1, 10)
    for name, net in (("G", G0), ("D", D0)):
        opt = state[f"opt_{name.lower()}"]
        assert len(opt["state"]) == len(list(net.parameters())) and all(s["step"] == 4 for s in opt["state"].values())
        moved = [not torch.equal(p, state[name][k]) for k, p in net.state_dict().items()
                 if k.endswith(("original", "gamma", "bias"))]
        assert moved and all(moved), name
        assert len(sagan.attention_layers(net)) == len(res)
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss_d" in r]
    assert len(rows) == 4 and all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in rows)
    keys = [f"gamma_{n}{i}" for n in "gd" for i in range(len(res))]
    assert sorted(k for k in rows[-1] if k.startswith("gamma")) == sorted(keys)
    assert all(rows[-1][k] != 0 for k in keys)
    for f in ("args.json", "losses.png", "interpolation.png", "progress.gif", "samples/step_0000004.png"):
        assert (out / f).exists(), f
    assert (out / "attention.png").exists() == attention
    assert state["data"]["conditional"] == conditional and ("G_ema" in state) == ("--ema" in extra)


def test_sagan_resume_is_exact(tmp_path, data_root, monkeypatch):
    """A 4-step run stopped after 2 (as by Ctrl-C, between its checkpoints at steps 0, 3, 4) and resumed ends where an
    uninterrupted one does: G, D (gamma and SN vectors included), both optimisers, the EMA, data position, RNG.
    Catches state missing from the checkpoint, an attention figure drawn with the training streams (it would shift
    the resumed run's draws), and an EMA whose SN vectors depend on how often it was used (saved, drawn)."""
    args = FAST + ["--conditional", "--ema", "0.9", "--image-size", "32", "--data-root", data_root, "--max-steps", "4",
                   "--sample-every", "3"]
    assert run_script(sagan, args + ["--out", tmp_path / "full"])[0] == 0
    should_stop = common.Run.should_stop
    with monkeypatch.context() as m:  # (monkeypatch.undo() would undo conftest's figure no-op too)
        m.setattr(common.Run, "should_stop", lambda self, step: step >= 2 or should_stop(self, step))
        assert run_script(sagan, args + ["--out", tmp_path / "part"])[0] == 0
    assert common.load_checkpoint(tmp_path / "part" / "checkpoint.pt", "sagan")["step"] == 2
    assert run_script(sagan, ["--resume", tmp_path / "part" / "checkpoint.pt"])[0] == 0
    full, part = (common.load_checkpoint(tmp_path / r / "checkpoint.pt", "sagan") for r in ("full", "part"))
    assert_same_training_state(full, part)
    assert all(torch.equal(v, part["G_ema"][k]) for k, v in full["G_ema"].items())
    assert full["args"]["attn_res"] == part["args"]["attn_res"] == [16]


def test_sagan_generate_writes_balanced_labels_from_the_ema(tmp_path, data_root):
    """--generate on a conditional run with --ema: balanced labels, no dataset needed, and the images are the EMA's,
    not G's. Catches a G rebuilt without its attention blocks (its state would not load) or from the raw weights."""
    out = tmp_path / "run"
    assert run_script(sagan, FAST + ["--conditional", "--ema", "0.5", "--max-steps", "3", "--out", out,
                                     "--data-root", data_root])[0] == 0
    assert run_script(sagan, ["--generate", "20", "--checkpoint", out / "checkpoint.pt", "--out", tmp_path / "gen",
                              "--data-root", tmp_path / "empty"])[0] == 0
    arrays = np.load(tmp_path / "gen" / "generated.npz")
    assert arrays["images"].shape == (20, 1, 28, 28) and list(arrays["labels"]) == [i % 10 for i in range(20)]
    state = common.load_checkpoint(out / "checkpoint.pt", "sagan")
    args = argparse.Namespace(**state["args"])
    G = sagan.build_generator(args, 1, 10)
    G.load_state_dict(state["G"])
    z = torch.randn(20, args.latent_dim, generator=torch.Generator().manual_seed(0))
    y = torch.arange(20) % 10
    assert not np.array_equal(common.to_uint8(sagan.sample_images(G, z, y)).numpy(), arrays["images"])
    ema = common.EMA(copy.deepcopy(G), args.ema, args.latent_dim, 10)
    ema.load_state_dict(state["G_ema"])
    assert np.array_equal(common.to_uint8(sagan.sample_images(ema.ready(), z, y)).numpy(), arrays["images"])
