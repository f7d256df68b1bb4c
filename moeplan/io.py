"""File I/O shared by every object: atomic writes and guarded loads.

Writes go to a temporary file in the target's folder and are renamed into place,
so a crash or a validation error never leaves a half-written file. Loads turn
every parse failure into :class:`moeplan.errors.InputError` naming the file.
"""
from __future__ import annotations

import errno
import glob
import gzip
import io
import json
import math
import os
import tempfile
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import yaml

from moeplan.errors import InputError


TEMP_SUFFIX = ".tmp"


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", executable: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it onto ``path`` only on success.

    The file gets the mode a plain ``open()`` would give (0666 less the umask), not mkstemp's
    0600; with ``executable`` (shell scripts) 0777 less the umask, as ``chmod +x`` after a plain
    ``open()`` would. The temporary name carries the writer's process id (``.NAME.PID.XXXX.tmp``), so
    temporaries left by a killed earlier run (SIGKILL, power loss) are recognised and removed
    the next time anything is written there. Any failure to create the folder or the file is an
    InputError naming ``path``.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(target))
        remove_stale_temporaries(target)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=target.parent)
    except OSError as exc:
        raise _output_error(target, exc) from None
    try:
        os.chmod(tmp, (0o777 if executable else 0o666) & ~_umask())
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise _output_error(target, exc) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _umask() -> int:
    """The process's umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _output_error(target: Path, exc: OSError) -> InputError:
    reason = exc.strerror or type(exc).__name__
    return InputError(f"cannot write here ({reason})", source=str(target),
                      fix="give a writable file path (not a folder, not under an existing file)")


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete ``.NAME.PID.*.tmp`` beside ``target`` whose writer process no longer exists; returns them."""
    removed: list[Path] = []
    prefix = f".{target.name}."
    for tmp in target.parent.glob(f"{glob.escape(prefix)}*{TEMP_SUFFIX}"):
        pid_text = tmp.name[len(prefix):].split(".", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            _unlink_quietly(str(tmp))
            removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_text(path: str | os.PathLike[str], text: str, executable: bool = False) -> None:
    """Write ``text`` to ``path`` atomically; ``executable`` for a script (mode 0777 less the umask)."""
    with atomic_open(path, "w", executable=executable) as handle:
        handle.write(text)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(json_safe(data), indent=1, allow_nan=False) + "\n")


def write_yaml(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as block-style YAML, atomically."""
    write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120))


def write_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> None:
    """Write compressed NPZ atomically (``np.savez_compressed`` appends no suffix to a handle)."""
    with atomic_open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars and arrays made plain and every NaN or ±inf made ``null``
    (JSON has no NaN: other parsers reject ``NaN``/``Infinity``)."""
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, (int, str)):
        return value
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    if not p.exists():
        raise InputError("file not found", source=str(p), fix="check the path")
    if p.is_dir():
        raise InputError("is a folder, expected a file", source=str(p), fix="give the file inside it")
    return p.read_bytes()


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file (gzip-compressed when its name ends in ``.gz``), raising InputError on any failure."""
    raw = _read_bytes(path)
    if str(path).endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise InputError(f"not a valid gzip file ({exc})", source=str(path), fix="gzip the JSON again") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"not valid JSON ({exc})", source=str(path), fix="write valid UTF-8 JSON") from None


SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Parse a YAML file with the safe loader (libyaml's C one where PyYAML has it: 4.5× less CPU
    on a 7.7 MB profile imported from aiconfigurator-core, the same content), raising InputError
    on any failure."""
    raw = _read_bytes(path)
    try:
        return yaml.load(raw.decode("utf-8"), Loader=SAFE_LOADER)
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError, ValueError, TypeError) as exc:
        raise InputError(f"not valid YAML ({exc})", source=str(path), fix="write valid UTF-8 YAML") from None


