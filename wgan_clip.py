"""WGAN with weight clipping (Arjovsky, Chintala & Bottou 2017, arXiv:1701.07875).

    python wgan_clip.py --dataset fashion-mnist --max-minutes 10 --eval-every 250 --eval-samples 2000
    python wgan_clip.py --dataset celeba --image-size 64
    python wgan_clip.py --dataset mnist --arch mlp
    python wgan_clip.py --generate 1000 --checkpoint runs/<run>/checkpoint.pt

The critic D has no sigmoid; it maximises E[D(x)] - E[D(G(z))], an estimate of the Wasserstein
distance up to a constant, as long as D stays K-Lipschitz. Clipping every critic weight to
[-c, c] after each critic step keeps it so (crudely: Sec. 3 of the paper). G minimises
-E[D(G(z))]. The logged `w_estimate` is the critic's E[D(x)] - E[D(G(z))]; the paper's Figures 3-4
show it falls as the samples improve. RMSProp, not Adam, because momentum made training
unstable (Sec. 4).

Writes into --out: args.json, metrics.jsonl, samples/step_*.png, progress.gif, losses.png
(losses, share of weights at the clip bound, the critic's estimate beside cls-FID),
interpolation.png, checkpoint.pt.
"""

import argparse
import math

import torch
import torch.nn as nn

import common

SCRIPT = "wgan_clip"


def parse_args(argv=None):
    p = common.ArgumentParser(prog=f"{SCRIPT}.py", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model and optimisation (defaults: Arjovsky et al. 2017, Algorithm 1)")
    m.add_argument("--arch", default="dcgan", choices=("dcgan", "mlp"),
                   help="dcgan: DCGAN G and critic; mlp: 3 hidden layers of 512 in G and critic (the authors' code; "
                        "the paper's Sec. 4.3 text says 4)")
    m.add_argument("--width", type=common.positive_int, default=64,
                   help="--arch dcgan: channels of G's last and the critic's first conv layer (64 in the authors' code)")
    m.add_argument("--critic-norm", default="batch", choices=("batch", "none"),
                   help="normalisation in the dcgan critic: BatchNorm as in the authors' code, or none (the Sec. 4.3 "
                        "ablations); wgan_gp.py's flag of the same name offers layer|none")
    m.add_argument("--latent-dim", type=common.positive_int, default=100, help="size of z ~ N(0, I); 100 in the authors' code")
    m.add_argument("--batch-size", type=common.positive_int, default=64, help="m = 64 in Algorithm 1")
    m.add_argument("--epochs", type=common.positive_int, default=100,
                   help="passes over the data seen by the critic (ours: the papers count generator iterations, "
                        "which --max-steps sets)")
    m.add_argument("--optimizer", default="rmsprop", choices=("rmsprop", "adam"),
                   help="RMSProp as in Algorithm 1 (Adam with momentum was unstable, Sec. 4); adam uses --beta1/--beta2")
    m.add_argument("--lr-g", type=common.positive_float, default=5e-5, help="G's learning rate; alpha = 5e-5 in Algorithm 1")
    m.add_argument("--lr-d", type=common.positive_float, default=5e-5, help="critic's learning rate; alpha = 5e-5 in Algorithm 1")
    m.add_argument("--beta1", type=common.unit_float, default=0.5, help="Adam beta1, with --optimizer adam only")
    m.add_argument("--beta2", type=common.unit_float, default=0.999, help="Adam beta2, with --optimizer adam only")
    m.add_argument("--n-dis", type=common.positive_int, default=5, help="critic steps per G step; n_critic = 5 in Algorithm 1")
    m.add_argument("--n-gen", type=common.positive_int, default=1, help="G steps per iteration; 1 in Algorithm 1")
    m.add_argument("--clip", type=common.positive_float, default=0.01,
                   help="clip critic weights to [-c, c]; c = 0.01 in Algorithm 1")
    m.add_argument("--warmup-critic", default="on", choices=("on", "off"),
                   help="the authors' schedule: 100 critic steps per G step for the first 25 G steps and every "
                        "500th, to train the critic near optimality when G changes most; off = always --n-dis")
    common.add_common_args(p, SCRIPT)
    args = p.parse_args(argv)
    common.refuse_unused(p, args, {"width": args.arch == "dcgan", "critic_norm": args.arch == "dcgan"}, f"--arch {args.arch}")
    common.refuse_unused(p, args, {"beta1": args.optimizer == "adam", "beta2": args.optimizer == "adam"},
                         f"--optimizer {args.optimizer}")
    return args


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------

class Generator(nn.Module):
    """dcgan.py's generator, unchanged. 28 px: (2w,7,7) -> (w,14,14) -> (C,28,28); 64 px: (8w,4,4) -> ... -> (C,64,64)."""

    def __init__(self, latent_dim, channels, image_size, width=64):
        super().__init__()
        s0, n = common.conv_plan(image_size)
        ch = width * 2 ** (n - 1)
        layers = [nn.ConvTranspose2d(latent_dim, ch, s0, 1, 0, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]  # (ch, s0, s0)
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]  # 2x size
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1, bias=False), nn.Tanh()]  # (C, size, size); no bias: dcgan.py
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z.view(z.shape[0], -1, 1, 1))


