"""The rollout batch: the one type engine, reward, actor and logger agree on.

A ``RolloutSample`` is one sampled response to one prompt with everything the later phases add
(reward, grade status); a group is all samples of one prompt (same ``group``). ``to_actor_batch``
lays the samples out as the actor's right-padded ``ActorBatch``, with the engine's log-probs aligned
to the response tokens.
"""

from __future__ import annotations

import dataclasses
import torch

from megatron_zero.actor.batching import ActorBatch


@dataclasses.dataclass
class RolloutSample:
    group: int  # index of the prompt within the step; samples of one prompt share it
    uid: str  # the problem's id (data loader)
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]  # the engine's, one per response token
    finish_reason: str  # "stop" | "length"
    prompt_text: str
    response_text: str
    ground_truth: str
    reward: float = 0.0
    grade_status: str = ""

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclasses.dataclass
class RolloutBatch:
    samples: list[RolloutSample]

    def __len__(self) -> int:
        return len(self.samples)

    def rewards(self) -> torch.Tensor:
        return torch.tensor([s.reward for s in self.samples], dtype=torch.float32)

    def group_ids(self) -> torch.Tensor:
        return torch.tensor([s.group for s in self.samples], dtype=torch.long)

    def truncated(self) -> torch.Tensor:
        return torch.tensor([s.truncated for s in self.samples], dtype=torch.bool)

    def groups(self) -> list[list[RolloutSample]]:
        """Samples by group, in order of first appearance."""
        by_group: dict[int, list[RolloutSample]] = {}
        for sample in self.samples:
            by_group.setdefault(sample.group, []).append(sample)
        return list(by_group.values())

    def max_response_length(self) -> int:
        return max(len(s.response_ids) for s in self.samples)

    def to_actor_batch(self) -> ActorBatch:
        """Right-padded prompt+response rows; per-token fields aligned so [i, t] belongs to token t."""
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in self.samples]
        num_rows, width = len(self.samples), max(lengths)
        tokens = torch.zeros(num_rows, width, dtype=torch.long)
        response_mask = torch.zeros(num_rows, width, dtype=torch.bool)
        rollout_logp = torch.zeros(num_rows, width, dtype=torch.float32)
        for i, sample in enumerate(self.samples):
            start, end = len(sample.prompt_ids), lengths[i]
            tokens[i, :end] = torch.tensor(sample.prompt_ids + sample.response_ids)
            response_mask[i, start:end] = True
            rollout_logp[i, start:end] = torch.tensor(sample.rollout_logprobs, dtype=torch.float32)
        return ActorBatch(tokens=tokens, lengths=torch.tensor(lengths), response_mask=response_mask,
                          rollout_logp=rollout_logp)
