"""The `appliance` command: serve, reload, check-config, sync, import-legacy, migrate-store, convert."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .config import Config, load_config
from .errors import ApplianceError, ConfigError
from .storage import BACKENDS

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
    serve.add_argument("--log-format", default="json", choices=["json", "text"],
                       help="json: one JSON object a line, one line per request (default); text: for a terminal")
    serve.add_argument("--insecure", action="store_true",
                       help="serve a non-loopback address without any API key (same as server.allow_insecure)")

    reload = commands.add_parser(
        "reload",
        help="make the running server re-read its model directory and swap in the version it names",
        description="Send SIGHUP to the running `appliance serve`, found by its pid file appliance.pid in "
        "storage.root (written while it serves) or given with --pid. The server re-reads [model] from its config "
        "file (model.pin_version), loads, verifies, warms up and self-checks that version while the current one "
        "serves, then swaps; a version that fails is refused and the current one keeps serving. The outcome is in "
        "the server's log, /v1/info (model.last_reload) and the status page. Under systemd use "
        "`systemctl reload appliance` (ExecReload= signals the service's MAINPID).",
    )
    reload.add_argument("--config", metavar="PATH", help=DEFAULT_CONFIG_HELP)
    reload.add_argument("--pid", type=int, help="the server's process id (default: read from the pid file)")

    check = commands.add_parser(
        "check-config",
        help="validate the configuration and the model directory, then exit",
        description="Parse the config with every override applied, resolve the model directory and read its "
        "manifest, load the TLS certificate and key; print a summary (with the certificate's SHA-256 fingerprint, for "
        "phones to pin) and exit 0, or one line naming the problem and exit 1. Fit for ExecStartPre=.",
    )
    check.add_argument("--config", metavar="PATH", help=DEFAULT_CONFIG_HELP)

    legacy = commands.add_parser(
        "import-legacy",
        help="import the old back end's storage root (plain or encrypted) into the configured store",
        description="Read STORAGE_ROOT in the old back end's layout (<user>/<image_id>.jpg or .bin, metadata.jsonl, "
        "case_counter.json) and store its images, image records, case records and case counters in the configured "
        "store through the Store API. Idempotent: images and cases the store already has are skipped, counters "
        "are only raised. Prints the counts and every line or file it could not read (path:line and why). "
        "Exit status: 0 when everything was read, 1 when anything could not be (or on an error). "
        "With an encrypted store, what is imported is written in format v2 (bound to its user and record); "
        "--reencrypt then also rewrites everything the store already held in the old format v1 as v2 (STORAGE_ROOT "
        "may then be left out). Stop the server first: the store is locked while it runs.",
    )
    legacy.add_argument("storage_root", metavar="STORAGE_ROOT", nargs="?",
                        help="the old back end's STORAGE_ROOT (optional with --reencrypt)")
    legacy.add_argument("--reencrypt", action="store_true",
                        help="afterwards rewrite every record and image of the configured (encrypted) store in "
                        "format v2, whose associated data binds each to its user and image or case id")
    legacy.add_argument("--config", metavar="PATH", help=DEFAULT_CONFIG_HELP)
    legacy.add_argument("--key-file", metavar="PATH", type=Path,
                        help="file holding the old store's key (URL-safe base64), when it was encrypted; "
                        "default: DATA_ENCRYPTION_KEY, DATA_ENCRYPTION_KEY_FILE, then the configured key")

    migrate = commands.add_parser(
        "migrate-store",
        help="copy the configured store into another back end (idempotent, resumable)",
        description="Copy every user's images (bytes and records), case records and case-id counters from the "
        "configured store into the back end --to names, configured by the same [storage] section with its back "
        "end (and --to-root) replaced; a postgres target takes its database from DATABASE_URL or "
        "storage.database_url. Idempotent and resumable: images the target already holds are skipped, case "
        "records it holds unchanged are skipped and others upserted (keeping created_at), counters are only "
        "raised. Prints the counts (copied, already there, per kind) and exits 0; 1 when anything could not be "
        "copied (printed) or on an error. Stop the server first: the store is locked while it runs.",
    )
    migrate.add_argument("--to", required=True, metavar="BACKEND", choices=sorted(BACKENDS),
                         help=f"the target back end: {', '.join(sorted(BACKENDS))}")
    migrate.add_argument("--to-root", metavar="DIR", type=Path,
                         help="the target's storage root (default: storage.root; needed between sqlite and disk, "
                         "which each lock their root)")
    migrate.add_argument("--images-to-bucket", action="store_true",
                         help="put the images at storage.images_url (a back end keeping records apart from images, "
                         "such as postgres); default: files under the target's root")
    migrate.add_argument("--config", metavar="PATH", help=DEFAULT_CONFIG_HELP)

    sync = commands.add_parser(
        "sync",
        help="drain the sync outbox once (--once), show its status (status), or retry its dead letters (retry)",
        description="`appliance sync --once` uploads every waiting job now (ignoring retry times) and exits 0 when "
        "the outbox is empty, 1 at the first upload that fails (printed). Stop the server first: the store is "
        "locked while it runs. `appliance sync status` prints the backlog, oldest pending, bytes pending and last "
        "error as JSON, read-only (works while the server runs). `appliance sync retry` makes every dead letter (a "
        "job that failed sync.max_attempts times) due again with a fresh attempt count (works while the server runs).",
    )
    sync.add_argument("action", nargs="?", choices=["status", "retry"],
                      help="status: show the outbox's status; retry: retry its dead letters")
    sync.add_argument("--once", action="store_true", help="drain until empty (exit 0) or an error (exit 1)")
    sync.add_argument("--config", metavar="PATH", help=DEFAULT_CONFIG_HELP)

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
        if args.command == "reload":
            from .process.pidfile import pid_file, signal_server

            pid = signal_server(pid_file(config.storage.root), args.pid)
            print(f"sent SIGHUP to the server (pid {pid}): it reloads the model in the background; the outcome is "
                  "in its log and in /v1/info (model.last_reload)")
            return 0
        if args.command == "import-legacy":
            return import_legacy(config, args)
        if args.command == "migrate-store":
            return migrate_store(config, args)
        if args.command == "sync":
            from .sync.commands import sync_command

            return sync_command(config.storage, config.sync, config.bucket, status=args.action == "status",
                                once=args.once, retry=args.action == "retry")
        return serve(config, args)
    except ApplianceError as exc:
        print(f"appliance: error: {exc.detail}", file=sys.stderr)
        return 1


def import_legacy(config: Config, args: argparse.Namespace) -> int:
    """`appliance import-legacy`: print counts and unreadable lines; 0 only when everything was read."""
    from .legacy import import_legacy as run_import
    from .legacy import source_sealer
    from .storage import open_configured_store

    if args.storage_root is None and not args.reencrypt:
        raise ConfigError("appliance import-legacy: give STORAGE_ROOT, --reencrypt, or both")
    if args.reencrypt and not config.storage.encrypt:
        raise ConfigError("appliance import-legacy --reencrypt: storage.encrypt (ENCRYPT_STORAGE) is off")
    sealer = source_sealer(args.key_file, config.storage.key_file)
    store = open_configured_store(config.storage, outbox=config.sync.enabled, bucket=config.bucket)
    problems: list[str] = []
    try:
        if args.storage_root is not None:
            report = run_import(
                Path(args.storage_root), store, sealer=sealer, strip_metadata=config.privacy.strip_metadata_on_store
            )
            problems = report.problems
            for problem in problems:
                print(f"appliance: cannot read {problem}", file=sys.stderr)
            print(f"imported {args.storage_root} into {config.storage.backend} store {config.storage.root}: "
                  f"{report.summary()}")
        if args.reencrypt:
            count = store.reseal()
            print(f"re-encrypted {count} records and image files of {config.storage.root} in format v2")
    finally:
        store.close()
    return 1 if problems else 0


def migrate_store(config: Config, args: argparse.Namespace) -> int:
    """`appliance migrate-store`: copy the configured store into --to; 0 when everything was copied."""
    from .storage import open_configured_store, takes_images
    from .storage.images import check_images
    from .storage.migrate import migrate

    source = config.storage
    target = dataclasses.replace(source, backend=args.to, root=args.to_root or source.root,
                                 images="bucket" if args.images_to_bucket else "local")
    if (target.backend, Path(target.root).resolve()) == (source.backend, Path(source.root).resolve()):
        raise ConfigError(f"--to, --to-root: that is the configured store itself ({source.backend} at "
                          f"{source.root}); name another back end or root")
    if args.images_to_bucket:
        if not takes_images(args.to):
            raise ConfigError(f"--images-to-bucket: the {args.to} back end keeps its images beside its records; "
                              "only one keeping them apart (postgres) puts them at storage.images_url")
        try:
            check_images(target)
        except ConfigError as e:
            raise ConfigError(f"--images-to-bucket: {e.detail}") from None
    from_store = open_configured_store(source, outbox=False, bucket=config.bucket)
    try:
        try:
            # With sync on, what is copied is announced again: uploads overwrite by key, and nothing the
            # source had not yet forwarded is lost.
            to_store = open_configured_store(target, outbox=config.sync.enabled, bucket=config.bucket)
        except ApplianceError as e:
            raise ConfigError(f"--to {args.to}, --to-root {target.root}: {e.detail}") from None
        try:
            report = migrate(from_store, to_store)
        finally:
            to_store.close()
    finally:
        from_store.close()
    for problem in report.problems:
        print(f"appliance: cannot copy {problem}", file=sys.stderr)
    images = f" (images at {target.images_url})" if args.images_to_bucket else ""
    print(f"copied {source.backend} store {source.root} into {target.backend} store {target.root}{images}: "
          f"{report.summary()}")
    return 1 if report.problems else 0


def check_config(config: Config) -> int:
    """Validate what start-up would, short of loading the model; fit for ExecStartPre=."""
    from .config import wanted_path
    from .inference.model import choose, read_manifest, resolve_model_dir
    from .inference.runtimes import runtime_class
    from .modelfetch import cached_model_dir
    from .security.auth import load_api_keys, tls_context
    from .security.tls import fingerprint_sha256
    from .storage import describe_configured
    from .storage.crypto import load_sealer

    keys = load_api_keys(config.auth)
    tls_context(config.server)  # an unreadable key, or one not matching the certificate, fails here
    load_sealer(config.storage.encrypt, config.storage.key_file)  # a missing or malformed key fails here
    if config.model.url:
        # Fetched and verified at start; the network is not asked here. Check the cached copy if any.
        directory = cached_model_dir(config.model.url, Path(config.model.cache_dir))
        origin = f"{config.model.url} (fetched at start; {'cached at ' + str(directory) if directory else 'nothing cached yet'})"
    else:
        directory = resolve_model_dir(config.model.path, config.model.pin_version)
        origin = str(directory)
    model = "model not checked"
    if directory is not None:
        manifest = read_manifest(directory, config.model.trusted_keys)  # an unsigned model fails here too
        choice = choose(manifest, wanted_path(config), runtime_class(config.runtime.backend).formats)
        model = f"model {manifest.name} v{manifest.version} ({choice.path.key}{', DEMO' if manifest.demo else ''})"
    tls = config.server.tls_cert_file
    scheme = f"https (certificate SHA-256 {fingerprint_sha256(tls)})" if tls else "http"
    print(f"config OK: {model} from {origin}; runtime {config.runtime.backend}; "
          f"store {describe_configured(config.storage)}; "
          f"listening on {config.server.host}:{config.server.port} over {scheme}; "
          f"{'API keys ' + keys.describe() if keys else 'API open (no keys)'}")
    return 0


def serve(config: Config, args: argparse.Namespace) -> int:
    from .app import create_app
    from .process import pidfile, systemd
    from .ops.logs import configure_logging
    from .process.serving import run_until_stopped
    from .security.auth import is_loopback, load_api_keys, tls_context
    from .security.exposure import check_exposure
    from .security.limits import server_options

    configure_logging(args.log_level, args.log_format)
    host = args.host or config.server.host
    port = args.port or config.server.port
    check_exposure(config.server, host)  # again: --host may widen what the config allowed
    keys = load_api_keys(config.auth)
    if not keys and not is_loopback(host) and not (args.insecure or config.server.allow_insecure):
        raise ConfigError(f"refusing to serve {host}:{port} without an API key: set [auth] keys_file, API_KEY or "
                          "the api-keys credential, or pass --insecure (server.allow_insecure = true)")
    if keys:
        logging.getLogger("appliance").info("API keys required: %s (from %s)", keys.describe(),
                                            ", ".join(keys.sources))
    else:
        logging.getLogger("appliance").warning("no API key configured: the API is open to anyone who can reach %s:%d",
                                               host, port)
    ssl_context = tls_context(config.server)
    app = create_app(config, api_keys=keys, config_path=_config_path(args.config))
    service = systemd.attach(app)  # READY=1, STATUS=, WATCHDOG=1, STOPPING=1 under systemd; else no-op
    url = f"{'https' if ssl_context else 'http'}://{host}:{port}"

    def serving() -> None:
        # Called once every socket is bound: the moment /ready can answer 200.
        logging.getLogger("appliance").info("serving on %s", url)
        service.serving(url)

    with pidfile.written(pidfile.pid_file(config.storage.root)):  # for `appliance reload`
        run_until_stopped(app, host=host, port=port, ssl_context=ssl_context,
                          shutdown_timeout_s=config.server.shutdown_timeout_s, on_serving=serving,
                          server_options=server_options(config.server))
    return 0


if __name__ == "__main__":
    sys.exit(main())
