"""
ViCToR: Visual Comprehension via Token Reconstruction (arXiv 2410.14332), in one file.

A LLaVA-style model (vision tower -> projector -> causal LLM) plus the two pieces
ViCToR adds for its "visual comprehension" stage (stage 1.5):

  * a learnable visual token pool (pool_size x llm_dim), whose rows replace 75 % of
    the visual tokens, chosen by Hungarian matching, and
  * a reconstruction head that makes the LLM reconstruct the original visual tokens.

Read top to bottom: the config, then each step of the stage-1.5 forward pass
(the README's step table) as one small function, then the model that composes them,
then checkpoint I/O. Training lives in train.py, data in data.py.

    from victor import VictorConfig, VictorModel
    model = VictorModel(VictorConfig(vision_model="openai/clip-vit-large-patch14-336",
                                     llm="lmsys/vicuna-7b-v1.5"))
    out = model(input_ids, attention_mask, labels=labels, pixel_values=pixels, stage="1.5")
    out.loss.backward()
"""
from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

IGNORE_INDEX = -100  # label value that the LM loss skips
IMAGE_TOKEN_ID = -200  # LLaVA's placeholder id: never looked up in the vocabulary
STAGES = ("1", "1.5", "2")


# -----------------------------------------------------------------------------
# Config: every knob of the method, JSON-serialisable


@dataclass
class VictorConfig:
    # base models: a Hugging Face name or local path, or a config dict (random init, tests/demo)
    vision_model: str = ""
    vision_config: dict | None = None
    llm: str = ""
    llm_config: dict | None = None
    # visual features: second-to-last layer; "auto" drops CLIP's CLS token and keeps SigLIP's all
    vision_feature_layer: int = -2
    vision_feature_select: str = "auto"  # auto | patch (drop CLS) | full (keep all)
    vision_feature_downsample: int = 1  # k>1 average-pools k x k patches into one token (demo)
    projector_type: str = "mlp2x_gelu"  # mlp2x_gelu | linear
    normalize_visual_tokens: bool = True  # the public code L2-normalises every projected token
    # stage 1.5: ViCToR's values; the relatives (README, "The family") are other settings of these fields
    pool_size: int = 2048
    replace_ratio: float = 0.75  # replace N - N//4 tokens, as the public code's "keep N // 4"; 0: no pool
    matcher: str = "hungarian"  # hungarian (exact, on a reduced problem) | hungarian_plain (exact, scipy on the whole
    # problem) | nearest (Croc: each token its nearest row, rows may repeat)
    recon_weight: float = 10.0  # 0: no reconstruction (replacement only, or captions alone)
    recon_beta: float = 0.01
    recon_target_offset: int = 0  # hidden state at image position i reconstructs visual token i + offset
    recon_image_ratio: float = 1.0  # share of images whose positions are reconstructed (VDEP's hybrid: 0.5)
    stage15_attention: str = "causal"  # causal | mixed (Croc: bidirectional before the first supervised token)
    # misc
    image_token_id: int = IMAGE_TOKEN_ID
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when installed, else sdpa
    projector_path: str = ""  # optional: LLaVA's mm_projector.bin to start from

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VictorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VictorConfig keys: {unknown}")
        return cls(**d)

    def validate(self):
        """Refuse a bad config before any heavy work (model loading, data reading)."""
        if not (self.vision_model or self.vision_config):
            raise ValueError("VictorConfig: give vision_model (name/path) or vision_config (dict)")
        if not (self.llm or self.llm_config):
            raise ValueError("VictorConfig: give llm (name/path) or llm_config (dict)")
        if self.projector_type not in ("mlp2x_gelu", "linear"):
            raise ValueError(f"projector_type must be 'mlp2x_gelu' or 'linear', got {self.projector_type!r}")
        if self.vision_feature_select not in ("auto", "patch", "full"):
            raise ValueError(f"vision_feature_select must be auto|patch|full, got {self.vision_feature_select!r}")
        if self.matcher not in MATCHERS:
            raise ValueError(f"matcher must be one of {sorted(MATCHERS)}, got {self.matcher!r}")
        if not 0.0 <= self.replace_ratio < 1.0:
            raise ValueError(f"replace_ratio must be in [0, 1), got {self.replace_ratio}")
        if self.recon_weight < 0:
            raise ValueError(f"recon_weight must be >= 0, got {self.recon_weight}")
        if self.recon_target_offset not in (0, 1):
            raise ValueError(f"recon_target_offset must be 0 (own token) or 1 (next token), "
                             f"got {self.recon_target_offset}")
        if not 0.0 < self.recon_image_ratio <= 1.0:
            raise ValueError(f"recon_image_ratio must be in (0, 1], got {self.recon_image_ratio}")
        if self.stage15_attention not in ("causal", "mixed"):
            raise ValueError(f"stage15_attention must be 'causal' or 'mixed', got {self.stage15_attention!r}")
        if self.vision_feature_downsample < 1:
            raise ValueError("vision_feature_downsample must be >= 1")
        if self.image_token_id >= 0:
            raise ValueError("image_token_id must be negative (a placeholder outside the vocabulary)")


def num_replaced(num_tokens: int, replace_ratio: float) -> int:
    """How many of N visual tokens stage 1.5 replaces: N - floor(N * (1 - ratio)); 432 of 576."""
    keep = math.floor(round(num_tokens * (1.0 - replace_ratio), 6))
    return num_tokens - keep


# -----------------------------------------------------------------------------
# The stage-1.5 forward pass, one function per step of the README's step table


def build_projector(kind: str, vision_dim: int, llm_dim: int) -> nn.Module:
    """LLaVA's projector: mlp2x_gelu = Linear, GELU, Linear (keys .0 and .2 as in LLaVA)."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(vision_dim, llm_dim))
    return nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))


def project_visual_tokens(projector: nn.Module, features: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Step 1: v = normalize(projector(vision_features)), [images, N, llm_dim]."""
    v = projector(features)
    return F.normalize(v, dim=-1) if normalize else v


def select_tokens_to_replace(num_images: int, num_tokens: int, replace_ratio: float, device=None,
                             generator: torch.Generator | None = None, seeds=None) -> torch.Tensor:
    """Step 2: choose uniformly at random which tokens to replace; bool [images, N].

    seeds (optional, one int per image) makes each image's choice a function of its seed alone,
    so one process or many, and a resumed run, replace the same tokens of the same image.
    """
    r = num_replaced(num_tokens, replace_ratio)
    if seeds is None:
        scores = torch.rand(num_images, num_tokens, device=device, generator=generator)
    else:
        if len(seeds) != num_images:
            raise ValueError(f"{len(seeds)} selection seeds for {num_images} images")
        scores = torch.stack([torch.rand(num_tokens, generator=torch.Generator().manual_seed(int(s)))
                              for s in seeds]).to(device)
    chosen = scores.topk(r, dim=1).indices  # a uniformly random r-subset per image
    return torch.zeros(num_images, num_tokens, dtype=torch.bool, device=device).scatter_(1, chosen, True)


def solve_assignment_plain(cost: np.ndarray) -> np.ndarray:
    """The assignment problem as the paper states it: cost [R, P] -> a distinct column per row, minimum total."""
    return linear_sum_assignment(cost)[1]


