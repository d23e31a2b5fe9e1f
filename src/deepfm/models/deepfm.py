"""DeepFM: ``ŷ = sigmoid(y_FM + y_Deep)``, the FM and the deep part reading one embedding (Eq. 1).

``y_FM = <w, x> + Σ_{i<j} <e_i, e_j>`` with ``e_i = V_field_i · x_field_i``. DeepFM-D: the deep
part is a DNN over ``[e_1, ..., e_m]``. DeepFM-P: it is a PNN over ``[z, p]`` with inner
(DeepFM-IP), outer (DeepFM-OP) or both products (DeepFM-*P). Embedding size k; L2 regularises the
FM component (order-1 weights and the shared ``V``), dropout the deep one.

Every DeepFM holds an LR: its order-1 part, with the embeddings and the deep output at zero. The
trainer fits that LR first (FTRL) and keeps it, in this model's shape, unless the trained DeepFM
beats it on validation by more than the noise of the validation split: on a few thousand rows
the LR is the better model (README, "How the defaults were chosen").
"""

import torch
from torch import nn

from deepfm.models.common import deep_mlp
from deepfm.models.registry import ModelConfig, register
from deepfm.nn import FeatureLinear, FieldEmbedding, FMInteraction, InputLayout, ProductLayer


@register("deepfm", "DeepFM-D: FM + DNN sharing one embedding", fallback="lr")
class DeepFM(nn.Module):
    products: tuple[str, ...] = ()  # none: the deep part reads z = [e_1, ..., e_m] only

    def __init__(self, layout: InputLayout, config: ModelConfig) -> None:
        super().__init__()
        self.layout = layout
        self.linear = FeatureLinear(layout, l2=config.l2)
        self.embedding = FieldEmbedding(layout, config.embed_dim, l2=config.l2)
        self.fm = FMInteraction()
        self.product = ProductLayer(layout.num_fields, config.embed_dim, self.products)
        self.dnn = deep_mlp(self.product.out_dim, config)

    def pretrain_config(self, name: str) -> ModelConfig:
        """The LR trained first (FTRL, its own defaults): this model's order-1 part alone, and
        its fallback (registry ``fallback="lr"``)."""
        return ModelConfig(name=name)

    @torch.no_grad()
    def init_from_pretrained(self, lr: nn.Module) -> None:
        """Become the trained ``lr``: its order-1 weights, the embeddings and the deep part's
        output layer at zero (no FM term, no deep term), so that this model scores exactly as
        the LR does; the trainer keeps these weights as the fallback."""
        self.linear.load_state_dict(lr.linear.state_dict())
        for zeroed in (*self.embedding.parameters(), *self.dnn.layers[-1].parameters()):
            zeroed.zero_()

    def forward(self, ids, values):
        e = self.embedding(ids, values)  # [B, F, k], shared by both components
        y_fm = self.linear(ids, values) + self.fm(e)
        return y_fm + self.dnn(self.product(e)).squeeze(-1)


@register("deepfm_ip", "DeepFM-IP: FM + IPNN sharing one embedding", fallback="lr")
class DeepFMInner(DeepFM):
    products = ("inner",)


@register("deepfm_op", "DeepFM-OP: FM + OPNN sharing one embedding", fallback="lr")
class DeepFMOuter(DeepFM):
    products = ("outer",)


@register("deepfm_star", "DeepFM-*P: FM + PNN* sharing one embedding", fallback="lr")
class DeepFMStar(DeepFM):
    products = ("inner", "outer")
