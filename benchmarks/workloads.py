"""The benchmark's data and models: real, small enough for a CPU, identical for every method.

Data: scikit-learn's digits (1,797 real 8x8 handwritten digits, 10 classes, shipped inside
scikit-learn, so no network is needed), split once 80/20, stratified, with a fixed split seed.
Every method sees the same batches in the same order for a given seed: each epoch is a
permutation drawn from the seed, cut into global batches of ``batch_size * world`` samples, and
rank ``r`` takes the ``r``-th slice of each (a DistributedSampler without padding).

Models (built after ``torch.manual_seed(seed)``, so every method starts from the same weights):

* ``mlp``: 64 -> width -> ... -> width -> 10, ``depth`` hidden layers, ReLU;
* ``cnn``: three 3x3 convs (c, 2c, 4c channels, two max-pools) and a width-wide hidden layer;
* ``vit``: transformers' ViT for image classification, built as the recipes build it
  (``AutoConfig.for_model("vit", ...)`` + ``AutoModelForImageClassification.from_config``, as
  recipes/modeling.py does; configs/vit_digits.yaml's shape is ``--width 64 --depth 4``): 8x8
  one-channel images, 2x2 patches, ``depth`` blocks of ``width``, 4 heads, MLP 2 x width;
* ``resnet``: transformers' ResNet built the same way, configs/resnet_digits.yaml's shape
  (basic blocks, one per stage, stages ``channels`` x 1, 2, 4, 8) on the native 8x8 images:
  the recipes' convolutional family, with BatchNorm (running statistics are buffers).

The mlp, cnn and vit have no buffers: DDP then communicates gradients only, through its comm
hook. The resnet's BatchNorm buffers are broadcast from rank 0 by DDP before every forward
(counted by the meters' intercept of ``_broadcast_coalesced``) and averaged with the gradients by
the ABOptimizer. AB-training's default layer choice applies: the first and the last
factorizable layer stay dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

MODELS = ("mlp", "cnn", "vit", "resnet")
NUM_CLASSES = 10
SPLIT_SEED = 0


@dataclass
class Digits:
    """The digits split: images scaled to [0, 1], shape (n, 1, 8, 8); labels (n,)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def train_size(self) -> int:
        return int(self.train_y.numel())


def load_digits_split(test_fraction: float = 0.2) -> Digits:
    """sklearn's digits, split once (stratified, seed ``SPLIT_SEED``) into train and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=SPLIT_SEED,
                              stratify=y.numpy())
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return Digits(x[tr], y[tr], x[te], y[te])


class ShardedBatches:
    """Batch ``step`` for ``rank``: epoch permutations from ``seed``, global batches sliced."""

    def __init__(self, data: Digits, batch_size: int, rank: int, world: int, seed: int) -> None:
        self.data, self.batch_size, self.rank, self.world, self.seed = (
            data, batch_size, rank, world, seed)
        self.global_batch = batch_size * world
        self.steps_per_epoch = data.train_size // self.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"--batch-size {batch_size} x {world} ranks = {self.global_batch} exceeds the "
                f"{data.train_size} training samples: lower --batch-size.")
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.data.train_size, generator=gen)
            self._epoch = epoch
        start = i * self.global_batch + self.rank * self.batch_size
        idx = self._perm[start:start + self.batch_size]
        return self.data.train_x[idx], self.data.train_y[idx]


class MLP(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        dims = [64] + [width] * depth
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], NUM_CLASSES))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(4 * c * 2 * 2, width), nn.ReLU(),
                                  nn.Linear(width, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class HFImageClassifier(nn.Module):
    """A transformers image classifier built from its config, as recipes/modeling.py builds it
    (``AutoConfig.for_model(model_type, **fields)`` + ``AutoModelForImageClassification
    .from_config``); ``forward`` returns the logits."""

    def __init__(self, model_type: str, **fields: object) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForImageClassification

        config = AutoConfig.for_model(model_type, num_channels=1, num_labels=NUM_CLASSES,
                                      **fields)
        self.model = AutoModelForImageClassification.from_config(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def build_model(name: str, width: int, depth: int, channels: int, seed: int) -> nn.Module:
    """The model ``name`` with weights drawn from ``seed`` (identical for every method)."""
    torch.manual_seed(seed)
    if name == "mlp":
        return MLP(width, depth)
    if name == "cnn":
        return CNN(channels, width)
    if name == "vit":
        return HFImageClassifier("vit", image_size=8, patch_size=2, hidden_size=width,
                                 num_hidden_layers=depth,
                                 num_attention_heads=4 if width % 4 == 0 else 1,
                                 intermediate_size=2 * width, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    if name == "resnet":
        c = channels
        return HFImageClassifier("resnet", embedding_size=c, hidden_sizes=[c, 2 * c, 4 * c, 8 * c],
                                 depths=[1, 1, 1, 1], layer_type="basic")
    raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {name!r}")


@torch.no_grad()
def evaluate(model: nn.Module, data: Digits) -> tuple[float, float]:
    """(accuracy in percent, mean cross-entropy) on the test split."""
    was_training = model.training
    model.eval()
    logits = model(data.test_x)
    loss = nn.functional.cross_entropy(logits, data.test_y).item()
    acc = (logits.argmax(dim=1) == data.test_y).float().mean().item() * 100.0
    model.train(was_training)
    return acc, loss
