"""``phibook export CKPT OUT_DIR``: write a checkpoint as an HF directory that transformers loads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face PhiForCausalLM directory",
        description=(
            "Convert a model to the Hugging Face layout that transformers.AutoModelForCausalLM\n"
            'loads as PhiForCausalLM (model_type "phi"): config.json, model.safetensors (fused qkv\n'
            "split into q_proj/k_proj/v_proj), generation_config.json, and tokenizer.json +\n"
            "tokenizer_config.json when the checkpoint has a tokenizer.\n\n"
            "CKPT may be a phibook checkpoint, a training run directory (its newest\n"
            "checkpoints/step_* is used), or an HF directory in any layout phibook reads\n"
            "(transformers phi, or the pre-2024 microsoft/phi-1_5 mixformer-sequential / phi-msft\n"
            "releases; safetensors or pytorch_model.bin, sharded or not).\n\n"
            "The output is written under a temporary name and renamed into place, so an\n"
            "interrupted export leaves nothing half-written. Bad input (not a checkpoint,\n"
            "truncated weights, tensor shapes that do not fit config.json, a tokenizer larger\n"
            "than the embedding) is reported in one line with exit status 2."
        ),
        epilog=(
            "example: phibook export runs/tiny/checkpoints/step_00001000 exported/tiny-hf\n"
            "then:    python -c \"import transformers as t; t.AutoModelForCausalLM.from_pretrained('exported/tiny-hf')\""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ckpt", type=Path, metavar="CKPT", help="checkpoint, run directory or HF directory to read")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="HF directory to create")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="precision of the written weights; 'auto' (default) keeps the stored precision",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUT_DIR if it already exists and holds a model (it must contain config.json); "
        "without this flag an existing non-empty OUT_DIR is an error",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from phibook.errors import PhibookError
    from phibook.weights.export import export_hf

    out = args.out_dir
    if out.resolve() == args.ckpt.resolve():
        raise PhibookError(f"output {out} is the input checkpoint; choose another directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not args.force:
            raise PhibookError(f"output {out} already exists and is not empty; pass --force to replace it")
        if not (out / "config.json").is_file():
            raise PhibookError(f"refusing to replace {out}: it does not look like a model directory (no config.json)")
    dtype = None if args.dtype == "auto" else args.dtype
    print(f"phibook export: reading {args.ckpt}", file=sys.stderr)
    export_hf(args.ckpt, out, dtype=dtype)
    print(f"phibook export: wrote HF directory {out}", file=sys.stderr)
    print(out)
    return 0
