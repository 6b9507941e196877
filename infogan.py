"""InfoGAN: interpretable representations by information-maximising GANs (Chen et al. 2016, arXiv:1606.03657).

    python infogan.py --dataset mnist                                        # the paper's MNIST setting (App. C)
    python infogan.py --dataset fashion-mnist --width 32 --max-minutes 10    # a CPU setting (README)
    python infogan.py --dataset mnist --image-size 64 --traverse-range 10    # report 004's 64 px deconv variant
    python infogan.py --generate 1000 --checkpoint runs/<run>/checkpoint.pt  # labels = the asked categorical code c1

G takes [z, one-hot(c1), c2, c3, ...]: noise z (--latent-dim 62; Uniform(-1, 1) as in the authors' code, or
N(0, I) with --z-dist normal), one categorical code c1 with --n-cat values and --n-cont continuous codes, each
Uniform(-1, 1). D and the recognition network Q share a body; Q(c | x) gives c1's logits and a Gaussian (mean,
log-std; std 1 with --q-fixed-std) per continuous code. On fake images the information term
    L_info = CE(Q's c1 logits, c1) + cont_weight * Gaussian NLL(c_cont | Q)
is -L_I(G, Q) of the paper's Eq. 5 up to the constant H(c). It enters both players' losses with weight lambda
(--info-weight), as in the authors' code:
    D, Q and their shared body (one optimiser): softplus(-D(x)) + softplus(D(G(z, c))) + lambda L_info
    G:                                          softplus(-D(G(z, c))) + lambda L_info   (non-saturating)
Training never sees a label. The run measures what c1 found: Q's c1 of the real test images, mapped to the
classes by the best one-to-one assignment (Hungarian method), gives `cat_acc` (the paper: ~95% on MNIST, Sec.
7.2); the evaluation classifier's labels of images made with each value of c1 give its table, `purity` (the mean
largest share per value) and `gen_cat_acc` (c1's accuracy as the classifier's label, under its best one-to-one map).

Writes into --out: args.json, metrics.jsonl, samples/step_*.png (64 random latents), progress.gif, the paper's
Figure 2 at every sample step and at the end: traverse_c1.png (2a: c1 across the columns, one row per fixed z and
continuous codes) with its frames in samples/c1/ and traverse_c1.gif, traverse_c2.png, traverse_c3.png, ...
(as 2c, 2d, but one row per value of c1 where the paper's rows are random latents: one continuous code from -r to r,
--traverse-range, across the columns; the same z along a row, the other continuous codes 0); purity.png (per value
of c1, the classifier's labels of its images),
losses.png (adversarial losses, the information terms, D's accuracy, cat_acc and purity, FID), interpolation.png,
class_histogram.png and predictions.png (MNIST-like data), checkpoint.pt.
"""

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "infogan"
TRAVERSE_STEPS = 10  # columns of a continuous code's traversal (the paper's Figure 2 shows 10)
TRAVERSE_ROWS = 10  # rows (fixed z and continuous codes) of the c1 traversal


