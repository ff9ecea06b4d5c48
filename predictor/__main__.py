"""`python -m predictor --model-dir DIR`: serve one model directory with KServe's model server."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from appliance.config import load_config
from appliance.errors import ApplianceError

# KServe's storage initializer copies the InferenceService's storageUri here.
KSERVE_MODEL_DIR = Path("/mnt/models")
DEFAULT_HTTP_PORT = 8080  # the port KServe routes to in a custom predictor container


def build_parser() -> argparse.ArgumentParser:
    """The command line; --help describes it."""
    parser = argparse.ArgumentParser(
        prog="python -m predictor",
        description="Serve a model directory made by `python -m convert` on KServe's model server "
        "(Open Inference Protocol v2 REST: POST /v2/models/NAME/infer). The model is verified and "
        "self-checked as the appliance does; a model that fails exits 1 with the reason.",
    )
    parser.add_argument("--model-dir", type=Path, default=KSERVE_MODEL_DIR,
                        help="the model directory, or its parent holding numbered versions (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                        help="the REST port (default: %(default)s)")
    parser.add_argument("--host", default=None,
                        help="the address to listen on (default: 0.0.0.0, every interface, as a pod needs)")
    parser.add_argument("--model-name", default=None,
                        help="the name in the URL path (default: the manifest's name)")
    parser.add_argument("--config", type=Path, default=None,
                        help="an appliance config.toml whose [model] trusted_keys, [runtime], [inference] "
                        "and [imaging] apply (default: none; APPLIANCE_* variables apply either way)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Load and self-check the model, then serve it until SIGTERM; 1 with one line if the model fails."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, path=args.model_dir))
        # kserve parses sys.argv with its own parser when imported (kserve.model_server), and abbreviations
        # match: it would take --config for its --configure_logging. This command line is ours alone.
        sys.argv = sys.argv[:1]
        try:
            from .model import DermModel
            from .server import DEFAULT_HOST, HostedModelServer, prepare_app
        except ImportError as exc:
            print(f"predictor: error: needs the kserve extra (pip install '.[kserve]'): {exc}", file=sys.stderr)
            return 1

        model = DermModel(args.model_name, config)
        model.load()
    except ApplianceError as exc:
        print(f"predictor: error: {exc.detail}", file=sys.stderr)
        return 1
    prepare_app()
    HostedModelServer(host=args.host or DEFAULT_HOST, http_port=args.http_port).start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
