"""moeplan.io: file modes follow the umask, killed writers' temporaries are removed, JSON has no NaN,
output-path mistakes are InputErrors naming the path, SIGTERM cleans up like Ctrl-C."""
from __future__ import annotations

import gzip
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moeplan.errors import InputError
from moeplan.io import atomic_open, read_json, remove_stale_temporaries, write_json, write_npz, write_text


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_files_get_the_mode_plain_open_gives(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
        write_text(tmp_path / "ours.txt", "x")
        write_npz(tmp_path / "ours.npz", {"a": np.zeros(3)})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "ours.txt") == _mode(tmp_path / "plain.txt") == 0o666 & ~mask
    assert _mode(tmp_path / "ours.npz") == 0o666 & ~mask


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_executable_files_get_0777_less_the_umask(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        write_text(tmp_path / "run.sh", "#!/bin/sh\n", executable=True)
        with atomic_open(tmp_path / "bin.sh", "wb", executable=True) as handle:
            handle.write(b"#!/bin/sh\n")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "run.sh") == _mode(tmp_path / "bin.sh") == 0o777 & ~mask


def test_json_never_contains_nan_or_infinity(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    write_json(out, {"a": float("nan"), "b": [np.float32("inf"), -float("inf"), 1.5], "c": np.int64(3),
                     "d": np.array([np.nan, 2.0]), 4: True})
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, None, 1.5], "c": 3, "d": [None, 2.0], "4": True}


@pytest.mark.parametrize("case", ["folder", "under_file", "readonly"])
def test_output_path_mistakes_are_input_errors(tmp_path: Path, case: str) -> None:
    if case == "folder":
        target = tmp_path
    elif case == "under_file":
        (tmp_path / "f").write_text("x")
        target = tmp_path / "f" / "out.json"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "out.json"
    with pytest.raises(InputError) as err:
        write_json(target, {"a": 1})
    assert str(target) in str(err.value)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("half")
        raise RuntimeError("validation failed")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / f".trace.npz.{dead.stdout.strip()}.abc123.tmp"
    stale.write_bytes(b"x" * 100)
    alive = tmp_path / f".trace.npz.{os.getpid()}.def456.tmp"
    alive.write_bytes(b"y")
    other = tmp_path / ".other.npz.1.x.tmp"
    other.write_bytes(b"z")
    write_npz(tmp_path / "trace.npz", {"a": np.zeros(2)})
    assert not stale.exists() and alive.exists() and other.exists()
    assert remove_stale_temporaries(tmp_path / "trace.npz") == []


def test_sigterm_during_a_write_removes_the_temporary(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from moeplan.cli.common import guarded\n"
        "from moeplan.io import atomic_open\n"
        "@guarded\n"
        "def slow():\n"
        f"    with atomic_open({str(tmp_path / 'out.bin')!r}, 'wb') as h:\n"
        "        h.write(b'x' * 1000)\n"
        "        print('writing', flush=True)\n"
        "        time.sleep(30)\n"
        "import typer\n"
        "try:\n"
        "    slow()\n"
        "except typer.Exit as exc:\n"
        "    sys.exit(exc.exit_code)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ})
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "writing"
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 20
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.returncode == 130
    assert list(tmp_path.iterdir()) == []


def test_read_json_reads_gzip_compressed_files(tmp_path: Path) -> None:
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(b'{"rows": [1, 2]}'))
    assert read_json(tmp_path / "a.json.gz") == {"rows": [1, 2]}
    (tmp_path / "bad.json.gz").write_bytes(b'{"rows": []}')
    with pytest.raises(InputError, match="gzip"):
        read_json(tmp_path / "bad.json.gz")
