"""DCGAN (Radford, Metz & Chintala 2015, arXiv:1511.06434) and a fully connected GAN, one file.

    python dcgan.py --dataset fashion-mnist --max-minutes 5       # 28 px, CPU-friendly
    python dcgan.py --dataset celeba --image-size 64 --epochs 5   # the paper's 64 px stack
    python dcgan.py --dataset mnist --arch mlp                    # the MLP GAN of report 004 (README)
    python dcgan.py --generate 1000 --checkpoint runs/<run>/checkpoint.pt

Generator: a projection of z to s0 x s0, then stride-2 transposed convolutions with BatchNorm and
ReLU, tanh at the output. Discriminator: stride-2 convolutions with LeakyReLU(0.2) and BatchNorm
(none on its input layer), one logit out. N(0, 0.02) initialisation, Adam(2e-4, 0.5, 0.999),
the non-saturating loss. All as in the paper's Section 3 and 4.

Writes into --out: args.json, metrics.jsonl, samples/step_*.png (the same 64 z at every step),
progress.gif, losses.png (losses, D accuracy, D outputs, FID), interpolation.png, checkpoint.pt and,
for MNIST-like data, class_histogram.png and predictions.png (20 samples titled with the classifier's label).
The schedule of logging, sampling, checkpoints and evaluation, and the finish, are common.Run's.
"""

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "dcgan"


def parse_args(argv=None):
    p = common.ArgumentParser(prog=f"{SCRIPT}.py", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model and optimisation (defaults: Radford et al. 2015, Sec. 4)")
    m.add_argument("--arch", default="dcgan", choices=("dcgan", "mlp"),
                   help="dcgan: the paper's convolutional G and D; mlp: 3 hidden layers in G and in D (report 004's MLP GAN)")
    m.add_argument("--width", type=common.positive_int, default=64,
                   help="--arch dcgan: channels of G's last and D's first conv layer, doubling per layer "
                        "(ngf = ndf = 64 in the paper's code)")
    m.add_argument("--latent-dim", type=common.positive_int, default=100, help="size of z ~ N(0, I) (the paper: 100, uniform)")
    m.add_argument("--batch-size", type=common.positive_int, default=128, help="128 in the paper")
    m.add_argument("--epochs", type=common.positive_int, default=25, help="passes over the data (25 in pytorch/examples' DCGAN)")
    m.add_argument("--lr-g", type=common.positive_float, default=2e-4, help="G's Adam learning rate; 2e-4 in the paper")
    m.add_argument("--lr-d", type=common.positive_float, default=2e-4, help="D's Adam learning rate; 2e-4 in the paper")
    m.add_argument("--beta1", type=common.unit_float, default=0.5, help="Adam beta1; 0.5 in the paper (0.9 oscillated)")
    m.add_argument("--beta2", type=common.unit_float, default=0.999, help="Adam beta2; 0.999 (Adam's default) in the paper")
    m.add_argument("--n-dis", type=common.positive_int, default=1, help="D steps per iteration; 1 in the paper")
    m.add_argument("--n-gen", type=common.positive_int, default=1, help="G steps per iteration; 1 in the paper")
    m.add_argument("--d-dropout", type=common.unit_float, default=0.0,
                   help="dropout after each of D's LeakyReLUs; 0 in the paper (report 001 tries 0.3 and 0.7)")
    common.add_common_args(p, SCRIPT)
    args = p.parse_args(argv)
    common.refuse_unused(p, args, {"width": args.arch == "dcgan"}, f"--arch {args.arch}")
    return args


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------

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


class Generator(nn.Module):
    """z -> image. For 64 px and width w: (8w,4,4) -> (4w,8,8) -> (2w,16,16) -> (w,32,32) -> (C,64,64);
    for 28 px: (2w,7,7) -> (w,14,14) -> (C,28,28)."""

    def __init__(self, latent_dim, channels, image_size, width=64):
        super().__init__()
        s0, n = common.conv_plan(image_size)
        ch = width * 2 ** (n - 1)
        layers = [nn.ConvTranspose2d(latent_dim, ch, s0, 1, 0, bias=False),  # (ch, s0, s0): the "project and reshape"
                  nn.BatchNorm2d(ch), nn.ReLU(True)]
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),  # (ch/2, 2H, 2W)
                       nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        # (C, size, size); no BN at the output. No bias either, as in the DCGAN authors' G, although no BN follows:
        # D's rule for biases below comes from a D that won without them; a bias here has not been measured.
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z.view(z.shape[0], -1, 1, 1))


