"""Locating and reading the evaluation/calibration data (read in place, never copied)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from ..errors import UserError

WIKITEXT2_TEST = "wikitext-2/wiki.test.raw"
WIKITEXT2_VALID = "wikitext-2/wiki.valid.tokens"


DATA_ENV = "IPU_SPARSE_DATA"
DEFAULT_DATA_ROOT = "../shared/data"


def data_root() -> Path:
    """Where a data file the user did not name is read from: ``$IPU_SPARSE_DATA``, else
    ``../shared/data`` relative to the working directory (the documented default, for runs
    from the repository checkout). The one place a default data location is decided."""
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT)


def data_path(path: Optional[str], default_rel: str) -> Path:
    p = Path(path) if path else data_root() / default_rel
    if not p.is_file():
        raise UserError(f"{p}: data file not found" + ("" if path else f" (pass a path, or set {DATA_ENV})"))
    return p


def read_rows(path) -> List[str]:
    """A WikiText file as dataset rows: a blank line is an empty row, any other line keeps its newline."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read text ({exc})") from None
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]
