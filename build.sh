#!/usr/bin/env bash
# edgepin: the single entry point for building, testing and running the test bed.
# Run `./build.sh --help` for the subcommands.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${EDGEPIN_VENV:-$ROOT/.venv}"
SVC_VENV="${EDGEPIN_SERVICES_VENV:-$ROOT/.venv-services}"
PYTHON="${EDGEPIN_PYTHON:-python3}"
export EDGEPIN_SERVICES_VENV="$SVC_VENV"

# Debian packages the build, the test bed and the tests need on the build host.
APT_PACKAGES=(
    # test bed: TPM, libvirt, QEMU
    swtpm swtpm-tools tpm2-tools libtss2-dev
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
    qemu-system-x86 qemu-utils ovmf
    # tiny guest and NoCloud seed images, built without mounting anything
    busybox-static syslinux syslinux-common mtools dosfstools fdisk cpio
    # building the Python bindings (tpm2-pytss, libvirt-python)
    pkg-config gcc
    openssl curl ca-certificates
)

usage() {
    cat <<'EOF'
Usage: ./build.sh [COMMAND] [ARGS...]

Commands:
  image                    build the host image into out/ (the default)
  test [PYTEST ARGS...]    install what the tests need, run ruff, mypy and the whole
                           pytest suite; pass pytest arguments to select, e.g.
                           ./build.sh test -m unit
  controlplane up|down|status [--http] [--run-dir DIR]
                           run the test bed's Keystone, Glance and Barbican by hand
                           (on loopback, HTTPS with a CA made for the run)
  bench [ARGS...]          run the benchmarks (benchmarks/, issue 8): prints a table of
                           ratios against baselines measured in the same run, writes JSON
  setup                    only install what is missing (apt packages, venvs)
  -h, --help               show this help

Environment:
  EDGEPIN_VENV             project venv (default .venv)
  EDGEPIN_SERVICES_VENV    OpenStack services venv (default .venv-services)
  EDGEPIN_PYTHON           Python used to create the venvs (default python3, >= 3.11)
  CI                       when set, a test run fails if any test was skipped

Every command installs what is missing first and is idempotent: a second run
installs nothing.
EOF
}

# pip, quietly: this host's pip configuration names index folders that may not
# exist, and pip warns about each of them for every package
pip_q() {
    local py="$1"; shift
    local rc=0
    "$py" -m pip -q "$@" 2> >(grep -v "^WARNING: Location '" >&2) || rc=$?
    return "$rc"
}

log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

# --------------------------------------------------------------------- setup

ensure_apt() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        [[ "$p" == \#* ]] && continue
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$p")
        fi
    done
    ((${#missing[@]} == 0)) && return 0
    if [[ $(id -u) -ne 0 ]]; then
        die "missing Debian packages; as root run: apt-get install --no-install-recommends ${missing[*]}"
    fi
    log "installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_venv DIR REQUIREMENTS STAMP_INPUTS... : (re)build a venv when its inputs changed
ensure_venv() {
    local dir="$1" req="$2"; shift 2
    local stamp want
    want="$(cat "$req" "$@" | sha256sum | cut -d' ' -f1)"
    stamp="$dir/.edgepin-stamp"
    if [[ -x "$dir/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is older than 3.11; set EDGEPIN_PYTHON"
    log "creating venv $dir from ${req#"$ROOT"/}"
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    pip_q "$dir/bin/python" install --upgrade pip
    pip_q "$dir/bin/python" install -r "$req"
    echo "$want" >"$stamp"
}

ensure_project_venv() {
    ensure_venv "$VENV" "$ROOT/tests/requirements/dev.txt" "$ROOT/pyproject.toml"
    # the package itself, editable, so tests run the code in the tree
    if ! "$VENV/bin/python" -c 'import provisioner, sys; sys.exit(not provisioner.__file__.startswith(sys.argv[1]))' "$ROOT" 2>/dev/null \
        || [[ ! -x "$VENV/bin/edgepin" ]]; then
        log "installing edgepin (editable) into $VENV"
        pip_q "$VENV/bin/python" install --no-deps -e "$ROOT"
    fi
}

ensure_services_venv() {
    ensure_venv "$SVC_VENV" "$ROOT/tests/requirements/services.txt"
}

setup() {
    ensure_apt
    ensure_project_venv
    ensure_services_venv
}

# ------------------------------------------------------------------ commands

cmd_image() {
    setup
    die "the host image is not built yet: diskimage-builder elements come with the host image issue (#5)"
}

cmd_test() {
    setup
    cd "$ROOT"
    local start=$SECONDS
    log "ruff check"
    "$VENV/bin/ruff" check .
    log "ruff format --check"
    "$VENV/bin/ruff" format --check .
    log "mypy --strict provisioner/"
    "$VENV/bin/mypy" --strict provisioner/
    log "pytest $*"
    local rc=0
    "$VENV/bin/python" -m pytest "$@" || rc=$?
    if ((rc == 5)); then
        die "pytest collected no tests (exit 5): that is a failure, not a pass"
    fi
    log "tests finished in $((SECONDS - start)) s (exit $rc)"
    return "$rc"
}

cmd_controlplane() {
    ensure_apt
    ensure_project_venv
    ensure_services_venv
    cd "$ROOT"
    "$VENV/bin/python" -m tests.testbed.controlplane "$@"
}

cmd_bench() {
    setup
    cd "$ROOT"
    "$VENV/bin/python" -m benchmarks "$@"
}

main() {
    local cmd="${1:-image}"
    [[ $# -gt 0 ]] && shift
    case "$cmd" in
        -h | --help | help) usage ;;
        image) cmd_image "$@" ;;
        test) cmd_test "$@" ;;
        controlplane) cmd_controlplane "$@" ;;
        bench) cmd_bench "$@" ;;
        setup) setup ;;
        *) usage >&2; die "unknown command: $cmd" ;;
    esac
}

main "$@"
