"""The on-disk kernel cache: files a user can read, never code the compiler did not render.

Rendering is cheap (about a millisecond) and deterministic, so the cache does not trust its files:
every load renders the source, names the file by (kernel key, hash of that source), compares the
file's bytes with the source and rewrites it (with a warning) when they differ, then executes the
source held in memory, never the file. A replaced, truncated or empty file therefore costs one
warning and one write; it cannot run code or change a number. Writes go to a temporary file unique
to the process *and* thread, then `os.replace`, so concurrent compiles never see half a file.

The file exists for people (`maskdsl compile`, tracebacks, `inspect`) and for Triton, which reads a
kernel's source through `linecache`; the module's lines are put there from memory and pinned (no
mtime), so a file changed after the load is never re-read either.
"""

from __future__ import annotations

import hashlib
import linecache
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

from maskdsl.cache import cache_root


def cache_dir() -> Path:
    """The rendered kernels' folder under the one cache root (maskdsl.cache), created and checked writable."""
    path = cache_root() / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as exc:
        raise CacheDirError(f"the kernel cache {str(path)!r} cannot be used ({exc.strerror or exc}); point "
                            "MASKDSL_CACHE_DIR at a writable directory (docs/LIMITS.md)") from None
    return path


class CacheDirError(RuntimeError):
    """The kernel cache's directory cannot be created or written (MASKDSL_CACHE_DIR at a file, say)."""


class CacheWarning(UserWarning):
    """A cached kernel file did not hold what the compiler renders; it was rewritten."""


_LOADED: dict[str, ModuleType] = {}  # source digest -> module executed from that verified source
# key -> the source rendered for it in this process. The key names everything the text depends on
# (mask, config, Triton, templates and printers), so a warm compile re-verifies the file against this
# text without paying sympy's printing again (docs/DESIGN.md §7: warm compile <= 50 ms).
_RENDERED: dict[str, str] = {}
_LOCK = threading.Lock()


def source_digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def kernel_path(key: str, digest: str) -> Path:
    """The file of a rendered kernel: its key (mask, config, Triton, template) and its source's hash.

    With the source hash in the name a stale file (another maskdsl or printer) is simply another
    file, so a mismatch under this name can only be damage or tampering.
    """
    return cache_dir() / f"attn_{key}_{digest[:16]}.py"


def load_module(key: str, make_source: Callable[[], str]) -> tuple[ModuleType, Path]:
    """Render `make_source()`, make sure the cache file holds exactly it, and import it from memory."""
    source = _RENDERED.get(key)
    if source is None:
        source = make_source()
    if not isinstance(source, str) or not source.strip():
        raise RuntimeError(f"kernel {key}: the renderer produced no source")  # a bug, never a user's input
    _RENDERED[key] = source
    digest = source_digest(source)
    path = kernel_path(key, digest)
    with _LOCK:
        _store(path, source)
        module = _LOADED.get(digest)
        if module is None:
            module = _execute(source, path, f"maskdsl_kernel_{key}_{digest[:16]}")
            _LOADED[digest] = module
    return module, path


def _store(path: Path, source: str) -> None:
    data = source.encode()
    try:
        current = path.read_bytes()
    except FileNotFoundError:
        current = None
    except OSError as exc:
        current = b""
        warnings.warn(f"kernel cache file {path} could not be read ({exc.strerror}); rewriting it",
                      CacheWarning, stacklevel=3)
    if current == data:
        return
    if current is not None and current:
        warnings.warn(f"kernel cache file {path} did not match the source the compiler renders (damaged or "
                      "edited); it was rewritten and the rendered source is used", CacheWarning, stacklevel=3)
    elif current is not None:
        warnings.warn(f"kernel cache file {path} was empty; it was rewritten", CacheWarning, stacklevel=3)
    try:
        _write_atomic(path, data)
    except OSError as exc:  # a read-only cache still runs the kernel: the module comes from memory
        warnings.warn(f"kernel cache file {path} could not be written ({exc.strerror}); "
                      "the kernel runs from memory", CacheWarning, stacklevel=3)


def _write_atomic(path: Path, data: bytes) -> None:
    """A unique temporary file per call (process and thread), flushed, then renamed over the target."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _execute(source: str, path: Path, name: str) -> ModuleType:
    """Run verified source as a module whose `__file__` is the cache file, without reading that file."""
    filename = str(path)
    # Pinned in linecache (mtime None: checkcache never reloads it), so `inspect.getsource` — how
    # triton.jit reads a kernel — sees these lines even if the file changes afterwards.
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    module = ModuleType(name)
    module.__file__ = filename
    module.__maskdsl_source__ = source
    sys.modules[name] = module  # triton resolves a kernel's globals through its module
    try:
        exec(compile(source, filename, "exec"), module.__dict__)  # noqa: S102 - our own rendered source
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
