#!/usr/bin/env bash
# Installs, on a Debian 12 machine (as root), the system packages that
# naiad's tests need, and only the ones that are missing. Idempotent: a second
# run does nothing but check. `apt-get update` runs at most once, and only when
# something has to be installed.
#
# Packages and why:
#   fuse3              fusermount3 and /etc/fuse.conf for the FUSE daemon tests
#   umoci              building the fixture image and reference unpacks
#   skopeo             zstd copy of the fixture image; pushing test images to registries
#   debootstrap        the Debian bookworm rootfs of the fixture image
#   debian-archive-keyring, gpgv, wget, ca-certificates   what debootstrap uses
#   docker-registry    CNCF Distribution (/usr/bin/docker-registry): the local
#                      registries of tests/registry.rs (plain, auth, mirror, TLS)
#   apache2-utils      htpasswd, for registry Basic auth tests
#   openssl            test CA/server certificates and signing registry tokens
#   zstd, tar          layer (de)compression, GNU sparse tars
#   python3            tests' helpers and the fixture image's entrypoint check
#   coreutils          truncate, dd, sha256sum ...
#   attr               setfattr/getfattr for xattr fixtures
#   util-linux         flock (fixture build lock)
#   kmod               modprobe fuse when /dev/fuse is missing
#   runc, crun         the OCI runtimes `naiad run` starts containers with
#                      (crun preferred where the cgroup layout allows it)
#   containerd         the private containerd instances of tests/containerd.rs
#                      (naiad snapshotter as its proxy plugin; ctr, shim)
#   protobuf-compiler, libprotobuf-dev   protoc and the well-known .proto
#                      files: the containerd and CRI gRPC crates compile
#                      their .proto files when naiad is built
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

PACKAGES=(
    fuse3 umoci skopeo debootstrap debian-archive-keyring gpgv wget ca-certificates
    docker-registry apache2-utils openssl zstd tar python3 coreutils attr util-linux kmod
    runc crun containerd protobuf-compiler libprotobuf-dev
)

log() { printf 'install-test-deps: %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    log "not root: cannot install packages; checking only"
    CAN_INSTALL=0
else
    CAN_INSTALL=1
fi

is_installed() {
    local status
    status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)
    [[ $status == "install ok installed" ]]
}

missing=()
for p in "${PACKAGES[@]}"; do
    if ! is_installed "$p"; then
        missing+=("$p")
    fi
done

if ((${#missing[@]} == 0)); then
    log "all ${#PACKAGES[@]} packages already installed"
elif ((CAN_INSTALL == 0)); then
    log "missing packages (need root to install): ${missing[*]}"
    exit 1
else
    log "missing: ${missing[*]}"
    log "running apt-get update"
    # Some third-party sources may be unreachable; the Debian ones are what we
    # need, so a partial update is not fatal here: the install below will fail
    # loudly if a package really cannot be found.
    if ! apt-get update -q; then
        log "apt-get update reported errors (continuing)"
    fi
    log "installing: ${missing[*]}"
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    log "installed: ${missing[*]}"
fi

# /dev/fuse: load the module if the device node is missing.
if [[ -c /dev/fuse ]]; then
    log "/dev/fuse present"
else
    log "/dev/fuse missing; trying modprobe fuse"
    if modprobe fuse 2>/dev/null && [[ -c /dev/fuse ]]; then
        log "/dev/fuse present after modprobe"
    else
        log "WARNING: /dev/fuse still missing; FUSE mount tests will fail or skip"
    fi
fi
