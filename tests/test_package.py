"""Packaging: what `import cdiff` pulls in, where cdiff.kernels comes from, and the distribution's
name (cdiffset: "cdiff" on PyPI is an unrelated package)."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("diffusers", "transformers", "open_clip", "triton", "torchvision", "tifffile",
         "rasterio", "lpips", "pytorch_fid", "scipy", "torchmetrics")


def run_python(code: str, cwd, pythonpath: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = pythonpath
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_pulls_no_heavy_dependency(tmp_path):
    code = (
        "import sys, cdiff, cdiff.cli, cdiff.pipeline, cdiff.schedulers\n"
        "import cdiff.translate, cdiff.evaluate, cdiff.geo, cdiff.perceptual, cdiff.tiling\n"
        "import cdiff.matching, cdiff.scoring, cdiff.report, cdiff.networks, cdiff.published, cdiff.protocol\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    assert run_python(code, tmp_path, str(ROOT)) == ""


def test_kernels_import_from_a_checkout(tmp_path):
    code = "import cdiff.kernels as k; print(k.__file__)"
    assert run_python(code, tmp_path, str(ROOT)) == str(ROOT / "kernels" / "__init__.py")


def test_wheel_ships_kernels_inside_the_cdiff_namespace(tmp_path):
    # Build from a copy: setuptools leaves a build/ folder in the tree it builds.
    source = tmp_path / "source"
    for name in ("cdiff", "kernels"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("*.whl")
    assert wheel.name.startswith("cdiffset-"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "\nName: cdiffset\n" in metadata  # the distribution; the import name and the command stay cdiff
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "cdiff = cdiff.cli:main" in entry_points
    assert "cdiff/kernels/__init__.py" in names
    # The field's frozen split lists ship with the package (cdiff.data.frozen).
    assert {"cdiff/data/splits/NOTICE", "cdiff/data/splits/qxs-saropt/test_eo_list.txt",
            "cdiff/data/splits/spacenet6/sar_stretch.json", "cdiff/data/splits/sar2eo/test_first4000.txt"} <= set(names)
    assert not any(n.startswith("kernels/") for n in names), "kernels/ must not be a top-level module"
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    code = "import cdiff, cdiff.kernels as k; print(cdiff.__file__); print(k.__file__)"
    cdiff_file, kernels_file = run_python(code, tmp_path, str(unpacked)).splitlines()
    assert cdiff_file == str(unpacked / "cdiff" / "__init__.py")
    assert kernels_file == str(unpacked / "cdiff" / "kernels" / "__init__.py")


def test_every_install_hint_names_the_distribution_not_the_other_cdiff():
    """`pip install cdiff[...]` would install an unrelated package that also claims `cdiff`."""
    wrong = []
    for path in [*sorted((ROOT / "cdiff").rglob("*.py")), *sorted((ROOT / "docs").glob("*.md")), ROOT / "setup.py"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"pip install[^\n]*?['\"]?cdiff\[", line):
                wrong.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert wrong == []
