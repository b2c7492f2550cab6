"""Checkpoints from elsewhere: victor loads the original LLaVA code's directories (LLaVA-1.5,
Croc, ViCToR's release) and transformers' LlavaForConditionalGeneration (llava-hf), and exports to the
latter. Offline, tiny random models, CPU, seconds.

What is checked: each format, written here with its real key and field names, loads with identical
logits (against the victor model whose weights were written, or against transformers' own Llava);
normalize_visual_tokens follows the source and the load note says why; sharded safetensors and .bin
files with their index; a trained tower, a token pool and ViCToR's head take effect; heads victor lacks
are named and skipped; bad directories fail naming the file and the field; overrides still apply;
train.py --init and eval.py take the directories; export to llava-hf gives identical logits, pixels
and greedy answers, and is refused where it would compute something else.
"""
import copy
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_victor import make_batch, sharpen

import data as D
import eval as E
import train as T
from conftest import tiny_config, tiny_model
from engineering import checkpoints as CK
from engineering import memory_plan as MP
from scripts import export_llava_hf
from victor import IMAGE_TOKEN_ID, VictorModel

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def victor_logits(model, batch):
    ids, mask, _, pixels = batch
    model.eval()
    embeds, _, _ = model.embed_inputs(ids, pixels)
    return model.llm(inputs_embeds=embeds, attention_mask=mask).logits


@torch.no_grad()
def llava_hf_logits(llava, batch, image_id):
    """transformers' own LlavaForConditionalGeneration logits for a victor batch (its image token id in place)."""
    ids, mask, _, pixels = batch
    return llava(input_ids=ids.masked_fill(ids == IMAGE_TOKEN_ID, image_id), attention_mask=mask,
                 pixel_values=pixels).logits


def source_model(seed=6, **overrides):
    """A tiny victor model with sharpened LLM weights, so logits depend on every input."""
    return sharpen(tiny_model(seed=seed, **overrides)).eval()


def save_tower(model, path, image_processor):
    model.vision_tower.save_pretrained(path)
    image_processor.save_pretrained(path)
    return str(path)


# -----------------------------------------------------------------------------
# The original LLaVA code's directory, written from a victor model's weights under LLaVA's names


