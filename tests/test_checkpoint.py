"""Checkpoint loading is general (other official shapes, shard layouts, Phi-3) and strict (clear errors)."""

import argparse
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from m3d_edge.config import LLMSpec, ModelConfig, ProjectorConfig, SegConfig, VisionConfig, preset
from m3d_edge.model import checkpoint
from m3d_edge.model.checkpoint import CheckpointError


def phi3_official_shape() -> ModelConfig:
    """An official-layout model with shapes unlike the fixture: Phi-3 LLM with GQA, 3 ViT layers, pooling 4."""
    hf = dict(model_type="phi3", hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, original_max_position_embeddings=512,
              rms_norm_eps=1e-5, rope_theta=10000.0, vocab_size=300, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False, hidden_act="silu", pad_token_id=0)
    vision = VisionConfig(hidden_size=64, mlp_dim=128, num_layers=3, num_heads=4)
    seg = SegConfig(embed_dim=64, encoder_mlp_dim=96, encoder_layers=1, encoder_heads=4, decoder_mlp_dim=80,
                    decoder_heads=4, iou_head_hidden=32)
    return ModelConfig(vision, ProjectorConfig(pooling_size=4), LLMSpec("phi3", "config", hf), seg,
                       seg_token_id=299, im_patch_id=296, name="phi3-test")


def outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand((1, 1, 32, 256, 256), generator=g)
    n = model.cfg.num_image_tokens
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, n), model.cfg.im_patch_id), torch.tensor([[5, 6, 7]])], 1)
    with torch.no_grad():
        return model(image, ids).logits


@pytest.fixture(scope="module")
def phi3_model():
    torch.manual_seed(0)
    return checkpoint.build(phi3_official_shape()).eval()


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_official_phi3_layouts_round_trip(phi3_model, tmp_path, layout):
    folder = checkpoint.save(phi3_model, tmp_path / "ckpt", official=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "lamed_phi3" and config["architectures"] == ["LamedPhi3ForCausalLM"]
    state = checkpoint.read_state_dict(folder)
    assert "model.vision_tower.vision_tower.cls_token" in state and "lm_head.weight" in state
    assert any(k.startswith("model.layers.0.self_attn.qkv_proj") for k in state)  # Phi-3's fused qkv
    if layout != "safetensors":
        (folder / "model.safetensors").unlink()
    if layout == "sharded":
        keys = sorted(state)
        halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, part in halves.items():
            save_file({k: state[k] for k in part}, str(folder / name))
        index = {"weight_map": {k: name for name, part in halves.items() for k in part}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    loaded = checkpoint.load(folder)
    assert loaded.cfg.vision == phi3_model.cfg.vision and loaded.cfg.projector.pooling_size == 4
    assert torch.equal(outputs(loaded), outputs(phi3_model))


@pytest.mark.parametrize("detail_channels", [0, 4])
def test_our_folder_round_trip_is_bit_exact(tmp_path, detail_channels):
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, seg=dataclasses.replace(cfg.seg, detail_channels=detail_channels))
    torch.manual_seed(1)
    model = checkpoint.build(cfg).eval()
    loaded = checkpoint.load(checkpoint.save(model, tmp_path / "ours"))
    assert loaded.cfg == model.cfg and loaded.cfg.seg.detail_channels == detail_channels
    assert any(k.startswith("seg_module.detail.") for k in loaded.state_dict()) == bool(detail_channels)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_seg_detail_path_config_is_checked():
    """A detail width that group norm cannot split is refused; a model with the path (ours) has no official
    layout."""
    cfg = preset("tiny")
    with pytest.raises(ValueError, match="detail_channels must be 0 .* multiple of 4"):
        dataclasses.replace(cfg.seg, detail_channels=6)
    with pytest.raises(ValueError, match="detail path .* no official layout"):
        dataclasses.replace(cfg, seg=dataclasses.replace(cfg.seg, detail_channels=8)).to_official()


def test_official_config_round_trip(fixture_dir):
    original = json.loads((fixture_dir / "config.json").read_text())
    cfg = ModelConfig.from_official(original)
    again = cfg.to_official()
    for key in ("vocab_size", "hidden_size", "seg_token_id", "mm_hidden_size", "proj_pooling_size", "image_size",
                "patch_size", "num_key_value_heads", "rope_theta", "model_type"):
        assert again[key] == original[key], key
    assert ModelConfig.from_official(again) == cfg


def test_missing_and_unexpected_keys_are_listed(fixture_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(fixture_dir, folder, ignore=shutil.ignore_patterns("reference.npz", "clip"))
    state = checkpoint.read_state_dict(folder)
    del state["model.mm_projector.projector.0.bias"]
    state["model.extra.weight"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(folder)
    msg = str(e.value)
    assert "missing (1): model.mm_projector.projector.0.bias" in msg and "unexpected (1): model.extra.weight" in msg, msg


def test_pickle_with_objects_is_refused(fixture_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(fixture_dir / "config.json", folder)
    state = dict(checkpoint.read_state_dict(fixture_dir))
    state["payload"] = argparse.Namespace(command="anything")  # an arbitrary Python object, not a tensor
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        checkpoint.load(folder)


def test_truncated_weights(fixture_dir, tmp_path):
    folder = tmp_path / "truncated"
    folder.mkdir()
    shutil.copy(fixture_dir / "config.json", folder)
    data = (fixture_dir / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(folder)


@pytest.mark.parametrize("field,value,match", [
    ("vision_tower", "vit2d", "vision_tower='vit2d' is not supported"),
    ("mm_projector_type", "qformer", "mm_projector_type='qformer' is not supported"),
    ("model_type", "llava", "unknown checkpoint layout"),
])
def test_bad_config_fields(fixture_dir, tmp_path, field, value, match):
    folder = tmp_path / "cfg"
    folder.mkdir()
    config = json.loads((fixture_dir / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(fixture_dir / "model.safetensors", folder)
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(folder)


def test_wrong_image_shape(fixture_dir):
    model = checkpoint.load(fixture_dir)
    with pytest.raises(ValueError, match=r"expects images \[B, 1, 32, 256, 256\], got \[1, 32, 256, 256\]"):
        model.encode_images(torch.zeros(1, 32, 256, 256))


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        checkpoint.load(tmp_path / "nope")
