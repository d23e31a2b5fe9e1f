"""DNN and FNN: ``ŷ = sigmoid(MLP([e_1, ..., e_m]))`` on embeddings of size k + 1.

FNN (Zhang et al., 2016) is the same network, initialised from a factorization machine trained
first: the embedding row of feature i becomes ``[w_i, V_i]`` (order-1 weight and FM vector, so
``e_i = [w_i, V_i] · x_i`` is FNN's ``z_i``). The trainer does the FM training (registry
``pretrain="fm"``); the model only says what it needs and how to copy it in.
"""

import torch
from torch import nn

from deepfm.errors import ConfigError
from deepfm.models.common import deep_mlp
from deepfm.models.registry import ModelConfig, register
from deepfm.nn import FieldEmbedding, InputLayout


@register("dnn", "DNN: embedding -> MLP -> logit (embedding size k+1)", embed="k+1")
class DNN(nn.Module):
    def __init__(self, layout: InputLayout, config: ModelConfig) -> None:
        super().__init__()
        self.layout = layout
        self.l2 = config.l2
        self.embedding = FieldEmbedding(layout, config.embed_dim)
        self.dnn = deep_mlp(layout.num_fields * config.embed_dim, config)

    def forward(self, ids, values):
        return self.dnn(self.embedding(ids, values).flatten(1)).squeeze(-1)


@register(
    "fnn",
    "FNN: a DNN whose embedding rows start as a pre-trained FM's [w_i, V_i]",
    embed="k+1",
    pretrain="fm",
)
class FNN(DNN):
    def pretrain_config(self, name: str) -> ModelConfig:
        """The FM to train first: k = this embedding's size - 1, the same L2."""
        if self.embedding.dim < 2:
            raise ConfigError("FNN needs --embed-dim >= 2 (k + 1: [w_i, V_i] with k >= 1)")
        return ModelConfig(name=name, embed_dim=self.embedding.dim - 1, l2=self.l2)

    @torch.no_grad()
    def init_from_pretrained(self, fm: nn.Module) -> None:
        """Embedding row i := ``[w_i, V_i]`` of the trained FM ``fm``."""
        rows = torch.cat([fm.linear.weight.weight, fm.embedding.weight], dim=1)
        self.embedding.weight.copy_(rows)
