"""Twilight: top-p pruning of another selector's choice (Lin et al., arXiv:2502.02770).

A fixed top-k budget is too many keys for a peaked head and too few for a flat one. Twilight lets a
base selector (``base=quest`` by default) propose blocks under its budget, estimates how much
attention each proposed block receives, and keeps the smallest set whose mass, together with the
always-kept sinks and window, reaches ``p``. The budget is therefore an upper bound; the density a
head actually uses adapts to the input.

On a model whose softmax holds more than q.k (``SelectContext.extras``) the estimate is the model's softmax:
logits softcapped, and each probe's learned sink taking its share, so a probe whose sink absorbs most of its
attention weighs little when the probes are averaged. ``p`` is a fraction of the keys' own mass (the sink's
share belongs to no key): with a sink the keys' mass sums to less than 1, and a p above it would be
unreachable and keep every proposed block.

Simplifications: the estimate is exact fp32 attention of ``probes`` queries per query block over
the proposed keys (Twilight uses a 4-bit key copy for all queries), and pruning is per block.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import SpecError
from ..selection import Selection
from ..stages import SoftmaxExtras
from .base import BudgetedMethod, SelectContext, check_int, param
from .registry import method_class, register
from .scoring import by_group, chunk_rows, expand_kv, gather_keys, grouped_scores, grouped_sinks, sorted_count_to_reach


@register
@dataclass(frozen=True)
class Twilight(BudgetedMethod):
    name: ClassVar[str] = "twilight"
    summary: ClassVar[str] = "top-p: keep the fewest proposed blocks reaching attention mass p (Twilight)"
    paper: ClassVar[str] = "Twilight: Adaptive Attention Sparsity with Hierarchical Top-p Pruning (arXiv:2502.02770)"

    base: str = param("quest", "selector proposing blocks under the budget (a budgeted method: quest, hip, ...)")
    p: float = param(0.95, "attention mass to keep, in (0, 1]")
    probes: int = param(4, "queries per query block that estimate the mass")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.p, float | int) and 0 < self.p <= 1):
            raise SpecError(f"twilight: p must be in (0, 1], got {self.p!r}")
        check_int(self, "probes", self.probes, minimum=1)
        self.base_method  # noqa: B018  (validates base now, before any model work)

    @cached_property
    def base_method(self) -> BudgetedMethod:
        cls = method_class(self.base)
        if not issubclass(cls, BudgetedMethod) or issubclass(cls, Twilight) or "decode" not in cls.phases \
                or "prefill" not in cls.phases:
            raise SpecError(f"twilight: base must be a budgeted selector such as quest, moba or hip, got '{self.base}'")
        shared = {f.name: getattr(self, f.name) for f in fields(BudgetedMethod) if f.init}
        return cls(**shared)

    @property
    def block_stats(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.base_method.block_stats

    def select(self, q: Tensor, k: Tensor, ctx: SelectContext) -> Selection:
        proposed = self.base_method.select(q, k, ctx)
        if proposed.full or proposed.indices.shape[-1] == 0:
            return proposed
        scale = ctx.softmax_scale(q)
        n_qb = proposed.query_blocks
        bytes_per_block = 4 * q.shape[1] * self.probes * proposed.indices.shape[-1] * proposed.block_k * 2
        step = chunk_rows(bytes_per_block)
        kept = [self._prune(q, k, proposed, b0, min(b0 + step, n_qb), scale, ctx.extras)
                for b0 in range(0, n_qb, step)]
        return Selection(torch.cat(kept, dim=2), proposed.q_len, proposed.kv_len, proposed.block_q,
                         proposed.block_k, proposed.sinks, proposed.window, proposed.key_mask)

    def _prune(self, q: Tensor, k: Tensor, sel: Selection, b0: int, b1: int, scale: float, extras: SoftmaxExtras
               ) -> Tensor:
        """Pruned indices for query blocks [b0, b1): (B, Hs, nb, K)."""
        batch, n_q, t_q, _ = q.shape
        n_kv, t_k = k.shape[1], k.shape[2]
        bq, bk, window, sinks = sel.block_q, sel.block_k, sel.window, min(sel.sinks, t_k)
        idx = sel.indices[:, :, b0:b1]  # (B, Hs, nb, K)
        heads, n_blocks = idx.shape[1], idx.shape[-1]
        nb, dev = b1 - b0, q.device
        # probe queries spread over each block (the last valid query always among them)
        offs = torch.linspace(0, bq - 1, self.probes, device=dev).round().long()
        rows = (torch.arange(b0, b1, device=dev)[:, None] * bq + offs).clamp(max=t_q - 1)  # (nb, P)
        ppos = (t_k - t_q) + rows  # key position of each probe
        qp = q[:, :, rows].float()  # (B, Hq, nb, P, D)
        keys = k.float() if heads == n_kv else expand_kv(k, n_q).float()
        qp = by_group(qp, heads) if heads != n_q else qp.unsqueeze(2)  # (B, Hs, G, nb, P, D)

        # proposed blocks: keys behind each probe's window (the window part is counted below)
        pos = (idx.clamp(min=0).unsqueeze(-1) * bk + torch.arange(bk, device=dev)).flatten(-2)  # (B,Hs,nb,K*bk)
        ok = (idx >= 0).repeat_interleave(bk, dim=-1) & (pos < t_k) & (pos >= sinks)
        kc = gather_keys(keys, pos.clamp(max=t_k - 1))  # (B, Hs, nb, K*bk, D)
        lc = extras.cap(grouped_scores(qp, kc) * scale)  # (B, Hs, G, nb, P, K*bk)
        behind = pos.unsqueeze(-2) <= (ppos - window).view(1, 1, nb, -1, 1)  # (B, Hs, nb, P, K*bk)
        lc = lc.masked_fill(~(ok.unsqueeze(-2) & behind).unsqueeze(2), float("-inf"))
        if sel.key_mask is not None:
            km = sel.key_mask.gather(1, pos.clamp(max=t_k - 1).flatten(1)).view_as(pos)
            lc = lc.masked_fill(~km[:, :, None, :, None, :], float("-inf"))

        # always-kept keys of each probe: sinks behind its window, then its window
        apos = torch.cat([torch.arange(sinks, device=dev).expand(nb, self.probes, sinks),
                          ppos[..., None] - window + 1 + torch.arange(window, device=dev)], dim=-1)  # (nb, P, A)
        a_ok = torch.cat([apos[..., :sinks] <= (ppos - window)[..., None], apos[..., sinks:] >= 0], dim=-1)
        ka = gather_keys(keys, apos.clamp(min=0).expand(batch, heads, -1, -1, -1))  # (B, Hs, nb, P, A, D)
        la = extras.cap(grouped_scores(qp.unsqueeze(-2), ka).squeeze(-2) * scale)  # (B, Hs, G, nb, P, A)
        la = la.masked_fill(~a_ok, float("-inf"))
        if sel.key_mask is not None:
            km = sel.key_mask[:, apos.clamp(min=0)]  # (B, nb, P, A)
            la = la.masked_fill(~km[:, None, None], float("-inf"))

        lse = torch.logsumexp(torch.cat([lc, la], dim=-1), dim=-1, keepdim=True)
        mass = (lc - lse).exp().view(*lc.shape[:-1], n_blocks, bk).sum(-1)  # (B, Hs, G, nb, P, K)
        always = (la - lse).exp().sum(-1)  # (B, Hs, G, nb, P)
        target: float | Tensor = self.p
        if extras.sinks is not None:
            # each probe's keys get 1 - its sink's share: probes weigh by that share, taken relative to the
            # heaviest probe of the average (the threshold is relative, and tiny shares must not underflow)
            sink = grouped_sinks(extras.sinks, heads).to(dev)[None, :, :, None, None]  # (1, Hs, G, 1, 1)
            share = lse[..., 0] - torch.logaddexp(lse[..., 0], sink)  # (B, Hs, G, nb, P) log keys' share
            weight = (share - share.amax(dim=(2, 4), keepdim=True)).exp().nan_to_num(0.0)
            mass, always = mass * weight[..., None], always * weight
        mass = mass.mean(dim=(2, 4))  # (B, Hs, nb, K)
        always = always.mean(dim=(2, 4))  # (B, Hs, nb)
        if extras.sinks is not None:
            target = self.p * (mass.sum(-1) + always)  # p of the keys' own mass
        keep_n = sorted_count_to_reach(mass, always, target)
        order = mass.sort(dim=-1, descending=True).indices
        ranked = idx.gather(-1, order)
        rank = torch.arange(n_blocks, device=dev)
        return torch.where(rank < keep_n.unsqueeze(-1), ranked, torch.full_like(ranked, -1))
