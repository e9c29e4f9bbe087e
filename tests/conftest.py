"""Shared fixtures: tiny configs and real photos shipped inside scikit-image (no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mae.core.config import get_preset


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`mae bench` stores measurements for `--engine auto` in a user cache: tests get their own, never the user's."""
    import os

    os.environ["MAE_CACHE_DIR"] = str(tmp_path_factory.mktemp("mae-cache"))


@pytest.fixture
def tiny_config():
    """32 px images, 8 px patches (L = 16), 2 encoder blocks: milliseconds per step."""
    return get_preset("mae_vit_test_patch8")


def photos() -> list[np.ndarray]:
    """Real RGB photos (uint8 HxWx3) shipped with scikit-image."""
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "immunohistochemistry"]
    return [getattr(data, name)() for name in names if hasattr(data, name)]


@pytest.fixture(scope="session")
def real_photos() -> list[np.ndarray]:
    return photos()


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """A folder of the photos above as JPEG and PNG files."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for i, array in enumerate(photos()):
        suffix = "jpg" if i % 2 == 0 else "png"
        Image.fromarray(array).save(folder / f"photo_{i}.{suffix}")
    return folder
