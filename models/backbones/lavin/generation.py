"""Generation through the reduced path of a LaVIN backbone: the LLaVA runtime, unchanged.

:func:`models.backbones.llava.generation.stream` drives any generative backbone through its
``preprocess`` / ``new_cache`` / ``prefill`` / ``decode_step`` / ``flops``, ``tokenizer`` and
``eos_token_ids``: batching (left padding, finished requests leaving the batch), the KV cache of kept
blocks only, greedy and top-p sampling with per-request seeds, stop strings, streaming with held-back
text, time to first token and the per-request FLOPs are the same code for LLaVA and LaVIN. What is
LaVIN's (the modality token, the routers' weights kept from the prefill, the image slots) lives in
the backbone (:mod:`models.backbones.lavin.modeling`).
"""

from __future__ import annotations

from models.backbones.lavin.modeling import LavinBackbone
from models.backbones.llava.generation import (
    ANSWER_MAX_NEW_TOKENS, Completion, Finished, GeneratedAnswer, GenerationParams, LlavaRuntime, TokenEvent,
)


class LavinRuntime(LlavaRuntime):
    """Generation requests on one frozen LaVIN backbone. ``prompts``: per request a string (LaVIN's
    instruction text, e.g. "Question: ...\\nResponse:") or chat messages (their text parts are joined);
    ``images``: per request one image or None (LaVIN has one image slot; without one the prompt reads
    "Image: N/A" and the modality token says text-only)."""

    def __init__(self, backbone: LavinBackbone) -> None:
        super().__init__(backbone)


__all__ = ["LavinRuntime", "GenerationParams", "Completion", "TokenEvent", "Finished", "GeneratedAnswer",
           "ANSWER_MAX_NEW_TOKENS"]