def solve_assignment_reduced(cost: np.ndarray) -> np.ndarray:
    """The same optimum as solve_assignment_plain, found on a smaller or better-conditioned problem
    where the rows compete for the same columns, and scipy's own run where they hardly do.

    (0) Each row's cheapest column: if no two rows share one, that is the optimum. If most rows have
        a cheapest column of their own (a pool near the tokens), scipy's augmenting paths are
        short already, and it runs on the plain problem. Past 64 rows the check reads a sample of
        64 rows (the two regimes are far apart: all rows share a few columns, or most have their own),
        so that it costs under 1 % of scipy's time.
    (a) Only each row's R cheapest columns matter: were row i assigned a worse column, one of
        its R cheapest would be free (the other R-1 rows hold at most R-1 columns), and moving
        there costs no more. Those R columns all cost at most u_i, row i's worst cost over any
        R fixed columns, so the optimum lies within C = {j : cost[i, j] <= u_i for some i}.
    (b) With |C| - R zero-cost dummy rows the problem is square, every column is used exactly
        once, and subtracting a constant from a column shifts every solution's cost equally.
        Subtracting each column's minimum removes the pool-row-norm term that, with an N(0, 1)
        pool, makes all tokens want the same rows; scipy's augmenting paths become short.
    (b) pays off when C is barely larger than R (a fresh pool: all tokens want the same rows); with
    a larger C the dummy rows would compete among themselves. Every branch is exact; the choice is
    speed only.
    """
    r = cost.shape[0]
    if r == 0:
        return np.zeros(0, dtype=np.int64)
    step = -(-r // 64)
    cheapest = cost[::step].argmin(axis=1)  # (0) every row's cheapest column, or every step-th row's
    distinct = len(np.unique(cheapest))
    if step == 1 and distinct == r:
        return cheapest
    if distinct > len(cheapest) // 2:
        return linear_sum_assignment(cost)[1]
    fixed = np.argpartition(cost.mean(axis=0), r - 1)[:r]  # (a) any R columns give an upper bound
    bound = np.take(cost, fixed, axis=1).max(axis=1, keepdims=True)
    cand = np.flatnonzero((cost <= bound).any(axis=0))
    sub = np.take(cost, cand, axis=1).astype(np.float64)
    if len(cand) > 1.3 * r:
        return cand[linear_sum_assignment(sub)[1]]
    col_min = sub.min(axis=0)  # (b)
    square = np.vstack([sub - col_min, np.broadcast_to(-col_min, (len(cand) - r, len(cand)))])
    return cand[linear_sum_assignment(square)[1][:r]]


@torch.no_grad()
def hungarian_match(tokens: torch.Tensor, token_pool: torch.Tensor, solver=solve_assignment_reduced) -> torch.Tensor:
    """Step 3: give each selected token a distinct pool row, minimising the total Euclidean distance.

    tokens [images, R, D], token_pool [P, D] -> pool row indices [images, R], one-to-one per image.
    """
    n, r, d = tokens.shape
    cost = torch.cdist(tokens.reshape(n * r, d).float(), token_pool.float())  # one GEMM-based distance, float32
    cost = cost.view(n, r, token_pool.shape[0]).cpu().numpy()  # [images, R, P]: one device->host copy per batch
    workers = max(1, min(len(cost), torch.get_num_threads()))
    with ThreadPoolExecutor(workers) as ex:  # one problem per image, solved in parallel (scipy frees the GIL)
        cols = list(ex.map(solver, cost))
    return torch.from_numpy(np.stack(cols)).to(tokens.device)


@torch.no_grad()
def nearest_match(tokens: torch.Tensor, token_pool: torch.Tensor) -> torch.Tensor:
    """Step 3 as Croc does it: each selected token takes its nearest pool row (rows may repeat).

    tokens [images, R, D], token_pool [P, D] -> pool row indices [images, R]; no assignment problem.
    """
    n, r, d = tokens.shape
    return torch.cdist(tokens.reshape(n * r, d).float(), token_pool.float()).argmin(dim=1).view(n, r)


ASSIGNMENT_SOLVERS = {"hungarian": solve_assignment_reduced, "hungarian_plain": solve_assignment_plain}  # both exact
MATCHERS = (*ASSIGNMENT_SOLVERS, "nearest")


def match_tokens_to_pool(tokens: torch.Tensor, token_pool: torch.Tensor, matcher: str) -> torch.Tensor:
    """Step 3 by the configured matcher: one-to-one Hungarian (ViCToR) or nearest row (Croc)."""
    if matcher == "nearest":
        return nearest_match(tokens, token_pool)
    return hungarian_match(tokens, token_pool, ASSIGNMENT_SOLVERS[matcher])


def replace_with_pool_rows(embeds: torch.Tensor, replace_positions: torch.Tensor,
                           token_pool: torch.Tensor, pool_indices: torch.Tensor) -> torch.Tensor:
    """Step 4: overwrite the replaced positions of the LLM input with their matched pool rows.

    replace_positions: bool [batch, seq] (row-major order matches pool_indices.flatten()).
    Gradient flows into the pool rows that were used.
    """
    rows = token_pool[pool_indices.flatten()].to(embeds.dtype)
    return embeds.masked_scatter(replace_positions.unsqueeze(-1), rows)


def mixed_attention_mask(attention_mask: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype | None = None
                         ) -> torch.Tensor:
    """Step 5 as Croc does it in stage 1.5: the positions before a sample's first supervised token
    (system, image, prompt) attend to each other in both directions; from that token on attention
    is causal; padding is never attended. -> [batch, 1, seq, seq], True (or 0.0 with dtype) = attend.

    The last prefix position predicts the first supervised token and sees only the prefix, so no
    answer token leaks backwards.
    """
    batch, seq = labels.shape
    pos = torch.arange(seq, device=labels.device)
    supervised = labels != IGNORE_INDEX
    first = torch.where(supervised.any(dim=1), supervised.int().argmax(dim=1), seq)  # [batch]
    in_prefix = pos[None, :] < first[:, None]  # [batch, seq]
    allowed = (pos[None, None, :] <= pos[None, :, None]) | (in_prefix[:, :, None] & in_prefix[:, None, :])
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    # a padded query attends itself: no row without any position to attend
    allowed = allowed | torch.eye(seq, dtype=torch.bool, device=labels.device)
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=labels.device).masked_fill(~allowed, torch.finfo(dtype).min)


def images_to_reconstruct(num_images: int, ratio: float, seeds=None, generator: torch.Generator | None = None,
                          device=None) -> torch.Tensor:
    """Which images' positions step 6 supervises, bool [images]: all of them (ViCToR), or a random
    share (VDEP's hybrid batches: the others are ordinary text-supervised samples). With seeds, each
    image's draw is a function of its seed alone, as in step 2."""
    if ratio >= 1.0:
        return torch.ones(num_images, dtype=torch.bool, device=device)
    if seeds is None:
        draws = torch.rand(num_images, generator=generator, device=device)
    else:  # numpy's SeedSequence([seed, 1]): a stream independent of step 2's torch generator
        if len(seeds) != num_images:
            raise ValueError(f"{len(seeds)} selection seeds for {num_images} images")
        draws = torch.tensor([np.random.default_rng([int(s), 1]).random() for s in seeds])
    return (draws < ratio).to(device)