def llava_state(model, with_tower=False, pool_key=None, extra=None):
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("llm."):
            state[k[len("llm."):]] = v  # model.embed_tokens, model.layers.*, model.norm, lm_head
        elif k.startswith("projector."):
            rest = k[len("projector."):]
            state["model.mm_projector." + (rest[2:] if model.cfg.projector_type == "linear" else rest)] = v
        elif k.startswith("vision_tower.") and with_tower:  # transformers-4 names, as in the released files
            state["model.vision_tower.vision_tower.vision_model." + k[len("vision_tower."):]] = v
    if pool_key:
        state[pool_key] = model.token_pool.detach()
    state.update(extra or {})
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def write_shards(state, path, kind="safetensors", shards=2):
    """Hugging Face's sharded layout: model-0000i-of-0000n.safetensors (or pytorch_model-*.bin) + index."""
    keys = sorted(state)
    per = -(-len(keys) // shards)
    stem, index = (("model", "model.safetensors.index.json") if kind == "safetensors"
                   else ("pytorch_model", "pytorch_model.bin.index.json"))
    ext = "safetensors" if kind == "safetensors" else "bin"
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        (save_file if kind == "safetensors" else torch.save)(part, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, index), "w") as f:
        json.dump({"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                   "weight_map": weight_map}, f)


def write_llava_dir(path, model, tokenizer, tower_dir, model_type="llava_llama", arch="LlavaLlamaForCausalLM",
                    kind="safetensors", shards=2, fields=None, **state_args):
    os.makedirs(path, exist_ok=True)
    conf = model.llm.config.to_dict()
    conf.update(model_type=model_type, architectures=[arch], mm_vision_tower=tower_dir,
                mm_hidden_size=model.vision_tower.config.hidden_size, mm_projector_type=model.cfg.projector_type,
                mm_vision_select_layer=model.cfg.vision_feature_layer,
                mm_vision_select_feature="patch" if model.drop_cls else "cls_patch", image_aspect_ratio="pad",
                mm_use_im_start_end=False, mm_use_im_patch_token=False, mm_patch_merge_type="flat",
                tune_mm_mlp_adapter=False, tokenizer_model_max_length=2048, use_mm_proj=True)
    conf.update(fields or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f)
    write_shards(llava_state(model, **state_args), path, kind, shards)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_llava15_loads_with_identical_logits(tmp_path, shapes_tokenizer, tiny_image_processor, capsys, kind):
    src = source_model(normalize_visual_tokens=False)  # LLaVA-1.5 does not normalise
    tower = save_tower(src, tmp_path / "tower", tiny_image_processor)
    ck = write_llava_dir(tmp_path / "llava", src, shapes_tokenizer, tower, kind=kind, shards=3)
    assert len([f for f in os.listdir(ck) if f.startswith(("model-", "pytorch_model-"))]) == 3
    torch.manual_seed(123)  # another random init underneath: the weights must come from the files
    loaded, tok, proc = CK.load_checkpoint(ck)
    out = capsys.readouterr().out
    assert f"loaded {ck} as LLaVA (llava_llama): normalize_visual_tokens=False because LLaVA-1.5" in out
    assert "skipped" not in out
    assert loaded.cfg.normalize_visual_tokens is False
    assert loaded.cfg.vision_model == tower and loaded.cfg.vision_feature_layer == -2 and loaded.drop_cls
    batch = make_batch(src, seed=1)
    ref, got = victor_logits(src, batch), victor_logits(loaded, batch)
    assert torch.equal(ref, got), (ref - got).abs().max()
    # the comparison has teeth: the same weights with ViCToR's normalisation give other logits
    loaded.cfg.normalize_visual_tokens = True
    assert (victor_logits(loaded, batch) - ref).abs().max() > 1e-2
    assert tok("red circle")["input_ids"] == shapes_tokenizer("red circle")["input_ids"]
    assert proc.crop_size == tiny_image_processor.crop_size  # the image processor is the tower's


def test_llava_model_type_llava_and_linear_projector(tmp_path, shapes_tokenizer, tiny_image_processor, capsys):
    """LLaVA-1.5's own release says model_type "llava" (architectures tell the LLM); a linear projector is a
    bare nn.Linear (model.mm_projector.weight); cls_patch keeps CLIP's CLS token."""
    src = source_model(normalize_visual_tokens=False, projector_type="linear", vision_feature_select="full",
                       vision_feature_layer=-1)
    tower = save_tower(src, tmp_path / "tower", tiny_image_processor)
    ck = write_llava_dir(tmp_path / "llava", src, shapes_tokenizer, tower, model_type="llava", shards=1)
    with open(os.path.join(ck, "model.safetensors.index.json")) as f:
        assert "model.mm_projector.weight" in json.load(f)["weight_map"]
    loaded, _, _ = CK.load_checkpoint(ck)
    assert loaded.cfg.projector_type == "linear" and not loaded.drop_cls and loaded.num_image_tokens == 17
    assert loaded.cfg.vision_feature_layer == -1
    batch = make_batch(src, seed=2)
    assert torch.equal(victor_logits(src, batch), victor_logits(loaded, batch))


def croc_heads(dim, seed=0):
    """Croc's parts victor lacks: its cross-attention and its reconstruction decoder (transform_block)."""
    g = torch.Generator().manual_seed(seed)
    heads = {f"model.cross_attention.{m}.{p}": torch.randn(dim, dim) if p == "weight" else torch.randn(dim)
             for m in ("query", "key", "value", "out") for p in ("weight", "bias")}
    heads.update({"transform_block.position_embeddings.weight": torch.randn(576, dim, generator=g),
                  "transform_block.resize.weight": torch.randn(dim, dim, generator=g),
                  "transform_block.resize.bias": torch.randn(dim, generator=g),
                  "model.layers.0.self_attn.rotary_emb.inv_freq": torch.randn(8)})  # recomputed, never reported
    return heads


def test_croc_release_with_trained_tower_pool_and_skipped_heads(tmp_path, shapes_tokenizer, tiny_image_processor,
                                                                 capsys):
    src = source_model(seed=7)  # Croc normalises
    tower = save_tower(src, tmp_path / "tower", tiny_image_processor)
    with torch.no_grad():  # the tower trained after the base tower was saved: the checkpoint's must win
        for p in src.vision_tower.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        src.token_pool.mul_(0.5)
    ck = write_llava_dir(tmp_path / "croc", src, shapes_tokenizer, tower, model_type="croc_llama",
                         arch="CrocLlamaForCausalLM", kind="bin", with_tower=True, pool_key="model.mask_token",
                         extra=croc_heads(32), fields={"croc_stage": False})
    loaded, _, _ = CK.load_checkpoint(ck)
    out = capsys.readouterr().out
    assert "as Croc (croc_llama): normalize_visual_tokens=True because Croc L2-normalises" in out
    assert ("skipped weights of parts victor does not have: model.cross_attention (8 tensors), "
            "transform_block (3 tensors)") in out
    assert "inv_freq" not in out and "tensors replaced by the checkpoint's (a trained tower)" in out
    assert loaded.cfg.normalize_visual_tokens and loaded.cfg.pool_size == 32
    assert torch.equal(loaded.token_pool, src.token_pool)
    for a, b in zip(loaded.vision_tower.parameters(), src.vision_tower.parameters()):
        assert torch.equal(a, b)
    batch = make_batch(src, seed=3)
    assert torch.equal(victor_logits(src, batch), victor_logits(loaded, batch))
    out1 = src(*batch[:2], labels=batch[2], pixel_values=batch[3], stage="1.5",
               generator=torch.Generator().manual_seed(0))
    out2 = loaded(*batch[:2], labels=batch[2], pixel_values=batch[3], stage="1.5",
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(out1.pool_indices, out2.pool_indices)  # the pool is Croc's: the same rows are matched
    # a trained pool fixes pool_size; other settings of the method still apply
    with pytest.raises(ValueError, match=r"pool_size 64 \(--pool-size\)"):
        CK.load_checkpoint(ck, overrides={"pool_size": 64})
    assert CK.load_checkpoint(ck, overrides={"matcher": "nearest"})[0].cfg.matcher == "nearest"


def test_victor_release_siglip_qwen_pool_and_head(tmp_path, shapes_tokenizer, capsys):
    """ViCToR's release (LLaVA-NeXT code, llava_qwen): Qwen2 LLM, SigLIP tower whose last layer LLaVA-NeXT
    deletes (features: layer -2, every token), model.token_pool, and img_head = victor's recon_head."""
    from transformers import Qwen2Config, SiglipImageProcessor
    tok = shapes_tokenizer
    qwen = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                       tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(8)
    src = sharpen(VictorModel(tiny_config(vision="siglip", llm_config=qwen.to_dict()))).eval()
    assert src.cfg.vision_feature_layer == -2 and not src.drop_cls
    proc = SiglipImageProcessor(size={"height": 32, "width": 32})
    tower = save_tower(src, tmp_path / "siglip", proc)
    with torch.no_grad():
        src.recon_head.weight.mul_(3.0)
    state = llava_state(src, pool_key="model.token_pool",
                        extra={"img_head.weight": src.recon_head.weight, "img_head.bias": src.recon_head.bias,
                               "model.pool_weight.weight": torch.zeros(32, 32),
                               "model.pool_weight.bias": torch.zeros(32)})
    ck = tmp_path / "victor-release"
    ck.mkdir()
    conf = dict(src.llm.config.to_dict(), model_type="llava_qwen", architectures=["LlavaQwenForCausalLM"],
                mm_vision_tower=tower, mm_hidden_size=32, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                mm_pool_size=32, image_aspect_ratio="pad", mm_patch_merge_type="flat")
    (ck / "config.json").write_text(json.dumps(conf))
    save_file(state, str(ck / "model.safetensors"))
    tok.save_pretrained(str(ck))
    loaded, _, proc2 = CK.load_checkpoint(str(ck))
    out = capsys.readouterr().out
    assert "as ViCToR's release (llava_qwen): normalize_visual_tokens=True because the checkpoint carries" in out
    assert "model.pool_weight (2 tensors)" in out and "SigLIP tower" in out
    assert loaded.llm.config.model_type == "qwen2" and loaded.cfg.vision_feature_select == "full"
    assert torch.equal(loaded.recon_head.weight, src.recon_head.weight)
    assert torch.equal(loaded.token_pool, src.token_pool)
    assert type(proc2).__name__.startswith("Siglip")
    batch = make_batch(src, seed=4)
    assert torch.equal(victor_logits(src, batch), victor_logits(loaded, batch))


def test_llava_pool_size_override_without_a_saved_pool(tmp_path, shapes_tokenizer, tiny_image_processor, capsys):
    src = source_model(normalize_visual_tokens=False)
    tower = save_tower(src, tmp_path / "t", tiny_image_processor)
    ck = write_llava_dir(tmp_path / "llava", src, shapes_tokenizer, tower)
    model, _, _ = CK.load_checkpoint(ck, overrides={"pool_size": 64, "normalize_visual_tokens": True})
    assert model.token_pool.shape == (64, 32)  # LLaVA-1.5 has no pool: a fresh one of any size
    assert model.cfg.normalize_visual_tokens
    assert ("normalize_visual_tokens=True because an override says so (the source's own rule gives False"
            in capsys.readouterr().out)
    with pytest.raises(ValueError, match="projector_type='linear'"):
        CK.load_checkpoint(ck, overrides={"projector_type": "linear"})


@pytest.mark.parametrize("change, match", [
    ({"fields": {"image_aspect_ratio": "anyres_max_9"}}, r"config.json: image_aspect_ratio='anyres_max_9'"),
    ({"fields": {"mm_use_im_start_end": True}}, r"mm_use_im_start_end=True.*<im_start>"),
    ({"fields": {"mm_projector_type": "mlp3x_gelu"}}, r"mm_projector_type='mlp3x_gelu'"),
    ({"fields": {"mm_hidden_size": 1024}}, r"mm_hidden_size=1024: the vision tower .* has hidden size 32"),
    ({"fields": {"mm_vision_select_feature": "cls"}}, r"mm_vision_select_feature='cls'"),
    ({"fields": {"mm_patch_merge_type": "spatial_unpad"}}, r"mm_patch_merge_type='spatial_unpad'"),
    ({"fields": {"model_type": "llava_phi", "architectures": ["LlavaPhiForCausalLM"]}}, r"cannot tell the LLM type"),
    ({"extra": {"model.mystery": torch.zeros(3)}, "missing": "model.norm.weight"}, r"model weights are not in"),
])
def test_bad_llava_dirs_are_refused_naming_the_field(tmp_path, shapes_tokenizer, tiny_image_processor, change, match):
    src = tiny_model(normalize_visual_tokens=False)
    tower = save_tower(src, tmp_path / "t", tiny_image_processor)
    missing = change.pop("missing", None)
    ck = write_llava_dir(tmp_path / "bad", src, shapes_tokenizer, tower, **change)
    if missing:  # a shard lacking a tensor of the LLM, and its index not listing it either
        index = os.path.join(ck, "model.safetensors.index.json")
        with open(index) as f:
            meta = json.load(f)
        meta["weight_map"].pop(missing)
        with open(index, "w") as f:
            json.dump(meta, f)
        from safetensors.torch import load_file
        for name in set(meta["weight_map"].values()):
            part = load_file(os.path.join(ck, name))
            save_file({k: v for k, v in part.items() if k != missing}, os.path.join(ck, name))
    with pytest.raises(ValueError, match=match):
        CK.load_checkpoint(ck)


def test_broken_weight_files_are_named(tmp_path, shapes_tokenizer, tiny_image_processor):
    src = tiny_model(normalize_visual_tokens=False)
    tower = save_tower(src, tmp_path / "t", tiny_image_processor)
    ck = write_llava_dir(tmp_path / "a", src, shapes_tokenizer, tower)
    os.remove(os.path.join(ck, "model-00002-of-00002.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"index.json: lists the shard model-00002-of-00002.safetensors"):
        CK.load_checkpoint(ck)
    ck = write_llava_dir(tmp_path / "b", src, shapes_tokenizer, tower, kind="bin", shards=1)
    shard = os.path.join(ck, "pytorch_model-00001-of-00001.bin")
    torch.save({"model.norm.weight": object()}, shard)  # weights_only refuses arbitrary objects
    with pytest.raises(ValueError, match=r"pytorch_model-00001-of-00001.bin: not a readable weights file"):
        CK.load_checkpoint(ck)
    ck = write_llava_dir(tmp_path / "c", src, shapes_tokenizer, tower)
    with open(os.path.join(ck, "model-00001-of-00002.safetensors"), "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(ValueError, match=r"model-00001-of-00002.safetensors: not a readable safetensors file"):
        CK.load_checkpoint(ck)
    ck = tmp_path / "d"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"model_type": "llava_llama", "mm_vision_tower": tower,
                                                  "mm_vision_select_layer": -2}))
    with pytest.raises(FileNotFoundError, match="no weights"):
        CK.load_checkpoint(str(ck))


# -----------------------------------------------------------------------------
# transformers' LlavaForConditionalGeneration (llava-hf): compared with transformers' own forward


def llava_hf_dir(path, tokenizer, image_processor, strategy="default", layer=-2, seed=0):
    """A tiny LlavaForConditionalGeneration saved with save_pretrained: CLIP tower, Llama LLM, <image> token."""
    from transformers import AddedToken, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)])
    image_id = tok.convert_tokens_to_ids("<image>")
    vconf = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8)
    lconf = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vconf, text_config=lconf,
                                                      image_token_index=image_id,
                                                      vision_feature_layer=layer,
                                                      vision_feature_select_strategy=strategy)).eval()
    with torch.no_grad():  # sharper than the default init, so the logits depend on the image
        for p in llava.model.language_model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    llava.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    image_processor.save_pretrained(str(path))
    return str(path), llava, image_id


