"""Fixtures shared by the test files. Helpers (configs, synthetic inputs) are plain functions in
``isda_helpers.py``; ``pytest.ini``'s ``pythonpath`` makes it, ``train_net`` and the tools
importable by name."""
import shutil

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


class _ModuleTmpPathFactory:
    """``tmp_path_factory.mktemp`` for module-scoped fixtures, with the folders removed once the
    module's tests are done: their training runs write checkpoints of ~150 MB each, and the whole
    suite kept ~8 GB in the temporary folder per flavour (CI ran out of disk)."""

    def __init__(self, factory):
        self._factory = factory
        self.made = []

    def mktemp(self, basename):
        path = self._factory.mktemp(basename)
        self.made.append(path)
        return path


@pytest.fixture(scope="module")
def module_tmp_path_factory(tmp_path_factory):
    factory = _ModuleTmpPathFactory(tmp_path_factory)
    yield factory
    for path in factory.made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def demo_logger_on_current_stdout():
    """``demo.main()`` runs in-process in several test files; Detectron2's ``setup_logger`` is
    cached, so the 'isda.demo' logger keeps the handler made in the first test, bound to that
    test's captured (since closed) stdout. Each test points it at its own stdout."""
    import logging
    import sys

    for handler in logging.getLogger("isda.demo").handlers:
        if type(handler) is logging.StreamHandler:  # (setStream would flush the closed one)
            handler.stream = sys.stdout
    yield
