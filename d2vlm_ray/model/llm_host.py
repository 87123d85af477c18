"""What every model family needs from the causal LM it wraps, written once.

Both families hold their language model as ``self.llm``, which peft may wrap with LoRA;
the accessors here see through that wrapper.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel


class LLMHost(nn.Module):
    """Base of a video LLM whose language model is ``self.llm`` (set by the subclass)."""

    llm: nn.Module

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The underlying transformers causal LM, whether or not peft wraps it."""
        llm = self.llm
        get_base = getattr(llm, "get_base_model", None)
        return get_base() if callable(get_base) else llm

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the LLM."""
        return self.causal_lm.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the LLM."""
        return self.causal_lm.get_input_embeddings().weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[..., D]``."""
        return self.causal_lm.get_input_embeddings()(ids)