def reconstruction_loss(predicted: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Step 6: SmoothL1 between the head's prediction and the (detached) visual token, mean."""
    return F.smooth_l1_loss(predicted.float(), target.detach().float(), beta=beta)


def lm_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> tuple[torch.Tensor, int]:
    """Step 7: next-token cross-entropy, with logits computed only where a label exists.

    Returns (mean loss, number of label tokens). Image and prompt positions never reach
    the vocabulary projection, which saves a [batch, seq, vocab] tensor.
    """
    targets = labels[:, 1:]
    where = targets != IGNORE_INDEX
    n = int(where.sum())
    if n == 0:  # nothing to predict: a zero that keeps the graph (and lm_head) connected
        return lm_head(hidden[:, -1]).float().sum() * 0.0, 0
    logits = lm_head(hidden[:, :-1][where])
    return F.cross_entropy(logits.float(), targets[where]), n


# -----------------------------------------------------------------------------
# The model


@dataclass
class VictorOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    recon_loss: torch.Tensor | None = None
    num_label_tokens: int = 0
    num_recon_tokens: int = 0
    replaced_mask: torch.Tensor | None = None  # bool [images, N]: which visual tokens were replaced
    pool_indices: torch.Tensor | None = None  # long [images, R]: the pool row each one got
    token_errors: torch.Tensor | None = None  # [images, N]: step 6's error per token (return_token_errors)


def default_device(name: str | None = None) -> torch.device:
    """The device asked for, else CUDA when there is one, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def default_attn_implementation() -> str:
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def _vision_class(model_type: str):
    from transformers import CLIPVisionModel, SiglipVisionModel
    if model_type.startswith("siglip"):
        return SiglipVisionModel
    if model_type.startswith("clip"):
        return CLIPVisionModel
    raise ValueError(f"unsupported vision model type {model_type!r} (CLIP or SigLIP)")


def build_base_models(cfg: VictorConfig, load_weights: bool = True):
    """The two Hugging Face models: from a name/path (pretrained) or from a config dict (random)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    attn = cfg.attn_implementation if cfg.attn_implementation != "auto" else default_attn_implementation()
    if cfg.vision_model and (load_weights or cfg.vision_config is None):
        vconf = AutoConfig.from_pretrained(cfg.vision_model)
        vconf = getattr(vconf, "vision_config", vconf)  # a full CLIP/SigLIP checkpoint: take its tower
        vision = _vision_class(vconf.model_type).from_pretrained(  # fp32 master weights
            cfg.vision_model, config=vconf, attn_implementation="sdpa", dtype=torch.float32)
    else:
        vconf = AutoConfig.for_model(**cfg.vision_config)
        vision = _vision_class(vconf.model_type)._from_config(vconf, attn_implementation="sdpa")
    if cfg.llm and (load_weights or cfg.llm_config is None):
        llm = AutoModelForCausalLM.from_pretrained(cfg.llm, attn_implementation=attn, dtype=torch.float32)
    else:
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg.llm_config), attn_implementation=attn)
    return vision, llm


