"""``--setup-file FILE``: a Python file of the user's (typically dataset registrations) run in
every process before the config is used, so ``train_net.py`` and the demo see custom datasets
without a wrapper script or a ``PYTHONPATH`` pointing at the user's project."""
import os
import runpy
import sys

__all__ = ["run_setup_file"]

_done = set()


def run_setup_file(path) -> None:
    """Run ``path`` once per process (``__name__`` is ``"isda_setup_file"``); its folder is put
    on ``sys.path`` first, so it can import the modules beside it."""
    if not path:
        return
    full = os.path.abspath(os.path.expanduser(path))
    if full in _done:
        return
    if not os.path.isfile(full):
        raise FileNotFoundError(f"--setup-file {path}: no such file")
    folder = os.path.dirname(full)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    runpy.run_path(full, run_name="isda_setup_file")
    _done.add(full)
