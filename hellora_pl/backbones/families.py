"""The built-in architecture descriptions (transformers 5 layouts, experts fused in 3D tensors)."""

from .architecture import MoEArchitecture
from .registry import register_architecture

OLMOE = register_architecture(
    MoEArchitecture(
        name="olmoe",
        model_types=("olmoe",),
        router="gate",
        notes="softmax router, top-k, optional renormalisation (norm_topk_prob)",
    )
)
