"""Training-step time of the paper's linear baselines: LR, LR with crosses and Poly-2 (FTRL).

``python benchmarks/linear_baselines.py [--steps 30] [--batch 1024] [--out results.json]``

Two inputs: the app market (9 fields, 13 slots with the 5-slot history bag: 68 crossed pairs
per row) and a Criteo-shaped batch (39 one-slot fields, 741 pairs, ids drawn uniformly from
fields of 10,000 ids). For each model: milliseconds of the forward and backward passes, and of a
whole step with the FTRL update on the touched rows only (``FTRL``) and with the published rule
applied to every coordinate (``dense``, what the optimiser did before), one torch thread. The
row-sparse update is exact (tests/test_ftrl.py); the point is its cost.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from deepfm.experiments.simulate import log_dataset, simulation_market
from deepfm.models import ModelConfig, build_model
from deepfm.nn import InputLayout
from deepfm.train.optim import FTRL, ftrl_update


class DenseFTRL(FTRL):
    """The rule on every coordinate of every parameter, touched or not (the reference)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                state = self.state[w]
                if not state:
                    state["z"], state["n"] = torch.zeros_like(w), torch.zeros_like(w)
                ftrl_update(w, state["z"], state["n"], w.grad, group)


def market_batch(rows: int):
    market = simulation_market(6, 100, 0)
    dataset = log_dataset(list(market.generate(rows, 0)), split="none", seed=0)
    data = dataset.train
    tensors = (torch.from_numpy(a) for a in (data.ids, data.values, data.labels))
    return InputLayout.of(dataset.feature_map), *tensors


def criteo_batch(rows: int):
    fields, size = 39, 10_000
    names = tuple(f"f{i}" for i in range(fields))
    layout = InputLayout(fields * size, (1,) * fields, names, (size,) * fields)
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, size, (rows, fields), generator=g) + torch.arange(fields) * size).int()
    labels = (torch.rand(rows, generator=g) < 0.25).float()
    return layout, ids, None, labels


def time_model(model, optimizer, ids, values, labels, steps: int) -> dict[str, float]:
    def loss():
        logits = model(ids, values)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")

    for _ in range(3):  # warm-up (and the optimiser's state)
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
    passes = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    return {"passes_ms": 1000 * passes, "step_ms": 1000 * (time.perf_counter() - start) / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    inputs = {"app market": market_batch(args.batch), "Criteo-shaped": criteo_batch(args.batch)}
    configs = {
        "lr": ModelConfig(name="lr"),
        "lr + 2 crosses": None,  # the market's planted crosses; the first two fields on Criteo
        "poly2 2^16": ModelConfig(name="poly2", cross_buckets=2**16),
        "poly2 2^20": ModelConfig(name="poly2", cross_buckets=2**20),
        "poly2 2^22": ModelConfig(name="poly2", cross_buckets=2**22),
    }
    results: dict = {"load_average": os.getloadavg(), "batch": args.batch, "rows": {}}
    print(f"load average {os.getloadavg()[0]:.2f}; batch {args.batch}, one thread")
    print("| input | model | forward+backward ms | step ms (touched rows) | step ms (dense) |")
    print("|---|---|---|---|---|")
    for input_name, (layout, ids, values, labels) in inputs.items():
        market = values is not None
        crosses = ("category×hour", "history×category") if market else ("f0×f1", "f2×f3")
        for label, config in configs.items():
            config = config or ModelConfig(name="lr", crosses=crosses)
            row = {}
            for kind, optimizer_class in (("ftrl", FTRL), ("dense", DenseFTRL)):
                torch.manual_seed(0)
                model = build_model(layout, config)
                optimizer = optimizer_class(model.parameters())
                row[kind] = time_model(model, optimizer, ids, values, labels, args.steps)
            results["rows"][f"{input_name} / {label}"] = row
            print(
                f"| {input_name} | {label} | {row['ftrl']['passes_ms']:.1f} | "
                f"{row['ftrl']['step_ms']:.1f} | {row['dense']['step_ms']:.1f} |",
                flush=True,
            )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
