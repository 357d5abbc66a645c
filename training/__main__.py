"""`python -m training <command>`.

python -m training curate [--nih-labels FILE] --out CURATED.csv [--split image|patient]
                          [--seed N] [--per-class 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.curate import curate, packaged_nih_labels, summary, write_curated


def _curate(args: argparse.Namespace) -> int:
    labels = Path(args.nih_labels) if args.nih_labels else packaged_nih_labels()
    rows = curate(labels, per_class=args.per_class, seed=args.seed, split=args.split)
    write_curated(rows, Path(args.out))
    report = {"nih_labels": str(labels), "seed": args.seed, "split": args.split, **summary(rows)}
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    curate_parser = commands.add_parser(
        "curate", help="Curate the NIH ChestX-ray14 subset of the paper and split it."
    )
    curate_parser.add_argument(
        "--nih-labels",
        help="Data_Entry_2017.csv or Data_Entry_2017_v2020.csv(.gz); default: the file "
        "shipped in the torchxrayvision package.",
    )
    curate_parser.add_argument("--out", required=True, help="CSV to write.")
    curate_parser.add_argument("--split", choices=("image", "patient"), default="image")
    curate_parser.add_argument("--seed", type=int, default=0)
    curate_parser.add_argument("--per-class", type=int, default=2000)
    curate_parser.set_defaults(run=_curate)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
