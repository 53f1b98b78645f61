"""tierctl lives in tools/tierctl and installs as `tierctl`; before the editable install
knows about it (pyproject not yet updated, or an older venv), import it from the tree."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("tierctl") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
