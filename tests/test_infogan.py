"""infogan.py: the information loss against its formula, the code -> class assignment against brute force, the latent
map against its prior, the traversal figures against what they promise, the MI gradient's path into G, Q and the shared
body, and real runs on the fake data (sizes, options, resume, generate)."""
import argparse
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import infogan
from conftest import assert_same_training_state, run_script

FAST = ["--dataset", "fake", "--batch-size", "16", "--width", "4", "--eval-samples", "100", "--log-every", "1",
        "--sample-every", "2", "--eval-every", "0"]


def net_args(**kw):
    base = dict(latent_dim=6, n_cat=10, n_cont=2, image_size=28, width=4, q_fixed_std=False, z_dist="uniform")
    return argparse.Namespace(**{**base, **kw})


def initial_networks(args):
    """G and D as a run with these args starts (Run seeds torch, then the script builds G, then D)."""
    torch.manual_seed(args.seed)
    return infogan.build_generator(args, 1), infogan.build_discriminator(args, 1)


# ----------------------------------------------------------------------------------------------
# The information loss
# ----------------------------------------------------------------------------------------------

def test_information_loss_equals_its_formula():
    """Cross-entropy of c1 = -log softmax(logits)[c1]; Gaussian NLL = 0.5 log(2 pi) + log sigma + (c - mu)^2 / (2
    sigma^2), summed over the codes; both batch means; sigma = 1 without log-stds (--q-fixed-std). Catches a softmax
    before the cross-entropy (the most-copied port's bug: 0.56 here instead of 0.01), a missing log sigma or 1/2,
    sigma^2 where sigma belongs, a mean over the codes instead of the sum."""
    logits = torch.tensor([[6.0, 0.0, -2.0], [0.0, 0.5, 5.0]])
    c1 = torch.tensor([0, 2])
    mu = torch.tensor([[0.5, -0.2], [0.0, 0.9]])
    log_std = torch.tensor([[0.0, math.log(0.5)], [math.log(2.0), 0.3]])
    c = torch.tensor([[0.1, 0.3], [-1.0, 0.9]])

    def ce(row, k):
        return -(row[k] - math.log(sum(math.exp(v) for v in row)))

    def nll(ci, m, ls):
        return 0.5 * math.log(2 * math.pi) + ls + (ci - m) ** 2 / (2 * math.exp(ls) ** 2)

    expected_ce = (ce([6.0, 0.0, -2.0], 0) + ce([0.0, 0.5, 5.0], 2)) / 2
    rows = [[nll(c[i, j].item(), mu[i, j].item(), log_std[i, j].item()) for j in range(2)] for i in range(2)]
    cat, cont = infogan.info_loss((logits, mu, log_std), c1, c)
    assert cat.item() == pytest.approx(expected_ce, rel=1e-5)
    assert cont.item() == pytest.approx(sum(sum(r) for r in rows) / 2, rel=1e-6)
    _, cont_fixed = infogan.info_loss((logits, mu, None), c1, c)
    assert cont_fixed.item() == pytest.approx(sum(nll(c[i, j].item(), mu[i, j].item(), 0.0)
                                                  for i in range(2) for j in range(2)) / 2, rel=1e-6)
    softmax_bug = F.cross_entropy(F.softmax(logits, 1), c1).item()
    assert abs(softmax_bug - expected_ce) > 0.5  # the case separates the two
    # With no continuous codes the NLL is 0 (an empty sum), not NaN
    _, none = infogan.info_loss((logits, torch.zeros(2, 0), torch.zeros(2, 0)), c1, torch.zeros(2, 0))
    assert none.item() == 0.0


