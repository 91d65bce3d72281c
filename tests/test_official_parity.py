"""Our LaMed against the official code's own outputs (../shared/fixtures/official-tiny-llama, see its README).

Tolerances follow the fixture README: float32 arrays atol 1e-5 + rtol 1e-4 (the official code itself moves by up
to ~6e-6 across thread counts and attention kernels), float16-stored seg logits within float16 storage error,
losses rtol 1e-5, ids exact.
"""

import numpy as np
import pytest
import torch

from m3d_edge.model import checkpoint
from m3d_edge.model.vit3d import SelfAttention

F32 = dict(rtol=1e-4, atol=1e-5)


def close(actual: torch.Tensor, expected: np.ndarray, name: str, **tol) -> None:
    a = actual.detach().float().numpy()
    tol = tol or F32
    err = np.abs(a - expected).max()
    np.testing.assert_allclose(a, expected, err_msg=f"{name}: max abs error {err:.3g}", **tol)


@pytest.fixture(scope="module")
def model(fixture_dir):
    return checkpoint.load(fixture_dir)


@pytest.fixture(scope="module")
def image(reference):
    return torch.from_numpy(reference["image"])


def test_vision_and_prompt_embeddings(model, reference, image):
    with torch.no_grad():
        patch = model.vision_features(image)
        tokens = model.mm_projector(patch)
        embeds = model.prompt_embeds(torch.from_numpy(reference["input_ids"]), tokens)
    close(patch, reference["vision_tower_features"], "vision tower")
    close(tokens, reference["vision_features"], "projected image tokens")
    close(embeds, reference["inputs_embeds"], "inputs_embeds")


@pytest.mark.parametrize("chunk", [300, 2048])  # uneven last chunk; one chunk of 2048 queries and one of 1 (CLS)
def test_chunked_attention_keeps_the_official_vision_features(model, reference, image, chunk):
    """The exported graphs compute attention in query chunks (export.onnx): same features as the official code."""
    layers = [m for m in model.modules() if isinstance(m, SelfAttention)]
    assert len(layers) == model.cfg.vision.num_layers + model.cfg.seg.encoder_layers  # LLM tower + seg encoder
    try:
        for m in layers:
            m.query_chunk = chunk
        with torch.no_grad():
            patch = model.vision_features(image)
            embedding = model.seg_embedding(image, patch)
    finally:
        for m in layers:
            m.query_chunk = None
    close(patch, reference["vision_tower_features"], "vision tower, chunked attention")
    with torch.no_grad():
        unchunked = model.seg_embedding(image, model.vision_features(image))
    torch.testing.assert_close(embedding, unchunked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ids_key,logits_key", [("input_ids", "logits"), ("input_ids_nobos", "logits_nobos")])
def test_forward_logits_and_hidden(model, reference, image, ids_key, logits_key):
    with torch.no_grad():
        out = model(image, torch.from_numpy(reference[ids_key]))
    close(out.logits, reference[logits_key], logits_key)
    if ids_key == "input_ids":
        close(out.hidden, reference["hidden_last"], "last hidden state")


def test_seg_module_pieces(model, reference, image):
    seg = model.seg_module
    prompt = torch.from_numpy(reference["seg_prompt"])
    with torch.no_grad():
        emb = seg.encode(image)
        close(emb, reference["seg_image_embedding"], "seg image embedding")
        close(seg.prompt_encoder.dense_pe(), reference["seg_dense_pe"], "dense PE")
        close(seg.decode(emb, prompt, upsample=False), reference["seg_lowres_logits"], "low-res logits")
        close(seg.decode(emb, prompt), reference["seg_logits"], "seg logits")


def test_training_losses(model, reference, image):
    with torch.no_grad():
        out = model(image, torch.from_numpy(reference["train_input_ids"]),
                    labels=torch.from_numpy(reference["train_labels"]),
                    segs=torch.from_numpy(reference["train_segs"]))
    for name in ("loss", "lm_loss", "dice_loss", "bce_loss"):
        got, want = getattr(out, name).item(), float(reference[f"train_{name}"])
        assert got == pytest.approx(want, rel=1e-5), f"train {name}: {got} vs official {want}"


def test_greedy_generation(model, reference, image):
    g = model.generate(image, torch.from_numpy(reference["input_ids"]), max_new_tokens=8, return_step_logits=True)
    assert g.ids.tolist() == reference["greedy"].tolist()
    close(g.step_logits[:, 0], reference["greedy_step_logits"], "per-step logits")


def force(tokens: torch.Tensor):
    def processor(ids_so_far: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(logits, float("-inf"))
        out[:, tokens[ids_so_far.shape[1]]] = 0.0
        return out

    return processor


# float16 storage: one step is 2^-10 relative, plus the fixture's observed cross-thread noise
F16 = dict(rtol=2 ** -10, atol=2e-3)


@pytest.mark.parametrize("case", ["one", "two"])
def test_seg_generation(model, reference, image, case):
    forced = torch.from_numpy(reference[f"seggen_{case}_forced"])[0]
    g = model.generate(image, torch.from_numpy(reference["input_ids"]), max_new_tokens=len(forced),
                       logits_processor=force(forced))
    assert g.ids.tolist() == reference[f"seggen_{case}_sequences"].tolist()
    assert g.has_seg.tolist() == [True]
    close(g.seg_hidden, reference[f"seggen_{case}_seg_hidden"], "seg hidden")
    with torch.no_grad():
        close(model.seg_projector(g.seg_hidden), reference[f"seggen_{case}_seg_prompt"], "seg prompt")
    close(g.seg_logits, reference[f"seggen_{case}_seg_logits"].astype(np.float32), "seg logits", **F16)


def test_seg_as_first_token_is_ignored(model, reference, image):
    forced = torch.from_numpy(reference["seggen_first_forced"])[0]
    g = model.generate(image, torch.from_numpy(reference["input_ids"]), max_new_tokens=len(forced),
                       logits_processor=force(forced))
    assert g.ids.tolist() == reference["seggen_first_sequences"].tolist()
    assert bool(reference["seggen_first_all_neginf"])
    assert torch.isneginf(g.seg_logits).all()


def test_m3d_clip(fixture_dir, reference, image):
    clip = checkpoint.load_clip(fixture_dir / "clip")
    images = torch.cat([image, 1.0 - image])
    with torch.no_grad():
        out = clip(images, torch.from_numpy(reference["clip_input_ids"]),
                   torch.from_numpy(reference["clip_attention_mask"]))
    close(out.image_embeds, reference["clip_image_embeds"], "clip image embeds")
    close(out.text_embeds, reference["clip_text_embeds"], "clip text embeds")
    close(out.logits, reference["clip_logits"], "clip logits")
    assert out.loss.item() == pytest.approx(float(reference["clip_loss"]), rel=1e-5)