def parse_args(argv=None):
    p = common.ArgumentParser(prog=f"{SCRIPT}.py", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model and optimisation (defaults: Chen et al. 2016, App. C, and the authors' code)")
    m.add_argument("--width", type=common.positive_int, default=64,
                   help="w: channels of D's first conv and G's last deconv, doubling per stride-2 layer; D/Q's and G's "
                        "FC layers 16w, Q's FC 2w (w = 64 gives the paper's Table 1: 64, 128, 1024, 128)")
    m.add_argument("--latent-dim", type=common.positive_int, default=62, help="size of the noise z; 62 in the paper")
    m.add_argument("--z-dist", default="uniform", choices=("uniform", "normal"),
                   help="z's distribution: Uniform(-1, 1) as the authors' code (run_mnist_exp.py), or N(0, I) as "
                        "most ports")
    m.add_argument("--n-cat", type=common.positive_int, default=10,
                   help="values of the categorical code c1 (at least 2); 10 in the paper's MNIST setting")
    m.add_argument("--n-cont", type=common.nonneg_int, default=2,
                   help="continuous codes c2, c3, ... ~ Uniform(-1, 1); 2 in the paper's MNIST setting")
    m.add_argument("--q-fixed-std", action="store_true",
                   help="Q's Gaussians have std 1 (the authors' code) instead of a learned log-std per code")
    m.add_argument("--info-weight", type=common.nonneg_float, default=1.0,
                   help="lambda, the information term's weight in D's and G's losses; 1 in the paper (Sec. 5); "
                        "0 gives a plain GAN whose c1 means nothing (a baseline for cat_acc)")
    m.add_argument("--cont-weight", type=common.nonneg_float, default=0.1,
                   help="weight of the continuous codes' Gaussian NLL inside the information term; the paper uses "
                        "'a smaller lambda' for continuous codes (Sec. 5), 0.1 as report 004 and the common ports "
                        "(the authors' code: 1, with std fixed to 1)")
    m.add_argument("--traverse-range", type=common.positive_float, default=2.0,
                   help="the traversal figures take each continuous code from -r to r; 2 in the paper's Figure 2 "
                        "(report 004: 10)")
    m.add_argument("--batch-size", type=common.positive_int, default=128, help="128 in the paper (App. C)")
    m.add_argument("--epochs", type=common.positive_int, default=11,
                   help="passes over the data; 11 = about the authors' code's 50 x 100 updates of 128 on MNIST's 60k")
    m.add_argument("--lr-g", type=common.positive_float, default=1e-3, help="G's Adam learning rate; 1e-3 in the paper")
    m.add_argument("--lr-d", type=common.positive_float, default=2e-4,
                   help="Adam learning rate of D, Q and their shared body; 2e-4 in the paper")
    m.add_argument("--beta1", type=common.unit_float, default=0.5, help="Adam beta1; 0.5 in the paper")
    m.add_argument("--beta2", type=common.unit_float, default=0.999, help="Adam beta2; 0.999 (Adam's default) in the "
                                                                          "authors' code")
    m.add_argument("--n-dis", type=common.positive_int, default=1, help="D (and Q) steps per iteration; 1")
    m.add_argument("--n-gen", type=common.positive_int, default=1, help="G steps per iteration; 1")
    common.add_common_args(p, SCRIPT)
    args = p.parse_args(argv)
    if args.n_cat < 2:
        p.error(f"argument --n-cat: must be at least 2, got {args.n_cat}")
    common.refuse_unused(p, args, {"q_fixed_std": args.n_cont > 0, "cont_weight": args.n_cont > 0,
                                   "traverse_range": args.n_cont > 0}, "--n-cont 0")
    return args


# ----------------------------------------------------------------------------------------------
# The latent: Run's standard normal noise -> (z, c1, c_cont)
# ----------------------------------------------------------------------------------------------

def noise_dim(args):
    """Width of the noise Run draws (and --generate): z's columns, one column for c1, one per continuous code."""
    return args.latent_dim + 1 + args.n_cont


def latent_from_noise(noise, latent_dim, n_cat, z_dist, c1=None):
    """Standard normal noise (n, latent_dim + 1 + n_cont) -> the latent (z, c1, c_cont), distributed exactly as the
    prior: with u = Phi(noise) ~ Uniform(0, 1) (the probability integral transform), z = the noise itself (normal)
    or 2u - 1 ~ Uniform(-1, 1) (uniform); c1 = floor(n_cat u) of column latent_dim, uniform over 0..n_cat-1 (unless
    c1 is given: the asked value); c_cont = 2u - 1 ~ Uniform(-1, 1). A deterministic map, so that the one seeded
    normal stream (training, Run's grids and evaluation, --generate) reproduces every latent."""
    noise = noise.float()
    u = torch.special.ndtr(noise)
    z = noise[:, :latent_dim] if z_dist == "normal" else 2 * u[:, :latent_dim] - 1
    if c1 is None:  # Phi rounds to 1.0 in float32 beyond ~5.4 sigma: clamp that (probability ~3e-8) into the last value
        c1 = (u[:, latent_dim] * n_cat).long().clamp_(max=n_cat - 1)
    return z, c1, 2 * u[:, latent_dim + 1:] - 1


def traversal_latents(code, noise, latent_dim, n_cat, z_dist, span, steps=TRAVERSE_STEPS):
    """The latents (z, c1, c_cont) of one panel of the paper's Figure 2, row-major, and its number of columns.

    code 1 (Fig. 2a): c1 = 0, 1, ..., n_cat - 1 across the columns; row r keeps z and the continuous codes of
    noise row r. code k >= 2 (Fig. 2c, d: c_k): c_k from -span to span over `steps` columns; row r has c1 = r and
    the z of noise row r (n_cat rows), the other continuous codes 0."""
    if code == 1:
        z, _, c_cont = latent_from_noise(noise, latent_dim, n_cat, z_dist)
        rows = len(noise)
        c1 = torch.arange(n_cat, device=noise.device).repeat(rows)
        return z.repeat_interleave(n_cat, 0), c1, c_cont.repeat_interleave(n_cat, 0), n_cat
    z, _, c_cont = latent_from_noise(noise[:n_cat], latent_dim, n_cat, z_dist)
    values = torch.linspace(-span, span, steps, device=noise.device)
    c_cont = torch.zeros(n_cat * steps, c_cont.shape[1], device=noise.device)
    c_cont[:, code - 2] = values.repeat(n_cat)
    c1 = torch.arange(n_cat, device=noise.device).repeat_interleave(steps)
    return z.repeat_interleave(steps, 0), c1, c_cont, steps


# ----------------------------------------------------------------------------------------------
# Networks (the paper's Table 1 at 28 px and w = 64; other sizes s0 * 2^n add stride-2 stages)
# ----------------------------------------------------------------------------------------------

def init_weights(m):
    """N(0, 0.02) weights, BatchNorm scale N(1, 0.02), as the authors' code (custom_ops.py) and DCGAN."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """[z, one-hot(c1), c_cont] -> image. 28 px, w = 64 (the paper's Table 1): FC 1024, BN, ReLU -> FC 128*7*7, BN,
    ReLU -> (128, 7, 7) -> deconv 4x4/2 (64, 14, 14), BN, ReLU -> deconv 4x4/2 (C, 28, 28) -> tanh. 64 px:
    (512, 4, 4) -> (256, 8, 8) -> (128, 16, 16) -> (64, 32, 32) -> (C, 64, 64). The paper ends in a sigmoid for
    data in [0, 1]; this project's data are in [-1, 1], hence tanh."""

    def __init__(self, latent_dim, n_cat, n_cont, channels, image_size, width=64):
        super().__init__()
        self.n_cat = n_cat
        self.s0, n = common.conv_plan(image_size, "the InfoGAN networks")
        ch = width * 2 ** (n - 1)
        self.fc = nn.Sequential(
            nn.Linear(latent_dim + n_cat + n_cont, 16 * width, bias=False), nn.BatchNorm1d(16 * width), nn.ReLU(True),
            nn.Linear(16 * width, ch * self.s0 ** 2, bias=False), nn.BatchNorm1d(ch * self.s0 ** 2), nn.ReLU(True))
        layers = []
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),  # (ch/2, 2H, 2W)
                       nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1), nn.Tanh()]  # (C, size, size); no BN at the output
        self.net = nn.Sequential(*layers)

    def forward(self, z, c1, c_cont):
        h = torch.cat([z, F.one_hot(c1, self.n_cat).to(z.dtype), c_cont.to(z.dtype)], 1)
        return self.net(self.fc(h).view(z.shape[0], -1, self.s0, self.s0))


