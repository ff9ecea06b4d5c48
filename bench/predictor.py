"""The KServe predictor (predictor/) against the appliance's own /v2, same model, same settings, same requests.

    .venv/bin/python -m bench.predictor                    # models/demo, 10 s cells
    .venv/bin/python -m bench.predictor --model models/NAME --cell-seconds 5

On demand only (never in the tests). Both servers run on 127.0.0.1 with one
config file; the cells alternate between them, each after both have gone
idle, for a 600x450 JPEG (base64 in JSON: kserve 0.21 cannot take raw image
bytes) and a preprocessed FP32 tensor (binary tensor data), at concurrency 1
and 4. It prints p50, p99 and answers per second for each, and the ratio
predictor / appliance; with --out, the rows as JSON too.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path
from typing import Any

from . import procs, standalone
from .load import run_load

CONCURRENCY = (1, 4)


def start_predictor(model_dir: Path, config: Path, work: Path, timeout_s: float = 120.0) -> procs.Server:
    """`python -m predictor` on a free port with the appliance's config file; ready when /v2/health/ready answers."""
    port = procs.free_port()
    argv = [sys.executable, "-m", "predictor", "--model-dir", str(model_dir), "--config", str(config),
            "--host", "127.0.0.1", "--http-port", str(port)]
    server = procs._spawn("predictor", argv, work / "predictor.log", "/v2/health/ready", port, timeout_s)
    server.kind = "predictor"  # no appliance /metrics
    return server


def write_bodies(directory: Path, model_dir: Path) -> dict[str, tuple[Path, str, dict[str, str]]]:
    """Each workload's body file, content type and extra headers."""
    from appliance import imaging
    from appliance.inference.model import read_manifest, resolve_model_dir

    from convert.synthetic import synthetic_photos

    from .images import v2_body

    buffer = io.BytesIO()
    synthetic_photos(1, 20240611, (600, 450))[0].save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()
    image = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(jpeg).decode()]}]}
    (directory / "image.json").write_text(json.dumps(image))
    manifest = read_manifest(resolve_model_dir(model_dir))
    tensor = imaging.decode(jpeg, manifest.preprocessing, max_pixels=1 << 40, mode="exact").tensor
    body, json_length = v2_body(tensor)
    (directory / "tensor.bin").write_bytes(body)
    return {
        "image (JSON base64)": (directory / "image.json", "application/json", {}),
        "tensor (binary FP32)": (directory / "tensor.bin", "application/octet-stream",
                                 {"Inference-Header-Content-Length": str(json_length)}),
    }


def run(model_dir: Path, cell_s: int, work: Path) -> list[dict[str, Any]]:
    """Every (workload, concurrency) cell on both servers, alternating; one row per cell."""
    from appliance.inference.model import read_manifest, resolve_model_dir

    name = read_manifest(resolve_model_dir(model_dir)).name
    bodies = write_bodies(work, model_dir)
    appliance = procs.start_appliance("appliance", model_dir, work / "appliance", {})
    servers = [appliance]
    try:
        servers.append(start_predictor(model_dir, work / "appliance" / "config.toml", work))
        rows = []
        for workload, (body, content_type, headers) in bodies.items():
            for concurrency in CONCURRENCY:
                for server in servers:
                    for other in servers:
                        other.wait_idle()
                    result = run_load(f"{server.url}/v2/models/{name}/infer", body, content_type, headers,
                                      concurrency=concurrency, duration_s=cell_s)
                    rows.append({"server": server.name, "workload": workload, **result.as_dict()})
        return rows
    finally:
        for server in servers:
            server.stop()


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: both servers per cell and the predictor / appliance ratios."""
    lines = ["| workload | concurrency | appliance p50 / p99 ms, img/s | predictor p50 / p99 ms, img/s "
             "| p50 ratio | img/s ratio | errors (a / p) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    cells: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["workload"], row["concurrency"]), {})[row["server"]] = row
    for (workload, concurrency), pair in cells.items():
        a, p = pair["appliance"], pair["predictor"]
        p50 = p["p50_ms"] / a["p50_ms"] if a["p50_ms"] else float("nan")
        rps = p["rps"] / a["rps"] if a["rps"] else float("nan")
        lines.append(f"| {workload} | {concurrency} | {a['p50_ms']:.1f} / {a['p99_ms']:.1f}, {a['rps']:.1f} "
                     f"| {p['p50_ms']:.1f} / {p['p99_ms']:.1f}, {p['rps']:.1f} | {p50:.2f} | {rps:.2f} "
                     f"| {a['errors']} / {p['errors']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return standalone.main("predictor", __doc__, run, table, argv, note="; ratio = predictor / appliance")


if __name__ == "__main__":
    sys.exit(main())
