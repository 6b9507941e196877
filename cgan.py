"""Conditional GAN (Mirza & Osindero 2014, arXiv:1411.1784), with a projection discriminator option
(Miyato & Koyama 2018, arXiv:1802.05637), the saturating and non-saturating losses, and spectral norm.

    python cgan.py --dataset fashion-mnist --max-minutes 3                         # concat D, ns loss
    python cgan.py --dataset fashion-mnist --d-cond none --loss vanilla            # report 000's first setup (README)
    python cgan.py --dataset mnist --d-cond projection --spectral-norm d
    python cgan.py --generate 1000 --checkpoint runs/<run>/checkpoint.pt           # balanced labels

G gets z and the class y: y as a one-hot vector (the paper) or a learned embedding, joined to z.
D sees the class in one of three ways (--d-cond):
  none        D(x): an ordinary discriminator. Nothing makes G respect y: samples ignore it.
  concat      D(x, y) with y's one-hot joined to the input as K constant channels (Mirza & Osindero).
  projection  D(x, y) = psi(phi(x)) + <embed(y), phi(x)> (Miyato & Koyama 2018, Eq. 3).
Losses from D's logits l (softplus is exact and stable; no sigmoid + BCE):
  D minimises softplus(-l_real) + softplus(l_fake)                    (Goodfellow et al. 2014, Eq. 1)
  G, --loss vanilla: minimises log(1 - D(G(z))) = -softplus(l_fake)    (saturating minimax, Eq. 1)
  G, --loss ns:      minimises -log D(G(z))     =  softplus(-l_fake)   (non-saturating, Sec. 3)

Writes into --out: args.json, metrics.jsonl, samples/step_*.png (one row per class, the same z
in each column), progress.gif, losses.png (losses, D outputs, conditional accuracy, cls-FID),
class_histogram.png, predictions.png (20 samples titled asked->seen), interpolation.png, checkpoint.pt.
"""

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "cgan"
EMBED_DIM = 50  # size of G's learned class embedding with --g-cond embed


def parse_args(argv=None):
    p = common.ArgumentParser(prog=f"{SCRIPT}.py", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model and optimisation (defaults: DCGAN's, Radford et al. 2015; batch 256 of report 000, README)")
    m.add_argument("--arch", default="dcgan", choices=("dcgan", "mlp"),
                   help="dcgan: DCGAN-style G and D (28/32 px and any s*2^n); mlp: 3 hidden layers each")
    m.add_argument("--width", type=common.positive_int, default=64,
                   help="--arch dcgan: channels of G's last and D's first conv layer")
    m.add_argument("--g-cond", default="onehot", choices=("onehot", "embed"),
                   help=f"how G sees y: one-hot joined to z (Mirza & Osindero) or a learned {EMBED_DIM}-d embedding")
    m.add_argument("--d-cond", default="concat", choices=("none", "concat", "projection"),
                   help="how D sees y: not at all, one-hot channels joined to its input (Mirza & Osindero), "
                        "or a projection of its features (Miyato & Koyama 2018)")
    m.add_argument("--loss", default="ns", choices=("vanilla", "ns"),
                   help="G's loss: vanilla = saturating log(1 - D(G(z))); ns = non-saturating -log D(G(z))")
    m.add_argument("--spectral-norm", default="none", choices=("none", "d", "g", "both"),
                   help="spectral normalisation (Miyato et al. 2018) of every conv/linear/embedding weight in D, G or "
                        "both; a spectrally normalised D drops its BatchNorm, as in that paper")
    m.add_argument("--sn-iters", type=common.positive_int, default=1, help="power iterations per step; 1 in Miyato et al. 2018")
    m.add_argument("--latent-dim", type=common.positive_int, default=100, help="size of z ~ N(0, I); 100 as in DCGAN")
    m.add_argument("--batch-size", type=common.positive_int, default=256, help="256, as report 000")
    m.add_argument("--epochs", type=common.positive_int, default=100, help="100, as report 000")
    m.add_argument("--lr-g", type=common.positive_float, default=2e-4, help="G's Adam learning rate; 2e-4 (DCGAN)")
    m.add_argument("--lr-d", type=common.positive_float, default=2e-4, help="D's Adam learning rate; 2e-4 (DCGAN)")
    m.add_argument("--beta1", type=common.unit_float, default=0.5, help="Adam beta1; 0.5 (DCGAN)")
    m.add_argument("--beta2", type=common.unit_float, default=0.999, help="Adam beta2; 0.999 (DCGAN)")
    m.add_argument("--n-dis", type=common.positive_int, default=1, help="D steps per iteration; 1")
    m.add_argument("--n-gen", type=common.positive_int, default=1, help="G steps per iteration; 1")
    m.add_argument("--d-dropout", type=common.unit_float, default=0.0, help="dropout after each of D's LeakyReLUs; 0")
    common.add_common_args(p, SCRIPT)
    args = p.parse_args(argv)
    common.refuse_unused(p, args, {"width": args.arch == "dcgan"}, f"--arch {args.arch}")
    common.refuse_unused(p, args, {"sn_iters": args.spectral_norm != "none"}, "--spectral-norm none")
    return args


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------

class ClassInput(nn.Module):
    """y -> the vector joined to z: one-hot (fixed) or a learned embedding."""

    def __init__(self, num_classes, mode):
        super().__init__()
        self.num_classes, self.mode = num_classes, mode
        self.embed = nn.Embedding(num_classes, EMBED_DIM) if mode == "embed" else None
        self.dim = EMBED_DIM if mode == "embed" else num_classes

    def forward(self, y):
        return self.embed(y) if self.embed is not None else F.one_hot(y, self.num_classes).float()


class Generator(nn.Module):
    """[z, c(y)] -> image. 28 px, width w: (2w,7,7) -> (w,14,14) -> (C,28,28); 32 px: (4w,4,4) -> ... -> (C,32,32)."""

    def __init__(self, latent_dim, channels, image_size, num_classes, width=64, g_cond="onehot"):
        super().__init__()
        self.cond = ClassInput(num_classes, g_cond)
        s0, n = common.conv_plan(image_size)
        ch = width * 2 ** (n - 1)
        layers = [nn.ConvTranspose2d(latent_dim + self.cond.dim, ch, s0, 1, 0, bias=False),  # (ch, s0, s0)
                  nn.BatchNorm2d(ch), nn.ReLU(True)]
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]  # 2x size
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1, bias=False), nn.Tanh()]  # (C, size, size); no bias: dcgan.py
        self.net = nn.Sequential(*layers)

    def forward(self, z, y):
        h = torch.cat([z, self.cond(y)], 1)
        return self.net(h.view(h.shape[0], -1, 1, 1))


