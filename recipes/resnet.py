"""ResNet image classification with AB-training (arXiv 2405.01067), launched by `accelerate launch`.

    accelerate launch --config_file configs/accelerate_cpu.yaml recipes/resnet.py  # CPU, digits
    accelerate launch --config_file configs/accelerate_multigpu.yaml recipes/resnet.py \\
        --data_dir /data/imagenet          # the paper's ResNet-50 "groups" runs
    accelerate launch ... recipes/resnet.py --config configs/resnet50_imagenet_nogroups.yaml ...

The loop is recipes/train_image.py (shared with vit.py); the knobs are in recipes/args.py
(--help lists them). See docs/recipes.md.
"""

import sys

from args import Recipe
from train_image import main

RECIPE = Recipe(
    name="resnet", model_type="resnet",
    # ResNetConfig fields from scratch: ResNet-50 (the digits config makes it tiny)
    model={"embedding_size": 64, "hidden_sizes": [256, 512, 1024, 2048], "depths": [3, 4, 6, 3],
           "layer_type": "bottleneck"},
    digits_config="configs/resnet_digits.yaml", imagenet_config="configs/resnet50_imagenet.yaml",
    imagenet_note="ResNet-50 at 224 px, 256 images per GPU (global batch 2k-64k), the paper's "
                  "ImageNet run")

if __name__ == "__main__":
    main(RECIPE, sys.argv[1:])
