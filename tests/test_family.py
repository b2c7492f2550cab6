"""Tests of "the family as switches": ViCToR's relatives as settings of VictorConfig's stage-1.5 fields.

Croc (matcher="nearest", stage15_attention="mixed"), VDEP (replace_ratio=0, recon_target_offset=1,
recon_image_ratio), the captions control (replace_ratio=0, recon_weight=0), overrides on top of an
--init checkpoint, and train.py's --variant presets and knob checks. Tiny random models only.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_victor import make_batch, reference_visual_tokens, sharpen, smooth_l1_by_hand, stage15

import train as T
import victor as V
from conftest import save_base_models, tiny_config, tiny_model
from engineering import checkpoints as CK
from engineering import config as CF
from victor import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    VictorConfig,
    VictorModel,
    hungarian_match,
    images_to_reconstruct,
    match_tokens_to_pool,
    mixed_attention_mask,
    nearest_match,
)

N_TOK = 16  # tiny model: 32 px, patch 8, CLS dropped
R = N_TOK - N_TOK // 4  # replaced per image at replace_ratio 0.75


pytestmark = pytest.mark.usefixtures("one_thread")


def preset(variant, **extra):
    """A tiny model configured by one of train.py's --variant presets."""
    return tiny_model(**{**V.VARIANTS[variant], **extra})


class CaptureHidden:
    """Forward hook on the LLM decoder: records its last_hidden_state and the attention mask it got."""

    def __init__(self, model):
        self.hidden, self.masks = [], []
        dec = model.llm.get_decoder()
        self.handles = [dec.register_forward_hook(lambda m, a, o: self.hidden.append(o.last_hidden_state.detach())),
                        dec.register_forward_pre_hook(lambda m, a, kw: self.masks.append(kw.get("attention_mask")),
                                                      with_kwargs=True)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# -----------------------------------------------------------------------------
# 1. Croc's nearest-row matching


def test_nearest_match_is_brute_force_argmin():
    g = torch.Generator().manual_seed(0)
    tokens, pool = torch.randn(3, 7, 5, generator=g), torch.randn(11, 5, generator=g)
    idx = nearest_match(tokens, pool)
    assert idx.shape == (3, 7) and idx.dtype == torch.long
    for b in range(3):
        for i in range(7):
            dists = [float(((tokens[b, i].double() - pool[j].double()) ** 2).sum()) for j in range(11)]
            assert idx[b, i].item() == int(np.argmin(dists))
    assert torch.equal(match_tokens_to_pool(tokens, pool, "nearest"), idx)


def test_nearest_match_repeats_a_shared_row_where_hungarian_does_not():
    tokens = torch.tensor([[[0.1, 0.0], [0.0, 0.1]]])
    pool = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    assert nearest_match(tokens, pool).tolist() == [[0, 0]]
    assert sorted(hungarian_match(tokens, pool)[0].tolist()) == [0, 1]
    assert sorted(match_tokens_to_pool(tokens, pool, "hungarian")[0].tolist()) == [0, 1]
    assert sorted(match_tokens_to_pool(tokens, pool, "hungarian_plain")[0].tolist()) == [0, 1]


def test_nearest_matcher_allows_a_pool_smaller_than_the_replaced_count():
    model = tiny_model(matcher="nearest", pool_size=4)  # 12 tokens replaced per image, 4 rows
    assert model.token_pool.shape == (4, 32)
    batch = make_batch(model)
    out, embeds = stage15(model, batch)
    assert out.pool_indices.shape == (2, R) and out.pool_indices.max() < 4
    assert all(len(set(row.tolist())) < R for row in out.pool_indices)  # rows repeat
    # each replaced token got its nearest row, and that row is what the LLM received
    v = reference_visual_tokens(model, batch[3]).detach()
    assert torch.equal(out.pool_indices, nearest_match(v[out.replaced_mask].view(2, R, -1), model.token_pool))
    img = embeds[batch[0] == IMAGE_TOKEN_ID].view(2, N_TOK, -1)
    assert torch.equal(img[out.replaced_mask], model.token_pool[out.pool_indices.flatten()])
    with pytest.raises(ValueError, match="pool_size=4"):
        tiny_model(matcher="hungarian", pool_size=4)
    with pytest.raises(ValueError, match="pool_size=4"):
        tiny_model(matcher="hungarian_plain", pool_size=4)


# -----------------------------------------------------------------------------
# 2. Croc's mixed attention mask


def hand_batch():
    """4 samples, seq 7: right padding with labels from 3 / from 1, no labels at all, left padding."""
    X = IGNORE_INDEX
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 0],
                              [1, 1, 1, 1, 0, 0, 0],
                              [1, 1, 1, 0, 0, 0, 0],
                              [0, 0, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[X, X, X, 5, 6, 7, X],
                           [X, 8, 9, 4, X, X, X],
                           [X, X, X, X, X, X, X],
                           [X, X, X, X, 5, 4, X]])
    first = [3, 1, 7, 4]  # first supervised position (7: none)
    return attention, labels, first


