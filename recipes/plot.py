"""Redraw a run's plot from its summary.json, optionally against a --no-ab baseline run.

    python recipes/plot.py runs/demo/ab [--baseline runs/demo/dp] [--out plot.png]

The recipes draw the same plot at the end of every run (common.plot_run); this script is for
redrawing it, or comparing runs after the fact.
"""

from __future__ import annotations

import argparse
import os

import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="output_dir of a recipe run (holds summary.json)")
    parser.add_argument("--baseline", help="output_dir of a --no-ab run to compare with")
    parser.add_argument("--out", help="PNG path (default: <run>/plot.png)")
    args = parser.parse_args()
    summary = common.read_baseline(args.run)  # reads <run>/summary.json
    baseline = common.read_baseline(args.baseline)
    out = args.out or os.path.join(args.run, "plot.png")
    print(common.plot_run(summary, out, baseline))


if __name__ == "__main__":
    main()
