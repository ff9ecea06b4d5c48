"""Measuring served paths (convert/served.py): what convert reuses instead of running again, and its threads."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from appliance import imaging
from convert.images import map_threads, reference_tensor
from convert.served import Bar, Candidate, Photo, measure_paths, phone_size_copy, with_phone_size_copies
from convert.verify import infer_all, load_runtime

from .conftest import LABELS, encode, photo


def test_map_threads_keeps_the_order_and_stops_with_its_caller() -> None:
    started: list[int] = []
    lock = threading.Lock()

    def slow_square(n: int) -> int:
        with lock:
            started.append(n)
        time.sleep(0.01 * (n % 3))  # finishing out of order
        return n * n

    assert list(map_threads(slow_square, range(20))) == [n * n for n in range(20)]
    started.clear()
    results = map_threads(slow_square, range(1000))
    assert [next(results) for _ in range(3)] == [0, 1, 4]
    results.close()
    assert len(started) < 3 + 3 * 2 * 8  # a few ahead per thread, never the thousand


def test_phone_size_copies_are_the_same_bytes_on_any_number_of_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    photos = [Photo(f"p{i}", encode(photo(400, 300, seed=i))) for i in range(2)]
    many = with_phone_size_copies(photos)
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    one = with_phone_size_copies(photos)
    assert [(p.name, p.data, p.copy_short_side) for p in many] == [(p.name, p.data, p.copy_short_side) for p in one]
    assert [p.copy_short_side for p in many] == [None, None, 1050, 2112, 3024, 1050, 2112, 3024]
    with Image.open(io.BytesIO(many[4].data)) as copy:
        assert copy.size == (4032, 3024)


def _phone_photos(seed: int) -> list[Photo]:
    """Real JPEGs, an EXIF-rotated one and a PNG among them, and a 12 MP copy."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photos = [Photo("plain", encode(photo(640, 480, seed=seed))),
              Photo("rotated", encode(photo(600, 450, seed=seed + 1, colour=(90, 160, 200)), exif=exif.tobytes())),
              Photo("png", encode(photo(500, 500, seed=seed + 2, colour=(40, 200, 90)), "PNG"))]
    with Image.open(io.BytesIO(photos[0].data)) as image:
        photos.append(Photo("copy", phone_size_copy(image, 1), 3024))
    return photos


def _figures(tiny_model_dir: Path, photos: list[Photo], *, exact_probabilities: np.ndarray | None,
             reference_tensors: np.ndarray | None) -> dict[str, dict]:
    tensors = np.stack([reference_tensor(io.BytesIO(p.data)) for p in photos])
    reference = infer_all(load_runtime(tiny_model_dir / "model.onnx", "onnx").infer, tensors, batch=4)
    golden = ([photos[0].data], reference[:1])
    candidate = Candidate("onnx-fp32", "onnx", "fp32", tiny_model_dir / "model.onnx", exact_probabilities)
    paths = measure_paths([candidate], photos, reference, golden, imaging.Preprocessing(), list(LABELS), Bar(),
                          bf16=False, say=lambda _: None, reference_tensors=reference_tensors)
    return {p.decode: p.figures for p in paths}


def test_the_exact_path_reuses_the_parity_check_only_where_it_decodes_to_the_same_tensors(tiny_model_dir: Path) -> None:
    photos = _phone_photos(3)
    tensors = np.stack([reference_tensor(io.BytesIO(p.data)) for p in photos])
    decoded = np.stack([imaging.decode(p.data, imaging.Preprocessing(), max_pixels=1 << 30, mode="exact").tensor
                        for p in photos])
    assert np.array_equal(decoded, tensors)  # the exact decode is the reference preprocessing, bit for bit
    run_again = _figures(tiny_model_dir, photos, exact_probabilities=None, reference_tensors=None)
    assert run_again["exact"]["top1_agreement"] == 1.0 and run_again["exact"]["max_abs_dp"] < 1e-6
    # Probabilities the parity check would have measured: swapped rows stand for a wrong artifact.
    wrong = infer_all(load_runtime(tiny_model_dir / "model.onnx", "onnx").infer, tensors, batch=4)[::-1].copy()
    reused = _figures(tiny_model_dir, photos, exact_probabilities=wrong, reference_tensors=tensors)
    assert reused["exact"]["max_abs_dp"] > 0.1  # the given probabilities were used, not run again
    assert reused["fast"] == run_again["fast"]  # the fast decode gives other tensors: run as before
    # Tensors that are not what the decode gives: nothing is reused.
    other = tensors.copy()
    other[0, 0, 0, 0] += 1e-3
    assert _figures(tiny_model_dir, photos, exact_probabilities=wrong, reference_tensors=other) == run_again