def test_mixed_mask_by_hand():
    attention, labels, first = hand_batch()
    got = mixed_attention_mask(attention, labels)
    assert got.shape == (4, 1, 7, 7) and got.dtype == torch.bool
    for b in range(4):
        for q in range(7):
            for k in range(7):
                if q == k:
                    want = True  # every row attends itself (a padded query too: no empty softmax row)
                elif not attention[b, k]:
                    want = False  # a pad key is never attended
                elif q < first[b] and k < first[b]:
                    want = True  # the prefix: both directions
                else:
                    want = k < q  # from the first label on: causal
                assert got[b, 0, q, k].item() == want, (b, q, k)


def test_mixed_mask_properties():
    attention, labels, first = hand_batch()
    m = mixed_attention_mask(attention, labels)[:, 0]
    for b in range(4):
        real = attention[b].bool()
        # no non-pad query attends a pad key
        assert not m[b][real][:, ~real].any()
        # prefix positions see each other in both directions, later ones see nothing after themselves
        p = first[b]
        pre = torch.arange(7) < p
        assert m[b][pre & real][:, pre & real].all()
        for q in range(p, 7):
            assert not m[b, q, q + 1:].any()
    # the sample without labels: fully bidirectional among its non-pad positions
    assert m[2, :3, :3].all() and not m[2, :3, 3:].any()
    # the answer never leaks backwards: no prefix query sees a supervised position
    assert not m[0, :3, 3:].any() and not m[1, :1, 1:].any()


def test_mixed_mask_additive_form():
    attention, labels, _ = hand_batch()
    allowed = mixed_attention_mask(attention, labels)
    for dtype in (torch.float32, torch.bfloat16):
        add = mixed_attention_mask(attention, labels, dtype)
        assert add.dtype == dtype and add.shape == allowed.shape
        assert (add[allowed] == 0).all()
        assert (add[~allowed] == torch.finfo(dtype).min).all()


# -----------------------------------------------------------------------------
# 3. What the mixed mask does inside the LLM


AFTER_IMAGE = 1 + 2 + N_TOK  # make_batch's sample 0: [im_start] 2 tokens <image>x16, then the prompt's rest
FIRST_LABEL = AFTER_IMAGE + 3


def changed(batch, pos, sample=0):
    ids = batch[0].clone()
    ids[sample, pos] = 5 if ids[sample, pos] != 5 else 6
    return (ids, *batch[1:])


def token_errors(model, batch, stage="1.5"):
    ids, mask, labels, pixels = batch
    with torch.no_grad(), CaptureHidden(model) as cap:
        out = model(ids, mask, labels=labels, pixel_values=pixels, stage=stage,
                    generator=torch.Generator().manual_seed(7))
    out.token_errors = None if out.recon_target is None else F.smooth_l1_loss(  # step 6's loss token by token
        out.recon_predicted, out.recon_target, beta=model.cfg.recon_beta, reduction="none").mean(-1)
    return out, cap.hidden[0], cap.masks[0]


