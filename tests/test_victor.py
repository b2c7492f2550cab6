"""Tests of victor.py: the stage-1.5 method (README's step table), losses by hand, generation, checkpoints,
LLaVA projector import, and an independent-implementation check against transformers' Llava.

Every model is a tiny random-init one built from conftest.tiny_config(); the whole file runs in seconds.
"""
import copy
import itertools
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import victor
from conftest import save_base_models, tiny_config, tiny_model
from engineering import batches as BA
from engineering import checkpoints as CK
from victor import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    VictorConfig,
    VictorModel,
    hungarian_match,
    num_replaced,
    reconstruction_loss,
    select_tokens_to_replace,
)

N_TOK = 16  # tiny model: 32 px, patch 8, CLS dropped
FIRST_TEXT_ID = 5  # ids 0..4 are the shapes tokenizer's special tokens (<pad>, <unk>, ..., <|im_end|>)
EOS_ID = 4


pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# helpers


def make_batch(model, seed=0, parts=((2, 3, 4), (1, 2, 2)), pad_right=True):
    """A stage-1.5/2 style batch: [im_start] prompt <image>xN prompt answer <|im_end|>, one image per sample.

    parts[i] = (tokens before the image, tokens after it, answer tokens). Labels cover only the answer and
    its end token; shorter samples are right-padded (pad id 0, attention 0, label ignored).
    """
    g = torch.Generator().manual_seed(seed)
    vocab = model.llm.config.vocab_size
    n = model.num_image_tokens
    seqs, labs = [], []
    for before, after, answer in parts:
        rnd = lambda k: torch.randint(FIRST_TEXT_ID, vocab, (k,), generator=g).tolist()  # noqa: E731
        prompt = [3] + rnd(before) + [IMAGE_TOKEN_ID] * n + rnd(after)
        ans = rnd(answer) + [EOS_ID]
        seqs.append(prompt + ans)
        labs.append([IGNORE_INDEX] * len(prompt) + ans)
    length = max(map(len, seqs))
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        sl = slice(0, len(s)) if pad_right else slice(length - len(s), length)
        ids[i, sl], labels[i, sl], mask[i, sl] = torch.tensor(s), torch.tensor(lab), 1
    pixels = torch.randn(len(seqs), 3, 32, 32, generator=g)
    return ids, mask, labels, pixels


def sharpen(model, std=0.1):
    """Re-draw the LLM's matrices with a larger std. At the default init (0.02) attention is nearly uniform and
    the logits barely depend on other positions (image or padding), which would make some checks toothless."""
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std, generator=torch.Generator().manual_seed(p.numel()))
    return model


def reference_visual_tokens(model, pixels, normalize=True):
    """Step 1 written out: second-to-last vision layer, CLS dropped (CLIP), projector, L2 normalisation."""
    hs = model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    feats = hs[:, 1:] if model.vision_tower.config.model_type.startswith("clip") else hs
    v = model.projector(feats)
    return v / v.norm(dim=-1, keepdim=True) if normalize else v


class CaptureEmbeds:
    """Forward pre-hook on the LLM decoder: records the inputs_embeds it receives (graph kept)."""

    def __init__(self, model):
        self.seen = []
        self.handle = model.llm.get_decoder().register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.seen.append(kwargs["inputs_embeds"])

    def remove(self):
        self.handle.remove()


def stage15(model, batch, seed=0):
    """Stage-1.5 forward with a reproducible replacement; returns (output, captured inputs_embeds)."""
    ids, mask, labels, pixels = batch
    cap = CaptureEmbeds(model)
    try:
        out = model(ids, mask, labels=labels, pixel_values=pixels, stage="1.5",
                    generator=torch.Generator().manual_seed(seed))
    finally:
        cap.remove()
    assert len(cap.seen) == 1
    return out, cap.seen[0]


def brute_force_min_cost(cost: np.ndarray) -> float:
    """Minimum total cost over all injective maps rows -> columns (R <= P)."""
    r, p = cost.shape
    return min(cost[np.arange(r), list(perm)].sum() for perm in itertools.permutations(range(p), r))


# -----------------------------------------------------------------------------
# 1. Hungarian matching


@pytest.mark.parametrize("pool_rows", [5, 6])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hungarian_match_is_optimal_against_brute_force(seed, pool_rows):
    g = torch.Generator().manual_seed(seed)
    images, r, d = 3, 3, 4
    tokens = torch.randn(images, r, d, generator=g)
    pool = torch.randn(pool_rows, d, generator=g)
    idx = hungarian_match(tokens, pool)
    assert idx.shape == (images, r) and idx.dtype == torch.long
    cost = torch.cdist(tokens.double(), pool.double().unsqueeze(0)).numpy()  # exact-ish costs
    for b in range(images):
        assert len(set(idx[b].tolist())) == r, "a pool row was used twice in one image"
        got = cost[b][np.arange(r), idx[b].numpy()].sum()
        assert got == pytest.approx(brute_force_min_cost(cost[b]), rel=1e-6, abs=1e-6)


def test_hungarian_match_beats_greedy_when_rows_collide():
    """Two tokens whose nearest pool row is the same: matching must give them different rows, optimally."""
    tokens = torch.tensor([[[0.0, 0.0], [0.1, 0.0]]])
    pool = torch.tensor([[0.05, 0.0], [5.0, 5.0], [0.05, 1.0]])
    idx = hungarian_match(tokens, pool)[0].tolist()
    assert len(set(idx)) == 2 and 1 not in idx  # the far row 1 must not be used
    cost = torch.cdist(tokens.double(), pool.double().unsqueeze(0))[0].numpy()
    assert cost[[0, 1], idx].sum() == pytest.approx(brute_force_min_cost(cost))


