"""SNGAN: spectral normalisation for GANs (Miyato et al. 2018, arXiv:1802.05957), with the projection
discriminator and conditional BatchNorm for the class-conditional case (Miyato & Koyama 2018, arXiv:1802.05637).

    python sngan.py --dataset cifar10 --loss hinge --n-dis 5           # the paper's CIFAR-10 ResNet
    python sngan.py --dataset cifar10 --arch cnn                       # the paper's "standard CNN"
    python sngan.py --dataset stl10 --epochs 153                       # 48 px ResNet, 50k G steps
    python sngan.py --dataset fashion-mnist --width 16 --batch-size 32 --max-minutes 10   # a CPU setting
    python sngan.py --generate 1000 --checkpoint runs/<run>/checkpoint.pt

Every weight of D (convs, linear, the class embedding) is divided by its largest singular value,
estimated by one power iteration per training-mode forward of D (Sec. 2.1; n_dis + n_gen per
iteration): D becomes 1-Lipschitz per layer without clipping or a penalty, and G is unconstrained
(BatchNorm, no SN). Losses, from D's raw outputs d (--loss):
  hinge        D: E[relu(1 - d_real)] + E[relu(1 + d_fake)]   G: -E[d_fake]   (the paper's Eq. 17; default)
  ns           D: E[softplus(-d_real)] + E[softplus(d_fake)]  G: E[softplus(-d_fake)]  (non-saturating)
  wasserstein  D: E[d_fake] - E[d_real]                       G: -E[d_fake]   (SN in place of clipping)
With --conditional, G's BatchNorms take a per-class scale and shift, and D adds the projection
<embed(y), phi(x)> of its pooled features phi(x) onto a spectrally normalised class embedding.

Writes into --out: args.json, metrics.jsonl, samples/step_*.png (one row per class with --conditional),
progress.gif, losses.png (losses, D outputs, the largest singular value of every D layer, FID/IS),
interpolation.png, class_histogram.png and predictions.png (MNIST-like data), checkpoint.pt.
"""

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "sngan"