@pytest.mark.parametrize("variant", ["croc", "victor"])
def test_prompt_after_the_image_reaches_image_positions_only_with_mixed_attention(variant):
    model = sharpen(preset(variant))
    batch = make_batch(model)
    assert batch[2][0, FIRST_LABEL - 1] == IGNORE_INDEX and batch[2][0, FIRST_LABEL] != IGNORE_INDEX
    out1, h1, mask = token_errors(model, batch)
    out2, h2, _ = token_errors(model, changed(batch, AFTER_IMAGE))
    assert torch.equal(out1.replaced_mask, out2.replaced_mask) and torch.equal(out1.pool_indices, out2.pool_indices)
    assert out1.token_errors.shape == (2, N_TOK)
    image = slice(3, AFTER_IMAGE)
    if variant == "croc":
        assert mask.dim() == 4  # the decoder got Croc's 4-D mask
        assert not torch.allclose(h1[0, image], h2[0, image], atol=1e-4)
        assert not torch.allclose(out1.token_errors[0], out2.token_errors[0], atol=1e-6)
    else:
        assert mask.dim() == 2
        torch.testing.assert_close(h1[0, :AFTER_IMAGE], h2[0, :AFTER_IMAGE], rtol=0, atol=1e-6)
        torch.testing.assert_close(out1.token_errors[0], out2.token_errors[0], rtol=0, atol=1e-6)
    # the other sample of the batch is untouched either way
    torch.testing.assert_close(out1.token_errors[1], out2.token_errors[1], rtol=0, atol=1e-6)


def test_mixed_attention_does_not_leak_the_answer_backwards():
    model = sharpen(preset("croc"))
    batch = make_batch(model)
    _, h1, _ = token_errors(model, batch)
    _, h2, _ = token_errors(model, changed(batch, FIRST_LABEL))  # the first answer token
    torch.testing.assert_close(h1[0, :FIRST_LABEL], h2[0, :FIRST_LABEL], rtol=0, atol=1e-6)
    assert not torch.allclose(h1[0, FIRST_LABEL], h2[0, FIRST_LABEL], atol=1e-4)


def test_mixed_attention_has_no_effect_in_stage_2():
    model = sharpen(preset("croc"))
    batch = make_batch(model)
    out1, h1, mask = token_errors(model, batch, stage="2")
    _, h2, _ = token_errors(model, changed(batch, AFTER_IMAGE), stage="2")
    assert mask.dim() == 2
    torch.testing.assert_close(h1[0, :AFTER_IMAGE], h2[0, :AFTER_IMAGE], rtol=0, atol=1e-6)
    # and the stage-2 loss is the causal model's
    causal = sharpen(preset("victor"))
    causal.load_state_dict(model.state_dict())
    out_causal, _, _ = token_errors(causal, batch, stage="2")
    assert torch.equal(out1.loss, out_causal.loss)


def test_mixed_mask_refuses_flash_attention():
    model = preset("croc")
    attention, labels, _ = hand_batch()
    assert model.mixed_mask(attention, labels).dtype == torch.bool  # sdpa: boolean
    model.llm.config._attn_implementation = "eager"
    assert model.mixed_mask(attention, labels).dtype == torch.float32  # eager: additive
    model.llm.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        model.mixed_mask(attention, labels)


