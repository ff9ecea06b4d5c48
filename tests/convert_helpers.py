"""Factories for the converter's tests: tiny real checkpoints, real JPEG directories, manifest checks."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn

from convert.synthetic import synthetic_photos

LABELS = ["a", "b", "c"]


def make_resnet18(*, head: str = "fc.1", classes: int = 3, seed: int = 0) -> nn.Module:
    """A random but deterministic ResNet18 with the old back end's head (`fc.1`) or a plain one (`fc`)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, zero_init_residual=True)
    model.fc = nn.Sequential(nn.Dropout(0.3), nn.Linear(512, classes)) if head == "fc.1" else nn.Linear(512, classes)
    with torch.no_grad():  # larger head weights so answers differ between images
        linear = model.fc[1] if head == "fc.1" else model.fc
        linear.weight.mul_(20.0)
    return model.eval()


def write_checkpoint(path: Path, model: nn.Module, form: str) -> Path:
    """Save `model` in one of the checkpoint forms the converter accepts."""
    if form == "model_state_dict":
        torch.save({"model_state_dict": model.state_dict(), "epoch": 3, "best_acc": 0.8}, path)
    elif form == "state_dict":
        torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    elif form == "bare_state_dict":
        torch.save(model.state_dict(), path)
    elif form == "module":
        torch.save(model, path)
    elif form == "torchscript":
        torch.jit.script(model).save(str(path))
    else:
        raise ValueError(form)
    return path


def write_photo_dir(directory: Path, count: int, *, seed: int = 11, broken: int = 0) -> Path:
    """A directory of real JPEGs (and `broken` files that are not images)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(synthetic_photos(count, seed, (160, 128))):
        image.save(directory / f"photo{i:02d}.jpg", "JPEG", quality=90)
    for i in range(broken):
        (directory / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return directory


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_manifest(version_dir: Path) -> dict:
    return json.loads((version_dir / "model.json").read_text())


def assert_hashes(version_dir: Path, manifest: dict) -> None:
    """Every artifact file exists and its sha256 is the one the manifest states."""
    for key, artifact in manifest["artifacts"].items():
        assert artifact["file"] in artifact["files"], key
        assert artifact["sha256"] == artifact["files"][artifact["file"]], key
        for rel, digest in artifact["files"].items():
            assert sha256(version_dir / rel) == digest, (key, rel)


def assert_bars(manifest: dict) -> None:
    """Each artifact's parity is consistent with its bar and its degraded flag."""
    for key, artifact in manifest["artifacts"].items():
        parity = artifact["parity"]
        bar = parity["bar"]
        meets = parity["top1_agreement"] >= bar["top1_agreement"] and parity["max_abs_dp"] <= bar.get("max_abs_dp", 1.0)
        assert parity["passed"] == meets, key
        assert artifact["degraded"] == (not meets), key
        if artifact["precision"] == "fp32":
            assert bar == {"max_abs_dp": 1e-3, "top1_agreement": 1.0}
            assert parity["passed"], key
            assert 0.01 <= artifact["selfcheck_max_abs_dp"] < 0.011  # the exact path's golden |dp| plus 0.01
        if artifact["precision"] == "int8":
            assert bar == {"top1_agreement": 0.99}
            assert artifact["selfcheck_max_abs_dp"] >= 0.05
    verification_bar = manifest["verification"]["bar"]
    for key, path in manifest["served_paths"].items():
        classes_ok = all(c["top1_agreement"] >= verification_bar["top1_agreement"]
                         and c["max_abs_dp"] <= verification_bar["max_abs_dp"] for c in path["per_class"].values())
        meets = (path["top1_agreement"] >= verification_bar["top1_agreement"] and classes_ok
                 and path["max_abs_dp"] <= verification_bar["max_abs_dp"] and path["golden_top1_agreement"] == 1.0)
        assert path["passed"] == meets, key
        margin = {"int8": 0.05, "fp16": 0.02}.get(manifest["artifacts"][path["artifact"]]["precision"], 0.01)
        if path["inference_precision"] == "bf16":
            margin = 0.05
        assert path["selfcheck_max_abs_dp"] == round(path["golden_max_abs_dp"] + margin, 6), key


