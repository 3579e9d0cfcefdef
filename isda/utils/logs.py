"""Keep the logs of normal runs readable (issue 31): Detectron2's ``default_setup`` logs the
config file and the full config (~650 lines) highlighted with ANSI colour codes, which also land
in ``OUTPUT_DIR/log.txt``; and ``torch.utils.cpp_extension``, imported by its environment report,
prints "No CUDA runtime is found, using CUDA_HOME=..." on every run of a CPU machine."""
import contextlib
import io
import logging
import re

__all__ = ["strip_ansi", "ShortSetupLog", "quiet_setup_logs"]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class ShortSetupLog(logging.Filter):
    """On the ``detectron2`` logger: the config dumps become one line each (the full config is
    in ``OUTPUT_DIR/config.yaml``) and no message keeps ANSI colour codes."""

    def filter(self, record):
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  (a malformed record: leave it to logging)
            return True
        clean = strip_ansi(message)
        head = clean.split("\n", 1)[0]
        if head.startswith("Running with full config:"):
            clean = ("Running with the full config (written to config.yaml in OUTPUT_DIR, "
                     f"{clean.count(chr(10))} lines)")
        elif head.startswith("Contents of args.config_file="):
            clean = head.rstrip(":")
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def quiet_setup_logs() -> None:
    """Install :class:`ShortSetupLog` on the ``detectron2`` logger (once) and import
    ``torch.utils.cpp_extension`` with its CUDA_HOME notice silenced (it is only a notice: the
    CPU build has no CUDA runtime by design)."""
    logger = logging.getLogger("detectron2")
    if not any(isinstance(f, ShortSetupLog) for f in logger.filters):
        logger.addFilter(ShortSetupLog())
    import torch  # first, so that no handler of torch's is created inside the redirection

    notice = logging.getLogger("torch.utils.cpp_extension")
    level = notice.level
    notice.setLevel(logging.ERROR)  # the notice is a warning of this logger (torch >= 2.x)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # older torch printed it
            import torch.utils.cpp_extension  # noqa: F401
    except Exception:  # noqa: BLE001  (only the notice matters here)
        pass
    finally:
        notice.setLevel(level)
