"""The demo model's PyTorch checkpoint, rebuilt deterministically and cached for the baseline.

`convert.demo.make_demo_checkpoint` rebuilds the exact checkpoint the demo
model was converted from (fixed seed; under a minute on 2 cores), so no
100 MB file lives in the repository. The rebuilt file must hash to the
manifest's `source.sha256`, or the baseline would not run the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path


class CheckpointMismatch(Exception):
    """The rebuilt checkpoint is not the one the model directory was converted from."""


def demo_checkpoint(model_dir: Path, cache_dir: Path) -> Path:
    """The path of the demo checkpoint matching `model_dir`'s manifest, built on first use."""
    from appliance.modeldir import sha256_file

    source = json.loads((model_dir / "model.json").read_text())["source"]
    expected = source["sha256"]
    # build_demo's file name: torch.save names the zip's inner folder after the file, so it is in the hash.
    path = cache_dir / "demo_checkpoint.pt"
    if path.is_file() and sha256_file(path) == expected:
        return path
    if source.get("generated_by") != "python -m convert demo":
        raise CheckpointMismatch(f"{model_dir} was not built by `python -m convert demo`; give its checkpoint instead")
    import torch  # only to rebuild: the benchmark's own process need not hold PyTorch

    from convert.demo import DEMO_SEED, make_demo_checkpoint

    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(make_demo_checkpoint(int(source.get("seed") or DEMO_SEED)), path)
    actual = sha256_file(path)
    if actual != expected:
        path.unlink()
        raise CheckpointMismatch(
            f"the rebuilt demo checkpoint hashes to {actual[:12]}…, {model_dir}/model.json says {expected[:12]}… "
            "(a different torch build?)"
        )
    return path
