"""Bundles for the benchmark, exported once into a cache directory (``bench/.cache`` by default).

``ensure_bundle(name, size, cache)`` returns ``<cache>/<name>-<size>/`` holding ``model.onnx`` +
``features.onnx`` (and ``model.int8.onnx`` when ``int8=True``) plus ``torch.pt``, the state dict the
torch reference loads, so every contender runs the very same weights. The export goes through the
project's exporter (``exporter.export``) when it is there, else through :func:`export_by_hand`
(``torch.onnx.export`` of a wrapper returning both outputs, then split), which writes the same
bundle contract.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from runtime.contract import FEATURES_FILE, INT8_FILE, MODEL_FILE

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / ".cache"
SAMPLES = HERE.parent / "samples"
STAMP = "bench.json"


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def bundle_dir(name: str, size: int, cache: Path) -> Path:
    return Path(cache) / f"{name}-{size}"


def ensure_bundle(name: str, size: int, cache: Path = DEFAULT_CACHE, int8: bool = False,
                  calib: list[Path] | None = None) -> Path:
    """The cached bundle of benchmark model ``name`` at ``size``² (exported on first use)."""
    out = bundle_dir(name, size, cache)
    stale = (out / STAMP).is_file() and json.loads((out / STAMP).read_text()).get("export") != _export_how()
    if stale:
        _log(f"{out} was exported by hand; the project's exporter is there now: exporting again")
    if stale or not (out / STAMP).is_file():
        import torch

        from . import models

        spec = models.spec(name)
        _log(f"exporting {name} at {size}x{size} into {out} ...")
        net = models.build(name, size)
        Path(cache).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{size}.", dir=cache))
        try:
            how = _export(net, spec, size, tmp)
            torch.save(net.state_dict(), tmp / "torch.pt")
            (tmp / STAMP).write_text(json.dumps({"model": name, "size": size, "layer": spec.layer,
                                                 "channels": spec.channels, "export": how}))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if int8 and not _int8_current(out):
        from exporter.quantize import quantize_bundle

        files = calib or calibration_photos()
        _log(f"quantizing {out.name} to int8 with {len(files)} calibration photos ...")
        quantize_bundle(out, files)
    return out


def _int8_current(bundle: Path) -> bool:
    """``model.int8.onnx`` is there and made with the exporter's current quantization recipe."""
    if not (bundle / INT8_FILE).is_file():
        return False
    import onnx

    from exporter.quantize import RECIPE
    from runtime.contract import PREFIX, read_props

    props = read_props(onnx.load(str(bundle / INT8_FILE), load_external_data=False))
    return props.get(PREFIX + "version.quantization_recipe") == RECIPE


def sample_photos() -> list[Path]:
    names = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png")
    return [SAMPLES / n for n in names]


# photos shipped by installed packages (CC0 / public domain), never downloaded. The two lists are disjoint:
# int8 is calibrated on the first (and the samples, augmented), its fidelity is reported on the second.
PACKAGE_CALIBRATION = (
    ("skimage", "data/camera.png"), ("skimage", "data/coins.png"), ("skimage", "data/brick.png"),
    ("skimage", "data/grass.png"), ("skimage", "data/gravel.png"), ("skimage", "data/moon.png"),
    ("skimage", "data/ihc.png"), ("matplotlib", "mpl-data/sample_data/Minduka_Present_Blue_Pack.png"))
PACKAGE_EVALUATION = (
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"), ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/retina.jpg"), ("skimage", "data/motorcycle_right.png"), ("skimage", "data/color.png"),
    ("skimage", "data/horse.png"))


def package_photos(which: tuple[tuple[str, str], ...]) -> list[Path]:
    """The photos of ``which`` (package, path inside it) that the installed packages have."""
    import importlib.util

    out = []
    for pkg, rel in which:
        spec = importlib.util.find_spec(pkg)
        for root in (spec.submodule_search_locations or []) if spec else []:
            if (Path(root) / rel).is_file():
                out.append(Path(root) / rel)
                break
    return out


