"""PyTorch module -> ONNX FP32: dynamic batch, input "input", softmax appended as "probabilities"."""

from __future__ import annotations

import ast
import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, cast

import onnx
import torch
from onnx import helper

from appliance.modeldir import CROP, INPUT_NAME, OUTPUT_NAME

from .checkpoint import LoadedModel
from .errors import ConvertError

LOGITS = "logits"


def export_onnx(model: LoadedModel, path: Path) -> int:
    """Write the FP32 graph to `path` (one file, no external data); return its opset."""
    example = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(0))
    if model.scripted:
        proto = _export_legacy(model.module, example)
    else:
        try:
            proto = _export_dynamo(model.module, example)
        except Exception as exc:  # torch.export rejects some Python code; the tracer may not
            try:
                proto = _export_legacy(model.module, example)
            except Exception:
                raise ConvertError(f"cannot export the model to ONNX: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    proto = _append_softmax(proto)
    _name_nodes(proto)
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _export_dynamo(module: torch.nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=1024)
    # The exporter narrates its steps on stdout; the parity table owns stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[LOGITS],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
    assert program is not None  # only the dynamo=False exporter returns None
    return program.model_proto


def _export_legacy(module: torch.nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    # TorchScript archives cannot go through torch.export; the TorchScript-based exporter
    # still reads them. Its deprecation warning is expected here and says nothing actionable.
    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*no signature found.*")
        torch.onnx.export(
            module,
            (example,),
            # torch annotates `f` as a path, but the TorchScript exporter writes to any file object.
            cast(Any, buffer),
            input_names=[INPUT_NAME],
            output_names=[LOGITS],
            dynamic_axes={INPUT_NAME: {0: "batch"}, LOGITS: {0: "batch"}},
            dynamo=False,
        )
    return onnx.load_model_from_string(buffer.getvalue())


def _append_softmax(proto: onnx.ModelProto) -> onnx.ModelProto:
    graph = proto.graph
    (output,) = graph.output
    graph.node.append(helper.make_node("Softmax", [output.name], [OUTPUT_NAME], name="/softmax/Softmax", axis=1))
    new_output = onnx.ValueInfoProto()
    new_output.CopyFrom(output)
    new_output.name = OUTPUT_NAME
    graph.output.remove(output)
    graph.output.append(new_output)
    return proto


def _name_nodes(proto: onnx.ModelProto) -> None:
    """Name nodes after the module they came from (`/layer4/2/bn3/Conv`), drop source-path metadata.

    The torch.export-based exporter names nodes `node_Conv_293`; the kept-in-float list in the
    manifest is only useful to a person if it says where in the network a node sits. The
    metadata holds stack traces with local file paths, which do not belong in a shipped model.
    """
    seen: dict[str, int] = {}
    for node in proto.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        scopes = props.get("pkg.torch.onnx.name_scopes")
        if scopes and node.name != "/softmax/Softmax":
            try:
                scope_list = [s for s in ast.literal_eval(scopes) if s]
            except (ValueError, SyntaxError):
                scope_list = []
            module_path = scope_list[-2] if len(scope_list) >= 2 else ""
            base = "/" + "/".join(filter(None, module_path.split("."))) + "/" + node.op_type if module_path else "/" + node.op_type
            count = seen.get(base, 0)
            seen[base] = count + 1
            node.name = base if count == 0 else f"{base}_{count}"
        del node.metadata_props[:]
    del proto.metadata_props[:]