class Critic(nn.Module):
    """dcgan.py's discriminator with an unbounded score (no sigmoid) and BatchNorm that --critic-norm none turns off:
    stride-2 convs, LeakyReLU(0.2)."""

    def __init__(self, channels, image_size, width=64, batchnorm=True):
        super().__init__()
        s0, n = common.conv_plan(image_size)
        ch = width
        # Biases as dcgan.py's D: only where no BatchNorm follows (the first conv, the score, and every conv with
        # --critic-norm none); clipping bounds them as it bounds the weights.
        layers = [nn.Conv2d(channels, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]  # (w, size/2, size/2)
        for _ in range(n - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=not batchnorm),  # (2ch, H/2, W/2)
                       nn.BatchNorm2d(ch * 2) if batchnorm else nn.Identity(), nn.LeakyReLU(0.2, True)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, s0, 1, 0)]  # (1, 1, 1): the critic's score, no sigmoid
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).view(-1)


class MLPGenerator(nn.Module):
    """z -> 3 x (512, ReLU) -> pixels, tanh: the MLP of the authors' code (the paper's Sec. 4.3 says 4 layers);
    no BatchNorm, unlike dcgan.py's MLP G."""

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


# The MLPs get N(0, 0.02) too, like dcgan.py's: a deliberate difference from the authors' code (whose init matched
# only conv and BatchNorm layers, leaving Linear at torch's default) and from wgan_gp.py's MLP (torch's default).
def build_generator(args, channels):
    if args.arch == "mlp":
        return MLPGenerator(args.latent_dim, channels, args.image_size).apply(init_weights)
    return Generator(args.latent_dim, channels, args.image_size, args.width).apply(init_weights)


def build_critic(args, channels):
    if args.arch == "mlp":
        return MLPCritic(channels, args.image_size).apply(init_weights)
    return Critic(channels, args.image_size, args.width, args.critic_norm == "batch").apply(init_weights)


# ----------------------------------------------------------------------------------------------
# Losses and the Lipschitz constraint
# ----------------------------------------------------------------------------------------------

def critic_loss(real_scores, fake_scores):
    """E[D(G(z))] - E[D(x)]: minimising it maximises the critic's Wasserstein estimate (Algorithm 1, line 6)."""
    return fake_scores.mean() - real_scores.mean()


def generator_loss(fake_scores):
    """-E[D(G(z))] (Algorithm 1, line 10)."""
    return -fake_scores.mean()