def test_mixed_attention_eager_equals_sdpa():
    model = sharpen(preset("croc"))
    batch = make_batch(model)
    out_sdpa, h_sdpa, _ = token_errors(model, batch)
    model.llm.config._attn_implementation = "eager"
    out_eager, h_eager, mask = token_errors(model, batch)
    assert mask.dtype == torch.float32
    real = batch[1].bool()
    torch.testing.assert_close(h_eager[real], h_sdpa[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_eager.loss, out_sdpa.loss, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# 4. VDEP: nothing replaced, position i reconstructs visual token i + 1


def vdep_reference(model, batch, chosen, offset=1):
    """Step 6 by hand: recon_weight * SmoothL1(head(hidden at image position i), token i + offset)."""
    ids, mask, labels, pixels = batch
    with torch.no_grad():
        embeds, image_pos, _ = model.embed_inputs(ids, pixels)
        hidden = model.llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        v = reference_visual_tokens(model, pixels)
        at = hidden[image_pos].view(v.shape)[chosen]
        pred = model.recon_head(at[:, :N_TOK - offset])
        target = v[chosen][:, offset:]
        return model.cfg.recon_weight * smooth_l1_by_hand((pred - target).double(), model.cfg.recon_beta).mean()


def test_vdep_replaces_nothing_and_reconstructs_the_next_token():
    model = preset("vdep", recon_image_ratio=1.0)
    assert not model.replaces_tokens and model.reconstructs
    batch = make_batch(model)
    out, embeds = stage15(model, batch)
    assert out.replaced_mask is None and out.pool_indices is None
    with torch.no_grad():
        v = reference_visual_tokens(model, batch[3])
    torch.testing.assert_close(embeds[batch[0] == IMAGE_TOKEN_ID], v.reshape(-1, 32), rtol=0, atol=1e-6)
    all_images = torch.ones(2, dtype=torch.bool)
    ref = vdep_reference(model, batch, all_images)
    assert out.recon_loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert out.recon_loss.item() != pytest.approx(vdep_reference(model, batch, all_images, offset=0).item(), rel=1e-3)
    assert out.num_recon_tokens == 2 * (N_TOK - 1) == model.num_reconstruction_targets(2)
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + out.recon_loss.item(), rel=1e-6)


def seeds_choosing(want, ratio=0.5):
    """Per-image selection seeds whose draws choose exactly `want` (list of bools)."""
    seeds, s = [], 0
    for w in want:
        while bool(images_to_reconstruct(1, ratio, [s])[0]) != w:
            s += 1
        seeds.append(s)
        s += 1
    return seeds


@pytest.mark.parametrize("want", [[True, False], [False, True], [False, False]])
def test_vdep_reconstructs_the_images_images_to_reconstruct_names(want):
    model = preset("vdep")
    assert model.cfg.recon_image_ratio == 0.5
    seeds = seeds_choosing(want)
    chosen = images_to_reconstruct(2, 0.5, seeds)
    assert chosen.tolist() == want  # each image's draw is its own seed's
    batch = make_batch(model)
    ids, mask, labels, pixels = batch
    out = model(ids, mask, labels=labels, pixel_values=pixels, stage="1.5", selection_seeds=seeds)
    assert out.num_recon_tokens == model.num_reconstruction_targets(2, seeds) == sum(want) * (N_TOK - 1)
    if any(want):
        ref = vdep_reference(model, batch, chosen)
        assert out.recon_loss.item() == pytest.approx(ref.item(), rel=1e-5)
    else:
        assert out.recon_loss is None
        assert out.loss.item() == out.lm_loss.item()


def test_images_to_reconstruct_share():
    assert images_to_reconstruct(5, 1.0).all()
    draws = images_to_reconstruct(4000, 0.5, list(range(4000)))
    assert 0.45 < draws.float().mean().item() < 0.55
    assert torch.equal(draws[10:20], images_to_reconstruct(10, 0.5, list(range(10, 20))))


# -----------------------------------------------------------------------------
# 5. What each variant trains in stage 1.5, and the captions control's loss


@pytest.mark.parametrize("variant, trained", [
    ("victor", {"token_pool", "recon_head"}),
    ("croc", {"token_pool", "recon_head"}),
    ("vdep", {"recon_head"}),
    ("captions", set()),
])
def test_stage15_param_groups_per_variant(variant, trained):
    model = preset(variant)
    groups = model.param_groups("1.5", 1e-3, 0.0, 1e-2)
    model.set_trainable("1.5")
    stage15_parts = [n for n in ("token_pool", "recon_head") if n in trained]
    assert [g["name"] for g in groups] == ["projector", "llm", *stage15_parts]
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert (id(model.token_pool) in in_groups) == ("token_pool" in trained) == model.token_pool.requires_grad
    for p in model.recon_head.parameters():
        assert (id(p) in in_groups) == ("recon_head" in trained) == p.requires_grad


def test_captions_stage15_loss_is_the_lm_loss_alone():
    model = preset("captions")
    model.set_trainable("1.5")
    batch = make_batch(model)
    ids, mask, labels, pixels = batch
    out, _ = stage15(model, batch)
    assert out.recon_loss is None and out.replaced_mask is None and out.num_recon_tokens == 0
    assert model.num_reconstruction_targets(2) == 0
    assert torch.equal(out.loss, out.lm_loss)
    stage2 = model(ids, mask, labels=labels, pixel_values=pixels, stage="2")
    assert torch.equal(out.loss, stage2.loss)  # nothing of stage 1.5 is left
    out.loss.backward()
    assert model.token_pool.grad is None and model.recon_head.weight.grad is None


def test_victor_without_reconstruction_trains_the_pool_not_the_head():
    model = preset("victor", recon_weight=0.0)
    names = [g["name"] for g in model.param_groups("1.5", 1e-3, 0.0, 1e-2)]
    assert names == ["projector", "llm", "token_pool"]
    out, _ = stage15(model, make_batch(model))
    assert out.recon_loss is None and out.pool_indices is not None
    assert torch.equal(out.loss, out.lm_loss)
    out.loss.backward()
    assert model.token_pool.grad is not None and model.token_pool.grad.abs().sum() > 0
    assert model.recon_head.weight.grad is None


# -----------------------------------------------------------------------------
# 6. --init: overrides on top of a checkpoint take effect or are refused


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, shapes_tokenizer, tiny_image_processor):
    """A projector-only (stage-1) checkpoint over saved base models, and a full (stage-1.5/2) one."""
    root = tmp_path_factory.mktemp("family_ck")
    base = tiny_model(seed=4)
    vdir, ldir = save_base_models(base, root, shapes_tokenizer, tiny_image_processor)
    torch.manual_seed(5)
    stage1 = VictorModel(VictorConfig(vision_model=vdir, llm=ldir, pool_size=32))
    with torch.no_grad():
        for p in stage1.projector.parameters():
            p.add_(0.1)
    CK.save_checkpoint(stage1, str(root / "stage1"), shapes_tokenizer, tiny_image_processor, parts="projector")
    CK.save_checkpoint(base, str(root / "full"), shapes_tokenizer, tiny_image_processor, parts="all")
    return dict(stage1=str(root / "stage1"), full=str(root / "full"), stage1_model=stage1, full_model=base)


