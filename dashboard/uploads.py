"""Uploaded files (a Hugging Face config.json, a routing trace): kept once per server under their
SHA-256 and written to a scratch folder under their own name, because the library's loaders read
paths; errors name the file as the user uploaded it."""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import streamlit as st

from moeplan.errors import InputError

UPLOAD_DIR = Path(tempfile.gettempdir()) / "moeplan-dashboard"


@st.cache_resource(show_spinner=False)
def _store() -> dict[str, tuple[str, bytes]]:
    """Uploaded files by SHA-256: (file name, bytes)."""
    return {}


def register(name: str, data: bytes) -> str:
    """Keep an uploaded file; returns its digest."""
    digest = hashlib.sha256(data).hexdigest()
    _store()[digest] = (name, data)
    return digest


def upload_path(digest: str) -> Path:
    """The uploaded file on disk under its own name (the library's loaders read paths)."""
    name, data = _store()[digest]
    path = UPLOAD_DIR / digest[:16] / Path(name).name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path


def error_text(exc: InputError) -> str:
    """The error as the CLI prints it, naming an uploaded file by its own name."""
    text = str(exc)
    for digest, (name, _) in _store().items():
        text = text.replace(str(UPLOAD_DIR / digest[:16] / Path(name).name), name)
    return text
