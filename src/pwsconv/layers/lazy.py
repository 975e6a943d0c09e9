"""Lazy PWS convolutions: ``in_channels`` is inferred from the first input, as ``nn.LazyConv2d`` does, and the layer
then becomes a :class:`pwsconv.PWSConv2d` (torch's ``cls_to_become`` mechanism). :func:`pwsconv.convert` uses them
for ``nn.LazyConv*d`` layers that have not seen an input yet."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn.modules.conv import _LazyConvXdMixin
from torch.nn.parameter import UninitializedParameter

from .pws import PWSConv1d, PWSConv2d, PWSConv3d

__all__ = ["LazyPWSConv1d", "LazyPWSConv2d", "LazyPWSConv3d"]


class _LazyPWSConvNd(_LazyConvXdMixin):
    _torch_conv: type[nn.Module]

    def __init__(self, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device: Any = None,
                 dtype: Any = None, **pws_opts: Any) -> None:
        if not isinstance(out_channels, int) or isinstance(out_channels, bool) or out_channels < 1:
            raise ValueError(f"{type(self).__name__}: out_channels must be a positive int, got {out_channels!r}")
        kw = {"device": device, "dtype": dtype}
        # the torch conv's own constructor with 0 channels, as nn.LazyConv*d does (PWS's would refuse them)
        self._torch_conv.__init__(self, 0, 0, kernel_size, stride, padding, dilation, groups, False,  # type: ignore
                                  padding_mode, **kw)
        self.weight = UninitializedParameter(**kw)
        self.out_channels = out_channels
        if bias:
            self.bias = UninitializedParameter(**kw)
        self._lazy_pws_opts = dict(pws_opts)
        # what LazyModuleMixin.__init__ registers (its __init__ would run the PWS constructor with 0 channels)
        self._load_hook = self._register_load_state_dict_pre_hook(self._lazy_load_hook)
        self._initialize_hook = self.register_forward_pre_hook(self._infer_parameters, with_kwargs=True)

    def initialize_parameters(self, input: Tensor, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if not self.has_uninitialized_params():
            return
        super().initialize_parameters(input, *args, **kwargs)   # in_channels from the input, weight/bias materialized
        opts = dict(gamma=1e-3, use_alpha=True, use_gain=True, fan_mode="fan_in", equiv=False, data_init_alpha=False)
        opts.update(self._lazy_pws_opts)
        self._pws_setup(**opts)   # α, the settings, the PWS (He) init
        del self._lazy_pws_opts

    def extra_repr(self) -> str:  # type: ignore[override]
        if self.has_uninitialized_params():
            return f"out_channels={self.out_channels}, kernel_size={self.kernel_size}, uninitialized"
        return super().extra_repr()


class LazyPWSConv1d(_LazyPWSConvNd, PWSConv1d):
    """``nn.LazyConv1d`` that becomes a :class:`pwsconv.PWSConv1d` on its first forward."""
    cls_to_become = PWSConv1d
    _torch_conv = nn.Conv1d

    def _get_num_spatial_dims(self) -> int:
        return 1


class LazyPWSConv2d(_LazyPWSConvNd, PWSConv2d):
    """``nn.LazyConv2d`` that becomes a :class:`pwsconv.PWSConv2d` on its first forward."""
    cls_to_become = PWSConv2d
    _torch_conv = nn.Conv2d

    def _get_num_spatial_dims(self) -> int:
        return 2


class LazyPWSConv3d(_LazyPWSConvNd, PWSConv3d):
    """``nn.LazyConv3d`` that becomes a :class:`pwsconv.PWSConv3d` on its first forward."""
    cls_to_become = PWSConv3d
    _torch_conv = nn.Conv3d

    def _get_num_spatial_dims(self) -> int:
        return 3
