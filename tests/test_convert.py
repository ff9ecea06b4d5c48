"""The converter on small real checkpoints: every form, both heads, every error, the manifest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from appliance.modeldir import MEAN, STD
from convert.__main__ import main
from convert.checkpoint import load_checkpoint
from convert.errors import ConvertError
from convert.images import preprocess_file
from convert.verify import load_runtime

from .convert_helpers import (LABELS, assert_bars, assert_hashes, load_manifest, make_resnet18, sha256, write_checkpoint,
                              write_phone_photos, write_photo_dir)

FAST = ["--arch", "resnet18", "--labels", *LABELS, "--synthetic-images", "4"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- loading every checkpoint form -------------------------------------------------


@pytest.mark.parametrize("form", ["model_state_dict", "state_dict", "bare_state_dict", "torchscript"])
@pytest.mark.parametrize("head", ["fc.1", "fc"])
def test_every_form_and_head_loads_to_the_same_answers(tmp_path, form, head):
    model = make_resnet18(head=head)
    path = write_checkpoint(tmp_path / "ckpt.pt", model, form)
    loaded = load_checkpoint(path, arch="resnet18")
    assert loaded.form == form
    assert loaded.num_classes == 3
    assert loaded.head == head
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x))


def test_whole_module_needs_trust(tmp_path):
    path = write_checkpoint(tmp_path / "whole.pt", make_resnet18(), "module")
    with pytest.raises(ConvertError, match="--trust-checkpoint"):
        load_checkpoint(path, arch="resnet18")
    loaded = load_checkpoint(path, arch="resnet18", trust=True)
    assert (loaded.form, loaded.num_classes, loaded.head) == ("module", 3, "fc.1")


def test_data_parallel_prefix_is_stripped(tmp_path):
    model = make_resnet18()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "dp.pt")
    assert load_checkpoint(tmp_path / "dp.pt", arch="resnet18").num_classes == 3


def test_other_torchvision_arch_head_is_found(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=4).eval()
    path = write_checkpoint(tmp_path / "mnv3.pt", model, "model_state_dict")
    loaded = load_checkpoint(path, arch="mobilenet_v3_small")
    assert (loaded.num_classes, loaded.head) == (4, "classifier.3")


# --- errors: one line, non-zero exit, nothing written ---------------------------------


def assert_nothing_written(out):
    assert not out.exists() or not any(out.rglob("*"))


def test_missing_file(tmp_path, capsys):
    code, out, err = run(capsys, tmp_path / "nope.pt", "--name", "m", "--out", tmp_path / "models")
    assert code == 1
    assert err.strip() == f"convert: error: checkpoint not found: {tmp_path / 'nope.pt'}"
    assert_nothing_written(tmp_path / "models")


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    code, out, err = run(capsys, tmp_path / "notes.pt", "--name", "m", "--out", tmp_path / "models")
    assert code == 1
    assert err.startswith("convert: error: not a PyTorch checkpoint:") and err.count("\n") == 1
    assert_nothing_written(tmp_path / "models")


def test_pickled_module_without_trust(tmp_path, capsys):
    path = write_checkpoint(tmp_path / "whole.pt", make_resnet18(), "module")
    code, out, err = run(capsys, path, "--name", "m", "--out", tmp_path / "models", *FAST)
    assert code == 1
    assert "needs full unpickling" in err and "pass --trust-checkpoint" in err and err.count("\n") == 1
    assert_nothing_written(tmp_path / "models")


def test_keys_that_do_not_fit_name_first_missing_and_unexpected(tmp_path, capsys):
    state = make_resnet18().state_dict()
    state["extra.weight"] = state.pop("layer1.0.conv1.weight")
    torch.save({"model_state_dict": state}, tmp_path / "bad.pt")
    code, out, err = run(capsys, tmp_path / "bad.pt", "--name", "m", "--out", tmp_path / "models", *FAST)
    assert code == 1
    assert "first missing key 'layer1.0.conv1.weight'" in err
    assert "first unexpected key 'extra.weight'" in err
    assert_nothing_written(tmp_path / "models")


def test_wrong_arch_names_the_mismatching_shape(tmp_path, capsys):
    path = write_checkpoint(tmp_path / "r18.pt", make_resnet18(), "model_state_dict")
    code, out, err = run(capsys, path, "--name", "m", "--out", tmp_path / "models", "--arch", "resnet50")
    assert code == 1
    assert "resnet50 expects" in err and err.count("\n") == 1


def test_label_count_mismatch_names_both_numbers(tmp_path, capsys):
    path = write_checkpoint(tmp_path / "r18.pt", make_resnet18(), "model_state_dict")
    code, out, err = run(capsys, path, "--name", "m", "--out", tmp_path / "models", "--arch", "resnet18")
    assert code == 1
    assert "the checkpoint has 3 classes but 7 labels were given" in err
    assert_nothing_written(tmp_path / "models")


def test_empty_calibration_dir(tmp_path, capsys):
    path = write_checkpoint(tmp_path / "r18.pt", make_resnet18(), "model_state_dict")
    (tmp_path / "photos").mkdir()
    code, out, err = run(capsys, path, "--name", "m", "--out", tmp_path / "models", *FAST, "--calibration-dir", tmp_path / "photos")
    assert code == 1
    assert "calibration directory is empty" in err
    assert_nothing_written(tmp_path / "models")


def test_unreadable_calibration_dir(tmp_path, capsys):
    path = write_checkpoint(tmp_path / "r18.pt", make_resnet18(), "model_state_dict")
    photos = write_photo_dir(tmp_path / "photos", 0, broken=3)
    code, out, err = run(capsys, path, "--name", "m", "--out", tmp_path / "models", *FAST, "--calibration-dir", photos)
    assert code == 1
    assert "no readable images in calibration directory" in err and "3 unreadable files skipped" in err
    assert_nothing_written(tmp_path / "models")


def test_missing_calibration_dir(tmp_path, capsys):
    path = write_checkpoint(tmp_path / "r18.pt", make_resnet18(), "model_state_dict")
    code, out, err = run(capsys, path, "--name", "m", "--out", tmp_path / "models", *FAST, "--calibration-dir", tmp_path / "nope")
    assert code == 1
    assert "calibration directory not found" in err


def convert_failing_at_golden(tmp_path, capsys, monkeypatch, error: Exception):
    """Convert a ResNet18 whose build fails with `error` half-way (writing the golden images); (path, code, err)."""
    import convert.golden

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(convert.golden, "write_golden", broken)
    path = write_checkpoint(tmp_path / "r18.pt", make_resnet18(), "model_state_dict")
    code, _, err = run(capsys, path, "--name", "m", "--out", tmp_path / "models", *FAST)
    return path, code, err


def test_failure_mid_build_leaves_nothing(tmp_path, capsys, monkeypatch):
    _, code, err = convert_failing_at_golden(tmp_path, capsys, monkeypatch, ConvertError("injected failure"))
    assert (code, err.strip().splitlines()[-1]) == (1, "convert: error: injected failure")
    assert_nothing_written(tmp_path / "models")


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ["--name", "--out", "--version", "--calibration-dir", "--labels", "--arch", "--trust-checkpoint",
                   "--allow-degraded", "--fp16", "--holdout-fraction", "--max-calibration-images",
                   "--calibration-methods", "--synthetic-images", "--selection-fraction", "--min-agreement",
                   "--max-dp", "--debug", "python -m convert demo"]:
        assert option in text


# --- full conversions ---------------------------------------------------------------


def test_conversion_with_calibration_writes_verified_artifacts(tmp_path, capsys, monkeypatch):
    # As on a clinic's machine: a home directory, and none of the variables that mark a CI job
    # (OpenVINO's converter reports to Google Analytics unless it sees them or an opt-out file).
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("CI", "TF_BUILD", "JENKINS_URL"):
        monkeypatch.delenv(name, raising=False)
    path = write_checkpoint(tmp_path / "r18.pt", make_resnet18(), "model_state_dict")
    photos = write_photo_dir(tmp_path / "photos", 12, broken=1)
    code, out, err = run(capsys, path, "--name", "clinic", "--out", tmp_path / "models", *FAST,
                         "--calibration-dir", photos, "--calibration-methods", "MinMax", "--allow-degraded")
    assert code == 0, err
    assert "skipped 1 unreadable file(s)" in err
    version = tmp_path / "models" / "clinic" / "1"
    manifest = load_manifest(version)
    assert set(manifest["artifacts"]) == {"onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"}
    assert (manifest["name"], manifest["version"], manifest["demo"], manifest["labels"]) == ("clinic", 1, False, LABELS)
    assert manifest["input"] == {"name": "input", "shape": [-1, 3, 224, 224], "dtype": "float32", "layout": "NCHW"}
    assert manifest["output"] == {"name": "probabilities", "shape": [-1, 3], "dtype": "float32"}
    assert manifest["source"]["form"] == "model_state_dict" and manifest["source"]["head"] == "fc.1"
    int8 = manifest["artifacts"]["onnx-int8"]
    calibration = int8["calibration"]
    assert calibration["images"] + calibration["selection_images"] + manifest["verification"]["photos"] == 12
    assert manifest["format"] == 2
    assert (version / "model.json.sha256").read_text() == f"{sha256(version / 'model.json')}  model.json\n"
    for golden in manifest["golden"]:
        assert golden["sha256"] == sha256(version / golden["file"])
    # The held-out photos travel with the version as taken (a box proves its paths on them), each hashed.
    taken = {p.read_bytes() for p in photos.iterdir()}
    verification = manifest["verification"]["set"]
    assert len(verification) == manifest["verification"]["photos"]
    assert all((version / v["file"]).read_bytes() in taken and v["sha256"] == sha256(version / v["file"])
               and len(v["probabilities"]) == len(LABELS) for v in verification)
    assert set(manifest["served_paths"]) >= {f"{key}/{decode}" for key in manifest["artifacts"] for decode in ("fast", "exact")}
    assert int8["calibration"]["method"] == "MinMax" and int8["calibration"]["skipped_unreadable"] == 1
    assert isinstance(int8["kept_float_nodes"], list)
    assert int8["weight_bits"] == 7 and len(int8["float_stem"]) == 1  # the recipe, for whoever reads the manifest
    assert_hashes(version, manifest)
    assert_bars(manifest)
    for key in manifest["artifacts"]:
        assert key in out  # the parity table
    assert not [p for p in (tmp_path / "models" / "clinic").iterdir() if p.name != "1"]
    assert list(home.iterdir()) == []  # no telemetry id or stats: nothing about the conversion left the machine

    # The next conversion gets the next version.
    code, out, err = run(capsys, path, "--name", "clinic", "--out", tmp_path / "models", *FAST)
    assert code == 0, err
    assert load_manifest(tmp_path / "models" / "clinic" / "2")["version"] == 2
    assert "INT8 skipped" in err
    code, out, err = run(capsys, path, "--name", "clinic", "--out", tmp_path / "models", *FAST, "--version", "1")
    assert code == 1 and "already exists" in err


@pytest.mark.parametrize("form", ["torchscript", "module"])
def test_conversion_of_torchscript_and_whole_module(tmp_path, capsys, form):
    model = make_resnet18(head="fc")
    path = write_checkpoint(tmp_path / "ckpt.pt", model, form)
    # A clinic may keep its whole photos on this machine: the version then carries only the crops PyTorch saw.
    set_form = "crops" if form == "module" else "photos"
    code, out, err = run(capsys, path, "--name", "m", "--out", tmp_path / "models", *FAST, "--trust-checkpoint", "--fp16",
                         "--verification-set", set_form)
    assert code == 0, err
    version = tmp_path / "models" / "m" / "1"
    manifest = load_manifest(version)
    assert manifest["source"]["form"] == form
    assert set(manifest["artifacts"]) == {"onnx-fp32", "openvino-fp32", "openvino-fp16"}
    assert_hashes(version, manifest)
    assert_bars(manifest)
    # Golden vectors: what PyTorch answers through the reference preprocessing.
    golden = manifest["golden"]
    assert 5 <= len(golden) <= 8
    tensors = np.stack([preprocess_file(version / g["file"]) for g in golden])
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(tensors)), 1).numpy()
    np.testing.assert_allclose(np.array([g["probabilities"] for g in golden]), expected, atol=1e-5)
    for key, runner in [("onnx-fp32", load_runtime(version / "model.onnx", "onnx").infer),
                        ("openvino-fp32", load_runtime(version / "openvino/fp32/model.xml", "openvino").infer)]:
        got = runner(tensors)
        assert np.max(np.abs(got - expected)) <= 1e-4, key
        assert got.shape == (len(golden), 3)
    with Image.open(version / golden[0]["file"]) as image:
        assert image.getexif().get(0x0112) is None
    assert_a_box_proves_it_from_its_verification_set(version, model, set_form)


def assert_a_box_proves_it_from_its_verification_set(version, model, set_form):
    """The set holds PyTorch's answers for what it holds, and the appliance's proof runs on it and passes."""
    from appliance.config import parse_config
    from appliance.inference.model import read_manifest
    from appliance.inference.proof import find_proof, fingerprint, prove
    from appliance.inference.runtimes import create_runtime

    manifest = read_manifest(version)
    assert manifest.verification["set_form"] == set_form and len(manifest.verification_set) == 4
    for entry in manifest.verification_set:
        with Image.open(version / entry.file) as image:
            assert (image.format, image.size) == (("PNG", (224, 224)) if set_form == "crops" else ("JPEG", image.size))
            assert not image.getexif()
        tensor = preprocess_file(version / entry.file) if set_form == "photos" else (
            (np.asarray(Image.open(version / entry.file), np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
        ).transpose(2, 0, 1)
        with torch.no_grad():
            expected = torch.softmax(model(torch.from_numpy(np.ascontiguousarray(tensor, np.float32))[None]), 1)[0]
        np.testing.assert_allclose(entry.probabilities, expected.numpy(), atol=1e-5)
    runtime = parse_config({"runtime": {"backend": "openvino"}}).runtime.selected
    paths = [p for p in manifest.served_paths if p.runtime == "openvino" and p.inference_precision == "f32"]
    pending = find_proof(manifest, paths, fingerprint(create_runtime("openvino", runtime), runtime), version.parent)
    proof = prove(manifest, pending, lambda: create_runtime("openvino", runtime))
    assert sorted(proof.results) == sorted(p.key for p in paths)
    assert all(r["passed"] and r["images"] == 4 for r in proof.results.values())


# --- any clinic's photos: any count, sizes and formats; every calibration method --------


MIXED = [(600, 450), (4032, 3024), (1024, 768), (3024, 4032), (1600, 1200)]


def write_mixed_photos(directory, count):
    """`count` photos from 600x450 to 12 MP, as JPEG, PNG, WebP and BMP (which the server does not accept)."""
    paths = write_phone_photos(directory, [MIXED[i % len(MIXED)] for i in range(count)])
    formats = ["JPEG", "PNG", "WEBP", "JPEG", "BMP"]
    for i, path in enumerate(paths):
        if formats[i % len(formats)] != "JPEG":
            with Image.open(path) as image:
                image.load()
            path.unlink()
            image.save(path.with_suffix("." + formats[i % len(formats)].lower()), formats[i % len(formats)])
    return directory


@pytest.mark.parametrize("method", ["MinMax", "Entropy", "Percentile"])
def test_every_calibration_method_runs_on_a_ragged_mixed_set(tmp_path, method):
    from convert.checkpoint import load_checkpoint
    from convert.export import export_onnx
    from convert.images import load_image_dir
    from convert.quantize import CALIBRATION_BATCH, Quantizer

    photos = load_image_dir(write_mixed_photos(tmp_path / "photos", 11))
    assert len(photos.tensors) % CALIBRATION_BATCH != 0
    assert photos.servable == [True, True, True, True, False] * 2 + [True]
    loaded = load_checkpoint(write_checkpoint(tmp_path / "r18.pt", make_resnet18(), "model_state_dict"), arch="resnet18")
    export_onnx(loaded, tmp_path / "model.onnx")
    int8 = Quantizer(tmp_path / "model.onnx", tmp_path, photos.tensors).quantize(method, [])
    probs = load_runtime(int8, "onnx").infer(photos.tensors)
    assert probs.shape == (11, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_one_photo_converts_and_says_what_it_verified_on(tmp_path, capsys):
    path = write_checkpoint(tmp_path / "r18.pt", make_resnet18(), "model_state_dict")
    photos = write_mixed_photos(tmp_path / "photos", 1)
    code, out, err = run(capsys, path, "--name", "m", "--out", tmp_path / "models", *FAST, "--calibration-dir", photos,
                         "--calibration-methods", "MinMax", "--allow-degraded")
    assert code == 0, err
    manifest = load_manifest(tmp_path / "models" / "m" / "1")
    assert manifest["verification"]["source"] == "synthetic"
    warning = ("none of the 1 photo(s) could verify (the server accepts JPEG, PNG and WebP, and one photo is needed to "
               "calibrate); served paths were measured on 4 synthetic photos")
    assert manifest["verification"]["warnings"] == [warning]
    assert f"WARNING: {warning}" in out
    assert manifest["artifacts"]["onnx-int8"]["calibration"]["images"] == 1


def test_an_unexpected_error_is_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    error = RuntimeError("setting an array element with a sequence\nmore detail")
    path, code, err = convert_failing_at_golden(tmp_path, capsys, monkeypatch, error)
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        "convert: error: unexpected RuntimeError: setting an array element with a sequence; nothing was written. "
        "Run again with --debug for the traceback and report it with the command line")
    assert_nothing_written(tmp_path / "models")
    with pytest.raises(RuntimeError, match="setting an array element"):
        main([str(path), "--name", "m", "--out", str(tmp_path / "models"), *FAST, "--debug"])
    assert_nothing_written(tmp_path / "models")


def test_a_network_fragile_in_fp32_is_not_searched(tmp_path):
    from convert.checkpoint import load_checkpoint
    from convert.export import export_onnx
    from convert.images import load_image_dir
    from convert.quantize import quantize_int8

    loaded = load_checkpoint(write_checkpoint(tmp_path / "r18.pt", make_resnet18(), "model_state_dict"), arch="resnet18")
    export_onnx(loaded, tmp_path / "model.onnx")
    photos = load_image_dir(write_photo_dir(tmp_path / "photos", 5))
    said = []
    result = quantize_int8(tmp_path / "model.onnx", tmp_path, photos.tensors, lambda path: 0.8, bar=0.99,
                           methods=("MinMax",), fragility=lambda: 0.9, say=said.append)
    assert (result.passed, result.agreement, result.fp32_under_noise) == (False, 0.8, 0.9)
    assert [a.kept_float_nodes for a in result.attempts] == [[]]  # no float-node search
    assert said[-1] == ("INT8 misses the 99% bar, and FP32 itself keeps its answer on only 90.00% of the photos under "
                        "input noise smaller than INT8's rounding: no INT8 can meet the bar; not searching")


def test_a_failed_search_names_where_the_error_grows(tmp_path):
    from convert.checkpoint import load_checkpoint
    from convert.export import export_onnx
    from convert.images import load_image_dir
    from convert.quantize import quantize_int8

    loaded = load_checkpoint(write_checkpoint(tmp_path / "r18.pt", make_resnet18(), "model_state_dict"), arch="resnet18")
    export_onnx(loaded, tmp_path / "model.onnx")
    photos = load_image_dir(write_photo_dir(tmp_path / "photos", 5))
    result = quantize_int8(tmp_path / "model.onnx", tmp_path, photos.tensors, lambda path: 0.5, bar=0.99,
                           methods=("MinMax",), fragility=lambda: 1.0, say=lambda message: None)
    assert not result.passed and result.fp32_under_noise == 1.0
    assert len(result.attempts) > 2  # searched, since FP32 itself is steady
    assert 1 <= len(result.worst_nodes) <= 3
    for described in result.worst_nodes:
        name, _, rest = described.partition(" (")
        assert name.startswith("/") and rest.split(",")[0] in ("Conv", "Gemm", "MatMul") and rest.endswith(" dB)")


# --- signing (issue 13) ---------------------------------------------------------------


def test_sign_key_signs_model_json_and_the_server_accepts_it(tmp_path, capsys):
    from appliance.modeldir import verify_signature

    from .test_model_signing import make_key_pair

    private, public = make_key_pair(tmp_path, "release")
    path = write_checkpoint(tmp_path / "r18.pt", make_resnet18(), "model_state_dict")
    code, out, err = run(capsys, path, "--name", "m", "--out", tmp_path / "models", *FAST, "--sign-key", private)
    assert code == 0, err
    version = tmp_path / "models" / "m" / "1"
    verify_signature(version, (version / "model.json").read_bytes(), (public,))  # raises if not signed by it


def test_an_unreadable_sign_key_fails_before_converting(tmp_path, capsys):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    path = write_checkpoint(tmp_path / "r18.pt", make_resnet18(), "model_state_dict")
    code, out, err = run(capsys, path, "--name", "m", "--out", tmp_path / "models", *FAST, "--sign-key", junk)
    assert code == 1 and err.startswith(f"convert: error: --sign-key {junk}: cannot read an unencrypted PEM private key")
    assert not (tmp_path / "models").exists()


def test_int8_recipe_keeps_every_x86_kernel_exact(tmp_path):
    # 7-bit weights (no u8 x s8 pair can saturate 16 bits: 2 x 255 x 64 < 32,767), unsigned
    # activations, and the stem, which reads the image, in float (docs/int8.md).
    import onnx
    from onnx import numpy_helper

    from convert.export import export_onnx
    from convert.images import load_image_dir
    from convert.quantize import Quantizer

    loaded = load_checkpoint(write_checkpoint(tmp_path / "r18.pt", make_resnet18(), "model_state_dict"), arch="resnet18")
    export_onnx(loaded, tmp_path / "model.onnx")
    photos = load_image_dir(write_photo_dir(tmp_path / "photos", 4))
    quantizer = Quantizer(tmp_path / "model.onnx", tmp_path, photos.tensors)
    graph = onnx.load(str(quantizer.quantize("MinMax", []))).graph
    (stem,) = quantizer.stem
    stem_node = next(n for n in graph.node if n.name == stem)
    assert stem_node.op_type == "Conv" and stem_node.input[0] == "input"  # the image itself, not a quantized copy
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert stem_node.input[1] in constants and constants[stem_node.input[1]].dtype == np.float32
    weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and constants.get(n.input[0]) is not None
               and constants[n.input[0]].dtype == np.int8]
    assert len(weights) >= 19  # every other conv and the classifier
    for dq in weights:
        assert np.abs(constants[dq.input[0]].astype(int)).max() <= 64, dq.name
    activations = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants]
    assert activations and all(constants[q.input[2]].dtype == np.uint8 for q in activations)
    assert all(n.op_type != "QuantizeLinear" for n in graph.node if "input" in n.input)


def test_int8_left_out_names_the_cpu_kernels_or_the_model(tmp_path):
    # The chosen INT8 model is run again with its arithmetic done exactly (ONNX Runtime without its INT8
    # kernels): agreement there and not through the kernels is the CPU's doing, not the model's.
    from appliance.inference.proof import instruction_sets
    from convert.build import _int8_why
    from convert.quantize import Int8Result, exact_runner

    kernels = Int8Result(tmp_path / "int8.onnx", "MinMax", [], 0.9865, False, fp32_under_noise=0.9143, exact_agreement=1.0)
    isa = ", ".join(instruction_sets()) or "no AVX2"
    assert _int8_why(kernels, 0.99) == (
        f"INT8 reached at best 98.65% top-1 agreement on the selection photos (bar 99%) through this CPU's INT8 "
        f"kernels ({isa}), and 100.00% with the same INT8 model's arithmetic done exactly: this CPU's kernels miss "
        "the bar, not the quantized model (a CPU with other kernels may pass; every box proves its paths on its own CPU)")
    model = Int8Result(tmp_path / "int8.onnx", "MinMax", [], 0.78, False, fp32_under_noise=0.75, exact_agreement=0.8)
    assert _int8_why(model, 0.99) == (
        "INT8 reached at best 78.00% top-1 agreement on the selection photos (bar 99%), and 80.00% with its arithmetic "
        "done exactly (the quantization itself, not this CPU's kernels): FP32 itself keeps its answer on only 75.00% "
        "of them when the input moves by less than INT8 rounds it, so these photos sit on near-ties no INT8 graph can hold")

    # exact_runner runs a real QDQ model and answers like the FP32 graph it was quantized from, within INT8's rounding.
    from convert.export import export_onnx
    from convert.images import load_image_dir
    from convert.quantize import Quantizer

    loaded = load_checkpoint(write_checkpoint(tmp_path / "r18.pt", make_resnet18(), "model_state_dict"), arch="resnet18")
    export_onnx(loaded, tmp_path / "model.onnx")
    photos = load_image_dir(write_photo_dir(tmp_path / "photos", 4))
    qdq = Quantizer(tmp_path / "model.onnx", tmp_path, photos.tensors).quantize("MinMax", [])
    exact = exact_runner(qdq)(photos.tensors)
    fp32 = load_runtime(tmp_path / "model.onnx", "onnx").infer(photos.tensors)
    assert exact.shape == fp32.shape and np.allclose(exact.sum(1), 1, atol=1e-5)
    assert 0 < np.abs(exact - fp32).max() < 0.2
