"""The one Markdown table writer (kim_plugins.markdown)."""
import math

import pytest

from kim_plugins.markdown import markdown_table


def test_exact_table_with_headers_floats_nan_and_missing():
    rows = [dict(a=1, b=0.12345), dict(a="x", b=math.nan), dict(a=2)]
    out = markdown_table(rows, ["a", "b"], headers=["A", "B (s)"], floatfmt="{:.2f}", missing="—")
    assert out == ("| A | B (s) |\n|---|---|\n| 1 | 0.12 |\n| x | n/a |\n| 2 | — |")


def test_default_columns_are_union_in_first_seen_order_and_callable_format():
    out = markdown_table([dict(b=1.0), dict(a=2.5, b=3.0)], floatfmt=lambda v: f"{v:g}")
    assert out.splitlines()[0] == "| b | a |"
    assert out.splitlines()[2:] == ["| 1 |  |", "| 3 | 2.5 |"]


def test_empty_and_header_mismatch():
    assert markdown_table([]) == "(no rows)"
    with pytest.raises(ValueError, match="2 headers for 1 columns"):
        markdown_table([dict(a=1)], ["a"], headers=["x", "y"])