def test_hungarian_match_equals_scipy_cost_at_scale():
    g = torch.Generator().manual_seed(0)
    tokens = F.normalize(torch.randn(3, 27, 64, generator=g), dim=-1)  # normalised, as in the model
    pool = torch.randn(128, 64, generator=g)
    idx = hungarian_match(tokens, pool)
    cost = torch.cdist(tokens.float(), pool.float().unsqueeze(0)).numpy()
    for b in range(3):
        assert len(set(idx[b].tolist())) == 27
        assert idx[b].min() >= 0 and idx[b].max() < 128
        rows, cols = linear_sum_assignment(cost[b])
        best = cost[b][rows, cols].sum()
        got = cost[b][np.arange(27), idx[b].numpy()].sum()
        assert got == pytest.approx(best, rel=1e-6)
        assert got >= cost[b].min(axis=1).sum() - 1e-4  # never below the (non-injective) per-token minimum
    # the problem is not trivial: nearest-row (argmin) matching would reuse pool rows in some image
    assert any(len(set(cost[b].argmin(1).tolist())) < 27 for b in range(3))


def test_hungarian_match_runs_without_gradient():
    tokens = torch.randn(2, 3, 4, requires_grad=True)
    pool = torch.nn.Parameter(torch.randn(6, 4))
    idx = hungarian_match(tokens * 2.0, pool)  # even a non-leaf input with a graph
    assert not idx.requires_grad and idx.grad_fn is None
    assert idx.dtype == torch.long and idx.device == tokens.device


# -----------------------------------------------------------------------------
# 2. Selection of the tokens to replace


@pytest.mark.parametrize("n, expected", [(576, 432), (729, 547), (16, 12), (4, 3), (1, 1)])
def test_num_replaced_published_counts(n, expected):
    assert num_replaced(n, 0.75) == expected


