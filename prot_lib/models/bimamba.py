"""A bidirectional Mamba stack and the write-up's S6 regressor built on it.

Each layer runs one Mamba block along the sequence and one along the reversed sequence (as in
Vision Mamba, Zhu et al. 2024, and BiMamba for genomics / tabular sequences), combines them, and
adds the result to the residual stream:

    z = norm(h)                                  (Identity when norm=None)
    f = fwd(z),  b = flip(bwd(flip(z)))          flip reverses L
    h = h + combine(f, b)                        combine: f + b ("add") or (f + b) / 2 ("mean")

With norm=None, residual=True and combine="add" (the write-up's default), nothing rescales h between
layers: each layer adds roughly two copies of a signal proportional to h, so the activation scale
grows geometrically with depth (see hustvl/Vim issue #30). This is one of the roads to a NaN loss.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from .mamba import Mamba

NORMS = (None, "layernorm", "rmsnorm")
COMBINES = ("add", "mean")
POOLINGS = ("mean", "last")
# mamba-ssm's Block/MixerModel default norm_epsilon.
NORM_EPS = 1e-5


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def make_norm(norm: Optional[str], d_model: int) -> nn.Module:
    """The normalisation named by ``norm``: None -> Identity, "layernorm", "rmsnorm" (eps 1e-5).

    Raises:
        ValueError: unknown ``norm`` (names the allowed values).
    """
    _check_choice("norm", norm, NORMS)
    if norm is None:
        return nn.Identity()
    if norm == "layernorm":
        return nn.LayerNorm(d_model, eps=NORM_EPS)
    return nn.RMSNorm(d_model, eps=NORM_EPS)


class BiMambaLayer(nn.Module):
    """One bidirectional layer: (batch, L, d_model) -> (batch, L, d_model).

    Attributes ``norm`` (pre-norm, Identity when none), ``fwd`` and ``bwd`` (two independent
    :class:`Mamba` blocks, the second run over the flipped sequence).

    Args:
        d_model, d_state, d_conv, expand, backend: passed to both :class:`Mamba` blocks.
        norm: None, "layernorm" or "rmsnorm".
        residual: True -> h + combine(f, b); False -> combine(f, b).
        combine: "add" (f + b) or "mean" ((f + b) / 2).

    Raises:
        ValueError: unknown ``norm`` or ``combine``.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 norm: Optional[str] = None, residual: bool = True, combine: str = "add",
                 backend: str = "auto") -> None:
        super().__init__()
        _check_choice("combine", combine, COMBINES)
        self.norm = make_norm(norm, d_model)
        self.fwd = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
        self.bwd = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
        self.residual = residual
        self.combine = combine

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (batch, L, d_model) -> (batch, L, d_model)."""
        z = self.norm(h)
        f = self.fwd(z)
        b = self.bwd(z.flip(1)).flip(1)  # flip back so that b[:, t] belongs to token t
        mixed = f + b if self.combine == "add" else (f + b) / 2
        return h + mixed if self.residual else mixed

    def extra_repr(self) -> str:
        return f"residual={self.residual}, combine={self.combine!r}"


class BiMamba(nn.Module):
    """A stack of :class:`BiMambaLayer`: (batch, L, d_model) -> (batch, L, d_model).

    When ``norm`` is set the stack is pre-norm and ends with a final norm ``norm_f``, like
    mamba-ssm's ``MixerModel``; otherwise ``norm_f`` is Identity.

    Args:
        d_model: width of the residual stream.
        n_layers: number of bidirectional layers (each holds two Mamba blocks).
        d_state, d_conv, expand, backend: passed to every :class:`Mamba` block.
        norm: None, "layernorm" or "rmsnorm".
        residual: add each layer's output to its input.
        combine: "add" or "mean" of the two directions.

    Raises:
        ValueError: an option outside its allowed values (the message names the argument), or
            n_layers < 1.
    """

    def __init__(self, d_model: int, n_layers: int, d_state: int = 16, d_conv: int = 4,
                 expand: float = 2, norm: Optional[str] = None, residual: bool = True,
                 combine: str = "add", backend: str = "auto") -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        _check_choice("norm", norm, NORMS)
        _check_choice("combine", combine, COMBINES)
        self.layers = nn.ModuleList(
            BiMambaLayer(d_model, d_state=d_state, d_conv=d_conv, expand=expand, norm=norm,
                         residual=residual, combine=combine, backend=backend)
            for _ in range(n_layers))
        self.norm_f = make_norm(norm, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (batch, L, d_model) -> (batch, L, d_model)."""
        for layer in self.layers:
            h = layer(h)
        return self.norm_f(h)


