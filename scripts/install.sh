#!/usr/bin/env bash
# Install or uninstall the appliance for production use. `make install`, `make uninstall` and
# the Vagrant test VM's provisioning all run this one script, as root.
#
#   scripts/install.sh install      # or: make install
#   scripts/install.sh uninstall    # or: make uninstall; PURGE=1 also deletes config, keys, store
#
# What `install` does, each step skipped when already done:
#   - apt dependencies (nftables, iproute2, python3-venv, ca-certificates) where apt-get exists;
#   - the package in its own venv, $APPLIANCE_PREFIX/venv, built with a Python >= 3.12;
#   - `appliance` on PATH: a symlink $APPLIANCE_BIN/appliance into that venv;
#   - the unprivileged agent user $APPLIANCE_AGENT_USER;
#   - $APPLIANCE_ETC/appliance.yaml from config/appliance.example.yaml, unless one exists;
#   - the store directory and the CA and signing key, private to root;
#   - the systemd unit for `appliance serve` (installed, not enabled), where systemd exists.
# It writes a manifest of what it created to $APPLIANCE_PREFIX/install-manifest, which
# `uninstall` follows, so a user or config file that existed before is never removed.
#
# Locations (override them to install into another root, as tests/install does):
#   APPLIANCE_PREFIX=/opt/appliance  APPLIANCE_BIN=/usr/local/bin  APPLIANCE_ETC=/etc/appliance
#   APPLIANCE_STORE=/var/lib/appliance  APPLIANCE_SYSTEMD_DIR=/etc/systemd/system
#   APPLIANCE_AGENT_USER=appliance-agent  PYTHON=<a python3.12 or newer>
#   APPLIANCE_SKIP_APT=1 skips the apt step; APPLIANCE_NO_SYSTEMCTL=1 never calls systemctl.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${APPLIANCE_PREFIX:-/opt/appliance}
BIN=${APPLIANCE_BIN:-/usr/local/bin}
ETC=${APPLIANCE_ETC:-/etc/appliance}
STORE=${APPLIANCE_STORE:-/var/lib/appliance}
SYSTEMD_DIR=${APPLIANCE_SYSTEMD_DIR:-/etc/systemd/system}
AGENT_USER=${APPLIANCE_AGENT_USER:-appliance-agent}
APT_PACKAGES="nftables iproute2 python3-venv ca-certificates"
VENV=$PREFIX/venv
MANIFEST=$PREFIX/install-manifest
UNIT=appliance.service

say() { echo "install.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo make $1); the appliance creates network" \
        "namespaces and a root-only store."
}

systemctl_usable() {
    [ -z "${APPLIANCE_NO_SYSTEMCTL:-}" ] && command -v systemctl >/dev/null \
        && [ -d /run/systemd/system ]
}

install_apt_packages() {
    if [ -n "${APPLIANCE_SKIP_APT:-}" ]; then
        return
    fi
    local missing=""
    for package in $APT_PACKAGES; do
        dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
    done
    if [ -z "$missing" ]; then
        return
    fi
    if ! command -v apt-get >/dev/null; then
        die "install these packages with your package manager:$missing"
    fi
    say "installing apt packages:$missing"
    apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
}

install_venv() {
    local python=${PYTHON:-}
    if [ -z "$python" ]; then
        python=$("$REPO/scripts/find-python" 3.12) || die "no Python >= 3.12 found (see above)."
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating the venv $VENV with $python"
        mkdir -p "$PREFIX"
        "$python" -m venv "$VENV"
        echo "venv $VENV" >>"$MANIFEST"
    fi
    say "installing the appliance package into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
    # A copy of the source tree, so the build leaves no egg-info or build/ in the checkout.
    local source
    source=$(mktemp -d)
    tar -C "$REPO" --exclude=./.git --exclude='./.venv*' --exclude=./.mypy_cache \
        --exclude=./.pytest_cache --exclude=./.ruff_cache --exclude=./.hypothesis \
        --exclude='*.egg-info' --exclude=./build -cf - . | tar -C "$source" -xf -
    "$VENV/bin/pip" install -q --disable-pip-version-check "$source"
    rm -rf "$source"
    # The venv holds code run as root: nobody else may change it.
    chown -R root:root "$PREFIX"
    chmod -R go-w "$PREFIX"
}

link_command() {
    mkdir -p "$BIN"
    local link=$BIN/appliance
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$VENV/bin/appliance" ]; then
        return
    fi
    if [ -e "$link" ] || [ -L "$link" ]; then
        die "$link exists and is not this installation's link; remove it or set APPLIANCE_BIN."
    fi
    ln -s "$VENV/bin/appliance" "$link"
    echo "link $link" >>"$MANIFEST"
}

create_agent_user() {
    if id -u "$AGENT_USER" >/dev/null 2>&1; then
        return
    fi
    say "creating the agent user $AGENT_USER"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        "$AGENT_USER"
    echo "user $AGENT_USER" >>"$MANIFEST"
}

