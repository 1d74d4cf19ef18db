"""Writing ViLT checkpoint directories in the Hugging Face layout, offline.

There is no model hub here: tests, benchmarks and the embedded default make their checkpoints with
``save_pretrained``. A BERT-style WordPiece vocabulary is written from a word list.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    BertTokenizer,
    PreTrainedModel,
    ViltConfig,
    ViltForImageAndTextRetrieval,
    ViltForImagesAndTextClassification,
    ViltForQuestionAnswering,
    ViltModel,
    ViltProcessor,
)
from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

from models.backbones.base import read_checkpoint_state
from models.backbones.vilt.modeling import conv_stem_channels, install_conv_stem
from models.das.plan import Plan

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
) -> PreTrainedModel:
    """Randomly initialised ViLT with the given head (``vqa``, ``nlvr2``, ``retrieval`` or None),
    saved with its processor. ``config.vocab_size`` is raised to fit the vocabulary if needed.
    Returns the transformers model (eval mode) for comparisons; where ``config`` sets
    ``conv_stem_channels`` its patch embedding is the convolutional stem (install_conv_stem)."""
    words = list(words)
    config.vocab_size = max(config.vocab_size, len(wordpiece_vocab(words)))
    torch.manual_seed(seed)
    model = HEAD_CLASSES[head](config).eval()
    install_conv_stem(model if head is None else model.vilt, config)
    model.save_pretrained(str(directory), safe_serialization=safe_serialization)
    build_processor(directory, words, shortest_edge or config.image_size, config.max_position_embeddings)
    return model


def save_vqa_checkpoint_with_plan_parts(backbone_dir: str | os.PathLike, plan: Plan, directory: str | os.PathLike) -> Path:
    """A ``ViltForQuestionAnswering`` checkpoint (with its processor) that computes what ``plan``
    computes on the backbone in ``backbone_dir``: the backbone's encoder weights, with the plan's
    own pooler, token-type embeddings and VQA head under transformers' names. Only for plans that
    skip nothing and carry no adapters (transformers has neither). Benchmarks use it to run a plain
    transformers service on exactly the weights of a DAS plan."""
    if plan.task != "vqa" or not plan.spec.own_head:
        raise ValueError(f"plan {plan.task}/{plan.name}: needs a VQA plan with its own head")
    if plan.spec.skipped_layers or plan.modules.skip_adapters or plan.modules.parallel_adapters:
        raise ValueError(f"plan {plan.task}/{plan.name}: skips layers or has adapters; transformers cannot run it")
    config = ViltConfig.from_pretrained(str(backbone_dir))
    if conv_stem_channels(config):
        raise ValueError(f"{backbone_dir}: the backbone has a convolutional stem; transformers' ViLT has none")
    labels = list(plan.spec.labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.architectures = ["ViltForQuestionAnswering"]
    source = read_checkpoint_state(backbone_dir)
    # task checkpoints prefix the encoder with "vilt."; a bare ViltModel does not
    if any(k.startswith("vilt.") for k in source):
        state = {k: v for k, v in source.items() if k.startswith("vilt.")}
    else:
        state = {f"vilt.{k}": v for k, v in source.items() if not k.startswith(("classifier.", "rank_output.", "mlm_score."))}
    renames = {"pooler.": "vilt.pooler.", "token_type_embeddings.": "vilt.embeddings.token_type_embeddings.",
               "head.": "classifier."}
    for name, tensor in plan.modules.state_dict().items():
        prefix = next(p for p in renames if name.startswith(p))
        state[renames[prefix] + name[len(prefix):]] = tensor.detach().to("cpu", torch.float32)
    model = ViltForQuestionAnswering(config).eval()
    model.load_state_dict(state, strict=True)
    model.save_pretrained(str(directory))
    ViltProcessor.from_pretrained(str(backbone_dir), local_files_only=True).save_pretrained(str(directory))
    return Path(directory)
