"""`python -m lab.sweep_summary <sweep dir>`: (re)build summary.csv, summary.md and report.md (with its figures) of
a finished or interrupted sweep from its job dirs, and print the best job. See src/lab/sweep.py, src/lab/report.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lab.errors import EXIT_USER_ERROR, UserError
from lab.report import write_report
from lab.sweep import report, write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.sweep_summary", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="e.g. outputs/train/multiruns/<time>_<id>")
    sweep_dir = parser.parse_args(argv).sweep_dir
    try:
        if not sweep_dir.is_dir():
            raise UserError("no such folder", str(sweep_dir), "give outputs/<task>/multiruns/<dir>")
        if not any(sweep_dir.glob("*/.hydra/overrides.yaml")):
            raise UserError("no job folders (<job number>/.hydra/) in it", str(sweep_dir), "give a sweep dir")
    except UserError as e:
        print(e.line(), file=sys.stderr)
        return EXIT_USER_ERROR
    print(report(sweep_dir, write_summary(sweep_dir)))
    print(f"sweep report: {write_report(sweep_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
