"""Writing LLaVA-style checkpoint directories in the Hugging Face layout, offline.

There is no model hub here: tests (and later the embedded default) make their checkpoints with
``save_pretrained``. The tokenizer is a word-level ``tokenizers`` tokenizer over a word list, wrapped in
``PreTrainedTokenizerFast``, with ``<image>`` as a special token and a LLaVA-1.5-style chat template;
the image processor is a ``CLIPImageProcessor`` at the vision tower's resolution.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
UNK, BOS, EOS, PAD, IMAGE = SPECIAL_TOKENS
# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT: ..."), as a chat template over
# transformers' multimodal messages ({"role", "content": str | [{"type": "image"} | {"type": "text", "text"}]}).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}{{ '\\n' }}"
    "{% else %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{{ '\\n' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %}{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
PUNCTUATION = (".", ",", "?", "!", ":")


def word_vocab(words: Iterable[str]) -> list[str]:
    """Special tokens, punctuation, the chat roles, then the words (lower-case: the tokenizer lower-cases its input)."""
    vocab: list[str] = list(SPECIAL_TOKENS)
    for token in (*PUNCTUATION, "user", "assistant", "system", *(w.lower() for w in words)):
        if token not in vocab:
            vocab.append(token)
    return vocab


def build_tokenizer(words: Iterable[str], model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: lower-cased, whitespace and punctuation split words, unknown words
    become <unk>; decoding joins words with spaces."""
    vocab = word_vocab(words)
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins with spaces, tidies punctuation
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE}, model_max_length=model_max_length, padding_side="left",
        add_bos_token=True,
    )
    return fast


def tiny_llava_config(vocab_size: int, **overrides) -> LlavaConfig:
    """A LLaVA small enough for CPU tests: CLIP 32 wide x 2 layers at 32 px / 8 px patches (16 image
    tokens), Llama 32 wide x 4 layers with grouped-query attention (4 heads, 2 KV heads)."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, projection_dim=32)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256, rms_norm_eps=1e-6,
                bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    vision.update(overrides.pop("vision", {}))
    text.update(overrides.pop("text", {}))
    kwargs = dict(vision_feature_layer=-2, vision_feature_select_strategy="default", image_token_id=4,
                  projector_hidden_act="gelu", pad_token_id=3)
    kwargs.update(overrides)
    return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text), **kwargs)


def save_llava_checkpoint(
    directory: str | os.PathLike, words: Iterable[str], config: LlavaConfig | None = None, seed: int = 0,
    **config_overrides,
) -> LlavaForConditionalGeneration:
    """A randomly initialised ``LlavaForConditionalGeneration`` saved with its ``LlavaProcessor``
    (tokenizer, CLIP image processor, chat template). Returns the transformers model (eval mode)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(words)
    config = config or tiny_llava_config(len(tokenizer), **config_overrides)
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(str(directory))
    size = config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's class token
    )
    processor.save_pretrained(str(directory))
    return model
