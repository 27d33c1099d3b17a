"""Train the digits feature network that diffcore ships (diffcore.metrics.digits_features).

Deterministic: fixed seeds, one thread, deterministic algorithms; trains on the embedded 8x8
digits minus a seeded held-out split (``digits_heldout_split``), with one-pixel shifts and light
Gaussian noise as augmentation (so that samples of diffusion models, slightly noisy and
off-centre, are featurized like real digits). Writes the weights atomically as safetensors with
the held-out accuracy in the metadata:

    python scripts/train_digits_features.py [--out python/diffcore/data/files/digits_cnn.safetensors]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save

from diffcore._atomic import atomic_write_bytes
from diffcore.data import load_digits
from diffcore.metrics.features import DigitsNetwork, digits_heldout_split

SEED = 0
EPOCHS = 60
BATCH = 64
LR = 2e-3
NOISE_STD = 0.05
DEFAULT_OUT = os.path.join(
    os.path.dirname(__file__), "..", "python", "diffcore", "data", "files", "digits_cnn.safetensors"
)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel (background -1 fills in) and add N(0, NOISE_STD^2) noise."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    shifts = torch.randint(0, 3, (images.shape[0], 2), generator=generator)
    shifted = torch.stack([padded[i, :, dy : dy + 8, dx : dx + 8] for i, (dy, dx) in enumerate(shifts.tolist())])
    return shifted + NOISE_STD * torch.randn(shifted.shape, generator=generator)


def accuracy(network: DigitsNetwork, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((network.predict(images) == labels).double().mean())


def train() -> tuple[DigitsNetwork, dict[str, str]]:
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    images, labels = load_digits()
    train_idx, heldout_idx = digits_heldout_split(images.shape[0])
    x, y = images[train_idx], labels[train_idx]
    network = DigitsNetwork()
    optimizer = torch.optim.Adam(network.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    for _ in range(EPOCHS):
        network.train()
        order = torch.randperm(x.shape[0], generator=generator)
        for batch in order.split(BATCH):
            loss = F.cross_entropy(network.logits(augment(x[batch], generator)), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    network.eval()
    info = {
        "heldout_accuracy": f"{accuracy(network, images[heldout_idx], labels[heldout_idx]):.4f}",
        "train_accuracy": f"{accuracy(network, x, y):.4f}",
        "heldout_images": str(len(heldout_idx)),
        "epochs": str(EPOCHS),
        "batch": str(BATCH),
        "lr": str(LR),
        "seed": str(SEED),
        "noise_std": str(NOISE_STD),
        "script": "scripts/train_digits_features.py",
        "torch": torch.__version__,
    }
    return network, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    network, info = train()
    state = {k: v.detach().contiguous() for k, v in network.state_dict().items()}
    atomic_write_bytes(args.out, save(state, metadata=info))
    os.chmod(args.out, 0o644)  # a shipped package file: readable by all
    print(f"wrote {os.path.normpath(args.out)}: " + ", ".join(f"{k}={v}" for k, v in info.items()))


if __name__ == "__main__":
    main()
