"""
Checkpoints: victor's own (save_checkpoint), and every format users already have read into victor
(load_checkpoint), llava-hf written out. A reader of the method may skip this file.

In: victor's own directories (save_checkpoint), the original LLaVA code's (LLaVA-1.5, Croc,
ViCToR's release: mm_projector.bin, or a whole LlavaLlamaForCausalLM / LlavaQwenForCausalLM directory)
and transformers' LlavaForConditionalGeneration (llava-hf). Out: llava-hf, for transformers, vLLM and
lmms-eval.

    python scripts/export_llava_hf.py CKPT OUT       # victor -> llava-hf
    python eval.py path/to/llava-v1.5-7b             # any format in: load_checkpoint reads it
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch

from engineering.flags import UsageError, first_line
from victor import MASKABLE_ATTENTION, VictorConfig, VictorModel

if TYPE_CHECKING:
    from engineering.config import TrainConfig

# -----------------------------------------------------------------------------
# victor's own checkpoints (a directory with config.json, model.safetensors, tokenizer and image-processor
# files), and load_checkpoint: any format in


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


def default_device(name: str | None = None) -> torch.device:
    """The device asked for, else CUDA when there is one, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def new_model(cfg: VictorConfig) -> VictorModel:
    """A model built from its base models (VictorModel), starting from LLaVA's mm_projector.bin where
    cfg.projector_path names one; the path is kept in the model's config (saved with its checkpoints)."""
    model = VictorModel(dataclasses.replace(cfg, projector_path=""))
    if cfg.projector_path:
        load_llava_projector(model, cfg.projector_path)
        model.cfg.projector_path = cfg.projector_path
    return model


# -----------------------------------------------------------------------------
# Reading: each reader turns a directory into a SourceCheckpoint: a VictorConfig, the weights under
# victor's names, the tokenizer and the image processor.


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
                            AutoImageProcessor.from_pretrained(path, backend="pil"), base_from_names=projector_only,
                            pool_saved=not projector_only,
                            keeps=("vision_tower.", "llm.", "token_pool", "recon_head.") if projector_only else ())


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
    return SourceCheckpoint(cfg, weights, _tokenizer_of(path),
                            AutoImageProcessor.from_pretrained(tower, backend="pil"),
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
    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
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
            raise ValueError(f"pool_size {value} (--pool-size) cannot apply to {source}: its token pool has "
                             f"{cfg.pool_size} trained rows (only a projector-only stage-1 checkpoint gets a "
                             f"fresh pool)")
    new = VictorConfig.from_dict({**cfg.to_dict(), **overrides})
    new.validate()
    return new


def read_checkpoint(path: str) -> SourceCheckpoint:
    """A checkpoint directory in any format victor reads, in victor's terms; config.json says which."""
    meta = read_config_json(path)
    return CHECKPOINT_READERS[checkpoint_format(meta, os.path.join(path, "config.json"))](path, meta)


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
                         "exported model would compute something else. An exportable model trains without it: "
                         "train.py --variant llava (or --model-overrides '{\"normalize_visual_tokens\": false}') "
                         "from stage 1 on")
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
                               num_additional_image_tokens=1 if clip else 0, image_token=IMAGE_TOKEN,
                               chat_template=list_content_template(tokenizer.chat_template))
    processor.save_pretrained(out_dir)
    return out_dir


# The message forms transformers' multimodal examples, its image-text-to-text pipeline and evaluation harnesses
# pass: content as a list of {"type": "image"} / {"type": "text", "text": ...} items. Each becomes victor's
# string form ("<image>\n" before the text, as the training data has it) before the tokenizer's own template.
LIST_CONTENT_PREAMBLE = (
    "{%- set converted = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set text = m['content'] -%}"
    "{%- else -%}{%- set parts = namespace(text='') -%}"
    "{%- for item in m['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set parts.text = parts.text + '" + IMAGE_TOKEN + "\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set parts.text = parts.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = parts.text -%}{%- endif -%}"
    "{%- set converted.messages = converted.messages + [{'role': m['role'], 'content': text}] -%}"
    "{%- endfor -%}"
    "{%- set messages = converted.messages -%}"
)