class VictorModel(nn.Module):
    """Vision tower + projector + causal LLM, with ViCToR's token pool and reconstruction head."""

    def __init__(self, cfg: VictorConfig, load_weights: bool = True):
        super().__init__()
        cfg.validate()
        self.cfg = cfg = VictorConfig.from_dict(copy.deepcopy(cfg.to_dict()))  # the caller's config stays as it was
        self.vision_tower, self.llm = build_base_models(cfg, load_weights)
        # record the resolved configs, so a saved full checkpoint can be rebuilt without the hub
        cfg.vision_config = self.vision_tower.config.to_dict()
        cfg.llm_config = self.llm.config.to_dict()
        vconf = self.vision_tower.config
        self.drop_cls = (cfg.vision_feature_select == "patch" or
                         (cfg.vision_feature_select == "auto" and vconf.model_type.startswith("clip")))
        grid = vconf.image_size // vconf.patch_size
        if grid % cfg.vision_feature_downsample:
            raise ValueError(f"patch grid {grid} is not divisible by vision_feature_downsample "
                             f"{cfg.vision_feature_downsample}")
        # CLIP puts a CLS token before the patches; "patch" drops the first token (as llava-hf's "default")
        num_features = grid ** 2 + int(vconf.model_type.startswith("clip")) - int(self.drop_cls)
        if cfg.vision_feature_downsample > 1 and num_features != grid ** 2:
            raise ValueError(f"vision_feature_downsample={cfg.vision_feature_downsample} pools the patch grid: it "
                             f"needs exactly the {grid ** 2} patch tokens, but vision_feature_select="
                             f"{cfg.vision_feature_select!r} gives {num_features}")
        self.grid = grid // cfg.vision_feature_downsample
        self.num_image_tokens = self.grid ** 2 if cfg.vision_feature_downsample > 1 else num_features  # N
        llm_dim = self.llm.config.get_text_config().hidden_size
        r = num_replaced(self.num_image_tokens, cfg.replace_ratio)
        if cfg.pool_size < r and cfg.matcher in ASSIGNMENT_SOLVERS:
            raise ValueError(f"pool_size={cfg.pool_size} is smaller than the {r} visual tokens replaced per image "
                             f"(N={self.num_image_tokens}, replace_ratio={cfg.replace_ratio}): one-to-one "
                             f"matching needs pool_size >= {r}")
        self.projector = build_projector(cfg.projector_type, vconf.hidden_size, llm_dim)
        self.token_pool = nn.Parameter(torch.randn(cfg.pool_size, llm_dim))  # N(0, 1) as published
        self.recon_head = nn.Linear(llm_dim, llm_dim)
        if cfg.projector_path:
            load_llava_projector(self, cfg.projector_path)

    @property
    def replaces_tokens(self) -> bool:
        """Stage 1.5 replaces visual tokens by pool rows (steps 2-4): ViCToR and Croc, not VDEP or captions."""
        return num_replaced(self.num_image_tokens, self.cfg.replace_ratio) > 0

    @property
    def reconstructs(self) -> bool:
        """Stage 1.5 has a reconstruction loss (step 6)."""
        return self.cfg.recon_weight > 0

    def param_groups(self, stage: str, lr: float, vision_lr: float = 0.0, pool_lr: float = 0.0,
                     weight_decay: float = 0.0) -> list[dict]:
        """What each stage trains (the README's stage table), as optimizer groups with their learning
        rates; everything else is frozen. vision_lr 0 keeps the tower frozen. The pool and the head
        are trained only where this configuration uses them."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.requires_grad_(False)
        groups = [("projector", list(self.projector.parameters()), lr)]
        if stage in ("1.5", "2"):
            groups.append(("llm", list(self.llm.parameters()), lr))
            if vision_lr > 0:
                groups.append(("vision_tower", self.vision_parameters_in_use(), vision_lr))
        if stage == "1.5" and self.replaces_tokens:
            groups.append(("token_pool", [self.token_pool], pool_lr))
        if stage == "1.5" and self.reconstructs:
            groups.append(("recon_head", list(self.recon_head.parameters()), lr))
        for _, params, _ in groups:
            for p in params:
                p.requires_grad_(True)
        return [{"name": name, "params": params, "lr": group_lr, "weight_decay": weight_decay}
                for name, params, group_lr in groups]

    def num_reconstruction_targets(self, num_images: int, selection_seeds=None) -> int:
        """How many visual tokens step 6 reconstructs for these images (the loss is normalised by the
        global count). Needs the same selection_seeds as forward."""
        if not self.reconstructs or num_images == 0:
            return 0
        chosen = images_to_reconstruct(num_images, self.cfg.recon_image_ratio, selection_seeds)
        return int(chosen.sum()) * (self.num_image_tokens - self.cfg.recon_target_offset)

    def vision_parameters_in_use(self) -> list[nn.Parameter]:
        """The vision tower's parameters that reach the chosen feature layer. The layers after it (and
        the final norm / pooling head) never get a gradient, so they are not trained."""
        tower, layers = self.vision_tower, self.vision_tower.encoder.layers
        k = self.cfg.vision_feature_layer
        used = k if k >= 0 else len(layers) + 1 + k  # hidden_states[0] is the embedding output
        unused = [*layers[used:], getattr(tower, "post_layernorm", None), getattr(tower, "head", None)]
        skip = {id(p) for m in unused if m is not None for p in m.parameters()}
        return [p for p in tower.parameters() if id(p) not in skip]

    # -- the pieces of the forward pass --

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision features from the chosen layer: [images, N, vision_dim]."""
        out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.cfg.vision_feature_layer]
        if self.drop_cls:
            feats = feats[:, 1:]
        k = self.cfg.vision_feature_downsample
        if k > 1:  # average-pool k x k patches: fewer tokens for small demos
            b, n, d = feats.shape
            g = int(math.isqrt(n))
            feats = F.avg_pool2d(feats.transpose(1, 2).reshape(b, d, g, g), k)
            feats = feats.flatten(2).transpose(1, 2)
        return feats

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None):
        """Text embeddings with the projected visual tokens scattered into the image positions."""
        image_positions = input_ids == self.cfg.image_token_id
        embed = self.llm.get_input_embeddings()
        embeds = embed(input_ids.masked_fill(image_positions, 0))  # placeholder ids are not in the vocab
        n_slots = int(image_positions.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image tokens but no pixel_values were given")
            return embeds, image_positions, None
        visual = project_visual_tokens(self.projector, self.encode_images(pixel_values),
                                       self.cfg.normalize_visual_tokens)  # step 1 (every stage)
        if n_slots != visual.shape[0] * visual.shape[1]:
            raise ValueError(f"input_ids hold {n_slots} image tokens, but {visual.shape[0]} images x "
                             f"{visual.shape[1]} tokens were encoded")
        embeds = embeds.masked_scatter(image_positions.unsqueeze(-1), visual.to(embeds.dtype))
        return embeds, image_positions, visual

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, stage: str = "2",
                generator: torch.Generator | None = None, selection_seeds=None,
                return_token_errors: bool = False, reconstruct_every_image: bool = False) -> VictorOutput:
        """One training forward, the steps in the paper's order. stage "1.5" adds the configured
        replacement (2-4) and reconstruction (6); "1" and "2" do neither. generator / selection_seeds
        (one int per image) drive stage 1.5's random draws. return_token_errors: step 6's error per
        token as well; reconstruct_every_image: step 6 on every image whatever recon_image_ratio (both
        for pictures of a forward)."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        embeds, image_positions, visual = self.embed_inputs(input_ids, pixel_values)  # step 1
        every_part = self.training and self.same_parts_every_step
        if every_part and visual is None:
            embeds = embeds + self.vision_side_times_zero()
        out = VictorOutput(loss=None, lm_loss=None)
        stage15 = stage == "1.5" and visual is not None
        if stage15 and self.replaces_tokens:
            n_img, n_tok, dim = visual.shape
            replaced = select_tokens_to_replace(n_img, n_tok, self.cfg.replace_ratio, visual.device,
                                                generator, selection_seeds)  # step 2
            selected = visual.detach()[replaced].view(n_img, -1, dim)
            pool_indices = match_tokens_to_pool(selected, self.token_pool, self.cfg.matcher)  # step 3
            replace_positions = image_positions.clone()
            replace_positions[image_positions] = replaced.flatten()
            embeds = replace_with_pool_rows(embeds, replace_positions, self.token_pool, pool_indices)  # step 4
            out.replaced_mask, out.pool_indices = replaced, pool_indices
        mask = attention_mask
        if stage == "1.5" and self.cfg.stage15_attention == "mixed" and labels is not None:
            mask = self.mixed_mask(attention_mask, labels)
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask,
                                        use_cache=False).last_hidden_state  # step 5
        if stage15 and self.reconstructs:  # step 6
            ratio = 1.0 if reconstruct_every_image else self.cfg.recon_image_ratio
            chosen = images_to_reconstruct(visual.shape[0], ratio, selection_seeds, generator, visual.device)
            k = self.cfg.recon_target_offset  # 0: position i -> token i; 1: position i -> token i + 1
            at_images = hidden[image_positions].view(visual.shape)[chosen]
            predicted = self.recon_head(at_images[:, :visual.shape[1] - k])
            target = visual[chosen][:, k:]
            if target.numel():
                out.recon_loss = self.cfg.recon_weight * reconstruction_loss(predicted, target, self.cfg.recon_beta)
                out.num_recon_tokens = target.shape[0] * target.shape[1]
                if return_token_errors:  # per-token SmoothL1, [chosen images, N - k], e.g. for pictures
                    out.token_errors = F.smooth_l1_loss(predicted.float(), target.detach().float(),
                                                        beta=self.cfg.recon_beta, reduction="none").mean(-1)
        out.lm_loss, out.num_label_tokens = (lm_loss(hidden, labels, self.llm.get_output_embeddings())
                                             if labels is not None else (hidden.sum() * 0.0, 0))  # step 7
        out.loss = out.lm_loss if out.recon_loss is None else out.lm_loss + out.recon_loss
        if every_part:
            out.loss = out.loss + self.unused_stage15_parts_times_zero(out)
        return out

    # -- training: every part in every step --
    # Under FSDP a layer's weights are gathered from every process when it runs, so a process that skips
    # a layer leaves the others waiting; under DDP every trained parameter needs a gradient in every
    # process. A batch that does not use a part (the vision side in a text-only batch, the pool where
    # nothing was replaced, the head where no image was reconstructed) runs it and adds it times zero.
    same_parts_every_step = False  # train.py sets it (for 1 process too, so that 1 and N update alike)

    def vision_side_times_zero(self) -> torch.Tensor:
        """Zero from the vision tower and projector run on one blank image, before the LLM runs (the
        order in which every process gathers the layers)."""
        embeddings = next(self.vision_tower.parameters())  # its dtype is the one the tower computes in
        size = self.vision_tower.config.image_size
        blank = torch.zeros(1, 3, size, size, device=embeddings.device, dtype=embeddings.dtype)
        visual = project_visual_tokens(self.projector, self.encode_images(blank), self.cfg.normalize_visual_tokens)
        return 0.0 * visual.sum()

    def unused_stage15_parts_times_zero(self, out: VictorOutput) -> torch.Tensor | float:
        """Zero from the trained stage-1.5 parts this batch did not use."""
        unused = []
        if self.token_pool.requires_grad and out.pool_indices is None:
            unused.append(self.token_pool)
        if self.recon_head.weight.requires_grad and out.recon_loss is None:
            unused.extend(self.recon_head.parameters())
        return 0.0 * sum(p.sum() for p in unused) if unused else 0.0

    def mixed_mask(self, attention_mask, labels) -> torch.Tensor:
        """Croc's stage-1.5 mask (mixed_attention_mask) in the form this LLM's attention takes."""
        impl = self.llm.config._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"stage15_attention='mixed' needs a 4-D attention mask, which {impl} cannot take: "
                             f"build the model with attn_implementation='sdpa' (or 'eager')")
        dtype = None if impl == "sdpa" else self.llm.get_input_embeddings().weight.dtype
        return mixed_attention_mask(attention_mask, labels, dtype)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id=None, pad_token_id=None) -> torch.Tensor:
        """Batched generation (left-padded input, KV cache); no replacement at inference.

        Returns only the new tokens, [batch, <= max_new_tokens].
        """
        embeds, _, _ = self.embed_inputs(input_ids, pixel_values)
        kwargs = dict(do_sample=do_sample)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True, **kwargs)


# -----------------------------------------------------------------------------
# Checkpoints: a directory with config.json, model.safetensors, tokenizer and image-processor files


def save_checkpoint(model: VictorModel, path: str, tokenizer=None, image_processor=None,
                    parts: str = "all", extra: dict | None = None, state_dict: dict | None = None):
    """Write a checkpoint directory. parts="projector" (stage 1) saves only the projector and
    refers to the base models by name/path; parts="all" saves the whole model.
    state_dict: the model's full state when the model itself holds only a shard (FSDP, gathered)."""
    from safetensors.torch import save_file
    if parts not in ("all", "projector"):
        raise ValueError(f"parts must be 'all' or 'projector', got {parts!r}")
    os.makedirs(path, exist_ok=True)
    meta = {"victor": model.cfg.to_dict(), "saved_parts": parts, **(extra or {})}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if state_dict is None:
        state_dict = model.state_dict()
    if parts == "projector":
        state_dict = {k: v for k, v in state_dict.items() if k.startswith("projector.")}
    # tied weights (e.g. embeddings = lm_head) are stored once, under their first name
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tied = {n for group in names.values() for n in group[1:]}
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k not in tied},
              os.path.join(path, "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if image_processor is not None:
        image_processor.save_pretrained(path)


@dataclass(frozen=True)
class Range:
    """A numeric setting's valid values, declared once beside the setting (train.TrainConfig's fields,
    eval.py's flags) and checked from the declaration: lo and hi (None: unbounded), each inclusive unless
    open. NaN is in no range."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


def out_of_range(values: dict, ranges: dict[str, Range]) -> str:
    """'--flag value: must be RANGE' for the first value outside its declared range ('' if none)."""
    for name, value in values.items():
        if name in ranges and value not in ranges[name]:
            return f"--{name.replace('_', '-')} {value!r}: must be {ranges[name]}"
    return ""


# fields that a checkpoint's weights fix: an override that changes one is refused
FIXED_BY_WEIGHTS = ("vision_model", "vision_config", "llm", "llm_config", "projector_type", "projector_path")


def config_with_overrides(cfg: VictorConfig, overrides: dict, projector_only: bool, source: str) -> VictorConfig:
    """cfg with overrides applied, each taking effect or refused with a message naming it. Settings of
    the method (matcher, replace_ratio, recon_*, attention, ...) take effect; the base models and the
    projector come from the checkpoint; pool_size can change only where no pool was saved (stage 1)."""
    unknown = sorted(set(overrides) - {f.name for f in fields(VictorConfig)})
    if unknown:
        raise ValueError(f"unknown model override(s) {unknown}: not VictorConfig fields")
    for key, value in overrides.items():
        if getattr(cfg, key) == value:
            continue
        if key in FIXED_BY_WEIGHTS:
            raise ValueError(f"model override {key}={value!r} cannot apply to {source}: its weights fix "
                             f"{key} ({getattr(cfg, key)!r})")
        if key == "pool_size" and not projector_only:
            raise ValueError(f"model override pool_size={value} cannot apply to {source}: its token pool has "
                             f"{cfg.pool_size} trained rows (only a projector-only stage-1 checkpoint gets a "
                             f"fresh pool)")
    new = VictorConfig.from_dict({**cfg.to_dict(), **overrides})
    new.validate()
    return new


def load_checkpoint(path: str, device="cpu", overrides: dict | None = None):
    """Load (model, tokenizer, image_processor) from a checkpoint directory in any format victor reads:
    its own (save_checkpoint), the original LLaVA code's (LLaVA-1.5, Croc, ViCToR's release) or
    transformers' LlavaForConditionalGeneration's (llava-hf). config.json says which (checkpoint_format);
    one reader per format turns the directory into victor's terms (SourceCheckpoint).
    overrides: VictorConfig fields to change (config_with_overrides says which may change)."""
    meta = read_config_json(path)
    fmt = checkpoint_format(meta, os.path.join(path, "config.json"))
    src = CHECKPOINT_READERS[fmt](path, meta)
    cfg = config_with_overrides(src.cfg, overrides or {}, not src.pool_saved, path)
    if src.why_normalize:  # a foreign format: say what it was read as, and the one setting that changes the math
        said = cfg.normalize_visual_tokens
        why = (src.why_normalize if said == src.cfg.normalize_visual_tokens else
               f"an override says so (the source's own rule gives {not said}: {src.why_normalize})")
        print(f"loaded {path} as {src.label}: normalize_visual_tokens={said} because {why}")
    for note in src.notes:
        print(f"note: {path}: {note}")
    model = VictorModel(cfg, load_weights=src.base_from_names)
    fill_model(model, src.weights, src.keeps, path)
    return model.to(device), src.tokenizer, src.image_processor


def load_llava_projector(model: VictorModel, path: str):
    """Import a projector saved by the original LLaVA code (mm_projector.bin, keys model.mm_projector.{0,2}.*)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    prefix = "model.mm_projector."
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        raise ValueError(f"{path}: no 'model.mm_projector.*' keys (found {sorted(state)[:4]}...)")
    if all("." not in k for k in picked):  # LLaVA's "linear" projector is a bare nn.Linear (no ".0.")
        picked = {f"0.{k}": v for k, v in picked.items()}
    try:
        model.projector.load_state_dict(picked)
    except RuntimeError as e:
        raise ValueError(f"{path}: projector does not fit this model ({model.cfg.projector_type}): {e}") from None


