"""Small helpers shared across modules."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

from torch import Tensor


def per_sample(coef: Tensor, like: Tensor) -> Tensor:
    """A per-sample coefficient [B] reshaped to broadcast against `like` [B, ...], in its dtype/device."""
    return coef.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    A crash or an exception leaves `path` as it was (old content or absent) and removes the
    temporary file, so readers never see a half-written output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # make the rename itself durable where supported
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def dataclass_from_dict(cls, d: dict, what: str):
    """A config dataclass from its JSON dict, refusing fields it does not know (a checkpoint of
    another model or version should fail loudly, not half-load)."""
    from dataclasses import fields

    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} config fields: {', '.join(sorted(unknown))}")
    return cls(**d)


def run_script(main) -> int:
    """Exit status of a benchmark script's `main()`: bad input (ValueError, OSError, e.g. a wrong
    --run path) ends it with `script: error: message` on stderr and status 2, as the CLI does,
    instead of a traceback."""
    try:
        return int(main() or 0)
    except (ValueError, OSError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        return 2
