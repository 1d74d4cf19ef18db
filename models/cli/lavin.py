"""`das lavin convert`: LaVIN's released checkpoint layout -> backbone directories (models/backbones/lavin/convert.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.cli.argtypes import positive_int


def cmd_convert(args: argparse.Namespace) -> int:
    # heavy (torch, transformers): only when the command runs
    import torch

    from models.backbones.base import BackboneError
    from models.backbones.lavin.convert import convert_checkpoint

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise BackboneError(f"{out}: exists and is not empty (pass --overwrite to write into it)")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    result = convert_checkpoint(
        args.checkpoint, out, tokenizer_dir=args.tokenizer, trust_pickle=args.trust_pickle, heads=args.heads,
        max_seq_len=args.max_seq_len, adapter_scale=args.adapter_scale, temperature=args.temperature,
        feature_every=args.feature_every, dtype=dtype,
    )
    config = result.config
    print(f"wrote {result.directory}: LaVIN, LLaMA {config.hidden_size} wide x {config.num_hidden_layers} blocks "
          f"(DAS arms 0-{config.num_hidden_layers - 1}), CLIP {config.vision.hidden_size} wide x "
          f"{config.vision.num_hidden_layers} blocks at {config.image_size}px, MMA adapters '{config.adapter_type}' "
          f"(width {config.adapter_dim}, t={config.router_temperature:g}), visual adapters '{config.visual_adapter_type}', "
          f"{config.image_tokens} image tokens")
    if result.ignored:
        print(f"ignored {len(result.ignored)} LaVIN key(s) not used at inference: {result.ignored[:6]}"
              + (" ..." if len(result.ignored) > 6 else ""))
    if not result.tokenizer_written:
        print("note: no tokenizer found; pass --tokenizer DIR (a directory with LLaMA's tokenizer.json) or copy the "
              "tokenizer files into the directory before serving it", file=sys.stderr)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `das lavin convert` to the `das` command line."""
    lavin = commands.add_parser("lavin", help="LaVIN checkpoints (convert LaVIN's released .pth files)",
                                description="Tools for LaVIN backbones.")
    lavin_commands = lavin.add_subparsers(dest="lavin_command", metavar="SUBCOMMAND", required=True)
    convert = lavin_commands.add_parser(
        "convert", help="LaVIN .pth files -> a backbone directory",
        description="Convert LaVIN's released layout (Meta's LLaMA consolidated.*.pth with params.json, OpenAI "
                    "CLIP's visual tower under backbone.visual, LaVIN's adapter checkpoint {'model': ...}) into a "
                    "backbone directory: config.json (model_type lavin, inferred from the shapes), "
                    "model.safetensors, the tokenizer and preprocessor_config.json. Give every file (or Meta's "
                    "directory) as CHECKPOINT; they are merged. The key table is in "
                    "models/backbones/lavin/convert.py and docs/generative.md. Refuses (exit 2) naming LaVIN's "
                    "keys when weights are missing or have unexpected shapes.")
    convert.add_argument("checkpoint", nargs="+", metavar="CKPT",
                         help="LaVIN state dict(s): a full LaVIN state dict, or LLaMA's directory / "
                              "consolidated.*.pth + CLIP's weights + LaVIN's checkpoint-*.pth")
    convert.add_argument("--out", required=True, help="directory to write")
    convert.add_argument("--tokenizer", help="directory with LLaMA's tokenizer.json (default: beside the checkpoint)")
    convert.add_argument("--heads", type=positive_int,
                         help="decoder attention heads (default: params.json's n_heads, else width / 128)")
    convert.add_argument("--max-seq-len", type=positive_int,
                         help="context in tokens (default: LaVIN's max_seq_len from the checkpoint, else 2048)")
    convert.add_argument("--adapter-scale", type=float, help="MMA scale s (default: the checkpoint's, else 1)")
    convert.add_argument("--temperature", type=float, help="router temperature t (default: the checkpoint's, else 10)")
    convert.add_argument("--feature-every", type=positive_int,
                         help="read CLIP's class token after every N-th block (default 4, LaVIN's)")
    convert.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                         help="dtype of the written weights (default auto: LLaMA's)")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="allow unpickling non-tensor objects (LaVIN's training args, optimizer); only for "
                              "trusted files")
    convert.add_argument("--overwrite", action="store_true", help="write into a non-empty --out directory")
    convert.set_defaults(func=cmd_convert)
