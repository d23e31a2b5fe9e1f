"""FM: ``y = <w, x> + Σ_{i<j} <V_i, V_j> x_i x_j`` (Rendle, 2010)."""

from torch import nn

from deepfm.models.registry import ModelConfig, register
from deepfm.nn import FeatureLinear, FieldEmbedding, FMInteraction, InputLayout


@register("fm", "factorization machine: order-1 weights + pairwise <V_i, V_j> x_i x_j")
class FactorizationMachine(nn.Module):
    def __init__(self, layout: InputLayout, config: ModelConfig) -> None:
        super().__init__()
        self.linear = FeatureLinear(layout, l2=config.l2)
        self.embedding = FieldEmbedding(layout, config.embed_dim, l2=config.l2)
        self.fm = FMInteraction()

    def forward(self, ids, values):
        return self.linear(ids, values) + self.fm(self.embedding(ids, values))