def test_q_outputs_are_float32_under_autocast():
    """Q's logits, means and log-stds reach the losses in float32 under bf16 autocast (as D's logit is cast by the
    loop). Catches a removed `.float()` in Discriminator.q: a bf16 cross-entropy rounds the loss to ~3 digits."""
    D = infogan.build_discriminator(net_args(), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logit, (logits, mu, log_std) = D(torch.randn(4, 1, 28, 28), with_q=True)
    assert logit.shape == (4,) and logits.shape == (4, 10) and mu.shape == (4, 2) and log_std.shape == (4, 2)
    assert logits.dtype == mu.dtype == log_std.dtype == torch.float32
    _, (_, mu, log_std) = infogan.build_discriminator(net_args(q_fixed_std=True), 1)(torch.randn(4, 1, 28, 28), True)
    assert log_std is None and mu.shape == (4, 2)


# ----------------------------------------------------------------------------------------------
# Measuring the codes
# ----------------------------------------------------------------------------------------------

def brute_force(weights):
    rows, cols = len(weights), len(weights[0])
    if rows <= cols:
        return max(sum(weights[i][j] for i, j in enumerate(p)) for p in itertools.permutations(range(cols), rows))
    return max(sum(weights[i][j] for j, i in enumerate(p)) for p in itertools.permutations(range(rows), cols))


def test_best_assignment_finds_the_permutation_and_the_optimum():
    """A 10x10 confusion matrix whose codes are a permutation of the classes (with off-diagonal noise) gives back that
    permutation; random square and rectangular matrices reach the brute-force optimum, one-to-one. Catches a greedy
    map (row by row, or each code to its majority class: not one-to-one, [[5, 4], [4, 0]] scores 5 instead of 8), an
    assignment that loses rows when the matrix is not square, or a minimisation."""
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(10, generator=g)
    confusion = torch.randint(0, 30, (10, 10), generator=g)
    confusion[torch.arange(10), perm] += 100
    assign, total = infogan.best_assignment(confusion.tolist())
    assert assign == perm.tolist() and total == confusion[torch.arange(10), perm].sum().item()
    assert infogan.best_assignment([[5, 4], [4, 0]]) == ([1, 0], 8)
    for shape in ((6, 6), (4, 6), (6, 4), (1, 3), (3, 1)):
        for _ in range(5):
            w = torch.randint(0, 50, shape, generator=g).tolist()
            assign, total = infogan.best_assignment(w)
            used = [j for j in assign if j >= 0]
            assert len(used) == min(shape) and len(set(used)) == len(used)  # one-to-one, as many pairs as possible
            assert total == brute_force(w) == sum(w[i][j] for i, j in enumerate(assign) if j >= 0), (shape, w)


class CodeStub(nn.Module):
    """A 'D' whose Q reads the class off the image (pixel value 20 * class) and answers code perm[class]."""

    def __init__(self, perm):
        super().__init__()
        self.perm, self.w = perm, nn.Parameter(torch.zeros(1))
        self.modes = []

    def categorical(self, x):
        self.modes.append(self.training)
        label = ((x[:, 0, 0, 0] + 1) * 127.5 / 20).round().long()
        return F.one_hot(self.perm[label], 10).float()


def test_categorical_accuracy_scores_codes_through_the_best_map():
    """Q answers a permutation of the true class for 90 of 100 images and a wrong code for 10: accuracy 0.90 under the
    map back (the inverse permutation), with Q in eval mode while it classifies and D back in train mode after.
    Catches scoring codes against labels without the map (~0.1 here), a map that is not one-to-one, and a D left in
    eval mode (or classified in train mode: batch statistics)."""
    perm = torch.tensor([3, 7, 0, 9, 1, 4, 8, 2, 6, 5])
    labels = torch.arange(100) % 10
    images = (labels * 20).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).clone()
    flipped = labels.clone()
    flipped[:10] = (labels[:10] + 1) % 10  # Q is wrong on these: it sees the next class's code
    images[:10] = (flipped[:10] * 20).to(torch.uint8).view(-1, 1, 1, 1)
    D = CodeStub(perm)
    acc, assign, confusion = infogan.categorical_accuracy(D, images, labels, 10, 10, chunk=30)
    assert acc == pytest.approx(0.9) and [perm.tolist().index(k) for k in range(10)] == assign
    assert confusion.sum() == 100 and D.modes and not any(D.modes) and D.training
    assert (perm[labels] == labels).double().mean() < 0.2  # unmapped, the same answers would score near chance


# ----------------------------------------------------------------------------------------------
# The latent and the traversals
# ----------------------------------------------------------------------------------------------

