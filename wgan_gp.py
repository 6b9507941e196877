"""WGAN-GP: Wasserstein GAN with gradient penalty (Gulrajani et al. 2017, arXiv:1704.00028).

    python wgan_gp.py --dataset fashion-mnist --max-minutes 10 --eval-every 250 --eval-samples 2000
    python wgan_gp.py --dataset cifar10 --arch resnet          # the paper's CIFAR-10 ResNet
    python wgan_gp.py --dataset mnist --arch mlp
    python wgan_gp.py --generate 1000 --checkpoint runs/<run>/checkpoint.pt

The critic D has no sigmoid and no BatchNorm (the penalty is per sample, and BatchNorm would
couple the samples of a batch; Sec. 4 of the paper); it minimises
    E[D(G(z))] - E[D(x)] + lambda * E[(||grad D(x_hat)||_2 - 1)^2],   x_hat = eps x + (1 - eps) G(z),
with one eps ~ U[0, 1] per sample (Algorithm 1). G minimises -E[D(G(z))]. The critic's
E[D(x)] - E[D(G(z))] estimates the Wasserstein distance (up to a constant) and is logged as
`w_estimate`; the paper shows it falls as the samples improve.

Writes into --out: args.json, metrics.jsonl, samples/step_*.png, progress.gif, losses.png
(losses, gradient penalty and gradient norm, the critic's estimate beside cls-FID), interpolation.png,
checkpoint.pt.
"""

import argparse
import math

import torch
import torch.nn as nn

import common

SCRIPT = "wgan_gp"


def parse_args(argv=None):
    p = common.ArgumentParser(prog=f"{SCRIPT}.py", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model and optimisation (defaults: Gulrajani et al. 2017, Algorithm 1)")
    m.add_argument("--arch", default="dcgan", choices=("dcgan", "resnet", "mlp"),
                   help="dcgan: DCGAN G and a critic without BatchNorm; resnet: the paper's CIFAR-10 ResNet "
                        "(sizes divisible by 8); mlp: 3 hidden layers of 512 (the paper's toy/MNIST MLP)")
    m.add_argument("--width", type=common.positive_int, default=64,
                   help="base channels (dcgan: G's last and D's first layer; resnet: 2x this in every block); "
                        "DIM = 64 in the authors' code, 128 channels in its ResNet; not used by mlp (512 units)")
    m.add_argument("--critic-norm", default="layer", choices=("layer", "none"),
                   help="normalisation in the dcgan critic: layer norm over (C, H, W) as the paper recommends "
                        "(Sec. 4), or none; never BatchNorm")
    m.add_argument("--latent-dim", type=common.positive_int, default=128, help="size of z ~ N(0, I); 128 in the authors' code")
    m.add_argument("--batch-size", type=common.positive_int, default=64, help="m = 64 in Algorithm 1")
    m.add_argument("--epochs", type=common.positive_int, default=100,
                   help="passes over the data seen by the critic (ours: the papers count generator iterations, "
                        "which --max-steps sets)")
    m.add_argument("--lr-g", type=common.positive_float, default=1e-4, help="G's Adam learning rate; alpha = 1e-4 in Algorithm 1")
    m.add_argument("--lr-d", type=common.positive_float, default=1e-4,
                   help="critic's Adam learning rate; alpha = 1e-4 in Algorithm 1")
    m.add_argument("--beta1", type=common.unit_float, default=0.0,
                   help="Adam beta1; 0 in Algorithm 1 (the authors' DCGAN/MNIST code used 0.5)")
    m.add_argument("--beta2", type=common.unit_float, default=0.9, help="Adam beta2; 0.9 in Algorithm 1")
    m.add_argument("--n-dis", type=common.positive_int, default=5, help="critic steps per G step; n_critic = 5 in Algorithm 1")
    m.add_argument("--n-gen", type=common.positive_int, default=1, help="G steps per iteration; 1 in Algorithm 1")
    m.add_argument("--gp-weight", type=common.nonneg_float, default=10.0, help="lambda, the penalty's weight; 10 in Algorithm 1")
    m.add_argument("--one-sided", action="store_true",
                   help="penalise only norms above 1, max(0, ||grad|| - 1)^2 (the paper's Sec. 4 alternative)")
    m.add_argument("--drift", type=common.nonneg_float, default=0.0,
                   help="weight of eps_drift * E[D(x)^2], which keeps the critic's output near 0 "
                        "(Karras et al. 2018 use 1e-3); 0 = off, as in the paper")
    common.add_common_args(p, SCRIPT)
    args = p.parse_args(argv)
    common.refuse_unused(p, args, {"width": args.arch != "mlp", "critic_norm": args.arch == "dcgan"}, f"--arch {args.arch}")
    return args


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------

class Generator(nn.Module):
    """dcgan.py's generator, unchanged (BatchNorm is fine in G: the penalty concerns only the critic).
    28 px: (2w,7,7) -> (w,14,14) -> (C,28,28); 64 px: (8w,4,4) -> ... -> (C,64,64)."""

    def __init__(self, latent_dim, channels, image_size, width=64):
        super().__init__()
        s0, n = common.conv_plan(image_size)
        ch = width * 2 ** (n - 1)
        layers = [nn.ConvTranspose2d(latent_dim, ch, s0, 1, 0, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]  # (ch, s0, s0)
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]  # 2x size
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1, bias=False), nn.Tanh()]  # (C, size, size)
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z.view(z.shape[0], -1, 1, 1))


