"""Every README example runs as written (issue 28): the README's ```bash blocks, in order, in one
temporary folder, with this checkout's ``moeplan`` first on PATH.

A block whose first line is ``# test: skip (REASON)`` is skipped with REASON as the pytest skip
message (GPU-only, network, long-running servers). Blocks that would take long are made small in the
README itself (``--tokens 20000 --time-limit 10``), so the whole file stays within a few minutes on
two cores. The temporary folder holds a copy of the repo's ``tiny-mla.json``, as a checkout does,
because one example reads it.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SKIP = re.compile(r"^#\s*test:\s*skip\s*\((.*)\)\s*$")
BLOCK_TIMEOUT_S = 180


def bash_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of each ```bash block, in order."""
    blocks, body, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if body is None and line.strip() == "```bash":
            body, start = [], number + 1
        elif body is not None and line.strip() == "```":
            blocks.append((start, "\n".join(body)))
            body = None
        elif body is not None:
            body.append(line)
    assert body is None, f"README.md: the ```bash block at line {start} is not closed"
    return blocks


BLOCKS = bash_blocks(README.read_text())


def skip_reason(body: str) -> str | None:
    first = body.splitlines()[0] if body.strip() else ""
    match = SKIP.match(first.strip())
    return match.group(1) if match else None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("readme")
    bin_dir = root / ".bin"
    bin_dir.mkdir()
    shim = bin_dir / "moeplan"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "from moeplan.cli import main; main()" "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    work = root / "work"
    work.mkdir()
    shutil.copy(REPO / "tiny-mla.json", work / "tiny-mla.json")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
           "COLUMNS": "160"}
    return {"cwd": work, "env": env, "failed": []}


def test_the_readme_has_runnable_and_skipped_blocks() -> None:
    reasons = [skip_reason(body) for _, body in BLOCKS]
    assert any(r is None for r in reasons) and any(r is not None for r in reasons)
    assert skip_reason(BLOCKS[0][1]), "the first block (pip install) is skipped"
    assert all(r for r in reasons if r is not None), "every skip marker gives its reason"


@pytest.mark.parametrize("start, body", BLOCKS, ids=[f"line{start}" for start, _ in BLOCKS])
def test_readme_block_runs(start: int, body: str, workdir: dict[str, object]) -> None:
    reason = skip_reason(body)
    if reason is not None:
        pytest.skip(f"README.md line {start}: {reason}")
    failed: list[int] = workdir["failed"]  # type: ignore[assignment]
    if failed:
        pytest.skip(f"an earlier README block failed (line {failed[0]}); this one builds on it")
    script = "set -euo pipefail\n" + body + "\n"
    try:
        done = subprocess.run(["bash", "-c", script], cwd=workdir["cwd"], env=workdir["env"],  # type: ignore[arg-type]
                              capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        failed.append(start)
        pytest.fail(f"README.md block at line {start} ran past {BLOCK_TIMEOUT_S} s; make it smaller in the README")
    if done.returncode != 0:
        failed.append(start)
    assert done.returncode == 0, (f"README.md block at line {start} exited {done.returncode}:\n{body}\n"
                                  f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}")
    assert "Traceback" not in done.stdout + done.stderr