def test_latent_from_noise_draws_the_prior():
    """From standard normal noise: z ~ Uniform(-1, 1) (mean 0, variance 1/3) or the noise itself (--z-dist normal),
    c1 uniform over its values from its own column, continuous codes ~ Uniform(-1, 1); an asked c1 is used as given.
    Catches z left Gaussian under --z-dist uniform (variance 1), c1 read from a z column, codes in [0, 1]."""
    noise = torch.randn(200_000, 6 + 1 + 2, generator=torch.Generator().manual_seed(0))
    z, c1, cc = infogan.latent_from_noise(noise, 6, 7, "uniform")
    assert z.shape == (200_000, 6) and cc.shape == (200_000, 2) and c1.dtype == torch.int64
    for x in (z, cc):
        assert x.min() >= -1 and x.max() <= 1
        assert x.mean().abs() < 0.01 and abs(x.var().item() - 1 / 3) < 0.01
    counts = torch.bincount(c1, minlength=7).double() / len(c1)
    assert (counts - 1 / 7).abs().max() < 0.005
    assert torch.equal(c1, (torch.special.ndtr(noise[:, 6]) * 7).long())  # column 6, nothing else
    zn, c1n, _ = infogan.latent_from_noise(noise, 6, 7, "normal")
    assert torch.equal(zn, noise[:, :6]) and torch.equal(c1n, c1)
    asked = torch.arange(200_000) % 7
    _, c1a, cca = infogan.latent_from_noise(noise, 6, 7, "uniform", asked)
    assert torch.equal(c1a, asked) and torch.equal(cca, cc)


class RecordingG(nn.Module):
    """A 'G' that records its inputs and draws nothing."""

    def __init__(self):
        super().__init__()
        self.w, self.calls = nn.Parameter(torch.zeros(1)), []

    def forward(self, z, c1, c_cont):
        self.calls.append((z, c1, c_cont))
        return torch.zeros(len(z), 1, 8, 8)


@pytest.mark.parametrize("n_cat, n_cont", [(10, 2), (4, 3)])
def test_traversals_vary_only_the_intended_code(n_cat, n_cont, tmp_path):
    """Figure 2's grids as written: traverse_c1 puts c1 = 0..K-1 across the columns and keeps z and the continuous
    codes along each row (rows differ); traverse_c<k> moves only c_k from -r to r across the columns, with c1 = row
    index, one z per row and the other continuous codes 0. Files and the c1 frame for the GIF are written. Catches a
    traversal that redraws z per image, moves the wrong code, or leaves the other codes random."""
    args = net_args(n_cat=n_cat, n_cont=n_cont, traverse_range=2.0)
    (tmp_path / "samples" / "c1").mkdir(parents=True)
    G = RecordingG()
    noise = torch.randn(max(infogan.TRAVERSE_ROWS, n_cat), 6 + 1 + n_cont, generator=torch.Generator().manual_seed(0))
    infogan.write_traversals(G, noise, args, tmp_path, 12)
    assert len(G.calls) == 1 + n_cont and G.training
    for code, (z, c1, cc) in enumerate(G.calls, start=1):
        cols = n_cat if code == 1 else infogan.TRAVERSE_STEPS
        rows = infogan.TRAVERSE_ROWS if code == 1 else n_cat
        z, c1, cc = z.view(rows, cols, -1), c1.view(rows, cols), cc.view(rows, cols, -1)
        assert torch.equal(z, z[:, :1].expand_as(z)) and len({tuple(r[0].tolist()) for r in z}) == rows
        if code == 1:
            assert (c1 == torch.arange(n_cat)).all()
            assert torch.equal(cc, cc[:, :1].expand_as(cc)) and cc.abs().max() <= 1 and cc.abs().sum() > 0
        else:
            assert (c1 == torch.arange(n_cat)[:, None]).all()
            others = [k for k in range(n_cont) if k != code - 2]
            assert (cc[:, :, others] == 0).all()
            assert torch.allclose(cc[:, :, code - 2], torch.linspace(-2, 2, cols).expand(rows, cols))
        assert (tmp_path / f"traverse_c{code}.png").exists()
    assert (tmp_path / "samples" / "c1" / "step_0000012.png").exists()


def test_sampling_uses_eval_mode_and_restores_train_mode():
    """sample_images draws with BatchNorm's running statistics (a sample does not depend on its batch), leaves them
    alone, records no graph, and leaves G in train mode. Catches sampling in train mode and a G left in eval mode."""
    torch.manual_seed(0)
    G = infogan.build_generator(net_args(), 1)
    z, c1, cc = infogan.latent_from_noise(torch.randn(6, 9), 6, 10, "uniform")
    G(*infogan.latent_from_noise(torch.randn(8, 9), 6, 10, "uniform"))  # running statistics away from (0, 1)
    with torch.no_grad():
        assert not torch.allclose(G(z, c1, cc)[:2], G(z[:2], c1[:2], cc[:2]), atol=1e-4)  # train mode: it would
    buffers = {k: v.clone() for k, v in G.named_buffers()}
    batch, one = infogan.sample_images(G, z, c1, cc), infogan.sample_images(G, z[:1], c1[:1], cc[:1])
    assert torch.allclose(batch[:1], one, atol=1e-5) and not batch.requires_grad
    assert all(torch.equal(v, buffers[k]) for k, v in G.named_buffers())
    assert G.training and all(m.training for m in G.modules())


