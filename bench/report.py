"""The Markdown report and PNG plots of one benchmark run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .swap import report_section

TITLES = {"phone": "12 MP phone photo (4032×3024)", "derm": "600×450 dermoscopy"}
APPLIANCES = ("appliance-sqlite", "appliance-disk")


def _cell(rows: list[dict], server: str, image: str, c: int) -> dict | None:
    return next((r for r in rows if r["server"] == server and r["image"] == image and r["concurrency"] == c), None)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _errors(row: dict) -> str:
    """"0", or the count with what it was: "12 (503×10, read×2)"."""
    if not row.get("errors"):
        return "0"
    kinds = [f"{status}×{n}" for status, n in sorted(row.get("statuses", {}).items()) if not status.startswith("2")]
    kinds += [f"{kind}×{n}" for kind, n in row.get("error_kinds", {}).items() if kind != "status"]
    return f"{row['errors']} ({', '.join(kinds)})"


def targets(results: dict[str, Any]) -> list[list[Any]]:
    """[target, measured, met] rows for the issue's targets, from this run only."""
    rows: list[list[Any]] = []
    e2e = results.get("end_to_end", [])
    for store in APPLIANCES:
        for image in ("derm", "phone"):
            ours, base = _cell(e2e, store, image, 4), _cell(e2e, "baseline", image, 4)
            if ours and base and base["rps"]:
                ratio = ours["rps"] / base["rps"]
                rows.append([f"throughput at concurrency 4 ≥ 10× baseline ({TITLES[image]}, {store})",
                             f"{ratio:.1f}× ({ours['rps']:.1f} vs {base['rps']:.1f} img/s)", ratio >= 10])
    for store in APPLIANCES:
        for image in ("derm", "phone"):
            ours, base = _cell(e2e, store, image, 1), _cell(e2e, "baseline", image, 1)
            if ours and base and base["p99_ms"]:
                ratio = ours["p99_ms"] / base["p99_ms"]
                rows.append([f"p99 at concurrency 1 ≤ 1/5 of baseline ({TITLES[image]}, {store})",
                             f"1/{1 / ratio:.1f} ({ours['p99_ms']:.0f} vs {base['p99_ms']:.0f} ms)", ratio <= 0.2])
    overhead = [r for r in results.get("server_overhead", []) if r["concurrency"] > 1 and r["overhead_pct"] is not None]
    for r in overhead:
        rows.append([f"server overhead ≤ 5% ({r['runtime']}, v2 infer at concurrency {r['concurrency']} vs raw batch "
                     f"{r['raw_batch']})", f"{r['overhead_pct']:.1f}% ({r['server_images_per_s']:.1f} vs "
                     f"{r['raw_images_per_s']:.1f} img/s)", r["overhead_pct"] <= 5])
    for v in results.get("cold_start", {}).get("variants", []):
        if "cache" in v["variant"] and "no " not in v["variant"]:
            rows.append([f"cold start to ready ≤ 2 s with the compiled-model cache ({v['variant'].split(',')[0]})",
                         f"{v['ready_s']:.2f} s", v["ready_s"] <= 2.0])
    for store in APPLIANCES:
        mine = [r for r in e2e if r["server"] == store]
        if mine:
            derm = max((r["peak_rss_mb"] for r in mine if r["image"] == "derm"), default=0)
            peak = max(r["peak_rss_mb"] for r in mine)
            rows.append([f"RSS ≤ 300 MB ({store}: idle; peak with 600×450; peak with 12 MP at up to 16 at once)",
                         f"{mine[0]['idle_rss_mb']:.0f} / {derm:.0f} / {peak:.0f} MB", peak <= 300])
    return [[t, m, "met" if ok else "**not met**"] for t, m, ok in rows]


def ceilings(results: dict[str, Any]) -> list[list[Any]]:
    """Upper bounds measured in this run: why a ratio target can or cannot be reached on this machine."""
    e2e = results.get("end_to_end", [])
    cores = results["machine"]["cores"] or 2
    raw = {r["name"]: r for r in results.get("raw_runtimes", []) if "best_images_per_s" in r}
    rows: list[list[Any]] = []
    for image in ("derm", "phone"):
        base = _cell(e2e, "baseline", image, 4)
        if not base or not base["rps"]:
            continue
        for name in dict.fromkeys(r["server"] for r in e2e if r["server"].startswith("appliance")):
            cell = _cell(e2e, name, image, 4)
            if not cell or not cell.get("server_cpu_ms_per_img"):
                continue
            cap = 1000 * cores / cell["server_cpu_ms_per_img"]
            rows.append([TITLES[image], name, f"all {cores} cores for the server at its measured "
                         f"{cell['server_cpu_ms_per_img']:.0f} CPU ms per image", f"{cap:.1f}", f"{cap / base['rps']:.1f}×"])
            decode = _cell(e2e, name, image, 1)
            if image == "phone" and decode and decode.get("decode_ms"):
                cap = 1000 * cores / decode["decode_ms"]
                rows.append([TITLES[image], name, f"decoding alone ({decode['decode_ms']:.0f} ms per photo, "
                             "free inference and storage)", f"{cap:.1f}", f"{cap / base['rps']:.1f}×"])
        if image == "derm":
            for name in ("onnxruntime-int8", "openvino-int8"):
                if name in raw:
                    cap = raw[name]["best_images_per_s"]
                    rows.append([TITLES[image], name, "the runtime alone on pre-made tensors (raw best img/s; "
                                 "no decode, HTTP or storage)", f"{cap:.1f}", f"{cap / base['rps']:.1f}×"])
    return rows


