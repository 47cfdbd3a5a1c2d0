"""Images for the recipes: a folder tree (datasets' imagefolder), a hub dataset or sklearn's
digits; torchvision transforms; unreadable files skipped.

An image that cannot be decoded (a truncated JPEG, a file that is not an image) becomes a black
image with label ``IGNORE_INDEX``, which the loss and the metrics leave out, so every rank keeps
the same batch shape and number of steps. It is warned about once and counted once, however
many epochs and ranks meet it (:class:`UnreadableImages`).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from args import ConfigError, DataArgs, ImageFacts, check_data_dir  # noqa: F401  (check_data_dir: its former home)

IGNORE_INDEX = -100  # the label of an unreadable image: ignored by the loss and the metrics
logger = logging.getLogger("recipes")


def count_images(folder: str) -> int:
    """Image files under ``folder`` (by extension, as datasets' imagefolder picks them)."""
    from PIL import Image

    known = {e.lower() for e in Image.registered_extensions()}
    return sum(os.path.splitext(f)[1].lower() in known
               for _, _, files in os.walk(folder) for f in files)


def folder_images(data_dir: str, split: str = "train") -> list[str]:
    from PIL import Image

    known = {e.lower() for e in Image.registered_extensions()}
    return sorted(os.path.join(d, f) for d, _, files in os.walk(os.path.join(data_dir, split))
                  for f in files if os.path.splitext(f)[1].lower() in known)


def survey(images: Sequence[Any], at_most: int = 64) -> ImageFacts | None:
    """Shape, channels and per-channel mean / std of up to ``at_most`` images spread evenly
    over ``images`` (paths, or `datasets` Image entries). None if none can be read."""
    import numpy as np
    from PIL import Image

    picked = [images[round(i * (len(images) - 1) / max(1, at_most - 1))]
              for i in range(min(at_most, len(images)))]
    pixels, shapes, grey = [], set(), True
    for item in picked:
        try:
            image = Image.open(item) if isinstance(item, str) else open_image(item)
            image.load()
        except (OSError, ValueError, SyntaxError):
            continue  # counted and warned about when training meets it
        grey = grey and image.mode in ("1", "L", "I", "I;16", "F")
        shapes.add(image.size)
        pixels.append(image)
    if not pixels:
        return None
    mode, channels = ("L", 1) if grey else ("RGB", 3)
    values = np.concatenate([np.asarray(p.convert(mode), dtype=np.float64).reshape(-1, channels)
                             for p in pixels]) / 255.0
    sides = sorted({min(w, h) for w, h in shapes})
    shape = ("x".join(map(str, next(iter(shapes)))) if len(shapes) == 1 else
             f"from {sides[0]} to {sides[-1]} px on the short side")
    return ImageFacts(sampled=len(pixels), size=sides[0] if len(sides) == 1 else None,
                      shape=shape, channels=channels,
                      mean=[round(float(v), 3) for v in values.mean(0)],
                      std=[round(max(float(v), 1e-3), 3) for v in values.std(0)])


def load_splits(args: DataArgs) -> tuple[Any, Any, str]:
    """(train, eval, description): `datasets` splits with columns image (not decoded: a bad file
    is met where it can be named) and label. Digits: a fixed stratified 80/20 split (1,437 /
    360). Data without an eval split: ``validation_split`` of train held out (stratified)."""
    import datasets

    if args.data_dir:
        ds = datasets.load_dataset("imagefolder", data_dir=args.data_dir, cache_dir=args.cache_dir)
        desc = f"image folder {args.data_dir} (datasets 'imagefolder')"
    elif args.dataset_name:
        ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name,
                                   cache_dir=args.cache_dir)
        desc = f"hub dataset {args.dataset_name}"
    else:
        import numpy as np
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()  # 8x8 images, values 0..16: 8-bit images, the folder path's way
        ds = datasets.Dataset.from_dict(
            {"image": [Image.fromarray((im * (255 / 16)).round().astype(np.uint8))
                       for im in digits.images], "label": digits.target.tolist()},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
                names=[str(i) for i in range(10)])})
        ).train_test_split(test_size=0.2, seed=0, stratify_by_column="label")
        desc = ("sklearn digits (no --data_dir or --dataset_name given): 1,797 real 8x8 grey "
                "images shipped with scikit-learn (load_digits), 10 classes")
        args = dataclasses.replace(args, train_split="train", eval_split="test")
    name = args.eval_split if args.eval_split != "auto" else next(
        (s for s in ("validation", "val", "valid", "test") if s in ds), None)
    for split in (args.train_split, name):
        if split is not None and split not in ds:
            raise ConfigError(f"{desc} has no split {split!r} (it has {list(ds)}): set "
                              f"--train_split / --eval_split.")
    train = _columns(ds[args.train_split], args)
    if name is None:
        held = train.train_test_split(test_size=args.validation_split, seed=args.seed,
                                      stratify_by_column="label")
        train, evals, name = held["train"], held["test"], f"{args.validation_split:.0%} of train"
    else:
        evals = _columns(ds[name], args)
    train = train.select(range(min(args.max_train_samples or len(train), len(train))))
    evals = evals.select(range(min(args.max_eval_samples or len(evals), len(evals))))
    return train, evals, f"{desc}: {len(train)} train / {len(evals)} eval ({name})"


