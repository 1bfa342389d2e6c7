#!/usr/bin/env bash
# Unpack Debian's dataset-fashion-mnist into DIR without root (apt-get download + dpkg -x).
# Prints the folder holding the four IDX files. Safe to re-run (does nothing when present).
# qpeft.assets looks in $QPEFT_FASHION_MNIST_DIR, ./.assets/fashion-mnist, the repository's
# .assets/fashion-mnist and /usr/share/datasets/fashion-mnist (system-wide install).
set -euo pipefail
dir="${1:-.assets/fashion-mnist}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"   # absolute: the unpack below runs from a temporary folder

found() { find "$dir" -name 'train-images-idx3-ubyte*' -print -quit 2>/dev/null; }

if [ -n "$(found)" ]; then
  echo "fashion-mnist already in $(dirname "$(found)")"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
if ! apt-get download dataset-fashion-mnist >/dev/null 2>&1; then
  (apt-get update >/dev/null 2>&1 || true)
  apt-get download dataset-fashion-mnist >/dev/null 2>&1 || {
    echo "fashion-mnist: apt-get download failed; the fashion-mnist task will be unavailable" >&2
    echo "  (set QPEFT_FASHION_MNIST_DIR to a folder holding the four *-ubyte.gz files)" >&2
    exit 1
  }
fi
dpkg -x dataset-fashion-mnist_*.deb "$dir"
if [ -z "$(found)" ]; then
  echo "fashion-mnist: the package unpacked but holds no train-images-idx3-ubyte file" >&2
  exit 1
fi
echo "fashion-mnist unpacked into $(dirname "$(found)")"
