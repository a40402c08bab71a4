"""python -m data_prep — turn raw cardiac MRI into training shards (and make a synthetic cohort to try it on)."""

from __future__ import annotations

import argparse
import sys

from data_prep.config import add_config_arguments, cli_parser, config_from_args, run_cli

EPILOG = """examples:
  python -m data_prep synth --out data/synth --subjects 64 --kspace-scans 32 --seed 0
  python -m data_prep synth --config configs/data_prep/synth_tiny.yaml --dicom
  python -m data_prep synth --out data/big prevalence_scale=3 kspace_format=mixed
"""


def _synth(args: argparse.Namespace) -> int:
    from data_prep.synth.cohort import SynthConfig, format_summary, generate

    # convenience flags are just overrides, so one validation path applies to all of them
    flags = {"out": args.out, "subjects": args.subjects, "kspace_scans": args.kspace_scans, "seed": args.seed,
             "workers": args.workers}
    args.overrides = list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.dicom:
        args.overrides.append("dicom=true")
    cfg = config_from_args(SynthConfig, args)
    summary = generate(cfg, progress=not args.quiet)
    print(format_summary(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p, sub = cli_parser("python -m data_prep", __doc__, EPILOG)
    s = sub.add_parser(
        "synth", help="write a synthetic UK Biobank + CMRxRecon cohort in the real on-disk layouts",
        description="Write a synthetic cohort: UK Biobank cine (NIfTI, optionally raw DICOM zips), the UK Biobank "
                    "tabular export, raw multi-coil k-space (CMRxRecon / MMCMR-427K layout) and the generator's "
                    "ground truth. Deterministic for a seed.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--out", help="output directory (config key: out)")
    s.add_argument("--subjects", type=int, help="number of UK Biobank subjects (default 64)")
    s.add_argument("--kspace-scans", type=int, help="number of k-space files (default 32)")
    s.add_argument("--seed", type=int, help="cohort seed (default 0)")
    s.add_argument("--dicom", action="store_true", help="also write the raw UK Biobank DICOM zips")
    s.add_argument("--workers", type=int, help="processes (default: one per core)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(s)
    s.set_defaults(func=_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