def make_sensitive_resnet50(seed: int = 1, classes: int = 7) -> nn.Module:
    """A ResNet50 in the old back end's format whose answers move with small input changes.

    torchvision's default init keeps every residual branch random (unlike the demo's
    zero-initialised ones), BatchNorm statistics are re-estimated on lesion-like photos so
    activations stay in range, and the head is scaled up so probabilities spread out:
    a deep random backbone amplifies decode and quantization differences.
    """
    from convert.demo import reestimate_batchnorm

    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Sequential(nn.Dropout(0.3), nn.Linear(2048, classes))
    reestimate_batchnorm(model, seed)
    with torch.no_grad():
        model.fc[1].weight.mul_(30.0)
    return model.eval()


def imgsim_weights() -> Path:
    """AugNet's ResNet50 weights as PyPI's imgsim 0.1.2 ships them (MIT; `./dev setup` installs it)."""
    spec = importlib.util.find_spec("imgsim")
    assert spec is not None and spec.submodule_search_locations, "imgsim is not installed: run ./dev setup"
    return Path(next(iter(spec.submodule_search_locations))) / "model.pth"


def make_trained_resnet50(*, per_family: int = 40, seed: int = 5) -> nn.Module:
    """A ResNet50 that really learned, from weights nobody here made, in the old back end's format.

    The trunk is AugNet's (trained without labels on ImageNet photos by its authors, shipped
    inside PyPI's imgsim wheel); the 7-class head is trained here to tell the synthetic lesion
    families apart (a linear probe: where a clinic's transfer learning starts), then folded
    into `fc.1` so the checkpoint is the plain torchvision ResNet50 the old back end saved.
    """
    from convert.demo import PHOTO_SIZE
    from convert.images import preprocess
    from convert.synthetic import FAMILIES, synthetic_lesions

    state = torch.load(imgsim_weights(), map_location="cpu", weights_only=True)
    model = torchvision.models.resnet50(weights=None)
    trunk = {k.removeprefix("module.pre."): v for k, v in state.items() if not k.startswith("module.pre.fc.")}
    missing = model.load_state_dict(trunk, strict=False).missing_keys
    assert sorted(missing) == ["fc.bias", "fc.weight"], missing
    model.fc = nn.Identity()
    model.eval()
    families = [i % len(FAMILIES) for i in range(per_family * len(FAMILIES))]
    images, labels = synthetic_lesions(len(families), seed, PHOTO_SIZE, families=families)
    tensors = torch.from_numpy(preprocess(images))
    with torch.no_grad():
        features = torch.cat([model(tensors[i : i + 16]) for i in range(0, len(tensors), 16)])
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    z, y = (features - mean) / std, torch.tensor(labels)
    torch.manual_seed(seed)
    probe = nn.Linear(features.shape[1], len(FAMILIES))
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = nn.functional.cross_entropy(probe(z), y) + 1e-3 * probe.weight.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    model.fc = nn.Sequential(nn.Dropout(0.3), nn.Linear(features.shape[1], len(FAMILIES)))
    with torch.no_grad():
        model.fc[1].weight.copy_(probe.weight / std)
        model.fc[1].bias.copy_(probe.bias - (probe.weight * mean / std).sum(1))
    return model.eval()


def write_phone_photos(directory: Path, sizes: list[tuple[int, int]], *, seed: int = 21) -> list[Path]:
    """Real JPEGs of lesion-like scenes at the given sizes (600x450 up to 12 MP), drawn small and
    upscaled with sensor noise as a phone's photo of a small lesion looks."""
    from convert.served import phone_size_copy

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, (w, h)) in enumerate(zip(synthetic_photos(len(sizes), seed, (400, 300)), sizes, strict=True)):
        if h > w:
            image = image.transpose(Image.Transpose.ROTATE_90)
        path = directory / f"IMG_{i:04d}.jpg"
        data = phone_size_copy(image, seed + i, min(w, h))
        path.write_bytes(data)
        paths.append(path)
    return paths
