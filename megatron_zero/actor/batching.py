"""The actor's input batch and its split into microbatches by a token budget.

Why: responses of zero-RL runs range from a few tokens to the length limit, so a fixed number of sequences
per microbatch either wastes memory on short batches or runs out of it on long ones. Microbatches are instead
filled up to ``max_tokens_per_microbatch`` tokens, counted as the padded size (sequences x longest sequence),
which is what the attention and MLP activations cost.

With packing (``packed=True``, see ``packing.py``) a microbatch is instead one row holding several sequences
end to end, up to ``max_tokens_per_microbatch`` tokens in total, so nothing is spent on padding.

FP8 (``fp8_token_multiple``): Transformer Engine's FP8 GEMMs need the tokens of a microbatch in multiples of
16, 32 or 128 by recipe (``config.model.FP8_RECIPE_TOKEN_MULTIPLES``). The rows the model runs on are then
padded to that multiple, within the token budget: a packed row gets one more sequence of padding tokens at its
end, which attends only to itself (so the real sequences' attention and RoPE positions are unchanged), padded
rows get more padding columns, which no real token attends to under the causal mask. The padding is never in
the loss layout: the loss sees the same tensors as without it, so it adds nothing to the loss or gradients.

How: ``ActorBatch(tokens=..., lengths=..., response_mask=..., ...)`` holds right-padded prompt+response rows;
``split_by_token_budget(lengths, max_tokens, packed=...)`` returns the row indices of each microbatch and
``batch.microbatch(indices, packed=...)`` the tensors of one microbatch, trimmed to its own longest row. Every
per-token tensor is aligned with ``tokens``: entry [i, t] belongs to token t of row i (its log-prob is predicted
from the logits at t - 1), so position 0 never counts. A packed microbatch carries the same padded tensors for
the loss plus the packed row the model sees (``model_tokens``) and ``logp_index``, which maps the packed row's
log-probs back onto the padded layout, so the loss code never sees the packing.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from megatron_zero.config.model import FP8_RECIPE_TOKEN_MULTIPLES, ModelConfig

# Per-token float fields that travel with a training batch (all [B, S], aligned with tokens).
PER_TOKEN_FIELDS = ("old_logp", "advantages", "ref_logp", "rollout_logp")


@dataclasses.dataclass(frozen=True)
class ActorBatch:
    """Right-padded prompt+response rows and what the loss needs per token.

    tokens: [B, S] int64 token ids; entries at or after ``lengths[i]`` are padding (any valid id).
    lengths: [B] number of real tokens of each row (prompt + response).
    response_mask: [B, S] bool, True where token t is a response token that counts in the loss.
    old_logp, advantages, ref_logp, rollout_logp: [B, S] float, needed by ``train_step`` as the loss config says.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    response_mask: torch.Tensor
    old_logp: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None
    rollout_logp: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"batch.tokens must be an integer [B, S] tensor, got {self.tokens.dtype} "
                             f"{tuple(self.tokens.shape)}")
        num_rows, seq_length = self.tokens.shape
        if tuple(self.lengths.shape) != (num_rows,):
            raise ValueError(f"batch.lengths.shape={tuple(self.lengths.shape)} must be ({num_rows},)")
        if num_rows == 0:
            raise ValueError("batch has no rows")
        if int(self.lengths.min()) < 1 or int(self.lengths.max()) > seq_length:
            raise ValueError(f"batch.lengths must be in [1, {seq_length}], got min {int(self.lengths.min())} "
                             f"max {int(self.lengths.max())}")
        for name in ("response_mask", *PER_TOKEN_FIELDS):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (num_rows, seq_length):
                raise ValueError(f"batch.{name}.shape={tuple(value.shape)} must equal tokens.shape="
                                 f"{(num_rows, seq_length)}")
        positions = torch.arange(seq_length).unsqueeze(0)
        invalid = self.response_mask.bool() & ((positions == 0) | (positions >= self.lengths.unsqueeze(1)))
        if invalid.any():
            row = int(invalid.any(dim=1).nonzero()[0])
            raise ValueError(f"batch.response_mask row {row} marks position 0 or padding (length "
                             f"{int(self.lengths[row])}); only tokens 1..length-1 have a log-prob")

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def select_rows(self, indices: torch.Tensor) -> "ActorBatch":
        """The batch of rows ``indices`` (e.g. one PPO mini-batch), untrimmed."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[indices] for f in dataclasses.fields(self)
                                           if getattr(self, f.name) is not None})

    def trimmed(self) -> "ActorBatch":
        """The same rows cut to the longest one (columns past it are padding in every row)."""
        width = int(self.lengths.max())
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[:, :width] for f in dataclasses.fields(self)
                                           if getattr(self, f.name) is not None and f.name != "lengths"})

    def microbatch(self, indices: Sequence[int], packed: bool = False,
                   token_multiple: int = 1) -> dict[str, torch.Tensor]:
        """Rows ``indices`` trimmed to their longest row: tokens, response_mask and the per-token fields set.

        ``packed`` adds the rows' real tokens end to end as ``model_tokens`` [1, T], their boundaries
        ``cu_seqlens`` [n + 1] and ``logp_index`` [n, longest - 1]: the packed log-prob (entry j predicts packed
        token j + 1) of padded entry [k, t], which predicts token t + 1 of row k; 0 where row k has no token
        t + 1 (those entries are masked in the loss).

        ``token_multiple`` > 1 (FP8, module docstring) pads the rows the model runs on to a multiple of that many
        tokens: the packed row by one more sequence (``cu_seqlens`` [n + 2]), padded rows by more columns, as
        ``model_tokens`` [n, longest rounded up]. The loss tensors stay as they are.
        """
        index = torch.as_tensor(list(indices), dtype=torch.long)
        lengths = self.lengths[index].long()
        max_length = int(lengths.max())
        out = {"tokens": self.tokens[index, :max_length].long(),
               "response_mask": self.response_mask[index, :max_length].bool()}
        for name in PER_TOKEN_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value[index, :max_length].float()
        if packed:
            real = torch.arange(max_length).unsqueeze(0) < lengths.unsqueeze(1)
            starts = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            columns = torch.arange(max_length - 1).unsqueeze(0)
            out["logp_index"] = torch.where(columns < (lengths - 1).unsqueeze(1), starts[:-1].unsqueeze(1) + columns, 0)
            num_tokens = int(starts[-1])
            padding = round_up(num_tokens, token_multiple) - num_tokens
            # The padding is a sequence of its own (module docstring); padding token ids are 0, like the rows'.
            out["model_tokens"] = torch.nn.functional.pad(out["tokens"][real], (0, padding)).unsqueeze(0)
            out["cu_seqlens"] = torch.cat([starts, starts[-1:] + padding]) if padding else starts
        elif round_up(max_length, token_multiple) > max_length:
            out["model_tokens"] = torch.nn.functional.pad(out["tokens"],
                                                          (0, round_up(max_length, token_multiple) - max_length))
        return out


def round_up(num_tokens: int, multiple: int) -> int:
    return -(-num_tokens // multiple) * multiple


def fp8_token_multiple(model_config: ModelConfig) -> int:
    """The multiple of tokens each microbatch the model runs on is padded to: 1 without FP8 (module docstring)."""
    return 1 if model_config.fp8 is None else FP8_RECIPE_TOKEN_MULTIPLES[model_config.fp8_recipe]


def split_by_token_budget(lengths: Sequence[int] | torch.Tensor, max_tokens: int,
                          packed: bool = False, token_multiple: int = 1) -> list[list[int]]:
    """Group row indices so that each group's (rows x longest row), or with ``packed`` its total length,
    is <= ``max_tokens``, counted after padding to ``token_multiple`` (``ActorBatch.microbatch``).

    Rows are taken longest first: padded, each group then holds rows of similar length (little padding);
    packed, each row goes to the first group it fits (first-fit decreasing). Raises before any work if one row
    alone exceeds the budget.
    """
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    if not lengths:
        raise ValueError("cannot split an empty batch into microbatches")
    longest = max(lengths)
    if round_up(longest, token_multiple) > max_tokens:
        padded = (f", {round_up(longest, token_multiple)} once padded to FP8's multiple of {token_multiple}"
                  if token_multiple > 1 else "")
        raise ValueError(
            f"actor.max_tokens_per_microbatch={max_tokens} is smaller than one sequence of {longest} tokens "
            f"(row {lengths.index(longest)}){padded}; raise it to at least max prompt + max response length"
            + (", rounded up to that multiple" if token_multiple > 1 else "")
        )
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    if packed:
        totals: list[int] = []
        for index in order:
            fits = next((g for g, total in enumerate(totals)
                         if round_up(total + lengths[index], token_multiple) <= max_tokens), None)
            if fits is None:
                groups.append([index])
                totals.append(lengths[index])
            else:
                groups[fits].append(index)
                totals[fits] += lengths[index]
        return groups
    for index in order:
        # Rows arrive longest first, so the group's padded length is its first row's length.
        if groups and (len(groups[-1]) + 1) * round_up(lengths[groups[-1][0]], token_multiple) <= max_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups
