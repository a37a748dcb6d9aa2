#!/usr/bin/env bash
# edgepin: the single entry point for building, testing and running the test bed.
# Run `./build.sh --help` for the subcommands.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${EDGEPIN_VENV:-$ROOT/.venv}"
SVC_VENV="${EDGEPIN_SERVICES_VENV:-$ROOT/.venv-services}"
PYTHON="${EDGEPIN_PYTHON:-python3}"
export EDGEPIN_SERVICES_VENV="$SVC_VENV"
CEPH_SVC_VENV="${EDGEPIN_SERVICES_CEPH_VENV:-$ROOT/.venv-services-ceph}"
export EDGEPIN_SERVICES_CEPH_VENV="$CEPH_SVC_VENV"

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
    openssl curl ca-certificates time
    # the test bed's cache (Keystone, and the token caches of Glance and Barbican)
    memcached
    # the Ceph tier: a single-node cluster under Glance (tests/testbed/ceph.py)
    ceph-mon ceph-mgr ceph-osd ceph-common python3-rados python3-rbd
)

# ... and what ./build.sh image needs on the build host (diskimage-builder's tools)
IMAGE_APT_PACKAGES=(
    debootstrap sudo uuid-runtime parted gdisk dosfstools mtools kpartx
    squashfs-tools qemu-utils jq
    # sealing the root with dm-verity (veritysetup on loop devices, no device-mapper)
    cryptsetup-bin
)

usage() {
    cat <<'EOF'
Usage: ./build.sh [COMMAND] [ARGS...]

Commands:
  image [OPTIONS]          build the host image into out/ (the default);
                           ./build.sh image --help for its options
  test [PYTEST ARGS...]    install what the tests need, run ruff, mypy and the whole
                           pytest suite (the image tier in a second session beside
                           the others, its output in out/test-image.log, and its
                           second build for the reproducibility check as soon as
                           the first is done, in out/test-image-repro.log, and its
                           SeaBIOS boot once the others are done, in
                           out/test-image-bios.log); pass pytest
                           arguments to run one session of your selection, e.g.
                           ./build.sh test -m unit
  controlplane up|down|status [OPTIONS]
                           run the test bed's Keystone, Glance and Barbican by hand
                           (on loopback, HTTPS with a CA made for the run);
                           ./build.sh controlplane --help for its options
  bench [ARGS...]          run the benchmarks (benchmarks/): prints a table of ratios
                           against baselines measured in the same run, writes JSON;
                           ./build.sh bench --help for its options
  demo [--down]            edgepin end to end here: control plane, host image, a
                           published guest, an enrolled node booted in QEMU; --down
                           stops and removes it all
  setup                    only install what is missing (apt packages, venvs)
  -h, --help               show this help

Environment:
  EDGEPIN_VENV             project venv (default .venv)
  EDGEPIN_SERVICES_VENV    OpenStack services venv (default .venv-services)
  EDGEPIN_SERVICES_CEPH_VENV  the same for the Ceph tier (default .venv-services-ceph)
  EDGEPIN_PYTHON           Python used to create the venvs (default python3, >= 3.11)
  CI                       when set, a test run fails if any test was skipped
  EDGEPIN_TEST_RUN_DIR     where a test session keeps what it makes (default: a pytest
                           temporary folder); ./build.sh test with no argument gives
                           the image tier its image/, its SeaBIOS boot bios/ and the
                           others other/
  EDGEPIN_CACHE_DIR        what tests keep between runs (default .cache): the image
                           tier's image is built into image-tier/out/ there

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
# a systemd time span (systemd.time(7)): numbers with units, such as 1h, 15min or "1h 30min"
timespan() {
    local unit='(usec|us|msec|ms|seconds|second|sec|s|minutes|minute|min|m|hours|hour|hr|h|days|day|d|weeks|week|w)'
    [[ "$1" =~ ^([0-9]+(\.[0-9]+)?\ ?$unit?\ ?)+$ ]]
}

# --------------------------------------------------------------------- setup

ensure_apt() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}" "$@"; do
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

