"""Training stages on the tiny model: the loss goes down, resume continues exactly, checkpoints reload bit-exactly."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from m3d_edge.config import preset
from m3d_edge.data.datasets import LaMedCollator, LaMedSample, SampleList
from m3d_edge.model import checkpoint
from m3d_edge.train import stages
from m3d_edge.train.loop import TrainConfig, run

WORDS = "the liver spleen kidney is normal enlarged lesion in segment it [SEG] . where what organ".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A real word-level tokenizer whose ids fit the tiny model: BOS 1, EOS 2, <im_patch> 256 ... [SEG] 259."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS) if w != "[SEG]"},
             "<im_patch>": 256, "<bx_start>": 257, "<bx_end>": 258, "[SEG]": 259}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    fast.add_tokens(["<im_patch>", "<bx_start>", "<bx_end>"], special_tokens=True)
    fast.add_tokens(["[SEG]"])
    return fast


def samples(n: int = 4) -> list[LaMedSample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = rng.random((1, 32, 256, 256), dtype=np.float32)
        mask = np.zeros((1, 32, 256, 256), np.float32)
        mask[:, 8:20, 64 + 8 * i:160, 100:200] = 1
        seg = i % 2 == 0
        out.append(LaMedSample(image, "segment the liver" if seg else "what organ",
                               "it is [SEG] ." if seg else "the spleen is normal", mask if seg else None))
    return out


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    model = checkpoint.build(preset("tiny"))
    collate = LaMedCollator(tiny_tokenizer(), model.cfg.num_image_tokens, model.cfg.vision.image_size, 300)
    return model, collate


def test_collator_labels_follow_the_official_layout(tiny):
    model, collate = tiny
    batch = collate(samples(2))
    ids, labels = batch["input_ids"], batch["labels"]
    n = model.cfg.num_image_tokens
    assert ids[0, 0] == 1 and (ids[0, 1:n + 1] == 256).all()
    # question "segment the liver" = 3 tokens after the image placeholders; labels start at the answer
    assert (labels[0, :n + 4] == -100).all() and labels[0, n + 4] == ids[0, n + 4]
    answer = ids[0, n + 4:int(batch["attention_mask"][0].sum())].tolist()
    assert answer[-1] == 2 and 259 in answer  # EOS is written and kept as a label; [SEG] is in the answer
    assert batch["segs"].shape == (2, 1, 32, 256, 256) and batch["segs"][1].sum() == 0


def test_collator_refuses_a_wrong_mask_shape(tiny):
    _, collate = tiny
    bad = LaMedSample(np.zeros((1, 32, 256, 256), np.float32), "segment the liver", "it is [SEG] .",
                      np.zeros((32, 256, 256), np.float32), source="case_007/mask.npy")
    with pytest.raises(ValueError, match=r"case_007/mask.npy: mask has shape \(32, 256, 256\)"):
        collate([bad])


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_stage_lowers_the_loss(tiny, tmp_path, stage):
    model, collate = tiny
    params = stages.align_params(model) if stage == "align" else stages.instruct_params(model)
    cfg = TrainConfig(out=str(tmp_path / stage), max_steps=8, batch_size=2, lr=1e-2 if stage == "align" else 3e-3,
                      warmup_ratio=0.0, save_every=100, progress=False)
    batch = samples(2)
    if stage == "align":  # stage 1 learns from captions only: no masks
        batch = [dataclasses.replace(s, mask=None, question="what organ", answer="the liver is normal") for s in batch]
    data = SampleList(batch)  # one fixed batch: the loss must fall when the stage can learn
    result = run(model, params, data, collate, stages.lamed_loss, cfg)
    first, last = result.losses[0], result.losses[-1]
    # align moves only the projector, which reaches the answer through attention alone: measured 5.56 -> 5.27 in
    # 8 steps; instruct (LoRA + projector + vision + seg) measured 7.15 -> 6.24
    required = {"align": first - 0.15, "instruct": 0.92 * first}[stage]
    assert result.step == 8 and last < required, f"{stage}: loss {first:.3f} -> {last:.3f}, needed < {required:.3f}"
    log = [json.loads(line) for line in result.log.read_text().splitlines()]
    assert len(log) == 8 and "lm_loss" in log[0]
    if stage == "instruct":
        assert "dice_loss" in log[0]
        adapter, settings = stages.merge_lora(model)
        assert settings["r"] == 16 and settings["lora_alpha"] == 32
        assert any("lora_A" in k for k in adapter)
        assert not any("lora" in n for n, _ in model.named_parameters())


def test_resume_continues_from_the_same_step(tmp_path):
    def fresh():
        torch.manual_seed(0)
        model = checkpoint.build(preset("tiny"))
        return model, LaMedCollator(tiny_tokenizer(), 256, (32, 256, 256), 300)

    data = SampleList(samples(4))
    cfg = dict(max_steps=4, batch_size=2, lr=1e-3, warmup_ratio=0.0, save_every=2, progress=False, seed=3)
    straight, collate = fresh()
    run(straight, stages.align_params(straight), data, collate, stages.lamed_loss,
        TrainConfig(out=str(tmp_path / "a"), **cfg))
    interrupted, collate = fresh()
    calls = []

    def crashing_loss(model, batch):  # the process dies during step 3, after the step-2 checkpoint
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return stages.lamed_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        run(interrupted, stages.align_params(interrupted), data, collate, crashing_loss,
            TrainConfig(out=str(tmp_path / "b"), **cfg))
    resumed, collate = fresh()
    result = run(resumed, stages.align_params(resumed), data, collate, stages.lamed_loss,
                 TrainConfig(out=str(tmp_path / "b"), **cfg))
    assert result.resumed_from == 2 and result.step == 4 and len(result.losses) == 2
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"{k} differs after resume"
