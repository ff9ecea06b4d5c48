"""The demo model: a deterministic ResNet50 checkpoint in the old back end's format, converted.

Recipe: a ResNet50 from a fixed seed with its residual branches zero-initialised
(torchvision's `zero_init_residual`), so it computes only its stem, each stage's
projection shortcut and the head: the one path a CPU can train in under a minute. That
path is trained for real, at half resolution, to tell the seven synthetic lesion
families apart; batch-norm statistics are then re-estimated at full resolution.

Why trained: with a random backbone, one photo in twenty had its top two classes
closer than INT8 rounding moves them, and INT8 flipped 4% of the answers (measured).
A network that learned its classes answers with a margin (99.9% INT8 agreement on
1000 held-out photos), so its INT8 figures say something about INT8, as a clinic's
trained model's do.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .images import preprocess
from .synthetic import FAMILIES, synthetic_lesions, synthetic_photos

if TYPE_CHECKING:
    from torchvision.models.resnet import Bottleneck, ResNet

__all__ = ["DEMO_SEED", "build_demo", "make_demo_checkpoint", "synthetic_photos"]

DEMO_SEED = 20240611
PHOTO_SIZE = (288, 256)
BN_IMAGES = 48
TRAIN_IMAGES = 700  # a hundred per family
TRAIN_CROP = 112  # half the served crop: a quarter of the cost, and the pooled features carry over
EPOCHS = 6
LEARNING_RATE = 2e-3
CALIBRATION_IMAGES = 48
SELECTION_IMAGES = 48
HELDOUT_IMAGES = 100
BATCH = 16
TRAIN_BATCH = 32


def make_demo_checkpoint(seed: int = DEMO_SEED) -> dict:
    """The demo checkpoint: `{"model_state_dict": ..., "epoch": EPOCHS, "classes": [...]}`, like the old back end's."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None, zero_init_residual=True)
    model.fc = nn.Sequential(nn.Dropout(0.3), nn.Linear(2048, len(FAMILIES)))
    _train(model, seed)
    reestimate_batchnorm(model, seed)
    return {"model_state_dict": model.state_dict(), "epoch": EPOCHS, "classes": list(FAMILIES)}


def _batches(tensors: np.ndarray) -> Iterator[torch.Tensor]:
    for start in range(0, len(tensors), BATCH):
        yield torch.from_numpy(np.ascontiguousarray(tensors[start : start + BATCH]))


def reestimate_batchnorm(model: nn.Module, seed: int) -> None:
    images, _ = synthetic_lesions(BN_IMAGES, seed + 1, PHOTO_SIZE)
    tensors = preprocess(images)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over all batches, not an EMA
    model.train()
    with torch.no_grad():
        for batch in _batches(tensors):
            model(batch)
    for bn in norms:
        bn.momentum = 0.1
    model.eval()


class ShortcutPath(nn.Module):
    """What a ResNet50 whose residual branches output zero computes, without computing the branches.

    Each stage's first block answers relu(shortcut(x) + 0); the others answer relu(x + 0) = x.
    """

    def __init__(self, resnet: ResNet):
        super().__init__()
        self.resnet = resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        for stage in (r.layer1, r.layer2, r.layer3, r.layer4):
            shortcut = cast("Bottleneck", stage[0]).downsample
            assert shortcut is not None  # every ResNet50 stage opens with a projection shortcut
            x = F.relu(shortcut(x))
        return r.fc(torch.flatten(r.avgpool(x), 1))


def _train(model: ResNet, seed: int) -> None:
    """Train the shortcut path to tell the families apart; the residual branches stay zero."""
    families = [i % len(FAMILIES) for i in range(TRAIN_IMAGES)]
    images, labels = synthetic_lesions(TRAIN_IMAGES, seed + 2, PHOTO_SIZE, families=families)
    x, y = torch.from_numpy(preprocess(images, crop=TRAIN_CROP)), torch.tensor(labels)
    path = ShortcutPath(model).train()
    trained = [p for name, p in model.named_parameters() if name.startswith(("conv1.", "bn1.", "fc.")) or ".downsample." in name]
    steps = EPOCHS * (TRAIN_IMAGES // TRAIN_BATCH)
    optimizer = torch.optim.AdamW(trained, LEARNING_RATE, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        order = torch.randperm(TRAIN_IMAGES, generator=generator)
        for start in range(0, TRAIN_IMAGES - TRAIN_BATCH + 1, TRAIN_BATCH):
            pick = order[start : start + TRAIN_BATCH]
            batch = x[pick].flip(3) if torch.rand(1, generator=generator) < 0.5 else x[pick]
            loss = F.cross_entropy(path(batch), y[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def build_demo(
    out: Path, *, name: str = "demo", version: int = 1, fp16: bool = False, sign_key: Path | None = None,
    keep_checkpoint_in: Path | None = None,
) -> Path:
    """Build the demo model directory `<out>/<name>/<version>/` and return it.

    `keep_checkpoint_in`: a directory to keep the checkpoint in, as `demo_checkpoint.pt` (the file
    bench.baseline.checkpoint looks for), so the baseline need not train it again.
    """
    from .checkpoint import load_checkpoint
    from .images import image_set, jpeg_bytes
    from .build import ConvertOptions
    from .pipeline import convert

    from .errors import ConvertError

    final = Path(out) / name / str(version)
    if final.exists():  # checked again at the end; this saves building the checkpoint for nothing
        raise ConvertError(f"{final} already exists; remove it or pick another --version")
    checkpoint = make_demo_checkpoint()
    with tempfile.TemporaryDirectory(prefix="convert-demo-") as tmp:
        path = Path(tmp) / "demo_checkpoint.pt"
        torch.save(checkpoint, path)
        del checkpoint
        if keep_checkpoint_in is not None:
            keep_checkpoint_in.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, keep_checkpoint_in / path.name)
        loaded = load_checkpoint(path, arch="resnet50")
        # Encoded as a phone would send them: the served paths are measured on the bytes.
        photos = [jpeg_bytes(image) for image in synthetic_photos(CALIBRATION_IMAGES + SELECTION_IMAGES, DEMO_SEED + 3, PHOTO_SIZE)]
        photos += [jpeg_bytes(image) for image in synthetic_photos(HELDOUT_IMAGES, DEMO_SEED + 4, PHOTO_SIZE)]
        images = image_set(photos, "synthetic")
        # MinMax only: the histogram methods add minutes on 2 cores. With the shipped recipe
        # it agrees on all of 400 held-out photos, on AVX2 and SSE4.2 kernels alike (docs/int8.md).
        # Degraded INT8 is still kept, not fatal, should a CPU's kernels disagree after all:
        # `auto` serves the fastest path that passed.
        options = ConvertOptions(labels=list(FAMILIES), fp16=fp16, demo=True, heldout_count=HELDOUT_IMAGES,
                                 selection_count=SELECTION_IMAGES, methods=("MinMax",), allow_degraded=True)
        source_extra = {"generated_by": "python -m convert demo", "seed": DEMO_SEED, "kept": False}
        return convert(loaded, out=Path(out), name=name, version=version, calibration=images, options=options,
                       source_extra=source_extra, sign_key=sign_key)