# What np.load raises on a malformed archive: zip and zlib errors, .npy headers that do not parse
# (numpy reads them with ast.literal_eval), and shapes too large to allocate.
NPZ_ERRORS = (ValueError, OSError, zipfile.BadZipFile, zlib.error, EOFError, KeyError, NotImplementedError, TypeError,
              SyntaxError, tokenize.TokenError, RecursionError, MemoryError)


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load every array of an NPZ file (no pickles), raising InputError on any failure."""
    raw = _read_bytes(path)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except NPZ_ERRORS as exc:
        reason = ("it holds pickled Python objects, which moeplan never loads" if "allow_pickle" in str(exc)
                  else str(exc))
        raise InputError(f"not a readable NPZ archive ({reason})", source=str(path),
                         fix="give a trace written by 'moeplan trace synth' or 'trace collect'") from None


def read_any(path: str | os.PathLike[str]) -> Any:
    """Read JSON or YAML by the file's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return read_json(path)
    if suffix in (".yaml", ".yml"):
        return read_yaml(path)
    raise InputError(f"unknown file type '{suffix}'", source=str(path), fix="use a .json, .yaml or .yml file")


class Fields:
    """Typed, named access to a loaded mapping: every bad field becomes an InputError.

    ``Fields(data, "plan.json")`` wraps a dict; ``f.int("num_experts", minimum=1)``
    returns the value or raises with the file and the dotted field name.
    """

    def __init__(self, data: Any, source: str, prefix: str = "") -> None:
        if not isinstance(data, dict):
            raise InputError(f"expected a mapping, got {type(data).__name__}", source=source,
                             field=prefix.rstrip(".") or "", fix="check the file's structure")
        self.data = data
        self.source = source
        self.prefix = prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str, default: Any = ...) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise InputError("missing", source=self.source, field=self.name(key), fix=f"add '{key}'")
            return default
        return self.data[key]

    def sub(self, key: str, default: Any = ...) -> "Fields":
        value = self.raw(key, {} if default is ... else default)
        return Fields(value, self.source, f"{self.name(key)}.")

    def int(self, key: str, default: Any = ..., minimum: int | None = None, maximum: int | None = None,
            fix: str = "") -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise InputError(f"expected an integer, got {value!r}", source=self.source, field=self.name(key))
        value = int(value)
        if minimum is not None and value < minimum:
            raise InputError(f"must be ≥ {minimum}, got {value}", source=self.source, field=self.name(key))
        if maximum is not None and value > maximum:
            raise InputError(f"must be ≤ {maximum}, got {value}", source=self.source, field=self.name(key), fix=fix)
        return value

    def float(self, key: str, default: Any = ..., minimum: float | None = None,
              positive: bool = False) -> float:
        value = _yaml_number(self.raw(key, default))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"expected a finite number, got {value!r}", source=self.source, field=self.name(key))
        value = float(value)
        if positive and not value > 0:
            raise InputError(f"must be > 0, got {value}", source=self.source, field=self.name(key))
        if minimum is not None and value < minimum:
            raise InputError(f"must be ≥ {minimum}, got {value}", source=self.source, field=self.name(key))
        return value

    def str(self, key: str, default: Any = ..., choices: tuple[str, ...] | None = None) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise InputError(f"expected text, got {value!r}", source=self.source, field=self.name(key))
        if choices is not None and value not in choices:
            raise InputError(f"must be one of {', '.join(choices)}; got {value!r}", source=self.source,
                             field=self.name(key))
        return value

    def bool(self, key: str, default: Any = ...) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise InputError(f"expected true or false, got {value!r}", source=self.source, field=self.name(key))
        return value

    def list(self, key: str, default: Any = ...) -> list[Any]:
        value = self.raw(key, default)
        if not isinstance(value, list):
            raise InputError(f"expected a list, got {type(value).__name__}", source=self.source,
                             field=self.name(key))
        return value

    def numbers(self, key: str, default: Any = ..., positive: bool = False) -> list[float]:
        values = self.list(key, default)
        out: list[float] = []
        for i, v in enumerate(values):
            v = _yaml_number(v)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f"item {i} is not a finite number: {v!r}", source=self.source, field=self.name(key))
            if positive and not v > 0:
                raise InputError(f"item {i} must be > 0, got {v}", source=self.source, field=self.name(key))
            out.append(float(v))
        return out

    def fail(self, key: str, message: str, fix: str = "") -> InputError:
        return InputError(message, source=self.source, field=self.name(key), fix=fix)


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads ``3e14`` (no dot, no exponent sign) as text; accept such numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def guarded_load(loader: Callable[[], Any], source: str) -> Any:
    """Run ``loader``; turn stray structural errors (wrong types deep inside) into InputError."""
    try:
        return loader()
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
        raise InputError(f"malformed content ({type(exc).__name__}: {exc})", source=source,
                         fix="compare with a file moeplan wrote") from None
