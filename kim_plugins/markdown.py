"""Markdown tables: the one writer every report, tool and benchmark uses.

:func:`markdown_table` renders rows (mappings) as a GitHub-flavoured Markdown
table. Columns are keys of the rows; ``headers`` renames them for display;
floats go through ``floatfmt`` (a format string or a callable), NaN prints as
``n/a`` and a missing key as ``missing``.

FLOP convention used by every table in this project (:data:`FLOP_CONVENTION`):
one multiply-add counts as **one** FLOP, as mmengine's
``get_model_complexity_info`` (and so mmseg's ``get_flops.py``) and fvcore
count it. Counters that count a multiply-add as two (``torch.utils.flop_counter``)
are halved before they reach a table.
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

__all__ = ["markdown_table", "FLOP_CONVENTION", "FLOP_HEADER_NOTE"]

FLOP_CONVENTION = "one multiply-add = 1 FLOP (mmengine/fvcore convention)"
FLOP_HEADER_NOTE = "FLOPs count one multiply-add as 1 (mmengine/fvcore convention, as mmseg's get_flops.py)."


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None,
                   headers: Optional[Sequence[str]] = None,
                   floatfmt: Union[str, Callable[[float], str]] = "{:.3f}",
                   missing: str = "", empty: str = "(no rows)") -> str:
    """Render ``rows`` as a Markdown table.

    Args:
        rows: One mapping per table row.
        columns: Keys to show, in order. Default: the union of the rows' keys in first-seen order.
        headers: Display names of ``columns`` (same length). Default: the column keys.
        floatfmt: Format string or callable for float cells; NaN prints as ``n/a``.
        missing: Text of a cell whose key a row lacks.
        empty: What to return when there are no rows.

    Returns:
        The table as one string (no trailing newline).

    Raises:
        ValueError: if ``headers`` and ``columns`` differ in length.
    """
    if not rows:
        return empty
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    headers = list(headers) if headers is not None else columns
    if len(headers) != len(columns):
        raise ValueError(f"markdown_table: {len(headers)} headers for {len(columns)} columns; "
                         "pass one header per column")
    fmt_float = floatfmt if callable(floatfmt) else floatfmt.format

    def cell(row: Mapping[str, Any], key: str) -> str:
        if key not in row:
            return missing
        v = row[key]
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else fmt_float(v)
        return str(v)

    lines: List[str] = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
