"""Function-preserving re-normalization: scale Linear input columns to unit norm, fold the scale into the LayerNorm.

A LayerNorm computes ``x = g * xhat + b``; a Linear fed by it computes ``W x`` (``W`` is ``[out, in]``).
For any positive ``c`` (one per input feature), ``(W / c) (c*g * xhat + c*b) = W x``: dividing column ``j``
of every Linear that reads this LayerNorm by ``c_j`` and multiplying ``g_j`` and ``b_j`` by ``c_j`` leaves
the network's function unchanged. With ``c_j`` the L2 norm of column ``j`` of all those Linears stacked
(``[W_q; W_k; W_v]`` together, since they share the input) every column ends at unit norm.

This holds only when the LayerNorm output feeds *nothing else*: true for pre-LN blocks (GPT-2's ``ln_1`` ->
``attn.c_attn``, ``ln_2`` -> ``mlp.c_fc``), false for BERT's post-LN blocks where the LayerNorm output is also
the residual stream. The caller names the pairs; this module cannot see the data flow.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tick_lightning.dist import is_sharded
from tick_lightning.renorm.ops import check_planned_shapes

__all__ = ["FoldPlan", "pair_norms"]


def _input_dim(module: nn.Module) -> int:
    """The weight dimension that indexes input features: 1 for ``nn.Linear`` ``[out, in]``, 0 for GPT-2's
    ``Conv1D`` ``[in, out]``."""
    if isinstance(module, nn.Linear):
        return 1
    if type(module).__name__ == "Conv1D":
        return 0
    raise TypeError(type(module).__name__)


def pair_norms(linears: Sequence[str], norms: Sequence[str]) -> dict[str, str]:
    """Pair each Linear module name with the norm that sits in the innermost enclosing module.

    A norm ``a.b.ln_1`` can feed Linears under ``a.b.`` (its parent); when several matched norms qualify,
    the one with the deepest parent wins, and a tie is an error (make the ``fold`` glob name one norm per
    block, e.g. one ``Renorm`` for ``ln_1 -> attn.c_attn`` and another for ``ln_2 -> mlp.c_fc``).

    Example:
        >>> pair_norms(["h.0.attn.c_attn", "h.1.attn.c_attn"], ["h.0.ln_1", "h.1.ln_1"])
        {'h.0.attn.c_attn': 'h.0.ln_1', 'h.1.attn.c_attn': 'h.1.ln_1'}
    """
    out = {}
    for lin in linears:
        scored = []
        for norm in norms:
            parent = norm.rpartition(".")[0]
            if parent == "" or lin.startswith(parent + "."):
                scored.append((parent.count(".") + (1 if parent else 0), norm))
        if not scored:
            raise ValueError(f"No LayerNorm matched by the fold glob sits in a module enclosing Linear {lin!r}; "
                             f"matched norms: {list(norms)[:5]}.")
        best = max(depth for depth, _ in scored)
        winners = [n for depth, n in scored if depth == best]
        if len(winners) != 1:
            raise ValueError(f"Linear {lin!r} could be fed by any of {winners}; make the fold glob name one "
                             "LayerNorm per block (one Renorm per LayerNorm -> Linear pair).")
        out[lin] = winners[0]
    return out


class FoldPlan:
    """Column renorm of Linear weights with the scale folded into the feeding LayerNorm (see module doc).

    ``pairs`` maps each norm module to the Linear modules it feeds. Statistics rows come out in ``names`` order.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> ln, fc = torch.nn.LayerNorm(8), torch.nn.Linear(8, 4)
        >>> net = torch.nn.Sequential(ln, fc); x = torch.randn(2, 8); y = net(x)
        >>> _ = FoldPlan([("0", ln, [("1", fc)])]).run()
        >>> torch.allclose(net(x), y, atol=1e-6), torch.allclose(fc.weight.norm(dim=0), torch.ones(8))
        (True, True)
    """

    def __init__(self, pairs: Sequence[tuple[str, nn.Module, Sequence[tuple[str, nn.Module]]]], eps: float = 1e-5) -> None:
        self.eps = eps
        self.items = []
        self.names: list[str] = []
        self.tensors: list[Tensor] = []
        for norm_name, norm, linears in pairs:
            gain = getattr(norm, "weight", None)
            if not isinstance(gain, Tensor) or gain.dim() != 1:
                raise ValueError(f"{norm_name!r} ({type(norm).__name__}) has no 1-D gain 'weight' to fold a scale into.")
            bias = getattr(norm, "bias", None)
            bias = bias if isinstance(bias, Tensor) else None
            weights = []
            for lin_name, lin in linears:
                dim = _input_dim(lin)
                if lin.weight.shape[dim] != gain.shape[0]:
                    raise ValueError(
                        f"Linear {lin_name!r} has {lin.weight.shape[dim]} input features but {norm_name!r} normalizes "
                        f"{gain.shape[0]}; it is not fed by that LayerNorm."
                    )
                weights.append((lin.weight, dim))
                self.names.append(f"{lin_name}.weight")
                self.tensors.append(lin.weight)
            self.names.append(f"{norm_name}.weight")
            self.tensors.append(gain)
            if bias is not None:
                self.names.append(f"{norm_name}.bias")
                self.tensors.append(bias)
            if any(is_sharded(t) for t in self.tensors):
                raise ValueError("Renorm fold mode does not support sharded (DTensor) parameters; use it without FSDP.")
            self.items.append((gain, bias, weights))
        self.shapes = [tuple(t.shape) for t in self.tensors]

    @torch.no_grad()
    def run(self, *, skip: Tensor | None = None, stats: bool = False) -> Tensor | None:
        """Apply in place; returns ``[len(names), 6]`` statistics (``ops.STATS`` columns) when ``stats``."""
        from tick_lightning.renorm.ops import TensorGroup, group_stats

        check_planned_shapes(self.tensors, self.shapes, self.names)
        rows = []
        for gain, bias, weights in self.items:
            olds = [w.float() for w, _ in weights]
            # columns as rows: [in, out_k] for every Linear, then the joint norm over all their outputs
            cols = [w.t() if dim == 1 else w for w, (_, dim) in zip(olds, weights)]
            sumsq = torch.stack([(c * c).sum(1) for c in cols]).sum(0)
            scale = sumsq.sqrt().clamp_min(self.eps)  # c_j, one per input feature
            news = [w / (scale if dim == 1 else scale[:, None]) for w, (_, dim) in zip(olds, weights)]
            targets = [w for w, _ in weights] + [gain] + ([bias] if bias is not None else [])
            olds += [gain.float()] + ([bias.float()] if bias is not None else [])
            news += [gain.float() * scale] + ([bias.float() * scale] if bias is not None else [])
            if skip is not None:
                mask = skip.to(device=scale.device, dtype=torch.bool)
                news = [torch.where(mask, o, n) for o, n in zip(olds, news)]
            written = [n.to(t.dtype) for n, t in zip(news, targets)]
            torch._foreach_copy_(targets, written)
            if stats:
                for old, new in zip(olds, written):
                    g = TensorGroup([0], 0, 0, old.numel())
                    nb, mb, sb = group_stats(old[None], g)
                    na, ma, sa = group_stats(new.float()[None], g)
                    rows.append(torch.stack([nb, na, mb, ma, sb, sa], dim=1))
        return torch.cat(rows) if stats and rows else None
