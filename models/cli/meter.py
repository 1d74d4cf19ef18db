"""`das meter convert`: METER's Lightning checkpoints -> backbone directories (models/backbones/meter/convert.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_convert(args: argparse.Namespace) -> int:
    # heavy (torch, transformers): only when the command runs
    from models.backbones.base import BackboneError
    from models.backbones.meter.convert import convert_checkpoint

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise BackboneError(f"{out}: exists and is not empty (pass --overwrite to write into it)")
    labels = None
    if args.labels:
        labels = [line.strip() for line in Path(args.labels).read_text().splitlines() if line.strip()]
    result = convert_checkpoint(
        args.checkpoint, out, tokenizer_dir=args.tokenizer, labels=labels, trust_pickle=args.trust_pickle,
        vision_heads=args.vision_heads, text_heads=args.text_heads, fusion_heads=args.fusion_heads,
        max_text_len=args.max_text_len,
    )
    config = result.config
    print(f"wrote {result.directory}: METER, image {config.image_size}px / patch {config.patch_size}, "
          f"{config.vision['num_hidden_layers']} CLIP blocks, {config.text['num_hidden_layers']} RoBERTa layers, "
          f"{config.num_fusion_layers} fusion layers per stream (DAS arms 0-{config.num_fusion_layers - 1} text side, "
          f"{config.num_fusion_layers}-{config.num_arms - 1} image side), heads: {', '.join(result.heads) or 'none'}")
    if result.ignored:
        print(f"ignored {len(result.ignored)} METER key(s) not used at inference: {result.ignored[:6]}"
              + (" ..." if len(result.ignored) > 6 else ""))
    if "vqa" in result.heads and labels is None:
        print("note: no --labels given; VQA answers are named by their index", file=sys.stderr)
    if not result.tokenizer_written:
        print("note: no --tokenizer given; copy RoBERTa's tokenizer files (tokenizer.json, or vocab.json + merges.txt) "
              "into the directory before serving it", file=sys.stderr)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `das meter convert` to the `das` command line."""
    meter = commands.add_parser("meter", help="METER checkpoints (convert METER's .ckpt files)",
                                description="Tools for METER backbones.")
    meter_commands = meter.add_subparsers(dest="meter_command", metavar="SUBCOMMAND", required=True)
    convert = meter_commands.add_parser(
        "convert", help="METER Lightning .ckpt -> a backbone directory",
        description="Convert an official METER fine-tuned checkpoint (PyTorch Lightning .ckpt, METER's parameter "
                    "names) into a backbone directory that DAS_BACKBONE / --backbone read: config.json (inferred "
                    "from the weights), model.safetensors, preprocessor_config.json (METER's CLIP transform) and, "
                    "with --tokenizer, the RoBERTa tokenizer files. The key mapping is documented in "
                    "models/backbones/meter/convert.py and the README. Refuses (exit 2) naming METER's keys when weights are "
                    "missing or have unexpected shapes.")
    convert.add_argument("checkpoint", help="METER .ckpt file (or a torch-saved state dict with METER's names)")
    convert.add_argument("--out", required=True, help="directory to write")
    convert.add_argument("--tokenizer", help="directory with RoBERTa tokenizer files (e.g. a local copy of roberta-base)")
    convert.add_argument("--labels", help="VQA answer vocabulary, one answer per line in head order (METER's label2ans)")
    convert.add_argument("--vision-heads", type=int, help="CLIP attention heads (default: width / 64, 12 for ViT-B)")
    convert.add_argument("--text-heads", type=int, help="RoBERTa attention heads (default: width / 64)")
    convert.add_argument("--fusion-heads", type=int,
                         help="fusion attention heads (default: the checkpoint's num_heads, else width / 64)")
    convert.add_argument("--max-text-len", type=int,
                         help="maximum text tokens (default: the checkpoint's max_text_len, else 40)")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="allow unpickling non-tensor objects (Lightning hyper-parameters); only for trusted files")
    convert.add_argument("--overwrite", action="store_true", help="write into a non-empty --out directory")
    convert.set_defaults(func=cmd_convert)