def test_paper_shapes_and_every_size():
    """At w = 64 and 28 px the paper's Table 1: D convs 64 (14x14) and 128 (7x7), FC 1024, Q FC 128; G FC 1024, FC
    128*7*7, deconv 64 (14x14), deconv 1 (28x28). G makes and D takes 16, 28, 32 and 64 px; Q's head is n_cat +
    2 n_cont wide (n_cat + n_cont with fixed std)."""
    G, D = infogan.Generator(62, 10, 2, 1, 28), infogan.Discriminator(1, 28, 10, 2)
    assert [m.out_features for m in G.fc if isinstance(m, nn.Linear)] == [1024, 128 * 7 * 7]
    assert G.fc[0].in_features == 74  # 62 + 10 + 2, the paper's "concatenated dimension of 74"
    assert [m.out_channels for m in G.net if isinstance(m, nn.ConvTranspose2d)] == [64, 1]
    assert [m.out_channels for m in D.body if isinstance(m, nn.Conv2d)] == [64, 128]
    assert D.body[-3].in_features == 128 * 7 * 7 and D.body[-3].out_features == 1024
    assert D.q_head[0].out_features == 128 and D.q_head[-1].out_features == 14 and D.d_head.out_features == 1
    assert isinstance(D.body[1], nn.LeakyReLU) and D.body[1].negative_slope == 0.1
    assert all(m.eps == 1e-5 for m in [*G.modules(), *D.modules()] if isinstance(m, nn.modules.batchnorm._BatchNorm))
    for size in (16, 28, 32, 64):
        args = net_args(image_size=size, n_cont=3, q_fixed_std=True)
        G, D = infogan.build_generator(args, 3), infogan.build_discriminator(args, 3)
        x = G(*infogan.latent_from_noise(torch.randn(2, 10), 6, 10, "uniform"))
        assert x.shape == (2, 3, size, size)
        logit, (logits, mu, log_std) = D(x, with_q=True)
        assert logit.shape == (2,) and logits.shape == (2, 10) and mu.shape == (2, 3) and log_std is None


# ----------------------------------------------------------------------------------------------
# The MI gradient: into G, Q's head and the shared body
# ----------------------------------------------------------------------------------------------

def test_information_loss_alone_reaches_q_and_the_shared_body():
    """Backward of L_info alone on Q(G(z, c)): gradients in every weight of G, of Q's head and of the shared body
    (its first conv included), none in D's head. Catches a Q with a body of its own (or a detached h), and a G
    whose codes do not reach the output."""
    torch.manual_seed(0)
    args = net_args()
    G, D = infogan.build_generator(args, 1), infogan.build_discriminator(args, 1)
    z, c1, cc = infogan.latent_from_noise(torch.randn(8, 9), 6, 10, "uniform")
    _, q = D(G(z, c1, cc), with_q=True)
    cat, cont = infogan.info_loss(q, c1, cc)
    (cat + 0.1 * cont).backward()
    for part in (G, D.body, D.q_head):
        for name, p in part.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in D.d_head.parameters())


def test_the_training_loop_steps_g_q_and_the_body_on_the_information_term(tmp_path, data_root, monkeypatch):
    """With the adversarial losses replaced by zero, 3 steps of the real loop still move every weight of G, of the
    shared body and of Q's head (the information term alone did it) and leave D's head exactly where it was (zero
    gradients: Adam does not move it). Catches the popular port's wiring (Q's head stepped by G's optimiser only, so
    the shared body never learns from L_info), L_info missing from the D step or the G step, and a G step whose
    fake images are detached."""
    zero = lambda *logits: 0.0 * sum(t.sum() for t in logits)
    monkeypatch.setattr(infogan, "d_loss", zero)
    monkeypatch.setattr(infogan, "g_loss", zero)
    out = tmp_path / "run"
    assert run_script(infogan, FAST + ["--max-steps", "3", "--out", out, "--data-root", data_root])[0] == 0
    state = common.load_checkpoint(out / "checkpoint.pt", "infogan")
    G0, D0 = initial_networks(argparse.Namespace(**state["args"]))
    for net, net0, parts in (("G", G0, ("",)), ("D", D0, ("body.", "q_head."))):
        for name, p in net0.named_parameters():
            if name.startswith(parts):
                assert not torch.equal(p, state[net][name]), f"{net}.{name} did not move"
    for name, p in D0.d_head.named_parameters():
        assert torch.equal(p, state["D"][f"d_head.{name}"]), f"d_head.{name} moved without a gradient"


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------

