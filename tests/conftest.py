import pytest

from tests.tiny_models import ARCHITECTURES, build_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """arch name -> folder of a tiny random model of that architecture."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHITECTURES}
