"""The served answer is the clinic's model's answer, on checkpoints nobody tuned the appliance to.

Two ResNet50s in the old back end's format: one whose answers move with small input
changes, and one that really learned (a trunk trained by others on ImageNet photos,
shipped in PyPI's imgsim wheel, with a lesion head trained here). Photos from 600x450
up to 12 MP in a count that is no multiple of any batch size:
`python -m convert` with its default options, then `appliance serve` with the shipped
config.toml, then every /check-image answer against PyTorch through the old back end's
exact transform (PIL decode, Resize(256), CenterCrop(224), ToTensor, Normalize).
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from convert.__main__ import HAM10000_LABELS, main

from .convert_helpers import (
    load_manifest,
    make_sensitive_resnet50,
    make_trained_resnet50,
    write_checkpoint,
    write_phone_photos,
)
from .test_serve import ROOT, free_port, post_image, running, wait_ready

SIZES = [(600, 450), (1024, 768), (1600, 1200), (2592, 1944), (4032, 3024), (3024, 4032), (2016, 1512)]
OLD_TRANSFORM = transforms.Compose([
    transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
])


# Each checkpoint and how many photos the clinic brings. INT8 moves probabilities more than
# FP32 does; 43 photos (13 to verify, 39 copies) give convert's verdict on that enough photos
# to hold on the new photos below. With 19 (6 to verify), an INT8 verdict once passed and then
# failed on new photos, as convert's warning says it may.
CHECKPOINTS = {"sensitive": (make_sensitive_resnet50, 19), "trained": (make_trained_resnet50, 43)}


class Clinic(NamedTuple):
    kind: str
    model: torch.nn.Module
    models: Path  # the converted model's name directory
    photos: int


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def clinic(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Clinic:
    """Each checkpoint converted with default options from its mixed-size photos."""
    root = tmp_path_factory.mktemp(f"fidelity-{request.param}")
    make, count = CHECKPOINTS[request.param]
    model = make()
    checkpoint = write_checkpoint(root / "ham10000_resnet50_tuned_best.pt", model, "model_state_dict")
    photos = root / "clinic_photos"
    write_phone_photos(photos, [SIZES[i % len(SIZES)] for i in range(count)])
    code = main([str(checkpoint), "--name", "clinic", "--out", str(root / "models"), "--calibration-dir", str(photos)])
    assert code == 0
    return Clinic(request.param, model, root / "models" / "clinic", count)


def old_backend_answer(model: torch.nn.Module, data: bytes) -> np.ndarray:
    import io

    image = Image.open(io.BytesIO(data)).convert("RGB")
    with torch.no_grad():
        return torch.softmax(model(OLD_TRANSFORM(image).unsqueeze(0)), 1)[0].numpy()


def test_convert_records_every_served_path_and_its_verdict(clinic) -> None:
    models = clinic.models
    manifest = load_manifest(models / "1")
    paths = manifest["served_paths"]
    for key in manifest["artifacts"]:
        assert {f"{key}/fast", f"{key}/exact"} <= set(paths)
    for key, p in paths.items():
        per_class_ok = all(c["top1_agreement"] >= 0.99 and c["max_abs_dp"] <= 0.05 for c in p["per_class"].values())
        meets = p["top1_agreement"] >= 0.99 and p["max_abs_dp"] <= 0.05 and per_class_ok and p["golden_top1_agreement"] == 1
        assert p["passed"] == meets, key
        assert p["ms_per_image"] > 0
    # The exact decode of an FP32 artifact is the reference: it always passes.
    assert paths["onnx-fp32/exact"]["passed"] and paths["openvino-fp32/exact"]["passed"]
    verifying = round(0.3 * clinic.photos)  # 30% verify
    assert manifest["verification"]["photos"] == verifying
    assert manifest["verification"]["warnings"] == [
        f"only {verifying} verification photo(s), fewer than 30: one disagreement moves top-1 by {1 / verifying:.0%}; "
        "add photos to --calibration-dir"]


def test_served_answers_agree_with_pytorch_on_phone_photos(clinic, tmp_path: Path) -> None:
    model, models = clinic.model, clinic.models
    port = free_port()
    environ = {"MODEL_PATH": str(models), "STORAGE_ROOT": str(tmp_path / "data"), "BACKSERVER_PORT": str(port)}
    config = ROOT / "config.toml"  # the shipped default config, as a new user runs it
    (tmp_path / "config.toml").write_text(config.read_text())
    photos = write_phone_photos(tmp_path / "new_photos", [SIZES[i % len(SIZES)] for i in range(12)], seed=77)
    with running(tmp_path / "config.toml", **environ) as proc:
        wait_ready(proc, port, timeout_s=120)
        # A first start on this machine serves FP32 until every path is proven here (inference/proof.py).
        deadline = time.monotonic() + 600
        while (info := json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info").read()))[
                "model"]["last_reload"] is None:
            assert time.monotonic() < deadline, info["served_path"]["proof"]
            time.sleep(0.5)
        served = info["served_path"]
        assert info["model"]["last_reload"]["trigger"] == "proven on this CPU", info["model"]["last_reload"]
        assert served["passed"] and served["why"].startswith("fastest of ") and "; proven on this machine at " in served["why"]
        flips, worst = 0, 0.0
        for path in photos:
            data = path.read_bytes()
            answer = post_image(port, data)
            assert answer["model"]["served_path"] == served["key"]
            got = {p["label"]: p["confidence"] for p in answer["predictions"]}
            expected = old_backend_answer(model, data)
            got_vector = np.array([got[label] for label in HAM10000_LABELS])
            flips += int(np.argmax(got_vector) != np.argmax(expected))
            worst = max(worst, float(np.max(np.abs(got_vector - expected))))
    assert flips / len(photos) <= 0.01, (flips, served)
    assert worst <= 0.05 + 1e-6, (worst, served)  # answers carry 6 decimals



def test_int8_is_kept_only_where_it_meets_the_bar(clinic) -> None:
    """The trained network's INT8 meets the bar with default options; the sensitive one's is left out."""
    from convert.images import preprocess
    from convert.synthetic import synthetic_photos
    from convert.verify import infer_all, load_runtime

    model, models = clinic.model, clinic.models
    artifacts = load_manifest(models / "1")["artifacts"]
    if clinic.kind == "sensitive":
        # FP32 itself flips under noise smaller than INT8's rounding: no INT8 can agree (convert says so).
        assert not {"onnx-int8", "openvino-int8"} & set(artifacts)
        return
    for key in ("onnx-int8", "openvino-int8"):
        parity = artifacts[key]["parity"]
        assert parity["passed"] and not artifacts[key]["degraded"], (key, parity)
    # Held-out photos convert never saw, enough to measure its 99% bar: on 70, one flip already
    # failed (an INT8 that truly agrees on 99% passes zero flips in 70 only half the time).
    # On 200, at most 4 flips (98%) is where an INT8 truly at the bar lands 95 times in 100.
    tensors = preprocess(synthetic_photos(200, 31, (400, 300)))
    with torch.no_grad():
        expected = torch.cat([torch.softmax(model(torch.from_numpy(tensors[i : i + 25])), 1)
                              for i in range(0, len(tensors), 25)]).numpy()
    got = infer_all(load_runtime(models / "1" / artifacts["onnx-int8"]["file"], "onnx").infer, tensors, batch=16)
    assert np.sum(got.argmax(1) != expected.argmax(1)) <= 4
