"""DeepSeek-V3's auxiliary-loss-free load balancing, for phase III on a DeepSeek-V3 MoE.

    balancer = BiasBalancer(moe, rate=1e-3)   # hooks every router
    ... forward, backward, optimizer.step() ...
    balancer.step()                           # after each optimizer step
    balancer.close()

Each router adds a per-expert bias to its scores when it picks the top-k experts (not when it weights
them). After every step the bias of an expert that got more tokens than the mean falls by `rate` and
that of one that got fewer rises by `rate` (DeepSeek-V3 report, section 2.1.2): the load evens out
without a loss term pulling on the router's weights. Counts are summed over ranks, so every rank
applies the same update.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist

__all__ = ["BiasBalancer"]


class BiasBalancer:
    def __init__(self, model: torch.nn.Module, rate: float, *, world: int = 1) -> None:
        self.routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
        if not self.routers:
            raise ValueError(
                "the aux-loss-free bias update needs routers with an expert bias (DeepSeek-V3; merge with "
                "architecture deepseek_v3)"
            )
        self.rate, self.world = rate, world
        self.counts = [torch.zeros_like(_bias(r)) for r in self.routers]
        self._hooks = [r.register_forward_hook(self._recorder(i)) for i, r in enumerate(self.routers)]

    def _recorder(self, i: int) -> Any:
        def record(module: torch.nn.Module, inputs: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            chosen = output[0].flatten()  # top-k expert indices of every token
            self.counts[i] += torch.bincount(chosen, minlength=self.counts[i].numel()).to(self.counts[i])

        return record

    @torch.no_grad()
    def step(self) -> list[torch.Tensor]:
        """Apply one update from the tokens routed since the last; returns those per-expert loads."""
        loads = []
        for router, counts in zip(self.routers, self.counts, strict=True):
            if self.world > 1:
                dist.all_reduce(counts)
            _bias(router).add_(self.rate * torch.sign(counts.mean() - counts))
            loads.append(counts.clone())
            counts.zero_()
        return loads

    def forget(self) -> None:
        """Drop the loads recorded since the last step (a forward whose tokens must not count)."""
        for counts in self.counts:
            counts.zero_()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _bias(router: torch.nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, router.e_score_correction_bias)
