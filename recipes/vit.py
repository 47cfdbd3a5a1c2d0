"""ViT image classification with AB-training (arXiv 2405.01067): the loop is train_image.py.

    accelerate launch --config_file configs/accelerate_cpu.yaml recipes/vit.py   # CPU, digits
    accelerate launch --multi_gpu --num_processes 4 recipes/vit.py --data_dir my_images
        # your own ImageNet-layout folder: shape, normalisation, schedule derived from it
    accelerate launch --config_file configs/accelerate_multigpu.yaml recipes/vit.py \\
        --config configs/vit_b16_imagenet.yaml --data_dir /data/imagenet  # the paper's ViT-B/16
"""

import sys

from args import Recipe
from train_image import main

RECIPE = Recipe(  # ViTConfig fields from scratch: ViT-B/16 (the digits config makes it small)
    name="vit", model_type="vit", model={"patch_size": 16, "hidden_size": 768,
                                         "num_hidden_layers": 12, "num_attention_heads": 12,
                                         "intermediate_size": 3072},
    digits_config="configs/vit_digits.yaml", imagenet_config="configs/vit_b16_imagenet.yaml",
    imagenet_note="ViT-B/16 at 224 px, global batch 2048-4096, the paper's ImageNet run")

if __name__ == "__main__":
    main(RECIPE, sys.argv[1:])
