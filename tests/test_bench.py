"""The benchmark's own parts (bench/): the baseline re-creation runs the same weights and answers
like the old back end, and a section runs end to end into results.json and report.md.

Measurements themselves are never asserted here: the benchmark reports them, on demand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.images import MULTIPART_TYPE, multipart_body
from bench.procs import ROOT, start_appliance, start_baseline

from .conftest import encode, photo

USER = {"X-User-Id": "user001", "Content-Type": MULTIPART_TYPE}


def test_the_baseline_answers_like_the_old_back_end_on_the_same_weights(
        demo_checkpoint_file: Path, demo_model_dir: Path, tmp_path: Path) -> None:
    data = encode(photo(600, 450, seed=3), quality=95)  # no reduced decode: both servers see every pixel
    body = multipart_body(data, "lesion.jpg")
    baseline = start_baseline("baseline", demo_checkpoint_file, tmp_path / "baseline")
    try:
        status, raw = baseline.post("/check-image", body, USER)
        assert status == 200, raw
        old = json.loads(raw)
        status, raw = baseline.post("/check-image", body, {"Content-Type": MULTIPART_TYPE})  # no X-User-Id
        assert (status, json.loads(raw)) == (400, {"detail": "Missing X-User-Id header"})
    finally:
        baseline.stop()
    appliance = start_appliance("appliance", demo_model_dir, tmp_path / "appliance",
                                {"model": {"artifact": "onnx-fp32"}, "runtime": {"backend": "onnxruntime"}})
    try:
        status, raw = appliance.post("/check-image", body, USER)
        assert status == 200, raw
        new = json.loads(raw)
    finally:
        appliance.stop()
    # The contract's fields, the same case id from an empty store, and the same classification:
    # the baseline is the same model behind the old request path, so the ratios compare like with like.
    assert set(new) >= set(old) and (old["case_id"], old["user_id"]) == (new["case_id"], new["user_id"]) == (
        "10000", "user001")
    assert [p["label"] for p in old["predictions"]] == [p["label"] for p in new["predictions"]]
    for before, after in zip(old["predictions"], new["predictions"], strict=True):
        assert after["confidence"] == pytest.approx(before["confidence"], abs=1e-3)
    assert new["blur_score"] == pytest.approx(old["blur_score"], rel=1e-3)  # under 512 px: the same definition
    stored = sorted(p.name for p in (tmp_path / "baseline" / "storage" / "user001").iterdir())
    assert stored == sorted([f"{old['image_id']}.jpg", "case_counter.json", "metadata.jsonl"])


def test_a_section_runs_into_results_and_report(demo_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "cold_start,decode_modes", "--model", str(demo_model_dir),
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    variants = results["cold_start"]["variants"]
    assert len(variants) == 3
    assert all(v["ready_s"] > 0 and v["ready_rss_mb"] > 0 for v in variants)
    assert results["cold_start"]["imports_s"] > 0  # measured in other processes: no order to assert
    report = (out / "report.md").read_text()
    assert "## Cold start" in report and "cold start to ready ≤ 2 s with the compiled-model cache" in report
    decode = results["decode_modes"]
    assert decode["decode_ms"]["fast"] > 0 and decode["decode_ms"]["exact"] > 0
    assert decode["exact_vs_fast"] == round(decode["decode_ms"]["exact"] / decode["decode_ms"]["fast"], 2)
    assert {p["key"] for p in decode["served_paths"]} >= {"openvino-fp32/fast", "openvino-fp32/exact"}
    assert "## Decode modes on the 12 MP photo (demo v1)" in report
