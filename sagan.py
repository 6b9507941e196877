"""SAGAN: self-attention GAN (Zhang, Goodfellow, Metaxas & Odena 2019, arXiv:1805.08318), with spectral norm in G
and D, the hinge loss, two learning rates (TTUR), and conditional BatchNorm + projection D for the class-conditional case.

    python sagan.py --dataset cifar10                                   # 32 px, attention at 16x16 in G and D
    python sagan.py --dataset folder --data-root imgs --image-size 128  # 128 px, at 32x32 (the paper's best, Table 1)
    python sagan.py --dataset cifar10 --conditional --attn-res 8 16     # conditional, two attention blocks each
    python sagan.py --dataset fashion-mnist --width 16 --batch-size 32 --max-minutes 4                 # a CPU setting
    python sagan.py --dataset fashion-mnist --width 16 --batch-size 32 --max-minutes 4 --no-attention
    python sagan.py --generate 1000 --checkpoint runs/<run>/checkpoint.pt

A self-attention block (the authors' code, non_local.py) lets every position of a feature map x (C channels) read
every other: q = W_q x, k = maxpool2(W_k x) (C/8 channels), v = maxpool2(W_v x) (C/2), beta_ij = softmax_j(q_i . k_j)
over the key positions j, o_i = W_o sum_j beta_ij v_j (C/2 -> C), and y = x + gamma * o with a learned scalar gamma
initialised to 0: training starts from the plain ResNet and lets gamma grow where attention helps. The 2x2 max-pool
of keys and values (4x less compute) is the code's, not the paper's. --attn-res R puts one block after the layer that
outputs R x R in G and after the first block that outputs R x R in D. Every conv and linear weight of G and D (the
attention's 1x1 convs, D's class embedding) is divided by its largest singular value (Sec. 4.1: SN in G too);
hinge loss, Adam with G 1e-4 / D 4e-4 (TTUR, Sec. 4.2), one D step per G step.

Writes into --out: args.json, metrics.jsonl (losses, D outputs, gamma_g0.. / gamma_d0.. of every attention block),
samples/step_*.png (one row per class with --conditional), progress.gif, losses.png (losses, D outputs, gamma over
training, FID/IS), attention.png (a few generated images; for three query positions, the attention weights of each
block of G and D drawn over the image; every --sample-every steps and at the end), interpolation.png,
class_histogram.png and predictions.png (MNIST-like data), checkpoint.pt.
"""

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "sagan"


