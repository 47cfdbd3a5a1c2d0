"""ResNet image classification with AB-training (arXiv 2405.01067): the loop is train_image.py.

    accelerate launch --config_file configs/accelerate_cpu.yaml recipes/resnet.py  # CPU, digits
    accelerate launch --multi_gpu --num_processes 4 recipes/resnet.py --data_dir my_images
        # your own ImageNet-layout folder: shape, normalisation, schedule derived from it
    accelerate launch --config_file configs/accelerate_multigpu.yaml recipes/resnet.py \\
        --config configs/resnet50_imagenet.yaml --data_dir /data/imagenet  # the paper's runs
"""

import sys

from args import Recipe
from train_image import main

RECIPE = Recipe(  # ResNetConfig fields from scratch: ResNet-50 (the digits config: tiny)
    name="resnet", model_type="resnet", model={"embedding_size": 64, "layer_type": "bottleneck",
                                               "hidden_sizes": [256, 512, 1024, 2048],
                                               "depths": [3, 4, 6, 3]},
    digits_config="configs/resnet_digits.yaml", imagenet_config="configs/resnet50_imagenet.yaml",
    imagenet_note="ResNet-50 at 224 px, 256 images per GPU (global batch 2k-64k), the paper's "
                  "ImageNet run")

if __name__ == "__main__":
    main(RECIPE, sys.argv[1:])
