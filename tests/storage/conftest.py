"""Fixtures for the cache tests; helpers live in tests/storage/helpers.py."""

from __future__ import annotations

import pytest

from alignti.storage.schema import SampleSignals
from tests.storage.helpers import make_samples


@pytest.fixture
def samples() -> list[SampleSignals]:
    return make_samples(30)
