"""
Training curves of one run or several: one panel per stage, each against its own steps (the losses, and the
learning rate dotted on the right axis; no reconstruction line for a stage without reconstruction):

    python scripts/plot_curves.py out/demo                     # writes out/demo/curves.png
    python scripts/plot_curves.py out/demo out/l15 --out-png compare.png   # two runs, one line style each
    python scripts/plot_curves.py out/demo/stage1.5/metrics.jsonl          # one stage's file

The picture is written beside the run (RUN/curves.png), not inside a stage's directory, which a retrain
with --overwrite moves aside.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engineering.benchmarks import InputError  # noqa: E402
from engineering.pictures import draw_curves, metrics_files, read_curves  # noqa: E402


def default_png(path: str) -> str:
    """RUN/curves.png for a run's out-dir, a stage's directory in it, or a stage's metrics.jsonl."""
    run = os.path.abspath(path)
    if os.path.isfile(run):
        run = os.path.dirname(run)
    if os.path.isfile(os.path.join(run, "metrics.jsonl")):  # a stage's directory: its run is the one above
        run = os.path.dirname(run)
    return os.path.join(run, "curves.png")


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_METRICS",
                    help="a run's out-dir, a stage's directory, or a metrics.jsonl written by train.py")
    ap.add_argument("--out-png", default="", help="the PNG to write (default: RUN/curves.png, the first run's)")
    args = ap.parse_args(argv)
    try:
        files = [f for path in args.runs for f in metrics_files(path)]
        stages = read_curves(files)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    out = args.out_png or default_png(args.runs[0])
    picture = draw_curves(stages, "training curves: " + ", ".join(args.runs), out)
    print(f"wrote {out} ({picture.size[0]}x{picture.size[1]}, stages {', '.join(stages)})")
    return out


if __name__ == "__main__":
    main()