@pytest.mark.parametrize("strategy, layer", [("default", -2), ("full", -1)])
def test_llava_hf_loads_with_transformers_logits(tmp_path, shapes_tokenizer, tiny_image_processor, capsys,
                                                 strategy, layer):
    ck, llava, image_id = llava_hf_dir(tmp_path / "hf", shapes_tokenizer, tiny_image_processor, strategy, layer)
    loaded, tok, _ = CK.load_checkpoint(ck)
    out = capsys.readouterr().out
    assert "as transformers' LlavaForConditionalGeneration (llava-hf): normalize_visual_tokens=False" in out
    assert "centre-crops" in out  # the directory's CLIP processor does not pad: said
    assert loaded.drop_cls == (strategy == "default") and loaded.cfg.vision_feature_layer == layer
    batch = make_batch(loaded, seed=5)
    ids, mask, _, pixels = batch
    ref = llava_hf_logits(llava, batch, image_id)
    got = victor_logits(loaded, batch)
    print(f"llava-hf ({strategy}, layer {layer}): max |logit difference| {(got - ref).abs().max().item():.3g}")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert (victor_logits(loaded, (ids, mask, None, pixels.flip(0))) - ref).abs().max() > 1e-2  # has teeth
    assert tok.convert_tokens_to_ids("<image>") == image_id


