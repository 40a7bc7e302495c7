import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from thinkdiff_core.tiny import make_tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny models in their released on-disk formats, built once per test session."""
    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def reasoner(tiny_models):
    from thinkdiff_core import Reasoner

    return Reasoner.from_pretrained(tiny_models["vlm"], device="cpu")


@pytest.fixture(scope="session")
def car_images():
    from PIL import Image

    assets = REPO / "thinkdiff_core" / "assets"
    return Image.open(assets / "white_car.png"), Image.open(assets / "blue_car.png")
