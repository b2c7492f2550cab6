"""
The ablation: what does stage 1.5 buy? Arms x seeds on the built-in shapes world, one command.

    python scripts/bench_ablation.py                      # the fourth world's pre-registered grid (~4 h on 2 cores)
    python scripts/bench_ablation.py --arms llava captions victor --seeds 0 1 2
    python scripts/bench_ablation.py --quick              # every arm, a few steps, seed 0 (~2 min): a smoke run

PRE-REGISTERED PLAN, CLUTTER WORLD (issue 39; committed before the first clutter-grid run. The heavy level
was chosen from the llava arm alone on the development world, seed 7, by the rule in
docs/ablation-clutter/README.md, committed before those runs (cbfd17c): llava's development accuracy
0.921 / 0.888 / 0.837 at levels 2 / 3 / 4, the lowest at <= 0.850 is level 4; level 0 gave 0.974; the
base tower's probe falls from 0.9996 to 0.858 at level 4). The fourth world's plan below is kept as
the record of its grid, whose runs are this grid's light level.)
  * Question: ViCToR's premise (arXiv 2410.14332, abstract): visual representations are sensitive to
    background clutter, language is not, and stage 1.5 closes that gap. Does victor's gain over llava
    (and over captions) grow with clutter?
  * World: the fourth world's (seed 0, 4000 training images, the 5000 test questions, the committed base
    unchanged: it was pretrained at clutter level 0), with clutter level 4 in every image the three
    stages, the probe and the test see (shapes_world/shapes.py CLUTTER_LEVELS). The clutter has its own
    random stream: the scenes, captions, questions and answers are the fourth world's, only the pixels
    around the objects differ.
  * Arms llava, captions, victor on seeds 0-7, with the fourth world's stage recipes and lengths (FULL):
        python scripts/bench_ablation.py --arms llava captions victor --seeds 0 1 2 3 4 5 6 7 \
            --clutter 4 --jobs 2 --out-dir out/ablation-clutter
    run seed by seed (a grid cut short holds complete paired seeds), in as many sittings as it takes
    (runs reused by their recorded settings). victor-recon0 only once those 24 runs are done, reported
    apart from the question.
  * Light level: clutter 0, the fourth world's runs of these arms and seeds (docs/ablation-fourth-world),
    reused because the code paths they ran are unchanged at level 0; shown by re-running llava seed 0 at
    level 0 and matching its result.json (accuracy, per type, every question's correctness, curve, probe,
    settings). If it does not match, the light level is run again with this code before any interaction
    is reported.
  * Comparison: per level, paired per seed as in the fourth world. The question's measure, per seed:
    the interaction (victor - llava) at level 4 minus (victor - llava) at level 0; likewise victor -
    captions (captions - llava reported too). Mean and 95 % t-interval over the seeds complete at both
    levels. Rule: the gain grows with clutter when the interval excludes 0 above it, shrinks when it
    excludes 0 below, else within noise. Target half-width <= 0.02; if not reached, the half-width
    reached is reported. Per type and the probes: reported, not tested.
  * Report: python scripts/report_clutter.py --collect out/ablation-clutter -> docs/ablation-clutter/
    (ablation.json, ablation.md, ablation.png; complete seeds only). Whatever comes out is reported.

PRE-REGISTERED PLAN, FOURTH WORLD (committed before the first grid run on the new committed base; the
stage-2 length was chosen from the llava arm alone on a development copy of the world generated from
another seed, by a rule written down before those runs; docs/world.md). The earlier worlds' plans and
results are kept in docs/ablation-third-world (plan: commit cba58cd; its base's LLM answered text-only
questions 0.81, binding attributes to objects only partly), docs/ablation-second-world and
docs/ablation-first-world.
  * World: the demo's. One base for every run, the committed one (shapes_world/base, each run records its
    files' sha256): a CLIP-class tower (patch 16: 36 visual tokens, 2 x 2 per grid cell) pretrained to tell
    every token's cell's object (probe 0.9996), and a Llama (RoPE base 100) pretrained on the world's text
    (text-only QA on 1000 fresh described scenes 0.995, every type >= 0.975). 4000 training images; a
    test set of 5000 questions (1000 per type), the same for every arm and seed.
  * Per seed: one stage-1 checkpoint (projector alone against the frozen LLM, 200 steps of 32), shared by
    every arm. Stage 1.5: 500 steps of 8 (one pass over the 4000 detailed captions), the demo recipe's
    stage-1.5 settings. Stage 2: 2000 steps of 16 at lr 5e-4 (the demo recipe's stage 2: on the development
    world the llava arm's accuracy was 0.863 / 0.913 / 0.936 / 0.966 / 0.967 after 500-2500 steps of a
    2500-step run, 0.950 at the end of a 1500-step run; by the rule written before those runs, 2000).
  * Arms: llava (no stage 1.5), captions (stage 1.5 with the LM loss alone), victor, victor-recon0
    (replacement without reconstruction) on seeds 0-7; vdep and croc on seeds 0-4. The four core arms run
    first, seed by seed, so that a grid cut short holds complete paired seeds; runs are reused when
    their recorded settings are equal, so the grid may be finished in more than one sitting.
  * Metric: accuracy over the 5000 test questions after stage 2; per type too.
  * Comparison: paired per seed (same stage 1, same questions): each arm minus captions and minus llava;
    mean and 95 % t-interval over seeds. Rule: an arm beats another when that interval excludes 0; else
    the two are within noise. Precision target: the intervals of victor - captions and of victor - llava
    at most +-0.02; if not reached, the half-width reached and where the noise comes from are reported.
  * Also reported, not tested: the learning curve (the first 1000 test questions after 500, 1000 and
    1500 stage-2 steps) and the probe below. Whatever comes out is reported.

Fair by construction. Every arm of a seed starts from the same stage-1 checkpoint, trains stage 1.5 (if
it has one) on the same captions for the same steps, then the same stage 2. The arms differ only in
their stage-1.5 settings; every arm L2-normalises its visual tokens (normalize_visual_tokens, ViCToR's
default), so that normalisation is not a difference between them:

    llava             no stage 1.5 (stage 1, then stage 2); normalised like the rest (--variant llava alone
                      does not normalise: LLaVA-1.5's math)
    captions          stage 1.5 with the LM loss alone: no pool, no replacement, no reconstruction
    victor            ViCToR: 75 % replaced by Hungarian-matched pool rows (pool 128), reconstruction
    victor-recon0     ViCToR's replacement without the reconstruction loss
    vdep              VDEP: nothing replaced, image position i reconstructs token i + 1, half the images
    croc              Croc: nearest-row matching, bidirectional prefix attention in stage 1.5
    victor-pool32 / victor-pool1024            the pool-size sweep (victor is 128; 27 tokens are replaced)
    victor-replace0.5 / victor-replace0.9      the replace-ratio sweep (victor is 0.75)

(The croc arm keeps the demo's learning rates: Croc's 2e-5 belongs to the 7B recipes.)

Measured per arm and seed:
  * a linear probe of visual comprehension right after stage 1.5 (before stage 2): the LLM's hidden
    state at each image position, at its input, a middle layer and its last layer, reads the object of
    the grid cell its patch lies in (empty, or which of 4 colours x 3 shapes); fitted on 600 fresh
    images, tested on 300 others;
  * the test set after 500 / 1000 stage-2 steps (its first 1000 questions) and after the last (all 5000).

One (arm, seed) per process with one thread, --jobs at a time (forked from one that imported torch and
the project once). Results go to
OUT/runs/ARM/seed-S/result.json with the settings they were made with; a finished run is reused only
when its recorded settings equal the requested ones (else it is redone, and the reason printed), so an
interrupted grid continues where it stopped. The report (its labels from the runs' recorded settings):
OUT/ablation.json, OUT/ablation.md (also printed), OUT/ablation.png.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARMS = {
    # --variant llava alone is LLaVA-1.5's math (no normalisation); here normalisation is kept as in every arm,
    # so that the arms differ only by stage 1.5
    "llava": dict(variant="llava", model_overrides={"normalize_visual_tokens": True}),
    "captions": dict(variant="captions"),
    "victor": dict(variant="victor"),
    "victor-recon0": dict(variant="victor", model_overrides={"recon_weight": 0.0}),
    "vdep": dict(variant="vdep"),
    "croc": dict(variant="croc"),
    "victor-pool32": dict(variant="victor", model_overrides={"pool_size": 32}),
    "victor-pool1024": dict(variant="victor", model_overrides={"pool_size": 1024}),
    "victor-replace0.5": dict(variant="victor", model_overrides={"replace_ratio": 0.5}),
    "victor-replace0.9": dict(variant="victor", model_overrides={"replace_ratio": 0.9}),
}

# The pre-registered grid (see the docstring): the four arms that answer the question on 8 seeds; Croc and
# VDEP on 5; the pool and replace-ratio sweeps are not in the default grid (--arms runs them)
CORE_ARMS = ("llava", "captions", "victor", "victor-recon0")
GRID_ARMS = (*CORE_ARMS, "vdep", "croc")
CORE_SEEDS, OTHER_SEEDS = [0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4]
# the experiment's lengths: stage 1.5 = one pass over the 4000 detailed captions at batch 8
FULL = dict(train_images=4000, test_images=5000, curve_questions=1000, stage1_steps=200,
            stage15_steps=500, stage2_steps=2000, curve=[500, 1000, 1500], probe_fit=600, probe_test=300)
QUICK = dict(train_images=160, test_images=40, curve_questions=20, stage1_steps=2, stage15_steps=3, stage2_steps=4,
             curve=[2], probe_fit=40, probe_test=20)


def world_spec(lengths: dict, world_opts: dict | None = None):
    """The grid's ShapesSpec: the lengths' image counts, and world_opts' other fields (clutter, seed;
    {} is the world every earlier grid ran on)."""
    from shapes_world import shapes as SH
    return SH.ShapesSpec(num_train_images=lengths["train_images"], num_test_images=lengths["test_images"],
                         **(world_opts or {}))


def world(lengths: dict, world_opts: dict | None = None) -> dict:
    """What every run of a grid shares and a finished run must have been made with: the shapes data, the
    committed base models (their files' sha256) and the demo recipe's stage settings."""
    from engineering import config as CF
    from shapes_world import demo_base as B
    from shapes_world import shapes as SH
    return {"shapes": SH.spec_record(world_spec(lengths, world_opts)), "base_sha256": B.load_base_record()["sha256"],
            "recipe": CF.RECIPES["demo"]}


def run_settings(arm: str | None, lengths: dict, world_opts: dict | None = None) -> dict:
    """A run's settings, recorded in its result: a finished run is reused only when they are equal."""
    keep = ("stage1_steps",) if arm is None else tuple(lengths)
    return {"arm": None if arm is None else ARMS[arm], "lengths": {k: lengths[k] for k in keep},
            "world": world(lengths, world_opts)}


def recorded_settings(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("settings")


# -----------------------------------------------------------------------------
# One run: a stage-1 checkpoint for a seed, or one arm for a seed


def train(**overrides):
    import train as T
    return T.run({"recipe": "demo", **overrides})


def run_stage1(out: str, seed: int, lengths: dict, world_opts: dict) -> dict:
    """The seed's stage-1 checkpoint from the grid's one pretrained base, shared by every arm of the seed."""
    seed_dir = os.path.join(out, "seeds", f"seed-{seed}")
    from shapes_world import demo_base as B
    vision_dir, llm_dir = B.demo_base()
    shapes = os.path.join(out, "shapes")
    shutil.rmtree(os.path.join(seed_dir, "stage1"), ignore_errors=True)
    train(stage="1", out_dir=os.path.join(seed_dir, "stage1"), vision_model=vision_dir, llm=llm_dir, seed=seed,
          data=os.path.join(shapes, "stage1.json"), image_folder=shapes, max_steps=lengths["stage1_steps"])
    with open(os.path.join(seed_dir, "stage1.json"), "w") as f:
        json.dump({"settings": run_settings(None, lengths, world_opts)}, f, indent=1)
    return {"stage1": os.path.join(seed_dir, "stage1")}


def hidden_at_images(model, tokenizer, image_processor, images, batch: int = 100) -> dict[str, np.ndarray]:
    """The LLM's hidden states at the image positions, [images, N, D] per layer, for the stage-1.5
    prompt (image + 'describe it'), with the model as stage 2 and inference use it (causal)."""
    import torch

    import data as D
    from shapes_world import shapes as SH
    template = D.resolve_template("auto", tokenizer, "1.5")
    messages = [{"role": "user", "content": f"{D.IMAGE_PLACEHOLDER}\n{SH.DETAIL_PROMPT}"}]
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


def probe(checkpoint: str, lengths: dict, clutter: int = 0) -> dict:
    """The probe of the model leaving stage 1.5 (for llava: leaving stage 1), per layer: each image
    position's hidden state -> the object of the grid cell its patch lies in (images at the grid's clutter)."""
    from engineering.checkpoints import load_checkpoint
    from shapes_world import shapes as SH
    from shapes_world.demo_base import linear_probe, probe_images, token_cells
    model, tokenizer, image_processor = load_checkpoint(checkpoint)
    fit_images, y_fit = probe_images(lengths["probe_fit"], 0, clutter)
    test_images, y_test = probe_images(lengths["probe_test"], 1, clutter)
    cells = token_cells(model.num_image_tokens, SH.ShapesSpec().grid)
    y_fit, y_test = y_fit[:, cells], y_test[:, cells]  # [images, N]: each token's cell's label
    h_fit = hidden_at_images(model, tokenizer, image_processor, fit_images)
    h_test = hidden_at_images(model, tokenizer, image_processor, test_images)
    classes = 1 + 4 * 3
    out = {}
    for layer in h_fit:
        d = h_fit[layer].shape[-1]
        out[layer] = linear_probe(h_fit[layer].reshape(-1, d), y_fit.reshape(-1), h_test[layer].reshape(-1, d),
                                  y_test.reshape(-1), classes)
    return out


def evaluate(checkpoint: str, out: str, limit: int = 0) -> dict:
    """The shapes test set (its first `limit` questions if given): accuracy, per type, and each
    question's correctness as a string of 0/1 (for paired per-question analyses)."""
    import eval as E
    shapes = os.path.join(out, "shapes")
    r = E.evaluate(checkpoint, os.path.join(shapes, "test.jsonl"), shapes, batch_size=100, limit=limit)
    return {"accuracy": r["accuracy"], "per_type": {k: v["accuracy"] for k, v in r["per_type"].items()},
            "correct": "".join("1" if p["correct"] else "0" for p in r["predictions"])}


def run_arm(out: str, arm: str, seed: int, lengths: dict, world_opts: dict) -> dict:
    """One arm for one seed: stage 1.5 (unless llava) from the seed's stage 1, the probe, stage 2 with
    snapshots, the test set at every snapshot. Returns (and writes) its result."""
    t0 = time.time()
    spec = ARMS[arm]
    run_dir = os.path.join(out, "runs", arm, f"seed-{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a run is redone from scratch, never continued from an earlier one
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
    result = {"arm": arm, "seed": seed, "probe": probe(start, lengths, world_opts.get("clutter", 0))}
    t_stage2 = time.time()
    stage2 = os.path.join(run_dir, "stage2")
    train(stage="2", init=start, out_dir=stage2, data=os.path.join(shapes, "stage2.json"),
          max_steps=lengths["stage2_steps"], snapshot_steps=",".join(map(str, lengths["curve"])), **common)
    # the curve on the first curve_questions of the test set (the same questions at every step)
    n = lengths["curve_questions"]
    curve = {str(step): evaluate(os.path.join(stage2, "snapshots", f"step-{step}"), out, n)["accuracy"]
             for step in lengths["curve"]}
    final = evaluate(stage2, out)
    curve[str(lengths["stage2_steps"])] = final["correct"][:n].count("1") / n
    result.update(accuracy=final["accuracy"], per_type=final["per_type"], correct=final["correct"], curve=curve,
                  settings=run_settings(arm, lengths, world_opts),
                  seconds={"stage1.5": t_probe - t0, "probe": t_stage2 - t_probe,
                           "stage2+eval": time.time() - t_stage2})
    for d in (os.path.join(stage2, "snapshots"), os.path.join(run_dir, "stage1.5", "checkpoints")):
        shutil.rmtree(d, ignore_errors=True)  # the report needs only the numbers
    with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


# -----------------------------------------------------------------------------
# The grid: jobs in parallel processes, one thread each


# what every job imports, imported once by the process the jobs are forked from (~5 s a job otherwise)
JOB_IMPORTS = ["__main__", "torch", "transformers", "data", "victor", "train", "eval", "shapes_world.demo_base",
               "transformers.models.llama.modeling_llama", "transformers.models.clip.modeling_clip"]


def run_job_logged(job: dict, log_path: str):
    """A job's process: its output into its log, then the job."""
    os.chdir(ROOT)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        job_main(job)


def run_jobs(jobs: list[dict], parallel: int, out: str):
    """Each job in its own process, `parallel` at a time, one thread each. The processes are forked from a
    server that imported JOB_IMPORTS once and computed nothing (multiprocessing's forkserver), so they share
    no state with this process or each other."""
    pending, running, failed = list(jobs), [], []
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")  # the server's, so the jobs'
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                      else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(JOB_IMPORTS)
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            name = job["kind"] + ("" if job["kind"] == "stage1" else "-" + job["arm"]) + f"-seed{job['seed']}"
            p = ctx.Process(target=run_job_logged, args=(job, os.path.join(out, "logs", name + ".log")))
            p.start()
            running.append((p, name, time.time()))
            print(f"  started {name}", flush=True)
        time.sleep(0.5)
        for item in list(running):
            p, name, t = item
            if p.exitcode is not None:
                running.remove(item)
                status = "done" if p.exitcode == 0 else f"FAILED (exit {p.exitcode}, see logs/{name}.log)"
                print(f"  {name}: {status} in {time.time() - t:.0f}s", flush=True)
                if p.exitcode:
                    failed.append(name)
    if failed:
        raise SystemExit(f"{len(failed)} runs failed: {failed}")


def job_main(job: dict):
    import torch
    torch.set_num_threads(1)
    if job["kind"] == "stage1":
        run_stage1(job["out"], job["seed"], job["lengths"], job["world_opts"])
    else:
        run_arm(job["out"], job["arm"], job["seed"], job["lengths"], job["world_opts"])


# -----------------------------------------------------------------------------
# The report


def stats(values: list[float]) -> dict:
    v = np.array(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "per_seed": [float(x) for x in v]}


def paired(a: list[float], b: list[float]) -> dict:
    """The per-seed differences a - b, their mean and its 95 % t-interval over seeds (n - 1 degrees of
    freedom); ci95 is [low, high], None with one seed."""
    from scipy import stats as S
    d = np.array(a, dtype=float) - np.array(b, dtype=float)
    out = {"mean": float(d.mean()), "ci95": None, "half_width": None, "per_seed": [float(x) for x in d]}
    if len(d) > 1:
        half = float(S.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
        out.update(ci95=[float(d.mean() - half), float(d.mean() + half)], half_width=half)
    return out


def test_sampling_se(a: str, b: str) -> float:
    """The standard error of one seed's paired difference due to the test questions alone: the
    per-question differences (each 1, 0 or -1) over the same questions, sd / sqrt(n)."""
    d = np.array([int(x) - int(y) for x, y in zip(a, b)], dtype=float)
    return float(d.std(ddof=1) / np.sqrt(len(d)))


def verdict(p: dict) -> str:
    """The pre-registered rule: one arm beats another when the 95 % CI of their paired difference excludes 0."""
    if p["ci95"] is None:
        return "one seed"
    low, high = p["ci95"]
    return "better" if low > 0 else "worse" if high < 0 else "within noise"


def aggregate(out: str, plan: dict[str, list[int]], config: dict) -> dict:
    report = {"arms": {}, "paired": {}, "config": config}
    results = {}
    for arm, seeds in plan.items():
        results[arm] = {}
        for s in seeds:
            with open(os.path.join(out, "runs", arm, f"seed-{s}", "result.json")) as f:
                results[arm][s] = json.load(f)
        rs = list(results[arm].values())
        report["arms"][arm] = {
            "seeds": seeds,
            "settings": rs[0]["settings"],  # the report's labels come from what the runs recorded
            "accuracy": stats([r["accuracy"] for r in rs]),
            "per_type": {k: stats([r["per_type"][k] for r in rs]) for k in rs[0]["per_type"]},
            "curve": {k: stats([r["curve"][k] for r in rs]) for k in rs[0]["curve"]},
            "probe": {layer: {m: stats([r["probe"][layer][m] for r in rs]) for m in rs[0]["probe"][layer]}
                      for layer in rs[0]["probe"]},
        }
    config["run_seconds"] = sum(sum(r["seconds"].values()) for runs in results.values() for r in runs.values())
    # paired differences: each arm minus a reference arm, over the seeds both ran (same stage 1, same questions)
    for ref in ("captions", "llava"):
        if ref not in results:
            continue
        for arm in plan:
            if arm == ref:
                continue
            seeds = [s for s in plan[arm] if s in results[ref]]
            a, b = [results[arm][s] for s in seeds], [results[ref][s] for s in seeds]
            entry = {"seeds": seeds, "overall": paired([r["accuracy"] for r in a], [r["accuracy"] for r in b]),
                     "per_type": {k: paired([r["per_type"][k] for r in a], [r["per_type"][k] for r in b])
                                  for k in a[0]["per_type"]} if seeds else {},
                     "test_sampling_se": [test_sampling_se(x["correct"], y["correct"]) for x, y in zip(a, b)]}
            entry["overall"]["verdict"] = verdict(entry["overall"])
            report["paired"].setdefault(f"vs_{ref}", {})[arm] = entry
    return report


def pm(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def ci(p: dict) -> str:
    if p["ci95"] is None:
        return f"{p['mean']:+.3f}"
    return f"{p['mean']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]"


def describe(settings: dict) -> str:
    """An arm's stage-1.5 settings as the run recorded them."""
    arm = settings["arm"]
    if arm["variant"] == "llava":
        return "no stage 1.5"
    return " ".join([arm["variant"], *(f"{k}={v}" for k, v in arm.get("model_overrides", {}).items())])


def markdown(report: dict) -> str:
    arms = report["arms"]
    first = next(iter(arms.values()))
    types = list(first["per_type"])
    steps = list(first["curve"])
    lengths = first["settings"]["lengths"]
    lines = ["### Shapes test set after stage 2 (mean ± std over seeds)", "",
             "| arm | stage 1.5 | seeds | overall | " + " | ".join(types) + " | per seed |",
             "|---|---|---|---|" + "---|" * len(types) + "---|"]
    for name, a in arms.items():
        lines.append(f"| {name} | {describe(a['settings'])} | {len(a['seeds'])} | {pm(a['accuracy'])} | "
                     + " | ".join(pm(a["per_type"][t]) for t in types)
                     + " | " + ", ".join(f"{x:.3f}" for x in a["accuracy"]["per_seed"]) + " |")
    for ref, table in report["paired"].items():
        lines += ["", f"### Paired differences {ref.replace('_', ' ')}: mean [95 % CI] over the seeds both ran",
                  "", "Same stage 1, same test questions per seed; t-interval over seeds. The rule (pre-registered): "
                  "an arm is better or worse when the CI excludes 0, else within noise.", "",
                  "| arm | seeds | overall | verdict | " + " | ".join(types) + " | test-sampling SE per seed |",
                  "|---|---|---|---|" + "---|" * len(types) + "---|"]
        for name, e in table.items():
            if not e["seeds"]:
                continue
            lines.append(f"| {name} | {len(e['seeds'])} | {ci(e['overall'])} | {e['overall']['verdict']} | "
                         + " | ".join(ci(e["per_type"][t]) for t in types)
                         + " | " + ", ".join(f"{x:.4f}" for x in e["test_sampling_se"]) + " |")
    lines += ["", f"### Learning curve: test accuracy after N stage-2 steps (first {lengths['curve_questions']} "
              "test questions)", "", "| arm | " + " | ".join(steps) + " |", "|---|" + "---|" * len(steps)]
    for name, a in arms.items():
        lines.append(f"| {name} | " + " | ".join(pm(a["curve"][k]) for k in steps) + " |")
    layers = list(first["probe"])
    lines += ["", "### Linear probe right after stage 1.5: the object of a token's grid cell from the hidden state "
              "at its image position", "", "object: colour and shape of the object in an occupied cell (chance "
              "1/12); colour (1/4), shape (1/3).", "",
              "| arm | " + " | ".join(f"{layer} object | {layer} colour | {layer} shape" for layer in layers) + " |",
              "|---|" + "---|" * (3 * len(layers))]
    for name, a in arms.items():
        cells = [pm(a["probe"][layer][m]) for layer in layers for m in ("object", "colour", "shape")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    c = report["config"]
    lines += ["", f"Stage 1: {lengths['stage1_steps']} steps; stage 1.5: {lengths['stage15_steps']} steps; stage 2: "
              f"{lengths['stage2_steps']} steps; {lengths['test_images']} test questions (as the runs recorded "
              f"them). This report's invocation: {c.get('wall_time_s', 0) / 60:.1f} min with {c['jobs']} parallel "
              f"runs, {c.get('reused_runs', 0)} of {sum(len(a['seeds']) for a in arms.values())} runs reused from "
              f"an earlier one; the runs' own time summed: {c.get('run_seconds', 0) / 60:.0f} min."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = report["arms"]
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(18, 4.8))
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
    # the paired differences with their 95 % intervals: what the pre-registered rule reads
    for k, (ref, colour) in enumerate((("captions", "tab:green"), ("llava", "tab:orange"))):
        table = report["paired"].get(f"vs_{ref}", {})
        for i, n in enumerate(names):
            e = table.get(n)
            if not e or not e["seeds"]:
                continue
            p = e["overall"]
            err = None if p["ci95"] is None else [[p["mean"] - p["ci95"][0]], [p["ci95"][1] - p["mean"]]]
            ax3.errorbar(i + (k - 0.5) * 0.3, p["mean"], yerr=err, fmt="o", color=colour, capsize=4,
                         label=f"minus {ref}" if i == next(j for j, m in enumerate(names) if m in table) else None)
    ax3.axhline(0, color="k", lw=0.8)
    ax3.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax3.set_ylabel("paired difference in test accuracy")
    ax3.set_title("paired differences, mean and 95 % CI over seeds")
    ax3.legend(fontsize=8)
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


def grid_plan(arms: list[str] | None, seeds: list[int] | None, quick: bool) -> dict[str, list[int]]:
    """Which seeds each arm runs: the pre-registered grid by default (CORE_ARMS on CORE_SEEDS, the rest
    on OTHER_SEEDS); --seeds gives every chosen arm the same seeds; --quick alone runs seed 0."""
    arms = arms or list(GRID_ARMS if not quick else ARMS)
    if seeds is None and quick:
        seeds = [0]
    return {a: list(seeds) if seeds is not None else (CORE_SEEDS if a in CORE_ARMS else OTHER_SEEDS) for a in arms}


def stale(path: str, wanted: dict) -> str | None:
    """Why a finished run at path cannot be reused (None: it can; '' : there is none)."""
    have = recorded_settings(path)
    if have is None:
        return ""
    if have == wanted:
        return None
    diff = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
    return f"recorded settings differ in {diff}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                    help=f"from {list(ARMS)} (default: the plan's {list(GRID_ARMS)}; every arm with --quick)")
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help=f"the same seeds for every arm (default: the plan, {CORE_SEEDS} for {list(CORE_ARMS)}, "
                         f"{OTHER_SEEDS} for the rest)")
    ap.add_argument("--quick", action="store_true", help="a few steps, seed 0 (unless --seeds), every arm")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    ap.add_argument("--clutter", type=int, default=0, metavar="LEVEL",
                    help="the world's background clutter (shapes_world/shapes.py CLUTTER_LEVELS; 0: the world's own)")
    ap.add_argument("--world-seed", type=int, default=0,
                    help="the shapes data's seed (0: the grid's world; another: a development copy)")
    ap.add_argument("--out-dir", default=None, help="default: out/ablation, or out/ablation-quick with --quick")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.job:
        return job_main(json.loads(args.job))
    unknown = [a for a in args.arms or [] if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    from shapes_world import shapes as SH
    if args.clutter not in SH.CLUTTER_LEVELS:
        ap.error(f"--clutter must be one of {sorted(SH.CLUTTER_LEVELS)}, got {args.clutter}")
    plan = grid_plan(args.arms, args.seeds, args.quick)
    lengths = QUICK if args.quick else FULL
    # only the fields that differ from the world every earlier grid ran on: their records stay reusable
    world_opts = {k: v for k, v in (("clutter", args.clutter), ("seed", args.world_seed)) if v != 0}
    out = os.path.abspath(args.out_dir or ("out/ablation-quick" if args.quick else "out/ablation"))
    t0 = time.time()
    from shapes_world import demo_base as B
    SH.shapes_files(os.path.join(out, "shapes"), world_spec(lengths, world_opts))
    B.load_base_record()  # one base for every run: the committed one, every file as recorded
    seeds = sorted({s for ss in plan.values() for s in ss})
    print(f"ablation: {plan}, stage 1 {lengths['stage1_steps']}, stage 1.5 {lengths['stage15_steps']}, "
          f"stage 2 {lengths['stage2_steps']} steps, world {world_opts or 'the default'} -> {out}", flush=True)
    # a finished run is reused only when it was made with these settings; otherwise it is redone
    todo = {"stage1": [], "arm": []}
    redo_seeds = set()  # seeds whose stage 1 is made anew: every arm of theirs is redone
    for s in seeds:
        why = stale(os.path.join(out, "seeds", f"seed-{s}", "stage1.json"), run_settings(None, lengths, world_opts))
        if why is not None:
            todo["stage1"].append(dict(kind="stage1", seed=s, out=out, lengths=lengths, world_opts=world_opts))
            redo_seeds.add(s)
            if why:
                print(f"  redoing stage 1 of seed {s}: {why}")
    for a, ss in plan.items():
        for s in ss:
            why = stale(os.path.join(out, "runs", a, f"seed-{s}", "result.json"), run_settings(a, lengths, world_opts))
            if why is not None or s in redo_seeds:
                todo["arm"].append(dict(kind="arm", arm=a, seed=s, out=out, lengths=lengths, world_opts=world_opts))
                if why or (why is None and s in redo_seeds):  # a finished run that is not reused
                    print(f"  redoing {a} seed {s}: {why or 'its stage 1 is redone'}")
    # a grid restored from its records (docs/ablation-third-world: results and stage-1 records, no checkpoints):
    # a seed's stage 1 is made again (deterministic, the same settings) where an arm still has to run from it
    for s in sorted({j["seed"] for j in todo["arm"]} - redo_seeds):
        if not os.path.isdir(os.path.join(out, "seeds", f"seed-{s}", "stage1")):
            todo["stage1"].append(dict(kind="stage1", seed=s, out=out, lengths=lengths, world_opts=world_opts))
    # the arms that answer the question first, seed by seed: a grid cut short still has them paired
    todo["arm"].sort(key=lambda j: (j["arm"] not in CORE_ARMS, j["seed"], list(ARMS).index(j["arm"])))
    run_jobs(todo["stage1"], args.jobs, out)
    run_jobs(todo["arm"], args.jobs, out)
    config = {"plan": plan, "jobs": args.jobs, "quick": args.quick, "world_opts": world_opts,
              "wall_time_s": time.time() - t0,
              "reused_runs": sum(len(ss) for ss in plan.values()) - len(todo["arm"]),
              "stage_recipe": "the demo recipe's stages 1.5 and 2 (train.RECIPES['demo']), max_steps as recorded"}
    report = aggregate(out, plan, config)
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