def _decode_section(decode: dict) -> str:
    if not decode:
        return ""
    ms = decode["decode_ms"]
    table = [[p["key"], "pass" if p["passed"] else "FAIL", _fmt(p["top1_agreement"], 4), _fmt(p["max_abs_dp"], 4),
              p["ms_per_image"]] for p in decode["served_paths"]]
    return (f"## Decode modes on the 12 MP photo ({decode['model']})\n\n"
            f"`imaging.decode` alone, interleaved in one process: fast {ms['fast']} ms, exact {ms['exact']} ms "
            f"(**{decode['exact_vs_fast']}x**). The model's served paths as convert measured them "
            "(verification photos, decode + batch-1 inference on the converting machine):\n\n"
            + _table(["served path", "result", "top-1", "max |dp|", "ms/img"], table))


def write_report(out: Path, results: dict[str, Any]) -> Path:
    """Write `report.md` and the plots into `out`; return the report's path."""
    plots = _plots(out, results)
    m = results["machine"]
    parts = [f"# Benchmark report, {results['started']}\n",
             f"Machine: **{m['cpu']}** ({' '.join(m.get('isa') or ['no AVX2'])}), {m['cores']} cores, "
             f"{m['memory_gb']} GB; {m['kernel']}. "
             f"Load average {m['load_before']} before, {m['load_after']} after. Python {m['python']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".\n",
             f"Mode: {'quick (smoke run; numbers are rough)' if results['quick'] else 'full'}; {results['cell_s']} s "
             f"per load cell; load generator: **{results['generator']}** "
             f"({'wrk, one thread, a Lua script for the body' if results['generator'] == 'wrk' else 'bench/loadgen.py: asyncio + aiohttp in its own process; it costs more CPU than wrk would'}). "
             "Servers run one at a time as their own processes on 127.0.0.1, the load generator beside them "
             "on the same 2 cores. The machine is shared and noisy: other jobs may have run during any "
             "cell; ratios within one run are what the targets use.\n"]
    rows = targets(results)
    if rows:
        parts.append("## Targets (issue 7)\n\n" + _table(["target", "measured", ""], rows))
    bounds = ceilings(results)
    if bounds:
        parts.append("### Ceilings measured in this run\n\nThe most images/s each bound allows, and that as a "
                     "multiple of the baseline at concurrency 4. A target above a ceiling cannot be met on this "
                     "machine by any server code.\n\n"
                     + _table(["image", "server / runtime", "bound", "img/s at most", "vs baseline"], bounds))
    parts.append(_raw_section(results.get("raw_runtimes", [])))
    parts.append(_e2e_section(results.get("end_to_end", [])))
    parts.append(_overhead_section(results.get("server_overhead", [])))
    parts.append(_batching_section(results.get("micro_batching", [])))
    parts.append(_cold_section(results.get("cold_start", {})))
    parts.append(_decode_section(results.get("decode_modes", {})))
    parts.append(_profile_section(results.get("profile", [])))
    parts.append(report_section(results.get("swap", {})))
    parts.append("## Plots\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots))
    path = out / "report.md"
    path.write_text("\n".join(p for p in parts if p))
    return path


def _raw_section(rows: list[dict]) -> str:
    if not rows:
        return ""
    torch = next((r for r in rows if r["name"] == "pytorch-fp32" and "batch1_ms" in r), None)
    table = []
    for r in rows:
        if not r.get("supported", True):
            table.append([r["name"], "n/a (CPU lacks bf16)", "", "", "", ""])
            continue
        if "error" in r:
            table.append([r["name"], f"failed: {' '.join(r['error'])}", "", "", "", ""])
            continue
        speedup = torch["batch1_ms"] / r["batch1_ms"] if torch else None
        gain = r["best_images_per_s"] / torch["best_images_per_s"] if torch else None
        table.append([r["name"], r["batch1_ms"], f"{speedup:.1f}×" if speedup else "–",
                      f"{r['best_images_per_s']} (batch {r['best_batch']})", f"{gain:.1f}×" if gain else "–",
                      r.get("peak_rss_mb")])
    return ("## Raw runtime (one process each, no server)\n\n"
            + _table(["runtime", "ms/img, batch 1", "vs PyTorch", "best img/s", "vs PyTorch", "peak RSS MB"], table))


def _e2e_section(rows: list[dict]) -> str:
    if not rows:
        return ""
    text = ("## End to end: `POST /check-image`\n\n"
            "img/s counts 200 answers only. Server CPU is the server process's user+system time over the cell "
            "(2 cores = 2.0). decode / inference / storage are the appliance's own stage means from /metrics "
            "(inference includes the queue wait).\n\n")
    for image in ("derm", "phone"):
        table = []
        for r in (r for r in rows if r["image"] == image):
            base = _cell(rows, "baseline", image, r["concurrency"])
            ratio = f"{r['rps'] / base['rps']:.1f}×" if base and base["rps"] and r["server"] != "baseline" else ""
            stages = " / ".join(_fmt(r.get(k)) for k in ("decode_ms", "inference_ms", "storage_ms"))
            table.append([r["server"], r["concurrency"], r["rps"], ratio, r["p50_ms"], r["p99_ms"], _errors(r),
                          r["server_cpu_ms_per_img"], r["server_cpu_cores"],
                          stages if r.get("decode_ms") is not None else "", r.get("mean_batch")])
        text += f"### {TITLES[image]}\n\n" + _table(
            ["server", "conc.", "img/s", "vs baseline", "p50 ms", "p99 ms", "errors", "server CPU ms/img",
             "CPU cores", "decode / inference / storage ms", "mean batch"], table) + "\n"
    servers = []
    for name in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == name]
        derm = next((r for r in mine if r["image"] == "derm"), mine[0])
        servers.append([name, mine[0]["ready_s"], mine[0]["idle_rss_mb"],
                        max((r["peak_rss_mb"] for r in mine if r["image"] == "derm"), default=None),
                        max(r["peak_rss_mb"] for r in mine),
                        f"{derm['answer']['top']} / {derm['answer']['blur_score']}"])
    text += "### Memory and start\n\n" + _table(
        ["server", "spawn to ready s", "idle RSS MB", "peak RSS MB, 600×450 cells", "peak RSS MB, all cells",
         "600×450 answer: top-1 / blur"], servers)
    scaling = []
    for name in dict.fromkeys(r["server"] for r in rows):
        for image in ("derm", "phone"):
            cells = {c: _cell(rows, name, image, c) for c in (1, 4, 16)}
            if cells[1]:
                scaling.append([name, image] + [cells[c]["rps"] if cells[c] else None for c in (1, 4, 16)]
                               + [f"{cells[16]['rps'] / cells[1]['rps']:.2f}×" if cells[16] and cells[1]["rps"] else ""])
    text += "\n### Scaling with concurrency (img/s)\n\n" + _table(
        ["server", "image", "c=1", "c=4", "c=16", "c=16 / c=1"], scaling)
    return text


