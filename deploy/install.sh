#!/usr/bin/env bash
# Install, upgrade or remove the appliance as a systemd service (Debian/Ubuntu).
#
#   sudo deploy/install.sh --model DIR    install or upgrade, serving the model directory DIR
#   sudo deploy/install.sh --demo         ... serving the demo model (models/demo, built with torch if missing)
#   sudo deploy/install.sh                upgrade: new code and units; config, data, outbox and model kept
#   sudo deploy/install.sh --remove       stop and remove the program; config and data kept
#   sudo deploy/install.sh --remove --purge   ... and delete config, credentials, data and cache
#
# Options: --convert also installs the convert extra (torch; large download).
# HTTPS: the first install makes /etc/appliance/tls.crt and its key
# (/etc/credstore/appliance.tls.key), self-signed for this box's host names and
# addresses; upgrades keep them and print the SHA-256 fingerprint phones pin.
#   --tls-name NAME           also certify NAME (a DNS name or IP address; repeat)
#   --tls-ca CERT --tls-ca-key KEY   sign it with the clinic's own CA instead
#                             (PEM files; re-issues the certificate on every run)
# Environment: PREFIX (default /opt/appliance) for the program; DESTDIR to
# install into a scratch root (packaging, tests: systemd is then left alone);
# PYTHON (default python3); WHEELHOUSE, a directory of wheels to install from
# with no index (an offline box: `pip wheel . -w wheelhouse` on a connected
# one, copy it over); PIP_ARGS, extra arguments for pip.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/appliance}
DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-python3}
PIP_ARGS=${PIP_ARGS:-}
WHEELHOUSE=${WHEELHOUSE:-}
# Where everything lands; the unit, sysusers file and config refer to these.
ROOT=${DESTDIR%/}
VENV=$ROOT$PREFIX/venv
UNIT_DIR=$ROOT/usr/local/lib/systemd/system
SYSUSERS_DIR=$ROOT/usr/local/lib/sysusers.d
CONFIG_DIR=$ROOT/etc/appliance
CREDSTORE=$ROOT/etc/credstore
STATE_DIR=$ROOT/var/lib/appliance
CACHE_DIR=$ROOT/var/cache/appliance
MODELS_DIR=$STATE_DIR/models

MODEL="" DEMO=0 CONVERT=0 REMOVE=0 PURGE=0 TLS_CA="" TLS_CA_KEY=""
TLS_NAMES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL=${2:?--model needs a directory}; shift ;;
        --demo) DEMO=1 ;;
        --convert) CONVERT=1 ;;
        --tls-name) TLS_NAMES+=("${2:?--tls-name needs a name}"); shift ;;
        --tls-ca) TLS_CA=${2:?--tls-ca needs a PEM file}; shift ;;
        --tls-ca-key) TLS_CA_KEY=${2:?--tls-ca-key needs a PEM file}; shift ;;
        --remove) REMOVE=1 ;;
        --purge) PURGE=1 ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

# systemctl and friends only act on the running system, never on a scratch root.
manage_systemd() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; }

if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo), or set DESTDIR to install into a scratch root"
fi
[ "$PURGE" = 1 ] && [ "$REMOVE" = 0 ] && die "--purge goes with --remove"
if { [ -n "$TLS_CA" ] && [ -z "$TLS_CA_KEY" ]; } || { [ -z "$TLS_CA" ] && [ -n "$TLS_CA_KEY" ]; }; then
    die "--tls-ca and --tls-ca-key go together"
fi

remove() {
    if manage_systemd; then
        systemctl disable --now appliance.service 2>/dev/null || true
    fi
    rm -f "$UNIT_DIR/appliance.service" "$SYSUSERS_DIR/appliance.conf"
    rm -rf "$ROOT$PREFIX"
    if [ "$PURGE" = 1 ]; then
        rm -rf "$CONFIG_DIR" "$STATE_DIR" "$CACHE_DIR"
        rm -f "$CREDSTORE"/appliance.*
        say "removed the appliance, its config, credentials, data and cache (the system user 'appliance' stays, as is usual)"
    else
        say "removed the program; kept $CONFIG_DIR, $STATE_DIR (data, outbox, models) and $CREDSTORE/appliance.*"
    fi
    if manage_systemd; then systemctl daemon-reload; fi
}