def parse_args(argv=None):
    p = common.ArgumentParser(prog=f"{SCRIPT}.py", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model and optimisation (defaults: Zhang et al. 2019 and the authors' code)")
    m.add_argument("--attn-res", type=common.positive_int, nargs="+", default=None, metavar="R",
                   help="feature-map size(s) R (R x R) where a self-attention block sits in G and in D; default: the "
                        "largest size both networks have, up to 32: 32 at 64 and 128 px (the paper's best at 128 px, "
                        "Table 1), 24 at 48 px, 16 at 32 px (as CIFAR-10 reproductions), 14 at 28 px")
    m.add_argument("--no-attention", action="store_true",
                   help="the same networks without attention blocks (the with/without comparison of report 001)")
    m.add_argument("--width", type=common.positive_int, default=64,
                   help="base channels w (the paper's counts at w = 64): up to 32 px the CIFAR-10 ResNets of SNGAN "
                        "(G 4w, D 2w); larger: G 16w (capped) halving to w, D w doubling to 16w (the paper's "
                        "ImageNet nets at 128 px)")
    m.add_argument("--conditional", action="store_true",
                   help="class-conditional: conditional BatchNorm in G, projection D (the authors' ImageNet model)")
    m.add_argument("--latent-dim", type=common.positive_int, default=128, help="size of z ~ N(0, I); 128 in the authors' code")
    m.add_argument("--batch-size", type=common.positive_int, default=64,
                   help="images per D step and per G step; 64, as CIFAR-10 reproductions (the paper's ImageNet runs: "
                        "256 over several GPUs)")
    m.add_argument("--epochs", type=common.positive_int, default=100,
                   help="passes over the data seen by D; 100 = 78k steps on CIFAR-10 at batch 64 (not the paper's "
                        "length: its ImageNet runs are far longer; set --epochs or --max-steps)")
    m.add_argument("--lr-g", type=common.positive_float, default=1e-4, help="G's Adam learning rate; 1e-4 (TTUR, Sec. 4.2)")
    m.add_argument("--lr-d", type=common.positive_float, default=4e-4, help="D's Adam learning rate; 4e-4 (TTUR, Sec. 4.2)")
    m.add_argument("--beta1", type=common.unit_float, default=0.0, help="Adam beta1; 0 in the paper and the authors' code")
    m.add_argument("--beta2", type=common.unit_float, default=0.9,
                   help="Adam beta2; 0.9 in the paper (the authors' code left TensorFlow's 0.999: --beta2 0.999)")
    m.add_argument("--n-dis", type=common.positive_int, default=1, help="D steps per G step; 1 (Sec. 4.2, with TTUR)")
    m.add_argument("--n-gen", type=common.positive_int, default=1, help="G steps per iteration; 1")
    m.add_argument("--sn-iters", type=common.positive_int, default=1, help="power iterations per forward; 1 in the paper")
    m.add_argument("--ema", type=common.open_unit_float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of G's weights with this decay (e.g. 0.999) and use it "
                        "for samples, evaluation and --generate; off by default, as in the paper")
    common.add_common_args(p, SCRIPT)
    args = p.parse_args(argv)
    common.refuse_unused(p, args, {"attn_res": not args.no_attention}, "--no-attention")
    return args


# ----------------------------------------------------------------------------------------------
# Networks: sngan.py's ResNets, copied with the changes SAGAN makes (each marked "differs from sngan.py"),
# and the self-attention block. Spectral norm on every conv and linear weight of both (build_*).
# ----------------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    """y = x + gamma * W_o(sum_j softmax_j(q_i . k_j) v_j) (Zhang et al. 2019, Eqs. 1-3; the authors'
    sn_non_local_block_sim): 1x1 convs without bias to q, k (C/8 channels) and v (C/2), keys and values max-pooled
    2x2, one softmax over the key positions per query, a 1x1 conv C/2 -> C, gamma a learned scalar starting at 0.

    Any size: a side of odd length pools its last row or column on its own (ceil mode; 7x7 -> 4x4 keys), where the
    authors' TF pool would drop it. With `keep` set (figures only), the last weights are stored in `weights` as
    (B, H*W queries, hk*wk keys) with the query and key grids; during training nothing is stored."""

    def __init__(self, channels):
        super().__init__()
        ck, cv = max(1, channels // 8), max(1, channels // 2)  # max(1, .): tiny --width keeps one channel
        self.query, self.key = nn.Conv2d(channels, ck, 1, bias=False), nn.Conv2d(channels, ck, 1, bias=False)
        self.value, self.out = nn.Conv2d(channels, cv, 1, bias=False), nn.Conv2d(cv, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))  # 0: the block starts as the identity (the paper, Eq. 3)
        self.keep, self.weights = False, None

    def forward(self, x):
        B, _, H, W = x.shape
        q = self.query(x).flatten(2)                                      # (B, C/8, H*W)
        k = F.max_pool2d(self.key(x), 2, ceil_mode=True)                  # (B, C/8, hk, wk)
        v = F.max_pool2d(self.value(x), 2, ceil_mode=True).flatten(2)     # (B, C/2, hk*wk)
        hk, wk = k.shape[-2:]
        # Logits and softmax in float32, outside autocast: a logit is a sum over C/8 products, and bf16 keeps 8
        # significant bits, so a logit of 20 would be rounded by up to 0.06 (exp: 6%), and the peaks of the
        # weights (what attention is for) would move by that much. The value product may run in bf16.
        with torch.autocast(x.device.type, enabled=False):
            beta = torch.bmm(q.float().transpose(1, 2), k.flatten(2).float()).softmax(-1)  # (B, H*W, hk*wk)
        if self.keep:
            self.weights = (beta.detach(), (H, W), (hk, wk))
        o = torch.bmm(beta.to(v.dtype), v.transpose(1, 2))              # (B, H*W, C/2)
        o = o.view(B, H, W, -1).permute(0, 3, 1, 2)                       # (B, C/2, H, W), channels-last in memory
        if not x.is_contiguous(memory_format=torch.channels_last):  # MPS: the layout of the rest of the network
            o = o.contiguous()
        return x + self.gamma * self.out(o)


class CondBatchNorm2d(nn.Module):
    """BatchNorm without its own affine, then a per-class scale and shift: gamma_y * x_hat + beta_y
    (Miyato & Koyama 2018, Sec. 4; de Vries et al. 2017). Unconditional (num_classes 0): plain BatchNorm2d.
    Copied from sngan.py unchanged (the authors' ConditionalBatchNorm: gamma 1, beta 0, no SN on them)."""

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
    """Residual up-block of G: BN, ReLU, up, conv3, BN, ReLU, conv3; shortcut up, conv1x1 (the authors' block).
    Differs from sngan.py: pre-activation only (no --g-block postact); its convs are spectrally normalised."""

    def __init__(self, cin, cout, num_classes=0):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, 1, 1), nn.Conv2d(cout, cout, 3, 1, 1)
        self.bn1, self.bn2 = CondBatchNorm2d(cin, num_classes), CondBatchNorm2d(cout, num_classes)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x, y=None):
        h = self.conv1(F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2, mode="nearest"))
        h = self.conv2(F.relu(self.bn2(h, y)))
        return h + self.skip(F.interpolate(x, scale_factor=2, mode="nearest"))