class Discriminator(nn.Module):
    """(x, y) -> one logit. Features phi(x): stride-2 convs with LeakyReLU(0.2) down to (top, s0, s0).
    none: psi(phi); concat: y's one-hot as K extra input channels; projection: psi(phi) + <embed(y), sum-pooled phi>."""

    def __init__(self, channels, image_size, num_classes, width=64, d_cond="concat", batchnorm=True, dropout=0.0):
        super().__init__()
        self.num_classes, self.d_cond = num_classes, d_cond
        s0, n = common.conv_plan(image_size)
        drop = [nn.Dropout(dropout)] if dropout > 0 else []
        cin = channels + (num_classes if d_cond == "concat" else 0)
        # dcgan.py's D, with the same rule for biases: a bias is redundant only where a BatchNorm follows to
        # absorb it. So the first conv and psi always have one (without them the projection recipe collapsed at
        # seed 0 on MNIST: docs/seeds.md), and the middle convs have one when spectral norm drops BatchNorm (Miyato
        # et al. 2018's D has biases).
        bias = not batchnorm
        ch = width
        layers = [nn.Conv2d(cin, ch, 4, 2, 1), nn.LeakyReLU(0.2, True), *drop]  # (w, size/2, size/2); no BN here
        for _ in range(n - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=bias), nn.BatchNorm2d(ch * 2) if batchnorm else nn.Identity(),
                       nn.LeakyReLU(0.2, True), *drop]  # (2ch, H/2, W/2)
            ch *= 2
        self.phi = nn.Sequential(*layers)
        self.psi = nn.Conv2d(ch, 1, s0, 1, 0)  # (1, 1, 1): the unconditional logit
        self.embed = nn.Embedding(num_classes, ch) if d_cond == "projection" else None

    def forward(self, x, y):
        if self.d_cond == "concat":
            x = torch.cat([x, F.one_hot(y, self.num_classes).float()[:, :, None, None].expand(-1, -1, *x.shape[2:])], 1)
        h = self.phi(x)
        logit = self.psi(h).view(-1)
        if self.embed is not None:  # Miyato & Koyama 2018, Eq. 3: + y^T V phi(x)
            logit = logit + (self.embed(y) * h.sum((2, 3))).sum(1)
        return logit


