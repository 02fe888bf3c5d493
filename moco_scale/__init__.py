"""moco_scale: MoCo v1/v2/v3 self-supervised pretraining of ResNets at cluster scale."""

__version__ = "0.1.0"