def parse_args(argv=None):
    p = common.ArgumentParser(prog=f"{SCRIPT}.py", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model and optimisation (defaults: Miyato et al. 2018 and the authors' code)")
    m.add_argument("--arch", default="resnet", choices=("resnet", "cnn"),
                   help="resnet: the paper's ResNets (App. B: 32 px CIFAR-10, 48 px STL-10; 64 px and up for "
                        "folders/CelebA); cnn: the paper's standard CNN (Table 3)")
    m.add_argument("--width", type=common.positive_int, default=64,
                   help="base channels w (the paper's channel counts are at w = 64); at 32 px: cnn G 8w..w, D w..8w, "
                        "resnet G 4w = 256, D 2w = 128 (CIFAR-10); at 48 px resnet G 8w..w, D w..16w (STL-10)")
    m.add_argument("--g-block", default="preact", choices=("preact", "postact"),
                   help="resnet G block: preact = BN, ReLU, conv (the paper); postact = conv, BN, ReLU (report 003)")
    m.add_argument("--d-arch", default="resnet", choices=("resnet", "strided"),
                   help="resnet D's first block: the paper's optimised block at full resolution, or one stride-2 "
                        "conv (the report's 'strided resnet': less compute)")
    m.add_argument("--loss", default="hinge", choices=("hinge", "ns", "wasserstein"),
                   help="hinge (the paper's best), ns (non-saturating cross-entropy), wasserstein (critic loss; "
                        "SN keeps D Lipschitz instead of clipping)")
    m.add_argument("--conditional", action="store_true",
                   help="class-conditional: conditional BatchNorm in G, projection D (Miyato & Koyama 2018)")
    m.add_argument("--latent-dim", type=common.positive_int, default=128, help="size of z ~ N(0, I); 128 in the paper")
    m.add_argument("--batch-size", type=common.positive_int, default=64, help="D's batch; 64 in the paper")
    m.add_argument("--g-batch-size", type=common.positive_int, default=None,
                   help="G's batch; default twice --batch-size, as the authors' code (64 and 128)")
    m.add_argument("--epochs", type=common.positive_int, default=320,
                   help="passes over the data seen by D; 320 = the authors' 50k G steps on CIFAR-10 at batch 64, "
                        "n_dis 5 (STL-10's 105k training images: --epochs 153 for 50k)")
    m.add_argument("--lr-g", type=common.positive_float, default=2e-4, help="G's Adam learning rate; 2e-4 in the paper")
    m.add_argument("--lr-d", type=common.positive_float, default=2e-4, help="D's Adam learning rate; 2e-4 in the paper")
    m.add_argument("--beta1", type=common.unit_float, default=0.0,
                   help="Adam beta1; 0 in the paper's ResNet setting (report 003 needed 0.5 for its ResNet)")
    m.add_argument("--beta2", type=common.unit_float, default=0.9, help="Adam beta2; 0.9 in the paper")
    m.add_argument("--lr-decay", default="linear", choices=("linear", "none"),
                   help="linear: both learning rates fall linearly to 0 over the run's steps, as the authors' code")
    m.add_argument("--n-dis", type=common.positive_int, default=5, help="D steps per G step; 5 in the paper")
    m.add_argument("--n-gen", type=common.positive_int, default=1, help="G steps per iteration; 1")
    m.add_argument("--sn-iters", type=common.positive_int, default=1, help="power iterations per forward; 1 in the paper")
    m.add_argument("--ema", type=common.open_unit_float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of G's weights with this decay (e.g. 0.999) and use "
                        "it for samples, evaluation and --generate; off by default, as in the paper")
    common.add_common_args(p, SCRIPT)
    args = p.parse_args(argv)
    common.refuse_unused(p, args, {"g_block": args.arch == "resnet", "d_arch": args.arch == "resnet"},
                         f"--arch {args.arch}")
    return args


# ----------------------------------------------------------------------------------------------
# Networks. G: no spectral norm (the paper normalises D only). D: every weight through common.spectral_norm.
# ----------------------------------------------------------------------------------------------

class CondBatchNorm2d(nn.Module):
    """BatchNorm without its own affine, then a per-class scale and shift: gamma_y * x_hat + beta_y
    (Miyato & Koyama 2018, Sec. 4; de Vries et al. 2017). Unconditional (num_classes 0): plain BatchNorm2d."""

    def __init__(self, channels, num_classes=0):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=not num_classes)
        if num_classes:
            self.gamma, self.beta = nn.Embedding(num_classes, channels), nn.Embedding(num_classes, channels)
            nn.init.ones_(self.gamma.weight)
            nn.init.zeros_(self.beta.weight)
        else:
            self.gamma = self.beta = None

    def forward(self, x, y=None):
        h = self.bn(x)
        if self.gamma is None:
            return h
        return self.gamma(y)[:, :, None, None] * h + self.beta(y)[:, :, None, None]


class GBlock(nn.Module):
    """Residual up-block of G (App. B, Fig. 8a): preact BN, ReLU, up, conv3, BN, ReLU, conv3; or postact
    up, conv3, BN, ReLU, conv3, BN, then ReLU after the sum. Shortcut: up, conv1x1."""

    def __init__(self, cin, cout, num_classes=0, postact=False):
        super().__init__()
        self.postact = postact
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, 1, 1), nn.Conv2d(cout, cout, 3, 1, 1)
        self.bn1 = CondBatchNorm2d(cout if postact else cin, num_classes)
        self.bn2 = CondBatchNorm2d(cout, num_classes)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x, y=None):
        up = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.postact:
            h = F.relu(self.bn1(self.conv1(up), y))
            return F.relu(self.bn2(self.conv2(h), y) + self.skip(up))
        h = self.conv1(F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2, mode="nearest"))
        h = self.conv2(F.relu(self.bn2(h, y)))
        return h + self.skip(up)


