"""The cell table: the columns of every ``cells.parquet`` (cohort, embedding store, index), in one place.

A cohort writes these columns with these dtypes; embedding stores and indexes carry the cohort's rows
on (an index adds ``source``); searches filter and vote on them; probes read their labels from them.
Any other column a source's table brings (a site, scanner or scan date per cell) is an *extra* column:
carried on as it is, never interpreted, e.g. for ``probe eval --group-by site``.
"""

from __future__ import annotations

from collections.abc import Iterable

# Column -> pandas dtype, in the order a cohort writes them.
CELL_DTYPES: dict[str, str] = {
    "cell_id": "string",  # sha1 of the image path relative to the cohort root
    "path": "string",  # the image, relative to the cohort root (POSIX separators)
    "patient_id": "string",
    "cell_type": "string",
    "is_blast": "boolean",
    "mutation": "string",
    "domain": "string",  # centre, scanner or stain batch
    "split": "string",
    "width": "int32",
    "height": "int32",
}
CELL_COLUMNS = list(CELL_DTYPES)
# What a source may say about a cell (everything but its id, path and size); also the search filters.
LABEL_COLUMNS = ["patient_id", "cell_type", "is_blast", "mutation", "domain", "split"]
# The labels cells are classified by: counted in a cohort's meta.json and ``index info``, voted on in searches.
CLASS_COLUMNS = ("mutation", "cell_type", "is_blast")
COUNTED_COLUMNS = (*CLASS_COLUMNS, "domain")
# Columns later steps add to the table (an index numbers the stores it holds); with the above, never extra columns.
ADDED_COLUMNS = ("source",)
RESERVED_COLUMNS = (*CELL_COLUMNS, *ADDED_COLUMNS)


def extra_columns(columns: Iterable[str]) -> list[str]:
    """The columns of ``columns`` that are no part of the schema, in their order."""
    return [str(c) for c in columns if c not in RESERVED_COLUMNS]