@torch.no_grad()
def clip_weights(critic, c):
    """w <- clip(w, -c, c) for every critic parameter (Algorithm 1, line 7). BatchNorm's scale and
    shift are parameters too and are clipped, as in the authors' code; running statistics are buffers."""
    for p in critic.parameters():
        p.clamp_(-c, c)


@torch.no_grad()
def share_at_bound(critic, c):
    """Share of critic weights sitting at +-c: near 1, the critic is a crude, nearly binary function."""
    n_at = sum((p.abs() >= c * (1 - 1e-6)).sum() for p in critic.parameters())
    return n_at / sum(p.numel() for p in critic.parameters())


def critic_steps(g_step, n_dis, warmup):
    """Critic steps before G step `g_step` (0-based): 100 early on and every 500th, as the authors' code does."""
    if warmup and (g_step < 25 or g_step % 500 == 0):
        return 100
    return n_dis


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


def make_optimizer(args, params, lr, fused=False):
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr, betas=(args.beta1, args.beta2), fused=fused)
    return torch.optim.RMSprop(params, lr)


def train(args):
    run = common.Run(args, SCRIPT)  # --resume, device, precision and --out; seeds torch
    args, device = run.args, run.device
    build_generator(args, 1)  # an impossible size fails here, before the data is loaded
    data = common.load_dataset(args.dataset, args.data_root, args.image_size, device, **common.data_options(args))
    G = build_generator(args, data.channels).to(device, memory_format=run.memory_format)
    D = build_critic(args, data.channels).to(device, memory_format=run.memory_format)
    clip_weights(D, args.clip)  # start inside the constraint set
    opt_g = make_optimizer(args, G.parameters(), args.lr_g, run.fused)
    opt_d = make_optimizer(args, D.parameters(), args.lr_d, run.fused)
    batches = run.restore(data, G=G, D=D, opt_g=opt_g, opt_d=opt_d)  # with --resume: their saved states
    G_ddp, D_ddp = run.distribute(G), run.distribute(D)  # under torchrun: DDP, gradients averaged; else G, D
    warmup = args.warmup_critic == "on"
    # --epochs counts critic batches at n_dis per G step; the warm-up's extra critic steps come on top.
    total = min(args.max_steps or math.inf, args.epochs * batches.per_epoch // args.n_dis)
    step = run.start(total, lambda z, y: sample_images(G, z), latent_dim=args.latent_dim, panels=[
        ("losses", ["loss_d", "loss_g"]),
        ("share of critic weights at +-clip", ["clip_share"]),
        ("critic estimate E[D(x)] - E[D(G(z))] vs FID", ["w_estimate"], ["cls_fid", "fid"]),
    ])

    with run:
        while not run.should_stop(step):
            # Critic steps: minimise E[D(G(z))] - E[D(x)], then clip the weights  (Algorithm 1, lines 2-8)
            for _ in range(critic_steps(step, args.n_dis, warmup)):
                real, _ = batches.next()
                z = run.randn(args.batch_size, args.latent_dim)  # under torchrun: this process's share
                with run.autocast():
                    with torch.no_grad():  # the critic's step must not update G: record no graph for G at all
                        fake = G(z)
                    # Scores in float32: means of scores near 50 lose their last digits in bf16. Two forwards,
                    # not one: the critic's BatchNorm would otherwise mix real and fake statistics.
                    real_scores, fake_scores = D_ddp(real).float(), D_ddp(fake).float()
                loss_d = critic_loss(real_scores, fake_scores)
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                clip_weights(D, args.clip)

            # G step: minimise -E[D(G(z))]  (Algorithm 1, line 10)
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
            stats = dict(loss_d=loss_d, loss_g=loss_g, w_estimate=-loss_d, d_real=real_scores.mean(), d_fake=fake_scores.mean())
            if step % args.log_every == 0:  # a walk over every weight: only when a line is written
                stats["clip_share"] = share_at_bound(D, args.clip)
            run.end_step(step, **stats)
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
