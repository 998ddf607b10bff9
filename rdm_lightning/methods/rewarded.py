"""What every reward-driven method shares: its optimized rewards with weights, its gold rewards, and
how they are scored, logged and differentiated (DMDR, GNDM/GNDMR, GDMD, RTDMD)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from rdm_lightning.core.schedules_training import hinge_reward_loss
from rdm_lightning.rewards.base import RewardModel, RewardTerm, WeightedRewards


def weighted_rewards(rewards: list[RewardModel], weights: dict[str, float]) -> WeightedRewards | None:
    """The rewards with their weights by name, or None for no rewards; every reward needs exactly one weight."""
    names = [reward.name for reward in rewards]
    missing = sorted(set(names) - set(weights))
    unknown = sorted(set(weights) - set(names))
    if missing or unknown:
        raise ValueError(f"reward_weights must give one weight per reward {names}: missing {missing}, unknown {unknown}")
    return WeightedRewards([RewardTerm(r, weights[r.name]) for r in rewards]) if rewards else None


class RewardedMethod:
    """Mixin of a distillation module (listed before it in the bases) that has ``self.rewards``
    (:class:`WeightedRewards` or None, from :func:`weighted_rewards`) and ``self.gold_rewards``
    (an ``nn.ModuleList``), set in its ``__init__`` by :meth:`setup_rewards`.

    The rewards are frozen and held outside the module tree: they are not submodules, so they are
    in neither ``parameters()`` nor ``state_dict()`` (never checkpointed, never wrapped or partitioned
    by DDP, FSDP or DeepSpeed), yet ``.to(device)`` and ``.to(dtype)`` move them with the module
    (:meth:`_apply`). They compute in ``teacher_dtype``, the dtype of the other frozen networks
    (bf16 in the GPU configs), and return float32 scores (docs/rewards.md).
    """

    rewards: WeightedRewards | None
    gold_rewards: nn.ModuleList

    def setup_rewards(self, rewards: list[RewardModel] | None, gold_rewards: list[RewardModel] | None,
                      weights: dict[str, float]) -> None:
        """Set the optimized rewards with their ``weights`` (one per reward name) and the gold rewards,
        then :meth:`check_rewards` (what the method needs of them)."""
        optimized = weighted_rewards(list(rewards or []), weights)
        gold = nn.ModuleList(gold_rewards or [])
        # Plain attributes, not submodules (see the class docstring).
        self.__dict__["rewards"] = None if optimized is None else optimized.to(self.teacher_dtype)
        self.__dict__["gold_rewards"] = gold.to(self.teacher_dtype)
        self.check_rewards()

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (``.to``, ``.cuda``, ``.float()``…) that also reaches the rewards."""
        for held in (self.__dict__.get("rewards"), self.__dict__.get("gold_rewards")):
            if held is not None:
                held._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def check_rewards(self) -> None:
        """Raise if the rewards do not suit the method; by default any set of rewards does."""

    def reward_terms(self) -> tuple[RewardTerm, ...]:
        """The optimized rewards with their weights (none when there are no rewards)."""
        return self.rewards.terms if self.rewards is not None else ()

    def reward_loss(self, scores: Tensor, weight: float, hinge: float) -> Tensor:
        """The differentiable reward term of every reward-driven method: ``weight·mean(ReLU(hinge − r))`` of
        ``scores`` (which carry gradients). DMDR and GNDMR (``refl_sum``) pass each reward's scores with its
        weight and ``dmdr.reward_hinge``; RTDMD its weighted reward sum with ``rtdmd.backprop_weight`` and
        ``backprop_hinge``. Override this one hook to change the term in all of them
        (``examples/custom_method.py``)."""
        return hinge_reward_loss(scores, weight, hinge)

    def reward_models(self) -> dict[str, nn.Module]:
        """The optimized rewards by name and the gold ones by ``gold/<name>`` (reward logging and evaluation)."""
        gold = {f"gold/{reward.name}": reward for reward in self.gold_rewards}
        return {**{term.name: term.reward for term in self.reward_terms()}, **gold}

    def gold_reward_logs(self, x0: Tensor, prompts: list[str], images: Tensor | None = None) -> dict[str, Tensor]:
        """Mean gold reward of the samples ``x0`` (scored, never optimized), by ``reward/gold/<name>``.

        ``images`` is ``decode(x0)`` when the caller already has it, so the decoder (a VAE on SD) runs once.
        """
        if not self.gold_rewards:
            return {}
        images = self.backbone.decode(x0.detach()) if images is None else images.detach()
        return {f"reward/gold/{reward.name}": reward.score(images, prompts).mean() for reward in self.gold_rewards}

    def reward_gradient(self, reward: RewardModel, y: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Detached scores ``R(decode(y), c_i)`` ``[B]`` and ``γ_i = ∇_y R(decode(y), c_i)`` at ``sg(y)``.

        GNDMR's W2 takes it at the generator samples, GDMD's B2 at the implicit target.
        Differentiating the sum gives every γ_i at once: a reward scores each image on its own.
        """
        y = y.detach().requires_grad_(True)
        with torch.enable_grad():
            scores = reward.score(self.backbone.decode(y), prompts, with_grad=True)
            (gamma,) = torch.autograd.grad(scores.sum(), y)
        return scores.detach(), gamma
