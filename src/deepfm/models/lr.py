"""LR: ``ŷ = sigmoid(<w, x> + b)``, trained with FTRL-Proximal (paper, Sec. IV-A3)."""

from torch import nn

from deepfm.models.registry import ModelConfig, register
from deepfm.nn import FeatureLinear, InputLayout


@register(
    "lr",
    "logistic regression on the raw features, trained with FTRL",
    embed="none",
    optimizer="ftrl",
)
class LogisticRegression(nn.Module):
    def __init__(self, layout: InputLayout, config: ModelConfig) -> None:
        super().__init__()
        self.linear = FeatureLinear(layout, l2=config.l2)

    def forward(self, ids, values):
        return self.linear(ids, values)
