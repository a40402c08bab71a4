"""python -m data_prep — turn raw cardiac MRI into training shards (and make a synthetic cohort to try it on)."""

from __future__ import annotations

import argparse
import sys

from core.cli import add_config_arguments, cli_parser, config_from_args, run_cli

EPILOG = """examples:
  python -m data_prep synth --out data/synth --subjects 64 --kspace-scans 32 --seed 0
  python -m data_prep ukb --src data/synth/ukb --tabular data/synth/ukb_tabular.csv --out data/ukb
  python -m data_prep ukb --src data/synth/ukb_dicom --out data/ukb_dicom --ray-address auto
  python -m data_prep kspace --src data/synth/kspace --out data/kspace --workers 2
  python -m data_prep synth --config configs/data_prep/synth_tiny.yaml --dicom
  python -m data_prep synth --out data/big prevalence_scale=3 kspace_format=mixed
  python -m data_prep synth --out data/sax --subjects 0 --kspace-scans 0 --acdc 30 --mnms 30 sax_size_scale=0.5
  python -m data_prep sax --src data/sax/acdc --out data/acdc layout=acdc crop=64 spacing_mm=3
"""


def _synth(args: argparse.Namespace) -> int:
    from data_prep.synth.cohort import SynthConfig, format_summary, generate

    # convenience flags are just overrides, so one validation path applies to all of them
    flags = {"out": args.out, "subjects": args.subjects, "kspace_scans": args.kspace_scans, "seed": args.seed,
             "workers": args.workers, "acdc": args.acdc, "mnms": args.mnms}
    args.overrides = list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.dicom:
        args.overrides.append("dicom=true")
    cfg = config_from_args(SynthConfig, args)
    summary = generate(cfg, progress=not args.quiet)
    print(format_summary(summary))
    return 0


def _job_flags(args: argparse.Namespace) -> None:
    """--src/--out/--workers/--ray-address are overrides of the job config, like any section.key=value."""
    flags = {"src": args.src, "job.out": args.out, "job.workers": args.workers, "job.ray_address": args.ray_address}
    if getattr(args, "tabular", None) is not None:
        flags["tabular"] = args.tabular
    args.overrides = list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]


def _convert(job: str):
    """The `ukb` / `kspace` commands: data_prep.<job>.job provides JOB_CONFIG and run()."""

    def command(args: argparse.Namespace) -> int:
        from importlib import import_module

        from data_prep.engine import format_summary

        module = import_module(f"data_prep.{job}.job")
        _job_flags(args)
        cfg = config_from_args(module.JOB_CONFIG, args)
        report, src_bytes = module.run(cfg, progress=not args.quiet)
        print(format_summary(report, cfg.job.out, src_bytes))
        return 0

    return command


def _add_job_parser(sub, name: str, func, help_: str, description: str, tabular: bool = False) -> None:
    j = sub.add_parser(name, help=help_, description=description, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    j.add_argument("--src", help="the raw source directory (config key: src)")
    if tabular:
        j.add_argument("--tabular", help="the UK Biobank tabular CSV export (config key: tabular)")
    j.add_argument("--out", help="output directory: shards/, store.zarr, manifest.json (config key: job.out)")
    g = j.add_mutually_exclusive_group()
    g.add_argument("--workers", type=int, help="CPUs of the local Ray cluster (default: all cores)")
    g.add_argument("--ray-address", help="join an existing Ray cluster (e.g. auto, or ray://host:10001)")
    j.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(j)
    j.set_defaults(func=func)


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
    s.add_argument("--acdc", type=int, help="cine SAX segmentation cases in the ACDC layout (default 0)")
    s.add_argument("--mnms", type=int, help="cine SAX segmentation cases in the M&Ms layout (default 0)")
    s.add_argument("--dicom", action="store_true", help="also write the raw UK Biobank DICOM zips")
    s.add_argument("--workers", type=int, help="processes (default: one per core)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(s)
    s.set_defaults(func=_synth)
    _add_job_parser(sub, "ukb", _convert("ukb"), "convert UK Biobank cine (NIfTI or DICOM zips) + tabular CSV to shards + Zarr",
                    "Convert UK Biobank cine CMR (the ukbb_cardiac NIfTI layout <eid>/sa.nii.gz ... or the raw "
                    "DICOM zips <eid>_20209_2_0.zip / <eid>_20208_2_0.zip) and the tabular CSV into WebDataset "
                    "shards and a Zarr store, on a local or existing Ray cluster. Re-runs skip what is done; "
                    "a larger source appends.", tabular=True)
    _add_job_parser(sub, "kspace", _convert("kspace"), "convert raw multi-coil k-space (CMRxRecon / MMCMR-427K) to shards + Zarr",
                    "Reconstruct raw multi-coil k-space files (MATLAB v7.3 or v5, CMRxRecon / MMCMR-427K layout) "
                    "into z-scored 224x224 image sequences with their acquisition metadata and MetaCLIP-CMR "
                    "texts, written as WebDataset shards and a Zarr store.")
    _add_job_parser(sub, "sax", _convert("sax"), "convert ACDC or M&Ms (as published) to shards + Zarr",
                    "Convert a cine short-axis segmentation benchmark in its published layout (layout=acdc: "
                    "database/{training,testing}/patientNNN with Info.cfg; layout=mnms: OpenDataset/Training/"
                    "Labeled and Testing with the dataset information CSV) into WebDataset shards and a Zarr store: "
                    "every frame as image, labels at ED and ES in the project's label space, the published "
                    "train / test split.")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
