"""`cmrfm COMMAND ...`: the one console command of the installed project, the same as `python -m COMMAND ...`.

    cmrfm data_prep ukb --src ... --out ...     (= python -m data_prep ...)
    cmrfm pretrain config --config ...          (= python -m pretrain ...; multi-GPU runs start through torchrun)
    cmrfm finetune predict --model ... --input ... --out ...
    cmrfm cluster submit pretrain ...
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "data_prep": "convert UK Biobank cine + tabular and raw k-space into shards and a Zarr store (Ray)",
    "pretrain": "pretraining on DeepSpeed: Stage I MAE, Stage II image-tabular CLIP, MetaCLIP-CMR; export",
    "finetune": "fine-tuning on one GPU, probes, embeddings, predictions, reports",
    "cluster": "SLURM jobs through submitit: submit, status, logs, cancel",
}
ALIASES = {"data-prep": "data_prep"}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join(["usage: cmrfm COMMAND [ARGS...]   (cmrfm COMMAND --help for each)", "", "commands:",
                      *[f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name = ALIASES.get(argv[0], argv[0])
    if name not in COMMANDS:
        print(f"cmrfm: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(f"{name}.__main__").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