def test_llava_hf_refusals(tmp_path, shapes_tokenizer, tiny_image_processor):
    ck, _, _ = llava_hf_dir(tmp_path / "hf", shapes_tokenizer, tiny_image_processor)
    conf_file = os.path.join(ck, "config.json")
    with open(conf_file) as f:
        good = json.load(f)
    for key, value, match in [("projector_hidden_act", "relu", "projector_hidden_act='relu'"),
                              ("vision_feature_layer", [-2, -5], r"vision_feature_layer=\[-2, -5\]"),
                              ("vision_feature_select_strategy", "cls", r"(?s)config.json: not a valid LlavaConfig.*"
                                                                         r"vision_feature_select_strategy")]:
        with open(conf_file, "w") as f:
            json.dump({**good, key: value}, f)
        with pytest.raises(ValueError, match=match):
            CK.load_checkpoint(ck)


# -----------------------------------------------------------------------------
# train.py --init and eval.py take these directories


def test_train_init_and_eval_take_a_llava_dir(base, tmp_path, shapes_tokenizer, tiny_image_processor, capsys):
    src = source_model(normalize_visual_tokens=False)
    tower = save_tower(src, tmp_path / "t", tiny_image_processor)
    ck = write_llava_dir(tmp_path / "llava", src, shapes_tokenizer, tower)
    cfg = T.TrainConfig(stage="2", data=base.data["2"], image_folder=base.shapes, init=ck,
                        model_overrides={"pool_size": 32}, lr=1e-3, vision_lr=0.0, warmup_steps=1, max_steps=2,
                        global_batch_size=4, batch_size=4, num_workers=0, log_every=1, max_length=256, bf16=False,
                        out_dir=str(tmp_path / "stage2"))
    out = T.train_stage(cfg, "2")
    trained, _, _ = CK.load_checkpoint(out)  # victor's own format now; the setting travels with it
    assert trained.cfg.normalize_visual_tokens is False and trained.cfg.vision_model == tower
    assert not torch.equal(trained.llm.lm_head.weight, src.llm.lm_head.weight)  # it trained
    Image.new("RGB", (32, 32), (215, 40, 40)).save(tmp_path / "r.png")
    bench = tmp_path / "yn.jsonl"
    rows = [{"index": i, "question": "Is it red?", "answer": a, "image_path": "r.png"}
            for i, a in enumerate(["yes", "no"])]
    bench.write_text("".join(json.dumps(row) + "\n" for row in rows))
    res = E.main([ck, "--bench", str(bench), "--out", str(tmp_path / "res.json"), "--batch-size", "2"])
    assert res["num_questions"] == 2 and "loaded" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Export: victor -> LlavaForConditionalGeneration, loaded back with from_pretrained