def test_num_replaced_is_n_minus_n_div_4():
    assert all(num_replaced(n, 0.75) == n - n // 4 for n in range(1, 3000))
    assert num_replaced(576, 0.0) == 0


@pytest.mark.parametrize("n", [576, 729, 16])
def test_select_tokens_to_replace_counts_and_randomness(n):
    images = 64
    mask = select_tokens_to_replace(images, n, 0.75, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (images, n) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [n - n // 4] * images
    rows = {tuple(row.tolist()) for row in mask}
    # different images get different random subsets; for n=16 there are only C(16,12)=1820 subsets,
    # so a repeat or two among 64 draws is expected, but a shared subset would give 1
    assert len(rows) == images if n > 16 else len(rows) >= images - 6


def test_select_tokens_with_per_image_seeds_ignores_the_batch():
    """With seeds, an image's choice depends on its seed alone: not on its batch or position in it
    (what makes 1 or N processes, and a resumed run, replace the same tokens)."""
    together = select_tokens_to_replace(3, 576, 0.75, seeds=[11, 22, 33])
    alone = [select_tokens_to_replace(1, 576, 0.75, seeds=[s])[0] for s in (33, 11, 22)]
    assert torch.equal(together[0], alone[1]) and torch.equal(together[1], alone[2])
    assert torch.equal(together[2], alone[0])
    assert together.sum(1).tolist() == [576 - 576 // 4] * 3
    assert not torch.equal(together[0], together[1])
    with pytest.raises(ValueError, match="2 selection seeds for 3 images"):
        select_tokens_to_replace(3, 576, 0.75, seeds=[1, 2])


def test_train_selection_seeds_name_each_image():
    seeds = BA.selection_seeds([(0, 0), (0, 1), (1, 0)], seed=0, epoch=0)
    assert len(set(seeds)) == 3
    assert BA.selection_seeds([(0, 0)], seed=0, epoch=1) != seeds[:1]  # a new epoch draws anew
    assert BA.selection_seeds([(0, 0)], seed=1, epoch=0) != seeds[:1]


def test_select_tokens_to_replace_reproducible_and_uniform():
    a = select_tokens_to_replace(3, 576, 0.75, generator=torch.Generator().manual_seed(7))
    b = select_tokens_to_replace(3, 576, 0.75, generator=torch.Generator().manual_seed(7))
    c = select_tokens_to_replace(3, 576, 0.75, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # uniform: every position is replaced with probability 12/16 = 0.75
    many = select_tokens_to_replace(4000, 16, 0.75, generator=torch.Generator().manual_seed(1))
    freq = many.float().mean(0)
    assert (freq - 0.75).abs().max() < 0.04


# -----------------------------------------------------------------------------
# 3. The stage-1.5 forward: what the LLM actually receives


def test_stage15_llm_inputs_replaced_kept_and_text():
    model = tiny_model()
    batch = make_batch(model)
    ids, mask, labels, pixels = batch
    out, embeds = stage15(model, batch)
    n_img = pixels.shape[0]
    r = N_TOK - N_TOK // 4
    # output bookkeeping
    assert out.replaced_mask.shape == (n_img, N_TOK) and out.replaced_mask.dtype == torch.bool
    assert out.replaced_mask.sum(1).tolist() == [r] * n_img
    assert out.pool_indices.shape == (n_img, r)
    for b in range(n_img):
        assert len(set(out.pool_indices[b].tolist())) == r
    assert out.num_recon_tokens == n_img * N_TOK
    image_pos = ids == IMAGE_TOKEN_ID
    img_embeds = embeds[image_pos].view(n_img, N_TOK, -1)
    replaced = out.replaced_mask
    # replaced positions: exactly the matched pool rows, in order
    expected_rows = model.token_pool[out.pool_indices.flatten()]
    assert torch.equal(img_embeds[replaced], expected_rows)
    # kept positions: the normalised projector output
    with torch.no_grad():
        v = reference_visual_tokens(model, pixels)
    torch.testing.assert_close(img_embeds[~replaced], v[~replaced], rtol=0, atol=1e-6)
    assert torch.allclose(img_embeds[~replaced].norm(dim=-1), torch.ones(n_img * (N_TOK - r)), atol=1e-5)
    # text positions: the token embeddings (pad positions included)
    text_ids = ids[~image_pos]
    assert torch.equal(embeds[~image_pos], model.llm.get_input_embeddings()(text_ids))
    # the matching used was optimal for the (normalised) selected tokens
    cost = torch.cdist(v[replaced].view(n_img, r, -1).double(), model.token_pool.detach().double().unsqueeze(0))
    for b in range(n_img):
        rows, cols = linear_sum_assignment(cost[b].numpy())
        got = cost[b][torch.arange(r), out.pool_indices[b]].sum().item()
        assert got == pytest.approx(cost[b].numpy()[rows, cols].sum(), rel=1e-5)


def test_stage15_replacement_reproducible_with_generator():
    model = tiny_model()
    batch = make_batch(model)
    o1, _ = stage15(model, batch, seed=3)
    o2, _ = stage15(model, batch, seed=3)
    o3, _ = stage15(model, batch, seed=4)
    assert torch.equal(o1.replaced_mask, o2.replaced_mask) and torch.equal(o1.pool_indices, o2.pool_indices)
    assert torch.equal(o1.loss, o2.loss)
    assert not torch.equal(o1.replaced_mask, o3.replaced_mask)


def test_stage15_with_left_padding_matches_images_to_their_positions():
    """Row-major scatter order must pair image b's tokens with sample b even when padding shifts positions."""
    model = tiny_model()
    ids, mask, labels, pixels = make_batch(model, pad_right=False)
    out, embeds = stage15(model, (ids, mask, labels, pixels))
    with torch.no_grad():
        v = reference_visual_tokens(model, pixels)
    for b in range(ids.shape[0]):
        e = embeds[b][ids[b] == IMAGE_TOKEN_ID]
        assert torch.equal(e[out.replaced_mask[b]], model.token_pool[out.pool_indices[b]])
        torch.testing.assert_close(e[~out.replaced_mask[b]], v[b][~out.replaced_mask[b]], rtol=0, atol=1e-6)


# -----------------------------------------------------------------------------
# 4. Gradients: the pool learns, the reconstruction target does not


def test_token_pool_gets_gradient_only_at_matched_rows():
    model = tiny_model()
    out, _ = stage15(model, make_batch(model))
    out.loss.backward()
    grad = model.token_pool.grad
    assert grad is not None
    used = set(out.pool_indices.flatten().tolist())
    nonzero = set(torch.nonzero(grad.abs().sum(1)).flatten().tolist())
    assert nonzero == used
    unused = [i for i in range(model.cfg.pool_size) if i not in used]
    assert len(unused) > 0 and torch.count_nonzero(grad[unused]) == 0
    # the other trainable parts of stage 1.5 learn too
    for p in (model.recon_head.weight, model.projector[0].weight, model.llm.get_input_embeddings().weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_reconstruction_target_gets_no_gradient_model_level():
    """d recon_loss / d v must equal exactly what flows back through the LLM input (kept tokens), nothing more.

    If the target were not detached, v would also receive -dL/dtarget: non-zero at the replaced tokens
    (which never enter the LLM) and different at the kept ones.
    """
    model = tiny_model()
    proj = {}
    handle = model.projector.register_forward_hook(lambda m, i, o: proj.setdefault("out", o))
    try:
        out, embeds = stage15(model, make_batch(model))
    finally:
        handle.remove()
    ids = make_batch(model)[0]
    p = proj["out"]  # projector output, before normalisation
    g_p, g_embeds = torch.autograd.grad(out.recon_loss, [p, embeds])
    replaced = out.replaced_mask
    # gradient w.r.t. the normalised tokens implied by the LLM-input path alone
    n_img = p.shape[0]
    g_v = g_embeds[ids == IMAGE_TOKEN_ID].view(n_img, N_TOK, -1).clone()
    g_v[replaced] = 0.0  # replaced positions got pool rows, not v
    p_leaf = p.detach().requires_grad_(True)
    (g_expected,) = torch.autograd.grad(F.normalize(p_leaf, dim=-1), p_leaf, grad_outputs=g_v)
    assert torch.count_nonzero(g_p[replaced]) == 0
    assert g_p[~replaced].abs().sum() > 0
    torch.testing.assert_close(g_p, g_expected, rtol=1e-4, atol=1e-8)


def test_reconstruction_loss_detaches_target():
    pred = torch.randn(5, 8, requires_grad=True)
    target = torch.randn(5, 8, requires_grad=True)
    loss = reconstruction_loss(pred, target, beta=0.01)
    loss.backward()
    assert target.grad is None
    assert pred.grad is not None and pred.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# 5. Losses by hand


def smooth_l1_by_hand(x, beta):
    ax = x.abs()
    return torch.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def test_stage15_losses_by_hand():
    model = tiny_model()
    batch = make_batch(model)
    ids, mask, labels, pixels = batch
    out, embeds = stage15(model, batch)
    with torch.no_grad():
        full = model.llm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        logits, last = full.logits, full.hidden_states[-1]
        torch.testing.assert_close(model.llm.get_output_embeddings()(last), logits)  # last = final-norm state
        # LM loss: shifted cross-entropy at labelled positions, written out
        lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
        tgt = labels[:, 1:]
        where = tgt != IGNORE_INDEX
        nll = -lp[where].gather(1, tgt[where].unsqueeze(1)).squeeze(1)
        lm_ref = nll.mean()
        assert out.num_label_tokens == int(where.sum()) == 5 + 3
        # reconstruction: head(last hidden at every image position) vs normalised projector output
        v = reference_visual_tokens(model, pixels)
        image_pos = ids == IMAGE_TOKEN_ID
        pred = model.recon_head(last[image_pos])
        target = v.reshape(-1, v.shape[-1])
        recon_ref = 10.0 * smooth_l1_by_hand((pred - target).double(), 0.01).mean()
    assert out.lm_loss.item() == pytest.approx(lm_ref.item(), rel=1e-5)
    assert out.recon_loss.item() == pytest.approx(recon_ref.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + out.recon_loss.item(), rel=1e-6)
    torch.testing.assert_close(out.loss, out.lm_loss + out.recon_loss)
    # sanity: these numbers are not trivially zero
    assert out.lm_loss.item() > 0.5 and out.recon_loss.item() > 0.01


def test_smooth_l1_branches_by_hand():
    """Both SmoothL1 branches (|x| < beta and |x| >= beta) against the hand formula."""
    pred = torch.tensor([[0.0, 0.004, -0.009, 0.5, -2.0]])
    target = torch.zeros_like(pred)
    got = reconstruction_loss(pred, target, beta=0.01)
    assert got.item() == pytest.approx(smooth_l1_by_hand(pred - target, 0.01).mean().item(), rel=1e-6)


def test_stage2_loss_by_hand():
    model = tiny_model()
    ids, mask, labels, pixels = make_batch(model)
    out = model(ids, mask, labels=labels, pixel_values=pixels, stage="2")
    with torch.no_grad():
        v = reference_visual_tokens(model, pixels)
        emb = model.llm.get_input_embeddings()(ids.clamp(min=0))
        emb[ids == IMAGE_TOKEN_ID] = v.reshape(-1, v.shape[-1])
        logits = model.llm(inputs_embeds=emb, attention_mask=mask).logits
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                              ignore_index=IGNORE_INDEX)
    assert out.lm_loss.item() == pytest.approx(ref.item(), rel=1e-5)


# -----------------------------------------------------------------------------
# 6. Logits only where labels exist


@pytest.mark.parametrize("stage", ["1", "1.5", "2"])
def test_lm_head_sees_only_label_rows(stage):
    model = tiny_model()
    ids, mask, labels, pixels = make_batch(model)
    seen = []
    handle = model.llm.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        out = model(ids, mask, labels=labels, pixel_values=pixels, stage=stage,
                    generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    n_labels = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert len(seen) == 1 and seen[0][0] == n_labels and len(seen[0]) == 2
    assert out.num_label_tokens == n_labels
    assert n_labels < ids.numel() // 4  # the saving is real: far fewer rows than positions


def test_no_labels_gives_zero_loss_connected_to_graph():
    model = tiny_model()
    ids, mask, labels, pixels = make_batch(model)
    out = model(ids, mask, labels=torch.full_like(labels, IGNORE_INDEX), pixel_values=pixels, stage="2")
    assert out.num_label_tokens == 0 and out.lm_loss.item() == 0.0
    out.loss.backward()  # must not raise


# -----------------------------------------------------------------------------
# 7. Stages 1 and 2


@pytest.mark.parametrize("stage", ["1", "2"])
def test_stages_1_and_2_do_not_replace(stage):
    model = tiny_model()
    batch = make_batch(model)
    ids, mask, labels, pixels = batch
    cap = CaptureEmbeds(model)
    try:
        out = model(ids, mask, labels=labels, pixel_values=pixels, stage=stage)
    finally:
        cap.remove()
    assert out.replaced_mask is None and out.pool_indices is None and out.recon_loss is None
    assert out.num_recon_tokens == 0
    assert torch.equal(out.loss, out.lm_loss)
    # every image position holds its own normalised visual token
    v = reference_visual_tokens(model, pixels).detach()
    torch.testing.assert_close(cap.seen[0][ids == IMAGE_TOKEN_ID].detach(), v.reshape(-1, v.shape[-1]),
                               rtol=0, atol=1e-6)
    out.loss.backward()
    assert model.token_pool.grad is None and model.recon_head.weight.grad is None


def test_stage1_and_stage2_losses_agree_and_differ_from_stage15():
    model = tiny_model()
    ids, mask, labels, pixels = make_batch(model)
    l1 = model(ids, mask, labels=labels, pixel_values=pixels, stage="1").loss
    l2 = model(ids, mask, labels=labels, pixel_values=pixels, stage="2").loss
    l15 = model(ids, mask, labels=labels, pixel_values=pixels, stage="1.5",
                generator=torch.Generator().manual_seed(0)).lm_loss
    assert torch.equal(l1, l2)
    assert l15.item() != pytest.approx(l2.item(), abs=1e-7)  # replacement changes what the LLM sees


@pytest.mark.parametrize("bad", ["3", "1.0", "stage2", 2])
def test_bad_stage_raises(bad):
    model = tiny_model()
    ids, mask, labels, pixels = make_batch(model)
    with pytest.raises(ValueError, match="stage"):
        model(ids, mask, labels=labels, pixel_values=pixels, stage=bad)


# -----------------------------------------------------------------------------
# 8. Config checks and visual features


def test_pool_smaller_than_replaced_count_is_refused():
    with pytest.raises(ValueError, match=r"pool_size=11 .*12") as e:
        tiny_model(pool_size=11)
    assert "one-to-one" in str(e.value)
    assert tiny_model(pool_size=12).token_pool.shape == (12, 32)  # exactly enough is fine


def test_pool_of_exactly_r_rows_uses_every_row():
    model = tiny_model(pool_size=12)
    out, _ = stage15(model, make_batch(model))
    for b in range(out.pool_indices.shape[0]):
        assert sorted(out.pool_indices[b].tolist()) == list(range(12))


@pytest.mark.parametrize("overrides, match", [
    (dict(projector_type="mlp3x"), "projector_type"),
    (dict(vision_feature_select="cls"), "vision_feature_select"),
    (dict(replace_ratio=1.0), "replace_ratio"),
    (dict(matcher="argmin"), "matcher"),
    (dict(image_token_id=5), "image_token_id"),
])
def test_bad_config_values_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        VictorModel(tiny_config(**overrides))


def test_config_from_dict_rejects_unknown_keys():
    d = tiny_config().to_dict()
    assert VictorConfig.from_dict(d) == tiny_config()
    with pytest.raises(ValueError, match="unknown VictorConfig keys"):
        VictorConfig.from_dict({**d, "pool_sise": 4})


def test_image_token_count_mismatch_raises():
    model = tiny_model()
    ids, mask, labels, pixels = make_batch(model)
    one_less = ids.clone()
    first = (one_less[0] == IMAGE_TOKEN_ID).nonzero()[0, 0]
    one_less[0, first] = FIRST_TEXT_ID
    with pytest.raises(ValueError, match="image tokens"):
        model(one_less, mask, labels=labels, pixel_values=pixels, stage="2")
    with pytest.raises(ValueError, match="image tokens"):  # one image too many
        model(ids, mask, labels=labels, pixel_values=torch.cat([pixels, pixels[:1]]), stage="2")
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids, mask, labels=labels, pixel_values=None, stage="2")


def test_clip_drops_cls_and_siglip_keeps_all():
    pixels = torch.randn(2, 3, 32, 32)
    clip = tiny_model()
    hs = clip.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert hs[-2].shape == (2, 17, 32)  # CLS + 16 patches
    assert clip.num_image_tokens == 16
    torch.testing.assert_close(clip.encode_images(pixels), hs[-2][:, 1:], rtol=0, atol=0)
    assert not torch.allclose(hs[-2][:, 1:], hs[-1][:, 1:])  # the second-to-last layer, not the last
    siglip = tiny_model(vision="siglip")
    hs = siglip.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert hs[-2].shape == (2, 16, 32)  # no CLS token
    assert siglip.num_image_tokens == 16
    torch.testing.assert_close(siglip.encode_images(pixels), hs[-2], rtol=0, atol=0)
    # explicit override: "full" keeps CLIP's CLS, so the token count no longer matches the grid
    assert tiny_model(vision_feature_select="full").encode_images(pixels).shape == (2, 17, 32)


def test_siglip_stage15_runs():
    model = tiny_model(vision="siglip")
    out, _ = stage15(model, make_batch(model))
    assert out.replaced_mask.sum(1).tolist() == [12, 12]
    assert torch.isfinite(out.loss)


def test_vision_feature_downsample_pools_tokens():
    model = tiny_model(vision_feature_downsample=2)
    assert model.num_image_tokens == 4
    pixels = torch.randn(1, 3, 32, 32)
    feats = model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    grid = feats.view(1, 4, 4, -1)
    expected = grid.view(1, 2, 2, 2, 2, -1).mean(dim=(2, 4)).reshape(1, 4, -1)  # 2x2 blocks, row-major
    torch.testing.assert_close(model.encode_images(pixels), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        tiny_model(vision_feature_downsample=3)


def test_normalize_switch():
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[3] + [IMAGE_TOKEN_ID] * N_TOK + [7]] * 2)
    raw = tiny_model(normalize_visual_tokens=False)
    _, _, v = raw.embed_inputs(ids, pixels)
    torch.testing.assert_close(v, raw.projector(raw.encode_images(pixels)), rtol=0, atol=0)
    assert (v.norm(dim=-1) - 1).abs().max() > 0.05  # really unnormalised
    normed = tiny_model(normalize_visual_tokens=True)
    embeds, _, v = normed.embed_inputs(ids, pixels)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(2, N_TOK), rtol=0, atol=1e-5)
    torch.testing.assert_close(embeds[ids == IMAGE_TOKEN_ID], v.reshape(-1, 32), rtol=0, atol=0)


def test_stage15_without_replacement_ratio_zero():
    """replace_ratio=0 is a valid config: reconstruction of every token, nothing replaced (steps 2-4 skipped)."""
    model = tiny_model(replace_ratio=0.0)
    out, _ = stage15(model, make_batch(model))
    assert not model.replaces_tokens and out.replaced_mask is None and out.pool_indices is None
    assert out.recon_loss is not None and torch.isfinite(out.recon_loss)


# -----------------------------------------------------------------------------
# 9. Generation


def _prompt(model, seed, before, after):
    g = torch.Generator().manual_seed(seed)
    vocab = model.llm.config.vocab_size
    rnd = lambda k: torch.randint(FIRST_TEXT_ID, vocab, (k,), generator=g).tolist()  # noqa: E731
    return [3] + rnd(before) + [IMAGE_TOKEN_ID] * model.num_image_tokens + rnd(after)


def _left_pad(prompts):
    length = max(map(len, prompts))
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p)
        mask[i, length - len(p):] = 1
    return ids, mask


def test_generate_batched_left_padding_equals_single():
    model = sharpen(tiny_model(seed=1).eval(), std=0.2)  # std 0.2: varied outputs, not one repeated token
    model.llm.generation_config.eos_token_id = None  # random weights: generate the full length, no early stop
    prompts = [_prompt(model, 0, 1, 1), _prompt(model, 1, 6, 4), _prompt(model, 2, 3, 0)]
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ids, mask = _left_pad(prompts)
    assert (mask == 0).sum(1).max() >= 5  # real left padding
    batched = model.generate(ids, mask, pixel_values=pixels, max_new_tokens=8, pad_token_id=0)
    assert batched.shape == (3, 8)
    assert len(set(batched.flatten().tolist())) >= 4, "degenerate generation would make this test toothless"
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long),
                               pixel_values=pixels[i:i + 1], max_new_tokens=8, pad_token_id=0)
        assert torch.equal(alone[0], batched[i]), f"sample {i}: batched {batched[i]} vs alone {alone[0]}"
        # reference: greedy decoding by full forward passes, no KV cache, no padding
        with torch.no_grad():
            embeds, _, _ = model.embed_inputs(torch.tensor([p]), pixels[i:i + 1])
            ref = []
            for _ in range(8):
                nxt = int(model.llm(inputs_embeds=embeds).logits[0, -1].argmax())
                ref.append(nxt)
                embeds = torch.cat([embeds, model.llm.get_input_embeddings()(torch.tensor([[nxt]]))], dim=1)
        assert batched[i].tolist() == ref
    # generation depends on the image: another image changes at least one sample's output
    other = model.generate(ids, mask, pixel_values=pixels.flip(0), max_new_tokens=8, pad_token_id=0)
    assert not torch.equal(other, batched)