def test_init_stage1_checkpoint_takes_a_new_pool_size(checkpoints):
    model, _, _ = CK.load_checkpoint(checkpoints["stage1"], overrides={"pool_size": 64})
    assert model.token_pool.shape == (64, 32) and model.cfg.pool_size == 64
    for a, b in zip(model.projector.parameters(), checkpoints["stage1_model"].projector.parameters()):
        assert torch.equal(a, b)  # the stage-1 projector is still the checkpoint's
    small, _, _ = CK.load_checkpoint(checkpoints["stage1"], overrides={"pool_size": 4, "matcher": "nearest"})
    assert small.token_pool.shape == (4, 32) and small.cfg.matcher == "nearest"
    with pytest.raises(ValueError, match="pool_size=4"):  # one-to-one matching cannot use 4 rows for 12 tokens
        CK.load_checkpoint(checkpoints["stage1"], overrides={"pool_size": 4})


def test_init_full_checkpoint_refuses_a_new_pool_size(checkpoints):
    with pytest.raises(ValueError, match="pool_size"):
        CK.load_checkpoint(checkpoints["full"], overrides={"pool_size": 64})
    same, _, _ = CK.load_checkpoint(checkpoints["full"], overrides={"pool_size": 32})  # no change: fine
    assert torch.equal(same.token_pool, checkpoints["full_model"].token_pool)


def test_init_full_checkpoint_takes_stage15_switches(checkpoints):
    switches = {"matcher": "nearest", "recon_weight": 0.0, "stage15_attention": "mixed",
                "replace_ratio": 0.5, "recon_target_offset": 1, "recon_image_ratio": 0.5}
    model, _, _ = CK.load_checkpoint(checkpoints["full"], overrides=switches)
    for key, value in switches.items():
        assert getattr(model.cfg, key) == value, key
    assert not model.reconstructs
    sd, ref = model.state_dict(), checkpoints["full_model"].state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)  # the weights are the checkpoint's


@pytest.mark.parametrize("key, value", [("llm", "lmsys/vicuna-7b-v1.5"), ("projector_type", "linear"),
                                        ("vision_model", "openai/clip-vit-large-patch14-336")])
def test_init_refuses_overrides_that_the_weights_fix(checkpoints, key, value):
    for which in ("stage1", "full"):
        with pytest.raises(ValueError, match=f"{key}={value!r}"):
            CK.load_checkpoint(checkpoints[which], overrides={key: value})


