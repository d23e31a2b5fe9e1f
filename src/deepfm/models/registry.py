"""Models by name: each entry builds an ``nn.Module`` mapping ``(ids, values)`` to logits ``[B]``.

A model knows nothing about training; the trainer reads the entry's ``optimizer`` (Adam, or FTRL
for LR), its ``pretrain`` field: the registry name of a model to train first, whose weights then
initialise this one (FNN: ``pretrain="fm"``; see :func:`build_pretrain_model`), and its
``fallback`` field: the registry name of a model nested in this one, trained first and kept
instead when this one does not beat it on validation (DeepFM: ``fallback="lr"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, Protocol

import torch
from torch import nn

from deepfm.errors import ConfigError, is_finite_number, is_integer
from deepfm.nn import InputLayout
from deepfm.nn.mlp import ACTIVATIONS

#: The paper's embedding size k for FM and DeepFM models; DNN-family models use k + 1 (Sec. III-C).
BASE_EMBED_DIM = 10

EmbedRule = Literal["k", "k+1", "none"]

#: Rows of a hashed cross table (2^20 weights: 4 MB, and 8 MB more of FTRL state). The paper
#: gives no size; collisions matter little once the table is much larger than the number of
#: distinct pairs a model sees often enough to learn.
DEFAULT_CROSS_BUCKETS = 2**20


def parse_crosses(crosses: str | Sequence[str]) -> tuple[str, ...]:
    """``"a×b, c×d"`` or ``["a×b", "c×d"]`` → ``("a×b", "c×d")``; the field names are checked
    against the feature map when the model is built (:func:`deepfm.nn.cross.resolve_crosses`)."""
    items = crosses.split(",") if isinstance(crosses, str) else list(crosses)
    if not all(isinstance(item, str) for item in items):
        raise ConfigError(f"crosses are strings like 'a×b', got {crosses!r}")
    out = tuple(item.strip() for item in items)
    if any(not item for item in out):
        raise ConfigError(f"an empty cross in {crosses!r}; write them like 'a×b,c×d'")
    return out


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters shared by every model (a model ignores the ones it has no use for).

    ``embed_dim`` None means the paper's default for the model (k or k + 1, with k = 10).
    ``dropout`` is the drop rate of the deep component (the paper's "dropout" is the keep
    probability: keep 0.5 ⇔ dropout 0.5, keep 0.9 ⇔ dropout 0.1). ``l2`` regularises the FM
    component (order-1 weights and FM embeddings) on the rows each batch uses.
    ``crosses``: LR's chosen field crosses (Eq. 2), ``"a×b"`` each (a comma-separated string is
    split); ``cross_buckets``: the rows of a hashed cross table (Poly-2's one table, Eq. 3, or a
    chosen cross whose pairs of values do not fit).
    """

    name: str = "deepfm"
    embed_dim: int | None = None
    hidden: tuple[int, ...] = (400, 400, 400)
    activation: str = "relu"
    dropout: float = 0.5
    l2: float = 0.0
    crosses: tuple[str, ...] = ()
    cross_buckets: int = DEFAULT_CROSS_BUCKETS
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"the model name must be a string, got {self.name!r}")
        hidden = self.hidden
        if not isinstance(hidden, list | tuple) or not all(is_integer(h) and h > 0 for h in hidden):
            raise ConfigError(f"hidden layer sizes must be positive integers, got {hidden!r}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in hidden))
        object.__setattr__(self, "crosses", parse_crosses(self.crosses))
        if not is_integer(self.cross_buckets):
            raise ConfigError(f"cross_buckets must be an integer, got {self.cross_buckets!r}")
        if self.cross_buckets < 1:
            raise ConfigError(f"cross_buckets must be positive, got {self.cross_buckets}")
        if self.embed_dim is not None and not (is_integer(self.embed_dim) and self.embed_dim > 0):
            raise ConfigError(f"embed_dim must be a positive integer, got {self.embed_dim!r}")
        if not (is_finite_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout is a drop rate in [0, 1), got {self.dropout!r}")
        if not (is_finite_number(self.l2) and self.l2 >= 0):
            raise ConfigError(f"l2 must be a finite number >= 0, got {self.l2!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra model settings must be a mapping, got {self.extra!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hidden"] = list(self.hidden)
        out["crosses"] = list(self.crosses)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


Builder = Callable[[InputLayout, ModelConfig], nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Builder
    description: str
    embed: EmbedRule = "k"
    optimizer: Literal["adam", "ftrl"] = "adam"
    #: registry name of a model trained before this one to initialise it (FNN: "fm")
    pretrain: str | None = None
    #: whether the model takes chosen field crosses (``ModelConfig.crosses``: LR)
    crosses: bool = False
    #: registry name of a model nested in this one (DeepFM: "lr", its order-1 part), trained
    #: before it and kept, copied into this model, when this one does not beat it on validation
    fallback: str | None = None

    @property
    def teacher(self) -> str | None:
        """The model trained before this one (to initialise it, or as its fallback)."""
        return self.pretrain or self.fallback

    def check(self, config: ModelConfig) -> None:
        """Refuse settings this model cannot use (a ConfigError naming them)."""
        if config.crosses and not self.crosses:
            takers = ", ".join(n for n in model_names() if get_entry(n).crosses)
            raise ConfigError(
                f"model {self.name!r} takes no crosses (only {takers} does: chosen field crosses;"
                " poly2 crosses every pair of fields)"
            )

    def embed_dim(self, config: ModelConfig) -> int:
        if config.embed_dim is not None:
            return config.embed_dim
        return BASE_EMBED_DIM + 1 if self.embed == "k+1" else BASE_EMBED_DIM


_REGISTRY: dict[str, ModelEntry] = {}


def register(
    name: str,
    description: str,
    *,
    embed: EmbedRule = "k",
    optimizer: Literal["adam", "ftrl"] = "adam",
    pretrain: str | None = None,
    crosses: bool = False,
    fallback: str | None = None,
) -> Callable[[Builder], Builder]:
    """Class decorator: ``@register("fm", "factorization machine")``."""

    def wrap(builder: Builder) -> Builder:
        _REGISTRY[name] = ModelEntry(
            name, builder, description, embed, optimizer, pretrain, crosses, fallback
        )
        return builder

    return wrap


class Pretrained(Protocol):
    """What a model whose entry names ``pretrain`` or ``fallback`` provides (FNN, DeepFM)."""

    layout: InputLayout

    def pretrain_config(self, name: str) -> ModelConfig:
        """Config of the model ``name`` to train first, sized to initialise this one."""
        ...

    def init_from_pretrained(self, teacher: nn.Module) -> None:
        """Copy the trained ``teacher``'s weights into this model."""
        ...


def build_pretrain_model(model: nn.Module, entry: ModelEntry) -> tuple[nn.Module, ModelEntry]:
    """The untrained model that ``entry.teacher`` names, shaped to initialise ``model``.

    The trainer fits it first, then calls ``model.init_from_pretrained(teacher)``.
    """
    assert entry.teacher is not None, f"{entry.name} has no pre-training"
    teacher_entry = get_entry(entry.teacher)
    config = model.pretrain_config(entry.teacher)  # type: ignore[operator]
    return build_model(model.layout, config), teacher_entry  # type: ignore[arg-type]


def model_names() -> list[str]:
    """Registered names, in the order of ``zoo.MODULES`` (then of registration in a module)."""
    from deepfm.models.zoo import MODULES

    _load_models()
    rank = {module.__name__: i for i, module in enumerate(MODULES)}
    position = {name: i for i, name in enumerate(_REGISTRY)}
    return sorted(
        _REGISTRY,
        key=lambda n: (rank.get(_REGISTRY[n].builder.__module__, len(rank)), position[n]),
    )


def get_entry(name: str) -> ModelEntry:
    _load_models()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(model_names())
        raise ConfigError(f"unknown model {name!r}; known models: {known}") from None


def build_model(layout: InputLayout, config: ModelConfig, *, fresh: bool = True) -> nn.Module:
    """The model ``config.name`` with the embedding size the paper prescribes unless overridden.

    Its initial weights come from torch's random state: a new model for training is built by
    :func:`deepfm.train.run.new_model`, which seeds first. A fresh model whose weights
    alone would not fit in the available memory is refused with a :class:`ConfigError` before
    any allocation; ``fresh=False`` (a bundle's model, whose weights are memory-mapped from its
    file) skips that check."""
    entry = get_entry(config.name)
    entry.check(config)
    config = config.replace(embed_dim=entry.embed_dim(config))
    if fresh and torch.get_default_device().type != "meta":
        _check_memory(entry, layout, config)
    return entry.builder(layout, config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_count(layout: InputLayout, config: ModelConfig) -> int:
    """Parameters of the model ``config`` names, built on the meta device: no memory is
    allocated, so a full-size Criteo map (tens of millions of rows) costs nothing."""
    with torch.device("meta"):
        return count_parameters(build_model(layout, config))


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_memory(entry: ModelEntry, layout: InputLayout, config: ModelConfig) -> None:
    with torch.device("meta"):
        count = count_parameters(entry.builder(layout, config))
    needed, available = 4 * count, available_memory()  # float32 weights
    if available is not None and needed > available:
        raise ConfigError(
            f"model {config.name} has {count:,} parameters ({needed / 2**30:.1f} GiB of "
            f"weights; {layout.num_features:,} features x embedding {config.embed_dim}, hidden "
            f"{list(config.hidden)}) but only {available / 2**30:.1f} GiB of memory is "
            "available: lower --embed-dim or --hidden, or raise --min-count"
        )


def _load_models() -> None:
    """Import the model modules so that their ``@register`` decorators run."""
    import deepfm.models.zoo  # noqa: F401
