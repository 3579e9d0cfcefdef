"""Fixtures shared by the test files. Helpers (configs, synthetic inputs) are plain functions in
``test_model_helpers.py``; ``pytest.ini``'s ``pythonpath`` makes it, ``train_net`` and the tools
importable by name."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread: on busy shared cores, multi-threaded CPU kernels
    slow these small workloads down by up to 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
