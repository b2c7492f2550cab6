"""The clutter grid's report (docs/ablation-clutter, issue 39): does victor's gain over llava and over
captions grow with background clutter? The plan: scripts/bench_ablation.py's docstring, "PRE-REGISTERED
PLAN, CLUTTER WORLD". The heavy level's records in OUT/heavy, the light level's (clutter 0, run again
with the plan's code: docs/ablation-clutter/README.md) in OUT/light.

    # copy both grids' newest records in, then report
    python scripts/report_clutter.py --collect-heavy GRID/out/ablation-clutter --collect-light GRID/out/ablation-light
    python scripts/report_clutter.py                 # report from the records already in docs/ablation-clutter

Only complete seeds enter (every arm of the plan finished at the heavy level, and at the light one), so
every difference is paired: same seed, same stage 1 per level, same test questions. Per seed the
interaction is (A - B) at heavy minus (A - B) at light; its mean and 95 % t-interval over seeds
(bench_ablation.paired), overall and per question type. Writes OUT/ablation.json (`arms`, `paired`,
`interaction`, each per level where it has levels, each entry with mean, ci95 and per_seed, overall and
per type), OUT/ablation.md (also printed) and OUT/ablation.png.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bench_ablation as A  # noqa: E402

ARMS = ("llava", "captions", "victor")
CONTRASTS = (("victor", "llava"), ("victor", "captions"), ("captions", "llava"))
TYPES = ("colour", "count", "exists", "position", "shape")


def collect(grid_out: str, docs: str) -> int:
    """Copy the grid's finished records (runs' result.json, seeds' stage1.json) into docs. Returns how many."""
    n = 0
    for src in glob.glob(os.path.join(grid_out, "runs", "*", "seed-*", "result.json")) + \
            glob.glob(os.path.join(grid_out, "seeds", "seed-*", "stage1.json")):
        dst = os.path.join(docs, os.path.relpath(src, grid_out))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(src, dst)
        n += 1
    return n


def finished_seeds(records: str, arms=ARMS) -> list[int]:
    """The seeds every arm finished in a records folder (runs/ARM/seed-S/result.json)."""
    have = [{int(os.path.basename(os.path.dirname(p))[5:])
             for p in glob.glob(os.path.join(records, "runs", arm, "seed-*", "result.json"))} for arm in arms]
    return sorted(set.intersection(*have))


def with_interval(s: dict) -> dict:
    """An arm's stats (bench_ablation.stats) with the 95 % t-interval of its mean over seeds."""
    p = A.paired(s["per_seed"], [0.0] * len(s["per_seed"]))
    return {**s, "ci95": p["ci95"], "half_width": p["half_width"]}


def level_report(records: str, seeds: list[int], arms=ARMS) -> dict:
    """bench_ablation's own aggregate over one level's records, the arms' means with their intervals too."""
    report = A.aggregate(records, {a: list(seeds) for a in arms}, {"jobs": None})
    for a in report["arms"].values():
        a["accuracy"] = with_interval(a["accuracy"])
        a["per_type"] = {k: with_interval(v) for k, v in a["per_type"].items()}
    return report


def seed_difference(records: str, a: str, b: str, seeds: list[int]) -> dict:
    """Per seed (a - b): overall and per type, lists over seeds."""
    def load(arm, s):
        with open(os.path.join(records, "runs", arm, f"seed-{s}", "result.json")) as f:
            return json.load(f)
    ra, rb = [load(a, s) for s in seeds], [load(b, s) for s in seeds]
    return {"overall": [x["accuracy"] - y["accuracy"] for x, y in zip(ra, rb)],
            "per_type": {t: [x["per_type"][t] - y["per_type"][t] for x, y in zip(ra, rb)] for t in TYPES}}


def interaction(light: str, heavy: str, seeds: list[int]) -> dict:
    """Per contrast A - B: (A - B)_heavy - (A - B)_light per seed, its mean and 95 % t-interval, and the
    pre-registered reading (grows / shrinks when the interval excludes 0, else within noise)."""
    out = {}
    for a, b in CONTRASTS:
        h, g = seed_difference(heavy, a, b, seeds), seed_difference(light, a, b, seeds)
        overall = A.paired(h["overall"], g["overall"])
        overall["reading"] = {"better": "grows with clutter", "worse": "shrinks with clutter"}.get(
            A.verdict(overall), A.verdict(overall))
        out[f"{a}-{b}"] = {"seeds": seeds, "overall": overall,
                           "per_type": {t: A.paired(h["per_type"][t], g["per_type"][t]) for t in TYPES}}
    return out


