"""``wn``: Weight Normalization, Ŵ_o = g_o·W_o/‖W_o‖ with g = 1 as the paper (``data_init`` option)."""

from ..layers.wn import WNConv1d, WNConv2d, WNConv3d, WNLinear
from ._base import Method, Option, by_dim

METHOD = Method("wn", "filters: Ŵ_o = g_o·W_o/‖W_o‖ (g = 1 as the paper; data_init option)",
                by_dim({1: WNConv1d, 2: WNConv2d, 3: WNConv3d}), None, True,
                linear=lambda i, o, b, **kw: WNLinear(i, o, bias=b, **kw),
                conv_options=(Option("data_init", bool, doc="Salimans & Kingma's data-dependent init of g and the bias "
                                                            "on the first training batch (False)"),),
                extra_params="g per filter", reference="Salimans & Kingma 2016")
