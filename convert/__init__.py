"""Turn a clinic's PyTorch checkpoint into verified ONNX, INT8 and OpenVINO artifacts."""

import os

# ONNX Runtime (1.32) writes a device id under ~/.cache/Microsoft and would report telemetry
# unless this is set when it is imported; nothing here reports anything to anyone. Set
# before any `import onnxruntime`, which every path into this package comes after.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