def _columns(ds: Any, args: DataArgs) -> Any:
    import datasets

    picked = []
    for knob, options in (("image_column", ("image", "img", "pixel_values")),
                          ("label_column", ("label", "labels", "fine_label"))):
        value = getattr(args, knob)
        name = next((c for c in options if c in ds.column_names), None) if value == "auto" \
            else value
        if name not in ds.column_names and knob == "label_column" and value == "auto" and \
                args.data_dir:  # datasets' imagefolder drops the labels of a one-class tree
            raise ConfigError(f"{args.data_dir!r} has no labels (columns {ds.column_names}): "
                              f"an image folder needs at least two class folders in each "
                              f"split, one per class.")
        if name not in ds.column_names:
            raise ConfigError(f"No {knob} among the columns {ds.column_names}: set --{knob}.")
        picked.append(name)
    ds = ds.select_columns(picked).rename_columns(
        {k: v for k, v in zip(picked, ("image", "label"), strict=True) if k != v})
    if not isinstance(ds.features["label"], datasets.ClassLabel):
        raise ConfigError(f"The label column must be a ClassLabel (class names); got "
                          f"{ds.features['label']}.")
    return ds.cast_column("image", datasets.Image(decode=False))


def class_names(ds: Any) -> list[str]:
    return list(ds.features["label"].names)


def image_transform(size: int, mean: list[float], std: list[float], train: bool = False,
                    crop_scale: tuple[float, float] = (0.08, 1.0), hflip: bool = True,
                    eval_crop_ratio: float = 1.0) -> Any:
    """torchvision.transforms.v2, the ImageNet recipe: random resized crop and flip for
    training; resize to size / eval_crop_ratio and center crop for evaluation."""
    import torch
    from torchvision.transforms import v2

    if train:
        ops = [v2.RandomResizedCrop(size, scale=crop_scale)] + ([v2.RandomHorizontalFlip()]
                                                                 if hflip else [])
    else:
        ops = [v2.Resize(round(size / eval_crop_ratio)), v2.CenterCrop(size)]
    return v2.Compose([v2.ToImage(), *ops, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean, std)])


class ImageDataset:
    """A `datasets` split as {pixel_values, labels, index}, decoded and transformed on the fly.

    Augmentation is a pure function of (seed, epoch, index): each sample's transform runs under
    its own RNG seed, so a resumed run (or any number of DataLoader workers) sees the same crops.
    With ``warn`` the dataset warns itself, once per image and process (finetune.py).
    """

    def __init__(self, ds: Any, transform: Callable, num_channels: int, size: int,
                 seed: int = 0, warn: bool = False) -> None:
        self.ds, self.transform, self.size, self.seed = ds, transform, size, seed
        self.num_channels, self.warn, self.warned, self.epoch = num_channels, warn, set(), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        row = self.ds[index]
        try:
            image = open_image(row["image"]).convert("L" if self.num_channels == 1 else "RGB")
        except (OSError, ValueError, SyntaxError) as exc:
            if self.warn and index not in self.warned:
                self.warned.add(index)
                warn_unreadable(row["image"], index, exc)
            return {"pixel_values": torch.zeros(self.num_channels, self.size, self.size),
                    "labels": IGNORE_INDEX, "index": index}
        with torch.random.fork_rng(devices=[]):  # the CPU generator only
            torch.default_generator.manual_seed(
                (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            pixels = self.transform(image)
        return {"pixel_values": pixels, "labels": int(row["label"]), "index": index}


def open_image(entry: Any) -> Any:
    """A PIL image from a `datasets` Image entry (path and/or bytes), fully decoded."""
    from PIL import Image

    image = Image.open(io.BytesIO(entry["bytes"]) if entry.get("bytes") else entry["path"])
    image.load()  # decode now: a truncated file fails here, not later in the transform
    return image


def warn_unreadable(entry: Any, index: int, exc: BaseException | None = None) -> None:
    if exc is None:  # the reason, from a second try
        try:
            open_image(entry)
        except (OSError, ValueError, SyntaxError) as again:
            exc = again
    logger.warning("skipping unreadable image %s (%s: %s); it is left out of the loss and the "
                   "metrics", entry.get("path") or f"row {index}", type(exc).__name__, exc)


class UnreadableImages:
    """The unreadable images of one split, warned about and counted once: :meth:`add` takes a
    batch's index and labels; :meth:`flush` (collective with accelerate's ``gather_object``)
    warns on the main process about the images no rank had reported before."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset, self.new, self.seen = dataset, set(), set()

    def add(self, index: Any, labels: Any) -> None:
        self.new.update(index[labels == IGNORE_INDEX].tolist())

    def flush(self, gather: Callable[[list], list], main: bool) -> None:
        new = {i for part in gather([sorted(self.new)]) for i in part} - self.seen
        self.new, self.seen = set(), self.seen | new
        for index in sorted(new) if main else ():
            warn_unreadable(self.dataset.ds[index]["image"], index)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": sorted(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = set(state["seen"])


def loaders(train: ImageDataset, evals: ImageDataset, batch_size: int, num_workers: int,
            pin_memory: bool) -> tuple[Any, Any]:
    """DataLoaders (sharded by prepare). drop_last: every step sees a full batch on every rank."""
    from torch.utils.data import DataLoader

    kw: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory,
                          "prefetch_factor": 4 if num_workers else None}
    train_dl = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, **kw)
    if len(train_dl) == 0:
        raise ConfigError(f"The training set ({len(train)} images) is smaller than one "
                          f"per-process batch ({batch_size}). Lower --batch_size.")
    return train_dl, DataLoader(evals, batch_size=batch_size, shuffle=False, **kw)
