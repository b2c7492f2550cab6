"""Shared fixtures: tiny random models (the same classes as the paper's), the shapes tokenizer, data."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)

import data as D  # noqa: E402
from victor import VictorConfig, VictorModel  # noqa: E402


def tiny_config(vision="clip", **overrides) -> VictorConfig:
    """A ~100k-parameter model: 32x32 images, patch 8 -> 16 visual tokens (12 replaced), LLM width 32."""
    from transformers import CLIPVisionConfig, LlamaConfig, SiglipVisionConfig
    vcls = CLIPVisionConfig if vision == "clip" else SiglipVisionConfig
    vconf = vcls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=32, patch_size=8)
    tok = D.build_shapes_tokenizer()
    lconf = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    values = dict(vision_config=vconf.to_dict(), llm_config=lconf.to_dict(), pool_size=32)
    values.update(overrides)
    return VictorConfig(**values)


def tiny_model(seed=0, **overrides) -> VictorModel:
    torch.manual_seed(seed)
    return VictorModel(tiny_config(**overrides))


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def shapes_tokenizer():
    return D.build_shapes_tokenizer()


@pytest.fixture(scope="session")
def tiny_image_processor():
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes dataset (32 px images to match the tiny model)."""
    root = str(tmp_path_factory.mktemp("shapes"))
    D.make_shapes_dataset(root, D.ShapesSpec(image_size=32, num_train_images=64, num_test_images=20))
    return root
