"""MoCo pretraining from the command line (the run itself is ``moco_scale.train``).

    deepspeed --num_gpus 2 launchers/pretrain.py --config configs/demo.yaml --train.max_steps=60
    torchrun --nproc_per_node 2 launchers/pretrain.py --config configs/demo.yaml
    python launchers/pretrain.py --config configs/demo.yaml

Every config field is overridable as ``--section.field=value``. Bad input is rejected in one
line before any process group, model or data loader is created.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below, which take seconds: a signal from now on is kept
    from moco_scale.stop import STOP

    STOP.install()

    import fire

    from moco_scale.train import main

    fire.Fire(main)
