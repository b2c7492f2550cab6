"""
ViCToR: Visual Comprehension via Token Reconstruction (arXiv 2410.14332), in one file.

Stage 1.5's objective:  L = LM loss + alpha * mean_i SmoothL1_beta(head(h_i), sg(v_i))  over the image positions i,
where the LLM's input has 75 % of the visual tokens v replaced by Hungarian-matched rows of a learnable pool.

A LLaVA-style model (vision tower -> projector -> causal LLM) plus the two pieces ViCToR adds for stage 1.5:
the token pool (pool_size x llm_dim) and the reconstruction head (head above).

Read top to bottom: the config and the family (its relatives as settings), then each step of the
stage-1.5 forward pass (the README's step table) as one small function, then the model that composes
them; an appendix holds step 3's faster exact solver. This file reads and writes no files of its own and
imports nothing of the project: training is train.py, data data.py, checkpoints and the rest engineering/.
"The public code" is the authors' release, github.com/deepglint/Victor, its llava/model/llava_arch.py.

    from victor import VictorConfig, VictorModel
    model = VictorModel(VictorConfig(vision_model="openai/clip-vit-large-patch14-336", llm="lmsys/vicuna-7b-v1.5"))
    model.set_trainable("1.5")
    out = model(input_ids, attention_mask, labels=labels, pixel_values=pixels, stage="1.5")
    out.loss.backward()
"""
from __future__ import annotations