def test_generate_stops_at_eos_and_pads():
    model = sharpen(tiny_model(seed=1).eval(), std=0.2)  # std 0.2: varied outputs, not one repeated token
    prompts = [_prompt(model, 0, 1, 1), _prompt(model, 1, 6, 4)]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ids, mask = _left_pad(prompts)
    free = model.generate(ids, mask, pixel_values=pixels, max_new_tokens=6, eos_token_id=-12345, pad_token_id=0)
    eos = int(free[0, 2])  # pretend the third token of sample 0 is the end token
    stopped = model.generate(ids, mask, pixel_values=pixels, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(stopped[0, :3], free[0, :3])
    assert (stopped[0, 3:] == 0).all()


def test_generate_sampling_runs_and_respects_max_new_tokens():
    model = sharpen(tiny_model(seed=1).eval(), std=0.2)  # std 0.2: varied outputs, not one repeated token
    prompts = [_prompt(model, 0, 1, 1), _prompt(model, 1, 6, 4)]
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = _left_pad(prompts)
    torch.manual_seed(0)
    a = model.generate(ids, mask, pixel_values=pixels, max_new_tokens=5, do_sample=True, temperature=1.5,
                       top_p=0.9, pad_token_id=0)
    torch.manual_seed(0)
    b = model.generate(ids, mask, pixel_values=pixels, max_new_tokens=5, do_sample=True, temperature=1.5,
                       top_p=0.9, pad_token_id=0)
    assert a.shape[0] == 2 and 1 <= a.shape[1] <= 5 and a.dtype == torch.long
    assert a.min() >= 0 and a.max() < model.llm.config.vocab_size
    assert torch.equal(a, b)  # seeded sampling is reproducible
    c = model.generate(ids, mask, pixel_values=pixels, max_new_tokens=3, do_sample=True, pad_token_id=0)
    assert c.shape[1] <= 3


# -----------------------------------------------------------------------------
# 10. Checkpoints


def _stage2(model, batch):
    ids, mask, labels, pixels = batch
    with torch.no_grad():
        out = model(ids, mask, labels=labels, pixel_values=pixels, stage="2")
        embeds, _, _ = model.embed_inputs(ids, pixels)
        logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits
    return out.loss, logits


def test_save_load_all_round_trip(tmp_path, shapes_tokenizer, tiny_image_processor):
    model = tiny_model(seed=3)
    with torch.no_grad():  # make the pool/head distinguishable from a fresh init
        model.token_pool.mul_(0.5)
    batch = make_batch(model)
    loss, logits = _stage2(model, batch)
    CK.save_checkpoint(model, str(tmp_path / "ck"), tokenizer=shapes_tokenizer,
                           image_processor=tiny_image_processor, parts="all")
    torch.manual_seed(123)  # a different random init underneath: the weights must all come from the file
    loaded, tok, proc = CK.load_checkpoint(str(tmp_path / "ck"))
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    loss2, logits2 = _stage2(loaded, batch)
    assert torch.equal(loss, loss2) and torch.equal(logits, logits2)
    out1, _ = stage15(model, batch)
    out2, _ = stage15(loaded, batch)
    assert torch.equal(out1.loss, out2.loss)
    assert tok("red circle")["input_ids"] == shapes_tokenizer("red circle")["input_ids"]
    assert proc.crop_size == tiny_image_processor.crop_size
    assert loaded.cfg.to_dict() == model.cfg.to_dict()


def test_save_load_tied_embeddings(tmp_path, shapes_tokenizer, tiny_image_processor):
    """An LLM whose lm_head is its input embedding (e.g. Qwen2.5-0.5B) is stored once and loads tied."""
    from safetensors.torch import load_file
    cfg = tiny_config()
    cfg.llm_config["tie_word_embeddings"] = True
    torch.manual_seed(4)
    model = victor.VictorModel(cfg)
    assert model.llm.lm_head.weight is model.llm.get_input_embeddings().weight
    batch = make_batch(model)
    loss, logits = _stage2(model, batch)
    CK.save_checkpoint(model, str(tmp_path / "ck"), tokenizer=shapes_tokenizer,
                           image_processor=tiny_image_processor)
    stored = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert "llm.model.embed_tokens.weight" in stored and "llm.lm_head.weight" not in stored
    loaded, _, _ = CK.load_checkpoint(str(tmp_path / "ck"))
    assert loaded.llm.lm_head.weight is loaded.llm.get_input_embeddings().weight
    loss2, logits2 = _stage2(loaded, batch)
    assert torch.equal(loss, loss2) and torch.equal(logits, logits2)


def test_save_load_projector_only(tmp_path, shapes_tokenizer, tiny_image_processor):
    from safetensors.torch import load_file
    base = tiny_model(seed=4)
    vdir, ldir = save_base_models(base, tmp_path, shapes_tokenizer, tiny_image_processor)
    torch.manual_seed(5)
    model = VictorModel(VictorConfig(vision_model=vdir, llm=ldir, pool_size=32))
    # the base weights really came from the directories
    assert torch.equal(model.llm.lm_head.weight, base.llm.lm_head.weight)
    assert all(torch.equal(a, b) for a, b in zip(model.vision_tower.parameters(), base.vision_tower.parameters()))
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(0.1)  # "trained" projector
    batch = make_batch(model)
    loss, logits = _stage2(model, batch)
    ck = str(tmp_path / "stage1")
    CK.save_checkpoint(model, ck, tokenizer=shapes_tokenizer, image_processor=tiny_image_processor,
                           parts="projector")
    keys = set(load_file(os.path.join(ck, "model.safetensors")))
    assert keys == {"projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias"}
    torch.manual_seed(99)
    loaded, _, _ = CK.load_checkpoint(ck)
    for a, b in zip(loaded.projector.parameters(), model.projector.parameters()):
        assert torch.equal(a, b)
    loss2, logits2 = _stage2(loaded, batch)
    assert torch.equal(loss, loss2) and torch.equal(logits, logits2)


def test_load_checkpoint_refuses_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        CK.load_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="victor"):
        CK.load_checkpoint(str(tmp_path))