class DBlock(nn.Module):
    """Residual block of D (App. B, Fig. 8b): ReLU, conv3 (cin), ReLU, conv3 (cout), [avg-pool 2]; shortcut conv1x1, [avg-pool].
    `first` (the optimised block of the authors' code): no ReLU on the raw image, shortcut pools first."""

    def __init__(self, cin, cout, down=True, first=False):
        super().__init__()
        self.down, self.first = down, first
        hidden = cout if first else cin  # the authors' code: conv1 keeps the width, conv2 changes it
        self.conv1, self.conv2 = nn.Conv2d(cin, hidden, 3, 1, 1), nn.Conv2d(hidden, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1) if (cin != cout or down) else None

    def forward(self, x):
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        if self.down:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.first:  # pool, then 1x1 conv: the same map, 4x fewer multiply-adds
            s = self.skip(F.avg_pool2d(s, 2))
        elif self.skip is not None:
            s = self.skip(s)
            s = F.avg_pool2d(s, 2) if self.down else s
        return h + s


def resnet_channels(image_size, width):
    """(G's channels from s0 up, D's channels from the input down) of the paper's ResNets.
    <= 32 px: the CIFAR-10 nets, G 4w in every block, D 2w; larger: G halves from 16w (capped) to w, D doubles."""
    s0, n = common.conv_plan(image_size, "--arch resnet", smallest=4)
    if image_size <= 32:
        return s0, [4 * width] * (n + 1), [2 * width] * (n + 1)
    g = [width * min(2 ** (n - i), 16) for i in range(n + 1)]  # 48 px: 8w, 4w, 2w, w (the paper's STL-10 G)
    d = [width * min(2 ** i, 16) for i in range(n + 2)]        # 48 px: w, 2w, 4w, 8w, 16w (its STL-10 D)
    return s0, g, d


class ResNetGenerator(nn.Module):
    """z -> linear -> (c0, s0, s0) -> n up-blocks -> BN, ReLU, conv3x3, tanh.
    32 px (w = 64): (256, 4, 4) -> (256, 8, 8) -> (256, 16, 16) -> (256, 32, 32) -> (C, 32, 32)."""

    def __init__(self, latent_dim, channels, image_size, width=64, num_classes=0, postact=False):
        super().__init__()
        self.s0, ch, _ = resnet_channels(image_size, width)
        self.fc = nn.Linear(latent_dim, ch[0] * self.s0 ** 2)
        self.blocks = nn.ModuleList(GBlock(a, b, num_classes, postact) for a, b in zip(ch, ch[1:]))
        self.bn = CondBatchNorm2d(ch[-1])  # plain, as the authors' code: the class enters through the blocks
        self.out = nn.Conv2d(ch[-1], channels, 3, 1, 1)

    def forward(self, z, y=None):
        h = self.fc(z).view(z.shape[0], -1, self.s0, self.s0)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.out(F.relu(self.bn(h))))


class ResNetDiscriminator(nn.Module):
    """x -> first block (or a stride-2 conv) -> down-blocks -> one block without pooling -> ReLU, sum over
    space = phi(x) -> linear (+ <embed(y), phi(x)>). 32 px (w = 64): 128 channels, 32 -> 16 -> 8 -> 8 -> 8.
    48 px: 64 (24) -> 128 (12) -> 256 (6) -> 512 (3) -> 1024 (3), the paper's STL-10 D. Sum pooling, as the
    authors' code: the score grows with the feature map's area."""

    def __init__(self, channels, image_size, width=64, num_classes=0, strided=False):
        super().__init__()
        _, n = common.conv_plan(image_size, "--arch resnet", smallest=4)
        _, _, ch = resnet_channels(image_size, width)
        if strided:  # report 003's "strided ResNet": one stride-2 conv replaces the full-resolution block
            first = nn.Sequential(nn.Conv2d(channels, ch[0], 4, 2, 1), nn.ReLU())
        else:
            first = DBlock(channels, ch[0], first=True)
        if image_size <= 32:  # CIFAR-10's D: down twice (32 -> 16 -> 8), then two blocks at 8x8
            blocks = [first, DBlock(ch[0], ch[0])] + [DBlock(ch[0], ch[0], down=False) for _ in range(2)]
        else:  # STL-10's D: down n + 1 times, doubling channels, then one block
            blocks = [first] + [DBlock(ch[i], ch[i + 1]) for i in range(n)] + [DBlock(ch[n], ch[n + 1], down=False)]
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(ch[-1], 1)
        self.embed = nn.Embedding(num_classes, ch[-1]) if num_classes else None

    def forward(self, x, y=None):
        h = self.blocks(x)
        with torch.autocast(h.device.type, enabled=False):  # the head in float32: sum pooling makes large
            phi = F.relu(h.float()).sum((2, 3))              # scores, which bf16 would round (0.25 near 50)
            out = self.fc(phi).view(-1)
            if self.embed is not None:  # Miyato & Koyama 2018, Eq. 3: + y^T V phi(x)
                out = out + (self.embed(y) * phi).sum(1)
        return out