# -----------------------------------------------------------------------------
# Checkpoint formats users already have. Each reader turns a directory into a SourceCheckpoint:
# a VictorConfig, the weights under victor's names, the tokenizer and the image processor.


@dataclass
class SourceCheckpoint:
    cfg: VictorConfig
    weights: Weights  # victor's parameter names -> tensors
    tokenizer: object
    image_processor: object
    label: str = "victor"  # the format, as the load note names it
    why_normalize: str = ""  # foreign formats: why normalize_visual_tokens has its value
    notes: list = field(default_factory=list)  # printed when loading
    base_from_names: bool = False  # build the base models pretrained from cfg.vision_model / cfg.llm first
    pool_saved: bool = True  # the token pool holds trained rows, so pool_size cannot change
    keeps: tuple = ()  # name prefixes the weights may lack: those parts keep their built values


class Weights(Mapping):
    """Tensors by name, each read from its file only when asked for, so that filling a 7B model never
    holds a second copy of it."""

    def __init__(self, readers: dict):
        self._readers = readers  # name -> function returning the tensor

    def __getitem__(self, name):
        return self._readers[name]()

    def __contains__(self, name):  # without reading the tensor
        return name in self._readers

    def __iter__(self):
        return iter(self._readers)

    def __len__(self):
        return len(self._readers)

    def renamed(self, rename) -> tuple[Weights, list[str]]:
        """(the weights under rename(name), the names rename maps to None)."""
        kept, left_out = {}, []
        for name, read in self._readers.items():
            new = rename(name)
            if new is None:
                left_out.append(name)
            elif new in kept:
                raise ValueError(f"two weights map to {new!r} (the second is {name!r})")
            else:
                kept[new] = read
        return Weights(kept), left_out