class Discriminator(nn.Module):
    """image -> one logit. The mirror of G: (w, size/2) -> (2w, size/4) -> ... -> (top, s0, s0) -> (1,1,1)."""

    def __init__(self, channels, image_size, width=64, dropout=0.0):
        super().__init__()
        s0, n = common.conv_plan(image_size)
        drop = [nn.Dropout(dropout)] if dropout > 0 else []
        ch = width
        # A bias is redundant only where a BatchNorm follows (its mean subtraction removes it): so the first conv
        # and the output keep theirs. Without them the cgan projection recipe collapsed at seed 0 on MNIST (D's loss
        # 3e-7, every sample one blob; docs/seeds.md). A deviation: the DCGAN authors' D has no biases in these layers.
        layers = [nn.Conv2d(channels, ch, 4, 2, 1),  # (w, size/2, size/2); no BN on the input layer (Sec. 3)
                  nn.LeakyReLU(0.2, True), *drop]
        for _ in range(n - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False),  # (2ch, H/2, W/2); BN absorbs a bias
                       nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2, True), *drop]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, s0, 1, 0)]  # (1, 1, 1): a logit, no sigmoid (the loss takes logits)
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).view(-1)


class MLPGenerator(nn.Module):
    """z -> 256 -> 512 -> 1024 -> C*H*W, LeakyReLU(0.2) and BatchNorm in the hidden layers."""

    def __init__(self, latent_dim, channels, image_size):
        super().__init__()
        self.shape = (channels, image_size, image_size)
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 256), nn.LeakyReLU(0.2, True),
            nn.Linear(256, 512), nn.BatchNorm1d(512), nn.LeakyReLU(0.2, True),  # BatchNorm1d(512): eps stays 1e-5
            nn.Linear(512, 1024), nn.BatchNorm1d(1024), nn.LeakyReLU(0.2, True),
            nn.Linear(1024, math.prod(self.shape)), nn.Tanh(),
        )

    def forward(self, z):
        return self.net(z).view(z.shape[0], *self.shape)


class MLPDiscriminator(nn.Module):
    """C*H*W -> 512 -> 256 -> 1 logit, LeakyReLU(0.2), optional dropout."""

    def __init__(self, channels, image_size, dropout=0.0):
        super().__init__()
        drop = [nn.Dropout(dropout)] if dropout > 0 else []
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * image_size ** 2, 512), nn.LeakyReLU(0.2, True), *drop,
            nn.Linear(512, 256), nn.LeakyReLU(0.2, True), *drop,
            nn.Linear(256, 1),
        )

    def forward(self, x):
        return self.net(x).view(-1)


def build_generator(args, channels):
    if args.arch == "mlp":
        G = MLPGenerator(args.latent_dim, channels, args.image_size)
    else:
        G = Generator(args.latent_dim, channels, args.image_size, args.width)
    return G.apply(init_weights)


def build_discriminator(args, channels):
    if args.arch == "mlp":
        D = MLPDiscriminator(channels, args.image_size, args.d_dropout)
    else:
        D = Discriminator(channels, args.image_size, args.width, args.d_dropout)
    return D.apply(init_weights)


# ----------------------------------------------------------------------------------------------
# Losses, from logits: log sigmoid(l) = -softplus(-l) and log(1 - sigmoid(l)) = -softplus(l), exact and stable
# ----------------------------------------------------------------------------------------------