class DBlock(nn.Module):
    """Residual block of D: ReLU, conv3, ReLU, conv3, [avg-pool 2]; shortcut conv1x1, [avg-pool]. `first` (the
    optimised block): no ReLU on the raw image, shortcut pools first."""

    def __init__(self, cin, cout, down=True, first=False):
        super().__init__()
        self.down, self.first = down, first
        # differs from sngan.py (hidden = cin there, as SNGAN's Chainer code): SAGAN's code widens in conv1
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, 1, 1), nn.Conv2d(cout, cout, 3, 1, 1)
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
    """(s0, G's channels from s0 up, D's channels from the input down). <= 32 px: SNGAN's CIFAR-10 nets, G 4w in
    every block, D 2w (as sngan.py). Larger: G 16w (capped) halving to w; D w doubling, capped at 16w. 128 px:
    G 16w (4), 16w (8), 8w (16), 4w (32), 2w (64), w (128); D w (64), 2w (32), 4w (16), 8w (8), 16w (4), 16w (4):
    the authors' ImageNet networks."""
    s0, n = common.conv_plan(image_size, "sagan.py's ResNet", smallest=4)
    if image_size <= 32:
        return s0, [4 * width] * (n + 1), [2 * width] * (n + 1)
    g = [width * min(2 ** (n - i), 16) for i in range(n + 1)]
    d = [width * min(2 ** i, 16) for i in range(n + 1)]  # differs from sngan.py: D stops pooling at s0 (next function)
    return s0, g, d


