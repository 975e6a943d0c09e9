"""``pwsconv.load``: a trained or folded model back as an ``nn.Module``, with the preprocessing it expects.

    model = pwsconv.load("runs/train")            # a run directory, its checkpoint.pt, or a `pwsconv fold` file
    x = model.preprocess(image)                   # PIL image, HWC array or CHW/NCHW tensor → normalized [N, C, H, W]
    logits = model(x)
    model.pretrained_cfg                          # mean, std, input_size, num_classes, ... (timm's keys)

The model comes back in eval mode on the CPU. ``model.preprocess`` is a :class:`Preprocess` module (scale to 0..1,
resize when the size differs, per-channel normalization with the training set's mean and std); it is not a submodule,
so the state dict, ``model.to(...)`` and an ONNX export of ``model`` are those of the network alone. To export the
preprocessing too: ``torch.onnx.export(nn.Sequential(model.preprocess, model), ...)`` on 0..1 float input.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, check_model_spec, load_checkpoint

__all__ = ["load", "load_model_file", "Preprocess"]


class Preprocess(nn.Module):
    """The input transform a loaded model expects: ``(x/255 − mean)/std`` per channel (the training loader's), after
    resizing to ``image_size`` when the input has another size (shorter side to the target, then a center crop; the
    usual ImageNet-style evaluation transform).

    Accepts a PIL image, a NumPy array ``HW``/``HWC``/``NHWC`` (as images are stored) or a tensor ``CHW``/``NCHW``
    (torchvision's layout); uint8 values are 0..255, floating-point values 0..1. Returns a float32 ``[N, C, H, W]``
    tensor (on the input tensor's device).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], image_size: Sequence[int] | int | None = None):
        super().__init__()
        mean_t = torch.as_tensor([float(v) for v in mean], dtype=torch.float32)
        std_t = torch.as_tensor([float(v) for v in std], dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.shape != std_t.shape or not len(mean_t):
            raise ValueError(f"mean and std must be one value per channel, got {list(mean)} and {list(std)}")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = None if image_size is None else tuple(int(v) for v in image_size)

    @property
    def channels(self) -> int:
        return int(self.mean.shape[1])

    def _to_tensor(self, x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.unsqueeze(0) if x.ndim == 3 else x
        if hasattr(x, "convert") and hasattr(x, "mode"):   # a PIL image: the model's channel count decides its mode
            x = x.convert("L" if self.channels == 1 else "RGB") if self.channels in (1, 3) else x
        arr = np.asarray(x)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise ValueError(f"an image must be HW, HWC or NHWC, got an array of shape {arr.shape}")
        return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())

    def forward(self, x: Any) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():   # exported: a tensor batch of the right size
            x = x.to(torch.float32) / 255.0 if not x.is_floating_point() else x.to(torch.float32)
            return (x - self.mean) / self.std
        x = self._to_tensor(x)
        if x.ndim != 4:
            raise ValueError(f"a tensor image must be CHW or NCHW, got shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise ValueError(f"the model expects {self.channels} channel(s); the input has {x.shape[1]} "
                             f"(shape {tuple(x.shape)}: tensors are CHW/NCHW, arrays HWC/NHWC)")
        if x.is_floating_point() and x.numel() and not (-1e-3 <= float(x.min()) and float(x.max()) <= 1 + 1e-3):
            raise ValueError(f"float images must hold pixels in 0..1 (this one spans {float(x.min()):.4g}.."
                             f"{float(x.max()):.4g}): divide 0..255 values by 255 or pass uint8, and do not "
                             "normalize them first (preprocess does)")
        x = x.to(torch.float32) / 255.0 if not x.is_floating_point() else x.to(torch.float32)
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size:
            (h, w), (th, tw) = x.shape[-2:], self.image_size
            s = max(th / h, tw / w)   # cover the target, then crop its center
            size = (max(th, round(h * s)), max(tw, round(w * s)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=s < 1)
            top, left = (size[0] - th) // 2, (size[1] - tw) // 2
            x = x[..., top:top + th, left:left + tw]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def extra_repr(self) -> str:
        return (f"mean={[round(v, 4) for v in self.mean.flatten().tolist()]}, "
                f"std={[round(v, 4) for v in self.std.flatten().tolist()]}, image_size={self.image_size}")


def load_model_file(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(network in eval mode, its model spec, the checkpoint dict) from a run directory, a training checkpoint or a
    ``pwsconv fold`` file; anything wrong is a one-line :class:`~pwsconv.train.CheckpointError`."""
    from .engine import build_from_spec

    ck = load_checkpoint(path)
    spec = ck.get("model_spec")
    if not isinstance(spec, dict) or "model" not in ck:
        raise CheckpointError(f"{path} has no model (missing model_spec or model state)")
    check_model_spec(spec, str(path))   # a file edited by hand: its fields, named, before they are used
    try:
        model = build_from_spec(spec)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its model_spec cannot build a network: {' '.join(str(e).split())}") from None
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: the stored weights do not fit the model {spec.get('model')!r}: {first}") from None
    return model.eval(), spec, ck


def _pretrained_cfg(spec: Mapping[str, Any], source: str, base: Mapping[str, Any] | None) -> dict[str, Any]:
    size = spec.get("image_size")
    size = None if size is None else (tuple(int(v) for v in size) if isinstance(size, (list, tuple)) else (int(size),) * 2)
    cfg = dict(base or {})   # a timm model's own entries stay (timm's data helpers read this dict)
    cfg.update({
        "mean": tuple(float(v) for v in spec["mean"]), "std": tuple(float(v) for v in spec["std"]),
        "input_size": (int(spec["in_channels"]), *size) if size else None,
        "num_classes": int(spec["num_classes"]), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
        "model": spec["model"], "method": spec["method"], "method_opts": dict(spec.get("method_opts") or {}),
        "model_opts": dict(spec.get("model_opts") or {}), "dataset": spec.get("dataset"),
        "folded": bool(spec.get("folded")), "source": source,
    })
    return cfg


def load(path: str | os.PathLike, *, fold: bool = False) -> nn.Module:
    """The network saved at ``path`` — a run directory of ``pwsconv train``, its ``checkpoint.pt``, or the file
    ``pwsconv fold`` wrote — rebuilt and loaded (``weights_only=True``, CRC-verified), in eval mode, on the CPU.

    Args:
        fold: fold reparameterized layers (PWS, WS, ...) and eval-mode BN into plain convs, as ``pwsconv fold`` does
            (same outputs up to rounding; a folded file is already plain).

    Beside the network:

    * ``model.preprocess``: a :class:`Preprocess` (PIL image / array / tensor → the normalized ``[N, C, H, W]`` float
      tensor the network was trained on: the training set's per-channel mean and std, its image size);
    * ``model.pretrained_cfg``: a dict in timm's terms (``mean``, ``std``, ``input_size`` ``(C, H, W)``,
      ``num_classes``, ``interpolation``, ``crop_pct``) plus ``model``, ``method``, ``dataset``, ``folded``, ``source``.

    Neither is a submodule: ``model.state_dict()`` and ``torch.onnx.export(model, ...)`` are the network's alone.
    """
    model, spec, _ = load_model_file(path)
    if fold and not spec.get("folded"):
        from ..convert import fold as fold_model

        model = fold_model(model.eval())
        spec = {**spec, "folded": True}
    cfg = _pretrained_cfg(spec, os.path.abspath(os.fspath(path)), getattr(model, "pretrained_cfg", None))
    size = cfg["input_size"][1:] if cfg["input_size"] else None
    # plain attributes, not submodules: the network's state dict, device moves and exports stay its own
    object.__setattr__(model, "preprocess", Preprocess(cfg["mean"], cfg["std"], size))
    object.__setattr__(model, "pretrained_cfg", cfg)
    return model.eval()