class Discriminator(nn.Module):
    """D and Q with one shared body (the paper's Table 1 at 28 px, w = 64):
    body: x -> conv 4x4/2 (64, 14, 14), LReLU(0.1) -> conv 4x4/2 (128, 7, 7), BN, LReLU -> FC 1024, BN, LReLU = h
    D head: FC h -> 1 logit.   Q head: FC 128, BN, LReLU -> FC to c1's n_cat logits, the continuous codes' means
    and (unless fixed_std) their log-stds. 64 px: (64, 32) -> (128, 16) -> (256, 8) -> (512, 4) -> FC 1024."""

    def __init__(self, channels, image_size, n_cat, n_cont, width=64, fixed_std=False):
        super().__init__()
        self.n_cat, self.n_cont, self.fixed_std = n_cat, n_cont, fixed_std
        s0, n = common.conv_plan(image_size, "the InfoGAN networks")
        ch = width
        layers = [nn.Conv2d(channels, ch, 4, 2, 1), nn.LeakyReLU(0.1, True)]  # (w, size/2, size/2); no BN on the input
        for _ in range(n - 1):
            layers += [nn.Conv2d(ch, 2 * ch, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * ch), nn.LeakyReLU(0.1, True)]
            ch *= 2  # (2ch, H/2, W/2)
        self.body = nn.Sequential(*layers, nn.Flatten(),
                                  nn.Linear(ch * s0 * s0, 16 * width, bias=False), nn.BatchNorm1d(16 * width),
                                  nn.LeakyReLU(0.1, True))
        self.d_head = nn.Linear(16 * width, 1)
        self.q_head = nn.Sequential(nn.Linear(16 * width, 2 * width, bias=False), nn.BatchNorm1d(2 * width),
                                    nn.LeakyReLU(0.1, True),
                                    nn.Linear(2 * width, n_cat + n_cont * (1 if fixed_std else 2)))

    def forward(self, x, with_q=False):
        """D's logit (B,); with_q: also Q's (c1 logits, means, log-stds or None), in float32 for the losses.
        Q's head runs only where it is used (fake images): its BatchNorm statistics are those of G's images."""
        h = self.body(x)
        logit = self.d_head(h).view(-1)
        return (logit, self.q(h)) if with_q else logit

    def q(self, h):
        out = self.q_head(h).float()
        k, m = self.n_cat, self.n_cont
        return out[:, :k], out[:, k:k + m], (None if self.fixed_std else out[:, k + m:])

    def categorical(self, x):
        """Q's c1 logits for images x (the classifier that cat_acc scores)."""
        return self.q(self.body(x))[0]


