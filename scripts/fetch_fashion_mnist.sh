#!/usr/bin/env bash
# Unpack Debian's dataset-fashion-mnist into DIR without root (apt-get download + dpkg -x).
# Prints where the four IDX files are. Safe to re-run.
set -euo pipefail
dir="${1:-.assets/fashion-mnist}"
if compgen -G "$dir/**/train-images-idx3-ubyte.gz" >/dev/null 2>&1 || \
   find "$dir" -name 'train-images-idx3-ubyte.gz' 2>/dev/null | grep -q .; then
  exit 0
fi
mkdir -p "$dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
if ! apt-get download dataset-fashion-mnist >/dev/null 2>&1; then
  (apt-get update >/dev/null 2>&1 || true)
  apt-get download dataset-fashion-mnist >/dev/null 2>&1 || {
    echo "fashion-mnist: apt-get download failed; the fashion-mnist task will be unavailable" >&2
    exit 1
  }
fi
dpkg -x dataset-fashion-mnist_*.deb "$OLDPWD/$dir"
echo "fashion-mnist unpacked into $dir"