def test_init_refuses_unknown_overrides(checkpoints):
    with pytest.raises(ValueError, match="pool_sise"):
        CK.load_checkpoint(checkpoints["full"], overrides={"pool_sise": 32})
    with pytest.raises(ValueError, match="matcher"):  # a known key with a bad value is refused too
        CK.load_checkpoint(checkpoints["full"], overrides={"matcher": "argmin"})


def test_config_with_overrides_leaves_the_input_config_alone():
    cfg = tiny_config()
    new = CK.config_with_overrides(cfg, {"matcher": "nearest"}, projector_only=False, source="x")
    assert new.matcher == "nearest" and cfg.matcher == "hungarian"


# -----------------------------------------------------------------------------
# 7. train.py: --variant presets, and flags that contradict each other


def test_croc_preset_on_the_demo_keeps_the_demo_lr():
    cfg = T.stage_config("demo", "1.5", {"variant": "croc"})
    assert cfg.model_overrides["matcher"] == "nearest" and cfg.model_overrides["stage15_attention"] == "mixed"
    assert cfg.model_overrides["pool_size"] == CF.RECIPES["demo"]["model"]["model_overrides"]["pool_size"]
    assert cfg.lr == CF.RECIPES["demo"]["stages"]["1.5"]["lr"] != CF.CROC_LR
    assert cfg.variant == "croc"


def test_croc_preset_on_a_paper_recipe_uses_crocs_lr():
    assert T.stage_config("llava15-vicuna7b", "2", {"variant": "croc"}).lr == CF.CROC_LR
    assert T.stage_config("llava15-vicuna7b", "1.5", {"variant": "croc"}).lr == CF.CROC_LR
    assert T.stage_config("llava15-vicuna7b", "1", {"variant": "croc"}).lr == 1e-3  # stage 1 keeps its own
    assert T.stage_config("llava15-vicuna7b", "2", {"variant": "victor"}).lr == 1e-5
    assert T.stage_config("llava15-vicuna7b", "2", {"variant": "croc", "lr": 3e-5}).lr == 3e-5  # a flag wins


@pytest.mark.parametrize("variant", sorted(V.VARIANTS))
def test_each_preset_is_a_valid_config(variant):
    cfg = T.stage_config("demo", "1.5", {"variant": variant})
    for key, value in V.VARIANTS[variant].items():
        assert cfg.model_overrides[key] == value
    VictorConfig.from_dict({**tiny_config().to_dict(), **cfg.model_overrides}).validate()


def test_user_model_overrides_win_over_the_preset():
    cfg = T.stage_config("demo", "1.5", {"variant": "croc", "model_overrides": {"matcher": "hungarian",
                                                                                "pool_size": 64}})
    assert cfg.model_overrides["matcher"] == "hungarian" and cfg.model_overrides["pool_size"] == 64
    assert cfg.model_overrides["stage15_attention"] == "mixed"  # the rest of the preset stays
    # with --init the recipe's model settings do not apply, the preset's and the user's do
    cfg = T.stage_config("demo", "1.5", {"variant": "vdep"}, init="some/ckpt")
    assert cfg.model_overrides == V.VARIANTS["vdep"] and cfg.init == "some/ckpt"


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variant 'crocs'"):
        T.stage_config("demo", "1.5", {"variant": "crocs"})


def test_llava_variant_has_no_stage15(tmp_path, monkeypatch):
    def no_training(cfg, stage, *_):
        raise AssertionError("training started")
    monkeypatch.setattr(T, "train_stage", no_training)
    with pytest.raises(ValueError, match="stage 1.5"):
        T.run({"variant": "llava", "stage": "1.5", "out_dir": str(tmp_path / "out")})
    assert not (tmp_path / "out").exists()  # refused before any data or model was built