def _overhead_section(rows: list[dict]) -> str:
    if not rows:
        return ""
    table = [[r["runtime"], r["concurrency"], r["raw_batch"],
              f"{r['raw_images_per_s']} ({', '.join(map(str, r.get('raw_runs', [])))})", r["server_images_per_s"],
              r["overhead_pct"], r.get("raw_cpu_ms_per_img"), r.get("server_cpu_ms_per_img"), r["p50_ms"], r["p99_ms"],
              r["mean_batch"], _errors(r)] for r in rows]
    return ("## Server overhead: pre-decoded tensors through `POST /v2/models/{name}/infer`\n\n"
            "One FP32 [1, 3, 224, 224] tensor per request (binary tensor extension, 602 kB) against the same "
            "runtime class and artifact alone in one process, at the batch size the server forms. The raw "
            "figure is the mean of a measurement before and one after the server's (both in brackets). CPU ms/img: "
            "the process's CPU time per image; the difference is what the server spends besides inference.\n\n"
            + _table(["runtime", "conc.", "raw batch", "raw img/s", "server img/s", "overhead %", "raw CPU ms/img",
                      "server CPU ms/img", "p50 ms", "p99 ms", "mean batch", "errors"], table))


def _batching_section(rows: list[dict]) -> str:
    if not rows:
        return ""
    table = [[r["runtime"], r["max_batch"], r["max_wait_ms"], r.get("threads") or "per core", r["concurrency"],
              r["rps"], r["p50_ms"], r["p99_ms"],
              r.get("mean_batch"), r.get("inference_ms"), r.get("peak_rss_mb"), _errors(r)] for r in rows]
    return ("## Micro-batching (`inference.max_batch`, `max_wait_ms`), 600×450, sqlite store\n\n"
            + _table(["runtime", "max_batch", "max_wait_ms", "threads", "conc.", "img/s", "p50 ms", "p99 ms", "mean batch",
                      "inference ms", "peak RSS MB", "errors"], table))