def test_save_checkpoint_bad_parts(tmp_path):
    with pytest.raises(ValueError, match="parts"):
        CK.save_checkpoint(tiny_model(), str(tmp_path / "x"), parts="llm")


# -----------------------------------------------------------------------------
# 11. LLaVA mm_projector.bin import


def _llava_state(model, scale=1.0):
    g = torch.Generator().manual_seed(11)
    return {f"model.mm_projector.{k}": torch.randn(v.shape, generator=g) * scale
            for k, v in model.projector.state_dict().items()}


def test_load_llava_projector_exact(tmp_path):
    model = tiny_model()
    state = _llava_state(model)
    assert set(state) == {"model.mm_projector.0.weight", "model.mm_projector.0.bias",
                          "model.mm_projector.2.weight", "model.mm_projector.2.bias"}
    path = str(tmp_path / "mm_projector.bin")
    torch.save(state, path)
    CK.load_llava_projector(model, path)
    for k, v in model.projector.state_dict().items():
        assert torch.equal(v, state[f"model.mm_projector.{k}"])
    # and through the config switch, when a model is built from its base models (new_model; VictorModel, which
    # does no I/O, refuses the setting rather than leave it unread)
    torch.manual_seed(9)
    fresh = CK.new_model(tiny_config(projector_path=path))
    assert fresh.cfg.projector_path == path
    with pytest.raises(ValueError, match="projector_path.*new_model"):
        tiny_model(seed=9, projector_path=path)
    for k, v in fresh.projector.state_dict().items():
        assert torch.equal(v, state[f"model.mm_projector.{k}"])


