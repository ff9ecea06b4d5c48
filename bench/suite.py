"""The benchmark's sections; each returns plain data for the report (bench/report.py).

Every server is its own process on 127.0.0.1 and every section runs in the
same invocation, so ratios compare measurements from one run on one machine.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

from . import images, procs, profiling
from .load import LoadResult, run_load

HEADERS = {"X-User-Id": images.USER_ID}
CONCURRENCY = (1, 4, 16)


@dataclass
class Bench:
    """What every section needs: inputs, where to write, how long to measure."""

    out: Path
    model_dir: Path  # the version directory
    checkpoint: Path
    workloads: dict[str, images.Workload]
    quick: bool
    cell_s: int  # one load cell
    raw_s: float  # one batch size of the raw runtime measurement
    say: Callable[[str], None] = print
    work: Path = field(init=False)

    def __post_init__(self) -> None:
        self.work = self.out / "work"


# The appliance on ONNX Runtime INT8 (the default runtime is OpenVINO).
ONNXRUNTIME = {"runtime": {"backend": "onnxruntime"}, "model": {"artifact": "onnx-int8"}}


# -- raw runtime -------------------------------------------------------------------


def raw_runtimes(bench: Bench) -> list[dict[str, Any]]:
    """Every runtime alone in its own process: batch-1 ms/img and best images/s over batch 1..8."""
    from .raw import RUNTIMES

    batches = "1,4,8" if bench.quick else "1,2,3,4,5,6,7,8"
    rows = []
    for name in RUNTIMES:
        bench.say(f"raw runtime: {name}")
        rows.append(_raw(bench, name, batches))
    return rows


def _raw(bench: Bench, name: str, batches: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.raw", name, "--model", str(bench.model_dir), "--checkpoint",
            str(bench.checkpoint), "--seconds", str(bench.raw_s), "--batches", batches]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=procs.ROOT, env=procs.clean_env(), timeout=900)
    if done.returncode != 0:
        return {"name": name, "supported": True, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- end to end --------------------------------------------------------------------


def _check_answer(server: procs.Server, workload: images.Workload) -> dict[str, Any]:
    """One request by hand: it must be the contract's 200 answer, or every number after it is void."""
    status, body = server.post("/check-image", workload.body_path.read_bytes(),
                               {"Content-Type": images.MULTIPART_TYPE, **HEADERS})
    answer = json.loads(body)
    if status != 200 or len(answer.get("predictions", [])) != 7 or not answer.get("case_id"):
        raise procs.ServerFailed(f"{server.name}: {workload.key} answered {status}: {body[:300]!r}")
    return {"top": answer["predictions"][0]["label"], "blur_score": answer["blur_score"], "status": answer["status"]}


def _metrics(server: procs.Server) -> dict[str, float]:
    """The appliance's stage and batch counters (sums and counts) from /metrics."""
    if server.kind != "appliance":
        return {}
    status, body = server.get("/metrics")
    if status != 200:
        return {}
    wanted = {}
    for line in body.decode().splitlines():
        m = re.match(r'appliance_(stage_duration_seconds|inference_batch_size)_(sum|count)(?:\{stage="(\w+)"\})? (\S+)$',
                     line)
        if m:
            wanted[f"{m.group(3) or 'batch'}_{m.group(2)}"] = float(m.group(4))
    return wanted