RUNS = [  # (extra flags, image size, continuous codes, categorical values)
    ([], 28, 2, 10),
    (["--image-size", "64", "--q-fixed-std", "--z-dist", "normal", "--n-cont", "3", "--n-dis", "2"], 64, 3, 10),
    (["--image-size", "16", "--n-cont", "0", "--n-cat", "6"], 16, 0, 6),
]


@pytest.mark.figures
@pytest.mark.parametrize("extra, size, n_cont, n_cat", RUNS)
def test_infogan_trains_and_measures_its_codes(extra, size, n_cont, n_cat, tmp_path, data_root, capsys):
    """D (with Q and the body) stepped n_dis times per step and G once, every parameter of both (Adam's counts: Q's head
    is trained in the D step), weights moved, losses finite (the information terms logged), cat_acc measured on the
    test split through a one-to-one map (at least chance: the best of all maps), gen_cat_acc and the purity table
    (rows of shares summing to 1), the traversals of every code, their GIF, purity.png and the summary line."""
    out = tmp_path / "run"
    argv = FAST + extra + ["--max-steps", "4", "--out", out, "--data-root", data_root]
    assert run_script(infogan, argv)[0] == 0
    printed = capsys.readouterr().out
    state = common.load_checkpoint(out / "checkpoint.pt", "infogan")
    args = argparse.Namespace(**state["args"])
    n_dis = args.n_dis
    assert state["step"] == 4 and state["position"] == 4 * n_dis
    G0, D0 = initial_networks(args)
    assert len(state["opt_d"]["state"]) == len(list(D0.parameters()))
    assert len(state["opt_g"]["state"]) == len(list(G0.parameters()))
    assert all(s["step"] == 4 * n_dis for s in state["opt_d"]["state"].values())
    assert all(s["step"] == 4 for s in state["opt_g"]["state"].values())
    for net, net0 in (("G", G0), ("D", D0)):
        assert all(not torch.equal(p, state[net][k]) for k, p in net0.state_dict().items() if k.endswith("weight"))
    rows = common.read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss_d" in r]
    assert len(train_rows) == 4
    keys = ["loss_d", "loss_g", "loss_cat"] + (["loss_cont"] if n_cont else [])
    assert all(math.isfinite(r[k]) for r in train_rows for k in keys)
    assert ("loss_cont" in train_rows[0]) == bool(n_cont)
    code_rows = [r for r in rows if "cat_acc" in r]
    assert [r["step"] for r in code_rows] == [4]
    c = code_rows[0]
    assert 1 / 10 <= c["cat_acc"] <= 1 and c["cat_split"] == "test" and c["cat_n"] == 100
    assert sorted(j for j in c["cat_map"] if j >= 0) == sorted(set(j for j in c["cat_map"] if j >= 0))
    assert len(c["purity_table"]) == n_cat and all(abs(sum(r) - 1) < 1e-3 for r in c["purity_table"])
    assert 0 < c["gen_cat_acc"] <= 1 and 1 / n_cat <= c["purity"] <= 1
    for f in ["traverse_c1.png", "traverse_c1.gif", "purity.png", "losses.png", "progress.gif", "interpolation.png",
              "samples/c1/step_0000000.png", "samples/c1/step_0000004.png"] + \
             [f"traverse_c{k}.png" for k in range(2, 2 + n_cont)]:
        assert (out / f).exists(), f
    assert not (out / f"traverse_c{2 + n_cont}.png").exists()
    assert f"cat_acc={c['cat_acc']:.4f}" in printed and "done (--max-steps) at step 4" in printed.splitlines()[-1]


