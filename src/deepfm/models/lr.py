"""Linear models trained with FTRL-Proximal (paper, Sec. II-B and IV-A3).

LR (Eq. 2): ``y = w_0 + Σ_i w_i x_i``, plus, with chosen crosses ``f × g`` (``--crosses``), the
expert's pairwise feature crosses ``Σ_{(f, g)} Σ w_{(i, j)} x_i x_j``, each cross with its own
table. Poly-2 (Eq. 3): ``y = w_0 + Σ_i w_i x_i + Σ_{i<j} w_{h(i, j)} x_i x_j`` over every pair of
fields, the pair of feature ids hashed by ``h`` into one table of ``cross_buckets`` weights.
"""

from torch import nn

from deepfm.models.registry import ModelConfig, register
from deepfm.nn import FeatureLinear, InputLayout, PairCrossLinear, all_field_pairs, resolve_crosses


@register(
    "lr",
    "logistic regression on the raw features (+ chosen --crosses), trained with FTRL",
    embed="none",
    optimizer="ftrl",
    crosses=True,
)
class LogisticRegression(nn.Module):
    def __init__(self, layout: InputLayout, config: ModelConfig) -> None:
        super().__init__()
        self.linear = FeatureLinear(layout, l2=config.l2)
        self.crosses = None
        if config.crosses:
            pairs = resolve_crosses(config.crosses, layout.field_names)
            self.crosses = PairCrossLinear(
                layout, pairs, buckets=config.cross_buckets, shared=False, l2=config.l2
            )

    def forward(self, ids, values):
        y = self.linear(ids, values)
        return y if self.crosses is None else y + self.crosses(ids, values)


@register(
    "poly2",
    "Poly-2: LR + every pair of fields crossed, hashed into cross_buckets weights; FTRL",
    embed="none",
    optimizer="ftrl",
)
class Poly2(nn.Module):
    def __init__(self, layout: InputLayout, config: ModelConfig) -> None:
        super().__init__()
        self.linear = FeatureLinear(layout, l2=config.l2)
        self.crosses = PairCrossLinear(
            layout,
            all_field_pairs(layout.num_fields),
            buckets=config.cross_buckets,
            shared=True,
            l2=config.l2,
        )

    def forward(self, ids, values):
        return self.linear(ids, values) + self.crosses(ids, values)
