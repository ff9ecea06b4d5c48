"""One conversion, start to finish: export, quantize, convert, verify, write the model directory.

The clinic's photos are split three ways: calibration (INT8 ranges), selection (what the
INT8 search may look at) and verification (only reported: the artifact parity and every
served path's figures, never a choice of the search). Everything is built in a hidden
temporary directory inside `<out>/<name>/` and renamed to `<out>/<name>/<version>/` only
when complete, so a failure leaves nothing half-written. The artifacts are made by
the steps of a `build.Build`; this module splits the photos, runs them, measures every
served path and writes model.json.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from appliance import imaging
from appliance.errors import ModelError
from appliance.modeldir import (
    Artifact,
    GoldenImage,
    Manifest,
    Preprocessing,
    ServedPath,
    input_shape,
    now,
    read_signing_key,
    sha256_file,
    sign_manifest,
    write_json,
    write_manifest,
)

from . import golden as golden_mod
from .build import BATCH, Build, ConvertOptions, Split, artifact_steps, say, shout
from .checkpoint import LoadedModel
from .errors import ConvertError
from .images import ImageSet, jpeg_bytes, reference_crop
from .served import (
    MIN_VERIFICATION_PHOTOS,
    Candidate,
    Photo,
    Row,
    format_paths,
    measure_paths,
    reference_tensors,
    with_phone_size_copies,
)
from .synthetic import synthetic_photos
from .verify import infer_all

HOLDOUT_SEED = 0
VERIFICATION_DIR = "verification"
SYNTHETIC_SEED = 5_000
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def next_version(name_dir: Path) -> int:
    """One more than the largest integer version directory present (1 when none)."""
    versions = [int(p.name) for p in name_dir.iterdir() if p.is_dir() and p.name.isdigit()] if name_dir.is_dir() else []
    return max(versions, default=0) + 1


def convert(
    model: LoadedModel,
    *,
    out: Path,
    name: str,
    version: int | None,
    calibration: ImageSet | None,
    options: ConvertOptions,
    source_extra: dict | None = None,
    sign_key: Path | None = None,
) -> Path:
    """Convert `model` into `<out>/<name>/<version>/` and return that directory.

    With `sign_key` (an Ed25519 private key, PEM), model.json is also signed (model.json.sig).
    """
    signing_key = None
    if sign_key is not None:  # read first: a bad key must not cost a whole conversion
        try:
            signing_key = read_signing_key(sign_key)
        except ModelError as exc:
            raise ConvertError(str(exc.detail)) from None
    if not NAME_RE.match(name):
        raise ConvertError(f"--name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit")
    if len(options.labels) != model.num_classes:
        raise ConvertError(
            f"the checkpoint has {model.num_classes} classes but {len(options.labels)} labels were given "
            f"({', '.join(options.labels)}); pass --labels with {model.num_classes} names"
        )
    if len(set(options.labels)) != len(options.labels):
        raise ConvertError(f"--labels must be distinct; got {', '.join(options.labels)}")
    name_dir = out / name
    if version is None:
        version = next_version(name_dir)
    elif version < 1:
        raise ConvertError(f"--version must be a positive integer; got {version}")
    final = name_dir / str(version)
    if final.exists():
        raise ConvertError(f"{final} already exists; pick another --version or leave it out to use the next one")

    split = _split(calibration, options)
    created_name_dir = not name_dir.exists()
    name_dir.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".building-{version}-", dir=name_dir))
    try:
        with tempfile.TemporaryDirectory(prefix="convert-work-") as work:
            build = _start(model, building, Path(work), split, calibration, options)
            build.run()
            manifest, table = _finish(build, name, version, source_extra or {})
        write_manifest(manifest)
        if signing_key is not None:
            sign_manifest(building, signing_key)
        try:
            os.rename(building, final)
        except OSError as exc:
            raise ConvertError(f"cannot move the finished model into {final}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        if created_name_dir:
            try:
                name_dir.rmdir()
            except OSError:
                pass
        raise
    print(table, flush=True)
    say(f"wrote {final}")
    return final


def _split(calibration: ImageSet | None, options: ConvertOptions) -> Split:
    """Calibration, selection and verification photos; only photos the server accepts verify."""
    if calibration is None:
        return Split(None, np.zeros((0, 3, 224, 224), np.float32), _synthetic_photos(options), "synthetic")
    n = len(calibration.tensors)
    order = [int(i) for i in np.random.default_rng(HOLDOUT_SEED).permutation(n)]
    if options.heldout_count is not None:
        chosen = list(range(n - options.heldout_count, n))
    else:
        eligible = [i for i in order if calibration.servable[i]]
        # At least one photo calibrates; then one verifies, then one selects, as far as they go.
        held = min(len(eligible), n - 1, max(1 if n >= 2 else 0, round(n * options.holdout_fraction)))
        chosen = sorted(eligible[:held])
    rest = [i for i in order if i not in set(chosen)]
    wanted = options.selection_count if options.selection_count is not None else round(n * options.selection_fraction)
    pick = min(len(rest) - 1, max(1 if len(rest) >= 2 else 0, wanted))
    selection = sorted(rest[:pick])
    taken = set(chosen) | set(selection)
    calib = calibration.tensors[[i for i in range(n) if i not in taken]]
    verification = [Photo(calibration.names[i], calibration.data(i)) for i in chosen]
    source, warning = "held-out", None
    if not verification:
        warning = (f"none of the {n} photo(s) could verify (the server accepts JPEG, PNG and WebP, and one photo "
                   f"is needed to calibrate); served paths were measured on {options.synthetic_images} synthetic photos")
        verification, source = _synthetic_photos(options), "synthetic"
    elif len(verification) < MIN_VERIFICATION_PHOTOS:
        warning = (f"only {len(verification)} verification photo(s), fewer than {MIN_VERIFICATION_PHOTOS}: one "
                   f"disagreement moves top-1 by {1 / len(verification):.0%}; add photos to --calibration-dir")
    return Split(calib, calibration.tensors[selection], verification, source, warning)


def _synthetic_photos(options: ConvertOptions) -> list[Photo]:
    """Procedural photos to verify on when the clinic gave none that can."""
    images = synthetic_photos(options.synthetic_images, SYNTHETIC_SEED)
    return [Photo(f"synthetic-{i}", jpeg_bytes(image)) for i, image in enumerate(images)]




def _start(model: LoadedModel, root: Path, work: Path, split: Split, calibration: ImageSet | None,
           options: ConvertOptions) -> Build:
    """A Build with PyTorch's answers on the verification photos (and their phone-size copies) measured."""
    photos = with_phone_size_copies(split.verification)
    copies = sum(p.is_copy for p in photos)
    say(f"verifying on {len(split.verification)} {split.source} photos and {copies} copies of them at phone sizes")
    verification = reference_tensors(photos)
    reference = infer_all(model.probabilities, verification, batch=BATCH, desc="verifying: PyTorch FP32")
    return Build(model, root, work, split, calibration, options, photos, verification, reference, artifact_steps(options))


