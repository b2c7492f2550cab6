"""bf16 on a CPU: the dtypes a GPU run computes in, on tiny models. Stage 1.5 (replacement, Hungarian and
nearest matching, reconstruction, Croc's mixed mask) and stage 2 against float32 on the same batch, in one
process and in 2 processes under FSDP; train.py --bf16 end to end; generate and eval.py in bf16.

Tolerances: a loss within 1 % of float32's (measured: under 3e-4 relative); the pool's gradient within
cosine 0.99 of float32's (measured: 0.9998); matching as float32 wherever a token's two nearest rows are
further apart than bf16 can move them (2 x the largest change bf16 made to a token plus to a pool row).
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from bf16_probe import CASES, compare, make_batch
from safetensors.torch import load_file

import eval as E
import forked
import train as T
from conftest import cli_flags, read_metrics, tiny_model
from engineering import distributed as DI

pytestmark = pytest.mark.usefixtures("one_thread")
LOSS_RTOL = 0.01


def untied(run32: dict, run16: dict) -> torch.Tensor:
    """bool [images, R]: the selected tokens whose nearest pool row bf16 cannot change. bf16 moves a token's
    distance to a row by at most |token change| + |row change|; a token whose two nearest rows (float32) are
    further apart than twice that keeps its nearest row, and with the planted pool (each token's own copy)
    its Hungarian row too."""
    moved = (run32["tokens"] - run16["tokens"]).norm(dim=-1) + (run32["pool"] - run16["pool"]).norm(dim=-1).max()
    two = torch.cdist(run32["tokens"], run32["pool"]).topk(2, largest=False).values
    return two[..., 1] - two[..., 0] > 2 * moved


def check_case(case: str, runs: dict):
    a, b = runs["fp32"], runs["bf16"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in (a, b)), case
    assert abs(b["loss"] - a["loss"]) <= LOSS_RTOL * abs(a["loss"]), (case, a["loss"], b["loss"])
    assert (a["recon_loss"] is None) == (b["recon_loss"] is None), case
    if case.endswith("1.5"):
        assert b["pool_grad"] is not None and torch.isfinite(b["pool_grad"]).all(), case
        assert b["pool_grad"].abs().sum() > 0, f"{case}: the pool got no gradient in bf16"
        assert F.cosine_similarity(a["pool_grad"].flatten(), b["pool_grad"].flatten(), dim=0) > 0.99, case
        keep = untied(a, b)
        assert keep.float().mean() >= 0.5, f"{case}: too few untied tokens for the check to say anything"
        assert torch.equal(a["chosen"][keep], b["chosen"][keep]), f"{case}: bf16 matched other rows"
    else:
        assert "chosen" not in b  # stage 2 matches nothing


@pytest.mark.parametrize("case", [f"{v} {s}" for v, s in CASES])
def test_bf16_one_process(case):
    check_case(case, compare(*case.split(), batch_seed=0))


def test_bf16_fsdp_two_processes(tmp_path):
    """distributed.shard_with_fsdp's bf16 policy (bf16 parameters, fp32 reduce-scatter) runs on gloo: each rank's
    loss, the whole pool gradient and matching against the same model sharded in float32."""
    proc = forked.run(["tests/bf16_probe.py", str(tmp_path)], procs=2, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank-{rank}.pt", weights_only=True)
        assert set(results) == {f"{v} {s}" for v, s in CASES}
        for case, runs in results.items():
            check_case(case, runs)
            if case.endswith("1.5"):  # FSDP's bf16 parameters: matching saw the pool rounded to bf16
                assert not torch.equal(runs["fp32"]["pool"], runs["bf16"]["pool"])
                assert torch.equal(runs["bf16"]["pool"], runs["fp32"]["pool"].bfloat16().float())


# -----------------------------------------------------------------------------
# train.py --bf16 end to end


def train_values(base, out_dir, stage, **overrides):
    values = dict(recipe="demo", stage=stage, data=base.data[stage], image_folder=base.shapes, init=base.init,
                  lr=1e-3, vision_lr=1e-4, pool_lr=1e-2, max_steps=2, warmup_steps=1, global_batch_size=4,
                  batch_size=2, num_workers=0, log_every=1, max_length=256, seed=0, out_dir=str(out_dir))
    return {**values, **overrides}


def train(values, procs):
    proc = forked.run(["train.py", *cli_flags(values)], procs=procs, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout


@pytest.fixture(scope="module")
def train_runs(base, tmp_path_factory):
    """train.py runs made once for the module: run(stage, procs, bf16) -> (out_dir, stdout); bf16 None leaves
    the flag out. The 1-process stage-1.5 --no-bf16 run serves both the bf16 comparison and the CPU default.
    Runs asked for together are independent processes and run at the same time (each is single-threaded,
    and a run alone leaves a core idle much of the time)."""
    made = {}

    def start(key):
        stage, procs, bf16 = key
        out = tmp_path_factory.mktemp(f"bf16-run-{stage}-{procs}-{bf16}")
        extra = dict(fsdp=True, gradient_checkpointing=True) if procs == 2 else {}
        flags = {} if bf16 is None else dict(bf16=bf16)
        return out, pool.submit(train, train_values(base, out, stage, **flags, **extra), procs)

    def run(*keys):
        started = {key: start(key) for key in dict.fromkeys(keys) if key not in made}
        for key, (out, stdout) in started.items():
            made[key] = (out, stdout.result())
        return [made[key] for key in keys]

    with ThreadPoolExecutor(3) as pool:
        yield run


@pytest.mark.parametrize("stage,procs", [("1.5", 1), ("1.5", 2), ("2", 2)])
def test_train_bf16_against_float32(base, train_runs, stage, procs):
    """--bf16 on a CPU trains in bf16 (1 process: autocast; 2: FSDP with gradient checkpointing, the paper
    recipes' setting); its first step's loss is float32's within LOSS_RTOL, and stage 1.5 moves the pool."""
    keys = [(stage, procs, False), (stage, procs, True)]
    if procs == 1:  # test_cpu_default_stays_float32's other run: made alongside these
        keys.append((stage, procs, None))
    made = train_runs(*keys)
    runs, outs = {}, {}
    for (name, bf16), (out_dir, out) in zip((("fp32", False), ("bf16", True)), made):
        outs[name] = out_dir
        assert ("note: --bf16 on a CPU" in out) == bf16
        runs[name] = read_metrics(out_dir)[0]
    a, b = runs["fp32"][0], runs["bf16"][0]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in runs["bf16"])
    assert a["loss"] != b["loss"], "bitwise float32's loss: bf16 did not take effect"
    assert abs(b["loss"] - a["loss"]) <= LOSS_RTOL * a["loss"], (a["loss"], b["loss"])
    if stage == "1.5":
        init, trained = load_file(os.path.join(base.init, "model.safetensors")), load_file(
            str(outs["bf16"] / "model.safetensors"))
        assert trained["token_pool"].dtype == torch.float32  # the master weights stay float32
        assert not torch.equal(init["token_pool"], trained["token_pool"]), "the pool got no gradient"


def test_cpu_default_stays_float32(train_runs):
    """Without --bf16 a CPU run computes in float32: bitwise the run that says --no-bf16."""
    made = train_runs(("1.5", 1, None), ("1.5", 1, False))
    runs = {name: read_metrics(out_dir)[0] for name, (out_dir, _) in zip(("default", "no-bf16"), made)}
    assert [r["loss"] for r in runs["default"]] == [r["loss"] for r in runs["no-bf16"]]
    assert DI.computes_in_bf16(T.TrainConfig(), torch.device("cpu")) is False
    assert DI.computes_in_bf16(T.TrainConfig(), torch.device("cuda")) is True
    assert DI.computes_in_bf16(T.TrainConfig(bf16=False), torch.device("cuda")) is False
    assert DI.computes_in_bf16(T.TrainConfig(bf16=True), torch.device("cpu")) is True


# -----------------------------------------------------------------------------
# Inference in bf16


@pytest.mark.parametrize("how", ["autocast", "weights"])
def test_generate_bf16(how):
    """generate with bf16 weights (eval.py --bf16) or under autocast: the first new token is float32's
    wherever float32's two best logits are further apart than bf16 moves the logits."""
    model = tiny_model(seed=0).eval()
    ids, mask, _, pixels = make_batch(0)
    prompt, prompt_mask = ids[:, :19], mask[:, :19]
    with torch.no_grad():
        embeds = model.embed_inputs(prompt, pixels)[0]
        logits32 = model.llm(inputs_embeds=embeds, attention_mask=prompt_mask).logits[:, -1].float()
    new32 = model.generate(prompt, prompt_mask, pixels, max_new_tokens=4, pad_token_id=0)
    if how == "weights":
        model = model.to(torch.bfloat16)
        new16 = model.generate(prompt, prompt_mask, pixels, max_new_tokens=4, pad_token_id=0)
        with torch.no_grad():
            logits16 = model.llm(inputs_embeds=model.embed_inputs(prompt, pixels)[0],
                                 attention_mask=prompt_mask).logits[:, -1].float()
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            new16 = model.generate(prompt, prompt_mask, pixels, max_new_tokens=4, pad_token_id=0)
            logits16 = model.llm(inputs_embeds=model.embed_inputs(prompt, pixels)[0],
                                 attention_mask=prompt_mask).logits[:, -1].float()
    assert new16.shape == new32.shape and torch.isfinite(logits16).all()
    two = logits32.topk(2).values
    clear = two[:, 0] - two[:, 1] > 2 * (logits16 - logits32).abs().max(dim=1).values
    assert torch.equal(new16[clear, 0], new32[clear, 0])
    assert (logits16 - logits32).abs().max() < 0.1


def test_eval_bf16(base, tmp_path, capsys):
    """eval.py --bf16: the shapes test set with the model in bfloat16 (its weights), answered and scored as in
    float32; --visualize --bf16 draws its picture; a mode without a model refuses --bf16 (no effect there)."""
    test_file = os.path.join(base.shapes, "test.jsonl")
    seen = []
    load = E.load_model

    def recording(checkpoint, device, dtype=None):
        model, tok, proc = load(checkpoint, device, dtype)
        seen.append({p.dtype for p in model.parameters()})
        return model, tok, proc
    E.load_model = recording
    try:
        results = {}
        for name, flags in (("fp32", []), ("bf16", ["--bf16"])):
            out = str(tmp_path / f"{name}.json")
            E.main([base.init, "--test-file", test_file, "--image-folder", base.shapes, "--limit", "8",
                    "--batch-size", "4", "--out", out, *flags])
            with open(out) as f:
                results[name] = json.load(f)
        png = tmp_path / "pool.png"
        image = os.path.join(base.shapes, "images", sorted(os.listdir(os.path.join(base.shapes, "images")))[0])
        E.main([base.init, "--visualize", image, "--out-png", str(png), "--bf16"])
    finally:
        E.load_model = load
    assert seen == [{torch.float32}, {torch.bfloat16}, {torch.bfloat16}]
    assert results["bf16"]["num_questions"] == results["fp32"]["num_questions"] == 8
    assert png.stat().st_size > 0
    with pytest.raises(SystemExit):
        E.main([base.init, "--image", image, "--ask", "what ?", "--bf16"])
    assert "--bf16: no effect with --ask" in capsys.readouterr().err