def _stages(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean ms per image of each stage, and the mean batch size, over one cell."""
    result = {}
    for stage in ("decode", "inference", "storage"):
        n = after.get(f"{stage}_count", 0) - before.get(f"{stage}_count", 0)
        if n > 0:
            result[f"{stage}_ms"] = round(1000 * (after[f"{stage}_sum"] - before.get(f"{stage}_sum", 0)) / n, 1)
    n = after.get("batch_count", 0) - before.get("batch_count", 0)
    if n > 0:
        result["mean_batch"] = round((after["batch_sum"] - before.get("batch_sum", 0)) / n, 2)
    return result


def measure_cell(server: procs.Server, url_path: str, body_path: Path, content_type: str, concurrency: int,
                 seconds: int, headers: dict[str, str] = HEADERS) -> dict[str, Any]:
    """One load cell with the server's CPU time and (for the appliance) stage means over it."""
    server.wait_idle()
    before, cpu = _metrics(server), server.cpu_s()
    result: LoadResult = run_load(server.url + url_path, body_path, content_type, headers,
                                  concurrency=concurrency, duration_s=seconds)
    cpu = server.cpu_s() - cpu
    row = result.as_dict()
    ok = max(1, result.requests - result.error_kinds.get("status", 0))
    row["server_cpu_ms_per_img"] = round(1000 * cpu / ok, 1)
    row["server_cpu_cores"] = round(cpu / result.duration_s, 2)
    row.update(_stages(before, _metrics(server)))
    return row


def _cell_seconds(bench: Bench, concurrency: int, per_image_s: float) -> int:
    """The cell's length: long enough for three rounds of `concurrency` requests served one at a time.

    A slow server (the baseline: one 12 MP photo at a time) would otherwise
    finish no request at all within a short cell at concurrency 16.
    """
    cap = 12 if bench.quick else 40
    return int(max(bench.cell_s, min(cap, round(3 * concurrency * per_image_s))))


def end_to_end(bench: Bench) -> list[dict[str, Any]]:
    """/check-image at concurrency 1, 4, 16 for both images against the baseline and the appliance (each store).

    Every server is started first and the cells are interleaved (for each
    image and concurrency: baseline, then each appliance), each after every
    server has gone idle: a machine whose speed drifts over minutes then
    moves both sides of a ratio alike.
    """
    setups: list[tuple[str, Callable[[Path], procs.Server], tuple[int, ...]]] = [
        ("baseline", lambda w: procs.start_baseline("baseline", bench.checkpoint, w), CONCURRENCY),
        ("appliance-sqlite", lambda w: procs.start_appliance("appliance-sqlite", bench.model_dir, w,
                                                             {"storage": {"backend": "sqlite"}}), CONCURRENCY),
        ("appliance-disk", lambda w: procs.start_appliance("appliance-disk", bench.model_dir, w,
                                                           {"storage": {"backend": "disk"}}), CONCURRENCY),
    ]
    if not bench.quick:
        # How much of the gap a thread pool alone would have closed in the old server.
        setups.insert(1, ("baseline-threaded", lambda w: procs.start_baseline(
            "baseline-threaded", bench.checkpoint, w, threaded=True), (4,)))
        # The other runtime: ONNX Runtime INT8 (the default until this bench measured OpenVINO faster).
        setups.append(("appliance-sqlite-onnxruntime", lambda w: procs.start_appliance(
            "appliance-sqlite-onnxruntime", bench.model_dir, w, ONNXRUNTIME), CONCURRENCY))
    servers: list[tuple[procs.Server, tuple[int, ...]]] = []
    rows = []
    try:
        for name, start, concurrencies in setups:
            bench.say(f"end to end: starting {name}")
            servers.append((start(bench.work / name), concurrencies))
        facts = {}
        for server, _ in servers:
            answers = {key: _check_answer(server, w) for key, w in bench.workloads.items()}
            for w in bench.workloads.values():  # warm every code path before measuring
                _check_answer(server, w)
            facts[server.name] = {"ready_s": round(server.ready_s, 2), "idle_rss_mb": server.memory_mb()[0],
                                  "answers": answers}
        for key, workload in bench.workloads.items():
            per_image_s: dict[str, float] = {}
            for c in CONCURRENCY:
                for server, concurrencies in servers:
                    if c not in concurrencies:
                        continue
                    seconds = _cell_seconds(bench, c, per_image_s.get(server.name, 0.0))
                    bench.say(f"end to end: {server.name}, {key}, concurrency {c}, {seconds} s")
                    for other, _ in servers:
                        other.wait_idle()
                    row = measure_cell(server, "/check-image", workload.body_path, images.MULTIPART_TYPE, c, seconds)
                    if c == 1 and row["rps"] > 0:
                        per_image_s[server.name] = 1 / row["rps"]
                    fact = facts[server.name]
                    rows.append({"server": server.name, "image": key, **row, "ready_s": fact["ready_s"],
                                 "idle_rss_mb": fact["idle_rss_mb"], "answer": fact["answers"][key],
                                 "peak_rss_mb": server.memory_mb()[1]})  # peak so far: derm runs first
    finally:
        for server, _ in servers:
            _finish(bench, server)
    return rows


def _finish(bench: Bench, server: procs.Server) -> None:
    """Stop a server, keep its log beside the report, drop what it stored (a 12 MP cell stores gigabytes)."""
    server.stop()
    logs = bench.out / "logs"
    logs.mkdir(exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", server.name)
    shutil.copyfile(server.log_path, logs / f"{safe}.log")
    shutil.rmtree(server.log_path.parent, ignore_errors=True)


# -- micro-batching defaults -------------------------------------------------------


def micro_batching(bench: Bench) -> list[dict[str, Any]]:
    """`inference.max_batch` and `max_wait_ms` on ONNX Runtime INT8 and OpenVINO INT8, 600x450, concurrency 4 and 16."""
    # (max_batch, max_wait_ms, runtime threads; 0 = one per core). One thread leaves the other core to
    # decoding and HTTP instead of splitting each inference over both.
    variants = [(1, 0.0, 0), (4, 2.0, 0)] if bench.quick else [(1, 0.0, 0), (4, 0.0, 0), (4, 2.0, 0), (8, 2.0, 0),
                                                               (4, 2.0, 1)]
    runtimes = [("onnxruntime", "onnx-int8"), ("openvino", "openvino-int8")]
    workload = bench.workloads["derm"]
    rows = []
    for runtime, artifact in runtimes:
        for max_batch, wait_ms, threads in variants:
            name = f"{runtime} max_batch={max_batch} max_wait_ms={wait_ms:g} threads={threads}"
            work = bench.work / f"batching-{runtime}-{max_batch}-{wait_ms:g}-{threads}"
            server = procs.start_appliance(name, bench.model_dir, work, {
                "model": {"artifact": artifact}, "runtime": {"backend": runtime, runtime: {"threads": threads}},
                "inference": {"max_batch": max_batch, "max_wait_ms": wait_ms}})
            try:
                _check_answer(server, workload)
                for c in (4, 16):
                    bench.say(f"micro-batching: {name}, concurrency {c}")
                    row = measure_cell(server, "/check-image", workload.body_path, images.MULTIPART_TYPE, c,
                                       bench.cell_s)
                    rows.append({"runtime": runtime, "artifact": artifact, "max_batch": max_batch,
                                 "max_wait_ms": wait_ms, "threads": threads, **row})
                rows[-1]["peak_rss_mb"] = rows[-2]["peak_rss_mb"] = server.memory_mb()[1]
            finally:
                _finish(bench, server)
    return rows


# -- server overhead ---------------------------------------------------------------


def server_overhead(bench: Bench) -> list[dict[str, Any]]:
    """v2 infer on pre-decoded FP32 tensors vs the same runtime and artifact alone in one process."""
    from appliance import imaging
    from appliance.config import parse_config
    from appliance.inference.model import read_manifest

    manifest = read_manifest(bench.model_dir)
    tensor = imaging.decode(bench.workloads["derm"].path.read_bytes(), manifest.preprocessing,
                            max_pixels=parse_config({}).imaging.max_pixels).tensor
    body, header_length = images.v2_body(tensor, manifest.input_name)
    body_path = bench.work / "v2.body"
    body_path.parent.mkdir(parents=True, exist_ok=True)
    body_path.write_bytes(body)
    max_batch = parse_config({}).inference.max_batch
    setups = [("onnxruntime-int8", ONNXRUNTIME), ("openvino-int8", {"runtime": {"backend": "openvino"},
                                                           "model": {"artifact": "openvino-int8"}})]
    if bench.quick:
        setups = setups[:1]
    rows = []
    for raw_name, overrides in setups:
        bench.say(f"server overhead: {raw_name} alone")
        raw_before = _raw(bench, raw_name, f"1,{max_batch}")
        work = bench.work / f"overhead-{raw_name}"
        server = procs.start_appliance(f"overhead {raw_name}", bench.model_dir, work, overrides)
        cells = []
        try:
            headers = {"Inference-Header-Content-Length": str(header_length)}
            path = f"/v2/models/{manifest.name}/infer"
            status, answer = server.post(path, body, {"Content-Type": "application/octet-stream", **headers})
            if status != 200:
                raise procs.ServerFailed(f"v2 infer answered {status}: {answer[:200]!r}")
            for c, raw_batch in ((1, 1), (2 * max_batch, max_batch)):
                bench.say(f"server overhead: {raw_name} via /v2 infer, concurrency {c}")
                row = measure_cell(server, path, body_path, "application/octet-stream", c, bench.cell_s, headers)
                cells.append((c, raw_batch, row))
        finally:
            _finish(bench, server)
        # Measured again after the server: the raw figure is the mean of before and after, so a
        # machine that slowed down or sped up meanwhile does not pass for server overhead.
        bench.say(f"server overhead: {raw_name} alone, again")
        raw_after = _raw(bench, raw_name, f"1,{max_batch}")
        for c, raw_batch, row in cells:
            both = [r.get("batches", {}).get(str(raw_batch), {}) for r in (raw_before, raw_after)]
            ips = [b["images_per_s"] for b in both if b]
            raw_ips = round(statistics.mean(ips), 1) if ips else None
            raw_cpu = [b["cpu_ms_per_img"] for b in both if b]
            rows.append({"runtime": raw_name, "concurrency": c, "raw_batch": raw_batch, "raw_images_per_s": raw_ips,
                         "raw_runs": ips, "raw_cpu_ms_per_img": round(statistics.mean(raw_cpu), 1) if raw_cpu else None,
                         "server_cpu_ms_per_img": row["server_cpu_ms_per_img"],
                         "server_images_per_s": row["rps"], "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"],
                         "errors": row["errors"], "statuses": row["statuses"],
                         "error_kinds": row["error_kinds"], "mean_batch": row.get("mean_batch"),
                         "overhead_pct": round(100 * (1 - row["rps"] / raw_ips), 1) if raw_ips else None})
    return rows


# -- cold start ----------------------------------------------------------------------


def cold_start(bench: Bench) -> dict[str, Any]:
    """Spawn to /ready 200 (model verified, loaded, warmed up, self-checked), and RSS when ready."""
    runs = 1 if bench.quick else 3
    cache = bench.work / "ov-cache"
    openvino = {"runtime": {"backend": "openvino"}, "model": {"artifact": "openvino-int8"}}
    variants = [
        ("onnxruntime-int8", ONNXRUNTIME, False),
        ("openvino-int8 (default config), no compiled-model cache", openvino, False),
        ("openvino-int8, compiled-model cache", {**openvino, "runtime": {"backend": "openvino",
                                                                         "openvino": {"cache_dir": str(cache)}}}, True),
    ]
    rows = []
    for name, overrides, fill_first in variants:
        times, rss = [], []
        if fill_first:
            bench.say(f"cold start: {name} (filling the cache)")
            server = procs.start_appliance(name, bench.model_dir, bench.work / "cold", overrides, proven=False)
            server.stop()
            fill_s = server.ready_s
        for _ in range(runs):
            bench.say(f"cold start: {name}")
            server = procs.start_appliance(name, bench.model_dir, bench.work / "cold", overrides, proven=False)
            times.append(server.ready_s)
            rss.append(server.memory_mb()[0])
            server.stop()
        row = {"variant": name, "ready_s": round(statistics.median(times), 2), "runs": [round(t, 2) for t in times],
               "ready_rss_mb": round(statistics.median(rss), 1)}
        if fill_first:
            row["cache_fill_ready_s"] = round(fill_s, 2)
        rows.append(row)
    shutil.rmtree(bench.work / "cold", ignore_errors=True)
    return {"variants": rows, "imports_s": _import_time()}


def _import_time() -> float:
    """How long the Python imports alone take (the floor under any cold start)."""
    # OpenVINO as the server imports it: without its telemetry (which would also write under ~/intel).
    code = ("import appliance.app, appliance.inference.runtimes.onnxruntime, onnxruntime, cv2, PIL\n"
            "from appliance.modeldir import import_openvino\n"
            "import_openvino()")
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=procs.ROOT, env=procs.clean_env())
    return round(time.monotonic() - started, 2)


