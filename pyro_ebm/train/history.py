r"""Training history: one record (a dict of metrics) per evaluation, saved as JSON or CSV."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

from .checkpoint import atomic_write

__all__ = ["History"]


def _flat(record: dict) -> dict:
    """Lists become numbered columns: ``{"w": [a, b]} -> {"w_0": a, "w_1": b}``."""
    out = {}
    for key, value in record.items():
        if isinstance(value, (list, tuple)):
            out.update({f"{key}_{i}": v for i, v in enumerate(value)})
        else:
            out[key] = value
    return out


class History:
    r"""A list of evaluation records, each a dict of numbers (or lists of numbers).

    Example::

        >>> h = History()
        >>> h.append({"step": 10, "loss": 0.5, "weights": [0.3, 0.7]})
        >>> h["loss"], h.last["step"], len(h)
        ([0.5], 10, 1)
    """

    def __init__(self, records: list[dict] | None = None) -> None:
        self.records: list[dict] = list(records or [])

    def append(self, record: dict) -> None:
        """Add one step's record ``{name: value}``."""
        self.records.append(dict(record))

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    def __getitem__(self, key: str) -> list:
        """The values of ``key`` over the records that have it."""
        return [r[key] for r in self.records if key in r]

    @property
    def last(self) -> dict:
        if not self.records:
            raise IndexError("the history is empty")
        return self.records[-1]

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the records as a JSON list (atomically); non-finite numbers become ``null``."""

        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, (list, tuple)):
                return [clean(u) for u in v]
            return v

        records = [{k: clean(v) for k, v in r.items()} for r in self.records]
        return atomic_write(path, lambda f: json.dump(records, f, indent=1))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> History:
        """Read :meth:`to_json`'s file (its ``null`` back to ``nan``)."""

        def restore(v):
            if v is None:
                return math.nan
            if isinstance(v, list):
                return [restore(u) for u in v]
            return v

        records = json.loads(Path(path).read_text())
        return cls([{k: restore(v) for k, v in r.items()} for r in records])

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the records as CSV (atomically), list-valued metrics as numbered columns."""
        rows = [_flat(r) for r in self.records]
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]

        def write(f):
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

        return atomic_write(path, write)

    def __repr__(self) -> str:
        return f"History({len(self)} records)"