def d_loss(real_logits, fake_logits):
    """D maximises log D(x) + log(1 - D(G(z)))  (Goodfellow et al. 2014, Eq. 1)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(fake_logits):
    """Non-saturating: G maximises log D(G(z)) instead of minimising log(1 - D(G(z))) (Goodfellow et al. 2014, Sec. 3)."""
    return F.softplus(-fake_logits).mean()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_images(G, z):
    """Samples in eval mode (BatchNorm uses its running statistics, not the batch's), then back to train."""
    G.eval()
    x = torch.cat([G(chunk) for chunk in z.split(500)])
    G.train()
    return x


def train(args):
    run = common.Run(args, SCRIPT)  # --resume, device, precision and --out; seeds torch
    args, device = run.args, run.device
    if args.arch == "dcgan":
        common.conv_plan(args.image_size)  # a size the stack cannot make fails before the data is loaded
    data = common.load_dataset(args.dataset, args.data_root, args.image_size, device, **common.data_options(args))
    G = build_generator(args, data.channels).to(device, memory_format=run.memory_format)
    D = build_discriminator(args, data.channels).to(device, memory_format=run.memory_format)
    opt_g = torch.optim.Adam(G.parameters(), args.lr_g, betas=(args.beta1, args.beta2), fused=run.fused)
    opt_d = torch.optim.Adam(D.parameters(), args.lr_d, betas=(args.beta1, args.beta2), fused=run.fused)
    batches = run.restore(data, G=G, D=D, opt_g=opt_g, opt_d=opt_d)  # with --resume: their saved states
    G_ddp, D_ddp = run.distribute(G), run.distribute(D)  # under torchrun: DDP, gradients averaged; else G, D
    total = min(args.max_steps or math.inf, args.epochs * batches.per_epoch // args.n_dis)
    step = run.start(total, lambda z, y: sample_images(G, z), latent_dim=args.latent_dim,
                     d_loss_floor=0, panels=[  # D's cross-entropy >= 0: Run says when D has won
        ("losses", ["loss_d", "loss_g"]),
        ("D accuracy (0.5 = fooled)", ["acc_real", "acc_fake"]),
        ("D output sigmoid(D(.))", ["p_real", "p_fake"]),
        ("FID (lower is better)", ["cls_fid", "fid"]),
    ])

    with run:
        while not run.should_stop(step):
            # D step: minimise softplus(-D(x)) + softplus(D(G(z)))  (Goodfellow et al. 2014, Eq. 1)
            for _ in range(args.n_dis):
                real, _ = batches.next()
                z = run.randn(args.batch_size, args.latent_dim)  # under torchrun: this process's share
                with run.autocast():
                    with torch.no_grad():  # D's step must not push gradients into G: record no graph for G at all
                        fake = G(z)
                    # Two forwards (BatchNorm sees all-real and all-fake batches, as the paper's); loss in float32
                    real_logits, fake_logits = D_ddp(real).float(), D_ddp(fake).float()
                loss_d = d_loss(real_logits, fake_logits)
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()

            # G step: minimise softplus(-D(G(z))), the non-saturating loss (Goodfellow et al. 2014, Sec. 3)
            # Through D itself, not D_ddp: D is frozen here, so no gradient of D is to be averaged over processes.
            D.requires_grad_(False)  # gradients flow through D to G, but D's own weight gradients are not needed
            for _ in range(args.n_gen):
                z = run.randn(args.batch_size, args.latent_dim)
                with run.autocast():
                    fake_logits_g = D(G_ddp(z)).float()
                loss_g = g_loss(fake_logits_g)
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
    """--generate N: load G from --checkpoint and write N samples; needs no dataset."""
    def load(saved, state, device):
        G = build_generator(saved, state["data"]["channels"]).to(device)
        G.load_state_dict(state["G"])
        return lambda z, y: sample_images(G, z)
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
