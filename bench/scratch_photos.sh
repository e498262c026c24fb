#!/usr/bin/env bash
# The 61 test photos of round 5 of bench.insertion_study (docs/evaluation.md): every JPEG among the stage
# backgrounds of Debian's `scratch` package (Scratch 1.4's Media/Backgrounds: indoor, nature, outdoor and
# sports scenes, nearly all photographs), none of them used to develop anything here. Downloads the package
# (not installed) and copies the JPEGs into DIR as scratch-NAME.jpg.
# Usage: bench/scratch_photos.sh DIR   (needs apt-get and the Debian registry)
set -euo pipefail
out=${1:?usage: bench/scratch_photos.sh DIR}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
(cd "$tmp" && apt-get download scratch >/dev/null 2>&1 && dpkg -x scratch_*.deb deb)
find "$tmp/deb/usr/share/scratch/Media/Backgrounds" -type f -iname '*.jpg' -print0 |
  while IFS= read -r -d '' f; do cp "$f" "$out/scratch-$(basename "$f")"; done
echo "$(ls "$out" | wc -l) photos in $out"