def calibration_photos() -> list[Path]:
    """int8 calibration: the five samples and the package photos of :data:`PACKAGE_CALIBRATION`
    (the quantizer adds mirrored, cropped and zoomed-out copies of each)."""
    return sample_photos() + package_photos(PACKAGE_CALIBRATION)


def outside_photos() -> list[Path]:
    """Photos outside the repository, never calibrated on: fidelity is reported on them too."""
    return package_photos(PACKAGE_EVALUATION)


def extra_photos() -> list[Path]:
    """The photos fidelity is also reported on (never calibrated or tuned on): :func:`outside_photos`."""
    return outside_photos()


# Real photographs from outside the repository, in packages that ship them (``--groups wild`` of
# ``python -m bench.fill_study``; bench, never tests: nothing requires them). Each entry: (group, where, path,
# package): ``where`` is ``deb`` (``path`` absolute, installed by Debian's ``package``) or ``py`` (``path``
# inside the installed Python package ``package``). Chosen by what they show (buildings, people, street
# scenes, art, animals, food, nature), never by how a fast mode does on them: every real photograph of those
# folders is here, less drawings, renders, screenshots, calibration boards and near-duplicates.
OPENCV = "/usr/share/doc/opencv-doc/examples"
MATE = "/usr/share/backgrounds/mate/nature"
PLASMA = "/usr/share/wallpapers"
WILD_PHOTOS: tuple[tuple[str, str, str, str], ...] = (
    *(("opencv", "deb", f"{OPENCV}/data/{n}", "opencv-doc") for n in (
        "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "basketball1.png", "board.jpg",
        "box_in_scene.png", "building.jpg", "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg",
        "graf1.png", "home.jpg", "leuvenA.jpg", "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg",
        "rubberwhale1.png", "squirrel_cls.jpg", "starry_night.jpg", "stuff.jpg")),
    *(("opencv", "deb", f"{OPENCV}/{n}", "opencv-doc") for n in (
        "alphamat/input_images/plant.jpg", "hfs/data/000.jpg", "hfs/data/001.jpg", "hfs/data/002.jpg",
        *(f"text/scenetext0{i}.jpg" for i in range(1, 7)), "reg/home.png", "dnn_superres/butterfly.png")),
    *(("wallpapers", "deb", f"{MATE}/{n}.jpg", "mate-backgrounds") for n in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower")),
    *(("wallpapers", "deb", f"{PLASMA}/{n}/contents/images/{size}.jpg", "plasma-workspace-wallpapers") for n, size in (
        ("BytheWater", "1920x1080"), ("ColdRipple", "1920x1080"), ("ColorfulCups", "2560x1600"),
        ("DarkestHour", "1920x1080"), ("EveningGlow", "1920x1080"), ("FallenLeaf", "1920x1080"),
        ("Grey", "1920x1080"), ("Kite", "1920x1080"), ("OneStandsOut", "1920x1080"), ("Path", "1920x1080"),
        ("summer_1am", "1920x1080"), ("Volna", "5120x2880"))),
    ("wallpapers", "deb", "/usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg", "lomiri-wallpapers-20.04"),
    ("pypi", "py", "datasets/images/china.jpg", "sklearn"), ("pypi", "py", "datasets/images/flower.jpg", "sklearn"),
    ("pypi", "py", "demos/data/luispedro.jpg", "mahotas"), ("pypi", "py", "assets/bus.jpg", "ultralytics"),
    ("pypi", "py", "assets/zidane.jpg", "ultralytics"),
)
#: how to install what ships them (pip names differ from import names)
WILD_INSTALL = {"sklearn": "pip install scikit-learn", "mahotas": "pip install mahotas",
                "ultralytics": "pip install --no-deps ultralytics"}


def wild_name(where: str, path: str, package: str) -> str:
    """A photo's short, unique name: the wallpaper's folder for Plasma's, else the file name
    (``opencv-doc``'s sub-folders prefixed: ``hfs/000.jpg``)."""
    p = Path(path)
    if where == "deb" and path.startswith(PLASMA):
        return f"{p.parts[4]}.jpg"
    if where == "deb" and path.startswith(OPENCV + "/") and not path.startswith(OPENCV + "/data/"):
        return f"{path[len(OPENCV) + 1:].split('/')[0]}/{p.name}"
    return p.name


def wild_photos(groups=("opencv", "wallpapers", "pypi")) -> tuple[list[tuple[str, str, Path]], list[str]]:
    """``([(group, name, path)], [install hints])``: the :data:`WILD_PHOTOS` of ``groups`` that are installed,
    and one command per package whose photos are missing."""
    import importlib.util

    found, missing = [], {}
    for group, where, rel, package in WILD_PHOTOS:
        if group not in groups:
            continue
        if where == "deb":
            path = Path(rel)
        else:
            spec = importlib.util.find_spec(package)
            roots = (spec.submodule_search_locations or []) if spec else []
            path = next((Path(r) / rel for r in roots if (Path(r) / rel).is_file()), Path(package) / rel)
        if path.is_file():
            found.append((group, wild_name(where, rel, package), path))
        else:
            missing[package] = (f"apt-get install {package}" if where == "deb"
                                else WILD_INSTALL.get(package, f"pip install {package}"))
    return found, list(missing.values())


def _project_export():
    try:
        from exporter import export
    except ImportError:
        return None
    return export if callable(export) else None


def _export_how() -> str:
    return "exporter.export" if _project_export() else "bench.bundles.export_by_hand"


def _export(net, spec, size: int, out: Path) -> str:
    """Export through ``exporter.export`` if the project's exporter provides it, else by hand."""
    export = _project_export()
    kwargs = dict(input_size=(size, size), mean=spec.mean, std=spec.std, scale=spec.scale, labels=spec.labels)
    if export is not None:
        export(net, spec.layer, out, **kwargs)
        return "exporter.export"
    export_by_hand(net, spec.layer, out, **kwargs)
    return "bench.bundles.export_by_hand"


def export_by_hand(net, layer: str, out_dir: Path, input_size=(224, 224), mean=(0.485, 0.456, 0.406),
                   std=(0.229, 0.224, 0.225), scale=1 / 255, labels=None, opset: int = 17) -> Path:
    """One ``torch.onnx.export`` of (logits, features), split into the two bundle graphs + metadata."""
    import onnx
    import torch

    from runtime.contract import BundleMeta, Preprocessing, graph_sha256, write_metadata

    module = dict(net.named_modules())[layer]

    class Both(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self._feat = None
            module.register_forward_hook(lambda _m, _i, o: setattr(self, "_feat", o))

        def forward(self, x):
            logits = self.net(x)
            return logits, self._feat

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    both = out_dir / "both.onnx"
    x = torch.randn(1, 3, *input_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Both().eval(), (x,), str(both), input_names=["input"], output_names=["logits", "features"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}, "features": {0: "N"}},
                          opset_version=opset, dynamo=False)
    onnx.utils.extract_model(str(both), str(out_dir / MODEL_FILE), ["input"], ["logits"])
    onnx.utils.extract_model(str(both), str(out_dir / FEATURES_FILE), ["input"], ["features"])
    both.unlink()
    m = onnx.load(str(out_dir / MODEL_FILE))
    f = onnx.load(str(out_dir / FEATURES_FILE))
    pre = Preprocessing(tuple(input_size), "RGB", float(scale), tuple(mean), tuple(std))
    meta = BundleMeta("classifier", layer, pre, labels=tuple(labels) if labels else None,
                      versions={"exporter": "bench.bundles.export_by_hand", "opset": str(opset),
                                "torch": torch.__version__})
    write_metadata(m, meta.with_role("classifier", graph_sha256(f)))
    write_metadata(f, meta.with_role("features", graph_sha256(m)))
    onnx.save(m, str(out_dir / MODEL_FILE))
    onnx.save(f, str(out_dir / FEATURES_FILE))
    return out_dir


def load_torch(name: str, bundle: Path):
    """The torch model of a cached bundle, with the bundle's exact weights (``torch.pt``)."""
    import torch

    from . import models

    stamp = json.loads((Path(bundle) / STAMP).read_text())
    net = models.build(name, int(stamp["size"]))
    net.load_state_dict(torch.load(Path(bundle) / "torch.pt", map_location="cpu"))
    return net.eval(), stamp["layer"]