def feature_sizes(image_size):
    """(sizes of G's feature maps: after the linear layer, then after each block; sizes after D's blocks)."""
    s0, n = common.conv_plan(image_size, "sagan.py's ResNet", smallest=4)
    g = [s0 * 2 ** i for i in range(n + 1)]
    if image_size <= 32:  # CIFAR-10's D: down twice, then two blocks at that size
        d = [image_size // 2, image_size // 4]
    else:  # down to s0, then one block at s0
        d = [image_size // 2 ** i for i in range(1, n + 1)]
    return g, d


def attention_sizes(image_size, asked=None, off=False):
    """The sizes where attention blocks go: [] with --no-attention; the asked ones if both networks have them (else a
    UsageError that names the sizes they have); by default the largest size both have, up to 32."""
    if off:
        return []
    g, d = feature_sizes(image_size)
    both = sorted(set(g) & set(d))
    if asked is None:
        return [max(r for r in both if r <= 32)]
    bad = sorted(set(asked) - set(both))
    if bad:
        raise common.UsageError(
            f"--attn-res {' '.join(map(str, bad))}: at {image_size} px G's feature maps are {', '.join(map(str, g))} "
            f"and D's {', '.join(map(str, sorted(d)))}; attention sits where both have one: {', '.join(map(str, both))}")
    return sorted(set(asked))


class Generator(nn.Module):
    """z -> linear -> (c0, s0, s0) -> n up-blocks -> BN, ReLU, conv3x3, tanh, with a SelfAttention after the layer
    that outputs each size in `attn_sizes`. 128 px (w = 64), attention at 32: (1024, 4, 4) -> (1024, 8, 8) ->
    (512, 16, 16) -> (256, 32, 32) -> attention -> (128, 64, 64) -> (64, 128, 128) -> (3, 128, 128), the authors'
    generator_test. 32 px: (256, 4, 4) -> (256, 8, 8) -> (256, 16, 16) -> attention -> (256, 32, 32) -> (C, 32, 32)."""

    def __init__(self, latent_dim, channels, image_size, width=64, num_classes=0, attn_sizes=()):
        super().__init__()
        self.s0, ch, _ = resnet_channels(image_size, width)
        self.fc = nn.Linear(latent_dim, ch[0] * self.s0 ** 2)
        layers = [SelfAttention(ch[0])] if self.s0 in attn_sizes else []  # attention on the linear layer's map
        for i, (a, b) in enumerate(zip(ch, ch[1:])):
            layers.append(GBlock(a, b, num_classes))                        # (b, s0 * 2^(i+1), s0 * 2^(i+1))
            if self.s0 * 2 ** (i + 1) in attn_sizes:
                layers.append(SelfAttention(b))
        self.blocks = nn.ModuleList(layers)
        self.bn = CondBatchNorm2d(ch[-1])  # plain, as the authors' code: the class enters through the blocks
        self.out = nn.Conv2d(ch[-1], channels, 3, 1, 1)

    def forward(self, z, y=None):
        h = self.fc(z).view(z.shape[0], -1, self.s0, self.s0)
        for layer in self.blocks:
            h = layer(h, y) if isinstance(layer, GBlock) else layer(h)
        return torch.tanh(self.out(F.relu(self.bn(h))))


class Discriminator(nn.Module):
    """x -> first block -> down-blocks -> [one or two blocks without pooling] -> ReLU, sum over space = phi(x) ->
    linear (+ <embed(y), phi(x)>), with a SelfAttention after the first block that outputs each size in `attn_sizes`.
    128 px (w = 64), attention at 32: (64, 64, 64) -> (128, 32, 32) -> attention -> (256, 16, 16) -> (512, 8, 8) ->
    (1024, 4, 4) -> (1024, 4, 4), the authors' discriminator_test. 32 px: (128, 16, 16) -> attention -> (128, 8, 8)
    -> (128, 8, 8) -> (128, 8, 8), SNGAN's CIFAR-10 D."""

    def __init__(self, channels, image_size, width=64, num_classes=0, attn_sizes=()):
        super().__init__()
        _, n = common.conv_plan(image_size, "sagan.py's ResNet", smallest=4)
        _, _, ch = resnet_channels(image_size, width)
        if image_size <= 32:  # CIFAR-10's D: down twice (32 -> 16 -> 8), then two blocks at 8x8
            blocks = [DBlock(channels, ch[0], first=True), DBlock(ch[0], ch[0])] + \
                     [DBlock(ch[0], ch[0], down=False) for _ in range(2)]
        else:  # differs from sngan.py (down n + 1 times, to s0 / 2): down n times to s0 as the authors' ImageNet D
            blocks = [DBlock(channels, ch[0], first=True)] + [DBlock(ch[i], ch[i + 1]) for i in range(n - 1)] + \
                     [DBlock(ch[n - 1], ch[n], down=False)]
        layers, size, placed = [], image_size, set()
        for block in blocks:
            layers.append(block)
            size //= 2 if block.down else 1
            if size in attn_sizes and size not in placed:
                layers.append(SelfAttention(block.conv2.out_channels))
                placed.add(size)
        self.blocks = nn.Sequential(*layers)
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


def init_weights(net):
    """Xavier-uniform with gain 1 for every conv and linear, biases 0, as the authors' code (TF's
    xavier_initializer). Differs from sngan.py (gain sqrt(2) in residual blocks): SN makes the forward pass the same
    for any gain, but not training (Adam's steps are absolute, so a larger W moves W / sigma(W) less): the
    authors' gain is kept. Embeddings keep their own (conditional BN: 1, 0)."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


def build_generator(args, channels, num_classes):
    """G with SN on every conv and linear weight, the attention's included (differs from sngan.py: SN in G too,
    Sec. 4.1); the conditional BatchNorms' class embeddings are not normalised (the authors' code)."""
    k = num_classes if args.conditional else 0
    G = init_weights(Generator(args.latent_dim, channels, args.image_size, args.width, k, args.attn_res or ()))
    for m in list(G.modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            common.spectral_norm(m, args.sn_iters)
    return G


def build_discriminator(args, channels, num_classes):
    k = num_classes if args.conditional else 0
    D = init_weights(Discriminator(channels, args.image_size, args.width, k, args.attn_res or ()))
    if D.embed is not None:
        nn.init.xavier_uniform_(D.embed.weight)
    for m in list(D.modules()):  # every weight, the class embedding included (the authors' sn_embedding)
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
            common.spectral_norm(m, args.sn_iters)
    return D


def attention_layers(net):
    return [m for m in net.modules() if isinstance(m, SelfAttention)]


# ----------------------------------------------------------------------------------------------
# Losses (from D's raw outputs): the hinge version of the adversarial loss (Zhang et al. 2019, Sec. 3;
# Lim & Ye 2017, Tran et al. 2017)
# ----------------------------------------------------------------------------------------------

def d_loss(real, fake):
    """D: E[relu(1 - D(x, y))] + E[relu(1 + D(G(z), y))] (= -E[min(0, -1 + D(x))] - E[min(0, -1 - D(G(z)))])."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def g_loss(fake):
    """G: -E[D(G(z), y)]."""
    return -fake.mean()


