"""Model presets: the paper's per-dataset settings (Table III) as YAML files.

A preset has ``defaults`` and per-model ``models.<name>`` overrides of ``hidden``, ``activation``,
``keep_prob``, ``embed_dim``, ``l2`` and, for LR, ``crosses`` (``[a×b, ...]``) and
``cross_buckets``. It stores the paper's *keep probability* and converts it
here to the drop rate of :class:`ModelConfig` (``dropout = 1 - keep_prob``), so that nobody trains
with the wrong sign. Shipped presets live in ``deepfm/configs/<name>.yaml``; a path to a YAML file
of the same form works too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from deepfm.errors import ConfigError
from deepfm.models.registry import ModelConfig, get_entry, model_names
from deepfm.nn.mlp import ACTIVATIONS

SETTINGS = ("hidden", "activation", "keep_prob", "embed_dim", "l2", "crosses", "cross_buckets")
TOP_LEVEL = ("name", "status", "description", "defaults", "models")


def dropout_of(keep_prob: float) -> float:
    """The drop rate of the paper's keep probability: the one place it is converted (presets,
    study configs, the dropout sweep and the tuner's search space all quote keep_prob).
    Rounded so that keep 0.9 gives drop 0.1, not 0.09999999999999998."""
    return round(1.0 - float(keep_prob), 12)


def _config_dir():
    return resources.files("deepfm") / "configs"


def preset_names() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")] for p in _config_dir().iterdir() if p.name.endswith(".yaml")
    )


@dataclass(frozen=True)
class Preset:
    name: str
    status: str = "paper"
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def assumed(self) -> bool:
        """True while the preset's values are not (all) checked against the paper."""
        return self.status != "paper"

    def settings(self, model: str) -> dict[str, Any]:
        """``ModelConfig`` fields for ``model`` (``keep_prob`` already turned into ``dropout``)."""
        merged = {**self.defaults, **self.models.get(model, {})}
        out = {k: v for k, v in merged.items() if k != "keep_prob"}
        if "keep_prob" in merged:
            out["dropout"] = dropout_of(merged["keep_prob"])
        if "hidden" in out:
            out["hidden"] = tuple(out["hidden"])
        return out

    def model_config(self, model: str, **overrides: Any) -> ModelConfig:
        """The preset's config of ``model``; ``overrides`` that are not None win. Settings the
        model cannot use (crosses for a model other than LR) are a ConfigError."""
        entry = get_entry(model)
        settings = self.settings(model)
        settings.update({k: v for k, v in overrides.items() if v is not None})
        config = ModelConfig(name=model, **settings)
        entry.check(config)
        return config


def _check_settings(where: str, settings: Any) -> dict[str, Any]:
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {settings!r}")
    if "dropout" in settings:
        raise ConfigError(
            f"{where}: presets store the paper's keep probability as keep_prob "
            "(dropout = 1 - keep_prob); rename 'dropout'"
        )
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise ConfigError(f"{where}: unknown settings {sorted(unknown)}; known: {list(SETTINGS)}")
    act = settings.get("activation")
    if act is not None and act not in ACTIVATIONS:
        raise ConfigError(f"{where}: unknown activation {act!r}; choose from {list(ACTIVATIONS)}")
    keep = settings.get("keep_prob")
    if keep is not None and not (isinstance(keep, int | float) and 0 < keep <= 1):
        raise ConfigError(f"{where}: keep_prob must be in (0, 1], got {keep!r}")
    return dict(settings)


def parse_preset(data: Any, source: str) -> Preset:
    """Validate a preset's YAML content (``source`` names it in errors)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a preset is a mapping with {list(TOP_LEVEL)}")
    unknown = set(data) - set(TOP_LEVEL)
    if unknown:
        raise ConfigError(f"{source}: unknown keys {sorted(unknown)}; known: {list(TOP_LEVEL)}")
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise ConfigError(f"{source}: 'models' maps registry names to settings")
    known = model_names()
    for name in models:
        if name not in known:
            raise ConfigError(f"{source}: unknown model {name!r} under 'models'")
    preset = Preset(
        name=str(data.get("name") or Path(source).stem),
        status=str(data.get("status", "paper")),
        description=str(data.get("description", "")),
        defaults=_check_settings(f"{source}: defaults", data.get("defaults") or {}),
        models={n: _check_settings(f"{source}: models.{n}", s) for n, s in models.items()},
    )
    for name in known:  # every model's merged settings must make a valid config
        preset.model_config(name)
    return preset


def load_preset(name_or_path: str | Path) -> Preset:
    """A shipped preset by name (``criteo-random``) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"preset file {path} does not exist")
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the preset {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text: {exc.reason}") from None
    else:
        resource = _config_dir() / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise ConfigError(
                f"unknown preset {str(name_or_path)!r}; shipped presets: "
                f"{', '.join(preset_names())} (or give a path to a .yaml file)"
            )
        text, source = resource.read_text(encoding="utf-8"), f"preset {name_or_path}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    return parse_preset(data, source)
