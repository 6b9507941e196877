"""Training speed of dcgan.py's step against this machine's fp32 matmul rate (not collected by pytest).

    python tests/benchmark.py              # 28 px and 64 px, current device
    python tests/benchmark.py --steps 100

Images/s come from dcgan.py's own training loop (its metrics.jsonl, data batching included) on
the generated `fake` data; FLOPs per step are counted with torch.utils.flop_counter on one D
step plus one G step of the same networks and losses.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import dcgan  # noqa: E402


def matmul_rate(device, n=2048, reps=10):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def step_flops(size, width, batch, channels=1, latent=100):
    """FLOPs of one training iteration (1 D step + 1 G step), as dcgan.py runs it."""
    G, D = dcgan.Generator(latent, channels, size, width), dcgan.Discriminator(channels, size, width)
    real = torch.randn(batch, channels, size, size)
    with FlopCounterMode(display=False) as counter:
        fake = G(torch.randn(batch, latent)).detach()
        dcgan.d_loss(D(real), D(fake)).backward()
        D.requires_grad_(False)
        dcgan.g_loss(D(G(torch.randn(batch, latent)))).backward()
    return counter.get_total_flops()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="timed steps per size (after 10 warm-up steps)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    peak = matmul_rate(device)
    print(f"device {device}, {torch.get_num_threads()} threads; fp32 matmul (2048^2): {peak / 1e9:.1f} GFLOP/s")
    data_root = tempfile.mkdtemp()  # the fake data's evaluation classifier is trained once, here
    for size in (28, 64):
        flops = step_flops(size, 64, args.batch_size)
        with tempfile.TemporaryDirectory() as tmp:
            dcgan.main(["--dataset", "fake", "--image-size", str(size), "--batch-size", str(args.batch_size),
                        "--max-steps", str(args.steps + 10), "--log-every", "10", "--sample-every", "100000",
                        "--eval-every", "0", "--eval-samples", "100", "--device", str(device),
                        "--out", tmp, "--data-root", data_root])
            rows = [json.loads(line) for line in open(Path(tmp) / "metrics.jsonl")]
        ips = [r["images_per_s"] for r in rows if "images_per_s" in r][1:]  # drop the warm-up window
        rate = sum(ips) / len(ips)
        achieved = flops / args.batch_size * rate
        print(f"{size} px (1 channel, width 64, batch {args.batch_size}): {rate:.0f} images/s, "
              f"{flops / args.batch_size / 1e6:.0f} MFLOP per image per step, {achieved / 1e9:.1f} GFLOP/s "
              f"= {100 * achieved / peak:.0f}% of matmul")


if __name__ == "__main__":
    main()
