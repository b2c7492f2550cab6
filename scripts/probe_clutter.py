"""How much the committed base's vision tower loses under clutter (docs/ablation-clutter): the tower's
linear probe (shapes_world/demo_base.py tower_probe: every visual token's cell's object, at the layer
victor reads, 600 fitting and 300 test images as the base record's) at each clutter level.

    python scripts/probe_clutter.py                 # every level, ~2 min on one thread
    python scripts/probe_clutter.py --levels 0 3    # some

Prints one JSON line per level; the base itself is never changed (it was pretrained at level 0).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    from shapes_world import demo_base as B
    from shapes_world import shapes as SH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    levels = sorted(SH.CLUTTER_LEVELS)
    ap.add_argument("--levels", type=int, nargs="+", default=levels, choices=levels)
    args = ap.parse_args(argv)
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionModel
    torch.set_num_threads(1)
    vision_dir, _ = B.demo_base()
    tower = CLIPVisionModel.from_pretrained(vision_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(vision_dir)
    for level in args.levels:
        probe = B.tower_probe(tower, processor, B.BASE_CHECKS["probe_fit"], B.BASE_CHECKS["probe_test"], clutter=level)
        print(json.dumps({"clutter": level, **probe}), flush=True)


if __name__ == "__main__":
    main()