def list_content_template(template: str | None) -> str | None:
    """The tokenizer's chat template, taking message content as a string or as a list of image/text items."""
    return LIST_CONTENT_PREAMBLE + template if template else None


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


# -----------------------------------------------------------------------------
# train.py --init: a checkpoint to start a stage from


def note_normalisation_change(init: str, new: VictorConfig):
    """Say so when --variant or --model-overrides changes normalize_visual_tokens from what the checkpoint
    was trained with (e.g. --variant llava on a stage-1 checkpoint trained without it): it takes effect,
    but the projector learned the other."""
    saved = read_config_json(init).get("victor", {}).get("normalize_visual_tokens")
    if saved is not None and saved != new.normalize_visual_tokens:
        print(f"note: normalize_visual_tokens={new.normalize_visual_tokens} (--variant / --model-overrides), but "
              f"{init} was trained with {saved}: its projector learned the other")


def has_chat_template(path: str) -> bool:
    """Whether the tokenizer saved in path carries a chat template (its own file, or tokenizer_config.json's)."""
    if os.path.isfile(os.path.join(path, "chat_template.jinja")):
        return True
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError):
        return True  # not a local tokenizer folder: transformers says so when it loads


def is_hub_name(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)  # org/name


def check_init(init: str, overrides: dict | None = None):
    """--init names a checkpoint (a directory with a config.json victor can load, and its weights), or a hub
    name, and each model override can take effect on it (config_with_overrides): one line (UsageError)
    otherwise. Reads config.json alone: the checks before a run."""
    if is_hub_name(init):
        return
    if not os.path.isdir(init):
        raise UsageError(f"--init {init}: no such directory (give a checkpoint directory that a stage saved)")
    try:
        meta = read_config_json(init)
        checkpoint_format(meta, init)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--init {e}") from None
    saved = meta.get("victor", {})
    for key in ("vision_model", "llm"):  # a local directory that is gone: said now (else the hub is asked)
        if os.path.isabs(saved.get(key) or "") and not os.path.isdir(saved[key]):
            raise UsageError(f"--init {init}: cannot load a base model it refers to (vision_model "
                             f"{saved.get('vision_model')!r}, llm {saved.get('llm')!r}): {saved[key]} does not "
                             f"exist; put the model back at that path (or name), or train this checkpoint's stage "
                             f"again")
    if not any(os.path.isfile(os.path.join(init, f)) for f in WEIGHT_FILES) and not os.path.isfile(
            os.path.join(init, "mm_projector.bin")):
        raise UsageError(f"--init {init}: no weights in it ({', '.join(WEIGHT_FILES)}): a stage that did not finish?")
    if overrides and "victor" in meta:
        try:
            config_with_overrides(VictorConfig.from_dict(saved), overrides, meta.get("saved_parts") == "projector",
                                  init)
        except ValueError as e:
            raise UsageError(f"--init {init}: {e}") from None


def load_init_checkpoint(init: str, overrides: dict, given: dict):
    """train.py --init: load_checkpoint, with one line (UsageError) for what users get wrong: a base model
    the checkpoint refers to that has moved, a setting it refuses, a base model named again on the command
    line (given: --vision-model / --llm as given, "" if not). A note when normalisation changes."""
    def moved(why: str) -> UsageError:
        return UsageError(f"--init {init}: cannot load a base model it refers to (vision_model "
                          f"{saved.get('vision_model')!r}, llm {saved.get('llm')!r}): {why}; put the model "
                          f"back at that path (or name), or train this checkpoint's stage again")
    check_init(init)
    saved = read_config_json(init).get("victor", {}) if os.path.isdir(init) else {}
    try:
        model, tokenizer, image_processor = load_checkpoint(init, overrides=overrides)
    except ValueError as e:  # a setting the checkpoint refuses, or not a checkpoint at all
        raise UsageError(f"--init {init}: {e}") from None
    except OSError as e:  # transformers' way of saying a base model it names cannot be had
        raise moved(first_line(e)) from None
    note_normalisation_change(init, model.cfg)
    for key in ("vision_model", "llm"):  # named on the command line: must be the checkpoint's own
        held = getattr(model.cfg, key)
        if given[key] and (os.path.abspath(given[key]) if os.path.isdir(given[key]) else given[key]) != held:
            raise UsageError(f"--{key.replace('_', '-')} {given[key]!r}: with --init the base models come from "
                             f"{init} ({key} {held!r}); drop the flag")
    return model, tokenizer, image_processor


