"""A certified 1-Lipschitz CNN on scikit-learn's digits, with torchext's Gram-iteration spectral norm.

What it shows:
  * Every Conv2d / Linear is wrapped in torchext.nn.register_gram_spectral_norm(..., target=1.0): its weight is
    divided by a certified upper bound on the layer's operator norm (Gram iteration on the frequency blocks
    of the conv at its live input size, Delattre et al., arXiv 2305.16173), so each layer is <= 1-Lipschitz
    in l2 (the convs pad circularly, for which the bound of a strided conv is exact). The activations are
    MaxMin (GroupSort with groups of 2, 1-Lipschitz and gradient-norm preserving) and there is no
    BatchNorm, so the product of the layer bounds is a certified Lipschitz constant L of the
    whole network, logits as a function of the image: L <= 1 up to float rounding.
  * Such a network still learns: it trains with Adam on the 8x8 grayscale digits that ship with scikit-learn
    (1797 images, no download), 80/20 stratified split, fixed seed, pixels scaled to [0, 1].

What it measures (printed, and saved to examples/results/lipschitz_cnn.json):
  * test accuracy;
  * the certified bound L = product of the per-layer bounds of torchext.nn.lipschitz_bound, with its table;
  * certified robust accuracy at l2 radius eps = 0.1 and 0.25 (pixel scale [0, 1]): the fraction of test
    images whose logit margin m(x) = f_y(x) - max_{j != y} f_j(x) exceeds sqrt(2) * L * eps. Why this
    certifies: each difference f_y - f_j is sqrt(2) * L-Lipschitz (the row e_y - e_j has l2 norm sqrt(2)),
    so for ||delta||_2 <= eps no other logit can overtake f_y while m(x) > sqrt(2) * L * eps. A negative
    margin (a misclassified image) is never counted;
  * an empirical check of the certificate: the max of ||f(x) - f(y)||_2 / ||x - y||_2 over one nearby pair
    per test image, y = x + 0.01 * u with u the unit direction the network stretches most at x (power
    iteration on the Jacobian). It must be <= L; how far below L it lands shows how tight the certificate is.

Run (measured on 2 CPU cores, one thread: 134 s by default, 11-14 s with --quick):
    .venv/bin/pip install scikit-learn      # if missing
    .venv/bin/python examples/lipschitz_cnn.py
    .venv/bin/python examples/lipschitz_cnn.py --quick
"""

import argparse
import json
import math
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from torchext.nn import format_lipschitz_table, lipschitz_bound, register_gram_spectral_norm

EPSILONS = (0.1, 0.25)
# The logits of a 1-Lipschitz net span a small range (the images have l2 norm 3-5 at pixel scale [0, 1]), so
# plain cross-entropy never nears its minimum and keeps widening every margin at the cost of accuracy. The
# loss scales the logits (a temperature; the model is unchanged): larger favours accuracy, smaller margins.
# 8 balanced the two in a small sweep of 4 / 8 / 16.
LOSS_SCALE = 8.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the layers are small, and OpenMP barriers stall when other jobs hold the "
                        "other core: a training step took 6x longer with 2 threads on a shared 2-core machine)")
    p.add_argument("--check-images", type=int, default=None,
                   help="test images for the empirical check of the certificate (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2 epochs, the empirical check on 64 test images")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default examples/results, or examples/results/quick with --quick)")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.check_images = 2, 64
    results = Path(__file__).resolve().parent / "results"
    args.out = args.out or (results / "quick" if args.quick else results)
    return args


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images [N, 1, 8, 8] in [0, 1], an 80/20 split stratified by class."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    return x_train, y_train, x_test, y_test


