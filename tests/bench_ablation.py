"""
The ablation: what does stage 1.5 buy? Arms x seeds on the built-in shapes data, one command.

    python tests/bench_ablation.py                                  # every arm, seeds 0 1 2 (~90 min, 2 cores)
    python tests/bench_ablation.py --arms llava captions victor --seeds 0 1 2 3 4
    python tests/bench_ablation.py --quick --out-dir /tmp/ablation  # a few steps, one seed, every arm

Fair by construction. For each seed, one set of random base models and one stage-1 checkpoint, from
which every arm starts. Every arm with a stage 1.5 trains it on the same detailed captions for the
same number of steps (one pass over them, as the paper trains stage 1.5 for one epoch); every arm
then runs the same stage 2 (the demo's recipe). The arms differ only in their stage-1.5 settings:

    llava             no stage 1.5 (stage 1, then stage 2)
    captions          stage 1.5 with the LM loss alone: no pool, no replacement, no reconstruction
    victor            ViCToR: 75 % replaced by Hungarian-matched pool rows (pool 128), reconstruction
    victor-recon0     ViCToR's replacement without the reconstruction loss
    vdep              VDEP: nothing replaced, image position i reconstructs token i + 1, half the images
    croc              Croc: nearest-row matching, bidirectional prefix attention in stage 1.5
    victor-pool16 / victor-pool1024            the pool-size sweep (victor is 128)
    victor-replace0.5 / victor-replace0.9      the replace-ratio sweep (victor is 0.75)

(The croc arm keeps the demo's learning rates: Croc's 2e-5 belongs to the 7B recipes.)

Measured per arm and seed:
  * a linear probe of visual comprehension right after stage 1.5 (before stage 2): the LLM's hidden
    state at each image position (= one grid cell of the shapes images), at its input, a middle layer
    and its last layer, reads the cell's object (empty, or which of 4 colours x 3 shapes); fitted on
    1000 fresh images, tested on 500 others;
  * the shapes test set (500 questions) after 250 / 500 / 1000 stage-2 steps: the learning curve.

One (arm, seed) per process with one thread, --jobs at a time. Results go to
OUT/runs/ARM/seed-S/result.json and a finished run is not redone, so an interrupted grid continues
where it stopped. The report: OUT/ablation.json, OUT/ablation.md (also printed), OUT/ablation.png.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARMS = {
    "llava": dict(variant="llava"),
    "captions": dict(variant="captions"),
    "victor": dict(variant="victor"),
    "victor-recon0": dict(variant="victor", model_overrides={"recon_weight": 0.0}),
    "vdep": dict(variant="vdep"),
    "croc": dict(variant="croc"),
    "victor-pool16": dict(variant="victor", model_overrides={"pool_size": 16}),
    "victor-pool1024": dict(variant="victor", model_overrides={"pool_size": 1024}),
    "victor-replace0.5": dict(variant="victor", model_overrides={"replace_ratio": 0.5}),
    "victor-replace0.9": dict(variant="victor", model_overrides={"replace_ratio": 0.9}),
}

# the experiment's lengths: stage 1.5 = one pass over the 4000 detailed captions at batch 8
FULL = dict(train_images=4000, test_images=500, stage1_steps=20, stage15_steps=500, stage2_steps=1000,
            curve=[250, 500], probe_fit=1000, probe_test=500)
QUICK = dict(train_images=160, test_images=40, stage1_steps=2, stage15_steps=3, stage2_steps=4,
             curve=[2], probe_fit=60, probe_test=30)
PROBE_SEED = 12345  # the probe's images: the same for every arm and seed, none of them in the training data


# -----------------------------------------------------------------------------
# One run: a stage-1 checkpoint for a seed, or one arm for a seed


def train(**overrides):
    import train as T
    return T.run({"recipe": "demo", **overrides})


def run_stage1(out: str, seed: int, lengths: dict) -> dict:
    """The seed's random base models and its stage-1 checkpoint, shared by every arm."""
    import train as T
    seed_dir = os.path.join(out, "seeds", f"seed-{seed}")
    vision, llm = T.build_demo_base(seed_dir, seed=seed)
    shapes = os.path.join(out, "shapes")
    train(stage="1", out_dir=os.path.join(seed_dir, "stage1"), vision_model=vision, llm=llm, seed=seed,
          data=os.path.join(shapes, "stage1.json"), image_folder=shapes, max_steps=lengths["stage1_steps"])
    return {"stage1": os.path.join(seed_dir, "stage1")}