def _finish(build: Build, name: str, version: int, source_extra: dict[str, Any]) -> tuple[Manifest, str]:
    """Golden images, every served path measured, source.json written; the manifest and the table to print."""
    root, options = build.root, build.options
    say("writing golden vectors")
    golden = golden_mod.write_golden(root / "golden", build.model.probabilities)
    if golden.low_margin:
        say(f"note: {golden.low_margin} golden image(s) have a top-1 margin under {golden_mod.MIN_MARGIN}; the model is rarely that sure of synthetic photos")
    paths = _served_paths(build, golden)
    verification_set = _write_verification_set(root / VERIFICATION_DIR, build)
    artifacts = {art.key: Artifact.hashed(
        art.key, root, art.format, art.precision, art.files,
        degraded=not art.parity.passed,
        # Format 1's tolerance, for older appliances: the strictest of this artifact's passing paths.
        selfcheck_max_abs_dp=min((p.selfcheck_max_abs_dp for p in paths if p.artifact == art.key and p.passed),
                                 default=max(p.selfcheck_max_abs_dp for p in paths if p.artifact == art.key)),
        details={"parity": art.parity.to_json(), **art.details},
    ) for art in build.artifacts}
    model = build.model
    source = {"file": model.path.name, "sha256": model.sha256, "form": model.form, "arch": model.arch, "head": model.head,
              **source_extra}
    write_json(root / "source.json", {"path": str(model.path.resolve()) if not options.demo else None, **source})
    warnings = [w for w in (build.split.warning,) if w]
    spec = Preprocessing()
    manifest = Manifest(
        directory=root,
        name=name,
        version=str(version),
        demo=options.demo,
        labels=tuple(options.labels),
        input_shape=input_shape(spec),
        preprocessing=spec,
        created_at=now(),
        source=source,
        artifacts=artifacts,
        golden=tuple(
            GoldenImage(path.relative_to(root).as_posix(), tuple(float(x) for x in probs), sha256_file(path))
            for path, probs in zip(golden.files, golden.probabilities, strict=True)
        ),
        served_paths=tuple(paths),
        verification_set=verification_set,
        verification={"photos": len(build.split.verification), "source": build.split.source,
                      "set_form": options.verification_set,
                      "copies": sum(p.is_copy for p in build.photos), "min_photos": MIN_VERIFICATION_PHOTOS,
                      "bar": options.bar.to_json(), "warnings": warnings},
    )
    table = format_paths(_rows(build, paths), options.bar)
    for line in build.left_out + [f"WARNING: {w}" for w in warnings]:
        table += f"\n{line}"
    if not any(p.passed for p in paths):
        shout("no served path met the bar: the appliance will refuse to serve this model (its message names the "
              "settings); add photos to --calibration-dir, or relax --min-agreement / --max-dp")
    return manifest, table


