"""The forward's batch layout (victor.batch_layout): the image and label positions carried as integer indices.
The stage-1.5 and stage-2 losses and every gradient must equal, bit for bit, those of the same forward written
with boolean masks (reference_forward below: the steps as the model computed them before the layout)."""
import pytest
import torch
import torch.nn.functional as F

import data as D
import victor
from conftest import tiny_model
from victor import IGNORE_INDEX, IMAGE_TOKEN_ID, batch_layout

pytestmark = pytest.mark.usefixtures("one_thread")


def mixed_batch(model, seed=0, left=False):
    """Three samples: one image, two images, text only; padded right (or left), labels on the answers."""
    g = torch.Generator().manual_seed(seed)
    n, vocab = model.num_image_tokens, model.llm.config.vocab_size
    rnd = lambda k: torch.randint(5, vocab, (k,), generator=g).tolist()  # noqa: E731
    seqs, labs = [], []
    for images, before, answer in ((1, 3, 4), (2, 1, 6), (0, 5, 3)):
        prompt = [3] + rnd(before) + [IMAGE_TOKEN_ID] * (n * images) + rnd(2)
        ans = rnd(answer) + [4]
        seqs.append(prompt + ans)
        labs.append([IGNORE_INDEX] * len(prompt) + ans)
    length = max(map(len, seqs))
    ids, labels, mask = (torch.zeros(3, length, dtype=torch.long), torch.full((3, length), IGNORE_INDEX),
                         torch.zeros(3, length, dtype=torch.long))
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        cols = slice(length - len(s), length) if left else slice(0, len(s))
        ids[i, cols], labels[i, cols], mask[i, cols] = torch.tensor(s), torch.tensor(lab), 1
    return ids, mask, labels, torch.randn(3, 3, 32, 32, generator=g)


def reference_forward(model, ids, mask, labels, pixels, stage, seeds):
    """The forward's steps with boolean masks (data-dependent shapes): (lm_loss, recon_loss or None)."""
    cfg = model.cfg
    image_positions = ids == cfg.image_token_id
    embeds = model.llm.get_input_embeddings()(ids.masked_fill(image_positions, 0))
    visual = victor.project_visual_tokens(model.projector, model.encode_images(pixels), cfg.normalize_visual_tokens)
    embeds = embeds.masked_scatter(image_positions.unsqueeze(-1), visual.to(embeds.dtype))
    if stage == "1.5" and model.replaces_tokens:
        n_img, n_tok, dim = visual.shape
        replaced = victor.select_tokens_to_replace(n_img, n_tok, cfg.replace_ratio, seeds=seeds)
        selected = visual.detach()[replaced].view(n_img, -1, dim)
        pool_indices = victor.match_tokens_to_pool(selected, model.token_pool, cfg.matcher)
        replace_positions = image_positions.clone()
        replace_positions[image_positions] = replaced.flatten()
        rows = model.token_pool[pool_indices.flatten()].to(embeds.dtype)
        embeds = embeds.masked_scatter(replace_positions.unsqueeze(-1), rows)
    attn = model.mixed_mask(mask, labels) if stage == "1.5" and cfg.stage15_attention == "mixed" else mask
    hidden = model.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attn, use_cache=False).last_hidden_state
    recon = None
    if stage == "1.5" and model.reconstructs:
        chosen = victor.images_to_reconstruct(visual.shape[0], cfg.recon_image_ratio, seeds)
        at_images = hidden[image_positions].view(visual.shape)[chosen]
        loss, _, _ = victor.reconstruct_visual_tokens(model.recon_head, at_images, visual[chosen],
                                                      cfg.recon_target_offset, cfg.recon_beta)
        recon = cfg.recon_weight * loss
    targets = labels[:, 1:]
    where = targets != IGNORE_INDEX
    lm = F.cross_entropy(model.llm.get_output_embeddings()(hidden[:, :-1][where]).float(), targets[where])
    return lm, recon


def grads(model):
    g = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


@pytest.mark.parametrize("variant,stage,left", [("victor", "1.5", False), ("victor", "1.5", True),
                                                ("croc", "1.5", False), ("vdep", "1.5", False),
                                                ("victor", "2", True)])
def test_forward_with_layout_equals_boolean_masks_bitwise(variant, stage, left):
    torch.manual_seed(0)
    model = tiny_model(**victor.VARIANTS[variant])
    model.set_trainable(stage)
    ids, mask, labels, pixels = mixed_batch(model, left=left)
    seeds = [11, 12, 13]
    lm_ref, recon_ref = reference_forward(model, ids, mask, labels, pixels, stage, seeds)
    (lm_ref + (recon_ref if recon_ref is not None else 0)).backward()
    ref_grads = grads(model)
    for layout in (None, batch_layout(ids, labels)):  # derived in the forward, or given (the collator's)
        out = model(ids, mask, labels=labels, pixel_values=pixels, stage=stage, selection_seeds=seeds, layout=layout)
        assert torch.equal(out.lm_loss, lm_ref)
        assert (out.recon_loss is None) == (recon_ref is None)
        if recon_ref is not None:
            assert torch.equal(out.recon_loss, recon_ref)
        out.loss.backward()
        got = grads(model)
        assert got.keys() == ref_grads.keys() and len(got) > 0
        for name, g in got.items():
            assert torch.equal(g, ref_grads[name]), name
    assert out.num_label_tokens == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_layout_counts_and_refusals():
    model = tiny_model()
    ids, mask, labels, pixels = mixed_batch(model)
    layout = batch_layout(ids, labels)
    assert layout["image_index"].tolist() == (ids.flatten() == IMAGE_TOKEN_ID).nonzero().flatten().tolist()
    assert len(layout["image_index"]) == 3 * model.num_image_tokens
    assert len(layout["label_index"]) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    with pytest.raises(ValueError, match="image tokens"):  # 2 images' slots, 3 images given
        model(ids, mask, labels=labels, pixel_values=torch.cat([pixels, pixels[:1]]), stage="2")


def test_collator_carries_the_layout(shapes_tokenizer):
    samples = [{"id": str(i), "index": i, "input_ids": torch.tensor(s), "labels": torch.tensor(lab),
                "pixel_values": torch.zeros(1, 3, 32, 32) if IMAGE_TOKEN_ID in s else None}
               for i, (s, lab) in enumerate([([1, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 7, 8], [-100, -100, -100, 7, 8]),
                                             ([1, 9, 10], [-100, 9, 10])])]
    batch = D.Collator(shapes_tokenizer.pad_token_id)(samples)
    assert batch["layout"]["image_index"].tolist() == [1, 2]
    # the positions that predict a label (width 5): row 0's 7, 8 from 2, 3; row 1's 9, 10 from 5 + 0, 5 + 1
    assert batch["layout"]["label_index"].tolist() == [2, 3, 5, 6]
