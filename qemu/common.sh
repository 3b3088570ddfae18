# Shared settings for the scripts in qemu/. Sourced, not run.
# shellcheck shell=bash

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Everything big (kernel source, kernel builds, pmem images) lives outside the repository.
PCACHE_CACHE=${PCACHE_CACHE:-/var/cache/dm-pcache-rs}
KVER_PKG=linux-source-7.3
export LLVM=-19
export LIBCLANG_PATH=${LIBCLANG_PATH:-/usr/lib/llvm-19/lib}
export PATH="$HOME/.cargo/bin:$PATH"
JOBS=${JOBS:-$(($(nproc) + 1))}

log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "$*"; exit 1; }