import copy
import importlib.util
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value that the LM loss skips
IMAGE_TOKEN_ID = -200  # LLaVA's placeholder id: never looked up in the vocabulary
STAGES = ("1", "1.5", "2")
MATCHERS = ("hungarian", "hungarian_plain", "nearest")  # step 3: exact (appendix) | exact (plain scipy) | Croc's
MASKABLE_ATTENTION = ("sdpa", "eager")  # the attention kernels that take Croc's 4-D mask (flash-attention does not)


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
    matcher: str = "hungarian"  # MATCHERS: hungarian, hungarian_plain (both exact) | nearest (Croc: rows repeat)
    recon_weight: float = 10.0  # 0: no reconstruction (replacement only, or captions alone)
    recon_beta: float = 0.01
    recon_target_offset: int = 0  # hidden state at image position i reconstructs visual token i + offset
    recon_image_ratio: float = 1.0  # share of images whose positions are reconstructed (VDEP's hybrid: 0.5)
    stage15_attention: str = "causal"  # causal | mixed (Croc: bidirectional before the first supervised token)
    # misc
    image_token_id: int = IMAGE_TOKEN_ID
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when installed, else sdpa
    projector_path: str = ""  # optional: LLaVA's mm_projector.bin to start from (engineering.checkpoints.new_model)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VictorConfig:
        if unknown := sorted(set(d) - {f.name for f in fields(cls)}):
            raise ValueError(f"unknown VictorConfig keys: {unknown}")
        return cls(**d)

    def validate(self):
        """Refuse a bad config before any heavy work (model loading, data reading)."""
        for name in ("vision_model", "llm"):
            if not (getattr(self, name) or getattr(self, name.replace("_model", "") + "_config")):
                raise ValueError(f"VictorConfig: give {name} (name/path) or {name.replace('_model', '')}_config (dict)")
        for name, allowed in (("projector_type", ("mlp2x_gelu", "linear")), ("matcher", MATCHERS),
                              ("vision_feature_select", ("auto", "patch", "full")),
                              ("stage15_attention", ("causal", "mixed")), ("recon_target_offset", (0, 1))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name, ok, valid in (("replace_ratio", 0.0 <= self.replace_ratio < 1.0, "in [0, 1)"),
                                ("recon_weight", self.recon_weight >= 0, ">= 0"),
                                ("recon_image_ratio", 0.0 < self.recon_image_ratio <= 1.0, "in (0, 1]"),
                                ("vision_feature_downsample", self.vision_feature_downsample >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"{name} must be {valid}, got {getattr(self, name)}")
        if self.image_token_id >= 0:
            raise ValueError("image_token_id must be negative (a placeholder outside the vocabulary)")


def check_stage(stage: str):
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")


def num_replaced(num_tokens: int, replace_ratio: float) -> int:
    """How many of N visual tokens stage 1.5 replaces: N - floor(N * (1 - ratio)); 432 of 576."""
    keep = math.floor(round(num_tokens * (1.0 - replace_ratio), 6))  # round: 10 * (1 - 0.9) is 0.999..., not 1
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
    # VDEP (arXiv 2502.09093): nothing replaced; image position i reconstructs token i + 1 (its own reaches it
    # through the residual stream), on half the images; alpha ViCToR's 10, so the arms differ only in what defines them
    "vdep": dict(replace_ratio=0.0, stage15_attention="causal", recon_weight=10.0, recon_target_offset=1,
                 recon_image_ratio=0.5),
    # the control: stage 1.5 on the same captions with the LM loss alone (no pool, no reconstruction)
    "captions": dict(replace_ratio=0.0, stage15_attention="causal", recon_weight=0.0),
    # LLaVA-1.5: no stage 1.5, and the projector's output fed to the LLM as it is (no L2 normalisation): it exports
    "llava": dict(normalize_visual_tokens=False),
}


# -----------------------------------------------------------------------------
# The stage-1.5 forward pass, one function per step of the README's step table. Shapes: B samples, T positions,
# I images, N visual tokens per image, R of them replaced, P pool rows, D the LLM's width.


def build_projector(kind: str, vision_dim: int, llm_dim: int) -> nn.Module:
    """LLaVA's projector: mlp2x_gelu = Linear, GELU, Linear (keys .0 and .2 as in LLaVA)."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(vision_dim, llm_dim))
    return nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))


def project_visual_tokens(projector: nn.Module, features: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Step 1: v = normalize(projector(vision_features)), (I, N, D)."""
    v = projector(features)  # (I, N, vision_dim) -> (I, N, D)
    return F.normalize(v, dim=-1) if normalize else v


def select_tokens_to_replace(num_images: int, num_tokens: int, replace_ratio: float, device=None,
                             generator: torch.Generator | None = None, seeds=None) -> torch.Tensor:
    """Step 2: choose uniformly at random which tokens to replace; bool (I, N). seeds (one int per image):
    each image's choice a function of its seed alone (the same for 1 or N processes, and when resumed)."""
    if seeds is None:
        scores = torch.rand(num_images, num_tokens, device=device, generator=generator)
    else:
        if len(seeds) != num_images:
            raise ValueError(f"{len(seeds)} selection seeds for {num_images} images")
        scores = torch.stack([torch.rand(num_tokens, generator=torch.Generator().manual_seed(int(s)))
                              for s in seeds]).to(device)
    chosen = scores.topk(num_replaced(num_tokens, replace_ratio), dim=1).indices  # (I, R): a uniform R-subset
    return torch.zeros(num_images, num_tokens, dtype=torch.bool, device=device).scatter_(1, chosen, True)


def solve_assignment(cost: np.ndarray) -> np.ndarray:
    """The assignment problem as the paper states it: cost (R, P) -> a distinct column (pool row) for each
    row (token), the least total cost. scipy's exact solver, imported when first used."""
    from scipy.optimize import linear_sum_assignment
    return linear_sum_assignment(cost)[1]


@torch.no_grad()
def hungarian_match(tokens: torch.Tensor, token_pool: torch.Tensor, solver=solve_assignment) -> torch.Tensor:
    """Step 3: give each selected token a distinct pool row, minimising the total Euclidean distance. tokens
    (I, R, D), token_pool (P, D) -> pool rows (I, R), one-to-one; solver: scipy's, or any other exact one."""
    cost = torch.cdist(tokens.flatten(0, 1).float(), token_pool.float())  # (I*R, P): one GEMM, float32
    return assign_on_host(cost.view(*tokens.shape[:2], -1), solver)


def assign_on_host(cost: torch.Tensor, solver=solve_assignment) -> torch.Tensor:
    """Step 3's assignment, one problem per image in parallel: cost (I, R, P) -> columns (I, R)."""
    with ThreadPoolExecutor(max(1, min(len(cost), torch.get_num_threads()))) as ex:
        cols = list(ex.map(solver, cost.cpu().numpy()))  # one device->host copy per batch
    return torch.from_numpy(np.stack(cols)).to(cost.device)


@torch.no_grad()
def nearest_match(tokens: torch.Tensor, token_pool: torch.Tensor) -> torch.Tensor:
    """Step 3 as Croc does it: each selected token takes its nearest pool row (rows may repeat)."""
    return torch.cdist(tokens.flatten(0, 1).float(), token_pool.float()).argmin(dim=1).view(tokens.shape[:2])


def match_tokens_to_pool(tokens: torch.Tensor, token_pool: torch.Tensor, matcher: str) -> torch.Tensor:
    """Step 3 by the configured matcher: one-to-one Hungarian (ViCToR) or nearest row (Croc)."""
    if matcher == "nearest":
        return nearest_match(tokens, token_pool)
    exact = solve_assignment_reduced if matcher == "hungarian" else solve_assignment  # the same optimum (appendix)
    return hungarian_match(tokens, token_pool, exact)


def batch_layout(input_ids: torch.Tensor, labels: torch.Tensor | None, image_token_id: int = IMAGE_TOKEN_ID) -> dict:
    """Where a batch's visual tokens sit and which positions predict a label, as flat indices into (B*T,). The
    collator computes them on the host; gathering with them, the forward has no shape that depends on values:
    no device->host sync per step, and it runs on fake tensors (scripts/trace_step.py)."""
    predicts = None if labels is None else F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1))  # position t predicts t + 1
    return {"image_index": (input_ids == image_token_id).flatten().nonzero().flatten(),
            "label_index": None if labels is None else predicts.flatten().nonzero().flatten()}


