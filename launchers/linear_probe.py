"""Linear probe of a frozen backbone (``moco_scale.eval.probe``).

    python launchers/linear_probe.py --probe.init=runs/demo --train.progress=false
    torchrun --nproc_per_node 2 launchers/linear_probe.py --probe.init=backbone.pt --model.arch=resnet50 \\
        --probe.train_path=/data/train-shards --probe.val_path=/data/val-shards --data.image_size=224

The flags are pretraining's: ``--config`` and ``--section.field=value``; the probe's own are ``--probe.X``.
"""

import fire

from moco_scale.eval.probe import main

if __name__ == "__main__":
    fire.Fire(main)
