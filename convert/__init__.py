"""Turn a clinic's PyTorch checkpoint into verified ONNX, INT8 and OpenVINO artifacts."""