class MLPGenerator(nn.Module):
    """[z, c(y)] -> 256 -> 512 -> 1024 -> C*H*W, LeakyReLU(0.2) and BatchNorm in the hidden layers."""

    def __init__(self, latent_dim, channels, image_size, num_classes, g_cond="onehot"):
        super().__init__()
        self.cond = ClassInput(num_classes, g_cond)
        self.shape = (channels, image_size, image_size)
        self.net = nn.Sequential(
            nn.Linear(latent_dim + self.cond.dim, 256), nn.LeakyReLU(0.2, True),
            nn.Linear(256, 512), nn.BatchNorm1d(512), nn.LeakyReLU(0.2, True),
            nn.Linear(512, 1024), nn.BatchNorm1d(1024), nn.LeakyReLU(0.2, True),
            nn.Linear(1024, math.prod(self.shape)), nn.Tanh())

    def forward(self, z, y):
        return self.net(torch.cat([z, self.cond(y)], 1)).view(z.shape[0], *self.shape)


class MLPDiscriminator(nn.Module):
    """[x, (one-hot y)] -> 512 -> 256 = phi, then psi and, for projection, <embed(y), phi>."""

    def __init__(self, channels, image_size, num_classes, d_cond="concat", dropout=0.0):
        super().__init__()
        self.num_classes, self.d_cond = num_classes, d_cond
        drop = [nn.Dropout(dropout)] if dropout > 0 else []
        cin = channels * image_size ** 2 + (num_classes if d_cond == "concat" else 0)
        self.phi = nn.Sequential(nn.Linear(cin, 512), nn.LeakyReLU(0.2, True), *drop,
                                 nn.Linear(512, 256), nn.LeakyReLU(0.2, True), *drop)
        self.psi = nn.Linear(256, 1)
        self.embed = nn.Embedding(num_classes, 256) if d_cond == "projection" else None

    def forward(self, x, y):
        x = x.flatten(1)
        if self.d_cond == "concat":
            x = torch.cat([x, F.one_hot(y, self.num_classes).float()], 1)
        h = self.phi(x)
        logit = self.psi(h).view(-1)
        if self.embed is not None:
            logit = logit + (self.embed(y) * h).sum(1)
        return logit


def init_weights(m):
    """N(0, 0.02) weights, BatchNorm scale N(1, 0.02) (Radford et al. 2015, Sec. 4; the same in every script
    that uses DCGAN's networks)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def add_spectral_norm(net, iters):
    """Spectral normalisation of every conv, linear and embedding weight of `net` (Miyato et al. 2018)."""
    for m in list(net.modules()):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            common.spectral_norm(m, iters)
    return net


def build_generator(args, channels, num_classes):
    if args.arch == "mlp":
        G = MLPGenerator(args.latent_dim, channels, args.image_size, num_classes, args.g_cond)
    else:
        G = Generator(args.latent_dim, channels, args.image_size, num_classes, args.width, args.g_cond)
    G.apply(init_weights)
    return add_spectral_norm(G, args.sn_iters) if args.spectral_norm in ("g", "both") else G


def build_discriminator(args, channels, num_classes):
    sn = args.spectral_norm in ("d", "both")
    if args.arch == "mlp":
        D = MLPDiscriminator(channels, args.image_size, num_classes, args.d_cond, args.d_dropout)
    else:
        D = Discriminator(channels, args.image_size, num_classes, args.width, args.d_cond, not sn, args.d_dropout)
    D.apply(init_weights)
    return add_spectral_norm(D, args.sn_iters) if sn else D


# ----------------------------------------------------------------------------------------------
# Losses, from logits: log sigmoid(l) = -softplus(-l) and log(1 - sigmoid(l)) = -softplus(l)
# ----------------------------------------------------------------------------------------------

def d_loss(real_logits, fake_logits):
    """D maximises log D(x, y) + log(1 - D(G(z, y), y))  (Goodfellow et al. 2014, Eq. 1; Mirza & Osindero Eq. 2)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(fake_logits, kind):
    """vanilla: minimise log(1 - D(G(z))), which saturates when D rejects the fakes (its gradient vanishes);
    ns: minimise -log D(G(z)), same fixed point, strong gradients early (Goodfellow et al. 2014, Sec. 3)."""
    if kind == "vanilla":
        return -F.softplus(fake_logits).mean()
    return F.softplus(-fake_logits).mean()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_images(G, z, y):
    """Samples in eval mode (BatchNorm's running statistics, no power iteration), then back to train."""
    G.eval()
    x = torch.cat([G(zc, yc) for zc, yc in zip(z.split(500), y.split(500))])
    G.train()
    return x