def test_load_llava_projector_half_precision_file(tmp_path):
    model = tiny_model()
    state = {k: v.half() for k, v in _llava_state(model).items()}
    path = str(tmp_path / "mm_projector.bin")
    torch.save(state, path)
    CK.load_llava_projector(model, path)
    assert model.projector[0].weight.dtype == torch.float32
    assert torch.equal(model.projector[0].weight, state["model.mm_projector.0.weight"].float())


def test_load_llava_linear_projector(tmp_path):
    """LLaVA's 'linear' projector is a bare nn.Linear: keys model.mm_projector.weight / .bias."""
    model = tiny_model(projector_type="linear")
    g = torch.Generator().manual_seed(2)
    state = {"model.mm_projector.weight": torch.randn(32, 32, generator=g),
             "model.mm_projector.bias": torch.randn(32, generator=g)}
    path = str(tmp_path / "mm_projector.bin")
    torch.save(state, path)
    CK.load_llava_projector(model, path)
    assert torch.equal(model.projector[0].weight, state["model.mm_projector.weight"])
    assert torch.equal(model.projector[0].bias, state["model.mm_projector.bias"])


def test_load_llava_projector_refuses_bad_files(tmp_path):
    model = tiny_model()
    no_keys = str(tmp_path / "no_keys.bin")
    torch.save({"model.layers.0.weight": torch.zeros(2)}, no_keys)
    with pytest.raises(ValueError, match="mm_projector"):
        CK.load_llava_projector(model, no_keys)
    wrong = str(tmp_path / "wrong.bin")
    state = _llava_state(model)
    state["model.mm_projector.0.weight"] = torch.zeros(32, 48)  # vision dim 48 instead of 32
    torch.save(state, wrong)
    with pytest.raises(ValueError, match="does not fit"):
        CK.load_llava_projector(model, wrong)
    missing = str(tmp_path / "missing.bin")
    state = _llava_state(model)
    del state["model.mm_projector.2.bias"]
    torch.save(state, missing)
    with pytest.raises(ValueError, match="does not fit"):
        CK.load_llava_projector(model, missing)
    pickled = str(tmp_path / "pickled.bin")
    torch.save({"model.mm_projector.0.weight": object()}, pickled)  # weights_only refuses arbitrary objects
    with pytest.raises(pickle.UnpicklingError):
        CK.load_llava_projector(model, pickled)


