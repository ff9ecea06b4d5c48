"""Shared fixtures: a tiny but real model directory, real images, configs.

The tiny model is a real ONNX graph (global average pool -> linear -> softmax)
that ONNX Runtime and OpenVINO both run; its expected answers are computed
here independently of the appliance (PIL decode, the reference resize/crop,
NumPy maths), so the server's self-check is tested against a true reference.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

from appliance.config import Config, parse_config
from tests.postgres import PostgresServer

LABELS = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
# Linear head of the tiny model: each class answers to a colour direction of
# the normalised mean pixel, so differently coloured photos get different top-1s.
WEIGHTS = 3.0 * np.array(
    [
        [1.0, -1.0, 0.0, 0.5, -0.5, 0.2, -0.2],
        [-1.0, 1.0, 0.5, 0.0, -0.2, 0.4, -0.6],
        [0.0, 0.2, -1.0, -0.5, 1.0, -0.3, 0.8],
    ],
    dtype=np.float32,
)
BIAS = np.array([0.1, 0.0, -0.1, 0.05, 0.0, 0.2, -0.05], dtype=np.float32)


def photo(width: int = 600, height: int = 450, *, seed: int = 0, colour: tuple[int, int, int] = (200, 140, 120),
          sharp: bool = True) -> Image.Image:
    """A lesion-like RGB photo: skin-toned field, a dark blob, texture (sharp) or none (blurry)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.empty((height, width, 3), dtype=np.float64)
    base[:] = colour
    blob = ((xx - width * 0.5) / (width * 0.2)) ** 2 + ((yy - height * 0.5) / (height * 0.25)) ** 2 < 1
    base[blob] *= 0.45
    if sharp:
        base += rng.normal(0, 25, size=base.shape)
        base[::7, :, :] *= 0.7  # hair-like lines: strong edges
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "JPEG", **params: Any) -> bytes:
    """The image's bytes in the given format."""
    buffer = io.BytesIO()
    if fmt == "JPEG":
        params.setdefault("quality", 92)
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def reference_probabilities(data: bytes) -> np.ndarray:
    """What the tiny model should answer, via the reference preprocessing (PIL, full decode)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = 256, int(256 * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    image = image.resize(size, Image.BILINEAR)
    w, h = image.size
    top, left = int(round((h - 224) / 2.0)), int(round((w - 224) / 2.0))
    image = image.crop((left, top, left + 224, top + 224))
    pixels = (np.asarray(image, dtype=np.float64) / 255.0 - MEAN) / STD
    logits = pixels.mean(axis=(0, 1)) @ WEIGHTS.astype(np.float64) + BIAS
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


def _tiny_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(LABELS)])],
        [numpy_helper.from_array(WEIGHTS, "W"), numpy_helper.from_array(BIAS, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


GOLDEN_COLOURS = [(200, 140, 120), (90, 60, 160), (230, 220, 90), (60, 160, 70), (150, 40, 40)]


def build_tiny_model_dir(root: Path) -> Path:
    """Write `<root>/tiny/1/` with ONNX and OpenVINO FP32 artifacts, golden images and a manifest."""
    from appliance.inference.runtimes.openvino import import_openvino

    ov = import_openvino()

    version = root / "tiny" / "1"
    (version / "golden").mkdir(parents=True)
    (version / "openvino" / "fp32").mkdir(parents=True)
    _tiny_onnx(version / "model.onnx")
    ov.save_model(ov.convert_model(str(version / "model.onnx")), str(version / "openvino/fp32/model.xml"),
                  compress_to_fp16=False)
    golden = []
    for k, colour in enumerate(GOLDEN_COLOURS):
        fmt, suffix = ("PNG", "png") if k == 1 else ("JPEG", "jpg")
        data = encode(photo(600 + 40 * k, 450, seed=k, colour=colour), fmt)
        (version / "golden" / f"{k}.{suffix}").write_bytes(data)
        golden.append({"file": f"golden/{k}.{suffix}", "probabilities": reference_probabilities(data).tolist()})

    def artifact(fmt: str, files: list[str]) -> dict[str, Any]:
        hashes = {f: _sha256(version / f) for f in files}
        return {"format": fmt, "precision": "fp32", "file": files[0], "sha256": hashes[files[0]], "files": hashes,
                "degraded": False, "selfcheck_max_abs_dp": 1e-3,
                "parity": {"images": 5, "max_abs_dp": 0.0, "top1_agreement": 1.0, "passed": True}}

    manifest = {
        "format": 1, "name": "tiny", "version": 1, "demo": True, "created_at": "2026-11-27T00:00:00+00:00",
        "labels": list(LABELS),
        "input": {"name": "input", "shape": [-1, 3, 224, 224], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "probabilities", "shape": [-1, len(LABELS)], "dtype": "float32"},
        "preprocessing": {"color": "RGB", "resize_shorter": 256, "interpolation": "bilinear-antialias", "crop": 224,
                          "scale": 1 / 255, "mean": MEAN.tolist(), "std": STD.tolist()},
        "source": {"file": "tests/conftest.py", "sha256": "0" * 64, "form": "onnx", "arch": "tiny", "head": "fc"},
        "artifacts": {
            "onnx-fp32": artifact("onnx", ["model.onnx"]),
            "openvino-fp32": artifact("openvino", ["openvino/fp32/model.xml", "openvino/fp32/model.bin"]),
        },
        "golden": golden,
    }
    (version / "model.json").write_text(json.dumps(manifest, indent=2))
    return version


# `./dev test` runs the suite on pytest-xdist workers with `--dist loadfile`: each module on one
# worker, so its module fixtures are built once. The modules that need the demo model go to one
# worker together, which builds it once; they are the longest chain, so they start first, then
# the modules that convert checkpoints of their own. (xdist's own `loadgroup` marks do not take
# with pytest 9.2, whose node ids cannot be renamed.)
DEMO_MODULES = ("tests/test_bench.py", "tests/test_convert_demo.py", "tests/test_demo_model.py",
                "tests/test_int8_isa.py", "tests/test_proof_demo.py")
FIRST = (*DEMO_MODULES, "tests/test_fidelity.py", "tests/test_convert.py")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModulesWithTheDemo(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return "demo" if module in DEMO_MODULES else module

    return ModulesWithTheDemo(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.nodeid.split("::")[0]
        if "demo_build" in getattr(item, "fixturenames", ()) and module not in DEMO_MODULES:
            raise pytest.UsageError(f"{item.nodeid} needs the demo model: add {module} to DEMO_MODULES in tests/conftest.py")
    if hasattr(config, "workerinput"):  # on an xdist worker: this order is the order modules are handed out
        items.sort(key=lambda item: FIRST.index(m) if (m := item.nodeid.split("::")[0]) in FIRST else len(FIRST))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only tiny model version directory shared by the session; copy it before changing it."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The real demo model (ResNet50, every artifact), built once per session by `convert`, and the
    directory its checkpoint is kept in (as `python -m bench` caches it)."""
    from convert.demo import build_demo

    kept = tmp_path_factory.mktemp("bench-cache")
    return build_demo(tmp_path_factory.mktemp("demo-models"), keep_checkpoint_in=kept), kept