# ----------------------------------------------------------------------------------------------
# Sampling and the attention figure
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_images(G, z, y=None):
    """Samples in eval mode (BatchNorm's running statistics), then back to train mode."""
    G.eval()
    ys = y.split(500) if y is not None else [None] * len(z.split(500))
    x = torch.cat([G(zc, yc) for zc, yc in zip(z.split(500), ys)])
    G.train()
    return x


@torch.no_grad()
def attention_maps(G, D, z, y=None):
    """G's images for z (and y) and, on them, the weights of every attention block of G, then of D, in eval mode (G:
    BatchNorm's running statistics; both: no power iteration). Returns (images, [(name, weights (B, H*W, hk*wk),
    (H, W), (hk, wk))]). Each network is left in the mode it was in, and no block keeps its weights afterwards."""
    layers = [(f"G{i}", m) for i, m in enumerate(attention_layers(G))] + \
             [(f"D{i}", m) for i, m in enumerate(attention_layers(D))]
    modes = (G.training, D.training)
    G.eval(), D.eval()
    for _, m in layers:
        m.keep = True
    try:
        images = G(z, y)
        D(images, y)
        maps = [(name, *m.weights) for name, m in layers]
    finally:
        for _, m in layers:
            m.keep, m.weights = False, None
        G.train(modes[0]), D.train(modes[1])
    return images, maps


QUERIES = ((0.3, 0.5), (0.5, 0.25), (0.7, 0.7))  # (row, column) as fractions of the image: top centre, left, low right


