"""The zoo's methods' module in earlier releases: everything lives in :mod:`pwsconv.methods` now."""

from .methods import methods_table  # noqa: F401
from .methods.mabn import MABN_DEFAULT_BATCH_SIZE, MABN_DEFAULT_REAL_BATCH_SIZE  # noqa: F401