@pytest.fixture(scope="session")
def demo_model_dir(demo_build: tuple[Path, Path]) -> Path:
    """The demo model's version directory."""
    return demo_build[0]


@pytest.fixture(scope="session")
def demo_checkpoint_file(demo_build: tuple[Path, Path]) -> Path:
    """The checkpoint the demo model was converted from, through bench.baseline's own lookup, which
    refuses a file whose sha256 is not model.json's source.sha256."""
    from bench.baseline.checkpoint import demo_checkpoint

    return demo_checkpoint(*demo_build)


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model's version directory, free to tamper with."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model" / "1"))


def rewrite_manifest(version: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit a model directory's manifest in place."""
    path = version / "model.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture
def make_config(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., Config]:
    """`make_config(storage__backend="disk", ...)`: a Config on the tiny model and a fresh store.

    Keyword names are `<section>__<key>` (runtime back ends: `runtime__openvino__device`).
    """

    def make(**overrides: Any) -> Config:
        raw: dict[str, Any] = {
            "model": {"path": str(tiny_model_dir)},
            "storage": {"root": str(tmp_path / "data")},
            "inference": {"max_wait_ms": 1.0},
        }
        for name, value in overrides.items():
            *parents, key = name.split("__")
            table = raw
            for part in parents:
                table = table.setdefault(part, {})
            table[key] = value
        return parse_config(raw)

    return make


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (tests/postgres.py), started on first use, removed at the end."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def database_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database on the session's server, also set as DATABASE_URL (what the postgres store reads)."""
    if not postgres_server.running:  # a test that stopped it for an outage and failed before starting it again
        postgres_server.start()
    url = postgres_server.create_database()
    # A MonkeyPatch of its own: a test's `monkeypatch.undo()` must not take the database away.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DATABASE_URL", url)
        yield url


@pytest.fixture(autouse=True)
def _postgres_for_backend(request: pytest.FixtureRequest) -> None:
    """A test parametrized with a "postgres" back end (backend, source or target) gets a fresh database as DATABASE_URL."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "postgres" in (callspec.params.get(name) for name in ("backend", "source", "target")):
        request.getfixturevalue("database_url")
