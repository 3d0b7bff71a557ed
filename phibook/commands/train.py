"""``phibook train``: pretrain a phi model on token shards or a mixture, on one process or under torchrun."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Pretrain a phi model from scratch with the phi-1.5 report's recipe (section 2.3):
AdamW (0.9, 0.98), eps 1e-7, constant LR 2e-4, no warm-up, weight decay 0.1,
global batch 2048 sequences of 2048 tokens. Settings come from, in rising
priority: the defaults below, the model --preset, the --config TOML file, and
--set KEY=VALUE. The resolved settings are written to RUN_DIR/config.resolved.json.

RUN_DIR receives metrics.jsonl (one JSON object a step: step, loss, lr,
tokens_per_s, grad_norm, mfu, tokens, elapsed, val_loss on eval steps), tb/
(TensorBoard events), tokenizer.json, and checkpoints/step_XXXXXXXX/ (model,
optimizer, RNG and data-cursor state; atomic; the newest keep_last are kept).
--resume continues the newest complete checkpoint exactly.

The same command runs under torchrun for several processes or nodes, e.g.
  torchrun --nproc_per_node 8 -m phibook.cli train --preset phi-1.5 --data mix.toml --out runs/phi
"""

EXAMPLES = """\
examples:
  phibook train --preset phi-tiny --data shards/ --out runs/tiny --max-steps 2000 \\
      --set global_batch=32 micro_batch=8 seq_len=256 eval_every=200
  phibook train --config my-run.toml --data mixtures/phi-1.5.toml --out runs/phi --resume
"""


def register(subparsers) -> None:
    from phibook.train.config import config_help

    parser = subparsers.add_parser(
        "train",
        help="pretrain a phi model on token shards (python or torchrun)",
        description=DESCRIPTION,
        epilog=config_help() + "\n\n" + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", help="model preset to build (overrides the config file's preset)")
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file of training options ([model] table too)")
    parser.add_argument(
        "--data",
        required=True,
        metavar="MANIFEST_OR_MIXTURE",
        help="token shards: a manifest.json, its folder, a mixture .toml (from `phibook tokenize`), or the name of "
        "one of the report's mixtures (phi-1.5, phi-1.5-web, phi-1.5-web-only), read over shards/<source> "
        "folders under the current directory",
    )
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory for checkpoints and metrics")
    parser.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps to train (same as --set max_steps=N)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue RUN_DIR from its newest complete checkpoint (starts fresh, with a log line, if it has none)",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a training option or model field (model.NAME=VALUE); repeatable",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from phibook.train.config import parse_sets, resolve_config
    from phibook.train.trainer import train

    sets = parse_sets(args.sets)
    if args.max_steps is not None:
        sets["max_steps"] = str(args.max_steps)
    cfg = resolve_config(preset=args.preset, config_file=args.config, sets=sets)
    return train(cfg, args.data, args.out, resume=args.resume)