# the Ceph tier's services: glance_store's RBD driver needs python3-rados/python3-rbd,
# which exist only for the system Python; same requirements as .venv-services
ensure_ceph_venv() {
    local dir="$CEPH_SVC_VENV" req="$ROOT/tests/requirements/services.txt" want
    want="$(sha256sum <"$req" | cut -d' ' -f1) system-site"
    if [[ -x "$dir/bin/python" && "$(cat "$dir/.edgepin-stamp" 2>/dev/null)" == "$want" ]]; then
        return 0
    fi
    log "creating venv $dir (/usr/bin/python3 + system rados/rbd) from ${req#"$ROOT"/}"
    rm -rf "$dir"
    /usr/bin/python3 -m venv --system-site-packages "$dir"
    pip_q "$dir/bin/python" install --upgrade pip
    pip_q "$dir/bin/python" install -r "$req"
    "$dir/bin/python" -c 'import rados, rbd' || die "python3-rados/python3-rbd missing in $dir"
    echo "$want" >"$dir/.edgepin-stamp"
}

ensure_dib_venv() {
    ensure_venv "$ROOT/.venv-dib" "$ROOT/elements/build-requirements.txt"
}

# the node's libraries at Debian trixie's versions, importable over the project venv with
# PYTHONPATH (tests/integration/test_debian_libs.py)
ensure_trixie_libs() {
    local dir="$ROOT/.venv-trixie-libs" req="$ROOT/tests/requirements/debian-trixie.txt" want
    want="$(sha256sum <"$req" | cut -d' ' -f1)"
    if [[ -f "$dir/.edgepin-stamp" && "$(cat "$dir/.edgepin-stamp")" == "$want" ]]; then
        return 0
    fi
    log "installing Debian trixie's node libraries into $dir"
    rm -rf "$dir"
    pip_q "$VENV/bin/python" install --no-deps --target "$dir" -r "$req"
    echo "$want" >"$dir/.edgepin-stamp"
}

# everything: the tests build and boot the host image too
setup() {
    ensure_apt "${IMAGE_APT_PACKAGES[@]}"
    ensure_project_venv
    ensure_services_venv
    ensure_ceph_venv
    ensure_dib_venv
    ensure_trixie_libs
}

# ------------------------------------------------------------------ commands

# ---------------------------------------------------------------- host image

