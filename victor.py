"""
ViCToR: Visual Comprehension via Token Reconstruction (arXiv 2410.14332), in one file.

A LLaVA-style model (vision tower -> projector -> causal LLM) plus the two pieces
ViCToR adds for its "visual comprehension" stage (stage 1.5):

  * a learnable visual token pool (pool_size x llm_dim), whose rows replace 75 % of
    the visual tokens, chosen by Hungarian matching, and
  * a reconstruction head that makes the LLM reconstruct the original visual tokens.

Read top to bottom: the config and the family (its relatives as settings), then each step of the
stage-1.5 forward pass (the README's step table) as one small function, then the model that composes
them, then victor's own checkpoints. Training lives in train.py, data in data.py; the engineering a
reader may skip in files of its own (checkpoints.py: other formats; distributed.py: many processes).
"The public code" is the authors' release, github.com/deepglint/Victor, its llava/model/llava_arch.py.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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
    normalize_visual_tokens: bool = True  # L2-normalised, as encode_images in the public code's llava_arch.py
    # stage 1.5: ViCToR's values; the relatives (README, "The family") are other settings of these fields
    pool_size: int = 2048
    replace_ratio: float = 0.75  # replace N - N//4 tokens (llava_arch.py: num_unmask = N // 4); 0: no pool
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
# The family: ViCToR and its relatives as settings of the stage-1.5 fields (README, "The family";
# train.py --variant). A field set on its own (--model-overrides) wins over the preset.


VARIANTS = {
    # ViCToR: 75 % of the visual tokens replaced by Hungarian-matched pool rows, causal attention,
    # every image position reconstructs its own token
    "victor": dict(replace_ratio=0.75, matcher="hungarian", stage15_attention="causal", recon_weight=10.0,
                   recon_target_offset=0, recon_image_ratio=1.0),
    # Croc, ViCToR's first version: each replaced token takes its nearest pool row (rows may repeat),
    # and the prefix (system, image, prompt) attends bidirectionally in stage 1.5
    "croc": dict(replace_ratio=0.75, matcher="nearest", stage15_attention="mixed", recon_weight=10.0,
                 recon_target_offset=0, recon_image_ratio=1.0),
    # VDEP (arXiv 2502.09093): nothing replaced; the hidden state at image position i reconstructs the
    # projector's (current) output for token i + 1, on half the images; the other half are ordinary
    # text-supervised samples. Offset 1 because in a causal LLM with nothing replaced, position i's own
    # input reaches its hidden state through the residual stream, so reconstructing it tests little;
    # recon_target_offset=0 is the other reading. α = recon_weight, ViCToR's 10, so that the arms differ
    # only in what defines them (the paper tunes α).
    "vdep": dict(replace_ratio=0.0, stage15_attention="causal", recon_weight=10.0, recon_target_offset=1,
                 recon_image_ratio=0.5),
    # the control: stage 1.5 on the same captions with the LM loss alone (no pool, no reconstruction)
    "captions": dict(replace_ratio=0.0, stage15_attention="causal", recon_weight=0.0),
    # LLaVA-1.5: no stage 1.5 at all, and the projector's output fed to the LLM as it is (no L2
    # normalisation), so that it exports to llava-hf (eval.py --export-llava-hf)
    "llava": dict(normalize_visual_tokens=False),
}
# VictorConfig fields that only stage 1.5 reads: set for a run without stage 1.5, they get a note (train.py)
STAGE15_FIELDS = ("pool_size", "replace_ratio", "matcher", "recon_weight", "recon_beta", "recon_target_offset",
                  "recon_image_ratio", "stage15_attention")


# -----------------------------------------------------------------------------
# The stage-1.5 forward pass, one function per step of the README's step table. Shapes: B samples, T positions,
# I images, N visual tokens per image, R of them replaced, P pool rows, D the LLM's width.


def build_projector(kind: str, vision_dim: int, llm_dim: int) -> nn.Module:
    """LLaVA's projector: mlp2x_gelu = Linear, GELU, Linear (keys .0 and .2 as in LLaVA)."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(vision_dim, llm_dim))
    return nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))