def save_attention_figure(path, images, maps, title="", queries=QUERIES):
    """attention.png: one row per image; the image with the query positions, then for each block and each query the
    weights over the key grid (2x2-pooled: each cell covers 2x2 feature positions) drawn over the image, nearest
    neighbour, brighter = more weight (colour scale from 0 to the panel's peak, or to twice the uniform weight 1 / keys
    if that is higher, so that near-uniform attention shows dark). The number in a panel is its peak weight over
    the uniform weight: 1.0x = the query reads every key equally."""
    imgs = images.detach().float().cpu().add(1).div(2).clamp(0, 1)
    n, (H, W), cols = imgs.shape[0], imgs.shape[-2:], 1 + len(maps) * len(queries)
    fig = common._figure(1.45 * cols, 1.5 * n + 0.6)
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        img = (imgs[i, 0] if imgs.shape[1] == 1 else imgs[i].permute(1, 2, 0)).numpy()
        for ax in axes[i]:
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        for q, (fy, fx) in enumerate(queries):
            axes[i, 0].plot(fx * W, fy * H, "o", color=f"C{q}", ms=5, mec="white", mew=0.8)
        for layer, (name, weights, (h, w), (hk, wk)) in enumerate(maps):
            sy, sx = H / h, W / w  # image pixels per feature position
            for q, (fy, fx) in enumerate(queries):
                qy, qx = min(int(fy * h), h - 1), min(int(fx * w), w - 1)
                a = weights[i, qy * w + qx].float().cpu().view(hk, wk)
                ax = axes[i, 1 + layer * len(queries) + q]
                peak = a.max().item()
                top = max(peak, 2 / a.numel())  # uniform weights show dark, not as bright as a peak
                ax.imshow(a.numpy(), cmap="inferno", alpha=0.65, vmin=0, vmax=top, interpolation="nearest",
                          extent=(0, 2 * wk * sx, 2 * hk * sy, 0))  # an odd side's last cell reaches past the edge
                ax.set_xlim(0, W), ax.set_ylim(H, 0)
                ax.plot((qx + 0.5) * sx, (qy + 0.5) * sy, "o", color=f"C{q}", ms=5, mec="white", mew=0.8)
                ax.text(0.04, 0.05, f"{peak * a.numel():.1f}x", transform=ax.transAxes, fontsize=6,
                        color="white", bbox=dict(facecolor="black", alpha=0.6, pad=1, lw=0))
                if i == 0:
                    ax.set_title(f"{name} {h}x{w}, query {q + 1}", fontsize=7)
    axes[0, 0].set_title("sample, queries", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.75 / (1.5 * n + 0.6), wspace=0.06, hspace=0.12)
    fig.savefig(path, dpi=100)  # (tight_layout would cost more than drawing)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def train(args):
    run = common.Run(args, SCRIPT)  # --resume, device, precision and --out; seeds torch
    args, device = run.args, run.device
    common.conv_plan(args.image_size, "sagan.py's ResNet", smallest=4)  # an impossible size fails before the data is loaded
    args.attn_res = attention_sizes(args.image_size, args.attn_res, args.no_attention)  # recorded in args.json
    data = common.load_dataset(args.dataset, args.data_root, args.image_size, device, **common.data_options(args))
    K = data.num_classes if args.conditional else 0
    if args.conditional and data.num_classes < 2:
        raise common.UsageError(f"{args.dataset} has no class labels; --conditional needs them")
    G = build_generator(args, data.channels, K).to(device, memory_format=run.memory_format)
    D = build_discriminator(args, data.channels, K).to(device, memory_format=run.memory_format)
    ema = common.EMA(G, args.ema, args.latent_dim, K) if args.ema else None
    # differs from sngan.py: two learning rates (TTUR), constant as in the authors' code (no linear decay)
    opt_g = torch.optim.Adam(G.parameters(), args.lr_g, betas=(args.beta1, args.beta2), fused=run.fused)
    opt_d = torch.optim.Adam(D.parameters(), args.lr_d, betas=(args.beta1, args.beta2), fused=run.fused)
    total = max(1, min(args.max_steps or math.inf, args.epochs * (len(data) // args.batch_size) // args.n_dis))
    batches = run.restore(data, G=G, D=D, opt_g=opt_g, opt_d=opt_d, **({"G_ema": ema} if ema else {}))
    G_ddp, D_ddp = run.distribute(G), run.distribute(D)  # under torchrun: DDP, gradients averaged; else G, D
    gammas = {f"gamma_g{i}": m.gamma for i, m in enumerate(attention_layers(G))}
    gammas |= {f"gamma_d{i}": m.gamma for i, m in enumerate(attention_layers(D))}
    step = run.start(total, lambda z, y: sample_images(ema.ready() if ema else G, z, y), latent_dim=args.latent_dim,
                     num_classes=K or None, d_loss_floor=0, panels=[  # hinge loss >= 0
                         ("losses", ["loss_d", "loss_g"]),
                         ("D output (raw)", ["d_real", "d_fake"]),
                         ("attention gamma (0: the block is the identity)", list(gammas)),
                         ("FID (lower is better)", ["cls_fid", "fid"]),
                         ("IS (higher is better)", ["cls_is", "is"]),
                     ] + ([("conditional accuracy (classifier)", ["cls_acc"])] if K else []))
    # The figure's noise from its own generator (the same 4 images every time; no training stream shifts).
    g = torch.Generator(device).manual_seed(args.seed + 5)
    fig_z = torch.randn(4, args.latent_dim, device=device, generator=g)
    fig_y = common.balanced_labels(4, K, device) if K else None

    def draw_attention():  # rank 0 alone draws (no collective inside: plain G and D, eval mode)
        if gammas and run.rank == 0:
            images, maps = attention_maps(ema.ready() if ema else G, D, fig_z, fig_y)
            values = ", ".join(f"{k[6:].upper()} {v.item():.3f}" for k, v in gammas.items())
            save_attention_figure(run.dir / "attention.png", images, maps, f"step {step}; gamma: {values}")

    with run:
        while not run.should_stop(step):
            # D step: minimise E[relu(1 - D(x, y))] + E[relu(1 + D(G(z, y'), y'))]  (hinge, Zhang et al. 2019, Sec. 3)
            for _ in range(args.n_dis):
                real, y_real = batches.next()
                z = run.randn(args.batch_size, args.latent_dim)  # under torchrun: this process's share
                y_fake = run.randint(K, args.batch_size) if K else None
                with run.autocast():
                    with torch.no_grad():  # D's step must not push gradients into G: record no graph for G at all
                        fake = G(z, y_fake)
                    # One forward for both (D has no BatchNorm, so samples do not interact): one power iteration
                    # per D step. Outputs in float32. (The G step's train-mode pass through D iterates once more,
                    # as in sngan.py; the authors' code computes G's loss without updating u.)
                    y_both = torch.cat([y_real, y_fake]) if K else None
                    d_real, d_fake = D_ddp(torch.cat([real, fake.to(real.dtype)]), y_both).float().chunk(2)
                loss_d = d_loss(d_real, d_fake)
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()

            # G step: minimise -E[D(G(z, y), y)]; differs from sngan.py: G's batch is D's (the authors' code)
            # Through D itself, not D_ddp: D is frozen here, so no gradient of D is to be averaged over processes.
            D.requires_grad_(False)  # gradients flow through D to G; D's weight gradients are not needed
            for _ in range(args.n_gen):
                z = run.randn(args.batch_size, args.latent_dim)
                y_g = run.randint(K, args.batch_size) if K else None
                with run.autocast():
                    d_fake_g = D(G_ddp(z, y_g), y_g).float()
                loss_g = g_loss(d_fake_g)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                if ema:
                    ema.update(G)
            D.requires_grad_(True)
            step += 1
            # gamma as tensors: averaged over the log interval like the losses, read at log steps only (no sync)
            run.end_step(step, loss_d=loss_d, loss_g=loss_g, d_real=d_real.mean(), d_fake=d_fake.mean(), **gammas)
            if step % args.sample_every == 0:
                draw_attention()
    draw_attention()  # and at the end, after `with run` saved the last step's checkpoint
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