class Critic(nn.Module):
    """dcgan.py's discriminator with an unbounded score and, deliberately, no BatchNorm (layer norm or none)
    and biases in every conv (no BatchNorm follows to absorb them): stride-2 convs, LeakyReLU(0.2)."""

    def __init__(self, channels, image_size, width=64, norm="layer"):
        super().__init__()
        s0, n = common.conv_plan(image_size)
        ch = width
        layers = [nn.Conv2d(channels, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]  # (w, size/2, size/2)
        for _ in range(n - 1):
            # GroupNorm with one group = layer norm over (C, H, W) with a per-channel affine: per sample, like the penalty
            norm_layer = nn.GroupNorm(1, ch * 2) if norm == "layer" else nn.Identity()
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1), norm_layer, nn.LeakyReLU(0.2, True)]  # (2ch, H/2, W/2)
            ch *= 2
        layers += [nn.Conv2d(ch, 1, s0, 1, 0)]  # (1, 1, 1): the critic's score
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).view(-1)


class UpBlock(nn.Module):
    """Pre-activation residual block that doubles H and W (the paper's CIFAR-10 ResNet, App. F)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.main = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Upsample(scale_factor=2),
                                  nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1))
        self.skip = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 1))

    def forward(self, x):
        return self.main(x) + self.skip(x)


class DownBlock(nn.Module):
    """Critic residual block, no normalisation; `first` applies no ReLU to the raw image."""

    def __init__(self, cin, cout, down=True, first=False):
        super().__init__()
        pool = [nn.AvgPool2d(2)] if down else []
        self.main = nn.Sequential(*([] if first else [nn.ReLU()]), nn.Conv2d(cin, cout, 3, 1, 1), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1), *pool)
        self.skip = nn.Sequential(*pool, nn.Conv2d(cin, cout, 1)) if down or cin != cout else nn.Identity()

    def forward(self, x):
        return self.main(x) + self.skip(x)


class ResNetGenerator(nn.Module):
    """z -> (2w, s/8, s/8) -> three up-blocks -> BN, ReLU, conv3x3, tanh. 32 px: 4 -> 8 -> 16 -> 32."""

    def __init__(self, latent_dim, channels, image_size, width=64):
        super().__init__()
        if image_size % 8:
            raise common.UsageError(f"--arch resnet cannot make {image_size}x{image_size} images: the size must be "
                                    f"divisible by 8 (e.g. 32, 48, 64)")
        ch, self.s0 = 2 * width, image_size // 8
        self.fc = nn.Linear(latent_dim, ch * self.s0 ** 2)
        self.blocks = nn.Sequential(UpBlock(ch, ch), UpBlock(ch, ch), UpBlock(ch, ch))
        self.out = nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU(), nn.Conv2d(ch, channels, 3, 1, 1), nn.Tanh())

    def forward(self, z):
        x = self.fc(z).view(z.shape[0], -1, self.s0, self.s0)
        return self.out(self.blocks(x))


class ResNetCritic(nn.Module):
    """Two down-blocks and two plain blocks of 2w channels, ReLU, global mean pool, linear."""

    def __init__(self, channels, image_size, width=64):
        super().__init__()
        ch = 2 * width
        self.blocks = nn.Sequential(DownBlock(channels, ch, first=True), DownBlock(ch, ch),
                                    DownBlock(ch, ch, down=False), DownBlock(ch, ch, down=False), nn.ReLU())
        self.fc = nn.Linear(ch, 1)

    def forward(self, x):
        return self.fc(self.blocks(x).mean((2, 3))).view(-1)


class MLPGenerator(nn.Module):
    """z -> 3 x (512, ReLU) -> pixels, tanh: the authors' MNIST MLP (no BatchNorm, unlike dcgan.py's MLP G)."""

    def __init__(self, latent_dim, channels, image_size, width=512):
        super().__init__()
        self.shape = (channels, image_size, image_size)
        self.net = nn.Sequential(nn.Linear(latent_dim, width), nn.ReLU(True), nn.Linear(width, width), nn.ReLU(True),
                                 nn.Linear(width, width), nn.ReLU(True), nn.Linear(width, math.prod(self.shape)), nn.Tanh())

    def forward(self, z):
        return self.net(z).view(z.shape[0], *self.shape)


class MLPCritic(nn.Module):
    """pixels -> 3 x (512, ReLU) -> score."""

    def __init__(self, channels, image_size, width=512):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * image_size ** 2, width), nn.ReLU(True),
                                 nn.Linear(width, width), nn.ReLU(True), nn.Linear(width, width), nn.ReLU(True),
                                 nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x).view(-1)


# Initialisation: PyTorch's default (Kaiming-uniform), deliberately not DCGAN's N(0, 0.02): the authors'
# WGAN-GP code initialises with He/Glorot-style uniform draws, which this is close to.
def build_generator(args, channels):
    if args.arch == "resnet":
        return ResNetGenerator(args.latent_dim, channels, args.image_size, args.width)
    if args.arch == "mlp":
        return MLPGenerator(args.latent_dim, channels, args.image_size)
    return Generator(args.latent_dim, channels, args.image_size, args.width)


def build_critic(args, channels):
    if args.arch == "resnet":
        return ResNetCritic(channels, args.image_size, args.width)
    if args.arch == "mlp":
        return MLPCritic(channels, args.image_size)
    return Critic(channels, args.image_size, args.width, args.critic_norm)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

def gradient_penalty(critic, real, fake, one_sided=False, eps=None):
    """E[(||grad_x_hat D(x_hat)||_2 - 1)^2] on x_hat = eps real + (1 - eps) fake (Algorithm 1, lines 4-7).

    Returns (penalty, per-sample gradient norms). eps ~ U[0, 1] is one number per sample (drawn here
    unless given as a vector), not per pixel, so x_hat lies on the straight line between a real and a
    fake image; the norm is taken over all non-batch dimensions (C, H, W) together; create_graph=True
    so that the penalty's own gradient reaches the critic's weights. Under DDP the double backward
    works because autograd.grad asks for the gradient of x_hat only: the weights' gradient hooks, which
    DDP's all-reduce hangs on, fire once, in the loss's backward.
    """
    if eps is None:
        eps = torch.rand(real.shape[0], device=real.device)
    eps = eps.view(-1, *([1] * (real.dim() - 1))).to(real.dtype)  # one per sample, broadcast over C, H, W
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    norm = grad.flatten(1).norm(2, dim=1)
    gap = (norm - 1).clamp(min=0) if one_sided else norm - 1
    return (gap ** 2).mean(), norm


def critic_loss(real_scores, fake_scores):
    """E[D(G(z))] - E[D(x)], the negative of the critic's Wasserstein estimate (Eq. 3, without the penalty)."""
    return fake_scores.mean() - real_scores.mean()