def test_export_llava_hf_identical_logits_pixels_and_answers(tmp_path, shapes_tokenizer, tiny_image_processor):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model = source_model(seed=9, normalize_visual_tokens=False)
    out = CK.export_llava_hf(model, shapes_tokenizer, tiny_image_processor, str(tmp_path / "hf"))
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    image_id = llava.config.image_token_id
    assert image_id == len(shapes_tokenizer)  # the added <image> token, with one new (zero) row
    assert llava.config.vision_feature_select_strategy == "default" and llava.config.vision_feature_layer == -2
    batch = make_batch(model, seed=6)
    ids, mask, _, pixels = batch
    ref = llava_hf_logits(llava, batch, image_id)
    got = victor_logits(model, batch)
    vocab = got.shape[-1]
    print(f"export: max |logit difference| {(got - ref[..., :vocab]).abs().max().item():.3g}")
    torch.testing.assert_close(ref[..., :vocab], got, rtol=0, atol=1e-5)
    assert ref.shape[-1] == vocab + 1 and torch.all(ref[..., vocab] == 0)
    assert llava.generation_config.suppress_tokens == [image_id]
    # the processor pads a non-square image to a square with the mean colour, as victor does
    image = Image.new("RGB", (48, 24), (40, 165, 60))
    image.paste((215, 40, 40), (4, 4, 20, 20))
    enc = processor(text="<image>\nWhat colour?", images=image, return_tensors="pt")
    assert torch.equal(enc["pixel_values"], D.preprocess_images([image], tiny_image_processor))
    assert int((enc["input_ids"] == image_id).sum()) == model.num_image_tokens
    # the chat template takes the standard multimodal message form (content as a list) and the plain one alike
    question = "How many objects are there ?"
    listed = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                            "text": question}]}],
                                           add_generation_prompt=True)
    plain = processor.apply_chat_template([{"role": "user", "content": f"<image>\n{question}"}],
                                          add_generation_prompt=True)
    assert listed == plain == shapes_tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{question}"}], tokenize=False, add_generation_prompt=True)
    # greedy answers: transformers' generate on the exported model = victor's generate
    prompt = shapes_tokenizer("what colour is it ?")["input_ids"]
    v_ids = torch.tensor([prompt[:2] + [IMAGE_TOKEN_ID] * model.num_image_tokens + prompt[2:]])
    h_ids = v_ids.masked_fill(v_ids == IMAGE_TOKEN_ID, image_id)
    pv = enc["pixel_values"]
    mine = model.generate(v_ids, torch.ones_like(v_ids), pv, max_new_tokens=6,
                          eos_token_id=shapes_tokenizer.eos_token_id, pad_token_id=shapes_tokenizer.pad_token_id)
    theirs = llava.generate(input_ids=h_ids, attention_mask=torch.ones_like(h_ids), pixel_values=pv, max_new_tokens=6,
                            do_sample=False, eos_token_id=shapes_tokenizer.eos_token_id,
                            pad_token_id=shapes_tokenizer.pad_token_id)[:, h_ids.shape[1]:]
    assert mine.tolist() == theirs.tolist()
    # and back: the exported directory loads into victor with the same logits
    back, _, _ = CK.load_checkpoint(out)
    torch.testing.assert_close(victor_logits(back, batch)[..., :vocab], got, rtol=0, atol=1e-5)