def test_llava_variant_runs_stages_1_and_2(tmp_path, monkeypatch):
    seen = []

    def fake_train(cfg, stage, *_):
        seen.append((stage, cfg.init, cfg.model_overrides))
        return cfg.out_dir
    monkeypatch.setattr(T, "train_stage", fake_train)
    stage_data = {"1": "s1.json", "1.5": "s15.json", "2": "s2.json"}
    monkeypatch.setattr(T, "demo_inputs", lambda overrides, root, n: stage_data)
    monkeypatch.setattr(T, "check_before_training", lambda cfgs, demo_records: ["new"] * len(cfgs))
    monkeypatch.setattr(T, "make_demo_data", lambda *a: None)
    out = str(tmp_path / "out")
    with pytest.raises(T.UsageError, match=r"^--data with --stage all would train every stage on one file; give "):
        T.run({"variant": "llava", "stage": "all", "out_dir": out, "data": "d.json", "image_folder": "img",
               "vision_model": "v", "llm": "l"})
    assert seen == []
    outs = T.run({"variant": "llava", "stage": "all", "out_dir": out, "vision_model": "v", "llm": "l"})
    assert [s for s, _, _ in seen] == ["1", "2"]
    assert seen[1][1] == outs[0]  # stage 2 starts from stage 1
    assert not set(V.VARIANTS["victor"]) & set(seen[0][2])  # no stage-1.5 switches


def test_check_knobs_refuses_contradictions(capsys):
    with pytest.raises(ValueError, match="--epochs"):
        CF.check_knobs({"epochs": 2.0, "max_steps": 10}, "demo", ["2"])
    with pytest.raises(ValueError, match="--demo-images"):
        CF.check_knobs({"demo_images": 100}, "llava15-vicuna7b", ["1"])
    CF.check_knobs({"demo_images": 100, "epochs": 2.0}, "demo", ["2"])  # each alone is fine
    assert capsys.readouterr().out == ""


def test_check_knobs_notes_pool_lr_outside_stage15(capsys):
    CF.check_knobs({"pool_lr": 0.1}, "demo", ["2"])
    assert "note: --pool-lr" in capsys.readouterr().out
    CF.check_knobs({"pool_lr": 0.1}, "demo", ["1.5"])
    assert capsys.readouterr().out == ""


# -----------------------------------------------------------------------------
# Knobs outside the model: eval.py's flags take effect or are refused


@pytest.mark.parametrize("argv, named", [
    (["ckpt", "--seed", "3"], "--seed"),  # replacement seed of --visualize, not of the test set
    (["ckpt", "--image", "im.png", "--ask", "q", "--limit", "5"], "--limit"),
    (["ckpt", "--bench", "x.tsv", "--answers-file", "a.jsonl"], "--answers-file"),
    (["ckpt", "--bench", "x.tsv", "--test-file", "t.jsonl"], "--test-file"),
    (["ckpt", "--visualize", "im.png", "--out", "x.json"], "--out"),
    (["ckpt", "--visualize", "im.png", "--batch-size", "4"], "--batch-size"),
])
def test_eval_refuses_flags_without_effect(argv, named, capsys):
    import eval as E
    with pytest.raises(SystemExit) as e:
        E.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "no effect" in err and "Traceback" not in err


def test_eval_max_new_tokens_reaches_the_shapes_evaluation(monkeypatch, tmp_path):
    import eval as E
    seen = {}
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: seen.update(k) or {"per_type": {}, "accuracy": 0.0})
    monkeypatch.setattr(E, "format_table", lambda r: "")
    (tmp_path / "ck").mkdir()
    (tmp_path / "t.jsonl").write_text("")
    E.main([str(tmp_path / "ck"), "--test-file", str(tmp_path / "t.jsonl"), "--image-folder", str(tmp_path),
            "--max-new-tokens", "3", "--out", str(tmp_path / "r.json")])
    assert seen["max_new_tokens"] == 3


@pytest.mark.parametrize("flags, said", [
    (["--variant", "crocs"], "unknown variant 'crocs'"),
    (["--stage", "1.5", "--variant", "llava"], "--variant llava has no stage 1.5"),
    (["--model-overrides", '{"matcher": "argmin"}'], "matcher must be one of"),
    (["--epochs", "2", "--max-steps", "3"], "--epochs has no effect with --max-steps"),
])
def test_train_cli_mistakes_are_one_line(flags, said, tmp_path):
    import forked
    proc = forked.run(["train.py", "--out-dir", str(tmp_path), *flags], timeout=120)
    assert proc.returncode != 0
    assert said in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "shapes").exists()  # refused before the demo data is built