def build_model(cfg: TrainConfig, stage: str, settings: dict | None = None):
    """train.py's model, tokenizer and image processor: loaded from --init, or built from the base models.
    settings: rank 0's model settings (FSDP, the other ranks: build_model_once), from which the same
    model is built on the meta device, without weights."""
    from transformers import AutoImageProcessor, AutoTokenizer
    if settings is not None:
        with torch.device("meta"):  # a LLaVA projector (projector_path) arrives with rank 0's weights
            model = VictorModel(VictorConfig.from_dict({**settings, "projector_path": ""}), load_weights=False)
        tokenizer = AutoTokenizer.from_pretrained(cfg.init or cfg.llm)
        image_processor = AutoImageProcessor.from_pretrained(cfg.init or cfg.vision_model, backend="pil")
    elif cfg.init:
        given = {"vision_model": cfg.vision_model, "llm": cfg.llm}
        model, tokenizer, image_processor = load_init_checkpoint(cfg.init, cfg.model_overrides, given)
    else:
        if stage != "1":
            print(f"note: stage {stage} without --init starts from the base models (no stage-1 projector)")
        vcfg = VictorConfig.from_dict({"vision_model": cfg.vision_model, "llm": cfg.llm, **cfg.model_overrides})
        for key in ("vision_model", "llm"):  # local dirs by absolute path, so checkpoints can refer to them
            if os.path.isdir(getattr(vcfg, key)):
                setattr(vcfg, key, os.path.abspath(getattr(vcfg, key)))
        vcfg.validate()
        try:
            model = new_model(vcfg)  # (and LLaVA's mm_projector.bin, where projector_path names one)
            tokenizer = AutoTokenizer.from_pretrained(cfg.llm)
            image_processor = AutoImageProcessor.from_pretrained(cfg.vision_model, backend="pil")
        except OSError as e:  # transformers' way of saying a base model is not there
            raise UsageError(f"cannot load the base models (--vision-model {cfg.vision_model!r}, --llm "
                             f"{cfg.llm!r}): {first_line(e)}") from None
    attn = model.llm.config._attn_implementation
    if stage == "1.5" and model.cfg.stage15_attention == "mixed" and attn not in MASKABLE_ATTENTION:
        # Croc's mask is 4-D, which flash-attention cannot take: this stage runs on SDPA
        print(f"note: stage15_attention='mixed' needs a 4-D attention mask, which {attn} cannot take: "
              f"stage 1.5 runs with sdpa")
        model.llm.set_attn_implementation("sdpa")
    return model, tokenizer, image_processor


# -----------------------------------------------------------------------------
# What eval.py checks before it loads a model


def why_not_a_checkpoint(path: str) -> str | None:
    """Why a directory given as CHECKPOINT holds no checkpoint (an out-dir, say), naming those under it; or None."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    found = sorted(os.path.relpath(d, path) for d, _, files in os.walk(path) if "config.json" in files
                   and any(f in files for f in WEIGHT_FILES) and os.sep + "checkpoints" + os.sep not in d + os.sep)
    return f"{path} is not a checkpoint (no config.json)" + (f"; checkpoints under it: {', '.join(found[:8])}"
                                                             if found else "")


def why_it_cannot_answer(checkpoint: str) -> str | None:
    """Why a checkpoint cannot answer questions, or None: a stage-1 checkpoint holds a projector alone
    (victor's saved_parts "projector", LLaVA's mm_projector.bin without the model's weights), and its
    LLM was never taught to take an image and a question."""
    if read_config_json(checkpoint).get("saved_parts") == "projector" or (
            os.path.isfile(os.path.join(checkpoint, "mm_projector.bin"))
            and not any(os.path.isfile(os.path.join(checkpoint, n)) for n in WEIGHT_FILES)):
        return (f"{checkpoint} is a stage-1 checkpoint (a projector alone, trained to caption): it cannot "
                f"answer questions; ask a stage-1.5 or stage-2 checkpoint")
    return None