def read_config_json(path: str) -> dict:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        with open(cfg_file) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, got {type(meta).__name__}")
    return meta


def checkpoint_format(meta: dict, where: str) -> str:
    """Which reader a config.json calls for (a key of CHECKPOINT_READERS)."""
    if "victor" in meta:
        return "victor"
    if "mm_vision_tower" in meta:  # LLaVA's code adds the mm_* fields to the LLM's own config
        return "llava"
    if meta.get("model_type") == "llava" and "text_config" in meta:
        return "llava_hf"
    raise ValueError(f"{where}: not a checkpoint victor can load: no 'victor' section (victor's own), no "
                     f"'mm_vision_tower' (the original LLaVA code's) and not model_type 'llava' with a "
                     f"text_config (transformers' LlavaForConditionalGeneration); model_type is "
                     f"{meta.get('model_type')!r}")


WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


def read_weight_files(path: str) -> Weights:
    """The tensors of a Hugging Face-style directory: safetensors or pytorch_model .bin files, one file
    or shards listed by an .index.json (WEIGHT_FILES, in that order of preference)."""
    name = next((n for n in WEIGHT_FILES if os.path.isfile(os.path.join(path, n))), None)
    if name is None:
        raise FileNotFoundError(f"{path}: no weights (none of {', '.join(WEIGHT_FILES)})")
    first = os.path.join(path, name)
    weight_map = None
    if name.endswith(".index.json"):
        try:
            with open(first) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{first}: not a weight index with a 'weight_map' ({e!r})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = [name]
    readers = {}
    for file in files:
        full = os.path.join(path, file)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"{first}: lists the shard {file}, which is not in {path}")
        readers.update(_tensor_readers(full))
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(readers))
        if absent:
            raise ValueError(f"{first}: {len(absent)} tensors it lists are not in their shards, e.g. {absent[:3]}")
    return Weights(readers)


def _tensor_readers(file: str) -> dict:
    if file.endswith(".safetensors"):
        from safetensors import safe_open
        try:
            handle = safe_open(file, "pt")  # memory-mapped: a tensor is read when asked for
            return {k: (lambda k=k: handle.get_tensor(k)) for k in handle.keys()}
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in torch's legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"{file}: not a readable weights file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: expected a dict of tensors")
    return {k: (lambda v=v: v) for k, v in state.items()}


def _tower_names_fitted(weights: Weights, own: dict) -> Weights:
    """transformers 4 keeps a CLIP/SigLIP tower's weights under 'vision_model.', transformers 5 does not:
    the checkpoint's tower names, fitted to this model's."""
    model_has = any(k.startswith("vision_tower.vision_model.") for k in own)

    def fit(name):
        if not name.startswith("vision_tower."):
            return name
        rest = name[len("vision_tower."):]
        if rest.startswith("vision_model.") and not model_has:
            rest = rest[len("vision_model."):]
        elif not rest.startswith("vision_model.") and model_has:
            rest = "vision_model." + rest
        return "vision_tower." + rest
    return weights.renamed(fit)[0]


def fill_model(model: VictorModel, weights: Weights, keeps: tuple, source: str):
    """Copy the weights into the model, tensor by tensor. Each must fit a model tensor (name and shape);
    each model tensor must be given, but for tied copies and names under `keeps`."""
    own = model.state_dict()
    weights = _tower_names_fitted(weights, own)
    unexpected = sorted(set(weights) - set(own))
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} weights fit no part of the model, e.g. {unexpected[:5]}")
    first_name = {}  # a tied parameter (e.g. lm_head = input embeddings) is one tensor under several names
    for name, p in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(p), name)
    alias_of = {name: first_name[id(p)] for name, p in model.named_parameters(remove_duplicate=False)
                if first_name[id(p)] != name}
    missing = sorted(k for k in own if k not in weights and not (k in alias_of and alias_of[k] in weights)
                     and not k.startswith(keeps))
    if missing:
        raise ValueError(f"{source}: {len(missing)} model weights are not in the checkpoint, e.g. {missing[:5]}")
    with torch.no_grad():
        for name in weights:
            tensor = weights[name]
            if tensor.shape != own[name].shape:
                raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model's is "
                                 f"{tuple(own[name].shape)}")
            if name in alias_of and alias_of[name] in weights and not torch.equal(tensor, weights[alias_of[name]]):
                raise ValueError(f"{source}: {name} and {alias_of[name]} are tied in the model's config but "
                                 f"differ in the checkpoint")
            own[name].copy_(tensor)


def _group_names(names: list[str]) -> str:
    """'model.cross_attention (8 tensors), transform_block (21 tensors)': weight names by module."""
    groups = {}
    for n in names:
        parts = n.split(".")
        key = ".".join(parts[:2] if parts[0] == "model" and len(parts) > 2 else parts[:1])
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"{k} ({v} tensor{'s' * (v > 1)})" for k, v in sorted(groups.items()))


def read_victor_checkpoint(path: str, meta: dict) -> SourceCheckpoint:
    """victor's own directory (save_checkpoint): all weights, or (stage 1) the projector only, the base
    models then coming pretrained from their names."""
    from transformers import AutoImageProcessor, AutoTokenizer
    cfg = VictorConfig.from_dict(meta["victor"])
    cfg.projector_path = ""  # the checkpoint's own projector wins
    projector_only = meta.get("saved_parts") == "projector"
    return SourceCheckpoint(cfg, read_weight_files(path), AutoTokenizer.from_pretrained(path),
                            AutoImageProcessor.from_pretrained(path), base_from_names=projector_only,
                            pool_saved=not projector_only,
                            keeps=("vision_tower.", "llm.", "token_pool", "recon_head.") if projector_only else ())


# LLaVA's code writes these into the LLM's config; what remains is the LLM's own config
LLAVA_CONFIG_FIELDS = ("mm_", "image_", "tune_mm", "freeze_mm", "unfreeze_mm", "use_mm_proj", "tokenizer_model_max",
                       "tokenizer_padding", "croc_", "victor_", "delay_load", "vision_tower", "add_faster_video",
                       "faster_token", "architectures", "_name_or_path")
LLAVA_LLMS = {"llama": "llama", "mistral": "mistral", "qwen": "qwen2"}  # in model_type / architectures -> LLM type


def _llava_name(key: str, linear_projector: bool) -> str | None:
    """A weight name of LLaVA's code (and Croc's, ViCToR's) -> victor's; None where victor has no such part."""
    if key.startswith("model.mm_projector."):
        rest = key[len("model.mm_projector."):]
        # LLaVA's linear projector is a bare nn.Linear: its keys have no ".0."
        return "projector." + ("0." + rest if linear_projector and "." not in rest else rest)
    if key.startswith("model.vision_tower.vision_tower."):  # LLaVA's CLIPVisionTower wraps the HF model
        return "vision_tower." + key[len("model.vision_tower.vision_tower."):]
    if key in ("model.token_pool", "model.mask_token"):  # ViCToR's pool, Croc's name for it
        return "token_pool"
    if key.startswith("img_head."):  # ViCToR's reconstruction head: Linear(hidden, hidden), as victor's
        return "recon_head." + key[len("img_head."):]
    if key.startswith("lm_head.") or key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
        return "llm." + key
    return None


