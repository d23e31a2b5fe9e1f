"""The trainer: fits any registered model on encoded arrays, evaluates, stops early.

The model maps a batch to logits and knows nothing else; everything about training lives here:

* **Batches.** Splits that fit in the device's memory beside the training state (both splits
  together, :func:`plan_residency`) are moved there once and batches are cut by index on the
  device (no per-batch host work); otherwise (and always on CPU) the batch loader
  gathers rows from the (memory-mapped) arrays, pins them and copies them without blocking,
  one batch ahead in a thread (``sync_loading`` turns that off). No per-sample Python anywhere.
* **Precision.** ``bf16`` autocasts on CUDA (TF32 matmuls are always on there); CPU runs fp32.
* **Embedding updates.** ``auto`` picks sparse row updates (lazy Adam: only the rows a batch
  uses) when the tables have more rows than 4x the ids in a batch on CPU and under DDP (a dense
  Adam step touches, and DDP all-reduces, every row of the table at every step), 64x on one
  GPU, where a fused dense step is cheap; dense fused Adam otherwise (:func:`use_sparse_updates`,
  BENCHMARKS.md, "Training speed"). Under DDP sparse tables exchange only the touched rows.
* **Metrics** accumulate on the device; they are synchronised once per epoch and evaluation.
* **Data parallelism** (DDP, ``torchrun``): each rank trains on its own shard with its own
  random stream (seed + rank: dropout masks differ), gradients are averaged, the learning rate
  is scaled (``lr_scaling``), every evaluation scores each rank's shard and gathers the logits,
  the epoch's loss is summed over the ranks (a non-finite loss stops every rank at once).
* **Checkpoints** every ``checkpoint_every`` steps (model, optimiser, RNG states, data position,
  best-so-far), atomic; ``resume`` continues from the newest intact one, bit for bit on CPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from deepfm.common import sigmoid
from deepfm.data.encoded import EncodedArrays
from deepfm.data.loader import Batch, BatchLoader
from deepfm.errors import ConfigError, is_finite_number, is_integer
from deepfm.models.registry import ModelEntry, build_pretrain_model
from deepfm.nn import MLP, FieldEmbedding, regularization, set_id_prior
from deepfm.train import checkpoint as ckpt
from deepfm.train.calibration import fit_calibration
from deepfm.train.distributed import Distributed, lr_scale
from deepfm.train.lazy_adam import LazyAdam
from deepfm.train.metrics import auc_logloss, standard_errors
from deepfm.train.optim import FTRL

# Adam 3e-3 rather than the usual 1e-3: measured on the 10k-row Criteo sample and the app market
# (README, "How the defaults were chosen"), 1e-3 often stalls on the LR-like plateau and stops
# early on small data, while decay on plateau brings the rate down where more data allows.
DEFAULT_LR = {"adam": 3e-3, "ftrl": 0.05}
#: the default ``id_prior`` of a model with a deep component (an MLP that can memorise the ids it
#: reads). Chosen on validation rows (README, "How the defaults were chosen"): the app market's at
#: 500k rows, Frappe's and MovieLens's. It applies only once training without it has stopped
#: improving (:meth:`Trainer._start_prior`), which is what makes it safe on small data.
DEEP_ID_PRIOR = 100.0
PRECISIONS = ("fp32", "bf16")
EMBEDDING_UPDATES = ("auto", "dense", "sparse")
MONITORS = ("auc", "auc-logloss", "logloss")
CALIBRATIONS = ("beta", "none")
#: training steps between two looks at the clock when a run has a time limit
CLOCK_EVERY = 8
#: steps between updates of the progress bar's running loss (each costs a device sync)
RUNNING_LOSS_EVERY = 20
#: optimiser settings that choose an implementation, not the algorithm: never taken from a
#: checkpoint
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")
#: sparse row updates when the tables have more rows than this many times a batch's ids
SPARSE_FACTOR = 4
SPARSE_FACTOR_ONE_GPU = 64
#: a split is kept on a CUDA device when it needs at most this share of the free memory
RESIDENT_SHARE = 0.5
#: seeds are 32-bit unsigned integers (what every random generator used here accepts)
MAX_SEED = 2**32 - 1
#: most torch CPU threads accepted (a million makes OpenMP crash the process)
MAX_THREADS = 1024
#: metadata of the TrainConfig fields that belong to one invocation rather than to the run: how
#: it is shown and where it keeps its checkpoints (no part of a study's config or a run's id)
PER_INVOCATION = {"per_invocation": True}
#: metadata of the TrainConfig fields that change neither the weights nor the history a run
#: trains: float order (threads, device, evaluation batches), speed (compilation, loading),
#: a stop by the clock, the calibration fitted afterwards. A resumed run may change them, and
#: the per-invocation ones; every other field is one of :data:`RESULT_SETTINGS`.
NOT_IN_RESULT = {"not_in_result": True}


@dataclass
class TrainConfig:
    """How to train. ``lr`` None means the optimiser's default (Adam 3e-3, FTRL α = 0.05).

    Early stopping watches a validation score (``monitor``: ``auc`` by default, or
    ``auc-logloss``, or ``logloss``): training stops after ``patience`` epochs without a new
    best, and the best epoch's weights are restored. The epoch is chosen for its ranking; the
    overconfidence AUC alone lets grow (Frappe sample: validation Logloss 0.32 → 0.50 over the
    epochs AUC picked) is then removed by ``calibration``: ``beta`` fits a monotone map of the
    logits on the validation rows (:mod:`deepfm.nn.calibration`,
    :func:`deepfm.train.calibration.fit_calibration`; ``FitResult.calibration``),
    which leaves the ranking as it is and gives both the best AUC and the best Logloss (README,
    "How the defaults were chosen"). The learning rate is multiplied by ``lr_decay`` after
    ``decay_patience`` epochs without a new best (Adam only). ``time_limit``: seconds after which
    training stops (within a few steps; that epoch is evaluated and the best one kept).
    ``id_prior``: an L2 on each feature id's rows (embedding and order-1 weight) whatever its
    count (Adam-trained models): each use of id ``i`` carries ``id_prior / count(i)`` (its
    count in the training rows), so an epoch's penalties add up to ``id_prior ·
    ||row_i||²`` per id, a Gaussian prior of precision ``2 · id_prior``
    (:func:`deepfm.nn.set_id_prior`). An id seen a few times stays near zero, one seen
    thousands of times keeps what its rows say, and more rows let more ids out. The prior is a
    second phase of training: the model first trains without it until early stopping would
    end the run (``patience`` epochs without a new best), then starts again from its best
    epoch, at the initial learning rate, with the prior on, for the epochs left and a fresh
    ``patience``; the best epoch of either phase is kept (``FitResult.prior_from``: the first
    epoch with the prior, 0 if it never started). A prior from the first step can hold the
    interactions at zero where the data are few (small market, 30k rows: DeepFM-D at its LR's
    level on 2 seeds of 4); started from the model's own optimum, it is kept only where the
    validation rows prefer it. Without validation rows there is no second phase and no prior.
    None: :data:`DEEP_ID_PRIOR` for a model with a deep component, none for the others
    (README, "How the defaults were chosen").
    ``device``: ``auto`` (CUDA if present), ``cpu``, ``cuda``, ``cuda:N``.
    """

    epochs: int = 30
    batch_size: int = 1024
    lr: float | None = None
    patience: int = 3
    monitor: str = "auc"
    calibration: str = field(default="beta", metadata=NOT_IN_RESULT)
    lr_decay: float = 0.5
    decay_patience: int = 1
    seed: int = 0
    threads: int | None = field(default=None, metadata=NOT_IN_RESULT)
    eval_batch_size: int = field(default=65536, metadata=NOT_IN_RESULT)
    ftrl_beta: float = 1.0
    ftrl_l1: float = 1.0
    ftrl_l2: float = 1.0
    id_prior: float | None = None
    progress: bool = field(default=True, metadata=PER_INVOCATION)
    device: str = field(default="auto", metadata=NOT_IN_RESULT)
    precision: str = "fp32"
    compile: bool = field(default=False, metadata=NOT_IN_RESULT)
    embedding_updates: str = "auto"
    sync_loading: bool = field(default=False, metadata=NOT_IN_RESULT)
    lr_scaling: str = "none"
    checkpoint_every: int = field(default=0, metadata=PER_INVOCATION)
    checkpoint_dir: str | None = field(default=None, metadata=PER_INVOCATION)
    resume: str | None = field(default=None, metadata=PER_INVOCATION)
    time_limit: float | None = field(default=None, metadata=NOT_IN_RESULT)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "patience", "decay_patience"):
            value, least = getattr(self, name), 0 if "patience" in name else 1
            if not is_integer(value) or value < least:
                raise ConfigError(f"{name} must be at least {least} (an integer), got {value!r}")
        for name in ("lr", "ftrl_beta", "ftrl_l1", "ftrl_l2", "lr_decay", "id_prior"):
            value = getattr(self, name)
            if value is not None and not is_finite_number(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"the learning rate must be positive, got {self.lr}")
        if not 0 < self.lr_decay <= 1 or min(self.ftrl_beta, self.ftrl_l1, self.ftrl_l2) < 0:
            raise ConfigError("lr_decay must be in (0, 1] and the FTRL settings >= 0")
        if self.id_prior is not None and self.id_prior < 0:
            raise ConfigError(f"id_prior must be >= 0, got {self.id_prior}")
        if not is_integer(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"the seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")
        if self.threads is not None and not (
            is_integer(self.threads) and 1 <= self.threads <= MAX_THREADS
        ):
            raise ConfigError(
                f"threads must be a positive integer up to {MAX_THREADS}, got {self.threads!r}"
            )
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ConfigError(
                    f"unknown device {self.device!r}: use auto, cpu, cuda or cuda:N"
                ) from None
        if self.monitor not in MONITORS:
            raise ConfigError(f"monitor must be one of {', '.join(MONITORS)}")
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"calibration must be one of {', '.join(CALIBRATIONS)}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ConfigError(f"time_limit must be positive seconds, got {self.time_limit}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}")
        if self.embedding_updates not in EMBEDDING_UPDATES:
            raise ConfigError(f"embedding updates must be one of {', '.join(EMBEDDING_UPDATES)}")
        lr_scale(self.lr_scaling, 1)  # validates the name
        if self.checkpoint_every < 0:
            raise ConfigError("checkpoint_every must be >= 0")
        if self.checkpoint_every and not (self.checkpoint_dir or self.resume):
            raise ConfigError("checkpoints need a directory (checkpoint_dir)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def per_invocation(cls) -> tuple[str, ...]:
        """The fields marked :data:`PER_INVOCATION`."""
        return tuple(f.name for f in fields(cls) if f.metadata.get("per_invocation"))


@dataclass
class FitResult:
    """What training produced besides the weights (restored to the best epoch in place)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_valid: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    train_samples: int = 0
    setup: dict[str, Any] = field(default_factory=dict)
    #: the optimiser's state after the last epoch (:meth:`Optimizers.named_state`)
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict)
    #: ``{"method": "beta", "a", "b", "c"}`` fitted on the validation rows, or None
    calibration: dict[str, Any] | None = None
    #: the first epoch trained with the id prior (its second phase); 0: none was
    prior_from: int = 0

    @property
    def train_samples_per_s(self) -> float:
        return self.train_samples / self.train_seconds if self.train_seconds > 0 else math.nan