install_config() {
    install -d -m 0755 -o root -g root "$ETC"
    # The example is always refreshed beside the live file, which is never overwritten.
    install -m 0644 -o root -g root "$REPO/config/appliance.example.yaml" \
        "$ETC/appliance.example.yaml"
    local config=$ETC/appliance.yaml
    if [ -e "$config" ]; then
        say "keeping the existing $config"
        return
    fi
    sed -e "s|/var/lib/appliance|$STORE|g" -e "s|/etc/appliance/|$ETC/|g" \
        -e "s|^    user: appliance-agent$|    user: $AGENT_USER|" \
        "$REPO/config/appliance.example.yaml" >"$config.partial"
    chmod 0640 "$config.partial"
    mv "$config.partial" "$config"
    echo "config $config $(sha256sum "$config" | cut -d' ' -f1)" >>"$MANIFEST"
    say "wrote $config; edit it to define your agent profiles"
}

create_store_and_keys() {
    local config=$ETC/appliance.yaml
    install -d -m 0700 -o root -g root "$STORE" "$STORE/journal" "$STORE/sessions"
    # The CA the proxy uses, created the way the proxy would (public part: `appliance ca show`).
    "$VENV/bin/appliance" ca show --config "$config" >/dev/null
    # The store's signing key (private, outside the store) and its public half in the store,
    # made by the store's own key generation.
    if "$VENV/bin/appliance" store keygen --help >/dev/null 2>&1; then
        "$VENV/bin/appliance" store keygen --config "$config" >&2
    else
        say "this version has no 'appliance store keygen'; the first sealed session creates" \
            "the signing key"
    fi
}

install_unit() {
    if [ ! -f "$REPO/config/$UNIT" ] || [ ! -d "$(dirname "$SYSTEMD_DIR")" ]; then
        return
    fi
    mkdir -p "$SYSTEMD_DIR"
    sed -e "s|/opt/appliance/venv/bin/appliance|$VENV/bin/appliance|g" \
        -e "s|/etc/appliance/appliance.yaml|$ETC/appliance.yaml|g" \
        "$REPO/config/$UNIT" >"$SYSTEMD_DIR/$UNIT"
    chmod 0644 "$SYSTEMD_DIR/$UNIT"
    grep -qx "unit $SYSTEMD_DIR/$UNIT" "$MANIFEST" 2>/dev/null \
        || echo "unit $SYSTEMD_DIR/$UNIT" >>"$MANIFEST"
    if systemctl_usable; then
        systemctl daemon-reload
    fi
    say "installed $SYSTEMD_DIR/$UNIT; start the shared proxy with: systemctl enable --now $UNIT"
}

do_install() {
    need_root install
    install_apt_packages
    mkdir -p "$PREFIX"
    touch "$MANIFEST"
    chmod 0644 "$MANIFEST"
    install_venv
    link_command
    create_agent_user
    install_config
    create_store_and_keys
    install_unit
    say "installed; check the host with: appliance doctor"
}

# Each manifest line is "KIND PATH-OR-NAME [CHECKSUM]"; undo them in reverse order.
do_uninstall() {
    need_root uninstall
    if [ -f "$MANIFEST" ]; then
        tac "$MANIFEST" | while read -r kind name checksum; do
            case $kind in
                link) [ -L "$name" ] && rm -f "$name" ;;
                user) id -u "$name" >/dev/null 2>&1 && userdel "$name" ;;
                unit)
                    if systemctl_usable; then
                        systemctl disable --now "$(basename "$name")" 2>/dev/null || true
                    fi
                    rm -f "$name"
                    if systemctl_usable; then systemctl daemon-reload; fi ;;
                config)
                    if [ -z "${PURGE:-}" ] && [ -f "$name" ] \
                            && [ "$(sha256sum "$name" | cut -d' ' -f1)" != "$checksum" ]; then
                        say "keeping $name: it was edited after installation"
                    else
                        rm -f "$name"
                    fi ;;
                venv) ;;  # Removed with the prefix below.
            esac
        done
    else
        say "no manifest at $MANIFEST; removing only the venv and the command link"
        [ -L "$BIN/appliance" ] && [ "$(readlink "$BIN/appliance")" = "$VENV/bin/appliance" ] \
            && rm -f "$BIN/appliance"
    fi
    rm -f "$ETC/appliance.example.yaml"
    rm -rf "$PREFIX"
    if [ -n "${PURGE:-}" ]; then
        say "PURGE=1: deleting $ETC (configuration, CA, signing key) and the store $STORE"
        rm -rf "$ETC" "$STORE"
    else
        rmdir "$ETC" 2>/dev/null || true
        say "kept the store $STORE and the CA and keys in $ETC; PURGE=1 deletes them"
    fi
    say "uninstalled"
}

case ${1:-} in
    install) do_install ;;
    uninstall) do_uninstall ;;
    *) echo "usage: $0 install|uninstall" >&2; exit 2 ;;
esac
