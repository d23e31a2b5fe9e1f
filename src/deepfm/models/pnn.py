"""PNN (Qu et al., 2016): ``ŷ = sigmoid(MLP([z, p]))``, ``z = [e_1, ..., e_m]`` (Eq. 9).

``p`` holds the pairwise inner products ``<e_i, e_j>`` (IPNN), the sum-pooled outer product
``f_Σ f_Σᵀ`` (OPNN), or both (PNN*). Embedding size k + 1, as for the other DNN-family models.
"""

from torch import nn

from deepfm.models.common import deep_mlp
from deepfm.models.registry import ModelConfig, register
from deepfm.nn import FieldEmbedding, InputLayout, ProductLayer


class PNN(nn.Module):
    products: tuple[str, ...] = ()

    def __init__(self, layout: InputLayout, config: ModelConfig) -> None:
        super().__init__()
        self.embedding = FieldEmbedding(layout, config.embed_dim)
        self.product = ProductLayer(layout.num_fields, config.embed_dim, self.products)
        self.dnn = deep_mlp(self.product.out_dim, config)

    def forward(self, ids, values):
        return self.dnn(self.product(self.embedding(ids, values))).squeeze(-1)


@register("ipnn", "IPNN: MLP over [z, pairwise inner products <e_i, e_j>]", embed="k+1")
class IPNN(PNN):
    products = ("inner",)


@register("opnn", "OPNN: MLP over [z, sum-pooled outer product f f^T]", embed="k+1")
class OPNN(PNN):
    products = ("outer",)


@register("pnn_star", "PNN*: MLP over [z, inner products, outer product]", embed="k+1")
class PNNStar(PNN):
    products = ("inner", "outer")