# -- batches ------------------------------------------------------------------------------------


class Batches:
    """An encoded split as tensors on ``device``, cut into batches by index (no host work)."""

    def __init__(self, data: EncodedArrays, device: torch.device | str = "cpu") -> None:
        self.ids = torch.from_numpy(np.ascontiguousarray(data.ids)).to(device)
        # np.asarray: a sharded store's split is several files (a ShardedArray)
        values, labels = data.values, data.labels
        self.values = None if values is None else torch.from_numpy(np.asarray(values)).to(device)
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels)).to(device)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def batch(self, index: torch.Tensor | slice):
        values = None if self.values is None else self.values[index]
        labels = None if self.labels is None else self.labels[index]
        return self.ids[index], values, labels

    def batches(self, order: torch.Tensor, batch_size: int, start: int = 0) -> Iterator[Batch]:
        order = order.to(self.ids.device)
        for begin in range(start * batch_size, len(order), batch_size):
            yield Batch(*self.batch(order[begin : begin + batch_size]))


def split_bytes(data: EncodedArrays | None) -> int:
    if data is None:
        return 0
    return sum(a.nbytes for a in (data.ids, data.values, data.labels) if a is not None)


def activation_bytes(model: nn.Module, rows: int, slots: int) -> int:
    """Activations of ``rows`` rows in a training step (values, gradients and masks of every
    layer's input and output, and of the looked-up embeddings): an estimate from the shapes,
    on the generous side (an evaluation batch needs less)."""
    dims = sum(t.embedding_dim for t in embedding_tables(model))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    widths = sum(m.in_features + m.out_features for m in linears)
    return 4 * 3 * (widths + slots * dims) * rows


def training_bytes(
    model: nn.Module, *, sparse: bool, batch_size: int, eval_batch_size: int, slots: int
) -> int:
    """Device memory training will still allocate once the model is on the device: Adam's two
    moments of every parameter, the gradients (with sparse updates: those of the dense
    parameters and of a batch's table rows), and the activations of the larger of a training
    step and an evaluation batch."""
    tables = {id(t.weight) for t in embedding_tables(model)}
    params = sum(p.numel() for p in model.parameters())
    table_params = sum(p.numel() for p in model.parameters() if id(p) in tables)
    dims = sum(t.embedding_dim for t in embedding_tables(model))
    grads = params - table_params + 2 * batch_size * slots * dims if sparse else params
    activations = activation_bytes(model, max(batch_size, eval_batch_size), slots)
    return 4 * (2 * params + grads) + activations


def free_device_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device, counting the blocks PyTorch holds in its cache but does
    not use as free (they are ours to reuse)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def plan_residency(
    device: torch.device,
    need: int,
    train: EncodedArrays | None,
    valid: EncodedArrays | None,
) -> tuple[bool, bool]:
    """(train, valid): which splits are kept on ``device`` rather than streamed from host
    memory. Both must fit together, beside ``need`` bytes of training state
    (:func:`training_bytes`), in ``RESIDENT_SHARE`` of the free memory; the training split
    first (it is read every epoch). On CPU the training split is streamed (the loader's
    thread prepares batches) and the validation split read in place."""
    if device.type != "cuda":
        return False, True
    budget = RESIDENT_SHARE * (free_device_bytes(device) - need)
    keep_train = split_bytes(train) <= budget
    if keep_train:
        budget -= split_bytes(train)
    return keep_train, valid is not None and split_bytes(valid) <= budget


