"""The paper's tables, one file each: ``tables/<name>.py`` declares ``TABLE`` (a :class:`~pwsconv.experiments.table.Table`:
title, preset sizes, grid, paper numbers, summary, plots). Adding a table is adding its file and its name to
``FILES``; ``pwsconv reproduce <name>`` (:mod:`pwsconv.experiments.paper`) then runs it. See docs/tables.md."""

from __future__ import annotations

import importlib

from ..table import Table

#: the table files, in the order ``pwsconv reproduce --help`` lists them
FILES = ("table4", "table1", "table2", "collapse", "robust")

TABLES: dict[str, Table] = {}
for _file in FILES:
    _t = importlib.import_module(f"{__name__}.{_file}").TABLE
    TABLES[_t.name] = _t

__all__ = ["TABLES", "FILES", "Table"]
