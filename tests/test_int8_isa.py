"""INT8 that holds on every x86 instruction set: the demo's INT8 run as older CPUs run it.

Without VNNI, INT8 kernels add u8 x s8 products in pairs into 16 bits, which saturates;
convert's recipe (7-bit weights, the stem in float) keeps the accumulations exact, so on
the demo every CPU must give the answers this one gives. OpenVINO's kernels obey
ONEDNN_MAX_CPU_ISA, so each instruction set below this machine's runs natively (and the
kernels it chose must name the cap); ONNX Runtime has no such switch, so it runs under
qemu-x86_64 as an older CPU, on one photo (12-17 s under emulation on an AVX2 EPYC).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from appliance.inference.proof import cpu_info
from convert.demo import DEMO_SEED, HELDOUT_IMAGES, PHOTO_SIZE
from convert.images import jpeg_bytes, reference_tensor
from convert.synthetic import synthetic_photos
from convert.verify import infer_all, load_runtime

# oneDNN's caps from the oldest up, with the flag a CPU needs for each and the word
# OpenVINO's kernel names carry under it (jit_sse42_I8, jit_avx2_I8, brgconv_avx512_I8).
ISA_LADDER = [("SSE41", "sse4_1", "sse42"), ("AVX2", "avx2", "avx2"), ("AVX512_CORE", "avx512bw", "avx512"),
              ("AVX512_CORE_VNNI", "avx512_vnni", "avx512")]
BAR = 0.995  # issue 20: the demo's INT8 agrees on 99.5%, overall and in every class, on every CPU
MAX_DP = 0.05


FLAGS = set(cpu_info()[1])
NATIVE = max(i for i, (_, flag, _) in enumerate(ISA_LADDER) if flag in FLAGS)
CAPS = [cap for cap, _, _ in ISA_LADDER[:NATIVE]]  # every instruction set below this CPU's own

RUN_OPENVINO = """
import json, sys
import numpy as np
from pathlib import Path
from convert.verify import infer_all, load_runtime
runtime = load_runtime(Path(sys.argv[1]), "openvino")
np.save(sys.argv[3], infer_all(runtime.infer, np.load(sys.argv[2]), batch=16))
print(json.dumps(runtime.describe()))
"""


@pytest.fixture(scope="module")
def verification(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The demo's verification photos (its last HELDOUT_IMAGES), decoded as PyTorch saw them, and FP32's answers."""
    photos = synthetic_photos(HELDOUT_IMAGES, DEMO_SEED + 4, PHOTO_SIZE)
    tensors = np.stack([reference_tensor(io.BytesIO(jpeg_bytes(p))) for p in photos])
    path = tmp_path_factory.mktemp("isa") / "tensors.npy"
    np.save(path, tensors)
    # The FP32 artifact agrees with PyTorch on every one of these photos (convert's FP32 bar).
    return path, infer_all(load_runtime(demo_model_dir / "model.onnx", "onnx").infer, tensors, batch=16)


def assert_meets_the_bar(reference: np.ndarray, probs: np.ndarray) -> None:
    top, ref_top = probs.argmax(1), reference.argmax(1)
    assert np.mean(top == ref_top) >= BAR
    for k in np.unique(ref_top):
        assert np.mean(top[ref_top == k] == k) >= BAR, f"class {k}"
    assert np.max(np.abs(probs - reference)) <= MAX_DP


@pytest.mark.parametrize("cap", [*CAPS, "native"])
def test_demo_openvino_int8_gives_the_same_answers_under_every_isa(cap, demo_model_dir, verification, tmp_path):
    tensors, reference = verification
    here = infer_all(load_runtime(demo_model_dir / "openvino/int8/model.xml", "openvino").infer, np.load(tensors), batch=16)
    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if cap != "native":
        env["ONEDNN_MAX_CPU_ISA"] = cap
    out = tmp_path / "probs.npy"
    done = subprocess.run([sys.executable, "-c", RUN_OPENVINO, str(demo_model_dir / "openvino/int8/model.xml"),
                           str(tensors), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    kernels = json.loads(done.stdout.splitlines()[-1])["kernels"]
    int8 = [k for k in kernels if k.endswith("_I8")]
    assert int8, kernels
    if cap != "native":  # the cap took effect: every INT8 kernel is one of the capped instruction set's
        word = next(w for c, _, w in ISA_LADDER if c == cap)
        assert all(word in k for k in int8), (cap, kernels)
    probs = np.load(out)
    assert_meets_the_bar(reference, probs)
    # Exact integer arithmetic: the capped kernels give this CPU's own answers.
    np.testing.assert_allclose(probs, here, atol=1e-3)


# qemu's CPU models below this machine's instruction set: an SSE4.2 CPU always, an AVX2
# one where this CPU has AVX-512 (qemu emulates no AVX-512, so nothing above AVX2).
QEMU_CPUS = {"Nehalem": {"AVX2": False}, **({"Haswell": {"AVX2": True, "AVX512F": False}} if NATIVE >= 2 else {})}

RUN_ONNXRUNTIME = """
import json, sys
import numpy as np
from numpy._core._multiarray_umath import __cpu_features__ as features
from pathlib import Path
from convert.verify import load_runtime
np.save(sys.argv[3], load_runtime(Path(sys.argv[1]), "onnx").infer(np.load(sys.argv[2])))
print(json.dumps({k: features[k] for k in ("AVX2", "AVX512F")}))
"""


@pytest.mark.parametrize("cpu", sorted(QEMU_CPUS))
def test_demo_onnxruntime_int8_gives_the_same_answer_on_an_older_cpu(cpu, demo_model_dir, verification, tmp_path):
    tensors, reference = verification
    one = tmp_path / "one.npy"
    np.save(one, np.load(tensors)[:1])
    model = demo_model_dir / "model.int8.onnx"
    here = load_runtime(model, "onnx").infer(np.load(one))
    out = tmp_path / "probs.npy"
    done = subprocess.run(["qemu-x86_64", "-cpu", cpu, sys.executable, "-c", RUN_ONNXRUNTIME, str(model), str(one),
                           str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    # The emulated CPU took effect: numpy reads the instruction sets from CPUID, as ONNX Runtime's kernels do.
    assert json.loads(done.stdout.splitlines()[-1]) == {"AVX2": False, "AVX512F": False, **QEMU_CPUS[cpu]}
    there = np.load(out)
    assert there.argmax(1) == reference[:1].argmax(1)
    # Saturating kernels move these log-probabilities by 0.1 and more (measured on 8-bit weights).
    np.testing.assert_allclose(np.log(there), np.log(here), atol=1e-3)
