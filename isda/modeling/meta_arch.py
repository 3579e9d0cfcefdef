"""The ISDA meta-architecture (stub until the model lands)."""
from torch import nn
from detectron2.modeling import META_ARCH_REGISTRY


@META_ARCH_REGISTRY.register()
class ISDA(nn.Module):
    """Placeholder: the model is built in a later change."""

    def __init__(self, cfg):
        super().__init__()
        raise NotImplementedError("the ISDA model is not implemented yet")
