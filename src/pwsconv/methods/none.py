"""``none``: no normalization, a plain He-initialized conv with bias (the paper's baseline that collapses)."""

from ._base import Method, plain_conv

METHOD = Method("none", "nothing: plain conv with bias, He init", plain_conv, None, True, extra_params="—",
                reference="He et al. 2015 (init)")