def project_visual_tokens(projector: nn.Module, features: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Step 1: v = normalize(projector(vision_features)), [images, N, llm_dim]."""
    v = projector(features)  # (I, N, vision_dim) -> (I, N, D)
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
    chosen = scores.topk(r, dim=1).indices  # (I, R): a uniformly random R-subset per image
    return torch.zeros(num_images, num_tokens, dtype=torch.bool, device=device).scatter_(1, chosen, True)


def linear_sum_assignment(cost: np.ndarray):
    """scipy's exact assignment solver, imported when first used (half a second that a process never matching,
    a train.py --help or a stage-2 run, does not pay)."""
    from scipy.optimize import linear_sum_assignment as solve
    return solve(cost)


def solve_assignment_plain(cost: np.ndarray) -> np.ndarray:
    """The assignment problem as the paper states it: cost [R, P] -> a distinct column per row, minimum total."""
    return linear_sum_assignment(cost)[1]


def solve_assignment_reduced(cost: np.ndarray) -> np.ndarray:
    """The same optimum as solve_assignment_plain, found faster: (0) each row's cheapest column where no two
    rows share one, (a) only columns some row's R cheapest can be, (b) the column minima subtracted. Why each
    branch is exact: docs/matching.md."""
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
    cost = torch.cdist(tokens.reshape(n * r, d).float(), token_pool.float())  # (I*R, P): one GEMM, float32
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
    rows = token_pool[pool_indices.flatten()].to(embeds.dtype)  # (I*R, D), in the order of the True positions
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
    first = torch.where(supervised.any(dim=1), supervised.int().argmax(dim=1), seq)  # (B,)
    in_prefix = pos[None, :] < first[:, None]  # (B, T)
    allowed = (pos[None, None, :] <= pos[None, :, None]) | (in_prefix[:, :, None] & in_prefix[:, None, :])  # (B, T, T)
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
    every_part_hook = None  # training: runs the parts a batch leaves unused, times zero (distributed.py)

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
        self.token_pool = nn.Parameter(torch.randn(cfg.pool_size, llm_dim))  # N(0, 1), as llava_arch.py's
        self.recon_head = nn.Linear(llm_dim, llm_dim)
        if cfg.projector_path:  # stage 1 from LLaVA's mm_projector.bin (a foreign format: checkpoints.py)
            from engineering.checkpoints import load_llava_projector
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
        embeds, image_positions, visual = self.embed_inputs(input_ids, pixel_values)  # step 1: (B,T,D) (B,T) (I,N,D)
        hook = self.every_part_hook if self.training else None  # DDP / FSDP plumbing: distributed.py
        if hook:
            embeds = hook.before_llm(self, embeds, visual)
        out = VictorOutput(loss=None, lm_loss=None)
        stage15 = stage == "1.5" and visual is not None
        if stage15 and self.replaces_tokens:
            n_img, n_tok, dim = visual.shape
            replaced = select_tokens_to_replace(n_img, n_tok, self.cfg.replace_ratio, visual.device,
                                                generator, selection_seeds)  # step 2: (I, N) bool
            selected = visual.detach()[replaced].view(n_img, -1, dim)  # (I, R, D)
            pool_indices = match_tokens_to_pool(selected, self.token_pool, self.cfg.matcher)  # step 3: (I, R)
            replace_positions = image_positions.clone()
            replace_positions[image_positions] = replaced.flatten()  # (B, T): the replaced tokens' positions
            embeds = replace_with_pool_rows(embeds, replace_positions, self.token_pool, pool_indices)  # step 4
            out.replaced_mask, out.pool_indices = replaced, pool_indices
        mask = attention_mask
        if stage == "1.5" and self.cfg.stage15_attention == "mixed" and labels is not None:
            mask = self.mixed_mask(attention_mask, labels)
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask,
                                        use_cache=False).last_hidden_state  # step 5: (B, T, D)
        if stage15 and self.reconstructs:  # step 6
            ratio = 1.0 if reconstruct_every_image else self.cfg.recon_image_ratio
            chosen = images_to_reconstruct(visual.shape[0], ratio, selection_seeds, generator, visual.device)  # (I,)
            k = self.cfg.recon_target_offset  # 0: position i -> token i; 1: position i -> token i + 1
            at_images = hidden[image_positions].view(visual.shape)[chosen]  # (I', N, D), I' images chosen
            predicted = self.recon_head(at_images[:, :visual.shape[1] - k])  # (I', N - k, D)
            target = visual[chosen][:, k:]  # (I', N - k, D)
            if target.numel():
                out.recon_loss = self.cfg.recon_weight * reconstruction_loss(predicted, target, self.cfg.recon_beta)
                out.num_recon_tokens = target.shape[0] * target.shape[1]
                if return_token_errors:  # per-token SmoothL1, [chosen images, N - k], e.g. for pictures
                    out.token_errors = F.smooth_l1_loss(predicted.float(), target.detach().float(),
                                                        beta=self.cfg.recon_beta, reduction="none").mean(-1)
        out.lm_loss, out.num_label_tokens = (lm_loss(hidden, labels, self.llm.get_output_embeddings())
                                             if labels is not None else (hidden.sum() * 0.0, 0))  # step 7
        out.loss = out.lm_loss if out.recon_loss is None else out.lm_loss + out.recon_loss
        if hook:
            out.loss = hook.after_loss(self, out)
        return out

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


def load_checkpoint(path: str, device="cpu", overrides: dict | None = None):
    """Load (model, tokenizer, image_processor) from a checkpoint directory in any format victor reads:
    its own (save_checkpoint), the original LLaVA code's (LLaVA-1.5, Croc, ViCToR's release) or
    transformers' LlavaForConditionalGeneration's (llava-hf). config.json says which (checkpoint_format);
    one reader per format turns the directory into victor's terms (SourceCheckpoint).
    overrides: VictorConfig fields to change (config_with_overrides says which may change)."""
    from engineering.checkpoints import (  # the formats: checkpoints.py
        config_with_overrides,
        fill_model,
        read_checkpoint,
    )
    src = read_checkpoint(path)
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