# -- profile ---------------------------------------------------------------------------


def profile(bench: Bench) -> list[dict[str, Any]]:
    """py-spy on the default appliance under concurrency 4, for each image."""
    if profiling.py_spy() is None:
        bench.say("profile: py-spy not installed, skipped")
        return []
    rows = []
    work = bench.work / "profile"
    server = procs.start_appliance("profile", bench.model_dir, work, {})
    try:
        for key, workload in bench.workloads.items():
            bench.say(f"profile: appliance-sqlite, {key}, concurrency 4")
            _check_answer(server, workload)
            seconds = bench.cell_s
            result: dict[str, Any] = {}
            load = threading.Thread(target=lambda result=result, workload=workload, seconds=seconds: result.update(
                measure_cell(server, "/check-image", workload.body_path, images.MULTIPART_TYPE, 4, seconds + 2)))
            load.start()
            time.sleep(1)
            raw = bench.out / f"profile-{key}.txt"
            profiling.record(server.pid, seconds, raw)
            load.join()
            rows.append({"image": key, "load": result, "raw": raw.name, **profiling.summarise(raw, seconds)})
    finally:
        _finish(bench, server)
    return rows


def decode_modes(bench: Bench) -> dict[str, Any]:
    """What the exact decode costs against the fast one on the 12 MP photo, and what this model's served paths measured.

    Timed in this process, fast and exact interleaved, so their ratio holds however busy the machine is.
    """
    from appliance import imaging
    from appliance.inference.model import read_manifest

    manifest = read_manifest(bench.model_dir)
    data = bench.workloads["phone"].path.read_bytes()
    times: dict[str, list[float]] = {mode: [] for mode in imaging.DECODE_MODES}
    for _ in range(5 if bench.quick else 20):
        for mode in imaging.DECODE_MODES:
            start = time.perf_counter()
            imaging.decode(data, manifest.preprocessing, max_pixels=1 << 40, mode=mode)
            times[mode].append(time.perf_counter() - start)
    ms = {mode: round(1000 * statistics.median(t), 1) for mode, t in times.items()}
    paths = [{"key": p.key, "passed": p.passed, "ms_per_image": p.ms_per_image,
              "top1_agreement": p.figures.get("top1_agreement"), "max_abs_dp": p.figures.get("max_abs_dp")}
             for p in manifest.served_paths]
    return {"model": f"{manifest.name} v{manifest.version}", "decode_ms": ms,
            "exact_vs_fast": round(ms["exact"] / ms["fast"], 2), "served_paths": paths}
