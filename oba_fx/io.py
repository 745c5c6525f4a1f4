"""Atomic file output: write to a temporary file in the same folder, then rename.

The implementation is ``oba_fx.passes.fileio`` (shared with the passes); this is its name in the public API.
"""
from __future__ import annotations

from .passes.fileio import atomic_write, write_json, write_text

__all__ = ["atomic_write", "write_text", "write_json"]
