"""MoCo, as the papers write it: the model (encoders, heads, forward), the loss, the queue of negative
keys, the momentum update of the key encoder, and the key encoder's batch-norm modes."""

from moco_scale.moco.model import MoCo, MocoOutput

__all__ = ["MoCo", "MocoOutput"]