def probe_images(n: int, offset: int):
    """n fresh shapes images (PIL) and their 9 cell labels: 0 empty, else 1 + colour * 3 + shape."""
    import data as D
    spec, colours = D.ShapesSpec(), sorted(D.COLOURS)
    rng = random.Random(PROBE_SEED + offset)
    images, labels = [], []
    for _ in range(n):
        im, objects = D.draw_shapes_image(rng, spec)
        cells = [0] * spec.grid ** 2
        for o in objects:
            object_class = colours.index(o["colour"]) * len(D.SHAPES) + D.SHAPES.index(o["shape"])
            cells[D.CELLS.index(o["cell"])] = 1 + object_class
        images.append(im)
        labels.append(cells)
    return images, np.array(labels)


def hidden_at_images(model, tokenizer, image_processor, images, batch: int = 100) -> dict[str, np.ndarray]:
    """The LLM's hidden states at the image positions, [images, N, D] per layer, for the stage-1.5
    prompt (image + 'describe it'), with the model as stage 2 and inference use it (causal)."""
    import torch

    import data as D
    template = D.resolve_template("auto", tokenizer, "1.5")
    messages = [{"role": "user", "content": f"{D.IMAGE_PLACEHOLDER}\n{D.DETAIL_PROMPT}"}]
    ids, _ = D.tokenize_conversation(messages, tokenizer, template, model.num_image_tokens,
                                     image_token_id=model.cfg.image_token_id)
    layers = {}
    model.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            chunk = images[i:i + batch]
            input_ids = torch.tensor([ids] * len(chunk))
            embeds, positions, _ = model.embed_inputs(input_ids, D.preprocess_images(chunk, image_processor))
            hs = model.llm.get_decoder()(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids),
                                         output_hidden_states=True, use_cache=False).hidden_states
            picks = {"input": 0, "middle": len(hs) // 2, "last": len(hs) - 1}
            for name, k in picks.items():
                h = hs[k][positions].view(len(chunk), model.num_image_tokens, -1).float().numpy()
                layers.setdefault(name, []).append(h)
    return {k: np.concatenate(v) for k, v in layers.items()}


def linear_probe(x_fit, y_fit, x_test, y_test, classes: int, steps: int = 150) -> dict:
    """Multinomial logistic regression (L-BFGS, small L2) on standardised features. Accuracy on the
    test cells: 'object' (occupied cells: the exact colour and shape, chance 1/12), 'colour' and
    'shape' (occupied cells), 'occupied' (empty or not, all cells)."""
    import torch
    torch.manual_seed(0)
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    xf, xt = torch.tensor((x_fit - mu) / sd), torch.tensor((x_test - mu) / sd)
    yf = torch.tensor(y_fit)
    lin = torch.nn.Linear(xf.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xf), yf) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        pred = lin(xt).argmax(1).numpy()
    occ = y_test > 0
    shapes = 3
    return {"object": float((pred[occ] == y_test[occ]).mean()),
            "colour": float(((pred[occ] - 1) // shapes == (y_test[occ] - 1) // shapes).mean() if occ.any() else 0),
            "shape": float(((pred[occ] - 1) % shapes == (y_test[occ] - 1) % shapes).mean() if occ.any() else 0),
            "occupied": float(((pred > 0) == occ).mean())}


def probe(checkpoint: str, lengths: dict) -> dict:
    """The probe of the model leaving stage 1.5 (for llava: leaving stage 1), per layer."""
    from victor import load_checkpoint
    model, tokenizer, image_processor = load_checkpoint(checkpoint)
    fit_images, y_fit = probe_images(lengths["probe_fit"], 0)
    test_images, y_test = probe_images(lengths["probe_test"], 1)
    h_fit = hidden_at_images(model, tokenizer, image_processor, fit_images)
    h_test = hidden_at_images(model, tokenizer, image_processor, test_images)
    classes = 1 + 4 * 3
    out = {}
    for layer in h_fit:
        d = h_fit[layer].shape[-1]
        out[layer] = linear_probe(h_fit[layer].reshape(-1, d), y_fit.reshape(-1), h_test[layer].reshape(-1, d),
                                  y_test.reshape(-1), classes)
    return out


def evaluate(checkpoint: str, out: str) -> dict:
    import eval as E
    shapes = os.path.join(out, "shapes")
    r = E.evaluate(checkpoint, os.path.join(shapes, "test.jsonl"), shapes, batch_size=100)
    return {"accuracy": r["accuracy"], "per_type": {k: v["accuracy"] for k, v in r["per_type"].items()}}


def run_arm(out: str, arm: str, seed: int, lengths: dict) -> dict:
    """One arm for one seed: stage 1.5 (unless llava) from the seed's stage 1, the probe, stage 2 with
    snapshots, the test set at every snapshot. Returns (and writes) its result."""
    t0 = time.time()
    spec = ARMS[arm]
    run_dir = os.path.join(out, "runs", arm, f"seed-{seed}")
    stage1 = os.path.join(out, "seeds", f"seed-{seed}", "stage1")
    shapes = os.path.join(out, "shapes")
    common = dict(seed=seed, image_folder=shapes, variant=spec["variant"],
                  model_overrides=spec.get("model_overrides", {}))
    start = stage1
    if spec["variant"] != "llava":
        start = os.path.join(run_dir, "stage1.5")
        train(stage="1.5", init=stage1, out_dir=start, data=os.path.join(shapes, "stage1_5.json"),
              max_steps=lengths["stage15_steps"], **common)
    t_probe = time.time()
    result = {"arm": arm, "seed": seed, "probe": probe(start, lengths)}
    t_stage2 = time.time()
    stage2 = os.path.join(run_dir, "stage2")
    train(stage="2", init=start, out_dir=stage2, data=os.path.join(shapes, "stage2.json"),
          max_steps=lengths["stage2_steps"], snapshot_steps=",".join(map(str, lengths["curve"])), **common)
    curve = {}
    for step in lengths["curve"]:
        curve[str(step)] = evaluate(os.path.join(stage2, "snapshots", f"step-{step}"), out)["accuracy"]
    final = evaluate(stage2, out)
    curve[str(lengths["stage2_steps"])] = final["accuracy"]
    result.update(accuracy=final["accuracy"], per_type=final["per_type"], curve=curve,
                  seconds={"stage1.5": t_probe - t0, "probe": t_stage2 - t_probe,
                           "stage2+eval": time.time() - t_stage2})
    for d in (os.path.join(stage2, "snapshots"), os.path.join(run_dir, "stage1.5", "checkpoints")):
        shutil.rmtree(d, ignore_errors=True)  # the report needs only the numbers
    with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


# -----------------------------------------------------------------------------
# The grid: jobs in parallel processes, one thread each


def run_jobs(jobs: list[dict], parallel: int, out: str):
    """Each job in its own process (python this_file --job JSON), `parallel` at a time."""
    pending, running, failed = list(jobs), [], []
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            name = job["kind"] + ("" if job["kind"] == "stage1" else "-" + job["arm"]) + f"-seed{job['seed']}"
            log = open(os.path.join(out, "logs", name + ".log"), "w")
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--job", json.dumps(job)], cwd=ROOT,
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((p, name, log, time.time()))
            print(f"  started {name}", flush=True)
        time.sleep(0.5)
        for item in list(running):
            p, name, log, t = item
            if p.poll() is not None:
                running.remove(item)
                log.close()
                status = "done" if p.returncode == 0 else f"FAILED (exit {p.returncode}, see logs/{name}.log)"
                print(f"  {name}: {status} in {time.time() - t:.0f}s", flush=True)
                if p.returncode:
                    failed.append(name)
    if failed:
        raise SystemExit(f"{len(failed)} runs failed: {failed}")


def job_main(job: dict):
    import torch
    torch.set_num_threads(1)
    if job["kind"] == "stage1":
        run_stage1(job["out"], job["seed"], job["lengths"])
    else:
        run_arm(job["out"], job["arm"], job["seed"], job["lengths"])


# -----------------------------------------------------------------------------
# The report


def stats(values: list[float]) -> dict:
    v = np.array(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "per_seed": [float(x) for x in v]}


def aggregate(out: str, arms: list[str], seeds: list[int], config: dict) -> dict:
    report = {"arms": {}, "config": config}
    for arm in arms:
        results = []
        for s in seeds:
            with open(os.path.join(out, "runs", arm, f"seed-{s}", "result.json")) as f:
                results.append(json.load(f))
        report["arms"][arm] = {
            "seeds": seeds,
            "accuracy": stats([r["accuracy"] for r in results]),
            "per_type": {k: stats([r["per_type"][k] for r in results]) for k in results[0]["per_type"]},
            "curve": {k: stats([r["curve"][k] for r in results]) for k in results[0]["curve"]},
            "probe": {layer: {m: stats([r["probe"][layer][m] for r in results]) for m in results[0]["probe"][layer]}
                      for layer in results[0]["probe"]},
        }
    return report


def pm(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def markdown(report: dict) -> str:
    arms = report["arms"]
    first = next(iter(arms.values()))
    types = list(first["per_type"])
    steps = list(first["curve"])
    ref = arms.get("llava")
    lines = ["### Shapes test set after stage 2 (mean ± std over seeds)", "",
             "| arm | overall | " + " | ".join(types) + " | vs llava | per seed |",
             "|---|---|" + "---|" * len(types) + "---|---|"]
    # "vs llava": the difference of means, and that difference in units of the pooled seed std
    for name, a in arms.items():
        diff = ""
        if ref is not None and name != "llava":
            d = a["accuracy"]["mean"] - ref["accuracy"]["mean"]
            noise = ((a["accuracy"]["std"] ** 2 + ref["accuracy"]["std"] ** 2) / 2) ** 0.5  # the pooled seed std
            diff = f"{d:+.3f}" + (f" ({d / noise:+.1f} std)" if noise > 0 else "")
        lines.append(f"| {name} | {pm(a['accuracy'])} | " + " | ".join(pm(a["per_type"][t]) for t in types)
                     + f" | {diff} | " + ", ".join(f"{x:.3f}" for x in a["accuracy"]["per_seed"]) + " |")
    lines += ["", "### Learning curve: test accuracy after N stage-2 steps", "",
              "| arm | " + " | ".join(steps) + " |", "|---|" + "---|" * len(steps)]
    for name, a in arms.items():
        lines.append(f"| {name} | " + " | ".join(pm(a["curve"][k]) for k in steps) + " |")
    layers = list(first["probe"])
    lines += ["", "### Linear probe right after stage 1.5: a cell's object from the hidden state at its image position",
              "", "object: colour and shape of the object in an occupied cell (chance 1/12); colour (1/4), "
              "shape (1/3).", "",
              "| arm | " + " | ".join(f"{layer} object | {layer} colour | {layer} shape" for layer in layers) + " |",
              "|---|" + "---|" * (3 * len(layers))]
    for name, a in arms.items():
        cells = [pm(a["probe"][layer][m]) for layer in layers for m in ("object", "colour", "shape")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    c = report["config"]
    lines += ["", f"Seeds {c['seeds']}; stage 1.5: {c['lengths']['stage15_steps']} steps; stage 2: "
              f"{c['lengths']['stage2_steps']} steps; wall time {c.get('wall_time_s', 0) / 60:.1f} min with "
              f"{c['jobs']} parallel runs."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = report["arms"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = list(arms)
    means = [arms[n]["accuracy"]["mean"] for n in names]
    stds = [arms[n]["accuracy"]["std"] for n in names]
    ax1.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    for i, n in enumerate(names):
        ax1.plot([i] * len(arms[n]["accuracy"]["per_seed"]), arms[n]["accuracy"]["per_seed"], "k.", ms=4)
    ax1.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax1.set_ylabel("shapes test accuracy after stage 2")
    lo = min(m - s for m, s in zip(means, stds))
    ax1.set_ylim(max(0.0, lo - 0.05), min(1.0, max(m + s for m, s in zip(means, stds)) + 0.03))
    ax1.set_title("mean ± std over seeds (dots: seeds)")
    for n in names:
        steps = [int(k) for k in arms[n]["curve"]]
        m = np.array([arms[n]["curve"][str(k)]["mean"] for k in steps])
        s = np.array([arms[n]["curve"][str(k)]["std"] for k in steps])
        ax2.plot(steps, m, marker="o", label=n)
        ax2.fill_between(steps, m - s, m + s, alpha=0.12)
    ax2.set_xlabel("stage-2 steps")
    ax2.set_ylabel("test accuracy")
    ax2.set_title("learning curves in stage 2")
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), metavar="ARM", help=f"from {list(ARMS)}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="a few steps, one seed (unless --seeds), every arm")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    ap.add_argument("--out-dir", default="out/ablation")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.job:
        return job_main(json.loads(args.job))
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if args.quick and "--seeds" not in (argv if argv is not None else sys.argv):
        args.seeds = [0]
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    lengths = QUICK if args.quick else FULL
    out = os.path.abspath(args.out_dir)
    t0 = time.time()
    import data as D
    D.shapes_files(os.path.join(out, "shapes"), D.ShapesSpec(num_train_images=lengths["train_images"],
                                                             num_test_images=lengths["test_images"]))
    print(f"ablation: arms {args.arms}, seeds {args.seeds}, stage 1.5 {lengths['stage15_steps']} steps, "
          f"stage 2 {lengths['stage2_steps']} steps -> {out}", flush=True)
    done = lambda kind, arm, s: os.path.isfile(  # noqa: E731
        os.path.join(out, "seeds", f"seed-{s}", "stage1", "model.safetensors") if kind == "stage1"
        else os.path.join(out, "runs", arm, f"seed-{s}", "result.json"))
    run_jobs([dict(kind="stage1", seed=s, out=out, lengths=lengths) for s in args.seeds
              if not done("stage1", None, s)], args.jobs, out)
    run_jobs([dict(kind="arm", arm=a, seed=s, out=out, lengths=lengths) for s in args.seeds for a in args.arms
              if not done("arm", a, s)], args.jobs, out)
    config = {"seeds": args.seeds, "arms": {a: ARMS[a] for a in args.arms}, "lengths": lengths, "jobs": args.jobs,
              "quick": args.quick, "wall_time_s": time.time() - t0,
              "stage2_recipe": "the demo recipe's stage 2 (lr 5e-4, batch 16, warm-up 30, beta2 0.95), "
                               "max_steps as above"}
    report = aggregate(out, args.arms, args.seeds, config)
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report)
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(table)
    plot(report, os.path.join(out, "ablation.png"))
    print(table)
    print(f"wrote {out}/ablation.json, ablation.md, ablation.png in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