def generator_loss(fake_scores):
    """-E[D(G(z))] (Algorithm 1, line 11)."""
    return -fake_scores.mean()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_images(G, z):
    """Samples with G in eval mode (BatchNorm's running statistics), then back to train mode."""
    G.eval()
    x = torch.cat([G(chunk) for chunk in z.split(500)])
    G.train()
    return x


def train(args):
    run = common.Run(args, SCRIPT)  # --resume, device, precision and --out; seeds torch
    args, device = run.args, run.device
    build_generator(args, 1)  # an impossible size fails here, before the data is loaded
    data = common.load_dataset(args.dataset, args.data_root, args.image_size, device, **common.data_options(args))
    G = build_generator(args, data.channels).to(device, memory_format=run.memory_format)
    D = build_critic(args, data.channels).to(device, memory_format=run.memory_format)
    opt_g = torch.optim.Adam(G.parameters(), args.lr_g, betas=(args.beta1, args.beta2), fused=run.fused)
    opt_d = torch.optim.Adam(D.parameters(), args.lr_d, betas=(args.beta1, args.beta2), fused=run.fused)
    batches = run.restore(data, G=G, D=D, opt_g=opt_g, opt_d=opt_d)  # with --resume: their saved states
    G_ddp, D_ddp = run.distribute(G), run.distribute(D)  # under torchrun: DDP, gradients averaged; else G, D
    total = min(args.max_steps or math.inf, args.epochs * batches.per_epoch // args.n_dis)
    step = run.start(total, lambda z, y: sample_images(G, z), latent_dim=args.latent_dim, panels=[
        ("losses", ["loss_d", "loss_g"]),
        ("gradient penalty, mean ||grad D(x_hat)||", ["gp", "grad_norm"]),
        ("critic estimate E[D(x)] - E[D(G(z))] vs FID", ["w_estimate"], ["cls_fid", "fid"]),
    ])

    with run:
        while not run.should_stop(step):
            # Critic steps: minimise E[D(G(z))] - E[D(x)] + lambda * GP (+ drift * E[D(x)^2])  (Algorithm 1, lines 2-9)
            for _ in range(args.n_dis):
                real, _ = batches.next()
                z = run.randn(args.batch_size, args.latent_dim)  # under torchrun: this process's share
                with run.autocast():
                    with torch.no_grad():  # the critic's step must not update G: record no graph for G at all
                        fake = G(z)
                    # One forward for real and fake: the critic has no BatchNorm, so samples do not interact.
                    # Scores in float32: means of scores near 50 lose their last digits in bf16.
                    real_scores, fake_scores = D_ddp(torch.cat([real, fake.to(real.dtype)])).float().chunk(2)
                loss_w = critic_loss(real_scores, fake_scores)
                # The penalty differentiates through a gradient: kept in float32 even under autocast.
                gp, grad_norm = gradient_penalty(D_ddp, real, fake.float(), args.one_sided,
                                                 eps=run.rand(args.batch_size))  # torchrun: this process's share
                loss_d = loss_w + args.gp_weight * gp
                if args.drift:
                    loss_d = loss_d + args.drift * (real_scores ** 2).mean()
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()

            # G step: minimise -E[D(G(z))]  (Algorithm 1, line 11)
            # Through D itself, not D_ddp: D is frozen here, so no gradient of D is to be averaged over processes.
            D.requires_grad_(False)  # gradients flow through the critic, its weights need none
            for _ in range(args.n_gen):
                z = run.randn(args.batch_size, args.latent_dim)
                with run.autocast():
                    fake_scores_g = D(G_ddp(z)).float()
                loss_g = generator_loss(fake_scores_g)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
            D.requires_grad_(True)
            step += 1
            run.end_step(step, loss_d=loss_d, loss_g=loss_g, w_estimate=-loss_w, gp=gp, grad_norm=grad_norm.mean(),
                         d_real=real_scores.mean(), d_fake=fake_scores.mean())
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