def read_llava_checkpoint(path: str, meta: dict) -> SourceCheckpoint:
    """The original LLaVA code's directory: LLaVA-1.5 (llava / llava_llama), Croc (croc_llama), ViCToR's
    release (llava_qwen). config.json is the LLM's config plus LLaVA's mm_* fields; the vision tower
    comes from mm_vision_tower (a name or a local path), its weights replaced where the checkpoint has
    them (a trained tower); the tokenizer is the directory's, the image processor the tower's."""
    from transformers import AutoConfig, AutoImageProcessor
    where = os.path.join(path, "config.json")

    def refuse(key, why):
        raise ValueError(f"{where}: {key}={meta.get(key)!r}: {why}")
    kind = f"{meta.get('model_type', '')} {' '.join(meta.get('architectures') or [])}".lower()
    llm_type = next((t for k, t in LLAVA_LLMS.items() if k in kind), None)
    if llm_type is None:
        refuse("model_type", f"cannot tell the LLM type (victor reads {sorted(LLAVA_LLMS)}-based LLaVA checkpoints)")
    if meta.get("mm_use_im_start_end"):
        refuse("mm_use_im_start_end", "victor puts no <im_start>/<im_end> tokens around the image")
    if meta.get("mm_patch_merge_type", "flat") != "flat":
        refuse("mm_patch_merge_type", "victor gives the LLM one flat grid of tokens per image (no LLaVA-NeXT merge)")
    aspect = str(meta.get("image_aspect_ratio"))
    if aspect.startswith("anyres"):
        refuse("image_aspect_ratio", "victor encodes one square image, not LLaVA-NeXT's tiles")
    projector = meta.get("mm_projector_type", "linear")  # LLaVA's default
    if projector not in ("mlp2x_gelu", "linear"):
        refuse("mm_projector_type", "victor's projectors are mlp2x_gelu and linear")
    tower = meta["mm_vision_tower"]
    vconf = AutoConfig.from_pretrained(tower)
    vconf = getattr(vconf, "vision_config", vconf)
    if meta.get("mm_hidden_size", vconf.hidden_size) != vconf.hidden_size:
        refuse("mm_hidden_size", f"the vision tower {tower} has hidden size {vconf.hidden_size}")
    notes = []
    if vconf.model_type.startswith("siglip"):
        # LLaVA-NeXT's SigLipVisionTower (ViCToR's code) deletes the tower's last layer and gives every token
        # of the one before it, whatever mm_vision_select_layer says: layer -2 of the whole tower, all tokens
        layer, select = -2, "full"
        notes.append("SigLIP tower: features of its second-to-last layer, all tokens, as LLaVA-NeXT's "
                     "SigLipVisionTower gives them (mm_vision_select_layer / _feature do not apply)")
    else:
        if "mm_vision_select_layer" not in meta:
            refuse("mm_vision_select_layer", "missing: which tower layer feeds the projector")
        layer = meta["mm_vision_select_layer"]
        feature = meta.get("mm_vision_select_feature", "patch")
        select = {"patch": "patch", "cls_patch": "full"}.get(feature)
        if select is None:
            refuse("mm_vision_select_feature", "victor reads 'patch' (CLS dropped) and 'cls_patch' (kept)")
    if aspect != "pad":
        notes.append(f"image_aspect_ratio={meta.get('image_aspect_ratio')!r}: this model saw images resized and "
                     f"centre-cropped; victor pads every image to a square (LLaVA's 'pad'), so non-square images "
                     f"reach it differently than in training")
    raw = read_weight_files(path)
    # rotary-embedding frequencies that older transformers saved are recomputed from the config
    raw, _ = raw.renamed(lambda k: None if k.endswith("rotary_emb.inv_freq") else k)
    pool_key = next((k for k in ("model.token_pool", "model.mask_token") if k in raw), None)
    pool_size = VictorConfig.pool_size
    if pool_key:
        pool = raw[pool_key]
        if pool.dim() != 2 or pool.shape[1] != meta.get("hidden_size", pool.shape[1]):
            raise ValueError(f"{path}: {pool_key} has shape {tuple(pool.shape)}, expected [pool rows, hidden_size]")
        pool_size = pool.shape[0]
    model_type = meta.get("model_type", "")
    if model_type.startswith("croc") or pool_key == "model.mask_token":
        label, normalize, why = f"Croc ({model_type})", True, "Croc L2-normalises every projected visual token"
    elif pool_key:
        label, normalize, why = (f"ViCToR's release ({model_type})", True,
                                 "the checkpoint carries ViCToR's token pool, and ViCToR L2-normalises every "
                                 "projected visual token")
    else:
        label, normalize, why = (f"LLaVA ({model_type})", False,
                                 "LLaVA-1.5 gives the LLM the projector's output as it is")
    weights, skipped = raw.renamed(lambda k: _llava_name(k, projector == "linear"))
    if skipped:
        notes.append(f"skipped weights of parts victor does not have: {_group_names(skipped)}")
    n_tower = sum(k.startswith("vision_tower.") for k in weights)
    notes.append(f"vision tower from {tower}" + (f", {n_tower} of its tensors replaced by the checkpoint's "
                                                 f"(a trained tower)" if n_tower else ""))
    llm_config = {k: v for k, v in meta.items() if not k.startswith(LLAVA_CONFIG_FIELDS)}
    llm_config["model_type"] = llm_type
    cfg = VictorConfig(vision_model=tower, llm_config=llm_config, vision_feature_layer=layer,
                       vision_feature_select=select, projector_type=projector, normalize_visual_tokens=normalize,
                       pool_size=pool_size)
    keeps = ("vision_tower.",) + (() if pool_key else ("token_pool",)) + \
        (() if "recon_head.weight" in weights else ("recon_head.",))
    return SourceCheckpoint(cfg, weights, _tokenizer_of(path), AutoImageProcessor.from_pretrained(tower),
                            label=label, why_normalize=why, notes=notes, pool_saved=bool(pool_key), keeps=keeps)


def _tokenizer_of(path: str):
    """The directory's tokenizer. transformers would warn that config.json's model type (LLaVA's) is not a
    tokenizer's: true and harmless, tokenizer_config.json names the tokenizer."""
    from transformers import AutoTokenizer
    from transformers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(path)
    finally:
        logging.set_verbosity(level)


# transformers' LlavaForConditionalGeneration names: as saved on disk (also by transformers 5) and as in memory
LLAVA_HF_NAMES = (("language_model.model.", "llm.model."), ("model.language_model.", "llm.model."),
                  ("language_model.lm_head.", "llm.lm_head."), ("lm_head.", "llm.lm_head."),
                  ("model.vision_tower.", "vision_tower."), ("vision_tower.", "vision_tower."),
                  ("model.multi_modal_projector.linear_1.", "projector.0."),
                  ("multi_modal_projector.linear_1.", "projector.0."),
                  ("model.multi_modal_projector.linear_2.", "projector.2."),
                  ("multi_modal_projector.linear_2.", "projector.2."))