class MaxMin(nn.Module):
    """GroupSort with groups of 2: sorts channel pairs (c, c + C/2). A permutation on each linear piece, so
    1-Lipschitz in l2 and, unlike ReLU, it never zeroes a gradient (1-Lipschitz nets are starved of gradient)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


def build_model() -> nn.Sequential:
    """Three bounded convs (8x8 -> 4x4 -> 2x2) and one bounded linear layer; every layer certified <= 1.

    Circular padding, because then the bound of a strided conv is exact (the polyphase form); for zero padding
    it is an upper bound computed on a slightly larger circular conv, so a zero-padded net is a little
    over-constrained.
    """
    def bounded_conv(c_in: int, c_out: int, stride: int) -> nn.Conv2d:
        conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, padding_mode="circular")
        return register_gram_spectral_norm(conv, target=1.0)

    return nn.Sequential(OrderedDict([
        ("conv1", bounded_conv(1, 32, stride=1)), ("act1", MaxMin()),
        ("conv2", bounded_conv(32, 64, stride=2)), ("act2", MaxMin()),
        ("conv3", bounded_conv(64, 128, stride=2)), ("act3", MaxMin()),
        ("flatten", nn.Flatten()),  # a reshape: an isometry
        ("fc", register_gram_spectral_norm(nn.Linear(128 * 2 * 2, 10), target=1.0)),
    ]))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> list[float]:
    """Adam with cosine decay to 0; returns the mean training loss of each epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    generator = torch.Generator().manual_seed(args.seed)
    losses = []
    model.train()
    for epoch in range(args.epochs):
        total = 0.0
        for batch in torch.randperm(len(x), generator=generator).split(args.batch):
            loss = F.cross_entropy(LOSS_SCALE * model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        scheduler.step()
        losses.append(total / len(x))
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            print(f"  epoch {epoch + 1:3d}: train loss {losses[-1]:.4f}", flush=True)
    return losses


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f_y(x) - max_{j != y} f_j(x): positive iff the image is classified correctly."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.max(dim=1).values


def stretch_direction(model: nn.Module, x: torch.Tensor, steps: int = 20) -> torch.Tensor:
    """Per image, the unit input direction u maximising ||J(x) u|| (power iteration on J^T J).

    The images are independent (no BatchNorm), so the batch's Jacobian is block diagonal and one batched
    iteration runs them all.
    """
    u = torch.randn_like(x)
    for _ in range(steps):
        u = u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        _, ju = torch.func.jvp(model, (x,), (u,))
        _, vjp = torch.func.vjp(model, x)
        u, = vjp(ju)
    return u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def empirical_ratio(model: nn.Module, x: torch.Tensor, radius: float = 1e-2) -> float:
    """max ||f(x) - f(y)|| / ||x - y|| over the pairs (x, x + radius * u), u from stretch_direction."""
    y = x + radius * stretch_direction(model, x)
    with torch.no_grad():
        ratios = (model(x) - model(y)).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    return ratios.max().item()


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_data(args.seed)
    print(f"digits: {len(x_train)} train / {len(x_test)} test images, 8x8; {args.epochs} epochs", flush=True)
    model = build_model()
    losses = train(model, x_train, y_train, args)

    model.eval()  # the layers' bounds are now cached until the weights change
    with torch.no_grad():
        logits = model(x_test)
    accuracy = (logits.argmax(dim=1) == y_test).float().mean().item()
    bound, table = lipschitz_bound(model, x_test[:1])
    lipschitz = bound.item()
    margin = margins(logits, y_test)
    certified = {eps: (margin > math.sqrt(2) * lipschitz * eps).float().mean().item() for eps in EPSILONS}
    checked = x_test[:args.check_images]
    ratio = empirical_ratio(model, checked)

    print(f"\ntest accuracy: {accuracy:.4f}")
    print(f"certified Lipschitz bound of the network (l2): {lipschitz:.7f}")
    print(format_lipschitz_table(table))
    for eps in EPSILONS:
        print(f"certified robust accuracy at l2 eps {eps}: {certified[eps]:.4f}  "
              f"(margin > sqrt(2) * L * eps = {math.sqrt(2) * lipschitz * eps:.4f})")
    print(f"empirical max ||f(x)-f(y)|| / ||x-y|| over {len(checked)} nearby test pairs: {ratio:.4f} "
          f"<= {lipschitz:.7f}: {ratio <= lipschitz}")

    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "loss_scale": LOSS_SCALE, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "train_images": len(x_train), "test_images": len(x_test),
        "train_loss": losses, "test_accuracy": accuracy,
        "lipschitz_bound": lipschitz,
        "layer_bounds": [{"layer": r["layer"], "type": r["type"], "bound": r["bound"].item()} for r in table],
        "certified_robust_accuracy": {str(eps): frac for eps, frac in certified.items()},
        "empirical_max_ratio": ratio, "empirical_pairs": len(checked),
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lipschitz_cnn.json").write_text(json.dumps(result, indent=1))
    print(f"results: {args.out / 'lipschitz_cnn.json'}")
    print(f"wall time: {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
