"""Convert a foreign checkpoint (GGUF, CTranslate2) into an HF directory once, then reuse it.

The cache key covers the source file's identity and the converter's version. A conversion is
written to a temp dir and renamed into place, so a crash never leaves a half-written cache and
concurrent converters of the same file are safe (the first rename wins).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def convert_once(
    src: Path, cache_root: Path, version: int, convert: Callable[[Path, Path], None]
) -> Path:
    """`convert(src, out_dir)` the first time, the cached directory after."""
    src = src.resolve()
    final = cache_root / _cache_key(src, version)
    if final.is_dir():
        logger.info("Using cached conversion of %s at %s", src.name, final)
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    logger.info("Converting %s to an HF directory at %s", src, final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=cache_root))
    try:
        convert(src, tmp)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _cache_key(src: Path, version: int) -> str:
    stat = src.stat()
    identity = f"{src}|{stat.st_size}|{stat.st_mtime_ns}|{version}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _publish(tmp: Path, final: Path) -> None:
    """Atomic rename; losing the race to a concurrent converter is fine, its result is identical."""
    try:
        tmp.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        logger.info("Another process converted it first; using %s", final)
