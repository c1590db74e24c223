"""What a person sees while medcap works: quiet third-party loggers, progress bars only on a terminal,
and the full log of every command that writes into a run folder in ``RUN/logs/``.

The console shows medcap's own INFO lines (WARNING with ``-q``, DEBUG with ``-v``); libraries speak
at WARNING and above only, and transformers' load reports and download bars are off. The run log
keeps medcap's INFO lines whatever the console shows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medcap.models.distributed import env_rank

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"
# Libraries that log chatter at INFO (absl: "Using default tokenizer" per ROUGE call; faiss.loader:
# one ModuleNotFoundError per missing CPU flavour); they keep WARNING and above.
THIRD_PARTY = (
    "absl",
    "accelerate",
    "datasets",
    "faiss",
    "filelock",
    "fsspec",
    "httpcore",
    "httpx",
    "huggingface_hub",
    "matplotlib",
    "numexpr",
    "open_clip",
    "peft",
    "PIL",
    "ray",
    "sentence_transformers",
    "timm",
    "torch",
    "transformers",
    "urllib3",
    "vllm",
)


def setup_logging(verbosity: int = 0) -> None:
    """Console logging for a command: ``verbosity`` -1 (``-q``) WARNING, 0 INFO, 1+ (``-v``) DEBUG."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    if env_rank() > 0:  # a launch's other processes: rank 0 says what they all do
        level = max(level, logging.WARNING)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    console = next((h for h in root.handlers if getattr(h, "_medcap_console", False)), None)
    if console is None:
        console = logging.StreamHandler(sys.stderr)
        console._medcap_console = True  # type: ignore[attr-defined]
        console.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        root.addHandler(console)
    console.setLevel(level)
    console.filters.clear()
    if verbosity < 2:  # libraries that log to the root logger (open_clip) speak at WARNING and above only
        console.addFilter(ours_or_warning)
    quiet_libraries(debug=verbosity > 1)


def ours_or_warning(record: logging.LogRecord) -> bool:
    """medcap's own records at any level; everyone else's from WARNING up."""
    return record.name.startswith("medcap") or record.levelno >= logging.WARNING


def quiet_libraries(debug: bool = False) -> None:
    """Third-party loggers at WARNING (DEBUG with ``-vv``); transformers' load reports and bars off."""
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # "LOAD REPORT" tables are warnings there
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not on_terminal():  # every library's tqdm bar (weight loading, GGUF conversion) off in logs and pipes
        os.environ.setdefault("TQDM_DISABLE", "1")
    with contextlib.suppress(ImportError):
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def on_terminal() -> bool:
    """True when progress bars help: stderr is a terminal (never in CI logs or pipes)."""
    return env_rank() == 0 and sys.stderr.isatty() and os.environ.get("MEDCAP_PROGRESS", "auto") != "off"


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar on a terminal; a silent pass-through elsewhere (logs get one line per stage instead)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not on_terminal(), dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def run_log(root: Path, command: str) -> Iterator[Path]:
    """Append everything medcap logs (INFO and up) during ``command`` to ``root/logs/run.log``."""
    folder = Path(root) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.addFilter(ours_or_warning)
    root_logger = logging.getLogger()
    root_logger.addHandler(handler)
    marks = logging.getLogger("medcap.run_log")  # where each command starts and ends: the file only, not the terminal
    marks.propagate = False
    marks.setLevel(logging.INFO)
    marks.addHandler(handler)
    start = time.time()
    marks.info("---- %s", command)
    try:
        yield path
    finally:
        marks.info("---- finished in %.0f s", time.time() - start)
        marks.removeHandler(handler)
        root_logger.removeHandler(handler)
        handler.close()
