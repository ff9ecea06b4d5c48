"""The `appliance` command: serve, check-config, convert."""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
from pathlib import Path

from . import __version__
from .config import Config, api_key, load_config
from .errors import ApplianceError

DEFAULT_CONFIG_HELP = "the TOML config (default: $APPLIANCE_CONFIG, else ./config.toml if present, else built-in defaults)"


def _config_path(given: str | None) -> Path | None:
    if given:
        return Path(given)
    if os.environ.get("APPLIANCE_CONFIG"):
        return Path(os.environ["APPLIANCE_CONFIG"])
    return Path("config.toml") if Path("config.toml").is_file() else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="Edge inference appliance for dermatology clinics: the clinic API on ONNX Runtime or OpenVINO.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="load the model, self-check it and serve the clinic API",
        description="Load the model directory, warm it up, check it against its golden images, open the "
        "store and serve the clinic API until SIGINT/SIGTERM (then drain and exit 0). "
        "Old back-end variables (MODEL_PATH, STORAGE_ROOT, API_KEY, ...) and APPLIANCE_<SECTION>__<KEY> "
        "override the file.",
    )
    serve.add_argument("--config", metavar="PATH", help=DEFAULT_CONFIG_HELP)
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="log verbosity (default INFO)")

    check = commands.add_parser(
        "check-config",
        help="validate the configuration and the model directory, then exit",
        description="Parse the config with every override applied, resolve the model directory and read its "
        "manifest; print a summary and exit 0, or one line naming the problem and exit 1. Fit for ExecStartPre=.",
    )
    check.add_argument("--config", metavar="PATH", help=DEFAULT_CONFIG_HELP)

    commands.add_parser(
        "convert",
        help="convert a PyTorch checkpoint into a model directory (same as python -m convert; needs the [convert] extra)",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        try:
            from convert.__main__ import main as convert_main
        except ImportError as exc:
            print(f"appliance: error: convert needs the [convert] extra (pip install '.[convert]'): {exc}", file=sys.stderr)
            return 1
        return convert_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = load_config(_config_path(args.config))
        if args.command == "check-config":
            return check_config(config)
        return serve(config, args)
    except ApplianceError as exc:
        print(f"appliance: error: {exc.detail}", file=sys.stderr)
        return 1


def check_config(config: Config) -> int:
    from .inference.model import choose_artifact, read_manifest, resolve_model_dir
    from .inference.runtimes import runtime_class

    directory = resolve_model_dir(config.model.path)
    manifest = read_manifest(directory)
    artifact = choose_artifact(manifest, runtime_class(config.runtime.backend).formats, config.model.artifact)
    api_key(config)
    print(f"config OK: model {manifest.name} v{manifest.version} ({artifact.key}{', DEMO' if manifest.demo else ''}) "
          f"from {directory}; runtime {config.runtime.backend}; store {config.storage.backend} at {config.storage.root}; "
          f"listening on {config.server.host}:{config.server.port}")
    return 0


def serve(config: Config, args: argparse.Namespace) -> int:
    from aiohttp import web

    from .app import create_app

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = args.host or config.server.host
    port = args.port or config.server.port
    key = api_key(config)
    if not key:
        logging.getLogger("appliance").warning("no API key configured: the API is open to anyone who can reach %s:%d", host, port)
    ssl_context = None
    if config.server.tls_cert_file is not None and config.server.tls_key_file is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ssl_context.load_cert_chain(config.server.tls_cert_file, config.server.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            print(f"appliance: error: server.tls_cert_file/tls_key_file: cannot load: {exc}", file=sys.stderr)
            return 1
    app = create_app(config, api_key=key)
    web.run_app(
        app,
        host=host,
        port=port,
        ssl_context=ssl_context,
        shutdown_timeout=config.server.shutdown_timeout_s,
        access_log=logging.getLogger("appliance.access"),
        print=lambda _: logging.getLogger("appliance").info(
            "serving on %s://%s:%d", "https" if ssl_context else "http", host, port
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
