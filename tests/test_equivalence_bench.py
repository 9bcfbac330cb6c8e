"""Opt-in (`make test-slow`): the equivalence oracle at the real widths and real Qwen vocabulary.

Builds each family's `bench` checkpoint (about 1 GB each, ~30 s) once under .cache/models/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FAMILIES, make_image
from reference import reference_tokens
from test_equivalence import QUESTION, split_tokens
from vlsplit.make_model import make_model
from vlsplit.shared.images import load_image

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "models"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_split_equals_monolithic_at_real_widths(family):
    path = CACHE / f"bench-{family}"
    if not (path / "config.json").is_file():
        make_model(path, family, "bench", seed=0)
    images = [load_image(make_image(448, 336, seed=1))]
    ours, _ = split_tokens(str(path), images, max_new_tokens=8)
    assert ours == reference_tokens(str(path), images, QUESTION, max_new_tokens=8)
