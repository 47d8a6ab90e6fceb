"""Bidirectional Mamba: the write-up's two directional stacks, a Vim-style residual stack, and the
S6 regressor built on either.

Two ways to make a causal Mamba block see both directions, selected by ``topology``:

``"stacks"`` (the write-up's model; :class:`BiMambaStacks`)
    Two independent stacks of ``n_layers`` plain Mamba blocks. One reads the sequence, the other
    reads it flipped (and its output is flipped back); the two are fused only at the end, by
    concatenation to 2 * d_model (late fusion, like a bidirectional RNN whose directions never
    meet before the output). By default there is no residual connection and no normalisation
    between blocks, only dropout:

        f_0 = x,        f_i = dropout(fwd_i(f_{i-1}))                          i = 1..n_layers
        b_0 = flip(x),  b_i = dropout(bwd_i(b_{i-1})),   out = cat(f_n, flip(b_n))   (2 * d_model)

    This is scipi1/proT's ``BiMamba`` (``proT/baseline/s6/s6_wrapper.py`` at 2894a5d, before their
    LayerNorm fix). Each plain block maps an input of scale s to roughly c * s^k with k > 1 for
    large s, so with nothing rescaling between blocks there is an unstable fixed point: below it
    the signal dies out layer by layer, above it it grows double-exponentially until a layer
    overflows (their log: "NaN after forward layer 2" at (batch 50, L 1023, d_model 100), finite
    values near 3e26). ``prot_lib.diagnostics.scale`` measures that map.

    Their final fix (``proT/baseline/MAMBA_NAN_FIX_FINAL.md`` at e755f0c^) is a LayerNorm after
    every block, in both stacks, before the dropout: ``norm="layernorm", norm_position="post"``
    (config fix ``postnorm``). mamba-ssm's own convention is the pre-norm residual block
    (``mamba_ssm.modules.block.Block`` inside ``MixerModel``, with a final ``norm_f``):
    ``norm="layernorm", norm_position="pre", residual=True`` (config fix ``layernorm``).

``"layers"`` (:class:`BiMamba`, Vision-Mamba style, Zhu et al. 2024)
    Each layer runs one block along the sequence and one along the flipped sequence, combines
    them, and adds the result to one shared residual stream:

        z = norm(h)                                  (Identity when norm=None)
        f = fwd(z),  b = flip(bwd(flip(z)))          flip reverses L
        h = h + combine(f, b)                        combine: f + b ("add") or (f + b) / 2 ("mean")

    With norm=None, residual=True and combine="add" nothing rescales h between layers: each layer
    adds roughly two copies of a signal proportional to h, so the activation scale grows
    geometrically with depth (see hustvl/Vim issue #30).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from .mamba import Mamba

NORMS = (None, "layernorm", "rmsnorm")
COMBINES = ("add", "mean")
POOLINGS = ("mean", "last")
TOPOLOGIES = ("stacks", "layers")
NORM_POSITIONS = ("pre", "post")
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
        d_model, d_state, d_conv, expand, dt_min, dt_max, backend: passed to both :class:`Mamba` blocks.
        norm: None, "layernorm" or "rmsnorm".
        residual: True -> h + combine(f, b); False -> combine(f, b).
        combine: "add" (f + b) or "mean" ((f + b) / 2).

    Raises:
        ValueError: unknown ``norm`` or ``combine``.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 norm: Optional[str] = None, residual: bool = True, combine: str = "add",
                 backend: str = "auto", dt_min: float = 0.001, dt_max: float = 0.1) -> None:
        super().__init__()
        _check_choice("combine", combine, COMBINES)
        self.norm = make_norm(norm, d_model)
        kw = dict(d_state=d_state, d_conv=d_conv, expand=expand, dt_min=dt_min, dt_max=dt_max, backend=backend)
        self.fwd = Mamba(d_model, **kw)
        self.bwd = Mamba(d_model, **kw)
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
        d_state, d_conv, expand, dt_min, dt_max, backend: passed to every :class:`Mamba` block.
        norm: None, "layernorm" or "rmsnorm".
        residual: add each layer's output to its input.
        combine: "add" or "mean" of the two directions.

    Raises:
        ValueError: an option outside its allowed values (the message names the argument), or
            n_layers < 1.
    """

    def __init__(self, d_model: int, n_layers: int, d_state: int = 16, d_conv: int = 4,
                 expand: float = 2, norm: Optional[str] = None, residual: bool = True,
                 combine: str = "add", backend: str = "auto", dt_min: float = 0.001,
                 dt_max: float = 0.1) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        _check_choice("norm", norm, NORMS)
        _check_choice("combine", combine, COMBINES)
        self.layers = nn.ModuleList(
            BiMambaLayer(d_model, d_state=d_state, d_conv=d_conv, expand=expand, norm=norm,
                         residual=residual, combine=combine, backend=backend, dt_min=dt_min, dt_max=dt_max)
            for _ in range(n_layers))
        self.norm_f = make_norm(norm, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (batch, L, d_model) -> (batch, L, d_model)."""
        for layer in self.layers:
            h = layer(h)
        return self.norm_f(h)


class BiMambaStacks(nn.Module):
    """The write-up's BiMamba: two independent directional stacks, concatenated.

    (batch, L, d_model) -> (batch, L, 2 * d_model); channels [:d_model] come from the forward
    stack, [d_model:] from the backward stack (flipped back, so both halves of token t belong to
    token t). See the module docstring for the equations.

    Attribute names follow scipi1/proT's ``BiMamba`` (``forward_layers``, ``backward_layers``,
    ``forward_norms``, ``backward_norms``) and every block is a :class:`Mamba` with mamba-ssm's
    parameter names, so the write-up's state_dict (mamba-ssm path, with or without its LayerNorm
    fix) loads here with ``strict=True`` when built with the matching options.

    Block i of one stack updates the stack's running activation h (:meth:`block_step`):

        ====================  ===============  ======================================================
        norm_position         residual=False   residual=True
        ====================  ===============  ======================================================
        (norm None)           dropout(B(h))    h + dropout(B(h))
        "post"                dropout(N(B(h)))  N(h + dropout(B(h)))  (their fallback "residual")
        "pre"                 dropout(B(N(h)))  h + dropout(B(N(h)))  (mamba-ssm's Block)
        ====================  ===============  ======================================================

    (B = block_i, N = norm_i; the write-up before its fix is the first cell, its final fix the
    "post"/False cell.) With ``norm_position="pre"`` each stack ends with a final norm
    (``forward_norm_f``, ``backward_norm_f``), as mamba-ssm's ``MixerModel`` ends with ``norm_f``.

    Args:
        d_model: width of each stack (the token embedding width).
        n_layers: Mamba blocks per stack (the model holds 2 * n_layers blocks).
        d_state, d_conv, expand, dt_min, dt_max, backend: passed to every :class:`Mamba` (dt_min, dt_max:
            the range of the initial step size delta, mamba-ssm's defaults 0.001 and 0.1).
        norm: None (the write-up before its fix), "layernorm" or "rmsnorm" (eps 1e-5).
        norm_position: "post" (after each block, the write-up's fix) or "pre" (before each block,
            plus a final norm per stack: mamba-ssm's convention). Ignored when ``norm`` is None.
        residual: add each block's output to its input (default False, as in the write-up).
        dropout: dropout probability after each block (the write-up's ``dropout``; 0 -> Identity).

    Raises:
        ValueError: an option outside its allowed values (the message names the argument),
            n_layers < 1, or dropout outside [0, 1).
    """

    def __init__(self, d_model: int, n_layers: int, d_state: int = 16, d_conv: int = 4,
                 expand: float = 2, norm: Optional[str] = None, norm_position: str = "post",
                 residual: bool = False, dropout: float = 0.0, backend: str = "auto",
                 dt_min: float = 0.001, dt_max: float = 0.1) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        _check_choice("norm", norm, NORMS)
        _check_choice("norm_position", norm_position, NORM_POSITIONS)
        self.d_model = d_model
        self.n_layers = n_layers
        self.norm_kind = norm
        self.norm_position = norm_position
        self.residual = residual

        def blocks() -> nn.ModuleList:
            return nn.ModuleList(Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_min=dt_min,
                                       dt_max=dt_max, backend=backend) for _ in range(n_layers))

        def norms() -> nn.ModuleList:
            return nn.ModuleList(make_norm(norm, d_model) for _ in range(n_layers))

        self.forward_layers = blocks()
        self.backward_layers = blocks()
        self.forward_norms = norms()
        self.backward_norms = norms()
        final = norm is not None and norm_position == "pre"
        self.forward_norm_f = make_norm(norm if final else None, d_model)
        self.backward_norm_f = make_norm(norm if final else None, d_model)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def stack(self, direction: str) -> Tuple[nn.ModuleList, nn.ModuleList, nn.Module]:
        """(blocks, norms, final norm) of ``direction``: "forward" or "backward".

        Raises:
            ValueError: another direction.
        """
        _check_choice("direction", direction, ("forward", "backward"))
        if direction == "forward":
            return self.forward_layers, self.forward_norms, self.forward_norm_f
        return self.backward_layers, self.backward_norms, self.backward_norm_f

    def block_step(self, direction: str, i: int, h: torch.Tensor) -> torch.Tensor:
        """Block ``i`` of one stack with its norm, residual and dropout: (batch, L, d_model) -> same.

        ``h`` is in the stack's own token order (already flipped for "backward")."""
        blocks, norms, _ = self.stack(direction)
        pre = self.norm_position == "pre"
        y = blocks[i](norms[i](h) if pre else h)
        if self.residual:
            h = h + self.dropout(y)
            return h if pre else norms[i](h)
        return self.dropout(y if pre else norms[i](y))

    def run_stack(self, direction: str, x: torch.Tensor) -> torch.Tensor:
        """One directional stack on x (batch, L, d_model), in x's token order -> (batch, L, d_model)."""
        _, _, norm_f = self.stack(direction)
        h = x if direction == "forward" else x.flip(1)
        for i in range(self.n_layers):
            h = self.block_step(direction, i, h)
        h = norm_f(h)
        return h if direction == "forward" else h.flip(1)  # token t of the output belongs to token t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, L, d_model) -> (batch, L, 2 * d_model) = cat(forward stack, backward stack)."""
        return torch.cat([self.run_stack("forward", x), self.run_stack("backward", x)], dim=-1)

    def extra_repr(self) -> str:
        return (f"n_layers={self.n_layers}, norm={self.norm_kind!r}, norm_position={self.norm_position!r}, "
                f"residual={self.residual}")


class S6Regressor(nn.Module):
    """The write-up's S6 regressor: token embedding -> BiMamba -> pooling over L -> linear head.

    Forward: x (batch, L, n_features) [, mask (batch, L) bool, True = valid token] -> (batch,)
    predictions. Defaults mirror scipi1/proT's ``S6`` (``proT/baseline/baseline_models.py`` at
    e755f0c^): two directional stacks, no residual, no normalisation, mean pooling, a Linear head
    on the pooled 2 * d_model context.

    What is kept from the write-up's ``S6`` and what is not:

    * kept: the BiMamba (``topology="stacks"``), mean pooling over L, one Linear head.
    * the embedding: theirs is ``ModularEmbedding`` (a sum of per-feature embeddings: lookup
      tables for ids, Linear for values, Time2Vec for time, NaN replaced by 0); ours is one
      ``nn.Linear(n_features, d_model)`` over raw features. Both put the scale of the raw inputs
      into the first block; ours leaves NaN inputs NaN (the book shows where that leads).
    * the per-target embedding: their head reads ``cat(context, target_embedding)`` because they
      predict several targets per sequence. Here every sequence has one scalar target, so that
      embedding would be the same learned vector for every row; ``W_ctx @ context + W_t @ e + b``
      then equals ``W_ctx @ context + b'``, the Linear head we keep. Nothing is lost.

    Masked (padded) tokens are replaced by zeros before the embedding, so their values, even NaN or
    inf, cannot reach the output; their *number* still matters, because the backward scan runs
    through them. Pooling selects with ``torch.where`` rather than multiplying by the mask, since
    0 * inf = NaN.

    Args:
        n_features: features per token.
        d_model: embedding width (each stack's width; the context is 2 * d_model for "stacks").
        n_layers: Mamba blocks per stack ("stacks") or bidirectional layers ("layers").
        topology: "stacks" (:class:`BiMambaStacks`, the write-up's) or "layers" (:class:`BiMamba`,
            residual Vim-style).
        d_state, d_conv, expand, dt_min, dt_max, backend: passed to every :class:`Mamba` block.
        norm: None, "layernorm" or "rmsnorm".
        norm_position: None -> the topology's own placement (stacks: "post", the write-up's fix;
            layers: "pre"); "post" is defined for "stacks" only.
        residual: None -> the topology's own default (stacks: False, layers: True).
        combine: "add" or "mean" of the two directions ("layers" only).
        dropout: after each block ("stacks" only; the write-up's BiMamba has it, default 0).
        pooling: "mean" (over valid tokens) or "last" (last valid token).

    Attributes:
        embedding: nn.Linear(n_features, d_model); bimamba: BiMambaStacks or BiMamba;
        head: nn.Linear(2 * d_model or d_model, 1); topology: the topology's name.

    Raises:
        ValueError: an option outside its allowed values (names the argument), or an option the
            chosen topology does not have (``norm_position="post"`` or ``dropout > 0`` with
            "layers", ``combine="mean"`` with "stacks").
    """

    def __init__(self, n_features: int, d_model: int = 16, n_layers: int = 4, d_state: int = 16,
                 d_conv: int = 4, expand: float = 2, norm: Optional[str] = None,
                 residual: Optional[bool] = None, combine: str = "add", pooling: str = "mean",
                 backend: str = "auto", topology: str = "stacks", norm_position: Optional[str] = None,
                 dropout: float = 0.0, dt_min: float = 0.001, dt_max: float = 0.1) -> None:
        super().__init__()
        _check_choice("pooling", pooling, POOLINGS)
        _check_choice("topology", topology, TOPOLOGIES)
        self.pooling = pooling
        self.topology = topology
        self.embedding = nn.Linear(n_features, d_model)
        if topology == "stacks":
            if combine != "add":
                raise ValueError(f"combine={combine!r} applies to topology 'layers' only: the stacks "
                                 f"are concatenated")
            self.bimamba = BiMambaStacks(
                d_model, n_layers, d_state=d_state, d_conv=d_conv, expand=expand, norm=norm,
                norm_position=norm_position or "post", residual=bool(residual), dropout=dropout,
                backend=backend, dt_min=dt_min, dt_max=dt_max)
            width = 2 * d_model
        else:
            if norm_position not in (None, "pre"):
                raise ValueError(f"norm_position={norm_position!r} is defined for topology 'stacks' "
                                 f"only; 'layers' is pre-norm")
            if dropout:
                raise ValueError(f"dropout={dropout} is defined for topology 'stacks' only")
            self.bimamba = BiMamba(d_model, n_layers, d_state=d_state, d_conv=d_conv, expand=expand,
                                   norm=norm, residual=True if residual is None else residual,
                                   combine=combine, backend=backend, dt_min=dt_min, dt_max=dt_max)
            width = d_model
        self.head = nn.Linear(width, 1)

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
            h: (batch, L, width), width = 2 * d_model ("stacks") or d_model ("layers").
            mask: (batch, L) bool, True = valid; None = all valid. A row with no valid token
                pools to zeros (mean) or to token 0 (last).

        Returns:
            (batch, width).
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
        """Max |activation| over valid tokens after the embedding and after each block (no grad).

        What the write-up's authors printed after every layer, and what the book plots to show
        growth with depth. Measured in the module's current mode (call ``eval()`` to switch
        dropout off).

        Args:
            x: (batch, L, n_features); mask: optional (batch, L) bool, as in :meth:`forward`.

        Returns:
            "stacks": {"embedding", "forward_layers.0", ..., "forward_layers.{n-1}",
            "backward_layers.0", ..., "backward_layers.{n-1}"} (each after its norm, residual
            and dropout), plus "forward_norm_f"/"backward_norm_f" with pre-norm.
            "layers": {"embedding", "layer0", ..., "layer{n-1}"}, plus "norm_f" with a norm.
            Values are floats, inf or nan once a layer overflows (a NaN anywhere gives nan).
        """
        def absmax(h: torch.Tensor, m: Optional[torch.Tensor] = mask) -> float:
            if m is not None:  # padded tokens are not part of the story
                h = torch.where(m.bool()[..., None], h, torch.zeros_like(h))
            return h.abs().max().item()

        h = self.embedding(self._mask_inputs(x, mask))
        scales = {"embedding": absmax(h)}
        if self.topology == "stacks":
            for direction in ("forward", "backward"):
                blocks, _, norm_f = self.bimamba.stack(direction)
                backward = direction == "backward"
                g = h.flip(1) if backward else h  # the backward stack runs in flipped order
                m = mask.flip(1) if backward and mask is not None else mask
                for i in range(len(blocks)):
                    g = self.bimamba.block_step(direction, i, g)
                    scales[f"{direction}_layers.{i}"] = absmax(g, m)
                if not isinstance(norm_f, nn.Identity):
                    scales[f"{direction}_norm_f"] = absmax(norm_f(g), m)
            return scales
        for i, layer in enumerate(self.bimamba.layers):
            h = layer(h)
            scales[f"layer{i}"] = absmax(h)
        if not isinstance(self.bimamba.norm_f, nn.Identity):
            scales["norm_f"] = absmax(self.bimamba.norm_f(h))
        return scales
