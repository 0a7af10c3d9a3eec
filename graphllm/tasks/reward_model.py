"""The outcome reward model (`--task rm`): the decoder with a scalar head, trained with Bradley–Terry on pairs.

Its layout is transformers' `LlamaForSequenceClassification` with `num_labels=1` (also Qwen2's and
Mistral's): the decoder under `model.*` and `score` [1, hidden] without bias; no LM head. So a checkpoint
of it holds exactly the tensors that class loads, and `graphllm convert graphllm-to-hf` writes such a
directory (graphllm/convert.py).

The reward of a row is the score of its last real token. transformers finds it as the rightmost token
that is not `pad_token_id`; in the graph it is found from the labels, which end one position earlier:
the last position whose (aligned) label is not -100 predicts the row's final token, so the reward is read
at that position + 1 (the EOS a preprocessed response ends with; a row truncated at seq_len: its last
position). With right padding by a pad id other than the final token, both pick the same token.
"""

from __future__ import annotations

import torch
from torch import nn

from graphllm.tasks.losses import IGNORE_INDEX, bradley_terry_loss, split_pairs

REWARD_HEAD = "score.weight"
"""The head's parameter name (transformers' *ForSequenceClassification): what marks a reward-model checkpoint."""
SEQUENCE_CLASSIFICATION = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
                           "mistral": "MistralForSequenceClassification", "phi3": "Phi3ForSequenceClassification",
                           "glm4": "Glm4ForSequenceClassification", "gemma2": "Gemma2ForSequenceClassification",
                           "gemma3_text": "Gemma3TextForSequenceClassification"}
PAD_ID = 0
"""The id graphllm pads rows with (graphllm.data.packing.sft_row)."""


def last_token_index(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, S] → [B]: the position of each row's final token (see the module docstring)."""
    B, S = labels.shape
    positions = torch.arange(S, device=labels.device)  # [S]
    last_label = (positions * (labels != IGNORE_INDEX)).argmax(-1)  # [B]: the rightmost labelled position
    return (last_label + 1).clamp(max=S - 1)


class RewardModel(nn.Module):
    """`forward(input_ids [2P, S], labels [2P, S]) -> (loss, metrics [4])` on interleaved (chosen, rejected)
    rows; `rewards(input_ids, labels) -> [B]` scores rows. `config`/`source` are the LM's."""

    METRICS = ("rewards/chosen", "rewards/rejected", "accuracy", "margin")

    def __init__(self, lm: nn.Module, *, seed: int) -> None:
        super().__init__()
        cfg = lm.config
        self.model = lm.model
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False, device=lm.model.embed_tokens.weight.device,
                               dtype=lm.model.embed_tokens.weight.dtype)
        self.config, self.source = cfg, getattr(lm, "source", "<built>")
        with torch.no_grad():  # normal(0, initializer_range), as transformers initialises the head; seeded
            g = torch.Generator(device="cpu").manual_seed(seed)
            w = torch.empty(self.score.weight.shape, dtype=torch.float32).normal_(0.0, cfg.initializer_range,
                                                                                  generator=g)
            self.score.weight.copy_(w)

    def rewards(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids)  # [B, S, H]
        # gather, not hidden[rows, index]: advanced indexing's backward is aten.index_put, whose torchair GE
        # converter is a stub (graphllm.preflight); gather's backward (scatter_add) converts
        index = last_token_index(labels)[:, None, None].expand(-1, 1, hidden.shape[-1])  # [B, 1, H]
        last = hidden.gather(1, index).squeeze(1)  # [B, H]
        return self.score(last).squeeze(-1).float()  # [B]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        r_c, r_r = split_pairs(self.rewards(input_ids, labels))
        loss = bradley_terry_loss(r_c, r_r).mean()
        c, r = r_c.detach(), r_r.detach()
        return loss, torch.stack([c.mean(), r.mean(), (c > r).float().mean(), (c - r).mean()])


def sequence_classification_config(hf_config: dict, model_type: str) -> list[str]:
    """Make `hf_config` (a config.json dict, in place) describe the reward model: the family's
    *ForSequenceClassification class, one label, and a pad_token_id. transformers scores each row at its
    rightmost token that is not pad_token_id, which is where graphllm reads the reward (the response's final
    token, its EOS); a pad id equal to EOS would move that one token left, so then graphllm's own padding id
    (PAD_ID) is written instead. Returns notes for the user."""
    hf_config["architectures"] = [SEQUENCE_CLASSIFICATION[model_type]]
    hf_config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    hf_config.pop("problem_type", None)  # one label: transformers treats it as regression (a scalar score)
    pad, eos = hf_config.get("pad_token_id"), hf_config.get("eos_token_id")
    if isinstance(pad, int) and pad not in (set(eos) if isinstance(eos, list) else {eos}):
        return []
    hf_config["pad_token_id"] = PAD_ID
    why = "none was set" if pad is None else f"the config's pad_token_id {pad} is the EOS token"
    return [f"reward model: pad_token_id set to {PAD_ID} ({why}); right-pad inputs with it, so transformers reads "
            "the reward at the last real token, as graphllm's training did"]