image_usage() {
    cat <<'EOF'
Usage: ./build.sh image [OPTIONS]

Build the edgepin host image with diskimage-builder from the elements in elements/.

Options:
  --release NAME           Debian release (default trixie; bookworm works too)
  --ca FILE                control plane CA bundle the node pins (/etc/edgepin/ca.pem)
  --signing-cert FILE      image-signing certificate the node pins; repeat for several
  --assignment-cert FILE   assignment-signing certificate the node pins; repeat for
                           several (with none, the image-signing certificates sign
                           assignments too)
  --pcrs LIST              PCRs to seal to (default 4,7,8,9)
  --release-key FILE       public release key (PEM, ECDSA P-256, from `edgepin release
                           key`) the node pins: what it seals then also opens in any
                           measured state the key approved (a host update), not only in
                           the one it was sealed in (default: none)
  --reserved-cpus LIST     host CPUs kept for the host, such as 0 or 0,1 (default 0);
                           none gives the guest every CPU (a one-CPU machine)
  --reconcile-interval T   systemd time span between reconciles (default 1h: the
                           sizing in docs/performance.md; a node also reconciles at
                           every boot)
  --reconcile-delay T      random delay added to each timer-driven reconcile, so that
                           a site's nodes do not call at the same second (default 10min)
  --virt-type kvm|qemu     libvirt domain type on the node (default kvm)
  --health-timeout SECONDS time a new guest has to show its health marker (default 120)
  --guest-network bridge|none
                           the guest's network: bridge puts the host's wired interfaces
                           and the guest on the bridge br0, the site's LAN (default);
                           none gives the guest no network device
  --host-network ADDRESS/PREFIX|none
                           the host's address on brhost, the network with only the
                           host and the guest on it (for images published with
                           --network host; the host leases the guest an address),
                           default 192.168.254.1/24; none: no such network
  --pins FILE              rebuild with exactly the package versions of a pin file
                           (out/edgepin-host.pins.json of an earlier build)
  --host-version N         this host release's version, a whole number that later
                           releases make greater (default: SOURCE_DATE_EPOCH); in the
                           image (/etc/edgepin/edgepin.conf) and in the host update
  --host-epoch N           this host release's epoch, 0 to 63 (default 0): once a node
                           with a release key keeps this release, its TPM opens nothing
                           for a release of a lower epoch; raise it to revoke older ones
  --raw                    also write a raw image, for writing to disks
  --qa-check               QA images only: add the unit that runs the image test's
                           check script (DIB_EDGEPIN_QA_CHECK=1); never for nodes
  --out DIR                output folder (default out/)
  -h, --help               show this help

Outputs: DIR/edgepin-host.qcow2 (+ .raw), edgepin-host.manifest.json (with the
root filesystem's dm-verity root hash), edgepin-host.pins.json, edgepin-host.log, and
edgepin-host.update.tar, the host update: the root filesystem, its dm-verity hash tree,
the kernel, the initramfs and a manifest (docs/host-image.md#host-updates).
SOURCE_DATE_EPOCH (default: the time of the last commit) clamps file times for
reproducible builds.
EOF
}

# the Debian mirrors of this build host, from its apt configuration
apt_mirror() {
    python3 - "$1" <<'PY'
import glob, re, sys
want = sys.argv[1]  # main or security
found = []
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in open(path).read().split("\n\n"):
        uris = re.findall(r"^URIs:\s*(.+)$", stanza, re.M)
        suites = re.findall(r"^Suites:\s*(.+)$", stanza, re.M)
        if uris and suites:
            found += [(u, s) for u in uris[0].split() for s in suites[0].split()]
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        for line in open(path):
            m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m:
                found.append((m.group(1), m.group(2)))
    except OSError:
        pass
for uri, suite in found:
    if (want == "security") == suite.endswith("-security"):
        print(uri.rstrip("/"))
        break
PY
}

# this host lacks device-mapper or kernel vfat (a container or a sandbox): DIB's
# standard path cannot work there, the shims in elements/edgepin-host/host-shims stand in
needs_host_shims() {
    [[ -e /dev/mapper/control ]] || return 0
    grep -qw vfat /proc/filesystems && return 1
    modprobe -q vfat 2>/dev/null && grep -qw vfat /proc/filesystems && return 1
    return 0
}

cmd_image() {
    local release="${DIB_RELEASE:-trixie}" ca="" certs=() acerts=() pcrs=4,7,8,9 reserved=0 interval=1h rkey=""
    local delay=10min virt=kvm health=120 guestnet=bridge hostnet=192.168.254.1/24 pins="" raw=0 qa=0 out="$ROOT/out"
    local hostversion="" hostepoch=0
    while (($#)); do
        case "$1" in
            --release) release="$2"; shift 2 ;;
            --ca) ca="$(realpath "$2")"; shift 2 ;;
            --signing-cert) certs+=("$(realpath "$2")"); shift 2 ;;
            --assignment-cert) acerts+=("$(realpath "$2")"); shift 2 ;;
            --pcrs) pcrs="$2"; shift 2 ;;
            --release-key) rkey="$(realpath "$2")"; shift 2 ;;
            --reserved-cpus) reserved="$2"; shift 2 ;;
            --reconcile-interval) interval="$2"; shift 2 ;;
            --reconcile-delay) delay="$2"; shift 2 ;;
            --virt-type) virt="$2"; shift 2 ;;
            --health-timeout) health="$2"; shift 2 ;;
            --guest-network) guestnet="$2"; shift 2 ;;
            --host-network) hostnet="$2"; shift 2 ;;
            --pins) pins="$(realpath "$2")"; shift 2 ;;
            --host-version) hostversion="$2"; shift 2 ;;
            --host-epoch) hostepoch="$2"; shift 2 ;;
            --raw) raw=1; shift ;;
            --qa-check) qa=1; shift ;;
            --out) out="$(realpath -m "$2")"; shift 2 ;;
            -h | --help) image_usage; return 0 ;;
            *) image_usage >&2; die "image: unknown option $1" ;;
        esac
    done
    [[ -z "$ca" || -f "$ca" ]] || die "--ca: no such file"
    local f
    for f in "${certs[@]}"; do [[ -f "$f" ]] || die "--signing-cert: no such file: $f"; done
    for f in "${acerts[@]}"; do [[ -f "$f" ]] || die "--assignment-cert: no such file: $f"; done
    [[ -z "$pins" || -f "$pins" ]] || die "--pins: no such file: $pins"
    # the host version, by default SOURCE_DATE_EPOCH: a whole number that later releases
    # make greater
    [[ -z "$hostversion" || "$hostversion" =~ ^[1-9][0-9]{0,17}$ ]] ||
        die "--host-version must be a whole number above zero of at most 18 digits, such as $(date +%s)"
    [[ "$hostepoch" =~ ^(0|[1-9]|[1-5][0-9]|6[0-3])$ ]] ||
        die "--host-epoch must be a whole number from 0 to 63"
    [[ -z "${SOURCE_DATE_EPOCH:-}" || "$SOURCE_DATE_EPOCH" =~ ^[1-9][0-9]{0,17}$ ]] ||
        die "SOURCE_DATE_EPOCH must be a time in seconds since 1970, such as $(date +%s)"
    if [[ -n "$rkey" ]]; then
        [[ -f "$rkey" ]] || die "--release-key: no such file: $rkey"
        grep -q "BEGIN PUBLIC KEY" "$rkey" || die "--release-key: $rkey is not a PEM public key (give the public half)"
    fi
    [[ "$reserved" == none || "$reserved" =~ ^[0-9]+(,[0-9]+)*$ ]] ||
        die "--reserved-cpus must be a list of CPU numbers such as 0 or 0,1, or none"
    timespan "$interval" && [[ "$interval" =~ [1-9] ]] ||
        die "--reconcile-interval must be a systemd time span above zero, such as 1h or 15min"
    timespan "$delay" || die "--reconcile-delay must be a systemd time span, such as 10min or 0"
    [[ "$virt" == kvm || "$virt" == qemu ]] || die "--virt-type must be kvm or qemu"
    [[ "$health" =~ ^[0-9]+$ && "$health" -gt 0 ]] || die "--health-timeout must be a whole number of seconds"
    [[ "$guestnet" == bridge || "$guestnet" == none ]] || die "--guest-network must be bridge or none"
    [[ "$hostnet" == none || "$hostnet" =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/([89]|1[0-9]|2[0-9]|30)$ ]] ||
        die "--host-network must be an IPv4 address with its prefix length (8-30), such as 192.168.254.1/24, or none"

    ensure_apt "${IMAGE_APT_PACKAGES[@]}"
    ensure_project_venv
    ensure_dib_venv
    local dib_venv="$ROOT/.venv-dib"

    local work="$ROOT/.cache/image" name="edgepin-host"
    mkdir -p "$out" "$work"
    export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)}"
    hostversion="${hostversion:-$SOURCE_DATE_EPOCH}"

    log "building the edgepin wheel"
    rm -rf "$work/wheel"
    pip_q "$dib_venv/bin/python" wheel --no-deps --no-build-isolation -w "$work/wheel" "$ROOT" >/dev/null
    rm -rf "$ROOT/build"
    local wheel
    wheel="$(ls "$work"/wheel/edgepin-*.whl)"

    local mirror security
    mirror="${DIB_DISTRIBUTION_MIRROR:-$(apt_mirror main)}"
    security="${DIB_DEBIAN_SECURITY_MIRROR:-$(apt_mirror security)}"
    [[ -n "$mirror" ]] || die "no Debian mirror in this host's apt configuration; set DIB_DISTRIBUTION_MIRROR"

    local path="$dib_venv/bin:$PATH" shims=no
    if needs_host_shims; then
        [[ $(id -u) -eq 0 ]] || die "this host has no device-mapper or kernel vfat: build as root"
        log "no device-mapper or kernel vfat here: DIB runs with the host shims (partx, mtools)"
        path="$ROOT/elements/edgepin-host/host-shims:$path"
        export EDGEPIN_SHIM_STATE="$work/shim-state" DIB_EDGEPIN_HOST_SHIMS=1
        mkdir -p "$EDGEPIN_SHIM_STATE"
        shims=yes
    fi

    # what an earlier build wrote goes first: nothing of it may pass for this build's
    rm -f "$out/$name.update.tar" "$out/$name.update.tar.part"
    # raw first: the root is sealed with dm-verity on the finished disk, then the qcow2
    # is made from it (and the raw kept only with --raw)
    local types=raw
    local logfile="$out/$name.log"
    log "diskimage-builder: Debian $release from $mirror; log in $logfile"
    local start=$SECONDS rc=0
    (
        export PATH="$path"
        export ELEMENTS_PATH="$ROOT/elements"
        export DIB_RELEASE="$release"
        export DIB_DISTRIBUTION_MIRROR="$mirror"
        if [[ -n "$security" ]]; then export DIB_DEBIAN_SECURITY_MIRROR="$security"; fi
        export TMP_DIR="$work/tmp"
        export DIB_IMAGE_CACHE="$ROOT/.cache/dib"
        export DIB_EDGEPIN_WHEEL="$wheel"
        export DIB_EDGEPIN_CA_BUNDLE="$ca"
        export DIB_EDGEPIN_NODE_DOC="$ROOT/docs/node.md"
        export DIB_EDGEPIN_SIGNING_CERTS="${certs[*]}"
        export DIB_EDGEPIN_ASSIGNMENT_CERTS="${acerts[*]}"
        export DIB_EDGEPIN_RELEASE_KEY="$rkey"
        export DIB_EDGEPIN_PCRS="$pcrs"
        export DIB_EDGEPIN_RESERVED_CPUS="$reserved"
        export DIB_EDGEPIN_RECONCILE_INTERVAL="$interval"
        export DIB_EDGEPIN_RECONCILE_DELAY="$delay"
        export DIB_EDGEPIN_VIRT_TYPE="$virt"
        export DIB_EDGEPIN_HEALTH_TIMEOUT="$health"
        export DIB_EDGEPIN_GUEST_NETWORK="$guestnet"
        export DIB_EDGEPIN_HOST_NETWORK_ADDRESS="$hostnet"
        export DIB_EDGEPIN_QA_CHECK="$qa"
        export DIB_EDGEPIN_HOST_VERSION="$hostversion"
        export DIB_EDGEPIN_HOST_EPOCH="$hostepoch"
        if [[ -n "$pins" ]]; then export DIB_DPKG_MANIFEST="$pins"; fi
        mkdir -p "$TMP_DIR"
        exec disk-image-create -a amd64 -t "$types" --image-size 3 --no-tmpfs \
            -o "$out/$name" edgepin-host
    ) >"$logfile" 2>&1 &
    local pid=$!
    # progress: the hook diskimage-builder is running, as it changes
    local last="" now
    while kill -0 "$pid" 2>/dev/null; do
        sleep 3
        now="$(grep -oE "dib-run-parts Running [^ ]+" "$logfile" 2>/dev/null | tail -1 || true)"
        now="${now##*/in_target.d/}"
        now="${now##*/hooks/}"
        if [[ -n "$now" && "$now" != "$last" ]]; then
            printf '    [%4d s] %s\n' "$((SECONDS - start))" "$now" >&2
            last="$now"
        fi
    done
    wait "$pid" || rc=$?
    if ((rc != 0)); then
        tail -25 "$logfile" >&2
        die "diskimage-builder failed (exit $rc) after $((SECONDS - start)) s; full log: $logfile"
    fi
    log "image built in $((SECONDS - start)) s"
    local roothash rootsize sudo=()
    # loop devices over the partitions: root, as diskimage-builder's own steps are
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    # the root: a squashfs of the files diskimage-builder put on the ext4 root partition
    log "squashing the root filesystem (zstd)"
    start=$SECONDS
    rootsize="$(PATH="$path" "${sudo[@]}" env SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" \
        "$ROOT/elements/edgepin-readonly/squash-root" "$out/$name.raw" | tail -1)" \
        || die "squashing the root filesystem failed"
    [[ "$rootsize" =~ ^[0-9]+\ [0-9a-f]{64}$ ]] || die "squash-root said no size and sha256: $rootsize"
    log "root squashed in $((SECONDS - start)) s: $((${rootsize% *} / 1048576)) MiB, sha256 ${rootsize#* }"
    # dm-verity: hash the root partition into the verity partition, the root hash onto
    # the ESP (GRUB puts it on the measured kernel command line)
    roothash="$(PATH="$path" "${sudo[@]}" "$ROOT/elements/edgepin-readonly/seal-verity" "$out/$name.raw" | tail -1)" \
        || die "sealing the root with dm-verity failed"
    log "root sealed with dm-verity: root hash $roothash"
    # the host update: the root, its hash tree, the kernel and the initramfs in one file,
    # with a manifest (provisioner/hostupdate.py)
    local boot="$work/boot-files" kver rootpart veritypart
    rm -rf "$boot" && mkdir -p "$boot"
    kver="$(PATH="$path" "${sudo[@]}" "$ROOT/elements/edgepin-readonly/boot-files" "$out/$name.raw" "$boot" | tail -1)" \
        || die "copying the boot files from the boot partition failed"
    rootpart="$(PATH="$path" "$ROOT/elements/edgepin-readonly/gpt-partition" "$out/$name.raw" root-a)"
    veritypart="$(PATH="$path" "$ROOT/elements/edgepin-readonly/gpt-partition" "$out/$name.raw" verity-a)"
    # shellcheck disable=SC2086 # "OFFSET SIZE", two arguments each
    "$VENV/bin/python" -m provisioner.hostupdate write --out "$out/$name.update.tar" \
        --raw "$out/$name.raw" --boot-dir "$boot" --root-partition $rootpart \
        --verity-partition $veritypart --root-bytes "${rootsize% *}" --name "$name" \
        --host-version "$hostversion" --kernel-version "$kver" --root-hash "$roothash" \
        --epoch "$SOURCE_DATE_EPOCH" >/dev/null || die "writing the host update failed"
    rm -rf "$boot"
    log "host update written: $out/$name.update.tar (host version $hostversion)"
    rm -f "$out/$name.qcow2"
    # compressed, as diskimage-builder makes its qcow2
    qemu-img convert -c -f raw -O qcow2 "$out/$name.raw" "$out/$name.qcow2"
    ((raw)) || rm -f "$out/$name.raw"
    local ca_sum="" pins_sum="" cert_sums="" acert_sums="" rkey_sum=""
    [[ -n "$rkey" ]] && rkey_sum="$(sha256sum "$rkey" | cut -d' ' -f1)"
    [[ -n "$ca" ]] && ca_sum="$(sha256sum "$ca" | cut -d' ' -f1)"
    [[ -n "$pins" ]] && pins_sum="$(sha256sum "$pins" | cut -d' ' -f1)"
    for f in "${certs[@]}"; do cert_sums+="$(sha256sum "$f" | cut -d' ' -f1),"; done
    for f in "${acerts[@]}"; do acert_sums+="$(sha256sum "$f" | cut -d' ' -f1),"; done
    "$VENV/bin/python" -m provisioner.imagemanifest \
        --out "$out" --name "$name" --elements-dir "$ROOT/elements" --wheel "$wheel" \
        --setting "release=$release" --setting "mirror=$mirror" \
        --setting "source_date_epoch=$SOURCE_DATE_EPOCH" \
        --setting "pcrs=$pcrs" --setting "reserved_cpus=$reserved" \
        --setting "reconcile_interval=$interval" --setting "reconcile_delay=$delay" \
        --setting "virt_type=$virt" \
        --setting "health_timeout=$health" --setting "qa_check=$qa" \
        --setting "guest_network=$guestnet" --setting "host_network=$hostnet" \
        --setting "ca_sha256=$ca_sum" --setting "signing_certs_sha256=${cert_sums%,}" \
        --setting "assignment_certs_sha256=${acert_sums%,}" \
        --setting "release_key_sha256=$rkey_sum" \
        --setting "pins_sha256=$pins_sum" --setting "host_shims=$shims" \
        --setting "host_version=$hostversion" --setting "host_epoch=$hostepoch" \
        --verity-root-hash "$roothash" \
        --root-image "${rootsize% *}" "${rootsize#* }"
}