# -----------------------------------------------------------------------------
# 12. An independent implementation: transformers' LlavaForConditionalGeneration


def _victor_to_llava_key(k: str) -> str | None:
    if k.startswith("vision_tower."):  # transformers 5: CLIPVisionModel's keys have no "vision_model."
        return "model." + k
    if k.startswith("projector.0."):
        return "model.multi_modal_projector.linear_1." + k[len("projector.0."):]
    if k.startswith("projector.2."):
        return "model.multi_modal_projector.linear_2." + k[len("projector.2."):]
    if k.startswith("llm.model."):
        return "model.language_model." + k[len("llm.model."):]
    if k.startswith("llm.lm_head."):
        return "lm_head." + k[len("llm.lm_head."):]
    return None  # token_pool, recon_head: ViCToR's additions


def test_matches_transformers_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    model = sharpen(tiny_model(seed=6, normalize_visual_tokens=False).eval())  # LLaVA does not normalise
    image_token_id = 2  # <|endoftext|>: in the vocabulary, never used as text in make_batch
    lconf = LlavaConfig(vision_config=copy.deepcopy(model.vision_tower.config),
                        text_config=copy.deepcopy(model.llm.config),
                        projector_hidden_act="gelu", vision_feature_layer=-2,
                        vision_feature_select_strategy="default", image_token_id=image_token_id)
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(lconf).eval()
    src = model.state_dict()
    dst = llava.state_dict()
    mapped = {}
    for k, v in src.items():
        lk = _victor_to_llava_key(k)
        if lk is None:
            continue
        assert lk in dst and dst[lk].shape == v.shape, k
        mapped[lk] = v
    assert set(mapped) == set(dst), sorted(set(dst) ^ set(mapped))[:5]
    assert set(src) - {k for k in src if _victor_to_llava_key(k)} == {"token_pool", "recon_head.weight",
                                                                       "recon_head.bias"}
    llava.load_state_dict(mapped, strict=True)
    ids, mask, labels, pixels = make_batch(model, seed=2)
    llava_ids = ids.masked_fill(ids == IMAGE_TOKEN_ID, image_token_id)
    loss, logits = _stage2(model, (ids, mask, labels, pixels))
    with torch.no_grad():
        ref = llava(input_ids=llava_ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    text = (ids != IMAGE_TOKEN_ID) & (mask == 1)
    torch.testing.assert_close(logits[text], ref.logits[text], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-5)  # image positions too
    assert loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    # the comparison is sensitive: other images, or ViCToR's normalisation, change the text logits
    _, logits_other = _stage2(model, (ids, mask, labels, pixels.flip(0)))
    assert (logits_other[text] - ref.logits[text]).abs().max() > 1e-2
    model.cfg.normalize_visual_tokens = True
    _, logits_norm = _stage2(model, (ids, mask, labels, pixels))
    assert (logits_norm[text] - ref.logits[text]).abs().max() > 1e-2


# --- the fast exact solver (issue: matching must not dominate training) ---

def _total(cost, cols):
    return float(cost[np.arange(cost.shape[0]), cols].sum())


@pytest.mark.parametrize("structure", ["column_dominated", "uniform", "near_square"])
def test_solve_assignment_reduced_equals_scipy(structure):
    """Both branches of solve_assignment_reduced (square + column reduction, plain) reach scipy's optimum."""
    from victor import solve_assignment, solve_assignment_reduced
    rng = np.random.default_rng(0)
    for _ in range(5):
        r, p = (40, 300) if structure != "near_square" else (40, 41)
        if structure == "column_dominated":  # like an N(0, 1) pool: every token wants the same rows
            cost = rng.normal(64, 0.7, size=(1, p)) + rng.normal(0, 0.02, size=(r, p))
        else:
            cost = rng.random((r, p))
        fast, ref = solve_assignment_reduced(cost), solve_assignment(cost)
        assert len(set(fast.tolist())) == r
        assert abs(_total(cost, fast) - _total(cost, ref)) <= 1e-9 * abs(_total(cost, ref))


@pytest.mark.parametrize("structure, branch", [
    ("own_cheapest", "none"),  # every row's cheapest column is its own: the optimum without scipy
    ("mostly_own", "plain"),  # few rows share a cheapest column: scipy on the whole problem
    ("columns_dominate_widely", "restricted"),  # all rows want the same columns, C > 1.3 R: scipy on C
    ("columns_dominate", "square"),  # all rows want the same columns, C close to R: square, columns reduced
])
def test_solve_assignment_reduced_branches(structure, branch, monkeypatch):
    """Each branch of solve_assignment_reduced runs on the problem it is meant for and reaches the optimum."""
    import victor
    rng = np.random.default_rng(2)
    r, p = 40, 300
    if structure == "own_cheapest":
        cost = rng.random((r, p))
        cost[np.arange(r), rng.permutation(p)[:r]] = -1.0
    elif structure == "mostly_own":
        cost = rng.random((r, p))
    else:
        cost = rng.normal(5, 1, size=(1, p)) + rng.normal(0, 0.3 if structure == "columns_dominate_widely" else 0.02,
                                                             size=(r, p))
    import scipy.optimize
    shapes, solve = [], scipy.optimize.linear_sum_assignment
    monkeypatch.setattr(scipy.optimize, "linear_sum_assignment", lambda c: shapes.append(c.shape) or solve(c))
    cols = victor.solve_assignment_reduced(cost)
    ran = ("none" if not shapes else "plain" if shapes[0] == (r, p) else
           "square" if shapes[0][0] == shapes[0][1] else "restricted" if shapes[0][0] == r else "?")
    assert ran == branch, shapes
    assert len(set(cols.tolist())) == r
    assert abs(_total(cost, cols) - _total(cost, solve(cost)[1])) <= 1e-9 * abs(_total(cost, solve(cost)[1]))


def test_solve_assignment_reduced_brute_force():
    from victor import solve_assignment_reduced
    rng = np.random.default_rng(1)
    for _ in range(20):
        cost = rng.normal(5, 1, size=(1, 6)) + rng.random((3, 6)) * 0.5
        best = min(cost[[0, 1, 2], list(perm)].sum() for perm in itertools.permutations(range(6), 3))
        assert abs(_total(cost, solve_assignment_reduced(cost)) - best) < 1e-12


def test_scipy_matcher_config_gives_same_cost():
    m_fast, m_ref = tiny_model(), tiny_model(matcher="hungarian_plain")
    tokens = torch.nn.functional.normalize(torch.randn(3, 12, 32), dim=-1)
    from victor import match_tokens_to_pool
    a = match_tokens_to_pool(tokens, m_fast.token_pool, m_fast.cfg.matcher)  # the appendix's solver
    b = match_tokens_to_pool(tokens, m_ref.token_pool, m_ref.cfg.matcher)  # scipy on the whole problem
    cost = torch.cdist(tokens, m_fast.token_pool.unsqueeze(0))
    assert torch.allclose(cost.gather(2, a.unsqueeze(-1)).sum(), cost.gather(2, b.unsqueeze(-1)).sum())
