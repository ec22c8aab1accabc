import pytest

from sail.workspace import Workspace

from .eval_builders import build_workspace


@pytest.fixture
def small_ws(tmp_path) -> Workspace:
    return build_workspace(tmp_path / "ws")
