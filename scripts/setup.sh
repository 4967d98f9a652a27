#!/usr/bin/env bash
# One idempotent set-up step for edge-lb on Debian 12: system packages, kernel headers for bcc,
# and a venv that sees Debian's bcc (the editable install also compiles the C Maglev fill in place).
# Used by the README and by .ci/run. A second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(python3-bpfcc python3-venv linux-headers-amd64 bird2 frr iproute2 ethtool bpftool clang llvm
              libbpf-dev tcpdump procps iputils-ping curl chromium python3-wheel systemd
              gcc python3-dev)  # gcc, python3-dev: edge_lb/dataplane/_maglevfill.c (setup.py)
VENV=.venv

say() { printf '[setup] %s\n' "$*"; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    say "must run as root (apt, /lib/modules, bpffs)"; exit 1
  fi
}

install_packages() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then say "apt packages: all present"; return; fi
  say "apt packages: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# bcc compiles against /lib/modules/$(uname -r)/build. Only when the running kernel has no headers of its own
# do we point that at Debian's generic headers, and say so: struct layouts are then those of that version.
link_kernel_headers() {
  local build="/lib/modules/$(uname -r)/build"
  local source="/lib/modules/$(uname -r)/source"
  if [ -e "$build/Makefile" ] && { [ -e "$build/include/linux/kconfig.h" ] || [ -e "$source/include/linux/kconfig.h" ]; }; then
    say "kernel headers: $build present"; return
  fi
  local hdr
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$hdr" ]; then say "no linux-headers-*-amd64 under /usr/src"; exit 1; fi
  mkdir -p "/lib/modules/$(uname -r)"
  ln -sfn "$hdr" "$build"
  # The -amd64 tree holds only generated headers; kconfig.h and the rest live in the matching -common tree.
  local common="${hdr%-amd64}-common"
  [ -d "$common" ] && ln -sfn "$common" "/lib/modules/$(uname -r)/source"
  say "############################################################################"
  say "WARNING: no headers for the running kernel $(uname -r)."
  say "WARNING: linked $build -> $hdr so bcc can compile."
  say "############################################################################"
}

make_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    say "venv: creating $VENV (Debian python3, system site packages for bcc)"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
  fi
  # Reinstall (and so recompile) when the package metadata or the C extension's source changes.
  local stamp="$VENV/.installed-$(cat pyproject.toml setup.py edge_lb/dataplane/_maglevfill.c | sha256sum | cut -c1-16)"
  if [ -f "$stamp" ] && "$VENV/bin/python" -c 'import edge_lb.dataplane._maglevfill' 2>/dev/null; then
    say "venv: up to date"; return
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[test]'
  rm -f "$VENV"/.installed-*
  touch "$stamp"
  say "venv: installed edge-lb and test dependencies"
}

mount_bpffs() {
  mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
}

need_root
install_packages
link_kernel_headers
make_venv
mount_bpffs
"$VENV/bin/python" -c 'import bcc, pyroute2, scapy, edge_lb.dataplane._maglevfill' && say "ready: $VENV/bin/edge-lb"