def train(args):
    run = common.Run(args, SCRIPT)  # --resume, device, precision and --out; seeds torch
    args, device = run.args, run.device
    if args.arch == "dcgan":
        common.conv_plan(args.image_size)  # a size the stack cannot make fails before the data is loaded
    data = common.load_dataset(args.dataset, args.data_root, args.image_size, device, **common.data_options(args))
    K = data.num_classes
    if K < 2:
        raise common.UsageError(f"{args.dataset} has no class labels; a conditional GAN needs them (use dcgan.py)")
    G = build_generator(args, data.channels, K).to(device, memory_format=run.memory_format)
    D = build_discriminator(args, data.channels, K).to(device, memory_format=run.memory_format)
    opt_g = torch.optim.Adam(G.parameters(), args.lr_g, betas=(args.beta1, args.beta2), fused=run.fused)
    opt_d = torch.optim.Adam(D.parameters(), args.lr_d, betas=(args.beta1, args.beta2), fused=run.fused)
    batches = run.restore(data, G=G, D=D, opt_g=opt_g, opt_d=opt_d)  # with --resume: their saved states
    G_ddp, D_ddp = run.distribute(G), run.distribute(D)  # under torchrun: DDP, gradients averaged; else G, D
    total = min(args.max_steps or math.inf, args.epochs * batches.per_epoch // args.n_dis)
    # num_classes=K: sample grids with one row per class, evaluation with balanced labels and cls_acc
    step = run.start(total, lambda z, y: sample_images(G, z, y), latent_dim=args.latent_dim, num_classes=K,
                     d_loss_floor=0, panels=[  # D's cross-entropy >= 0: Run says when D has won
        ("losses", ["loss_d", "loss_g"]),
        ("D output sigmoid(D(.))", ["p_real", "p_fake"]),
        ("conditional accuracy (classifier)", ["cls_acc"]),
        ("FID (lower is better)", ["cls_fid", "fid"]),
    ])

    with run:
        while not run.should_stop(step):
            # D step: minimise softplus(-D(x, y)) + softplus(D(G(z, y'), y'))  (Mirza & Osindero 2014, Eq. 2)
            for _ in range(args.n_dis):
                real, y_real = batches.next()
                z = run.randn(args.batch_size, args.latent_dim)  # under torchrun: this process's share
                y_fake = run.randint(K, args.batch_size)
                with run.autocast():
                    with torch.no_grad():  # D's step must not push gradients into G: record no graph for G at all
                        fake = G(z, y_fake)
                    # Two forwards (D's BatchNorm sees all-real and all-fake batches); the loss in float32
                    real_logits, fake_logits = D_ddp(real, y_real).float(), D_ddp(fake, y_fake).float()
                loss_d = d_loss(real_logits, fake_logits)
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()

            # G step: vanilla minimises -softplus(D(G(z, y), y)), ns minimises softplus(-D(G(z, y), y))
            # Through D itself, not D_ddp: D is frozen here, so no gradient of D is to be averaged over processes.
            D.requires_grad_(False)  # gradients flow through D to G, D's own weight gradients are not needed
            for _ in range(args.n_gen):
                z = run.randn(args.batch_size, args.latent_dim)
                y_fake = run.randint(K, args.batch_size)
                with run.autocast():
                    fake_logits_g = D(G_ddp(z, y_fake), y_fake).float()
                loss_g = g_loss(fake_logits_g, args.loss)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
            D.requires_grad_(True)
            step += 1
            run.end_step(step, loss_d=loss_d, loss_g=loss_g, d_real=real_logits.mean(), d_fake=fake_logits.mean(),
                         p_real=torch.sigmoid(real_logits).mean(), p_fake=torch.sigmoid(fake_logits).mean(),
                         acc_real=(real_logits > 0).float().mean(), acc_fake=(fake_logits < 0).float().mean())
    return run.finish()


def generate(args):
    """--generate N: N samples with balanced labels (0, 1, ..., K-1, 0, ...); needs no dataset."""
    def load(saved, state, device):
        G = build_generator(saved, state["data"]["channels"], state["data"]["num_classes"]).to(device)
        G.load_state_dict(state["G"])
        return lambda z, y: sample_images(G, z, y)
    return common.generate(args, SCRIPT, load)


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
