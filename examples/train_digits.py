"""Train a small CNN on scikit-learn's digits with AdaptedGD in an ordinary training loop.

The loop is the usual PyTorch one: shuffle, take mini-batches, call the optimizer,
step a learning-rate scheduler, evaluate each epoch.  The only difference to Adam
is that AdaptedGD evaluates the model itself: ``opt.step(inputs, targets)`` (class
indices are fine for cross-entropy) and returns the batch cost before the step.
The same CNN, from the same initialization, is trained with Adam alongside, and a
figure of the mean training cross-entropy against wall time (the clock stops
during evaluation) is written to --out, with the numbers as JSON.

Needs scikit-learn (pip install subriemann[data]).

Run:  python examples/train_digits.py [--fast] [--epochs N] [--lam 0.5] [--fisher sampled]
      [--out DIR]

``--fisher sampled`` uses the Monte-Carlo Fisher (a solve of size batch instead of
9 x batch per step; docs/optim.md).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from subriemann.app.datasets import digits_split
from subriemann.optim import AdaptedGD


def load(fast: bool) -> tuple[torch.Tensor, ...]:
    """All 1,797 digits, a fixed stratified 80/20 split, pixels standardized on the train set."""
    return digits_split(128, 64) if fast else digits_split()


def cnn() -> torch.nn.Module:
    """8x8 digits: two 3x3 convolutions (the second with stride 2), a linear read-out."""
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 10),
    )


def evaluate(net, x, y, xt, yt) -> tuple[float, float]:
    with torch.no_grad():
        loss = float(F.cross_entropy(net(x), y))
        acc = 100.0 * float((net(xt).argmax(1) == yt).float().mean())
    return loss, acc


def train(name, net, step, x, y, xt, yt, epochs, batch, scheduler=None) -> dict:
    """The ordinary loop; ``step(xb, yb)`` does one optimizer step."""
    gen = torch.Generator().manual_seed(0)
    clock, curve = 0.0, [(0.0, *evaluate(net, x, y, xt, yt))]
    bar = tqdm(range(epochs), desc=name, leave=False)
    for _ in bar:
        order = torch.randperm(len(x), generator=gen)
        for a in range(0, len(x), batch):
            idx = order[a : a + batch]
            t0 = time.perf_counter()
            step(x[idx], y[idx])
            clock += time.perf_counter() - t0
        if scheduler is not None:
            scheduler.step()
        loss, acc = evaluate(net, x, y, xt, yt)
        curve.append((clock, loss, acc))
        bar.set_postfix(loss=f"{loss:.3g}", test_acc=f"{acc:.1f}%")
    return {"curve": curve, "final_loss": curve[-1][1], "test_acc": curve[-1][2], "time": clock}


def plot_curves(runs, path: Path) -> None:
    """Mean training cross-entropy against the training wall time, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, res in runs:
        t = [max(c[0], 1e-3) for c in res["curve"]]
        ax.plot(t, [c[1] for c in res["curve"]], marker="o", ms=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("mean training cross-entropy")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fast", action="store_true", help="128 training samples, 2 epochs")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lam", type=float, default=0.5, help="lambda of AdaptedGD")
    ap.add_argument("--lr", type=float, default=0.25, help="learning rate of AdaptedGD")
    ap.add_argument("--adam-lr", type=float, default=1e-2)
    ap.add_argument(
        "--fisher", choices=("exact", "sampled"), default="exact", help="output metric of AdaptedGD"
    )
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = ap.parse_args(argv)
    epochs = 2 if args.fast else args.epochs
    batch = 32 if args.fast else args.batch
    out = Path(args.out or tempfile.mkdtemp(prefix="train_digits_"))
    out.mkdir(parents=True, exist_ok=True)
    x, y, xt, yt = load(args.fast)

    torch.manual_seed(0)
    net = cnn()
    net_adam = cnn()
    net_adam.load_state_dict(net.state_dict())  # the same initialization

    sampled = {"fisher": "sampled", "seed": 0} if args.fisher == "sampled" else {}
    opt = AdaptedGD(net, lam=args.lam, lr=args.lr, loss="cross_entropy", **sampled)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    ours = train(f"AdaptedGD lam={args.lam}", net, opt.step, x, y, xt, yt, epochs, batch, sched)

    adam = torch.optim.Adam(net_adam.parameters(), lr=args.adam_lr)

    def adam_step(xb, yb):
        adam.zero_grad()
        F.cross_entropy(net_adam(xb), yb).backward()
        adam.step()

    theirs = train("Adam", net_adam, adam_step, x, y, xt, yt, epochs, batch)

    plot_curves(
        ((f"AdaptedGD λ={args.lam}", ours), (f"Adam lr={args.adam_lr}", theirs)),
        out / "train_digits.png",
    )
    summary = {"adapted": ours, "adam": theirs, "epochs": epochs, "batch": batch}
    tmp = out / "train_digits.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "train_digits.json")
    for label, res in (("AdaptedGD", ours), ("Adam", theirs)):
        print(
            f"{label:10s} final train CE {res['final_loss']:.3g}  test accuracy "
            f"{res['test_acc']:.1f}%  training time {res['time']:.2f} s"
        )
    print(f"figure and numbers in {out}")
    return summary


if __name__ == "__main__":
    main()
