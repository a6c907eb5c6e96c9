"""A non-editable install carries trainers/ and plans/ inside the package, and every subpackage."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_package_and_the_trainer_folder(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("nnunet_segmamba-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    source_packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "nnunet_segmamba").rglob("__init__.py")}
    for package in source_packages:
        assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel (pyproject packages list)"
    for folder in ("trainers", "plans"):
        for module in (*(ROOT / folder).glob("*.py"), *(ROOT / folder).glob("*.json")):
            assert f"nnunet_segmamba/{folder}/{module.name}" in names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    # -S: no site-packages, so the editable install of this checkout cannot answer instead
    result = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                             "from nnunet_segmamba.tools.environment import trainers_folder; print(trainers_folder())",
                             str(target)], capture_output=True, text=True, check=True)
    installed = Path(result.stdout.strip())
    assert installed == target / "nnunet_segmamba" / "trainers"
    assert (installed / "nnUNetTrainerSegMambaV2.py").is_file()