class S6Regressor(nn.Module):
    """The write-up's model: token embedding -> BiMamba -> pooling over L -> linear head.

    Forward: x (batch, L, n_features) [, mask (batch, L) bool, True = valid token] -> (batch,)
    predictions. Defaults mirror the write-up: mean pooling, residual "add" combine, NO normalisation.

    Masked (padded) tokens are replaced by zeros before the embedding, so their values, even NaN or
    inf, cannot reach the output; their *number* still matters, because the backward scan runs
    through them. Pooling selects with ``torch.where`` rather than multiplying by the mask, since
    0 * inf = NaN.

    Args:
        n_features: features per token.
        d_model, n_layers, d_state, d_conv, expand, norm, residual, combine, backend: see
            :class:`BiMamba`.
        pooling: "mean" (over valid tokens) or "last" (last valid token).

    Attributes:
        embedding: nn.Linear(n_features, d_model); bimamba: BiMamba; head: nn.Linear(d_model, 1).

    Raises:
        ValueError: an option outside its allowed values (names the argument).
    """

    def __init__(self, n_features: int, d_model: int = 16, n_layers: int = 4, d_state: int = 16,
                 d_conv: int = 4, expand: float = 2, norm: Optional[str] = None,
                 residual: bool = True, combine: str = "add", pooling: str = "mean",
                 backend: str = "auto") -> None:
        super().__init__()
        _check_choice("pooling", pooling, POOLINGS)
        self.pooling = pooling
        self.embedding = nn.Linear(n_features, d_model)
        self.bimamba = BiMamba(d_model, n_layers, d_state=d_state, d_conv=d_conv, expand=expand,
                               norm=norm, residual=residual, combine=combine, backend=backend)
        self.head = nn.Linear(d_model, 1)

    @staticmethod
    def _mask_inputs(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be (batch, L, n_features), got {tuple(x.shape)}")
        if mask is None:
            return x
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask must be (batch, L) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
        return x.masked_fill(~mask.bool()[..., None], 0.0)

    def pool(self, h: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pool token states over L.

        Args:
            h: (batch, L, d_model).
            mask: (batch, L) bool, True = valid; None = all valid. A row with no valid token
                pools to zeros (mean) or to token 0 (last).

        Returns:
            (batch, d_model).
        """
        if mask is None:
            return h.mean(dim=1) if self.pooling == "mean" else h[:, -1]
        mask = mask.bool()
        if self.pooling == "mean":
            total = torch.where(mask[..., None], h, torch.zeros_like(h)).sum(dim=1)
            count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(h.dtype)
            return total / count
        positions = torch.arange(h.shape[1], device=h.device).expand_as(mask)
        last = torch.where(mask, positions, torch.zeros_like(positions)).amax(dim=1)
        return h[torch.arange(h.shape[0], device=h.device), last]

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (batch, L, n_features) float; mask: optional (batch, L) bool -> (batch,) predictions.

        Raises:
            ValueError: x not 3-D, or mask not (batch, L).
        """
        x = self._mask_inputs(x, mask)
        h = self.bimamba(self.embedding(x))
        return self.head(self.pool(h, mask)).squeeze(-1)

    @torch.no_grad()
    def activation_scales(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Max |activation| over valid tokens after the embedding and each BiMamba layer (no grad).

        Used by the book to show how the residual stream grows with depth.

        Args:
            x: (batch, L, n_features); mask: optional (batch, L) bool, as in :meth:`forward`.

        Returns:
            {"embedding": float, "layer0": float, ..., "layer{n-1}": float}, plus "norm_f" when the
            model has a final norm. Values may be inf or nan when the stack overflows.
        """
        def absmax(h: torch.Tensor) -> float:
            if mask is not None:  # padded tokens are not part of the story
                h = torch.where(mask.bool()[..., None], h, torch.zeros_like(h))
            return h.abs().max().item()

        h = self.embedding(self._mask_inputs(x, mask))
        scales = {"embedding": absmax(h)}
        for i, layer in enumerate(self.bimamba.layers):
            h = layer(h)
            scales[f"layer{i}"] = absmax(h)
        if not isinstance(self.bimamba.norm_f, nn.Identity):
            scales["norm_f"] = absmax(self.bimamba.norm_f(h))
        return scales