cmd_test() {
    setup
    cd "$ROOT"
    local start=$SECONDS
    log "ruff check"
    "$VENV/bin/ruff" check .
    log "ruff format --check"
    "$VENV/bin/ruff" format --check .
    log "mypy --strict provisioner/ benchmarks/"
    "$VENV/bin/mypy" --strict provisioner/ benchmarks/
    local rc=0
    if (($#)); then
        log "pytest $*"
        "$VENV/bin/python" -m pytest "$@" || rc=$?
        ((rc != 5)) || die "pytest collected no tests (exit 5): that is a failure, not a pass"
    else
        test_tiers || rc=$?
    fi
    log "tests finished in $((SECONDS - start)) s (exit $rc)"
    return "$rc"
}

# The whole suite as pytest sessions at once: the image tier (whose QEMU nodes keep one core
# busy, one emulator thread) beside the unit, integration and Ceph tiers. Those mostly wait
# (their guests' boots, timers, services), and took as long beside the image tier as without
# it; the image tier is the longer, so the other session runs at a lower CPU priority
# (nice 10) and takes what the image tier leaves. Two more sessions take the rest, both
# left out of the image session: as soon as the image session has built the image, the
# second build that test_reproducible.py compares with it (REPRODUCIBLE) starts at the
# lowest priority (nice 19: package installs and compression, which wait for the disk more
# than for a core); when the other tiers are done, their core would idle while the image
# tier's node scenarios go on, and the host image boots on SeaBIOS there (BIOS_BOOT). Each
# session has its own run directory and prints its slowest steps; the image sessions'
# output goes to out/test-image.log, out/test-image-repro.log and out/test-image-bios.log,
# printed when all are done.
BIOS_BOOT="tests/image/test_host_image.py::test_boots_read_only_with_tpm_and_no_way_in[bios]"
REPRODUCIBLE="tests/image/test_reproducible.py"

test_tiers() {
    local log="$ROOT/out/test-image.log" bios_log="$ROOT/out/test-image-bios.log"
    local repro_log="$ROOT/out/test-image-repro.log" pid repro_pid
    local rc_rest=0 rc_image=0 rc_bios=0 rc_repro=0
    local run="${EDGEPIN_TEST_RUN_DIR:-}"
    local built="${EDGEPIN_CACHE_DIR:-$ROOT/.cache}/image-tier/out/edgepin-host.inputs"
    local started="$ROOT/out/.test-tiers-started"
    mkdir -p "$ROOT/out"
    touch "$started"
    sleep 1  # a stamp written from now on is newer, whatever the filesystem's time resolution
    log "pytest -m image, beside the other tiers (its output: out/test-image.log)"
    (
        if [[ -n "$run" ]]; then export EDGEPIN_TEST_RUN_DIR="$run/image"; fi
        exec "$VENV/bin/python" -m pytest -m image --deselect "$BIOS_BOOT" \
            --deselect "$REPRODUCIBLE" --durations=25
    ) >"$log" 2>&1 &
    pid=$!
    # the image session builds the image or finds it current, and then (re)writes its stamp:
    # the second build waits for that, never two builds at once
    (
        while ! [[ "$built" -nt "$started" ]] && kill -0 "$pid" 2>/dev/null; do sleep 10; done
        if [[ -n "$run" ]]; then export EDGEPIN_TEST_RUN_DIR="$run/repro"; fi
        exec nice -n 19 "$VENV/bin/python" -m pytest "$REPRODUCIBLE" --durations=5
    ) >"$repro_log" 2>&1 &
    repro_pid=$!
    trap 'kill -TERM "$pid" "$repro_pid" 2>/dev/null || true' EXIT
    log "pytest -m 'not image'"
    (
        if [[ -n "$run" ]]; then export EDGEPIN_TEST_RUN_DIR="$run/other"; fi
        exec nice -n 10 "$VENV/bin/python" -m pytest -m "not image" --durations=15
    ) || rc_rest=$?
    while ! [[ "$built" -nt "$started" ]] && kill -0 "$pid" 2>/dev/null; do sleep 10; done
    log "pytest $BIOS_BOOT, beside the image tier (its output: out/test-image-bios.log)"
    (
        if [[ -n "$run" ]]; then export EDGEPIN_TEST_RUN_DIR="$run/bios"; fi
        exec "$VENV/bin/python" -m pytest "$BIOS_BOOT" --durations=5
    ) >"$bios_log" 2>&1 || rc_bios=$?
    log "waiting for the image tier and the second build"
    wait "$pid" || rc_image=$?
    wait "$repro_pid" || rc_repro=$?
    trap - EXIT
    log "the image tier's output (out/test-image.log):"
    cat "$log" >&2
    log "the second build's output (out/test-image-repro.log):"
    cat "$repro_log" >&2
    log "the BIOS boot's output (out/test-image-bios.log):"
    cat "$bios_log" >&2
    ((rc_rest != 5 && rc_image != 5 && rc_bios != 5 && rc_repro != 5)) ||
        die "a pytest session collected no tests (exit 5): that is a failure, not a pass"
    log "unit, integration and Ceph tiers: exit $rc_rest; image tier: exit $rc_image;" \
        "second build: exit $rc_repro; BIOS boot: exit $rc_bios"
    ((rc_rest == 0 && rc_image == 0 && rc_bios == 0 && rc_repro == 0))
}

cmd_controlplane() {
    ensure_apt
    ensure_project_venv
    ensure_services_venv
    if [[ " $* " == *" --store ceph "* || " $* " == *" --store=ceph "* ]]; then ensure_ceph_venv; fi
    cd "$ROOT"
    "$VENV/bin/python" -m tests.testbed.controlplane "$@"
}

cmd_demo() {
    setup
    cd "$ROOT"
    "$VENV/bin/python" -m tests.testbed.demo "$@"
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
        demo) cmd_demo "$@" ;;
        setup) setup ;;
        *) usage >&2; die "unknown command: $cmd" ;;
    esac
}

main "$@"
