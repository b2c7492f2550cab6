"""
How long stage 2 must be, chosen from the `llava` arm alone on a development copy of the world (another
seed's images and its own held-out questions), before any stage-1.5 arm is compared (docs/world.md,
"The recipe on the committed base, from the llava arm").

    python scripts/pilot_stage2_length.py --steps 1500 2500 --out out/dev-stage2    # ~15 min on 2 cores

One stage 1 (the demo recipe's, against the committed base), then one stage-2 run per length (each its own
cosine schedule), the ablation's llava arm (normalised visual tokens); every run's development accuracy
after every 500 steps, per type, printed as JSON lines and written to OUT/pilot.jsonl. The runs of one
call share the process's threads, one after another.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_ablation import ARMS, train  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[1500, 2500], help="stage-2 lengths, one run each")
    ap.add_argument("--world-seed", type=int, default=7, help="the development world's seed (the ablation's is 0)")
    ap.add_argument("--seed", type=int, default=0, help="the runs' seed")
    ap.add_argument("--out", default="out/dev-stage2")
    args = ap.parse_args()
    if args.world_seed == 0:
        ap.error("--world-seed 0 is the ablation's own world: choose on another one")
    if min(args.steps) < 500:
        ap.error("--steps: at least 500 each")
    import eval as E
    from shapes_world import shapes as SH
    world = os.path.join(args.out, "world")
    files = SH.shapes_files(world, SH.ShapesSpec(seed=args.world_seed))
    llava = dict(variant=ARMS["llava"]["variant"], model_overrides=ARMS["llava"]["model_overrides"])
    stage1 = os.path.join(args.out, "stage1")
    if not os.path.isfile(os.path.join(stage1, "model.safetensors")):
        train(stage="1", out_dir=stage1, data=files["stage1"], image_folder=world, seed=args.seed, overwrite=True)
    with open(os.path.join(args.out, "pilot.jsonl"), "a") as log:
        for steps in args.steps:
            run = os.path.join(args.out, f"stage2-{steps}")
            marks = list(range(500, steps, 500))
            train(stage="2", init=stage1, out_dir=run, data=files["stage2"], image_folder=world, seed=args.seed,
                  max_steps=steps, snapshot_steps=",".join(map(str, marks)), overwrite=True, **llava)
            for step in [*marks, steps]:
                ckpt = run if step == steps else os.path.join(run, "snapshots", f"step-{step}")
                r = E.evaluate(ckpt, files["test"], world, batch_size=100)
                row = {"schedule": steps, "step": step, "accuracy": r["accuracy"],
                       "per_type": {k: round(v["accuracy"], 3) for k, v in r["per_type"].items()}}
                print(json.dumps(row), flush=True)
                log.write(json.dumps(row) + "\n")
                log.flush()


if __name__ == "__main__":
    main()
