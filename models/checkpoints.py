"""Writing ViLT checkpoint directories in the Hugging Face layout, offline.

There is no model hub here: tests, benchmarks and the embedded default make their checkpoints with
``save_pretrained``. A BERT-style WordPiece vocabulary is written from a word list.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from transformers import (
    BertTokenizer,
    ViltConfig,
    ViltForImageAndTextRetrieval,
    ViltForImagesAndTextClassification,
    ViltForQuestionAnswering,
    ViltModel,
    ViltProcessor,
)
from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# transformers class saved for each head; None = a bare ViltModel
HEAD_CLASSES = {
    "vqa": ViltForQuestionAnswering,
    "nlvr2": ViltForImagesAndTextClassification,
    "retrieval": ViltForImageAndTextRetrieval,
    None: ViltModel,
}


def wordpiece_vocab(words: Iterable[str]) -> list[str]:
    """A BertTokenizer vocabulary: special tokens, single characters and their '##' continuations
    (so any lower-case ASCII word tokenises to something other than [UNK]), then the words."""
    vocab: list[str] = list(SPECIAL_TOKENS)
    seen = set(vocab)

    def add(token: str) -> None:
        if token not in seen:
            seen.add(token)
            vocab.append(token)

    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,?!'-":
        add(ch)
        add("##" + ch)
    for word in words:
        add(word.lower())
    return vocab


def write_wordpiece_vocab(words: Iterable[str], path: str | os.PathLike) -> list[str]:
    vocab = wordpiece_vocab(words)
    Path(path).write_text("\n".join(vocab) + "\n")
    return vocab


def build_processor(directory: str | os.PathLike, words: Iterable[str], shortest_edge: int, max_text_len: int) -> ViltProcessor:
    """A ViltProcessor (BERT WordPiece tokenizer + ViLT image processor) saved into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.txt"
    vocab = write_wordpiece_vocab(words, vocab_file)
    # transformers 5's BertTokenizer takes the vocabulary itself (``vocab``); ``vocab_file`` alone is
    # ignored and would leave a tokenizer that maps every word to [UNK].
    tokenizer = BertTokenizer(
        vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True, model_max_length=max_text_len
    )
    image_processor = ViltImageProcessorPil(size={"shortest_edge": shortest_edge}, size_divisor=32)
    processor = ViltProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(str(directory))
    return processor


def save_vilt_checkpoint(
    directory: str | os.PathLike,
    config: ViltConfig,
    head: str | None,
    words: Iterable[str],
    shortest_edge: int | None = None,
    seed: int = 0,
    safe_serialization: bool = True,
):
    """Randomly initialised ViLT with the given head (``vqa``, ``nlvr2``, ``retrieval`` or None),
    saved with its processor. ``config.vocab_size`` is raised to fit the vocabulary if needed.
    Returns the transformers model (eval mode) for comparisons."""
    import torch

    words = list(words)
    config.vocab_size = max(config.vocab_size, len(wordpiece_vocab(words)))
    torch.manual_seed(seed)
    model = HEAD_CLASSES[head](config).eval()
    model.save_pretrained(str(directory), safe_serialization=safe_serialization)
    build_processor(directory, words, shortest_edge or config.image_size, config.max_position_embeddings)
    return model
