"""``phibook export CKPT OUT``: write a checkpoint as an HF directory that transformers loads, or as a
GGUF file that llama.cpp / Ollama run (``--format gguf``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from phibook.commands.generate import add_dtype_arg

FORMAT_CHOICES = ("hf", "gguf")
GGUF_TYPE_CHOICES = ("f32", "bf16", "q8_0")  # phibook.weights.gguf.GGUF_TYPES, without importing gguf here
GGUF_MAGIC = b"GGUF"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face PhiForCausalLM directory or a llama.cpp GGUF file",
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
            "than the embedding) is reported in one line with exit status 2.\n\n"
            "--format gguf writes OUT as one GGUF file that llama.cpp, llama-cpp-python and\n"
            "Ollama load as a phi2-architecture model: --gguf-type f32 (lossless), bf16, or\n"
            "q8_0 (int8 blocks of 32 with an f16 scale); LayerNorms and biases stay f32. The\n"
            "checkpoint must have a byte-level BPE tokenizer.json (it goes into the file);\n"
            "anything llama.cpp would tokenize differently is refused with the reason."
        ),
        epilog=(
            "example: phibook export runs/tiny/checkpoints/step_00001000 exported/tiny-hf\n"
            "then:    python -c \"import transformers as t; t.AutoModelForCausalLM.from_pretrained('exported/tiny-hf')\"\n"
            "example: phibook export runs/tiny --format gguf --gguf-type q8_0 exported/tiny-q8_0.gguf\n"
            "then:    llama-cli -m exported/tiny-q8_0.gguf -p 'def fib(n):' -n 32   (or an Ollama Modelfile FROM it)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ckpt", type=Path, metavar="CKPT", help="checkpoint, run directory or HF directory to read")
    parser.add_argument(
        "out_dir", type=Path, metavar="OUT", help="HF directory to create (--format hf) or GGUF file (--format gguf)"
    )
    parser.add_argument(
        "--format",
        choices=FORMAT_CHOICES,
        default="hf",
        help="hf (default): a transformers PhiForCausalLM directory; gguf: one llama.cpp GGUF file",
    )
    # The names of every verb's --dtype (float32/bfloat16/float16 accepted too); here auto keeps
    # the precision the checkpoint stores, since the file is written, not run.
    add_dtype_arg(parser, "auto", "--format hf: precision of the written weights: fp32, bf16, fp16, or auto "
                  "(default), which keeps the stored precision")
    parser.add_argument(
        "--gguf-type",
        choices=GGUF_TYPE_CHOICES,
        default=None,
        help="--format gguf: tensor type of the weight matrices: f32 (default), bf16 or q8_0",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUT if it already exists and holds a model (an HF directory with config.json, or a "
        "GGUF file); without this flag an existing OUT is an error",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from phibook.errors import PhibookError
    from phibook.weights.export import export_hf

    out = args.out_dir
    if out.resolve() == args.ckpt.resolve():
        raise PhibookError(f"output {out} is the input checkpoint; choose another directory")
    if args.format == "gguf":
        return _run_gguf(args)
    if args.gguf_type is not None:
        raise PhibookError("--gguf-type only applies to --format gguf; for an HF directory use --dtype")
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


def _run_gguf(args: argparse.Namespace) -> int:
    from phibook.errors import PhibookError
    from phibook.weights.gguf import export_gguf

    out = args.out_dir
    if args.dtype != "auto":
        raise PhibookError(f"--dtype applies to --format hf; for GGUF use --gguf-type {'|'.join(GGUF_TYPE_CHOICES)}")
    if out.is_dir():
        raise PhibookError(f"output {out} is a directory; --format gguf writes one file, e.g. {out / 'model.gguf'}")
    if out.exists() or out.is_symlink():
        if not args.force:
            raise PhibookError(f"output {out} already exists; pass --force to replace it")
        if not _is_gguf(out):
            raise PhibookError(f"refusing to replace {out}: it is not a GGUF file")
    gguf_type = args.gguf_type or "f32"
    print(f"phibook export: reading {args.ckpt}", file=sys.stderr)
    export_gguf(args.ckpt, out, gguf_type)
    print(f"phibook export: wrote GGUF ({gguf_type}) {out}", file=sys.stderr)
    print(out)
    return 0


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False
