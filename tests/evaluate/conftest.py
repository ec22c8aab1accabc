import pytest
from .eval_builders import build_workspace

from sail.workspace import Workspace


@pytest.fixture
def small_ws(tmp_path) -> Workspace:
    return build_workspace(tmp_path / "ws")
