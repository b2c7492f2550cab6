"""The one-GPU recipe on small published models (siglip-qwen25-0.5b), offline.

What is checked: its plan, from the architecture values recorded in PAPER_MODELS, on the meta device:
Qwen2.5-0.5B's hand count, SigLIP-B/16-224's 196 visual tokens, one process, every stage within a 24 GB GPU
in the plan's worst case; then a random-init model of exactly that architecture, fewer layers (and the
shapes tokenizer's vocabulary: Qwen's tokenizer is not here offline), runs one stage-1.5 step of the
recipe's own settings through train.run on CPU: the code path of the real run.
"""
import math
import os

import pytest
import torch
from transformers import SiglipImageProcessor

import train as T
from conftest import read_metrics
from engineering import config as CF
from engineering import memory_plan as MP
from engineering.checkpoints import load_checkpoint, save_checkpoint
from victor import VictorConfig, VictorModel

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = "siglip-qwen25-0.5b"
VISION, LLM = "google/siglip-base-patch16-224", "Qwen/Qwen2.5-0.5B-Instruct"
QWEN25_05B = 494_032_768  # published parameter count of Qwen2.5-0.5B (embeddings tied to the LM head)


def test_the_recipe_names_the_recorded_models():
    assert CF.RECIPES[RECIPE]["model"]["vision_model"] == VISION and CF.RECIPES[RECIPE]["model"]["llm"] == LLM
    for stage in ("1", "1.5", "2"):
        cfg = T.stage_config(RECIPE, stage, {})
        assert not cfg.fsdp and cfg.global_batch_size % cfg.batch_size == 0  # one GPU: accumulation only



def test_siglip_b_values_are_the_vision_config_defaults():
    """PAPER_MODELS says google/siglip-base-patch16-224's config.json leaves its vision_config at
    SiglipVisionConfig's defaults: the recorded values are those defaults (transformers' own, offline)."""
    from transformers import SiglipVisionConfig
    recorded, defaults = MP.PAPER_MODELS[VISION], SiglipVisionConfig().to_dict()
    assert {k: defaults[k] for k in recorded} == recorded

def test_plan_on_the_meta_device_fits_one_24gb_gpu():
    h, i, layers, vocab, kv = 896, 4864, 24, 151936, 2 * 64  # 2 KV heads of 64, q/k/v biases, tied embeddings
    qwen = vocab * h + layers * (2 * h * h + 2 * h * kv + h + 2 * kv + 3 * h * i + 2 * h) + h
    assert qwen == QWEN25_05B
    for stage in ("1", "1.5", "2"):
        plan = MP.memory_plan(T.stage_config(RECIPE, stage, {}), stage, world=1)
        assert (plan["vision"], plan["llm"], plan["mode"]) == ("siglip_vision_model", "qwen2", "one process")
        assert plan["seqs"][0] == (224 // 16) ** 2  # every SigLIP patch token, no CLS
        assert plan["parts"]["llm"] == (QWEN25_05B, QWEN25_05B if stage != "1" else 0)
        worst = plan["DDP"]["total"][-1]  # every sequence at max_length
        assert worst <= 24 * MP.GIB and MP.fit_problem(plan, 24 * MP.GIB) == "", (stage, worst / MP.GIB)


def reduced_architecture(tokenizer) -> VictorConfig:
    """PAPER_MODELS' values unchanged but for the layer count and the vocabulary (the shapes tokenizer's)."""
    vision = {**MP.PAPER_MODELS[VISION], "num_hidden_layers": 2}
    llm = {**MP.PAPER_MODELS[LLM], "num_hidden_layers": 2, "vocab_size": len(tokenizer),
           "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return VictorConfig(vision_config=vision, llm_config=llm, **CF.RECIPES[RECIPE]["model"]["model_overrides"])


def test_one_stage15_step_of_the_recipe_on_its_architecture(base, shapes_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = VictorModel(reduced_architecture(shapes_tokenizer))
    assert model.num_image_tokens == 196 and model.token_pool.shape == (2048, 896)
    assert type(model.llm).__name__ == "Qwen2ForCausalLM" and model.llm.config.tie_word_embeddings
    assert type(model.vision_tower).__name__ == "SiglipVisionModel"
    llm_config = model.llm.config
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "rms_norm_eps"):  # the recorded values reached the model built
        assert getattr(llm_config, key) == MP.PAPER_MODELS[LLM][key], key
    rope = getattr(llm_config, "rope_parameters", None) or {"rope_theta": llm_config.rope_theta}  # transformers 5
    assert rope["rope_theta"] == MP.PAPER_MODELS[LLM]["rope_theta"]
    init = str(tmp_path / "init")
    save_checkpoint(model, init, shapes_tokenizer, SiglipImageProcessor(size={"height": 224, "width": 224}))
    out = str(tmp_path / "stage1.5")
    # the recipe's stage-1.5 settings (lr, tower and pool rates, chat template, gradient checkpointing), at a
    # CPU's size: one step of 2 records, fp32, no workers, no periodic training states
    T.run(dict(recipe=RECIPE, stage="1.5", init=init, data=base.data["1.5"], image_folder=base.shapes,
               max_steps=1, warmup_steps=1, batch_size=2, global_batch_size=2, max_length=512, bf16=False,
               num_workers=0, save_every=0, resume="", log_every=1, out_dir=out))
    rows, _ = read_metrics(out)
    assert [r["step"] for r in rows] == [1] and math.isfinite(rows[0]["loss"]) and rows[0]["recon_loss"] > 0
    assert rows[0]["lr"] == pytest.approx(CF.RECIPES[RECIPE]["stages"]["1.5"]["lr"])
    trained, _, _ = load_checkpoint(out)
    before = model.state_dict()
    for part in ("llm.", "vision_tower.", "token_pool", "recon_head.", "projector."):  # all that stage 1.5 trains
        assert any(not torch.equal(v, before[k]) for k, v in trained.state_dict().items() if k.startswith(part)), part
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