def _cold_section(cold: dict) -> str:
    if not cold:
        return ""
    table = [[v["variant"], v["ready_s"], ", ".join(map(str, v["runs"])), v.get("cache_fill_ready_s"),
              v["ready_rss_mb"]] for v in cold["variants"]]
    return ("## Cold start: spawn to `/ready` 200 (sha256 of the artifact, load, warm-up, golden self-check)\n\n"
            + _table(["variant", "median s", "runs s", "first run (fills cache) s", "RSS at ready MB"], table)
            + f"\nPython imports alone (appliance, onnxruntime, openvino, cv2, PIL): {cold['imports_s']} s.\n")


def _profile_section(rows: list[dict]) -> str:
    if not rows:
        return ""
    text = ("## Profile: py-spy on the appliance (sqlite, default runtime) at concurrency 4\n\n"
            "Per thread: % of the wall time it was busy (100% = one core), and where. Raw stacks: "
            + ", ".join(f"`{r['raw']}`" for r in rows) + ".\n\n")
    for r in rows:
        load = r["load"]
        text += (f"### {TITLES[r['image']]}: {load.get('rps')} img/s, p50 {load.get('p50_ms')} ms, stages "
                 f"decode {load.get('decode_ms')} / inference {load.get('inference_ms')} / storage "
                 f"{load.get('storage_ms')} ms\n\n")
        table = []
        for thread, info in r["threads"].items():
            top = "; ".join(f"{where} {pct}%" for where, pct in info["top"][:4])
            table.append([thread, info["busy_pct"], top])
        text += _table(["thread", "busy %", "where (% of wall)"], table) + "\n"
    return text


def _plots(out: Path, results: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    raw = [r for r in results.get("raw_runtimes", []) if r.get("supported", True) and "batch1_ms" in r]
    if raw:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        names = [r["name"] for r in raw]
        a.barh(names, [r["batch1_ms"] for r in raw], color="tab:blue")
        a.set_xlabel("ms per image, batch 1 (lower is better)")
        b.barh(names, [r["best_images_per_s"] for r in raw], color="tab:green")
        b.set_xlabel("best images/s over batch 1..8 (higher is better)")
        b.set_yticklabels([])
        fig.suptitle("Raw runtime, ResNet50 224×224")
        fig.tight_layout()
        written.append(_save(fig, out / "raw_runtime.png"))
    e2e = results.get("end_to_end", [])
    if e2e:
        fig, axes = plt.subplots(2, 2, figsize=(11, 7))
        for col, image in enumerate(("derm", "phone")):
            for name in dict.fromkeys(r["server"] for r in e2e):
                cells = sorted((r for r in e2e if r["server"] == name and r["image"] == image),
                               key=lambda r: r["concurrency"])
                if len(cells) < 2:
                    continue
                xs = [r["concurrency"] for r in cells]
                axes[0][col].plot(xs, [r["rps"] for r in cells], marker="o", label=name)
                axes[1][col].plot(xs, [r["p99_ms"] for r in cells], marker="o", label=name)
            axes[0][col].set_title(TITLES[image])
            axes[0][col].set_ylabel("images/s")
            axes[1][col].set_ylabel("p99 latency, ms")
            for row in (0, 1):
                axes[row][col].set_xscale("log", base=2)
                axes[row][col].set_yscale("log")
                axes[row][col].set_xticks([1, 4, 16], ["1", "4", "16"])
                axes[row][col].set_xlabel("concurrent clients")
                axes[row][col].grid(True, alpha=0.3)
        axes[0][0].legend()
        fig.suptitle("POST /check-image: throughput and p99 vs concurrency")
        fig.tight_layout()
        written.append(_save(fig, out / "end_to_end.png"))
    batching = results.get("micro_batching", [])
    if batching:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, c in zip(axes, (4, 16), strict=True):
            cells = [r for r in batching if r["concurrency"] == c]
            labels = [f"{r['runtime'][:4]} b{r['max_batch']} w{r['max_wait_ms']:g}"
                      + (f" t{r['threads']}" if r.get("threads") else "") for r in cells]
            ax.bar(range(len(cells)), [r["rps"] for r in cells],
                   color=["tab:blue" if r["runtime"] == "onnxruntime" else "tab:orange" for r in cells])
            ax.set_xticks(range(len(cells)), labels, rotation=45, ha="right")
            ax.set_title(f"600×450, concurrency {c}")
        axes[0].set_ylabel("images/s")
        fig.suptitle("Micro-batching: max_batch (b), max_wait_ms (w), runtime threads (t)")
        fig.tight_layout()
        written.append(_save(fig, out / "micro_batching.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