def build(light: str, heavy: str, seeds: list[int]) -> dict:
    reports = {"light": level_report(light, seeds), "heavy": level_report(heavy, seeds)}
    levels = {"light": reports["light"]["arms"]["llava"]["settings"]["world"]["shapes"].get("clutter", 0),
              "heavy": reports["heavy"]["arms"]["llava"]["settings"]["world"]["shapes"].get("clutter", 0)}
    return {"seeds": seeds, "clutter": levels,
            "arms": {k: r["arms"] for k, r in reports.items()},
            "paired": {k: r["paired"] for k, r in reports.items()},
            "interaction": interaction(light, heavy, seeds),
            "run_seconds": {k: r["config"]["run_seconds"] for k, r in reports.items()}}


def level_ci(s: dict) -> str:
    """An accuracy with its 95 % interval (no sign: A.ci is for differences)."""
    if s["ci95"] is None:
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"


def markdown(report: dict) -> str:
    c, n = report["clutter"], len(report["seeds"])
    lines = [f"# The clutter grid: light (level {c['light']}) against heavy (level {c['heavy']}) clutter", "",
             f"Complete seeds: {report['seeds']} ({n} of the plan's 8). Every figure is over these seeds at both "
             "levels.", ""]
    lines += ["### Test accuracy after stage 2: mean [95 % CI] over seeds", "",
              "| arm | level | overall | " + " | ".join(TYPES) + " | per seed |",
              "|---|---|---|" + "---|" * len(TYPES) + "---|"]
    for arm in ARMS:
        for level in ("light", "heavy"):
            a = report["arms"][level][arm]
            lines.append(f"| {arm} | {c[level]} | {level_ci(a['accuracy'])} | "
                         + " | ".join(level_ci(a["per_type"][t]) for t in TYPES)
                         + " | " + ", ".join(f"{x:.3f}" for x in a["accuracy"]["per_seed"]) + " |")
    for level in ("light", "heavy"):
        lines += ["", f"### Paired differences at level {c[level]} ({level}): mean [95 % CI] over seeds", "",
                  "| difference | overall | verdict | " + " | ".join(TYPES) + " | per seed |",
                  "|---|---|---|" + "---|" * len(TYPES) + "---|"]
        for a, b in CONTRASTS:
            e = report["paired"][level][f"vs_{b}"][a]
            lines.append(f"| {a} - {b} | {A.ci(e['overall'])} | {e['overall']['verdict']} | "
                         + " | ".join(A.ci(e["per_type"][t]) for t in TYPES)
                         + " | " + ", ".join(f"{x:+.3f}" for x in e["overall"]["per_seed"]) + " |")
    lines += ["", "### The interaction: (difference at heavy) - (difference at light), per seed; mean [95 % CI]", "",
              "The pre-registered reading: the gain grows (shrinks) with clutter when the interval excludes 0 "
              "above (below) it, else within noise. Target half-width <= 0.02.", "",
              "| difference | overall | half-width | reading | " + " | ".join(TYPES) + " | per seed |",
              "|---|---|---|---|" + "---|" * len(TYPES) + "---|"]
    for name, e in report["interaction"].items():
        o = e["overall"]
        half = "–" if o["half_width"] is None else f"{o['half_width']:.3f}"
        lines.append(f"| {name.replace('-', ' - ')} | {A.ci(o)} | {half} | {o['reading']} | "
                     + " | ".join(A.ci(e["per_type"][t]) for t in TYPES)
                     + " | " + ", ".join(f"{x:+.3f}" for x in o["per_seed"]) + " |")
    layers = ("input", "middle", "last")
    lines += ["", "### Linear probe leaving stage 1.5 (llava: stage 1), object of a token's cell, at the run's "
              "clutter level: mean ± std", "", "| arm | level | " + " | ".join(layers) + " |",
              "|---|---|" + "---|" * len(layers)]
    for arm in ARMS:
        for level in ("light", "heavy"):
            p = report["arms"][level][arm]["probe"]
            lines.append(f"| {arm} | {c[level]} | " + " | ".join(A.pm(p[la]["object"]) for la in layers) + " |")
    s = report["run_seconds"]
    lines += ["", f"Run time summed over these seeds' runs: light {s['light'] / 60:.0f} min, heavy "
              f"{s['heavy'] / 60:.0f} min (one thread each)."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    c = report["clutter"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    for k, level in enumerate(("light", "heavy")):
        arms = report["arms"][level]
        m = [arms[a]["accuracy"]["mean"] for a in ARMS]
        err = [0 if arms[a]["accuracy"]["ci95"] is None else arms[a]["accuracy"]["half_width"] for a in ARMS]
        ax1.bar(np.arange(len(ARMS)) + (k - 0.5) * 0.38, m, 0.38, yerr=err, capsize=3,
                label=f"clutter {c[level]}", color=("tab:blue", "tab:red")[k], alpha=0.8)
    ax1.set_xticks(range(len(ARMS)), ARMS)
    ax1.set_ylabel("test accuracy after stage 2")
    lo = min(report["arms"][lv][a]["accuracy"]["mean"] for lv in ("light", "heavy") for a in ARMS)
    ax1.set_ylim(max(0.0, lo - 0.08), 1.0)
    ax1.set_title("accuracy, mean and 95 % CI over seeds")
    ax1.legend(fontsize=8)
    for k, level in enumerate(("light", "heavy")):
        for i, (a, b) in enumerate(CONTRASTS):
            p = report["paired"][level][f"vs_{b}"][a]["overall"]
            err = None if p["ci95"] is None else [[p["mean"] - p["ci95"][0]], [p["ci95"][1] - p["mean"]]]
            ax2.errorbar(i + (k - 0.5) * 0.3, p["mean"], yerr=err, fmt="o", capsize=4,
                         color=("tab:blue", "tab:red")[k], label=f"clutter {c[level]}" if i == 0 else None)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xticks(range(len(CONTRASTS)), [f"{a} - {b}" for a, b in CONTRASTS])
    ax2.set_ylabel("paired difference")
    ax2.set_title("paired differences per level")
    ax2.legend(fontsize=8)
    for i, e in enumerate(report["interaction"].values()):
        o = e["overall"]
        ax3.plot([i] * len(o["per_seed"]), o["per_seed"], "k.", ms=5)
        err = None if o["ci95"] is None else [[o["mean"] - o["ci95"][0]], [o["ci95"][1] - o["mean"]]]
        ax3.errorbar(i + 0.15, o["mean"], yerr=err, fmt="o", capsize=4, color="tab:purple")
    ax3.axhline(0, color="k", lw=0.8)
    ax3.set_xticks(range(len(report["interaction"])), [n.replace("-", " - ") for n in report["interaction"]])
    ax3.set_ylabel("(heavy) - (light)")
    ax3.set_title(f"interaction, {len(report['seeds'])} seeds (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "ablation-clutter"),
                    help="the report's folder; the levels' records in its heavy/ and light/")
    ap.add_argument("--collect-heavy", metavar="GRID_OUT", help="first copy the heavy grid's finished records "
                    "from GRID_OUT (its bench_ablation --out-dir) into OUT/heavy")
    ap.add_argument("--collect-light", metavar="GRID_OUT", help="the same for the light level, into OUT/light")
    args = ap.parse_args(argv)
    heavy, light = os.path.join(args.out, "heavy"), os.path.join(args.out, "light")
    for src, dst, flag in ((args.collect_heavy, heavy, "--collect-heavy"),
                           (args.collect_light, light, "--collect-light")):
        if src is None:
            continue
        if not os.path.isdir(os.path.join(src, "runs")):
            sys.exit(f"error: {flag} {src}: no runs/ folder there (a bench_ablation --out-dir?)")
        print(f"copied {collect(src, dst)} records from {src} into {dst}")
    seeds = [s for s in finished_seeds(heavy) if s in finished_seeds(light)]
    if not seeds:
        sys.exit(f"error: no seed has every arm of {list(ARMS)} finished in both {light} and {heavy}")
    report = build(light, heavy, seeds)
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report)
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write(table)
    plot(report, os.path.join(args.out, "ablation.png"))
    print(table)
    print(f"wrote {args.out}/ablation.json, ablation.md, ablation.png over seeds {seeds}")


if __name__ == "__main__":
    main()
