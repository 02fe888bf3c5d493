"""Export the pretrained query backbone from a checkpoint, or describe one (``moco_scale.export``).

python launchers/export.py runs/demo backbone.pt
python launchers/export.py runs/demo/checkpoints/step_00000200 moco.pth.tar --layout fbmoco
python launchers/export.py --inspect runs/demo
"""

import sys

from moco_scale.export import main

if __name__ == "__main__":
    sys.exit(main())
