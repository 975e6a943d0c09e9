"""The method registry's name in earlier releases: everything lives in :mod:`pwsconv.methods` now."""

from .methods import (CONV_CLASSES, Method, NormMethod, available_methods, build_conv, build_linear,  # noqa: F401
                      build_norm, get_method, gn_groups, plain_conv, register_method)
