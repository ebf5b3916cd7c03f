import os

import pytest
import torch

from treespec.testing import tiny_model


def pytest_configure(config):
    # two pytest workers (README: -n 2) on a 2-core machine: one intra-op thread each, not two
    # each fighting for the same cores
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in item.keywords`: a folder named gpu matches too
            item.add_marker(skip)


@pytest.fixture(scope="session")
def target():
    return tiny_model(0)


@pytest.fixture(scope="session")
def unrelated_draft():
    return tiny_model(1, hidden_size=16, num_layers=1)


@pytest.fixture(autouse=True)
def _release_kept_speculators():
    """treespec.generate keeps one Speculator per (models, options) across calls; each test
    starts from none, so that what it patches or counts is its own."""
    yield
    import treespec

    treespec.release()
