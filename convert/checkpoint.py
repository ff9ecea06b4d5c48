"""Load a clinic's checkpoint, whatever form it arrived in, into an eval-mode module that outputs logits.

Accepted forms: a dict with the weights under `model_state_dict` or `state_dict`, a bare
state dict, a TorchScript archive, and (only with `trust=True`) a whole pickled
`nn.Module` or any checkpoint that needs full unpickling. Pickles can run code, so
`torch.load(weights_only=True)` is always tried first. torchvision is never asked for
pretrained weights.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from appliance.modeldir import sha256_file  # one definition, shared with the server's check

from .errors import ConvertError

TRUST_HINT = "pass --trust-checkpoint if you trust where it came from (unpickling can run arbitrary code)"


@dataclass
class LoadedModel:
    """A checkpoint turned into a module that maps normalised [N,3,224,224] to logits [N,C]."""

    module: nn.Module
    path: Path
    sha256: str
    form: str  # model_state_dict | state_dict | bare_state_dict | torchscript | module
    arch: str | None  # torchvision name, when built from a state dict
    head: str | None  # e.g. "fc.1" (Sequential(Dropout, Linear)) or "fc" (Linear)
    num_classes: int

    @property
    def scripted(self) -> bool:
        """True for TorchScript archives, which the torch.export-based ONNX exporter cannot read."""
        return isinstance(self.module, torch.jit.ScriptModule)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """PyTorch FP32 probabilities (softmax of the logits) of a batch: the reference every artifact is held to."""
        with torch.no_grad():
            return torch.softmax(self.module(torch.from_numpy(batch)), dim=1).numpy().astype(np.float32)




def load_checkpoint(path: Path, *, arch: str = "resnet50", trust: bool = False) -> LoadedModel:
    """Load `path` into a `LoadedModel`, raising `ConvertError` with one clear line on any problem."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise ConvertError(f"checkpoint is not a file: {path}")
    digest = sha256_file(path)
    if _is_torchscript(path):
        module = _load_torchscript(path)
        return _finish(module, path, digest, "torchscript", None, _head_of(module))
    obj = _load_pickle(path, trust)
    if isinstance(obj, nn.Module):
        return _finish(obj, path, digest, "module", None, _head_of(obj))
    if isinstance(obj, Mapping):
        for key in ("model_state_dict", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                return _from_state_dict(obj[key], path, digest, key, arch)
        if isinstance(obj.get("model"), nn.Module):  # e.g. {"model": module, "epoch": 3}
            return _finish(obj["model"], path, digest, "module", None, _head_of(obj["model"]))
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return _from_state_dict(obj, path, digest, "bare_state_dict", arch)
        keys = ", ".join(map(str, list(obj)[:5]))
        raise ConvertError(
            f"not a model checkpoint: {path} holds a dict without 'model_state_dict' or 'state_dict' "
            f"and not a state dict of tensors (keys: {keys or 'none'})"
        )
    raise ConvertError(
        f"not a model checkpoint: {path} holds a {type(obj).__name__}, "
        "expected a state dict, a dict with 'model_state_dict', a TorchScript archive or an nn.Module"
    )


def _is_torchscript(path: Path) -> bool:
    # TorchScript archives are zip files with serialized code; torch.load refuses them
    # under weights_only=True, so recognise them first and hand them to torch.jit.load.
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _load_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():
            # torch.jit is deprecated upstream, but clinics still hold TorchScript archives.
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*", category=FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch.jit raises bare RuntimeErrors of many shapes
        raise ConvertError(f"not a readable TorchScript archive: {path} ({_first_line(exc)})") from None


def _load_pickle(path: Path, trust: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise ConvertError(f"not a PyTorch checkpoint: {path} ({_first_line(exc)})") from None
        if not trust:
            raise ConvertError(
                f"checkpoint {path} holds Python objects beyond tensors (a whole pickled model or similar) "
                f"and needs full unpickling; {TRUST_HINT}"
            ) from None
    except Exception as exc:
        raise ConvertError(f"not a PyTorch checkpoint: {path} ({_first_line(exc)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # an untrusted pickle can raise anything, e.g. a missing class
        raise ConvertError(f"cannot unpickle checkpoint {path}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def build_arch(arch: str) -> nn.Module:
    """A torchvision classifier with random weights; never downloads anything."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise ConvertError(f"unknown --arch {arch!r}; torchvision classifiers include resnet50, resnet18, efficientnet_b0, mobilenet_v3_small, ...")
    kwargs = {"init_weights": False} if arch in ("googlenet", "inception_v3") else {}
    if arch in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False
    return torchvision.models.get_model(arch, weights=None, **kwargs)


def _last_linear(module: nn.Module) -> str | None:
    names = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def _head_of(module: nn.Module) -> str | None:
    try:
        keys = set(module.state_dict())
    except Exception:  # some scripted modules cannot list their state
        return None
    for head in ("fc.1", "fc"):
        if f"{head}.weight" in keys:
            return head
    name = _last_linear(module) if not isinstance(module, torch.jit.ScriptModule) else None
    return name


def _from_state_dict(state: Mapping, path: Path, digest: str, form: str, arch: str) -> LoadedModel:
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    model = build_arch(arch)
    linear = _last_linear(model)
    if linear is None:
        raise ConvertError(f"--arch {arch}: no Linear classifier layer found; only classifiers ending in a Linear are supported")
    head = None
    if f"{linear}.1.weight" in state:
        head = f"{linear}.1"
    elif f"{linear}.weight" in state:
        head = linear
    if head is not None:
        weight = state[f"{head}.weight"]
        if weight.ndim != 2:
            raise ConvertError(f"checkpoint key {head}.weight has shape {list(weight.shape)}, expected [classes, features]")
        classes, features = weight.shape
        new_linear = nn.Linear(features, classes, bias=f"{head}.bias" in state)
        # The old back end replaced the head with Sequential(Dropout(0.3), Linear); dropout is a no-op in eval.
        replacement = nn.Sequential(nn.Dropout(0.3), new_linear) if head != linear else new_linear
        parent_name, _, child = linear.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    expected = model.state_dict()
    for key, value in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            raise ConvertError(
                f"checkpoint key {key} has shape {list(value.shape)} but {arch} expects {list(expected[key].shape)}"
            )
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"first missing key {missing[0]!r} ({len(missing)} missing)")
        if unexpected:
            parts.append(f"first unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
        raise ConvertError(f"checkpoint keys do not fit --arch {arch}: " + ", ".join(parts))
    model.load_state_dict(state, strict=False)
    return _finish(model, path, digest, form, arch, head)


def _finish(module: nn.Module, path: Path, digest: str, form: str, arch: str | None, head: str | None) -> LoadedModel:
    module = module.float().eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, 3, 224, 224))
    except Exception as exc:
        raise ConvertError(f"the model in {path} fails on a [1,3,224,224] input: {_first_line(exc)}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConvertError(f"the model in {path} must output logits [N, classes]; it outputs {shape}")
    return LoadedModel(module, path, digest, form, arch, head, int(out.shape[1]))