def _write_verification_set(directory: Path, build: Build) -> tuple[GoldenImage, ...]:
    """The verification photos as taken (EXIF and all), or their reference crops, with PyTorch's answers: what a
    box proves its paths on.

    Their copies at phone sizes stay out: they measured the decode, which does not change from one
    CPU to the next, and would weigh hundreds of MB.
    """
    directory.mkdir()
    entries = []
    crops = build.options.verification_set == "crops"
    for index, photo in enumerate(build.split.verification):
        if crops:
            file = directory / f"{index:04d}.png"
            reference_crop(io.BytesIO(photo.data)).save(file, "PNG")
        else:
            file = directory / f"{index:04d}.{imaging.sniff(photo.data)}"
            file.write_bytes(photo.data)
        # `build.photos` begins with the verification photos themselves, in this order; their copies follow.
        entries.append(GoldenImage(file.relative_to(directory.parent).as_posix(),
                                   tuple(float(x) for x in build.reference[index]), sha256_file(file)))
    size = sum(e.stat().st_size for e in directory.iterdir())
    say(f"verification set: {len(entries)} {'crops' if crops else 'photos'}, {size / 1e6:.1f} MB in {directory.name}/ "
        f"(a box proves its served paths on them)")
    return tuple(entries)


def _served_paths(build: Build, golden: golden_mod.Golden) -> list[ServedPath]:
    """Every artifact with each decode mode and precision, run as the server runs it."""
    from .openvino import cpu_has_bf16

    say("measuring served paths (artifact, decode mode, precision) as the server runs them")
    bf16 = cpu_has_bf16()
    candidates = [Candidate(a.key, a.format, a.precision, a.files[0], a.probabilities) for a in build.artifacts]
    paths = measure_paths(candidates, build.photos, build.reference,
                          ([f.read_bytes() for f in golden.files], golden.probabilities),
                          Preprocessing(), build.options.labels, build.options.bar, bf16=bf16, say=say,
                          reference_tensors=build.verification)
    if not bf16:
        build.left_out.append("openvino-fp32@bf16 not measured: this CPU has no native bf16")
    return paths


def _rows(build: Build, paths: list[ServedPath]) -> list[Row]:
    """The table's rows: degraded paths and the one each runtime serves by default are noted."""
    notes: dict[str, str] = {}
    for art in build.artifacts:
        if not art.parity.passed:
            notes.update({p.key: "degraded, kept (--allow-degraded)" for p in paths if p.artifact == art.key})
    for runtime in sorted({p.runtime for p in paths}):
        passing = [p for p in paths if p.runtime == runtime and p.passed and p.inference_precision == "f32"]
        if passing:
            best = min(passing, key=lambda p: p.ms_per_image or 0.0)
            notes[best.key] = (notes.get(best.key, "") + f"  <- served by runtime.backend = \"{runtime}\"").strip()
    return [Row(p, notes.get(p.key, "")) for p in paths]