def placed(data: EncodedArrays, device: torch.device, resident: bool) -> Batches | EncodedArrays:
    """``data`` as tensors on ``device`` (cut by index there) or as arrays the batch loader
    streams (gathered, pinned and copied one batch ahead)."""
    return Batches(data, device) if resident else data


class StreamedBatches:
    """A split left in host memory (or a memory map): the loader prepares each batch."""

    def __init__(self, data: EncodedArrays, device: torch.device, asynchronous: bool) -> None:
        self.data, self.device, self.asynchronous = data, device, asynchronous

    def __len__(self) -> int:
        return len(self.data)

    def batches(self, order: torch.Tensor, batch_size: int, start: int = 0) -> Iterator[Batch]:
        loader = BatchLoader(
            self.data,
            batch_size,
            order=order[start * batch_size :].numpy(),
            device=self.device,
            asynchronous=self.asynchronous,
            sort_rows=False,  # the rows in permutation order, exactly as on the device path
        )
        return iter(loader)


def padded(batch: Batch, size: int) -> tuple[Batch, torch.Tensor | None]:
    """``batch`` grown to ``size`` rows for a static shape, and the rows' weights (1 real, 0
    padding; None when nothing was added). The padding repeats the batch's own rows, so it
    touches no table row the batch does not (sparse updates see the same rows) and, weighing
    0 in the loss and the penalty (:func:`batch_loss`, ``regularization``), adds exact zeros
    to every gradient."""
    rows = len(batch)
    if rows == size:
        return batch, None
    index = torch.arange(size, device=batch.ids.device) % rows
    weights = (torch.arange(size, device=batch.ids.device) < rows).float()

    def grow(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[index]

    return Batch(batch.ids[index], grow(batch.values), grow(batch.labels)), weights


def batch_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """Mean binary cross-entropy of the batch's rows (a weighted mean with ``weights``)."""
    if weights is None:
        return F.binary_cross_entropy_with_logits(logits.float(), labels)
    per_row = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
    return (per_row * weights).sum() / weights.sum()


def matmul_precision(device: torch.device, precision: str) -> str:
    """``bf16`` or ``tf32`` on CUDA, ``fp32`` on CPU (no autocast there)."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if precision == "bf16" else "tf32"


def autocast(device: torch.device, precision: str):
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# -- prediction and evaluation -------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    data: Batches | EncodedArrays,
    batch_size: int = 65536,
    *,
    precision: str = "fp32",
    as_tensor: bool = False,
    static: bool = False,
) -> np.ndarray | torch.Tensor:
    """Logits of every row, in order, in large batches on the model's device. Results stay on
    the device until the end (one transfer; ``as_tensor`` keeps them there). ``static``: every
    batch has ``batch_size`` rows (the last one padded, its padding's logits dropped), so a
    model compiled for one shape (CUDA graphs) never sees another."""
    device = _device_of(model)
    was_training = model.training
    model.eval()
    out = []
    if isinstance(data, Batches):
        batches = (
            Batch(*data.batch(slice(s, s + batch_size))) for s in range(0, len(data), batch_size)
        )
    else:
        batches = iter(
            BatchLoader(data, batch_size, device=device, asynchronous=len(data) > batch_size)
        )
    with autocast(device, precision):
        for batch in batches:
            rows = len(batch)
            if static:
                batch, _ = padded(batch, batch_size)
            ids = batch.ids.to(device)
            values = None if batch.values is None else batch.values.to(device)
            out.append(model(ids, values)[:rows].float())
    model.train(was_training)
    logits = torch.cat(out) if out else torch.zeros(0, device=device)
    return logits if as_tensor else logits.cpu().numpy()


def predict_proba(
    model: nn.Module, data: Batches | EncodedArrays, batch_size: int = 65536
) -> np.ndarray:
    return sigmoid(predict_logits(model, data, batch_size))


def _labels(data: Batches | EncodedArrays) -> np.ndarray | None:
    if isinstance(data, Batches):
        return None if data.labels is None else data.labels.cpu().numpy()
    return None if data.labels is None else np.asarray(data.labels)


def evaluate(
    model: nn.Module, data: Batches | EncodedArrays, batch_size: int = 65536
) -> dict[str, float]:
    labels = _labels(data)
    if labels is None:
        raise ConfigError("evaluation needs labeled data")
    return auc_logloss(labels, predict_proba(model, data, batch_size))


# -- optimisers ---------------------------------------------------------------------------------


class Optimizers:
    """One or two optimisers stepped together: Adam (or FTRL) for dense parameters and, with
    sparse embedding updates, :class:`LazyAdam` for the embedding tables."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        self.primary = optimizers[0]
        self.sums_loss = getattr(self.primary, "sums_loss", False)

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    @property
    def lr(self) -> float:
        group = self.primary.param_groups[0]
        return group.get("lr", group.get("alpha"))

    def follow_primary_lr(self) -> None:
        """After the plateau scheduler changed the primary's rate, the others follow."""
        for optimizer in self.optimizers[1:]:
            for group in optimizer.param_groups:
                group["lr"] = self.lr

    def state_dict(self) -> list[dict]:
        return [o.state_dict() for o in self.optimizers]

    def named_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The per-parameter state as ``{"<parameter>/<state>": tensor}`` on the CPU (Adam's
        ``step``, ``exp_avg``, ``exp_avg_sq``; FTRL's ``z``, ``n``): names, not positions, so
        that it outlives the split into dense and sparse optimisers and a grown model."""
        names = {id(p): n for n, p in model.named_parameters()}
        out = {}
        for optimizer in self.optimizers:
            for param, state in optimizer.state.items():
                for key, value in state.items():
                    out[f"{names[id(param)]}/{key}"] = torch.as_tensor(value).detach().cpu()
        return out

    def load_named_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> int:
        """Continue from :meth:`named_state`; a parameter whose saved state does not fit it
        (another shape) starts fresh. Returns the number of parameters continued."""
        names = {id(p): n for n, p in model.named_parameters()}
        continued = 0
        for optimizer in self.optimizers:
            saved = optimizer.state_dict()
            for group in saved["param_groups"]:
                for index in group["params"]:
                    saved["state"].pop(index, None)
            for group, params in zip(
                saved["param_groups"], (g["params"] for g in optimizer.param_groups), strict=True
            ):
                for index, param in zip(group["params"], params, strict=True):
                    prefix = f"{names[id(param)]}/"
                    state = {
                        k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)
                    }
                    if state and all(
                        v.dim() == 0 or v.shape == param.shape for v in state.values()
                    ):
                        saved["state"][index] = {k: v.clone() for k, v in state.items()}
                        continued += 1
            optimizer.load_state_dict(saved)
        return continued

    def load_state_dict(self, states: list[dict]) -> None:
        """Restore saved states, keeping this run's implementation flags (``fused``,
        ``foreach``, ...): a checkpoint written on another device (or by another PyTorch) carries
        its own, which may not run here."""
        for optimizer, state in zip(self.optimizers, states, strict=True):
            flags = [
                {k: g[k] for k in IMPLEMENTATION_FLAGS if k in g} for g in optimizer.param_groups
            ]
            optimizer.load_state_dict(state)
            for group, kept in zip(optimizer.param_groups, flags, strict=True):
                group.update(kept)


def monitor_score(metrics: dict[str, float], monitor: str) -> float:
    """The early-stopping score of validation ``metrics`` (higher is better). A split with one
    class has no AUC: its Logloss decides."""
    auc, logloss = metrics["auc"], metrics["logloss"]
    if monitor == "logloss" or math.isnan(auc):
        return -logloss
    return auc if monitor == "auc" else auc - logloss


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (``None``: leave as is), then restore
    the previous count: a library call must not change the caller's process-wide setting."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def id_prior(model: nn.Module, entry: ModelEntry, config: TrainConfig) -> float:
    """The strength of the prior on ``model``'s feature-id rows (``TrainConfig.id_prior``):
    the configured one, or by default :data:`DEEP_ID_PRIOR` where a deep component (an MLP)
    reads embeddings and none elsewhere (FM's pairwise term is all it has, and the prior
    shrinks it: README); none for FTRL (its own L1 and L2) and without embeddings."""
    if entry.optimizer != "adam" or not any(isinstance(m, FieldEmbedding) for m in model.modules()):
        return 0.0
    if config.id_prior is not None:
        return config.id_prior
    return DEEP_ID_PRIOR if any(isinstance(m, MLP) for m in model.modules()) else 0.0


def feature_counts(data: EncodedArrays, num_features: int, chunk: int = 1 << 20) -> torch.Tensor:
    """How many times each feature id occurs in ``data``'s ids (``[num_features]`` int64),
    read ``chunk`` rows at a time (a memory-mapped split is never held whole)."""
    counts = np.zeros(num_features, dtype=np.int64)
    for start in range(0, len(data), chunk):
        ids = np.asarray(data.ids[start : start + chunk]).ravel()
        counts += np.bincount(ids, minlength=num_features)[:num_features]
    return torch.from_numpy(counts)


def embedding_tables(model: nn.Module) -> list[nn.Embedding]:
    return [m for m in model.modules() if isinstance(m, nn.Embedding)]


def use_sparse_updates(
    model: nn.Module,
    entry: ModelEntry,
    config: TrainConfig,
    device: torch.device,
    slots: int,
    world: int = 1,
) -> bool:
    """The embedding update rule for this run (see the module docs): sparse row updates when
    the tables have more rows than ``factor`` x the ids of a batch. A dense step costs in
    proportion to the table (Adam over every row; under DDP also an all-reduce of every row),
    a sparse one in proportion to the batch's ids (coalescing and gathering them). The factor:
    4 on CPU and under DDP (measured on CPU, BENCHMARKS.md), 64 on one GPU, where a fused Adam
    over the whole table is one memory-bound kernel (dense was 1.31x faster at 160k rows on an
    H200; 64 x 4096 x 39 ids is about 10M rows, where a fused step over 10 + 1 floats per row
    costs about what the sparse path does: ``gpu_suite.sh`` measures both at 10M rows)."""
    if entry.optimizer != "adam" or not embedding_tables(model):
        return False
    if config.embedding_updates != "auto":
        return config.embedding_updates == "sparse"
    factor = SPARSE_FACTOR_ONE_GPU if device.type == "cuda" and world == 1 else SPARSE_FACTOR
    rows = sum(t.num_embeddings for t in embedding_tables(model))
    return rows > factor * config.batch_size * slots


def make_optimizer(
    model: nn.Module,
    entry: ModelEntry,
    config: TrainConfig,
    *,
    sparse: bool = False,
    scale: float = 1.0,
) -> Optimizers:
    lr = (config.lr if config.lr is not None else DEFAULT_LR[entry.optimizer]) * scale
    if entry.optimizer == "ftrl":
        return Optimizers(
            [
                FTRL(
                    model.parameters(),
                    alpha=lr,
                    beta=config.ftrl_beta,
                    l1=config.ftrl_l1,
                    l2=config.ftrl_l2,
                )
            ]
        )
    tables = embedding_tables(model) if sparse else []
    for table in embedding_tables(model):
        table.sparse = sparse
    sparse_ids = {id(t.weight) for t in tables}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    # fused: one pass over all parameters (CPU: 1.5 vs 10.6 ms per step for DeepFM-D's 1.5M
    # parameters, the per-tensor loop's temporaries included)
    optimizers: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=lr, fused=True)]
    if tables:
        optimizers.append(LazyAdam([t.weight for t in tables], lr=lr))
    return Optimizers(optimizers)


# -- devices and data parallelism --------------------------------------------------------------


def use_device(device: torch.device) -> torch.device:
    """Make ``device`` this process's current device: on CUDA ``set_device`` (a model on
    ``cuda:1`` with ``cuda:0`` current would, among others, checkpoint ``cuda:0``'s random
    state) and TF32 matmuls."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def data_parallel(
    model: nn.Module, dist: Distributed, device: torch.device, row_tables: list[torch.Tensor]
) -> nn.Module:
    """``model`` wrapped in DDP when ranks train together. Tables with sparse row updates stay
    out of DDP (it would all-reduce them densely, or, with NCCL, fail on sparse gradients):
    they start from rank 0's weights here, and the training step averages their touched rows
    (:meth:`Distributed.average_row_gradients`)."""
    if not dist.enabled:
        return model
    ignored = {id(t) for t in row_tables}
    names = [name for name, p in model.named_parameters() if id(p) in ignored]
    DDP = nn.parallel.DistributedDataParallel
    DDP._set_params_and_buffers_to_ignore_for_model(model, names)  # TorchRec does the same
    for table in row_tables:
        dist.broadcast_(table.detach())
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def missing_compiler(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot build code for ``device`` here, or None. Inductor writes
    C++ for the CPU and Triton kernels (whose launchers it compiles with the C compiler) for
    CUDA."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        compilers = (os.environ.get("CC"), "cc", "gcc", "clang")
    else:
        compilers = (os.environ.get("CXX"), "g++", "c++", "clang++")
    if not any(shutil.which(c) for c in compilers if c):
        return f"no {'C' if device.type == 'cuda' else 'C++'} compiler found"
    return None


def compile_model(
    net: nn.Module, device: torch.device, dist: Distributed
) -> tuple[nn.Module, bool]:
    """``(torch.compile(net), True)`` with static shapes (the trainer pads the last batch, so
    one graph serves every step) and, on one GPU, CUDA graphs (``reduce-overhead``: a step of
    a few milliseconds is otherwise bound by kernel launches); under DDP the default mode
    (CUDA graphs and DDP's bucketed all-reduce do not mix). ``(net, False)``, with a warning,
    when there is no compiler for the device: training runs eagerly."""
    reason = missing_compiler(device)
    if reason is not None:
        warnings.warn(f"--compile: {reason}; training runs eagerly", RuntimeWarning, stacklevel=3)
        return net, False
    mode = "reduce-overhead" if device.type == "cuda" and not dist.enabled else None
    return torch.compile(net, dynamic=False, mode=mode), True


# -- the trainer ----------------------------------------------------------------------------------

#: TrainConfig fields that change what a run computes (a resumed run must match them): those
#: marked neither :data:`NOT_IN_RESULT` nor :data:`PER_INVOCATION` (a new field is one unless
#: marked)
RESULT_SETTINGS = tuple(f.name for f in fields(TrainConfig) if not f.metadata)
_FINGERPRINT_ROWS = 256


def data_fingerprint(data: EncodedArrays | None) -> dict[str, Any]:
    """Rows, slots and a digest of the first and last rows (ids, values, labels): cheap on a
    memory map of any size, and different for other data or another split of it."""
    if data is None:
        return {"rows": 0}
    digest = hashlib.sha256()
    head, tail = slice(0, _FINGERPRINT_ROWS), slice(-_FINGERPRINT_ROWS, None)
    for array in (data.ids, data.values, data.labels):
        if array is not None:
            for part in (head, tail):
                digest.update(np.ascontiguousarray(array[part]).tobytes())
    return {"rows": len(data), "slots": int(data.ids.shape[1]), "sha256": digest.hexdigest()[:16]}


def run_record(
    config: TrainConfig,
    model: nn.Module,
    entry: ModelEntry,
    train: EncodedArrays,
    valid: EncodedArrays | None,
    identity: dict[str, Any] | None,
) -> dict[str, Any]:
    """``{"id", "identity"}`` of a run: the settings that shape its result (model, training
    settings, data), recorded in each checkpoint; the id is a digest of them."""
    settings = config.to_dict()
    record = {
        "model": entry.name,
        "architecture": hashlib.sha256(repr(model).encode()).hexdigest()[:16],
        "train": {k: settings[k] for k in RESULT_SETTINGS},
        "data": {"train": data_fingerprint(train), "valid": data_fingerprint(valid)},
        **(identity or {}),
    }
    text = json.dumps(record, sort_keys=True, default=str)
    return {"id": hashlib.sha256(text.encode()).hexdigest()[:16], "identity": json.loads(text)}


@dataclass
class Fallback:
    """A fallback model's weights (in the trained model's shape), its validation metrics and
    the monitored score the trained model must exceed to replace it."""

    state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    bar: float


@dataclass
class _Job:
    """What a fit is asked for: train ``model`` (``entry``'s) on ``train``, validating on
    ``valid`` (early stopping, calibration) when it has rows."""

    model: nn.Module
    entry: ModelEntry
    train: EncodedArrays
    valid: EncodedArrays | None


@dataclass
class _Session:
    """The objects one fit trains with: built by the set-up phase, used by every other one."""

    model: nn.Module
    net: nn.Module  # the model, or its DDP / compiled wrapper: what the training step calls
    optimizer: Optimizers
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None
    generator: torch.Generator  # the shuffling stream (the same seed on every rank)
    device: torch.device
    data: Batches | StreamedBatches  # this rank's shard of the training split
    rows: int  # rows per rank and epoch: the smallest shard (equal steps on every rank)
    valid: EncodedArrays | None
    valid_data: Batches | EncodedArrays | None  # this rank's shard of ``valid``, placed
    row_tables: list[torch.Tensor]  # tables with sparse row updates (averaged by hand)
    compiled: bool
    deadline: float | None  # time.perf_counter() at which training stops
    # the id prior's: each feature id's count in the training rows (None: no prior), the
    # strength, and the learning rate its phase starts at (the run's initial one)
    prior_counts: torch.Tensor | None = None
    prior_strength: float = 0.0
    initial_lr: float = 0.0


@dataclass
class TrainState:
    """Where training stands: the position (epoch, step in it, global step, the epoch's loss
    so far and the generator state its permutation was drawn from), early stopping (best
    score, epochs without a new best, the best epoch's weights and metrics), the history and
    the time and samples spent. :meth:`save` writes it, with the model, the optimiser, the
    scheduler and every rank's RNG states, as a checkpoint; :meth:`restore` reads it back."""

    epoch: int = 1
    step: int = 0  # steps done in this epoch
    global_step: int = 0
    loss_sum: float = 0.0  # the epoch's summed loss at the last checkpoint, all ranks
    best_score: float = -math.inf
    stale: int = 0
    epoch_generator: torch.Tensor | None = None  # the shuffling state before this epoch's draw
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_valid: dict[str, float] = field(default_factory=dict)
    best_weights: dict[str, torch.Tensor] | None = None
    prior_from: int = 0  # the first epoch with the id prior (0: not started)
    train_seconds: float = 0.0
    train_samples: int = 0

    def observe(
        self, epoch: int, score: float, metrics: dict[str, float], model: nn.Module
    ) -> None:
        """Count a validation ``score``: a new best keeps a copy of the weights."""
        if score > self.best_score:
            self.best_score, self.stale = score, 0
            self.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.best_epoch, self.best_valid = epoch, metrics
        else:
            self.stale += 1

    def next_epoch(self, record: dict[str, float]) -> None:
        """Close the epoch of ``record`` (its history line): the next starts at its step 0."""
        self.history.append(record)
        self.epoch, self.step, self.loss_sum = int(record["epoch"]) + 1, 0, 0.0
        self.epoch_generator = None

    def result_fields(self) -> dict[str, Any]:
        """The fields the state shares with FitResult (saved as ``result`` in checkpoints)."""
        own = {f.name for f in fields(self)}
        return {f.name: getattr(self, f.name) for f in fields(FitResult) if f.name in own}

    def save(self, directory: str, session: _Session, dist: Distributed, header: dict) -> None:
        """Write a checkpoint of step ``global_step`` (every rank its RNG file, rank 0 the
        rest; ``header``: the world, config and run record). The on-disk layout is
        :mod:`deepfm.train.checkpoint`'s; the keys of ``state.json`` are those read by
        :meth:`restore`."""
        folder = ckpt.staging(directory, self.global_step)
        ckpt.write_rng(folder, dist.rank, ckpt.rng_state(session.generator))
        dist.barrier()
        if dist.is_main:
            state = {
                "progress": {
                    "epoch": self.epoch,
                    "step": self.step,
                    "global_step": self.global_step,
                    "loss_sum": self.loss_sum,
                    "best_score": self.best_score,
                    "stale": self.stale,
                },
                "scheduler": None if session.scheduler is None else session.scheduler.state_dict(),
                "result": self.result_fields(),
                **header,
            }
            tree = {
                "optimizer": session.optimizer.state_dict(),
                "epoch_generator": self.epoch_generator,
            }
            ckpt.commit_or_fail(
                directory,
                self.global_step,
                model=session.model.state_dict(),
                best=self.best_weights,
                optimizer=tree,
                state=state,
            )
        dist.barrier()

    @classmethod
    def restore(cls, resumed: ckpt.Checkpoint, session: _Session, dist: Distributed) -> TrainState:
        """The state saved in ``resumed``; loads its model, optimiser, scheduler and this
        rank's RNG states into ``s`` on the way."""
        state = resumed.state
        if state.get("world", 1) != dist.world:
            raise ConfigError(
                f"the checkpoint was written by {state['world']} processes, this run has "
                f"{dist.world}: resume with the same number"
            )
        cls._load_training_objects(resumed, session, dist.rank)
        saved, result = state["progress"], state["result"]
        best = resumed.best
        return cls(
            epoch=int(saved["epoch"]),
            step=int(saved["step"]),
            global_step=int(saved["global_step"]),
            # the epoch's loss so far, summed over the ranks: counted once, on rank 0
            loss_sum=float(saved["loss_sum"]) if dist.is_main else 0.0,
            best_score=float(saved["best_score"]),
            stale=int(saved["stale"]),
            epoch_generator=resumed.optimizer["epoch_generator"],
            history=list(result["history"]),
            best_epoch=int(result["best_epoch"]),
            best_valid=dict(result["best_valid"]),
            best_weights=None
            if best is None
            else {k: v.to(session.device) for k, v in best.items()},
            train_seconds=float(result["train_seconds"]),
            train_samples=int(result["train_samples"]),
            prior_from=int(result.get("prior_from", 0)),
        )

    @staticmethod
    def _load_training_objects(resumed: ckpt.Checkpoint, session: _Session, rank: int) -> None:
        try:
            session.model.load_state_dict(resumed.model)
            session.optimizer.load_state_dict(resumed.optimizer["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"--resume {resumed.path}: the checkpoint does not fit this model: {exc}"
            ) from None
        if session.scheduler is not None and resumed.state.get("scheduler") is not None:
            session.scheduler.load_state_dict(resumed.state["scheduler"])
            session.optimizer.follow_primary_lr()
        rng = resumed.rng(rank)
        if rng is None:
            raise ConfigError(f"--resume {resumed.path}: no RNG state for rank {rank}")
        ckpt.restore_rng(rng, session.generator)


def make_scheduler(
    optimizer: Optimizers, entry: ModelEntry, config: TrainConfig, valid: EncodedArrays | None
) -> torch.optim.lr_scheduler.ReduceLROnPlateau | None:
    """Decay on plateau of the validation score (Adam only, and only with validation rows)."""
    if entry.optimizer != "adam" or config.lr_decay >= 1 or valid is None or not len(valid):
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer.primary, mode="max", factor=config.lr_decay, patience=config.decay_patience
    )


class Trainer:
    """``Trainer(config).fit(model, entry, train, valid)`` trains ``model`` in place.

    A fit runs in phases, each a method: :meth:`_begin` (device, seed, run record, the
    checkpoint to resume), :meth:`_pretrain` (FNN), :meth:`_set_up` (optimiser, placement
    of the data, DDP, compilation), then per epoch :meth:`_train_epoch` (with checkpoints
    every ``checkpoint_every`` steps, :meth:`TrainState.save`) and :meth:`_validate` (early
    stopping), and :meth:`_finish` (the best weights, calibration). What carries over from
    one phase to the next is explicit: the :class:`_Job` (the inputs), a :class:`_Session`
    (the objects set-up built) and a :class:`TrainState` (the numbers a checkpoint keeps)."""

    def __init__(self, config: TrainConfig | None = None, dist: Distributed | None = None) -> None:
        self.config = config or TrainConfig()
        self.dist = dist or Distributed.current()

    def fit(
        self,
        model: nn.Module,
        entry: ModelEntry,
        train: EncodedArrays,
        valid: EncodedArrays | None = None,
        *,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
        on_step: Callable[[int], None] | None = None,
        optimizer_state: dict[str, torch.Tensor] | None = None,
        pretrain: bool = True,
        identity: dict[str, Any] | None = None,
    ) -> FitResult:
        """Train ``model`` in place. A warm start passes the weights in ``model``, the saved
        ``optimizer_state`` (:meth:`Optimizers.named_state`; None: a fresh optimiser) and
        ``pretrain=False`` (FNN's FM pre-training initialises a new model only).
        ``identity``: what the caller knows of the run beyond the model and the arrays (its
        model config, the feature map's digest), recorded in checkpoints and compared on
        resume together with the training settings and a fingerprint of the data."""
        config = self.config
        deadline = None if config.time_limit is None else time.perf_counter() + config.time_limit
        with torch_threads(config.threads):
            job = _Job(model, entry, train, valid)
            device, resumed = self._begin(job, identity)
            spent: tuple[float, int] = (0.0, 0)
            fresh = None  # a fallback's: the model's own initial weights, trained from
            # FNN's start (a resumed run's is in its checkpoint); DeepFM's LR, fitted again on
            # resume, and only when a validation split can choose it
            start = entry.pretrain is not None and resumed is None
            if pretrain and (start or (entry.fallback is not None and valid is not None)):
                spent, fresh = self._pretrain(job, device)
            if resumed is not None:
                optimizer_state = None  # the checkpoint's optimiser state wins
            session, setup = self._set_up(job, device, optimizer_state, deadline)
            fallback = None
            if fresh is not None:
                if session.valid_data is not None:
                    assert session.valid is not None
                    fallback = self._fallback(session.model, session.valid_data, session.valid)
                session.model.load_state_dict(fresh)
            if resumed is not None:
                state = TrainState.restore(resumed, session, self.dist)
            else:
                state = TrainState(train_seconds=spent[0], train_samples=spent[1])
            self._clear_partials()
            while state.epoch <= config.epochs:
                record, out_of_time = self._train_epoch(session, state, on_step)
                stop = self._validate(session, state, record) or out_of_time
                self._end_epoch(state, record, on_epoch, entry.name)
                if stop:
                    break
            return self._finish(session, state, setup, fallback)

    # -- the phases -------------------------------------------------------------------------

    def _begin(
        self, job: _Job, identity: dict[str, Any] | None
    ) -> tuple[torch.device, ckpt.Checkpoint | None]:
        """The device (the model moved there), this rank's random stream, the run record and
        the checkpoint to resume from (None: a new run, whose directory must be empty)."""
        config, dist = self.config, self.dist
        device = use_device(dist.device(config.device))
        # this rank's stream (dropout masks): seed + rank, so ranks draw different masks; the
        # initial weights are rank 0's on every rank (DDP broadcasts them)
        torch.manual_seed(config.seed + dist.rank)
        if job.train.labels is None or len(job.train) == 0:
            raise ConfigError("training needs labeled rows")
        self.run = run_record(config, job.model, job.entry, job.train, job.valid, identity)
        resumed = ckpt.load_latest(config.resume) if config.resume else None
        if resumed is not None:
            ckpt.check_same_run(resumed, self.run["identity"])
        elif config.checkpoint_every:
            assert config.checkpoint_dir is not None
            ckpt.start_directory(config.checkpoint_dir)
        job.model.to(device)
        return device, resumed

    def _pretrain(
        self, job: _Job, device: torch.device
    ) -> tuple[tuple[float, int], dict[str, torch.Tensor] | None]:
        """Fit the model the entry names first and copy it in: FNN's FM, its initialisation;
        DeepFM's LR, its fallback (:meth:`_fallback`). Returns the seconds and samples spent,
        which count in this model's training (a fallback's seconds only: the samples/s
        reported are the model's own steps), and for a fallback the model's own initial
        weights, which it trains from."""
        config = self.config
        teacher, teacher_entry = build_pretrain_model(job.model, job.entry)
        pre_config = replace(
            config, checkpoint_every=0, checkpoint_dir=None, resume=None, calibration="none"
        )
        if teacher_entry.optimizer != job.entry.optimizer:  # DeepFM's LR: FTRL's own rate
            pre_config = replace(pre_config, lr=None)
        pre = Trainer(pre_config, self.dist).fit(teacher, teacher_entry, job.train, job.valid)
        started = time.perf_counter()
        fresh = None
        if job.entry.fallback is not None:
            fresh = {k: v.detach().clone() for k, v in job.model.state_dict().items()}
        job.model.init_from_pretrained(teacher.to(device))
        seconds = pre.train_seconds + time.perf_counter() - started
        torch.manual_seed(config.seed + self.dist.rank)
        samples = 0 if job.entry.fallback is not None else pre.train_samples
        return (seconds, samples), fresh

    def _set_up(
        self,
        job: _Job,
        device: torch.device,
        optimizer_state: dict[str, torch.Tensor] | None,
        deadline: float | None,
    ) -> tuple[_Session, dict[str, Any]]:
        """The optimiser (continuing ``optimizer_state`` if given), the scheduler, the data
        placed on the device or streamed, the model wrapped for DDP and compiled; and how
        (``FitResult.setup``)."""
        config, dist = self.config, self.dist
        model, entry, train, valid = job.model, job.entry, job.train, job.valid
        shard = dist.shard(train)
        slots = int(train.ids.shape[1])
        sparse = use_sparse_updates(model, entry, config, device, slots, dist.world)
        optimizer = make_optimizer(
            model, entry, config, sparse=sparse, scale=lr_scale(config.lr_scaling, dist.world)
        )
        continued = optimizer.load_named_state(model, optimizer_state) if optimizer_state else 0
        strength = id_prior(model, entry, config)
        counts = None
        if strength > 0:
            # every rank counts the whole split: the prior is the objective's, not a shard's
            rows = max(t.num_embeddings for t in embedding_tables(model))
            counts = feature_counts(train, rows).to(device)
        scheduler = make_scheduler(optimizer, entry, config, valid)
        valid_shard = dist.shard(valid) if valid is not None and len(valid) else None
        data, valid_data, batches = self._place(model, shard, valid_shard, device, sparse)
        setup = {
            "device": str(device),
            "embedding_updates": "sparse" if sparse else "dense",
            "batches": batches,
            # what the matmuls run in: fp32 on CUDA means TF32 (use_device turns it on)
            "precision": matmul_precision(device, config.precision),
            "world": dist.world,
            "lr": optimizer.lr,
            "optimizer_state": "continued" if continued else "fresh",
        }
        row_tables = [t.weight for t in embedding_tables(model)] if sparse else []
        net = data_parallel(model, dist, device, row_tables)
        compiled = False
        if config.compile:
            net, compiled = compile_model(net, device, dist)
        setup["compiled"] = compiled
        return _Session(
            model=model,
            net=net,
            optimizer=optimizer,
            scheduler=scheduler,
            generator=torch.Generator().manual_seed(config.seed),
            device=device,
            data=data,
            rows=dist.rows_per_rank(len(train)),
            valid=valid,
            valid_data=valid_data,
            row_tables=row_tables,
            compiled=compiled,
            deadline=deadline,
            prior_counts=counts,
            prior_strength=strength,
            initial_lr=optimizer.lr,
        ), setup

    def _place(
        self,
        model: nn.Module,
        shard: EncodedArrays,
        valid_shard: EncodedArrays | None,
        device: torch.device,
        sparse: bool,
    ) -> tuple[Batches | StreamedBatches, Batches | EncodedArrays | None, str]:
        """This rank's training and validation shards, kept on the device when they fit beside
        the training state (:func:`plan_residency`) or streamed; and how batches are made."""
        config = self.config
        need = training_bytes(
            model,
            sparse=sparse,
            batch_size=config.batch_size,
            eval_batch_size=config.eval_batch_size,
            slots=int(shard.ids.shape[1]),
        )
        resident, valid_resident = plan_residency(device, need, shard, valid_shard)
        valid_data = None if valid_shard is None else placed(valid_shard, device, valid_resident)
        if resident:
            return Batches(shard, device), valid_data, "device-resident"
        kind = "synchronous" if config.sync_loading else "asynchronous"
        return StreamedBatches(shard, device, not config.sync_loading), valid_data, kind

    def _clear_partials(self) -> None:
        """Folders half-assembled by a killed run go before the first checkpoint."""
        config = self.config
        if config.checkpoint_every:
            if self.dist.is_main:
                ckpt.clear_partials(config.checkpoint_dir or config.resume or ".")
            self.dist.barrier()

    def _train_epoch(
        self, session: _Session, state: TrainState, on_step: Callable[[int], None] | None
    ) -> tuple[dict[str, float], bool]:
        """One epoch (or its rest, when resumed mid-epoch): its record (epoch, train loss,
        learning rate, seconds) and whether the time limit ran out."""
        config, dist = self.config, self.dist
        if state.epoch_generator is not None:
            session.generator.set_state(state.epoch_generator)  # resume: the same permutation
        state.epoch_generator = session.generator.get_state()
        if session.prior_counts is not None:
            on = 0 < state.prior_from <= state.epoch  # the second phase (:meth:`_start_prior`)
            set_id_prior(session.model, session.prior_counts, session.prior_strength * on)
        session.model.train()
        started = time.perf_counter()
        order = torch.randperm(len(session.data), generator=session.generator)[: session.rows]
        loss_sum = torch.zeros((), device=session.device) + state.loss_sum
        bar = self._progress_bar(state, session.rows)
        out_of_time = False
        for batch in session.data.batches(order, config.batch_size, state.step):
            loss_sum += self._step(session, batch)
            state.step += 1
            state.global_step += 1
            self._after_step(session, state, bar, loss_sum)
            if on_step is not None:
                on_step(state.global_step)
            if session.deadline is not None and state.step % CLOCK_EVERY == 0:
                # the same decision on every rank: the latest of their clocks
                out_of_time = dist.any_true(time.perf_counter() > session.deadline, session.device)
                if out_of_time:
                    break
        bar.close()
        # the one synchronisation of the epoch; summed over the ranks, so that every rank
        # sees the same loss and a non-finite one stops them all together
        train_loss = float(dist.sum(loss_sum)) / (session.rows * dist.world)
        seconds = time.perf_counter() - started
        state.train_seconds += seconds
        state.train_samples += session.rows * dist.world
        if not math.isfinite(train_loss):  # before scoring NaN predictions
            raise ConfigError(
                f"training diverged at epoch {state.epoch} (loss {train_loss}); "
                "lower the learning rate"
            )
        record = {"epoch": state.epoch, "train_loss": train_loss, "lr": session.optimizer.lr}
        return {**record, "seconds": seconds}, out_of_time

    def _progress_bar(self, state: TrainState, rows: int) -> tqdm:
        config = self.config
        return tqdm(
            total=math.ceil(rows / config.batch_size),
            initial=state.step,
            desc=f"epoch {state.epoch}/{config.epochs}",
            # None: tqdm hides the per-step bar when stderr is not a terminal (logs keep the
            # per-epoch lines instead of thousands of carriage returns)
            disable=None if config.progress and self.dist.is_main else True,
            leave=False,
            mininterval=0.5,
        )

    def _step(self, session: _Session, batch: Batch) -> torch.Tensor:
        """One optimiser step on ``batch``; returns its summed loss (a device scalar)."""
        config = self.config
        rows = len(batch)
        weights = None
        if session.compiled:  # one shape for every step: the last batch is padded
            batch, weights = padded(batch, config.batch_size)
        with autocast(session.device, config.precision):
            logits = session.net(batch.ids, batch.values)
        loss = batch_loss(logits, batch.labels, weights)
        objective = loss * rows if session.optimizer.sums_loss else loss
        objective = objective + regularization(session.model, weights)
        session.optimizer.zero_grad()
        objective.backward()
        self.dist.average_row_gradients(session.row_tables)
        session.optimizer.step()
        return loss.detach() * rows

    def _after_step(
        self, session: _Session, state: TrainState, bar: tqdm, loss_sum: torch.Tensor
    ) -> None:
        """The progress bar and, every ``checkpoint_every`` steps, a checkpoint."""
        config = self.config
        bar.update()
        if not bar.disable and state.step % RUNNING_LOSS_EVERY == 0:
            running = float(loss_sum) / (state.step * config.batch_size)
            bar.set_postfix(loss=f"{running:.5f}", refresh=False)
        if config.checkpoint_every and state.global_step % config.checkpoint_every == 0:
            state.loss_sum = float(self.dist.sum(loss_sum))  # the epoch's, all ranks
            directory = config.checkpoint_dir or config.resume
            assert directory is not None
            header = {"world": self.dist.world, "config": config.to_dict(), "run": self.run}
            state.save(directory, session, self.dist, header)

    def _validate(self, session: _Session, state: TrainState, record: dict[str, float]) -> bool:
        """Score the validation rows (added to ``record``), keep the best epoch, decay the
        learning rate on a plateau. Returns whether patience ran out."""
        if session.valid_data is None:
            return False
        assert session.valid is not None
        metrics = self._evaluate(session.model, session.valid_data, session.valid)
        record.update({f"valid_{k}": v for k, v in metrics.items()})
        score = monitor_score(metrics, self.config.monitor)
        state.observe(state.epoch, score, metrics, session.model)
        if session.scheduler is not None:
            session.scheduler.step(score)
            session.optimizer.follow_primary_lr()
        stop = state.stale >= self.config.patience
        if stop and session.prior_counts is not None and state.prior_from == 0:
            self._start_prior(session, state)
            return False
        return stop

    def _start_prior(self, session: _Session, state: TrainState) -> None:
        """The id prior's phase: from the next epoch, from the best epoch's weights, at the
        initial learning rate, with ``patience`` epochs again to find a new best. Started
        from the model's own optimum, so the interactions have formed: a prior from the first
        step pulls every id to zero, where an interaction's gradient (a product of rows) is
        zero too, and on few data it can hold them there (README, "How the defaults were
        chosen"). The best epoch of either phase is what the run keeps."""
        assert state.best_weights is not None
        state.prior_from, state.stale = state.epoch + 1, 0
        session.model.load_state_dict(state.best_weights)
        for group in session.optimizer.primary.param_groups:
            group["lr"] = session.initial_lr
        session.optimizer.follow_primary_lr()
        if session.scheduler is not None:
            session.scheduler.num_bad_epochs = 0

    def _end_epoch(
        self,
        state: TrainState,
        record: dict[str, float],
        on_epoch: Callable[[dict[str, float]], None] | None,
        name: str,
    ) -> None:
        state.next_epoch(record)
        if on_epoch is not None:
            on_epoch(record)
        if self.config.progress and self.dist.is_main:
            shown = {k: round(v, 5) for k, v in record.items() if k != "epoch"}
            tqdm.write(f"[{name}] epoch {record['epoch']}: {shown}")
            if state.prior_from == state.epoch <= self.config.epochs:  # it starts next
                tqdm.write(
                    f"[{name}] the id prior from epoch {state.prior_from}, from epoch "
                    f"{state.best_epoch}'s weights (no new best in {self.config.patience} "
                    "epochs without it)"
                )

    def _finish(
        self,
        session: _Session,
        state: TrainState,
        setup: dict[str, Any],
        fallback: Fallback | None = None,
    ) -> FitResult:
        """The best epoch's weights back in the model (the last epoch's without validation;
        the ``fallback``'s, as epoch 0, when no epoch cleared its bar), the calibration fitted
        on the validation rows, and what training produced."""
        if fallback is not None:
            kept = not state.best_score > fallback.bar
            setup["fallback"] = {"kept": kept, "bar": fallback.bar, "valid": fallback.metrics}
            if kept:
                state.best_weights, state.best_epoch = fallback.state, 0
                state.best_valid = fallback.metrics
            if kept and self.config.progress and self.dist.is_main:
                tqdm.write(
                    f"kept the fallback (the model's LR, fitted first): no epoch beat its "
                    f"validation {self.config.monitor} by one standard error ({fallback.bar:.5f})"
                )
        optimizer_state = session.optimizer.named_state(session.model)
        result = FitResult(**state.result_fields(), setup=setup, optimizer_state=optimizer_state)
        for table in embedding_tables(session.model):
            table.sparse = False  # a trained model is an ordinary module again
        set_id_prior(session.model, None, 0.0)
        if state.best_weights is not None:
            session.model.load_state_dict(state.best_weights)
        else:
            result.best_epoch = len(state.history)
        if self.config.calibration == "beta" and session.valid_data is not None:
            assert session.valid is not None
            logits = self._logits(session.model, session.valid_data, session.valid, "fp32")
            result.calibration = fit_calibration(logits, np.asarray(session.valid.labels))
        return result

    def _fallback(
        self, model: nn.Module, valid_data: Batches | EncodedArrays, valid: EncodedArrays
    ) -> Fallback:
        """``model`` as it is (DeepFM: its LR, trained first and copied in by
        :meth:`deepfm.models.deepfm.DeepFM.init_from_pretrained`) as the fallback of its own
        training, with the bar that training must clear: the fallback's validation score plus
        one standard error of it (:func:`~deepfm.train.metrics.standard_errors`; for
        ``auc-logloss`` the two combined).

        On a small validation split a smaller gain is noise (Criteo sample: 948 validation rows,
        one standard error of AUC 0.021), and there the LR is the better model on new rows
        (DeepFM-D alone 0.007 AUC behind it; README, "How the defaults were chosen"). Where
        data is plentiful the trained model clears the bar (Frappe and MovieLens samples: by 2
        to 4 standard errors; app market: by far) and the fallback changes nothing."""
        labels = np.asarray(valid.labels)
        probabilities = sigmoid(self._logits(model, valid_data, valid))
        metrics = auc_logloss(labels, probabilities)
        errors = standard_errors(labels, probabilities)
        if self.config.monitor == "logloss" or math.isnan(metrics["auc"]):
            margin = errors["logloss"]
        elif self.config.monitor == "auc":
            margin = errors["auc"]
        else:
            margin = math.hypot(errors["auc"], errors["logloss"])
        bar = monitor_score(metrics, self.config.monitor)
        if not math.isnan(margin):  # one validation row has no spread: no margin
            bar += margin
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return Fallback(state, metrics, bar)

    # -- evaluation across ranks ---------------------------------------------------------------

    def evaluate(self, model: nn.Module, data: EncodedArrays) -> dict[str, float]:
        """AUC and Logloss of ``model`` on ``data`` (fp32, or TF32 on CUDA: the reported
        metrics are not bf16's): each rank scores its shard (kept on the device when it fits,
        else streamed through pinned memory one batch ahead) and every rank gets the metrics
        of the whole set."""
        device = _device_of(model)
        shard = self.dist.shard(data)
        need = activation_bytes(model, self.config.eval_batch_size, int(data.ids.shape[1]))
        with torch_threads(self.config.threads):
            _, resident = plan_residency(device, need, None, shard)
            return self._evaluate(model, placed(shard, device, resident), data, "fp32")

    def _evaluate(
        self,
        model: nn.Module,
        shard: Batches | EncodedArrays,
        valid: EncodedArrays,
        precision: str | None = None,
    ) -> dict[str, float]:
        """Each rank scores its ``shard`` of ``valid`` (in the training's precision unless
        told); the logits are gathered, every rank computes the same AUC and Logloss (and so
        takes the same early-stopping decisions)."""
        logits = self._logits(model, shard, valid, precision)
        return auc_logloss(np.asarray(valid.labels), sigmoid(logits))

    def _logits(
        self,
        model: nn.Module,
        shard: Batches | EncodedArrays,
        valid: EncodedArrays,
        precision: str | None = None,
    ) -> np.ndarray:
        """The logits of every row of ``valid``, each rank scoring its ``shard``."""
        local = predict_logits(
            model,
            shard,
            self.config.eval_batch_size,
            precision=precision or self.config.precision,
            as_tensor=True,
        )
        return self.dist.gather_rows(local, len(valid)).cpu().numpy()