def test_export_siglip_keeps_every_token_and_resizes_without_crop(tmp_path, shapes_tokenizer):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, SiglipImageProcessor
    torch.manual_seed(10)
    model = sharpen(VictorModel(tiny_config(vision="siglip", normalize_visual_tokens=False))).eval()
    proc = SiglipImageProcessor(size={"height": 32, "width": 32})
    out = CK.export_llava_hf(model, shapes_tokenizer, proc, str(tmp_path / "hf"))
    llava, processor = LlavaForConditionalGeneration.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)
    assert llava.config.vision_feature_select_strategy == "full"  # SigLIP has no CLS token to drop
    batch = make_batch(model, seed=7)
    ids, mask, _, pixels = batch
    with torch.no_grad():
        ref = llava(input_ids=ids.masked_fill(ids == IMAGE_TOKEN_ID, llava.config.image_token_id),
                    attention_mask=mask, pixel_values=pixels).logits
    got = victor_logits(model, batch)
    torch.testing.assert_close(ref[..., :got.shape[-1]], got, rtol=0, atol=1e-5)
    image = Image.new("RGB", (24, 48), (45, 85, 225))
    enc = processor(text="<image>\nWhat colour?", images=image, return_tensors="pt")
    assert torch.equal(enc["pixel_values"], D.preprocess_images([image], proc))
    assert int((enc["input_ids"] == llava.config.image_token_id).sum()) == model.num_image_tokens == 16