def build_generator(args, channels):
    G = Generator(args.latent_dim, args.n_cat, args.n_cont, channels, args.image_size, args.width)
    return G.apply(init_weights)


def build_discriminator(args, channels):
    D = Discriminator(channels, args.image_size, args.n_cat, args.n_cont, args.width, args.q_fixed_std)
    return D.apply(init_weights)


# ----------------------------------------------------------------------------------------------
# Losses: adversarial from logits (log sigmoid(l) = -softplus(-l), exact and stable), information from Q's outputs
# ----------------------------------------------------------------------------------------------

def d_loss(real_logits, fake_logits):
    """D maximises log D(x) + log(1 - D(G(z, c)))  (Goodfellow et al. 2014, Eq. 1; InfoGAN's V(D, G), Eq. 6)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(fake_logits):
    """Non-saturating: G maximises log D(G(z, c))  (Goodfellow et al. 2014, Sec. 3; the authors' code)."""
    return F.softplus(-fake_logits).mean()


def info_loss(q, c1, c_cont):
    """(cross-entropy of c1 under Q's logits, Gaussian NLL of the continuous codes summed over codes), batch means.
    Their sum (with the continuous part weighted) is -L_I(G, Q) up to the constant H(c) (Chen et al. 2016, Eq. 4-5).
    Cross-entropy from the logits (log-softmax inside F.cross_entropy): a softmax before it, the most-copied port's
    bug, squashes the loss into [1.46, 2.46] for K = 10, and its gradient with it.
    NLL of c under N(mu, sigma^2): 0.5 log(2 pi) + log sigma + (c - mu)^2 / (2 sigma^2); sigma = 1 without log-stds."""
    logits, mu, log_std = q
    cat = F.cross_entropy(logits, c1)
    if log_std is None:
        log_std = torch.zeros_like(mu)
    nll = 0.5 * math.log(2 * math.pi) + log_std + 0.5 * ((c_cont - mu) * torch.exp(-log_std)) ** 2
    return cat, nll.sum(1).mean()


# ----------------------------------------------------------------------------------------------
# Measuring the codes: the best one-to-one map code -> class, categorical accuracy, purity
# ----------------------------------------------------------------------------------------------

def best_assignment(weights):
    """The one-to-one map rows -> columns of largest total weight, for a rectangular matrix (list of lists): the
    Hungarian method (Kuhn 1955) in its O(n^3) form with potentials, on cost = max - weight, padded to a square with
    cost max (weight 0). Returns (the column of each row, -1 for a row left over when rows > columns; total weight)."""
    rows, cols = len(weights), len(weights[0])
    n = max(rows, cols)
    top = max(max(r) for r in weights)
    cost = [[top - weights[i][j] if i < rows and j < cols else top for j in range(n)] for i in range(n)]
    inf = float("inf")
    u, v, match, way = [0.0] * (n + 1), [0.0] * (n + 1), [0] * (n + 1), [0] * (n + 1)  # match[j]: row of column j
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv, used = [inf] * (n + 1), [False] * (n + 1)
        while True:  # grow an alternating tree from row i until it reaches a free column
            used[j0] = True
            i0, delta, j1 = match[j0], inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    assign = [-1] * rows
    for j in range(1, n + 1):
        if match[j] <= rows and j <= cols:
            assign[match[j] - 1] = j - 1
    return assign, sum(weights[i][j] for i, j in enumerate(assign) if j >= 0)


def confusion_matrix(rows, cols, n_rows, n_cols):
    m = torch.zeros(n_rows, n_cols, dtype=torch.int64)
    m.index_put_((rows.cpu(), cols.cpu()), torch.ones(len(rows), dtype=torch.int64), accumulate=True)
    return m


@torch.no_grad()
def categorical_accuracy(D, images, labels, n_cat, num_classes, memory_format=torch.contiguous_format, chunk=500):
    """Q's c1 of real images (uint8), with D in eval mode (BatchNorm's running statistics, so a prediction does not
    depend on its batch), then back in train mode. Returns (accuracy under the best one-to-one map code -> class,
    that map, the code x class confusion matrix)."""
    device = next(D.parameters()).device
    D.eval()
    codes = torch.cat([D.categorical(common.to_float(images[i:i + chunk].to(device)).contiguous(memory_format=memory_format))
                       .argmax(1).cpu() for i in range(0, len(images), chunk)])
    D.train()
    confusion = confusion_matrix(codes, labels, n_cat, num_classes)
    assign, matched = best_assignment(confusion.tolist())
    return matched / len(images), assign, confusion


@torch.no_grad()
def code_purity(sample, evaluator, n, n_cat, width, device, seed):
    """For each value k of c1, the evaluation classifier's label distribution of n / n_cat images made with c1 = k
    (fixed noise from its own generator: the same latents at every evaluation, no training randomness drawn).
    Returns (the n_cat x classes table of shares; purity = the mean over k of the largest share; the share of images
    whose label is their c1's class under the best one-to-one map code -> class). Purity alone cannot tell ten codes
    that all make one class (purity 1) from ten that make ten classes: the one-to-one share can (0.1 and 1)."""
    g = torch.Generator(device).manual_seed(seed)
    c1 = common.balanced_labels(n, n_cat, device)
    images = torch.cat([common.to_uint8(sample(torch.randn(len(c), width, device=device, generator=g), c)).cpu()
                        for c in c1.split(500)])  # 8-bit images, as the Evaluator scores them
    _, probs = evaluator._classify(images)
    counts = confusion_matrix(c1, probs.argmax(1), n_cat, probs.shape[1])
    _, matched = best_assignment(counts.tolist())
    table = counts.double() / counts.sum(1, keepdim=True).clamp(min=1)
    return table, table.max(1).values.mean().item(), matched / n


def plot_purity(table, path, class_names=None, title=""):
    """purity.png: the code x class table as a heat map with its shares (does c1 = k always make one class?)."""
    from matplotlib.figure import Figure
    k, c = table.shape
    fig = Figure(figsize=(1.0 + 0.55 * c, 0.8 + 0.45 * k))
    ax = fig.subplots()
    ax.imshow(table.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i in range(k):
        for j in range(c):
            if table[i, j] >= 0.005:
                ax.text(j, i, f"{table[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if table[i, j] > 0.6 else "black")
    ax.set_xticks(range(c), class_names or [str(j) for j in range(c)], fontsize=7, rotation=45 if class_names else 0)
    ax.set_yticks(range(k), [str(i) for i in range(k)], fontsize=7)
    ax.set_xlabel("evaluation classifier's label")
    ax.set_ylabel("c1")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_images(G, z, c1, c_cont):
    """Samples in eval mode (BatchNorm's running statistics, not the batch's), then back to train mode."""
    G.eval()
    x = torch.cat([G(*part) for part in zip(z.split(500), c1.split(500), c_cont.split(500))])
    G.train()
    return x


def write_traversals(G, noise, args, out_dir, step):
    """The paper's Figure 2 from fixed noise: traverse_c1.png (and its frame samples/c1/step_*.png for the GIF) and
    traverse_c2.png, ... for each continuous code (see traversal_latents)."""
    for code in range(1, 2 + args.n_cont):
        z, c1, c_cont, cols = traversal_latents(code, noise, args.latent_dim, args.n_cat, args.z_dist,
                                                args.traverse_range)
        images = sample_images(G, z, c1, c_cont)
        common.save_grid(images, out_dir / f"traverse_c{code}.png", nrow=cols)
        if code == 1:
            common.save_grid(images, out_dir / "samples" / "c1" / f"step_{step:07d}.png", nrow=cols)


def prepare_frames(run):
    """samples/c1/: a fresh run starts without old frames (an --overwrite'd run's); a resumed one drops the frames
    after its checkpoint, as Run does for samples/."""
    frames = run.dir / "samples" / "c1"
    frames.mkdir(parents=True, exist_ok=True)
    for p in frames.glob("step_*.png"):
        if run.state is None or int(p.stem[5:]) > run.step:
            p.unlink()
    if run.state is None:
        for p in [*run.dir.glob("traverse_c*.png"), run.dir / "traverse_c1.gif", run.dir / "purity.png"]:
            p.unlink(missing_ok=True)


def train(args):
    run = common.Run(args, SCRIPT)  # --resume, device, precision and --out; seeds torch
    args, device = run.args, run.device
    common.conv_plan(args.image_size, "the InfoGAN networks")  # a size the stack cannot make fails before the data
    data = common.load_dataset(args.dataset, args.data_root, args.image_size, device, **common.data_options(args))
    # The real images cat_acc classifies: the test split (folders and CelebA have none: their training images).
    test = data if args.dataset in ("folder", "celeba") else \
        common.load_dataset(args.dataset, args.data_root, args.image_size, "cpu", train=False, **common.data_options(args))
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[:args.eval_samples]
    test_images, test_labels = test.images[pick.to(test.images.device)].cpu(), test.labels[pick.to(test.labels.device)]
    G = build_generator(args, data.channels).to(device, memory_format=run.memory_format)
    D = build_discriminator(args, data.channels).to(device, memory_format=run.memory_format)
    # One optimiser for D, Q and their shared body, one for G, as the authors' code (infogan_trainer.py: Q's layers
    # are among the "d_" variables of the discriminator's Adam; L_info is in both losses): the information term
    # then trains Q's head and the shared body in the D step and G in the G step. (A popular port steps Q with
    # G's optimiser only, so the body never learns from L_info.)
    opt_g = torch.optim.Adam(G.parameters(), args.lr_g, betas=(args.beta1, args.beta2), fused=run.fused)
    opt_d = torch.optim.Adam(D.parameters(), args.lr_d, betas=(args.beta1, args.beta2), fused=run.fused)
    batches = run.restore(data, G=G, D=D, opt_g=opt_g, opt_d=opt_d)  # with --resume: their saved states
    G_ddp, D_ddp = run.distribute(G), run.distribute(D)  # under torchrun: DDP, gradients averaged; else G, D
    total = min(args.max_steps or math.inf, args.epochs * batches.per_epoch // args.n_dis)
    width, lam, K = noise_dim(args), args.info_weight, args.n_cat

    def latent(noise, c1=None):
        return latent_from_noise(noise, args.latent_dim, K, args.z_dist, c1)

    def sample(noise, c1=None):  # Run's noise (and, from --generate or purity, the asked c1) -> images
        return sample_images(G, *latent(noise, c1))

    step = run.start(total, sample, latent_dim=width, d_loss_floor=0, panels=[  # latent_dim: the noise's width
        ("adversarial losses", ["loss_d", "loss_g"]),
        (f"information terms (loss_cat at chance: {math.log(K):.2f})",
         ["loss_cat"] + (["loss_cont"] if args.n_cont else [])),
        ("D accuracy (0.5 = fooled)", ["acc_real", "acc_fake"]),
        ("categorical code c1", ["cat_acc", "gen_cat_acc", "purity"]),
        ("FID (lower is better)", ["cls_fid", "fid"]),
    ])
    writer = run.rank == 0  # under torchrun rank 0 alone measures and writes, as Run does
    if writer:
        prepare_frames(run)
    fixed = torch.randn(max(TRAVERSE_ROWS, K), width, device=device,  # the traversals' noise: its own generator
                        generator=torch.Generator(device).manual_seed(args.seed + 6))
    measure_cat = test.num_classes >= 2
    class_names = common.CLASS_NAMES.get(args.dataset)

    def measure_codes():
        """cat_acc on the real test images and, with the evaluation classifier, purity; logged as one row."""
        record = {}
        if measure_cat:
            acc, assign, _ = categorical_accuracy(D, test_images, test_labels, K, test.num_classes, run.memory_format)
            record.update(cat_acc=acc, cat_map=assign, cat_n=len(test_images),
                          cat_split="train" if test is data else "test")
        if run.evaluator.classifier is not None:
            table, purity, gen_acc = code_purity(sample, run.evaluator, args.eval_samples, K, width, device,
                                                 args.seed + 7)
            record.update(purity=purity, gen_cat_acc=gen_acc, purity_classes=table.argmax(1).tolist(),
                          purity_table=[[round(v, 4) for v in r] for r in table.tolist()])
        if record:
            run.log(record)
        return record

    with run:
        if step == 0 and writer:
            write_traversals(G, fixed, args, run.dir, 0)
        codes, codes_step = {}, None
        while not run.should_stop(step):
            # D step: minimise softplus(-D(x)) + softplus(D(G(z, c))) + lambda L_info(Q(G(z, c)), c)
            # (Chen et al. 2016, Eq. 6; the authors' code adds L_info to D's loss, which trains Q and the body)
            for _ in range(args.n_dis):
                real, _ = batches.next()  # labels unused: InfoGAN is unsupervised
                z, c1, c_cont = latent(run.randn(args.batch_size, width))  # under torchrun: this process's share
                with run.autocast():
                    with torch.no_grad():  # D's step must not push gradients into G: record no graph for G at all
                        fake = G(z, c1, c_cont)
                    real_logits = D_ddp(real).float()  # real and fake in separate batches: BatchNorm sees each alone
                    fake_logits, q = D_ddp(fake, with_q=True)
                fake_logits = fake_logits.float()  # the losses in float32 (Q's outputs already are)
                cat_d, cont_d = info_loss(q, c1, c_cont)
                loss_d = d_loss(real_logits, fake_logits)
                opt_d.zero_grad(set_to_none=True)
                (loss_d + lam * (cat_d + args.cont_weight * cont_d)).backward()
                opt_d.step()

            # G step: minimise softplus(-D(G(z, c))) + lambda L_info(Q(G(z, c)), c)  (non-saturating, Eq. 6)
            # Through D itself, not D_ddp: D is frozen here, so no gradient of D is to be averaged over processes.
            D.requires_grad_(False)  # gradients flow through D and Q to G; their own weights are the D step's
            for _ in range(args.n_gen):
                z, c1, c_cont = latent(run.randn(args.batch_size, width))
                with run.autocast():
                    fake_logits_g, q = D(G_ddp(z, c1, c_cont), with_q=True)
                cat_g, cont_g = info_loss(q, c1, c_cont)
                loss_g = g_loss(fake_logits_g.float())
                opt_g.zero_grad(set_to_none=True)
                (loss_g + lam * (cat_g + args.cont_weight * cont_g)).backward()
                opt_g.step()
            D.requires_grad_(True)
            step += 1
            run.end_step(step, loss_d=loss_d, loss_g=loss_g, loss_cat=cat_g, **({"loss_cont": cont_g} if args.n_cont else {}),
                         d_real=real_logits.mean(), d_fake=fake_logits.mean(),
                         acc_real=(real_logits > 0).float().mean(), acc_fake=(fake_logits < 0).float().mean())
            if writer and step % args.sample_every == 0:
                write_traversals(G, fixed, args, run.dir, step)
            if writer and args.eval_every and step % args.eval_every == 0 and step < total:
                codes, codes_step = measure_codes(), step
    # The end, after `with run` has saved the last step's checkpoint (a Ctrl-C, SIGTERM or NaN has exited there):
    # the codes measured once more (unless just measured), the figures of the last step.
    if writer and codes_step != step:
        codes = measure_codes()
    if writer:
        write_traversals(G, fixed, args, run.dir, step)
        common.make_gif(run.dir / "samples" / "c1", run.dir / "traverse_c1.gif")
    if "purity_table" in codes:
        plot_purity(torch.tensor(codes["purity_table"]), run.dir / "purity.png", class_names,
                    f"images made with each c1, the classifier's labels: step {step}, purity {codes['purity']:.3f}, "
                    f"one-to-one {codes['gen_cat_acc']:.3f}")
    if codes:
        found = [f"cat_acc={codes['cat_acc']:.4f} ({codes['cat_n']} {codes['cat_split']} images; code -> class "
                 f"{codes['cat_map']})"] if "cat_acc" in codes else []
        found += [f"gen_cat_acc={codes['gen_cat_acc']:.4f} purity={codes['purity']:.4f} (majority class per code "
                  f"{codes['purity_classes']})"] if "purity" in codes else []
        print(f"{SCRIPT}: categorical code at step {step}: {'; '.join(found)}", flush=True)
    return run.finish()


def generate(args):
    """--generate N: N samples with c1 = 0, 1, ..., n_cat - 1, 0, ... (balanced), written as `labels`; z and the
    continuous codes from the seeded noise. Needs no dataset."""
    def load(saved, state, device):
        G = build_generator(saved, state["data"]["channels"]).to(device)
        G.load_state_dict(state["G"])
        return lambda noise, c1: sample_images(G, *latent_from_noise(noise, saved.latent_dim, saved.n_cat,
                                                                      saved.z_dist, c1))
    return common.generate(args, SCRIPT, load, noise_dim=noise_dim, num_labels=lambda saved: saved.n_cat)


def main(argv=None):
    args = parse_args(argv)
    try:
        return generate(args) if args.generate else train(args)
    except common.ENDINGS as e:  # bad input, no memory, a signal before training: one line (a bug: its traceback)
        common.fail(f"{SCRIPT}.py", e)
    finally:  # a notebook's Ctrl-C works as before, whatever ended the run
        common.StopSignals.restore_all()


if __name__ == "__main__":
    main()