class CNNGenerator(nn.Module):
    """The paper's standard CNN G (Table 3a): z -> linear -> (8w, s0, s0), BN, ReLU -> deconv 4x4 stride 2
    with BN, ReLU, halving channels -> conv3x3 -> tanh. 32 px: 512 (4) -> 256 (8) -> 128 (16) -> 64 (32) -> C."""

    def __init__(self, latent_dim, channels, image_size, width=64, num_classes=0):
        super().__init__()
        self.s0, n = common.conv_plan(image_size, "--arch cnn", smallest=4)
        ch = [width * 2 ** (n - i) for i in range(n + 1)]
        self.fc = nn.Linear(latent_dim, ch[0] * self.s0 ** 2)
        self.bn0 = CondBatchNorm2d(ch[0], num_classes)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(a, b, 4, 2, 1) for a, b in zip(ch, ch[1:]))
        self.bns = nn.ModuleList(CondBatchNorm2d(b, num_classes) for b in ch[1:])
        self.out = nn.Conv2d(ch[-1], channels, 3, 1, 1)

    def forward(self, z, y=None):
        h = F.relu(self.bn0(self.fc(z).view(z.shape[0], -1, self.s0, self.s0), y))
        for up, bn in zip(self.ups, self.bns):
            h = F.relu(bn(up(h), y))
        return torch.tanh(self.out(h))


class CNNDiscriminator(nn.Module):
    """The paper's standard CNN D (Table 3b), LeakyReLU(0.1) after every conv: per stage a conv3x3 and a
    stride-2 conv4x4 (w, 2w, 4w), then conv3x3 to 8w; 32 px: 64, 64, 128, 128, 256, 256, 512 at 4x4 -> linear.
    With --conditional the projection uses the final features summed over space."""

    def __init__(self, channels, image_size, width=64, num_classes=0):
        super().__init__()
        s0, n = common.conv_plan(image_size, "--arch cnn", smallest=4)
        layers, cin = [], channels
        for i in range(n):
            c = width * 2 ** i
            layers += [nn.Conv2d(cin, c, 3, 1, 1), nn.LeakyReLU(0.1), nn.Conv2d(c, c, 4, 2, 1), nn.LeakyReLU(0.1)]
            cin = c
        layers += [nn.Conv2d(cin, 2 * cin, 3, 1, 1), nn.LeakyReLU(0.1)]  # (8w, s0, s0) at n = 3
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(2 * cin * s0 * s0, 1)
        self.embed = nn.Embedding(num_classes, 2 * cin) if num_classes else None

    def forward(self, x, y=None):
        h = self.features(x)
        with torch.autocast(h.device.type, enabled=False):  # the head in float32, as in ResNetDiscriminator
            h = h.float()
            out = self.fc(h.flatten(1)).view(-1)
            if self.embed is not None:
                out = out + (self.embed(y) * h.sum((2, 3))).sum(1)
        return out