def _llava_hf_name(key: str) -> str | None:
    for old, new in LLAVA_HF_NAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def read_llava_hf_checkpoint(path: str, meta: dict) -> SourceCheckpoint:
    """A transformers LlavaForConditionalGeneration directory (llava-hf): vision_config, text_config,
    vision_feature_layer and _select_strategy, a Linear-act-Linear projector; the tokenizer and the
    image processor are the directory's."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaConfig
    where = os.path.join(path, "config.json")
    try:
        conf = LlavaConfig.from_pretrained(path)
    except Exception as e:  # transformers validates the fields itself
        raise ValueError(f"{where}: not a valid LlavaConfig: {e}") from None

    def refuse(key, why):
        raise ValueError(f"{where}: {key}={getattr(conf, key, None)!r}: {why}")
    if not isinstance(conf.vision_feature_layer, int):
        refuse("vision_feature_layer", "victor feeds the projector one layer's features, not several concatenated")
    select = {"default": "patch", "full": "full"}.get(conf.vision_feature_select_strategy)
    if select is None:
        refuse("vision_feature_select_strategy", "victor reads 'default' (first token dropped) and 'full'")
    if conf.projector_hidden_act != "gelu":
        refuse("projector_hidden_act", "victor's mlp2x_gelu projector has exact GELU between its two layers")
    if not getattr(conf, "multimodal_projector_bias", True):
        refuse("multimodal_projector_bias", "victor's projector layers have biases")
    cfg = VictorConfig(vision_config=conf.vision_config.to_dict(), llm_config=conf.text_config.to_dict(),
                       vision_feature_layer=conf.vision_feature_layer, vision_feature_select=select,
                       projector_type="mlp2x_gelu", normalize_visual_tokens=False)
    weights, skipped = read_weight_files(path).renamed(_llava_hf_name)
    image_processor = AutoImageProcessor.from_pretrained(path)
    notes = [f"skipped weights of parts victor does not have: {_group_names(skipped)}"] if skipped else []
    if not getattr(image_processor, "do_pad", False):
        notes.append("victor pads every image to a square with the mean colour (LLaVA-1.5's 'pad'); this "
                     "directory's image processor resizes and centre-crops, so non-square images reach the "
                     "model differently than in transformers")
    return SourceCheckpoint(cfg, weights, AutoTokenizer.from_pretrained(path), image_processor,
                            label="transformers' LlavaForConditionalGeneration (llava-hf)",
                            why_normalize="LlavaForConditionalGeneration gives the LLM the projector's output as it is",
                            notes=notes, pool_saved=False, keeps=("token_pool", "recon_head."))


CHECKPOINT_READERS = {"victor": read_victor_checkpoint, "llava": read_llava_checkpoint,
                      "llava_hf": read_llava_hf_checkpoint}


# -----------------------------------------------------------------------------
# Export: a transformers LlavaForConditionalGeneration directory, where that model computes what victor does


IMAGE_TOKEN = "<image>"


def export_llava_hf(model: VictorModel, tokenizer, image_processor, out_dir: str) -> str:
    """Write the model as a transformers LlavaForConditionalGeneration directory (weights, config, the
    tokenizer with an <image> token, a LlavaProcessor that pads images to a square as victor does), which
    transformers, vLLM and lmms-eval serve. Refused, with the reason, where that model would compute
    something else. Returns out_dir."""
    from transformers import AddedToken, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    cfg = model.cfg
    if cfg.normalize_visual_tokens:
        raise ValueError("export to llava-hf: this model L2-normalises its visual tokens (normalize_visual_tokens="
                         "True, as ViCToR and Croc do), and LlavaForConditionalGeneration has no such step: the "
                         "exported model would compute something else")
    if cfg.vision_feature_downsample > 1:
        raise ValueError(f"export to llava-hf: vision_feature_downsample={cfg.vision_feature_downsample} pools "
                         f"patches, and LlavaForConditionalGeneration has no such step")
    if cfg.projector_type != "mlp2x_gelu":
        raise ValueError(f"export to llava-hf: projector_type={cfg.projector_type!r}, but LlavaForConditional"
                         f"Generation's projector is always Linear-GELU-Linear (mlp2x_gelu)")
    tokenizer = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    state = {}
    for name, tensor in model.state_dict().items():
        hf = _victor_to_llava_hf_name(name)
        if hf is not None:
            state[hf] = tensor
    text_config = copy.deepcopy(model.llm.config)
    rows = state["model.language_model.embed_tokens.weight"].shape[0]
    grown = image_id >= rows
    if grown:  # the <image> token needs an embedding row; its logit row is zero and generation never picks it
        for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if key in state:
                state[key] = torch.cat([state[key], state[key].new_zeros(image_id + 1 - rows, state[key].shape[1])])
        text_config.vocab_size = image_id + 1
    clip = model.vision_tower.config.model_type.startswith("clip")
    strategy = "default" if model.drop_cls else "full"
    config = LlavaConfig(vision_config=copy.deepcopy(model.vision_tower.config), text_config=text_config,
                         image_token_index=image_id, projector_hidden_act="gelu",
                         vision_feature_layer=cfg.vision_feature_layer, vision_feature_select_strategy=strategy,
                         image_seq_length=model.num_image_tokens, multimodal_projector_bias=True,
                         tie_word_embeddings=text_config.tie_word_embeddings)
    with torch.device("meta"):  # no random initialisation: every weight comes from victor's
        llava = LlavaForConditionalGeneration(config)
    llava.load_state_dict(state, strict=True, assign=True)
    if text_config.tie_word_embeddings:
        llava.tie_weights()
    if grown:
        llava.generation_config.suppress_tokens = [image_id]
    llava.save_pretrained(out_dir)
    processor = LlavaProcessor(image_processor=_llava_image_processor(image_processor), tokenizer=tokenizer,
                               patch_size=model.vision_tower.config.patch_size, vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=1 if clip else 0, image_token=IMAGE_TOKEN)
    processor.save_pretrained(out_dir)
    return out_dir


def _victor_to_llava_hf_name(name: str) -> str | None:
    """victor's weight name -> LlavaForConditionalGeneration's (in memory); None for ViCToR's additions."""
    for prefix, new in (("vision_tower.", "model.vision_tower."),
                        ("projector.0.", "model.multi_modal_projector.linear_1."),
                        ("projector.2.", "model.multi_modal_projector.linear_2."),
                        ("llm.model.", "model.language_model."), ("llm.lm_head.", "lm_head.")):
        if name.startswith(prefix):
            return new + name[len(prefix):]
    return None


def _llava_image_processor(image_processor):
    """victor's preprocessing as one transformers processor: pad to a square with the mean colour (victor
    does that before its processor runs), then the same resize, crop and normalisation."""
    from transformers.models.llava import LlavaImageProcessor, LlavaImageProcessorPil
    cls = LlavaImageProcessorPil if type(image_processor).__name__.endswith("Pil") else LlavaImageProcessor
    keys = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb")
    settings = {k: v for k, v in image_processor.to_dict().items() if k in keys and v is not None}
    settings.setdefault("do_center_crop", False)  # SigLIP's processor resizes to a fixed size, crops nothing
    return cls(do_pad=True, **settings)
