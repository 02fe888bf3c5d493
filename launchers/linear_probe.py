"""Linear probe of a frozen backbone (``moco_scale.eval.probe``).

    python launchers/linear_probe.py --init=runs/demo --progress=false
    torchrun --nproc_per_node 2 launchers/linear_probe.py --init=backbone.pt --arch=resnet50 \\
        --train_data=/data/train-shards --val_data=/data/val-shards --image_size=224 --batch_size=32
"""

import fire

from moco_scale.eval.probe import main

if __name__ == "__main__":
    fire.Fire(main)
