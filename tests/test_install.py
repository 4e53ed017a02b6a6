"""A real install: the sdist and the wheel build, and the wheel installed in a fresh venv serves
the default catalog from another folder (no source tree on its path)."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import openai

from tests.serving import Server

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_serves_the_default_catalog(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("pagoda-*.whl")
    (sdist,) = dist.glob("pagoda-*.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pagoda/models.yaml" in names and "pagoda/kernels/csrc/linear_cpu.cpp" in names
    assert {name.split("/")[0] for name in names} == {
        "pagoda",
        wheel.name.split("-py3")[0] + ".dist-info",
    }
    with tarfile.open(sdist) as tar:
        assert any(name.endswith("pagoda/models.yaml") for name in tar.getnames())

    # A fresh venv; its dependencies come from this one's site-packages through a .pth file
    # (installing them again would need the network), pagoda itself only from the wheel.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    where = subprocess.check_output(
        [python, "-c", "import pagoda.server, sys; print(pagoda.server.__file__)"],
        cwd=tmp_path,
        text=True,
    )
    assert where.startswith(str(site)), where  # the installed copy, not the source tree

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server = Server([], command=[str(env_dir / "bin" / "pagoda")], cwd=elsewhere).wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model="HuggingFaceTB/SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=12,
        )
        assert "Paris" in reply.choices[0].message.content
    finally:
        assert server.stop() == 0, server.log()
