"""Command line: `python -m convert CHECKPOINT --name NAME ...` and `python -m convert demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance.modeldir import VERIFICATION_FORMS

from .errors import ConvertError

HAM10000_LABELS = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
METHODS = ("MinMax", "Entropy", "Percentile")

DESCRIPTION = """\
Turn a PyTorch checkpoint into a verified model directory <out>/<name>/<version>/:
ONNX FP32, ONNX INT8 (static QDQ, per-channel weights, calibrated on your photos),
OpenVINO IR FP32 and INT8, golden images and model.json (see models/README.md).
Your photos are split three ways: calibration, selection (the INT8 search may look at
them) and verification (only reported). Every served path (artifact + the server's
fast or exact decode + precision) is run as the server runs it on the verification
photos and compared with PyTorch; the table is printed and the server serves the
fastest path that met the bar. To build the demo model instead: python -m convert demo
(see python -m convert demo --help)."""


def _labels(values: list[str]) -> list[str]:
    # Accept both `--labels a b c` and `--labels a,b,c`.
    return [label.strip() for value in values for label in value.split(",") if label.strip()]


def _methods(value: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in value.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(METHODS)}; got {value!r}")
    return methods


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 < number < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1; got {value!r}")
    return number


def _fraction_or_one(value: str) -> float:
    return 1.0 if value.strip() in ("1", "1.0") else _fraction(value)


def convert_parser() -> argparse.ArgumentParser:
    """The parser for converting a checkpoint."""
    p = argparse.ArgumentParser(prog="python -m convert", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", type=Path,
                   help="the .pt file: a dict with model_state_dict or state_dict, a bare state dict, a TorchScript archive, or (with --trust-checkpoint) a whole pickled nn.Module")
    p.add_argument("--name", required=True, help="model name: the directory under --out (letters, digits, '.', '_', '-')")
    p.add_argument("--out", type=Path, default=Path("models"), help="the models directory (default: models)")
    p.add_argument("--version", type=int, default=None, help="version number to write (default: one more than the largest present); refused if it exists")
    p.add_argument("--calibration-dir", type=Path, default=None,
                   help="directory of your own photos (JPEG/PNG/...; searched recursively) to calibrate INT8 on; some are held out to verify. "
                        "Unreadable files are skipped and counted. Without it INT8 is skipped and FP32 parity is measured on procedural synthetic photos")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help=f"class names in the model's output order, space- or comma-separated (default: {' '.join(HAM10000_LABELS)})")
    p.add_argument("--arch", default="resnet50",
                   help="torchvision architecture for state-dict checkpoints (default: resnet50); any torchvision classifier whose last layer is a Linear. "
                        "Ignored for TorchScript archives and whole modules")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling (needed for whole pickled modules); unpickling runs code from the file, so only for checkpoints you trust")
    p.add_argument("--allow-degraded", action="store_true",
                   help="keep an artifact that misses its parity bar, marked degraded in model.json (the server never picks it by default); without it such an INT8 artifact is left out")
    p.add_argument("--fp16", action="store_true", help="also write an FP16-compressed OpenVINO IR (openvino/fp16/)")
    p.add_argument("--holdout-fraction", type=_fraction, default=0.3, metavar="F",
                   help="fraction of the photos held out for verification, only reported, never steering the INT8 search (default: 0.3)")
    p.add_argument("--selection-fraction", type=_fraction, default=0.2, metavar="F",
                   help="fraction of the photos the INT8 search checks its candidates on (default: 0.2); the rest calibrate")
    p.add_argument("--min-agreement", type=_fraction_or_one, default=0.99, metavar="F",
                   help="a served path passes with at least this top-1 agreement with PyTorch, overall and in every class (default: 0.99)")
    p.add_argument("--max-dp", type=_fraction_or_one, default=0.05, metavar="D",
                   help="... and at most this largest probability difference |dp| on any verification photo (default: 0.05)")
    p.add_argument("--verification-set", choices=VERIFICATION_FORMS, default="photos",
                   help="what the version carries for each box to prove its served paths on its own CPU: the "
                        "verification photos as taken (photos, the default: the box checks its decode too), or only "
                        "the crops PyTorch saw, 224 px PNGs without EXIF (crops: no whole photo leaves this machine; "
                        "the box checks the inference only)")
    p.add_argument("--max-calibration-images", type=int, default=400, metavar="N",
                   help="read at most N photos from --calibration-dir (default: 400)")
    p.add_argument("--calibration-methods", type=_methods, default=METHODS, metavar="LIST",
                   help="ONNX Runtime calibration methods to try, in order, until INT8 meets its bar (default: MinMax,Entropy,Percentile)")
    p.add_argument("--synthetic-images", type=int, default=32, metavar="N",
                   help="procedural photos for FP32 parity when no --calibration-dir is given (default: 32)")
    p.add_argument("--sign-key", type=Path, default=None, metavar="FILE",
                   help="Ed25519 private key (unencrypted PEM, e.g. from `openssl genpkey -algorithm ed25519`): "
                        "also write model.json.sig, a signature over model.json's sha256, for servers whose "
                        "model.trusted_keys lists the matching public key")
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    return p


def demo_parser() -> argparse.ArgumentParser:
    """The parser for `demo`."""
    p = argparse.ArgumentParser(
        prog="python -m convert demo",
        description="Build the demo model directory (<out>/<name>/<version>/) with no inputs: a deterministic ResNet50 "
                    "checkpoint in the old back end's format, trained for about a minute to tell procedural lesion families apart, "
                    "converted and verified. "
                    "Its manifest says demo: true.",
    )
    p.add_argument("--out", type=Path, default=Path("models"), help="the models directory (default: models)")
    p.add_argument("--name", default="demo", help="model name (default: demo)")
    p.add_argument("--version", type=int, default=1, help="version to write (default: 1); refused if it exists")
    p.add_argument("--fp16", action="store_true", help="also write an FP16-compressed OpenVINO IR")
    p.add_argument("--sign-key", type=Path, default=None, metavar="FILE",
                   help="Ed25519 private key (unencrypted PEM, e.g. from `openssl genpkey -algorithm ed25519`): "
                        "also write model.json.sig, a signature over model.json's sha256, for servers whose "
                        "model.trusted_keys lists the matching public key")
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the converter; return the exit status (0 ok, 1 conversion error, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["demo"]:
            args = demo_parser().parse_args(argv[1:])
            from .demo import build_demo

            build_demo(args.out, name=args.name, version=args.version, fp16=args.fp16, sign_key=args.sign_key)
            return 0
        args = convert_parser().parse_args(argv)
        return _convert(args)
    except ConvertError as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an input nobody foresaw: one line, the traceback on request
        if "--debug" in argv:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"convert: error: unexpected {type(exc).__name__}{': ' + first if first else ''}; nothing was written. "
              f"Run again with --debug for the traceback and report it with the command line", file=sys.stderr)
        return 1


def _convert(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .images import load_image_dir
    from .build import ConvertOptions
    from .pipeline import convert
    from .served import Bar

    labels = _labels(args.labels) if args.labels else list(HAM10000_LABELS)
    model = load_checkpoint(args.checkpoint, arch=args.arch, trust=args.trust_checkpoint)
    calibration = None
    if args.calibration_dir is not None:
        calibration = load_image_dir(args.calibration_dir, limit=args.max_calibration_images)
        if calibration.skipped:
            print(f"convert: skipped {calibration.skipped} unreadable file(s) in {args.calibration_dir}", file=sys.stderr)
    options = ConvertOptions(
        labels=labels,
        allow_degraded=args.allow_degraded,
        fp16=args.fp16,
        holdout_fraction=args.holdout_fraction,
        selection_fraction=args.selection_fraction,
        bar=Bar(args.min_agreement, args.max_dp),
        synthetic_images=args.synthetic_images,
        methods=args.calibration_methods,
        verification_set=args.verification_set,
    )
    convert(model, out=args.out, name=args.name, version=args.version, calibration=calibration, options=options,
            sign_key=args.sign_key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