def init_weights(net):
    """Xavier-uniform as in the authors' ResNet code: gain sqrt(2) for the convs inside residual blocks (ReLU
    follows), 1 for shortcuts, linear layers and the rest; biases 0. The standard CNN gets the same (its original
    initialisation is not reproduced). Embeddings keep their own (conditional BN: 1 and 0)."""
    for name, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            gain = math.sqrt(2) if name.endswith(("conv1", "conv2")) else 1.0
            nn.init.xavier_uniform_(m.weight, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


def build_generator(args, channels, num_classes):
    k = num_classes if args.conditional else 0
    if args.arch == "cnn":
        return init_weights(CNNGenerator(args.latent_dim, channels, args.image_size, args.width, k))
    return init_weights(ResNetGenerator(args.latent_dim, channels, args.image_size, args.width, k,
                                        args.g_block == "postact"))


def build_discriminator(args, channels, num_classes):
    k = num_classes if args.conditional else 0
    if args.arch == "cnn":
        D = init_weights(CNNDiscriminator(channels, args.image_size, args.width, k))
    else:
        D = init_weights(ResNetDiscriminator(channels, args.image_size, args.width, k, args.d_arch == "strided"))
    if D.embed is not None:
        nn.init.xavier_uniform_(D.embed.weight)
    for m in list(D.modules()):  # every weight, the class embedding included (Miyato & Koyama 2018)
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
            common.spectral_norm(m, args.sn_iters)
    return D


def sn_layers(D):
    return [m for m in D.modules() if nn.utils.parametrize.is_parametrized(m, "weight")]


@torch.no_grad()
def singular_values(D):
    """{sigma_i: the largest singular value of D's i-th normalised weight W / sigma(W)}, exactly (SVD of the
    weight reshaped to (out, in*kh*kw), as the paper normalises it), on the CPU in float32 (MPS has no SVD).
    In eval mode: reading `.weight` in training mode would run an extra power iteration and change training."""
    was_training = D.training
    D.eval()
    sigma = {f"sigma_{i}": torch.linalg.matrix_norm(m.weight.detach().flatten(1).float().cpu(), ord=2).item()
             for i, m in enumerate(sn_layers(D))}
    D.train(was_training)
    return sigma


# ----------------------------------------------------------------------------------------------
# Losses (from D's raw outputs)
# ----------------------------------------------------------------------------------------------

def d_loss(real, fake, kind):
    """D's loss for --loss kind: hinge (Eq. 17 of the paper's appendix), ns (Goodfellow et al. 2014, Eq. 1,
    written with softplus), wasserstein (Arjovsky et al. 2017, SN in place of clipping)."""
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "ns":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    return fake.mean() - real.mean()


def g_loss(fake, kind):
    """G's loss: -E[D(G(z))] for hinge and wasserstein (the authors' code), softplus(-D(G(z))) for ns."""
    if kind == "ns":
        return F.softplus(-fake).mean()
    return -fake.mean()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_images(G, z, y=None):
    """Samples in eval mode (BatchNorm's running statistics), then back to train mode."""
    G.eval()
    ys = y.split(500) if y is not None else [None] * len(z.split(500))
    x = torch.cat([G(zc, yc) for zc, yc in zip(z.split(500), ys)])
    G.train()
    return x


def train(args):
    run = common.Run(args, SCRIPT)  # --resume, device, precision and --out; seeds torch
    args, device = run.args, run.device
    common.conv_plan(args.image_size, f"--arch {args.arch}", smallest=4)  # an impossible size fails before the data is loaded
    data = common.load_dataset(args.dataset, args.data_root, args.image_size, device, **common.data_options(args))
    K = data.num_classes if args.conditional else 0
    if args.conditional and data.num_classes < 2:
        raise common.UsageError(f"{args.dataset} has no class labels; --conditional needs them")
    G = build_generator(args, data.channels, K).to(device, memory_format=run.memory_format)
    D = build_discriminator(args, data.channels, K).to(device, memory_format=run.memory_format)
    ema = common.EMA(G, args.ema, args.latent_dim, K) if args.ema else None
    opt_g = torch.optim.Adam(G.parameters(), args.lr_g, betas=(args.beta1, args.beta2), fused=run.fused)
    opt_d = torch.optim.Adam(D.parameters(), args.lr_d, betas=(args.beta1, args.beta2), fused=run.fused)
    total = max(1, min(args.max_steps or math.inf, args.epochs * (len(data) // args.batch_size) // args.n_dis))
    # Linear decay to 0 at the run's last step (the authors' code); a --max-minutes stop comes before it.
    decay = (lambda s: max(0.0, 1 - s / total)) if args.lr_decay == "linear" else (lambda s: 1.0)
    sched_g, sched_d = torch.optim.lr_scheduler.LambdaLR(opt_g, decay), torch.optim.lr_scheduler.LambdaLR(opt_d, decay)
    objects = dict(G=G, D=D, opt_g=opt_g, opt_d=opt_d, sched_g=sched_g, sched_d=sched_d)
    batches = run.restore(data, **objects, **({"G_ema": ema} if ema else {}))  # with --resume: their saved states
    G_ddp, D_ddp = run.distribute(G), run.distribute(D)  # under torchrun: DDP, gradients averaged; else G, D
    g_batch = args.g_batch_size or 2 * args.batch_size
    run.procs.per_process(g_batch, "--g-batch-size")  # under torchrun: it must split evenly, like --batch-size
    sigmas = [f"sigma_{i}" for i in range(len(sn_layers(D)))]
    step = run.start(total, lambda z, y: sample_images(ema.ready() if ema else G, z, y), latent_dim=args.latent_dim,
                     num_classes=K or None, d_loss_floor=None if args.loss == "wasserstein" else 0, panels=[  # hinge, ns >= 0
                         ("losses", ["loss_d", "loss_g"]),
                         ("D output (raw)", ["d_real", "d_fake"]),
                         ("largest singular value of each D layer (SN: ~1)", sigmas),
                         ("FID (lower is better)", ["cls_fid", "fid"]),
                         ("IS (higher is better)", ["cls_is", "is"]),
                     ] + ([("conditional accuracy (classifier)", ["cls_acc"])] if K else []))

    with run:
        while not run.should_stop(step):
            # D step: minimise the --loss's D objective on real (x, y) and fake (G(z, y'), y')
            for _ in range(args.n_dis):
                real, y_real = batches.next()
                z = run.randn(args.batch_size, args.latent_dim)  # under torchrun: this process's share
                y_fake = run.randint(K, args.batch_size) if K else None
                with run.autocast():
                    with torch.no_grad():  # D's step must not push gradients into G: record no graph for G at all
                        fake = G(z, y_fake)
                    # One forward for both (D has no BatchNorm, so samples do not interact): one power iteration
                    # per D step. Outputs in float32 for the loss.
                    y_both = torch.cat([y_real, y_fake]) if K else None
                    d_real, d_fake = D_ddp(torch.cat([real, fake.to(real.dtype)]), y_both).float().chunk(2)
                loss_d = d_loss(d_real, d_fake, args.loss)
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()

            # G step: minimise -E[D(G(z, y), y)] (hinge, wasserstein) or softplus(-D(G(z, y), y)) (ns)
            # Through D itself, not D_ddp: D is frozen here, so no gradient of D is to be averaged over processes.
            D.requires_grad_(False)  # gradients flow through D to G; D's weight gradients are not needed
            for _ in range(args.n_gen):
                z = run.randn(g_batch, args.latent_dim)
                y_g = run.randint(K, g_batch) if K else None
                with run.autocast():
                    d_fake_g = D(G_ddp(z, y_g), y_g).float()
                loss_g = g_loss(d_fake_g, args.loss)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                if ema:
                    ema.update(G)
            D.requires_grad_(True)
            sched_g.step()
            sched_d.step()
            step += 1
            run.end_step(step, loss_d=loss_d, loss_g=loss_g, d_real=d_real.mean(), d_fake=d_fake.mean(),
                         lr_g=sched_g.get_last_lr()[0])
            if step % args.sample_every == 0 or step == 1:
                run.log(singular_values(D))  # now and then: one SVD per D layer, on the CPU
    run.log(singular_values(D))  # and at the end, after `with run` saved the last step's checkpoint
    return run.finish()


def generate(args):
    """--generate N: N samples (with balanced labels if conditional) from G, or its EMA if the run kept one."""
    def load(saved, state, device):
        k = state["data"]["num_classes"] if saved.conditional else 0
        G = build_generator(saved, state["data"]["channels"], k).to(device)
        G.load_state_dict(state["G"])
        if "G_ema" in state:
            ema = common.EMA(G, saved.ema, saved.latent_dim, k)
            ema.load_state_dict(state["G_ema"])
            G = ema.ready()
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
