"""DeepFM-D: ``ŷ = sigmoid(y_FM + y_DNN)``, the FM and the DNN reading one embedding (Eq. 1).

``y_FM = <w, x> + Σ_{i<j} <e_i, e_j>`` and ``y_DNN = MLP([e_1, ..., e_m])`` with
``e_i = V_field_i · x_field_i``. L2 regularises the FM component, dropout the deep one.
"""

from torch import nn

from deepfm.models.registry import ModelConfig, register
from deepfm.nn import MLP, FeatureLinear, FieldEmbedding, FMInteraction, InputLayout


@register("deepfm", "DeepFM-D: FM + DNN sharing one embedding")
class DeepFM(nn.Module):
    def __init__(self, layout: InputLayout, config: ModelConfig) -> None:
        super().__init__()
        self.linear = FeatureLinear(layout, l2=config.l2)
        self.embedding = FieldEmbedding(layout, config.embed_dim, l2=config.l2)
        self.fm = FMInteraction()
        self.dnn = MLP(
            layout.num_fields * config.embed_dim,
            config.hidden,
            activation_name=config.activation,
            dropout=config.dropout,
        )

    def forward(self, ids, values):
        e = self.embedding(ids, values)  # [B, F, k]
        y_fm = self.linear(ids, values) + self.fm(e)
        y_dnn = self.dnn(e.flatten(1)).squeeze(-1)
        return y_fm + y_dnn