def test_infogan_resume_is_exact(tmp_path, data_root, monkeypatch):
    """A 4-step run stopped after 2 (as by --max-minutes or Ctrl-C: its final measurement of the codes and its
    traversal figures run at step 2) and resumed ends where an uninterrupted one does: G, D with Q, both optimisers, data
    position, RNG. Catches a measurement or traversal that draws from the training stream or changes BatchNorm's
    statistics (classifying in train mode), and a checkpoint missing a part of the state. The resumed run keeps only
    its own GIF frames up to its checkpoint."""
    args = FAST + ["--n-dis", "2", "--data-root", data_root, "--max-steps", "4", "--eval-every", "2"]
    assert run_script(infogan, args + ["--out", tmp_path / "full"])[0] == 0
    should_stop = common.Run.should_stop
    with monkeypatch.context() as m:  # (monkeypatch.undo() would undo conftest's figure no-op too)
        m.setattr(common.Run, "should_stop", lambda self, step: step >= 2 or should_stop(self, step))
        assert run_script(infogan, args + ["--out", tmp_path / "part"])[0] == 0
    assert common.load_checkpoint(tmp_path / "part" / "checkpoint.pt", "infogan")["step"] == 2
    (tmp_path / "part" / "samples" / "c1" / "step_0000006.png").write_bytes(b"a later run's frame")
    assert run_script(infogan, ["--resume", tmp_path / "part" / "checkpoint.pt"])[0] == 0
    full, part = (common.load_checkpoint(tmp_path / r / "checkpoint.pt", "infogan") for r in ("full", "part"))
    assert_same_training_state(full, part)
    frames = sorted(p.name for p in (tmp_path / "part" / "samples" / "c1").glob("step_*.png"))
    assert frames == ["step_0000000.png", "step_0000002.png", "step_0000004.png"]
    rows = {r: [(x["step"], x["cat_acc"]) for x in common.read_metrics(tmp_path / r / "metrics.jsonl") if "cat_acc" in x]
            for r in ("full", "part")}
    assert rows["full"] == rows["part"] and [s for s, _ in rows["full"]] == [2, 4]


def test_infogan_generate_writes_the_asked_c1_as_labels(tmp_path, data_root):
    """--generate with 7 categorical values (the data have 10 classes): labels 0..6 balanced, int64; every image is
    G(z, label, c_cont) with z and the continuous codes from the seeded noise; no dataset needed. Catches labels
    from the dataset's classes (0..9), a c1 taken from the noise instead of the asked one, and noise of the wrong
    width."""
    out = tmp_path / "run"
    assert run_script(infogan, FAST + ["--n-cat", "7", "--max-steps", "2", "--out", out, "--data-root", data_root])[0] == 0
    # After 2 steps G's output is ~0 everywhere (8-bit images would not show c1): amplify its last layer.
    state = common.load_checkpoint(out / "checkpoint.pt", "infogan")
    state["G"]["net.3.weight"] *= 300
    common.save_checkpoint(tmp_path / "loud.pt", state)
    assert run_script(infogan, ["--generate", "20", "--checkpoint", tmp_path / "loud.pt", "--out", tmp_path / "gen",
                                "--seed", "3", "--data-root", tmp_path / "empty"])[0] == 0
    arrays = np.load(tmp_path / "gen" / "generated.npz")
    assert arrays["images"].shape == (20, 1, 28, 28) and arrays["images"].dtype == np.uint8
    assert arrays["labels"].dtype == np.int64 and list(arrays["labels"]) == [i % 7 for i in range(20)]
    args = argparse.Namespace(**state["args"])
    G = infogan.build_generator(args, 1)
    G.load_state_dict(state["G"])
    noise = torch.randn(20, infogan.noise_dim(args), generator=torch.Generator().manual_seed(3))
    labels = torch.from_numpy(arrays["labels"])
    z, c1_noise, cc = infogan.latent_from_noise(noise, args.latent_dim, 7, args.z_dist)
    assert np.array_equal(common.to_uint8(infogan.sample_images(G, z, labels, cc)).numpy(), arrays["images"])
    assert not torch.equal(c1_noise, labels)
    assert not np.array_equal(common.to_uint8(infogan.sample_images(G, z, c1_noise, cc)).numpy(), arrays["images"])


def test_n_cat_below_two_and_unused_flags_are_refused(capsys):
    """--n-cat 1 (no category to find) and continuous-code flags with --n-cont 0 stop at parsing, naming the flag."""
    for argv, flag in ((["--n-cat", "1"], "--n-cat"), (["--n-cont", "0", "--q-fixed-std"], "--q-fixed-std"),
                       (["--n-cont", "0", "--cont-weight", "1"], "--cont-weight")):
        with pytest.raises(SystemExit) as e:
            infogan.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and flag in err and err.count("\n") == 1, err