install_program() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "Python 3.10 or newer is needed; $PYTHON is $("$PYTHON" -V 2>&1)"
    if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        [ -z "$DESTDIR" ] && command -v apt-get >/dev/null || die "the venv module is missing; install python3-venv"
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    fi
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    local wheels=$WHEELHOUSE index="" extra=""
    if [ -z "$wheels" ]; then
        # Build the wheel from a copy: pip would otherwise write build/ into the checkout.
        wheels=$(mktemp -d)
        cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/appliance" "$SRC/convert" "$wheels/"
        find "$wheels" -name __pycache__ -prune -exec rm -rf {} +
        "$VENV/bin/python" -m pip wheel -q --no-deps -w "$wheels" "$wheels" >/dev/null
    else
        index=--no-index
    fi
    [ "$CONVERT" = 1 ] && extra="[convert]"
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
    "$VENV/bin/python" -m pip install -q --upgrade $index --find-links "$wheels" $PIP_ARGS "derm-appliance$extra"
    # The same version number can carry new code (a re-run from a newer checkout).
    "$VENV/bin/python" -m pip install -q --force-reinstall --no-deps --no-index --find-links "$wheels" derm-appliance
    [ -n "$WHEELHOUSE" ] || rm -rf "$wheels"
    install -d "$ROOT$PREFIX/docs"
    install -m 0644 "$SRC/README.md" "$ROOT$PREFIX/README.md"
    install -m 0644 "$SRC"/docs/*.md "$ROOT$PREFIX/docs/" 2>/dev/null || true
}

install_units() {
    install -d "$UNIT_DIR" "$SYSUSERS_DIR"
    # The unit names /opt/appliance; a different PREFIX is written into the copy.
    sed "s|/opt/appliance|$PREFIX|g" "$SRC/systemd/appliance.service" > "$UNIT_DIR/appliance.service"
    chmod 0644 "$UNIT_DIR/appliance.service"
    install -m 0644 "$SRC/systemd/appliance.sysusers" "$SYSUSERS_DIR/appliance.conf"
}

install_config() {
    install -d -m 0755 "$CONFIG_DIR"
    if [ -e "$CONFIG_DIR/config.toml" ]; then
        say "kept $CONFIG_DIR/config.toml"
    else
        install -m 0644 "$SRC/systemd/config.toml" "$CONFIG_DIR/config.toml"
        say "wrote $CONFIG_DIR/config.toml"
    fi
    install -d -m 0700 "$CREDSTORE"
    if [ ! -e "$CREDSTORE/appliance.api-keys" ]; then
        # One key for the clinic's phones; add lines (name:key, or name:key:admin / name:key:metrics) for other clients.
        (umask 077; echo "phones:$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))')" \
            > "$CREDSTORE/appliance.api-keys")
        say "made an API key for the phones: $CREDSTORE/appliance.api-keys (send it as X-API-Key)"
    fi
}

# The names phones may use for this box: its host names and its addresses.
box_names() {
    local host
    host=$(hostname)
    printf '%s\n' "$host" "$host.local" "$(hostname -f 2>/dev/null || true)" localhost
    hostname -I 2>/dev/null | tr ' ' '\n'
    printf '%s\n' 127.0.0.1 ::1
}

install_certificate() {
    local cert=$CONFIG_DIR/tls.crt key=$CREDSTORE/appliance.tls.key fingerprint
    local tls=("$VENV/bin/python" -m appliance.security.tls)
    if [ -e "$cert" ] && [ -z "$TLS_CA" ]; then
        fingerprint=$("$VENV/bin/python" -c 'import sys; from appliance.security.tls import fingerprint_sha256 as f
print(f(sys.argv[1]))' "$cert")
        say "kept the certificate $cert (SHA-256 $fingerprint)"
        return
    fi
    local args=(--cert "$cert" --key "$key") name
    while read -r name; do
        [ -n "$name" ] && args+=(--name "$name")
    done < <(printf '%s\n' "${TLS_NAMES[@]}"; box_names)
    [ -n "$TLS_CA" ] && args+=(--ca-cert "$TLS_CA" --ca-key "$TLS_CA_KEY")
    fingerprint=$("${tls[@]}" "${args[@]}") || die "could not make the TLS certificate"
    chmod 0644 "$cert"
    say "made the TLS certificate $cert ($([ -n "$TLS_CA" ] && echo "signed by $TLS_CA" || echo self-signed)); \
phones pin its SHA-256 fingerprint: $fingerprint"
}

install_model() {
    install -d -m 0700 "$STATE_DIR"
    install -d -m 0755 "$MODELS_DIR"
    local source=""
    if [ -n "$MODEL" ]; then
        source=$MODEL
    elif [ "$DEMO" = 1 ]; then
        source=$SRC/models/demo
        if [ ! -f "$source/1/model.json" ]; then
            "$VENV/bin/python" -c 'import torch' 2>/dev/null \
                || die "--demo: models/demo is not built and torch is missing; run ./dev demo once, or add --convert"
            "$VENV/bin/python" -m convert demo --out "$SRC/models"
        fi
    fi
    if [ -z "$source" ]; then
        [ -e "$MODELS_DIR/current" ] && { say "kept the model $(readlink "$MODELS_DIR/current")"; return; }
        say "no model yet: run again with --model DIR (a directory made by python -m convert) or --demo"
        return
    fi
    [ -d "$source" ] || die "--model $source: not a directory"
    # A version directory (holding model.json) is kept under its model's name.
    local name
    if [ -f "$source/model.json" ]; then
        name=$(basename "$(dirname "$(cd "$source" && pwd)")")
    else
        name=$(basename "$(cd "$source" && pwd)")
    fi
    local target=$MODELS_DIR/$name
    if [ -f "$source/model.json" ]; then target=$target/$(basename "$source"); fi
    rm -rf "$target.new"
    mkdir -p "$(dirname "$target")"
    cp -r "$source" "$target.new"
    rm -rf "$target" && mv "$target.new" "$target"
    ln -sfn "$name" "$MODELS_DIR/current"
    say "model $name installed in $MODELS_DIR/$name (models/current points at it)"
}

start() {
    if ! manage_systemd; then
        say "installed into ${DESTDIR:-/}; systemd not managed here (DESTDIR set or systemd not running)"
        return
    fi
    systemd-sysusers appliance.conf
    systemctl daemon-reload
    systemctl enable appliance.service
    # restart, not start: an upgrade must replace the running process. With
    # Type=notify this returns once the service is ready, or fails.
    if systemctl restart appliance.service; then
        say "running: $(systemctl show -p StatusText --value appliance.service)"
    else
        systemctl status --no-pager appliance.service || true
        die "the service did not start; see journalctl -u appliance"
    fi
}

if [ "$REMOVE" = 1 ]; then
    remove
else
    install_program
    install_units
    install_config
    install_certificate
    install_model
    start
fi