def replace_with_pool_rows(embeds: torch.Tensor, positions: torch.Tensor,
                           token_pool: torch.Tensor, pool_indices: torch.Tensor) -> torch.Tensor:
    """Step 4: overwrite the replaced positions (flat, (I, R)) of the LLM input with their matched pool rows
    (pool_indices (I, R)); the gradient flows into the rows used."""
    rows = token_pool[pool_indices.flatten()].to(embeds.dtype)  # (I*R, D)
    return embeds.flatten(0, 1).index_copy(0, positions.flatten(), rows).view_as(embeds)


def mixed_attention_mask(attention_mask: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype | None = None
                         ) -> torch.Tensor:
    """Step 5 as Croc does it in stage 1.5: the positions before a sample's first supervised token
    (system, image, prompt) attend to each other in both directions; from that token on attention
    is causal; padding is never attended. -> (B, 1, T, T), True (or 0.0 with dtype) = attend.
    The last prefix position predicts the first supervised token and sees only the prefix: nothing leaks."""
    batch, seq = labels.shape
    pos = torch.arange(seq, device=labels.device)
    supervised = labels != IGNORE_INDEX
    first = torch.where(supervised.any(dim=1), supervised.int().argmax(dim=1), seq)  # (B,)
    in_prefix = pos[None, :] < first[:, None]  # (B, T)
    allowed = (pos[None, None, :] <= pos[None, :, None]) | (in_prefix[:, :, None] & in_prefix[:, None, :])  # (B, T, T)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    # a padded query attends itself: no row without any position to attend
    allowed = (allowed | torch.eye(seq, dtype=torch.bool, device=labels.device))[:, None]
    return allowed if dtype is None else torch.zeros(allowed.shape, dtype=dtype, device=labels.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def images_to_reconstruct(num_images: int, ratio: float, seeds=None, generator: torch.Generator | None = None,
                          device=None) -> torch.Tensor:
    """Which images' positions step 6 supervises, bool (I,): all of them (ViCToR), or a random
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
    """Step 6's loss: SmoothL1 between the head's prediction and the visual token, detached (sg), mean."""
    return F.smooth_l1_loss(predicted.float(), target.detach().float(), beta=beta)


def reconstruct_visual_tokens(recon_head: nn.Module, hidden_at_images: torch.Tensor, visual: torch.Tensor,
                              offset: int, beta: float):
    """Step 6: the head reads the LLM's hidden state at each image position i and predicts visual token
    i + offset (0: its own, ViCToR; 1: the next, VDEP). hidden_at_images, visual (I', N, D) ->
    (reconstruction_loss, or None with nothing to reconstruct; prediction and target, (I', N - offset, D))."""
    predicted = recon_head(hidden_at_images[:, :visual.shape[1] - offset])
    target = visual[:, offset:]
    return (reconstruction_loss(predicted, target, beta) if target.numel() else None), predicted, target


def lm_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, label_index) -> tuple[torch.Tensor, int]:
    """Step 7: next-token cross-entropy -> (mean loss, number of label tokens). Logits only at the positions
    that predict a label (label_index, flat): image and prompt positions never reach the vocabulary projection."""
    if (n := label_index.numel()) == 0:  # nothing to predict: a zero that keeps the graph (and lm_head) connected
        return lm_head(hidden[:, -1]).float().sum() * 0.0, 0
    logits = lm_head(hidden.flatten(0, 1)[label_index])
    return F.cross_entropy(logits.float(), labels.flatten()[label_index + 1]), n


# -----------------------------------------------------------------------------
# The model


@dataclass
class VictorOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    recon_loss: torch.Tensor | None = None
    num_label_tokens: int = 0
    num_recon_tokens: int = 0
    replaced_mask: torch.Tensor | None = None  # bool (I, N): which visual tokens were replaced
    pool_indices: torch.Tensor | None = None  # long (I, R): the pool row each one got
    recon_predicted: torch.Tensor | None = None  # (I reconstructed, N - offset, D): step 6's prediction
    recon_target: torch.Tensor | None = None  # ... and the visual tokens it is compared with


def default_attn_implementation() -> str:
    """attn_implementation "auto": flash-attention 2 on CUDA where flash-attn is installed, else SDPA."""
    return "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"


def _vision_class(model_type: str):
    import transformers
    for prefix, name in (("siglip", "SiglipVisionModel"), ("clip", "CLIPVisionModel")):
        if model_type.startswith(prefix):
            return getattr(transformers, name)
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
        if cfg.projector_path:  # a file in a foreign format: this file does no I/O
            raise ValueError("projector_path (LLaVA's mm_projector.bin) is read by engineering.checkpoints.new_model, "
                             "which builds the model and loads it")
        self.cfg = cfg = VictorConfig.from_dict(copy.deepcopy(cfg.to_dict()))  # the caller's config stays as it was
        self.vision_tower, self.llm = build_base_models(cfg, load_weights)
        # record the resolved configs, so a saved full checkpoint can be rebuilt without the hub
        cfg.vision_config, cfg.llm_config = self.vision_tower.config.to_dict(), self.llm.config.to_dict()
        vconf = self.vision_tower.config
        self.drop_cls = (cfg.vision_feature_select == "patch" or
                         (cfg.vision_feature_select == "auto" and vconf.model_type.startswith("clip")))
        grid, k = vconf.image_size // vconf.patch_size, cfg.vision_feature_downsample
        # CLIP puts a CLS token before the patches; "patch" drops the first token (as llava-hf's "default")
        self.tower_tokens = grid ** 2 + int(vconf.model_type.startswith("clip"))  # the tower's positions per image
        num_features = self.tower_tokens - int(self.drop_cls)
        if k > 1 and (grid % k or num_features != grid ** 2):
            raise ValueError(f"vision_feature_downsample={k} pools the patch grid ({grid} x {grid}, divisible by "
                             f"{k}?) and needs exactly its {grid ** 2} patch tokens ({num_features} with "
                             f"vision_feature_select={cfg.vision_feature_select!r})")
        self.grid = grid // cfg.vision_feature_downsample
        self.num_image_tokens = self.grid ** 2 if cfg.vision_feature_downsample > 1 else num_features  # N
        llm_dim = self.llm.config.get_text_config().hidden_size
        r = num_replaced(self.num_image_tokens, cfg.replace_ratio)
        if cfg.pool_size < r and cfg.matcher != "nearest":
            raise ValueError(f"pool_size={cfg.pool_size} is smaller than the {r} visual tokens replaced per image "
                             f"(N={self.num_image_tokens}, replace_ratio={cfg.replace_ratio}): one-to-one "
                             f"matching needs pool_size >= {r}")
        self.projector = build_projector(cfg.projector_type, vconf.hidden_size, llm_dim)
        self.token_pool = nn.Parameter(torch.randn(cfg.pool_size, llm_dim))  # N(0, 1), as llava_arch.py's
        self.recon_head = nn.Linear(llm_dim, llm_dim)

    @property
    def replaces_tokens(self) -> bool:
        """Stage 1.5 replaces visual tokens by pool rows (steps 2-4): ViCToR and Croc, not VDEP or captions."""
        return num_replaced(self.num_image_tokens, self.cfg.replace_ratio) > 0

    @property
    def reconstructs(self) -> bool:
        """Stage 1.5 has a reconstruction loss (step 6)."""
        return self.cfg.recon_weight > 0

    def trainable_parts(self, stage: str, train_vision: bool = False) -> dict[str, list[nn.Parameter]]:
        """What each stage trains (the README's stage table), part by part: the projector always; the LLM (and
        the tower, with train_vision) from stage 1.5 on; the pool and the head in stage 1.5, where this
        configuration uses them."""
        check_stage(stage)
        parts = {"projector": list(self.projector.parameters())}
        if stage in ("1.5", "2"):
            parts["llm"] = list(self.llm.parameters())
            if train_vision:
                parts["vision_tower"] = self.vision_parameters_in_use()
        if stage == "1.5" and self.replaces_tokens:
            parts["token_pool"] = [self.token_pool]
        if stage == "1.5" and self.reconstructs:
            parts["recon_head"] = list(self.recon_head.parameters())
        return parts

    def set_trainable(self, stage: str, train_vision: bool = False):
        """requires_grad on what this stage trains (trainable_parts), off everywhere else."""
        self.requires_grad_(False)
        for p in sum(self.trainable_parts(stage, train_vision).values(), []):
            p.requires_grad_(True)

    def param_groups(self, stage: str, lr: float, vision_lr: float = 0.0, pool_lr: float = 0.0,
                     weight_decay: float = 0.0) -> list[dict]:
        """This stage's trainable parts as optimizer groups with their learning rates; vision_lr 0 keeps the
        tower out (frozen)."""
        rates = {"vision_tower": vision_lr, "token_pool": pool_lr}
        return [{"name": name, "params": params, "lr": rates.get(name, lr), "weight_decay": weight_decay}
                for name, params in self.trainable_parts(stage, vision_lr > 0).items()]

    def num_reconstruction_targets(self, num_images: int, selection_seeds=None) -> int:
        """How many visual tokens step 6 reconstructs for these images (forward's selection_seeds): a global count."""
        if not self.reconstructs or num_images == 0:
            return 0
        chosen = images_to_reconstruct(num_images, self.cfg.recon_image_ratio, selection_seeds)
        return int(chosen.sum()) * (self.num_image_tokens - self.cfg.recon_target_offset)

    @property
    def vision_layers_used(self) -> int:
        """The tower's layers up to the feature layer (hidden_states[0] is the embedding output)."""
        k = self.cfg.vision_feature_layer
        return k if k >= 0 else len(self.vision_tower.encoder.layers) + 1 + k

    def vision_parameters_in_use(self) -> list[nn.Parameter]:
        """The tower's parameters up to the feature layer (those after it never get a gradient: not trained)."""
        tower, layers, used = self.vision_tower, self.vision_tower.encoder.layers, self.vision_layers_used
        unused = [*layers[used:], getattr(tower, "post_layernorm", None), getattr(tower, "head", None)]
        skip = {id(p) for m in unused if m is not None for p in m.parameters()}
        return [p for p in tower.parameters() if id(p) not in skip]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision features from the chosen layer: (I, N, vision_dim)."""
        feats = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        feats = feats[self.cfg.vision_feature_layer][:, int(self.drop_cls):]  # drop_cls: without CLS
        k = self.cfg.vision_feature_downsample
        if k > 1:  # average-pool k x k patches: fewer tokens for small demos
            g = math.isqrt(feats.shape[1])
            feats = F.avg_pool2d(feats.transpose(1, 2).unflatten(2, (g, g)), k).flatten(2).transpose(1, 2)
        return feats

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_index=None):
        """Text embeddings, the projected visual tokens at the image positions (image_index, flat: batch_layout's)."""
        image_positions = input_ids == self.cfg.image_token_id
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(image_positions, 0))  # placeholders: no vocab
        image_index = image_positions.flatten().nonzero().flatten() if image_index is None else image_index
        n_slots = image_index.numel()
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image tokens but no pixel_values were given")
            return embeds, image_positions, None
        visual = project_visual_tokens(self.projector, self.encode_images(pixel_values),
                                       self.cfg.normalize_visual_tokens)  # step 1 (every stage)
        if n_slots != visual.shape[0] * visual.shape[1]:
            raise ValueError(f"input_ids hold {n_slots} image tokens, but {visual.shape[0]} images x "
                             f"{visual.shape[1]} tokens were encoded")
        embeds = embeds.flatten(0, 1).index_copy(0, image_index, visual.flatten(0, 1).to(embeds.dtype))
        return embeds.view(input_ids.shape + embeds.shape[-1:]), image_positions, visual

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, stage: str = "2",
                generator: torch.Generator | None = None, selection_seeds=None, layout=None) -> VictorOutput:
        """One training forward, the steps in the paper's order. stage "1.5" adds the configured
        replacement (2-4) and reconstruction (6); "1" and "2" do neither. generator / selection_seeds
        (one int per image) drive stage 1.5's random draws; layout: batch_layout's (derived if not given)."""
        check_stage(stage)
        layout = layout or batch_layout(input_ids, labels, self.cfg.image_token_id)
        image_index = layout["image_index"]  # (I*N,) flat positions
        embeds, _, visual = self.embed_inputs(input_ids, pixel_values, image_index)  # step 1: (B,T,D) (I,N,D)
        hook = self.every_part_hook if self.training else None  # not the method: DDP / FSDP plumbing (distributed.py)
        embeds = hook.before_llm(self, embeds, visual) if hook else embeds  # (plumbing: a batch without images)
        out = VictorOutput(loss=None, lm_loss=None)
        stage15, images = stage == "1.5", visual is not None  # steps 2-4 and 6: stage 1.5's, on images
        if stage15 and images and self.replaces_tokens:
            n_img, n_tok, dim = visual.shape
            replaced = select_tokens_to_replace(n_img, n_tok, self.cfg.replace_ratio, visual.device,
                                                generator, selection_seeds)  # step 2: (I, N) bool, seeded per image
            which = (~replaced).byte().argsort(dim=1, stable=True)[:, :num_replaced(n_tok, self.cfg.replace_ratio)]
            selected = visual.detach().gather(1, which.unsqueeze(-1).expand(-1, -1, dim))  # (I, R, D), ascending
            pool_indices = match_tokens_to_pool(selected, self.token_pool, self.cfg.matcher)  # step 3: (I, R)
            positions = image_index.view(n_img, n_tok).gather(1, which)  # (I, R): where the replaced tokens sit
            embeds = replace_with_pool_rows(embeds, positions, self.token_pool, pool_indices)  # step 4
            out.replaced_mask, out.pool_indices = replaced, pool_indices
        mixed = stage15 and self.cfg.stage15_attention == "mixed" and labels is not None
        mask = self.mixed_mask(attention_mask, labels) if mixed else attention_mask
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask,
                                        use_cache=False).last_hidden_state  # step 5: (B, T, D)
        if stage15 and images and self.reconstructs:  # step 6, on every image (ViCToR) or a share of them (VDEP)
            at_images, targets = hidden.flatten(0, 1)[image_index].view(visual.shape), visual  # (I, N, D)
            if self.cfg.recon_image_ratio < 1:  # VDEP's share of the images; with seeds, drawn on the host (no sync)
                chosen = images_to_reconstruct(len(visual), self.cfg.recon_image_ratio, selection_seeds, generator,
                                               visual.device if selection_seeds is None else None)
                at_images, targets = (x[chosen.nonzero().flatten().to(x.device)] for x in (at_images, visual))
            loss, out.recon_predicted, out.recon_target = reconstruct_visual_tokens(
                self.recon_head, at_images, targets, self.cfg.recon_target_offset, self.cfg.recon_beta)
            if loss is not None:
                out.recon_loss = self.cfg.recon_weight * loss
                out.num_recon_tokens = out.recon_target.shape[0] * out.recon_target.shape[1]
        out.lm_loss, out.num_label_tokens = (hidden.sum() * 0.0, 0) if labels is None else lm_loss(  # step 7
            hidden, labels, self.llm.get_output_embeddings(), layout["label_index"])
        out.loss = out.lm_loss if out.recon_loss is None else out.lm_loss + out.recon_loss
        out.loss = hook.after_loss(self, out) if hook else out.loss  # (plumbing: unused trained parts, times zero)
        return out

    def mixed_mask(self, attention_mask, labels) -> torch.Tensor:
        """Croc's stage-1.5 mask (mixed_attention_mask) in the form this LLM's attention takes."""
        impl = self.llm.config._attn_implementation
        if impl not in MASKABLE_ATTENTION:
            raise ValueError(f"stage15_attention='mixed' needs a 4-D attention mask, which {impl} cannot take: "
                             f"build the model with attn_implementation='sdpa' (or 'eager')")
        dtype = None if impl == "sdpa" else self.llm.get_input_embeddings().weight.dtype
        return mixed_attention_mask(attention_mask, labels, dtype)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id=None, pad_token_id=None) -> torch.Tensor:
        """Batched generation (left-padded input, KV cache), no replacement: the new tokens, (B, <= max_new)."""
        sampling = dict(temperature=temperature, top_p=top_p) if do_sample else {}
        return self.llm.generate(inputs_embeds=self.embed_inputs(input_ids, pixel_values)[0], use_cache=True,
                                 attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 eos_token_id=eos_token_id, pad_token_id=pad_token_id, **sampling)


# -----------------------------------------------------------------------------
# Appendix: step 3's default solver. The same optimum as solve_assignment, found faster; why each branch
# is exact: docs/matching.md. tests/test_victor.py checks it against the plain solve; scripts/bench_matching.py
# times both.


def solve_assignment_reduced(cost: np.ndarray) -> np.ndarray:
    """solve_assignment, found on a smaller problem: (0) each row's cheapest column where no two rows share
    one, (a) only columns some row's R cheapest can be, (b) the column minima subtracted."""
    from scipy.optimize import linear_sum_assignment
    r = cost.shape[0]
    if r == 0:
        return np.zeros(0, dtype=np.int64)
    step = -(-r // 64)  # ceil(R / 64): the check in (0) reads at most 64 rows
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
    if len(cand) > 1.3 * r:  # (b) pays off only when C is barely larger than R (docs/matching.md)
        return cand[linear_sum_assignment(sub)[1]]
    col_min = sub.min(axis=0)  # (b)
    square = np.vstack([sub - col_min, np.broadcast_to(-col_min, (len(cand) - r, len(cand)))])
    return cand[linear_sum_assignment(square)[1][:r]]
