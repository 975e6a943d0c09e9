"""The paper's tables, one file each: ``tables/<name>.py`` declares ``TABLE`` (a
:class:`~pwsconv.experiments.table.Table`: title, preset sizes, grid, paper numbers, summary, plots; or for detection
and ImageNet a :class:`~pwsconv.experiments.det_table.DetTable`). Adding a table is adding its file and its name to
``FILES`` (or ``DET_FILES``); ``pwsconv reproduce <name>`` then runs it. See docs/tables.md."""

from __future__ import annotations

import importlib

from ..det_table import DetTable
from ..table import Table

#: the table files, in the order ``pwsconv reproduce --help`` lists them: the CIFAR-10 tables (run by
#: :mod:`pwsconv.experiments.paper`) and the detection / ImageNet tables (run by :mod:`pwsconv.experiments.detection`)
FILES = ("table4", "table1", "table2", "collapse", "robust")
DET_FILES = ("voc_table1", "voc_table2", "coco_table3", "imagenet_table5")


def _load(files: tuple[str, ...]) -> dict:
    tables = [importlib.import_module(f"{__name__}.{f}").TABLE for f in files]
    return {t.name: t for t in tables}


TABLES: dict[str, Table] = _load(FILES)
DET_TABLES: dict[str, DetTable] = _load(DET_FILES)

__all__ = ["TABLES", "DET_TABLES", "FILES", "DET_FILES", "Table", "DetTable"]
