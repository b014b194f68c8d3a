"""The build's console shows our progress bars, choices and tables; the libraries' chatter goes to a log file.

Exporting and quantising print hundreds of lines of their own (ONNX Runtime's
"Quantization parameters for tensor ... not specified", torch's tracer warnings,
transformers' deprecation notes). Inside :func:`libraries_to` every library
logger's console handler, Python warnings and ONNX Runtime's native log write
to the build log instead; errors still reach the console through the exception
that carries them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LIBRARIES = ("transformers", "optimum")  # their root loggers attach a console handler when first used


def console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    streams = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]
    return [h for h in streams if not isinstance(h, logging.FileHandler)]


@contextmanager
def libraries_to(log: Path) -> Iterator[Path]:
    """Send third-party logging and warnings to ``log`` for the duration; yields the path."""
    import optimum.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.get_logger("transformers")  # configure their root loggers now, so that
    optimum.utils.logging.get_logger("optimum")  # their console handlers exist to be swapped
    log.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    loggers = [root, *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    swapped = {lg: console_handlers(lg) for lg in loggers if lg is root or console_handlers(lg)}
    level = root.level
    for logger, handlers in swapped.items():
        for old in handlers:
            logger.removeHandler(old)
        logger.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    severity = native_severity(3)  # ONNX Runtime: errors only
    try:
        yield log
    finally:
        native_severity(severity)
        logging.captureWarnings(False)
        root.setLevel(level)
        for logger, handlers in swapped.items():
            logger.removeHandler(handler)
            for old in handlers:
                logger.addHandler(old)
        handler.close()


def native_severity(level: int) -> int:
    """Set ONNX Runtime's default log severity; returns what to restore: its default, 2 (it has no getter)."""
    try:
        import onnxruntime
    except ImportError:
        return level
    onnxruntime.set_default_logger_severity(level)
    return 2