def test_export_from_the_command_line_and_refusals(tmp_path, shapes_tokenizer, tiny_image_processor, capsys):
    model = source_model(normalize_visual_tokens=False)
    CK.save_checkpoint(model, str(tmp_path / "ck"), shapes_tokenizer, tiny_image_processor)
    export_llava_hf.main([str(tmp_path / "ck"), str(tmp_path / "hf")])
    assert "wrote a LlavaForConditionalGeneration directory" in capsys.readouterr().out
    assert json.load(open(tmp_path / "hf" / "config.json"))["architectures"] == ["LlavaForConditionalGeneration"]
    CK.save_checkpoint(tiny_model(), str(tmp_path / "normalised"), shapes_tokenizer, tiny_image_processor)
    with pytest.raises(SystemExit, match="L2-normalises its visual tokens"):
        export_llava_hf.main([str(tmp_path / "normalised"), str(tmp_path / "x")])
    assert not os.path.exists(tmp_path / "x")
    for overrides, match in [({"vision_feature_downsample": 2}, "vision_feature_downsample=2"),
                             ({"projector_type": "linear"}, "projector_type='linear'")]:
        with pytest.raises(ValueError, match=match):
            CK.export_llava_hf(tiny_model(normalize_visual_tokens=False, **overrides), shapes_tokenizer,
                                   tiny_image_processor, str(tmp_path / "y"))


def test_memory_plan_reads_a_llava_and_a_llava_hf_dir(tmp_path, shapes_tokenizer, tiny_image_processor):
    """--plan (and the fit check of a CUDA run) describe the model a foreign --init builds."""
    import train as T
    src = source_model(normalize_visual_tokens=False)
    tower = save_tower(src, tmp_path / "tower", tiny_image_processor)
    ck = write_llava_dir(tmp_path / "llava", src, shapes_tokenizer, tower)
    hf, llava, _ = llava_hf_dir(tmp_path / "hf", shapes_tokenizer, tiny_image_processor)
    for init, expect in ((ck, src), (hf, llava)):
        cfg = T.TrainConfig(recipe="demo", init=init)
        planned = MP.planned_model_settings(cfg, offline=True)
        text = expect.llm.config if init == ck else llava.config.text_config
        assert planned.llm_config["hidden_size"] == text.hidden_size
        assert planned.llm_config["num_hidden_layers"] == text.num_hidden_layers
        plan = MP.memory_plan(cfg, "2", world=2)
        loaded, _, _ = CK.load_checkpoint(init)
        assert plan["parts"]["llm"][0] == sum(p.numel() for p in loaded.llm.parameters())
