"""The baseline of the CPU training-speed bar: DeepFM-D as a PyTorch user would write it.

``python benchmarks/plain_deepfm.py --store STORE [--epochs 1] [--batch-size 4096] [--threads N]``

A straightforward, competent PyTorch program, not a strawman: ``nn.Embedding`` for the order-1
weights and the shared ``V`` (one table each over all features, field offsets already in the
ids), the FM term by the sum-square identity, ``nn.Linear`` / ``nn.ReLU`` / ``nn.Dropout`` for
the DNN, ``torch.optim.Adam`` with its defaults, the whole training split as tensors in memory,
one ``randperm`` per epoch and batches cut by index (no ``DataLoader``, no per-sample Python).
Prints one JSON line: samples/s over the timed epochs (the first one included when it is the
only one), and the final training loss.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class PlainDeepFM(nn.Module):
    """``ids [B, F] -> logits [B]``: ``<w, x> + b + Σ_{i<j} <e_i, e_j> + MLP([e_1 … e_F])``."""

    def __init__(
        self,
        num_features: int,
        num_fields: int,
        embed_dim: int = 10,
        hidden: tuple[int, ...] = (400, 400, 400),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.weights = nn.Embedding(num_features, 1)
        self.bias = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Embedding(num_features, embed_dim)
        nn.init.zeros_(self.weights.weight)
        nn.init.normal_(self.embedding.weight, std=0.01)
        layers: list[nn.Module] = []
        width = num_fields * embed_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embedding(ids)  # [B, F, k]
        order1 = self.weights(ids).sum(dim=(1, 2)) + self.bias
        order2 = 0.5 * (e.sum(dim=1).pow(2) - e.pow(2).sum(dim=1)).sum(dim=1)
        deep = self.mlp(e.flatten(1)).squeeze(1)
        return order1 + order2 + deep


def train(
    ids: torch.Tensor,
    labels: torch.Tensor,
    num_features: int,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
) -> dict:
    """Train ``epochs`` epochs; samples/s of the fastest epoch (the only one if ``epochs == 1``)."""
    torch.manual_seed(seed)
    model = PlainDeepFM(num_features, ids.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    best, loss_sum = float("inf"), 0.0
    for _ in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(len(ids))
        loss_sum = 0.0
        for begin in range(0, len(ids), batch_size):
            index = order[begin : begin + batch_size]
            loss = F.binary_cross_entropy_with_logits(model(ids[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(index)
        best = min(best, time.perf_counter() - started)
    return {"samples_per_s": round(len(ids) / best), "train_loss": loss_sum / len(ids)}


def main(argv: list[str] | None = None) -> int:
    from deepfm.data.store import Store

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rows", type=int, default=0, help="train on the first N rows (0: all)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    store = Store.open(args.store)
    split = store.split("train")
    rows = args.rows or len(split)
    ids = torch.from_numpy(np.asarray(split.ids[:rows], dtype=np.int64))
    labels = torch.from_numpy(np.asarray(split.labels[:rows], dtype=np.float32))
    result = train(
        ids,
        labels,
        store.feature_map.num_features,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
    )
    print(json.dumps({"rows": rows, "threads": torch.get_num_threads(), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
