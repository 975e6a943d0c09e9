"""Input checks shared by the output-norm layers of the zoo (MABN, SN)."""

from __future__ import annotations

from torch import Tensor


def check_norm_input(layer: object, x: Tensor, dims: tuple[int, ...], num_features: int) -> None:
    """Raise a one-line ``ValueError`` unless ``x`` is (N, C, ...) with an allowed rank and ``num_features`` channels."""
    if x.dim() not in dims:
        want = " or ".join(f"{d}D" for d in dims)
        raise ValueError(f"{type(layer).__name__}: expected {want} input (N, C, ...), got {x.dim()}D")
    if x.shape[1] != num_features:
        raise ValueError(f"{type(layer).__name__}: expected {num_features} channels, got {x.shape[1]}")
