"""Wide & Deep with separate embeddings: ``ŷ = sigmoid(y_wide + MLP([e_1, ..., e_m]))``.

``lr_dnn`` (Wide & Deep, Cheng et al., 2016): the wide part is LR over the raw features and the
DNN has its own embedding (size k + 1); both are trained by one optimiser (DeepFM paper,
footnote 7). ``fm_dnn``: the wide part is an FM with its own embedding, and the DNN reads a
second, separate table (size k for both). Compare ``deepfm``, where one table serves both.
L2 regularises the wide (LR / FM) part, dropout the deep part.
"""

from torch import nn

from deepfm.models.common import deep_mlp
from deepfm.models.registry import ModelConfig, register
from deepfm.nn import FeatureLinear, FieldEmbedding, FMInteraction, InputLayout


@register("lr_dnn", "Wide & Deep: LR on raw features + DNN with its own embedding", embed="k+1")
class LRAndDNN(nn.Module):
    def __init__(self, layout: InputLayout, config: ModelConfig) -> None:
        super().__init__()
        self.linear = FeatureLinear(layout, l2=config.l2)
        self.embedding = FieldEmbedding(layout, config.embed_dim)
        self.dnn = deep_mlp(layout.num_fields * config.embed_dim, config)

    def forward(self, ids, values):
        y_deep = self.dnn(self.embedding(ids, values).flatten(1)).squeeze(-1)
        return self.linear(ids, values) + y_deep


@register("fm_dnn", "FM & DNN: an FM and a DNN, each with its own embedding")
class FMAndDNN(nn.Module):
    def __init__(self, layout: InputLayout, config: ModelConfig) -> None:
        super().__init__()
        self.linear = FeatureLinear(layout, l2=config.l2)
        self.fm_embedding = FieldEmbedding(layout, config.embed_dim, l2=config.l2)
        self.fm = FMInteraction()
        self.embedding = FieldEmbedding(layout, config.embed_dim)
        self.dnn = deep_mlp(layout.num_fields * config.embed_dim, config)

    def forward(self, ids, values):
        y_fm = self.linear(ids, values) + self.fm(self.fm_embedding(ids, values))
        return y_fm + self.dnn(self.embedding(ids, values).flatten(1)).squeeze(-1)
