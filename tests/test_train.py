"""Training stages on the tiny model: the loss goes down, resume continues exactly, checkpoints reload bit-exactly."""

import dataclasses
import json
import warnings
from pathlib import Path

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


def test_adding_lora_keeps_peft_and_transformers_deprecation_quiet(tiny):
    """peft 0.21 calls transformers 5's deprecated is_gradient_checkpointing when it wraps a model, a FutureWarning
    that every load of a LoRA checkpoint (make demo's bundle build among them) printed; `lora.with_lora` hides it,
    and the adapters are still there."""
    model, _ = tiny
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stages.add_lora(model)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)], [str(w.message) for w in caught]
    assert any("lora_A" in name for name, _ in model.llm.named_parameters())


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


def _shared_seg_tiny():
    cfg = preset("tiny")
    return dataclasses.replace(cfg, seg=dataclasses.replace(cfg.seg, share_vision_encoder=True))


def test_cached_vision_features_give_the_same_loss(tiny):
    """A stage with a frozen tower feeds cached patch tokens instead of images: LM, Dice and BCE are unchanged."""
    _, collate = tiny
    torch.manual_seed(0)
    model = checkpoint.build(_shared_seg_tiny()).eval()
    batch = collate(samples(2))
    with torch.no_grad():
        full = model(batch["images"], batch["input_ids"], labels=batch["labels"], segs=batch["segs"],
                     attention_mask=batch["attention_mask"])
        patches = model.vision_features(batch["images"])
        cached = model(None, batch["input_ids"], labels=batch["labels"], segs=batch["segs"],
                       attention_mask=batch["attention_mask"], patch_tokens=patches)
    for name in ("lm_loss", "dice_loss", "bce_loss"):
        assert torch.equal(getattr(full, name), getattr(cached, name)), name
    # a model whose seg module has its own encoder cannot segment from the tower's features alone
    own = checkpoint.build(preset("tiny")).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="own image encoder"):
        own(None, batch["input_ids"], labels=batch["labels"], segs=batch["segs"], patch_tokens=patches)


def test_seg_states_are_the_forward_hidden_states_at_seg(tiny):
    """LaMed.seg_states (the seg stage's cache, no LM head) equals the forward's hidden state before the [SEG],
    bit for bit (the mean of the two, to float rounding, when there are two); a sequence without [SEG] is
    flagged."""
    _, collate = tiny
    torch.manual_seed(0)
    model = checkpoint.build(_shared_seg_tiny()).eval()
    seg_id = model.cfg.seg_token_id
    one, _ = collate.encode(LaMedSample(None, "segment the liver", "it is [SEG] ."))
    two, _ = collate.encode(LaMedSample(None, "segment the liver", "[SEG] and [SEG] ."))
    none, _ = collate.encode(LaMedSample(None, "what organ", "the spleen is normal"))
    patches = torch.randn(1, *model.vision_features(torch.rand(1, 1, 32, 256, 256)).shape[1:])
    with torch.no_grad():
        for ids, n_seg in ((one, 1), (two, 2), (none, 0)):
            ids = torch.tensor([ids])
            at = [p - 1 for p in (ids[0] == seg_id).nonzero().flatten().tolist()]
            assert len(at) == n_seg
            h, found = model.seg_states(None, ids, patch_tokens=patches)
            assert bool(found) == (n_seg > 0)
            if n_seg:
                hidden = model(None, ids, patch_tokens=patches).hidden[0]
                torch.testing.assert_close(h[0], hidden[at].mean(0), rtol=0, atol=1e-6)
            if n_seg == 1:
                assert torch.equal(h[0], hidden[at[0]])


def test_per_sample_lm_loss_weighs_every_sample_alike(tiny):
    """stages.lamed_loss(per_sample=True): the LM term is the mean of each sample's own (official) LM loss, taken on
    that sample alone; the token mean of the batch differs when the answers differ in length; Dice + BCE stay."""
    model, collate = tiny
    model.eval()
    batch_samples = samples(3)  # samples 0 and 2 carry masks
    batch_samples[1] = dataclasses.replace(batch_samples[1], answer="the liver is normal the spleen is enlarged")
    with torch.no_grad():
        mixed, m = stages.lamed_loss(model, collate(batch_samples), per_sample=True)
        token, t = stages.lamed_loss(model, collate(batch_samples))
        alone = [stages.lamed_loss(model, collate([s]))[1]["lm_loss"] for s in batch_samples]
    reference = float(np.mean(alone))
    assert m["lm_loss"] == pytest.approx(reference, rel=1e-5)
    assert abs(t["lm_loss"] - reference) > 1e-3  # the official token mean is a different number
    assert m["dice_loss"] == t["dice_loss"] and m["bce_loss"] == t["bce_loss"]
    assert float(mixed) == pytest.approx(reference + m["dice_loss"] + m["bce_loss"], rel=1e-5)
    assert float(token) == pytest.approx(t["lm_loss"] + t["dice_loss"] + t["bce_loss"], rel=1e-5)


def test_collator_without_images_and_mixed_batches(tiny):
    _, collate = tiny
    s = samples(2)
    text_only = [dataclasses.replace(x, image=None) for x in s]
    batch = collate(text_only)
    assert "images" not in batch and torch.equal(batch["input_ids"], collate(s)["input_ids"])
    with pytest.raises(ValueError, match="mixes samples with and without images"):
        collate([s[0], text_only[1]])


def test_clip_stage_with_seg_warm_up_lowers_both_losses(tmp_path):
    """The CLIP stage of the recipe (contrastive + class-prompted masks on the shared tower) learns on a fixed
    batch: both the contrastive and the Dice loss fall."""
    from transformers import BertConfig

    from m3d_edge.config import ClipConfig
    from m3d_edge.model.clip import M3DCLIP, build_text_encoder
    from m3d_edge.model.segvol import SegVol
    from m3d_edge.train.recipe import VisionPretraining, vision_loss

    torch.manual_seed(0)
    cfg = _shared_seg_tiny()
    bert = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64).to_dict()
    clip_cfg = ClipConfig(vision=cfg.vision, text_hf_config=bert, text_pooling="mean")
    clip = M3DCLIP(clip_cfg, build_text_encoder(clip_cfg))
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)
    model = VisionPretraining(clip, SegVol(cfg.seg, cfg.vision), ["liver", "spleen"], cfg.mm_hidden_size)
    s = samples(4)
    masks = torch.stack([torch.from_numpy(x.mask if x.mask is not None else samples(1)[0].mask) for x in s])
    # four scans that differ in brightness (pure-noise scans give one CLS feature for all at initialisation)
    images = torch.stack([0.2 * i + 0.1 + 0.05 * torch.from_numpy(x.image) for i, x in enumerate(s)])
    batch = {"images": images, "input_ids": torch.randint(1, 64, (4, 12)),
             "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "seg_images": images, "seg_masks": masks, "seg_classes": torch.tensor([0, 1, 0, 1])}
    data = SampleList([0])
    result = run(model, [p for p in model.parameters() if p.requires_grad], data, lambda _: batch, vision_loss,
                 TrainConfig(out=str(tmp_path / "clip"), max_steps=10, batch_size=1, lr=1e-3, warmup_ratio=0.0,
                             save_every=100, progress=False))
    log = [json.loads(line) for line in result.log.read_text().splitlines()]
    assert log[-1]["clip_loss"] < 0.8 * log[0]["clip_loss"], [r["clip_loss"] for r in log]
    seg = [r["dice_loss"] + r["bce_loss"] for r in log]  # the seg path learns (BCE first, on a fixed batch)
    assert seg[-1] < seg[0] - 0.05, seg


def _tiny_vision_pretraining(classes):
    from transformers import BertConfig

    from m3d_edge.config import ClipConfig
    from m3d_edge.model.clip import M3DCLIP, build_text_encoder
    from m3d_edge.model.segvol import SegVol
    from m3d_edge.train.recipe import VisionPretraining

    cfg = _shared_seg_tiny()
    bert = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64).to_dict()
    clip_cfg = ClipConfig(vision=cfg.vision, text_hf_config=bert, text_pooling="mean")
    return VisionPretraining(M3DCLIP(clip_cfg, build_text_encoder(clip_cfg)), SegVol(cfg.seg, cfg.vision), classes,
                             cfg.mm_hidden_size)


def test_seg_warm_up_loss_is_one_tower_pass_per_image():
    """Several masks of an image share one pass of the tower: the loss equals that of the image repeated once
    per mask (the CLIP stage's one-mask-per-pass form)."""
    from m3d_edge.train.recipe import class_seg_loss, seg_warmup_loss

    torch.manual_seed(0)
    model = _tiny_vision_pretraining(["liver", "spleen", "lesion"]).eval()
    s = samples(4)
    images = torch.stack([torch.from_numpy(x.image) for x in s[:2]])
    masks = torch.stack([torch.from_numpy(s[i].mask if s[i].mask is not None else s[0].mask) for i in (0, 2, 0)])
    classes, owner = torch.tensor([0, 2, 1]), torch.tensor([0, 0, 1])
    with torch.no_grad():
        loss, metrics = seg_warmup_loss(model, {"images": images, "seg_masks": masks, "seg_classes": classes,
                                                "seg_owner": owner})
        patches = model.clip.vision_encoder(images[owner])[:, 1:]
        ref, ref_metrics = class_seg_loss(model, images[owner], patches, masks, classes)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert metrics == pytest.approx(ref_metrics, rel=1e-5)


def test_seg_sets_group_the_masks_of_each_image():
    from m3d_edge.data.datasets import TaskItem
    from m3d_edge.train.recipe import seg_sets

    items = [TaskItem("seg", "a.npy", "q", "a", "a_lesion.npy", target="lesion"),
             TaskItem("seg", "a.npy", "q", "a", "a_liver.npy", target="liver"),
             TaskItem("seg", "a.npy", "q", "a", None, target="spleen"),  # not visible: no mask
             TaskItem("seg", "b.npy", "q", "a", "b_aorta.npy", target="aorta"),
             TaskItem("vqa_closed", "c.npy", "q", "a", target="A"),
             TaskItem("seg", "c.npy", "q", "a", "c_spleen.npy", target="spleen")]
    assert seg_sets(items, ("liver", "spleen", "lesion")) == [
        ("a.npy", [("a_liver.npy", "liver"), ("a_lesion.npy", "lesion")]), ("c.npy", [("c_spleen.npy", "spleen")])]


def test_seg_warm_up_lowers_the_seg_loss(tmp_path):
    """The recipe's seg warm-up, run on files: Dice + BCE fall over ten steps on two images of two masks each, and
    the run resumes as complete."""
    from m3d_edge.train.recipe import RecipeConfig, train_seg_warmup

    torch.manual_seed(0)
    model = _tiny_vision_pretraining(["liver", "spleen"])
    s = samples(4)
    sets = []
    for i in range(2):
        image = tmp_path / f"img{i}.npy"
        np.save(image, (0.3 * i + 0.1 + 0.05 * s[i].image).astype(np.float32))
        pairs = []
        for name, j in (("liver", 0), ("spleen", 2)):
            mask = tmp_path / f"img{i}_{name}.npy"
            np.save(mask, s[j].mask)
            pairs.append((str(mask), name))
        sets.append((str(image), pairs))
    cfg = RecipeConfig(out=str(tmp_path), seg_warmup_steps=10, lr_seg=1e-3, mixed_precision="no", progress=False)
    train_seg_warmup(cfg, model, sets, tmp_path / "warm")
    log = [json.loads(line) for line in (tmp_path / "warm" / "log.jsonl").read_text().splitlines()]
    seg = [r["dice_loss"] + r["bce_loss"] for r in log]
    assert len(seg) == 10 and np.mean(seg[-2:]) < np.mean(seg[:2]) - 0.05, seg
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_seg_warmup(cfg, model, sets, tmp_path / "warm")  # complete: resumes at step 10 and trains nothing
    assert len((tmp_path / "warm" / "log.jsonl").read_text().splitlines()) == 10
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_text_pooling_mean_is_the_masked_mean(tmp_path):
    from transformers import BertConfig

    from m3d_edge.config import ClipConfig
    from m3d_edge.model.clip import M3DCLIP, build_text_encoder

    torch.manual_seed(0)
    bert = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64).to_dict()
    cfg = ClipConfig(vision=preset("tiny").vision, text_hf_config=bert, text_pooling="mean")
    clip = M3DCLIP(cfg, build_text_encoder(cfg)).eval()
    ids = torch.randint(1, 64, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        hidden = clip.language_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = torch.stack([hidden[0].mean(0), hidden[1, :4].mean(0)])
        expected = torch.nn.functional.normalize(clip.mm_language_proj(expected), dim=-1)
        assert torch.allclose(clip.encode_text(ids, mask), expected, atol=1e-6)
    with pytest.raises(ValueError, match="text_pooling"):
        ClipConfig(vision=preset("tiny").vision, text_hf_config=bert, text_pooling="max")



TWO_PROCESS_STEP = '''
import hashlib, json, os, sys
sys.path.insert(0, sys.argv[2])
import torch
from test_train import samples, tiny_tokenizer
from m3d_edge.config import preset
from m3d_edge.data.datasets import LaMedCollator, SampleList
from m3d_edge.model import checkpoint
from m3d_edge.train import stages
from m3d_edge.train.loop import TrainConfig, run

torch.manual_seed(0)
model = checkpoint.build(preset("tiny"))
collate = LaMedCollator(tiny_tokenizer(), 256, (32, 256, 256), 300)
res = run(model, stages.align_params(model), SampleList(samples(4)), collate, stages.lamed_loss,
          TrainConfig(out=sys.argv[1], max_steps=2, batch_size=1, lr=1e-3, warmup_ratio=0.0, save_every=2,
                      progress=False, seed=3))
from accelerate import PartialState
state = PartialState()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.mm_projector.parameters()))
with open(os.path.join(sys.argv[1], f"rank{state.process_index}.json"), "w") as f:
    json.dump({"world": state.num_processes, "type": str(state.distributed_type), "losses": res.losses,
               "projector": digest.hexdigest()}, f)
'''


def test_two_cpu_processes_train_one_job(tmp_path):
    """The same loop under torchrun with 2 CPU processes: accelerate makes it one gloo job (MULTI_CPU); each rank
    sees its own samples, the gradients are averaged, so both ranks end with the same projector weights; the
    checkpoint holds both ranks' RNG states."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "step.py"
    script.write_text(TWO_PROCESS_STEP)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(script), str(out), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["world"] == 2 and r["type"] == "DistributedType.MULTI_CPU" for r in ranks)
    assert ranks[0]["projector"] == ranks[1]["projector"]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # different samples on each rank
    step = out / "checkpoints" / "step-000002"
    assert {p.name for p in step.iterdir()} >= {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"}


def test_recipe_config_refuses_an_unknown_closed_vqa_format(tmp_path):
    from m3d_edge.train.recipe import RecipeConfig

    assert RecipeConfig(out=str(tmp_path), closed_vqa_format="content").closed_vqa_format == "content"
    with pytest.raises(ValueError, match="closed_vqa_format must be one of letter, content"):
        RecipeConfig(out=str(tmp_path), closed_vqa_format="text")


@pytest.mark.parametrize("train_vision", [False, True])
def test_instruct_groups_train_the_tower_with_the_seg_module(tiny, tmp_path, train_vision):
    """Stage 2's optimizer groups: every trainable value in exactly one group; the vision tower (with
    train_vision) at the seg module's rate, and a step moves it; frozen, it is in no group and stays put."""
    from m3d_edge.train.recipe import RecipeConfig, instruct_groups

    _, collate = tiny
    torch.manual_seed(0)
    model = checkpoint.build(_shared_seg_tiny())
    cfg = RecipeConfig(out=str(tmp_path), lr_instruct=1e-3, lr_seg=1e-3, lr_seg_instruct=2e-4,
                       train_vision=train_vision, mixed_precision="no", progress=False)
    params = stages.instruct_params(model, train_vision=cfg.train_vision)
    groups = instruct_groups(cfg, model, params)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in params) and len(set(grouped)) == len(grouped)
    tower = {id(p) for p in model.vision_tower.parameters()}
    module = {id(p) for p in model.seg_module.parameters()}
    assert {id(p) for p in groups[2]["params"]} == (module | tower if train_vision else module)
    assert groups[2]["lr"] == 2e-4 and groups[1]["lr"] == 1e-3 and "lr" not in groups[0]
    before = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    run(model, groups, SampleList(samples(2)), collate, stages.lamed_loss,
        TrainConfig(out=str(tmp_path / "run"), max_steps=1, batch_size=2, lr=cfg.lr_instruct, warmup_ratio=0.0,
                    save_every=100, progress=False, mixed_precision="no"))
    moved = [k for k, v in model.vision_tower.state_dict().items() if not torch.equal(before[k], v)]
    assert bool(moved) == train_vision, moved


def _seg_stage_items(folder: Path) -> list:
    """Two images in `folder`, each with a liver and a spleen mask: four seg items."""
    from m3d_edge.data.datasets import TaskItem

    s = samples(4)
    items = []
    for i in range(2):
        image = folder / f"img{i}.npy"
        np.save(image, (0.3 * i + 0.1 + 0.05 * s[i].image).astype(np.float32))
        for name, j in (("liver", 0), ("spleen", 2)):
            mask = folder / f"img{i}_{name}.npy"
            np.save(mask, s[j].mask)
            items.append(TaskItem("seg", str(image), f"segment the {name}", "it is [SEG] .", str(mask), target=name))
    return items


def test_seg_stage_trains_an_added_detail_path(tmp_path):
    """The seg stage from a trained model: a detail path added at zero leaves the masks as they were; ten steps
    on cached [SEG] states and tower tokens lower Dice + BCE, and train the path and the seg projector, not the
    LLM or the tower."""
    from m3d_edge.train.recipe import RecipeConfig, add_detail_path, train_seg

    torch.manual_seed(0)
    model = checkpoint.build(_shared_seg_tiny()).eval()
    collate = LaMedCollator(tiny_tokenizer(), model.cfg.num_image_tokens, model.cfg.vision.image_size, 300)
    items = _seg_stage_items(tmp_path)
    x = torch.from_numpy(np.load(items[0].image))[None]
    hidden = torch.randn(1, model.cfg.llm.hidden_size)
    with torch.no_grad():
        before = model.segment(x, hidden)
        add_detail_path(model, 4)
        assert model.cfg.seg.detail_channels == 4 and model.seg_module.has_detail
        torch.testing.assert_close(model.segment(x, hidden), before, rtol=0, atol=0)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("seg_module.", "seg_proj"))}
    cfg = RecipeConfig(out=str(tmp_path), seg_steps=10, lr_seg=3e-3, mixed_precision="no", progress=False)
    train_seg(cfg, model, collate, items, tmp_path / "seg")
    log = [json.loads(line) for line in (tmp_path / "seg" / "log.jsonl").read_text().splitlines()]
    seg = [r["dice_loss"] + r["bce_loss"] for r in log]
    assert len(seg) == 10 and np.mean(seg[-2:]) < np.mean(seg[:2]) - 0.05, seg
    assert model.seg_module.detail.out.weight.abs().sum() > 0
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in frozen.items())


def test_seg_states_cache_is_read_back_by_a_later_stage(tmp_path, capsys):
    """With a states cache, a first seg stage computes and stores the [SEG] states; a second stage from the same
    frozen weights (its seg module trained or not) reads them all and trains exactly as the first did; other
    frozen weights, other tower tokens or other token ids miss; a damaged file is refused."""
    import copy

    from m3d_edge.train.recipe import RecipeConfig, SegStateCache, train_seg

    torch.manual_seed(0)
    model = checkpoint.build(_shared_seg_tiny()).eval()
    twin = copy.deepcopy(model)
    collate = LaMedCollator(tiny_tokenizer(), model.cfg.num_image_tokens, model.cfg.vision.image_size, 300)
    items = _seg_stage_items(tmp_path)
    cache = tmp_path / "cache"

    def stage(m, out: str) -> tuple[list[float], str]:
        cfg = RecipeConfig(out=str(tmp_path), seg_steps=3, lr_seg=3e-3, mixed_precision="no", progress=False,
                           seg_states_cache=str(cache))
        train_seg(cfg, m, collate, items, tmp_path / out)
        log = (tmp_path / out / "log.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in log], capsys.readouterr().out

    first, said = stage(model, "a")
    assert "0 [SEG] states read" in said and "4 computed" in said
    assert len(list(cache.glob("seg-states-*.safetensors"))) == 1
    again, said = stage(twin, "b")  # the same frozen weights, the seg module as it was before "a"
    assert "4 [SEG] states read" in said and "0 computed" in said
    assert again == first
    _, said = stage(model, "c")  # the seg module trained by "a": still the same states
    assert "4 [SEG] states read" in said

    other = copy.deepcopy(twin)
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if n.startswith("llm.")).add_(1e-3)
    assert SegStateCache(cache, other).path != SegStateCache(cache, twin).path
    assert not SegStateCache(cache, other).states and len(SegStateCache(cache, twin).states) == 4
    tokens, stored = torch.ones(2, 3), SegStateCache(cache, twin)
    assert stored.key("a.npy", tokens, [1, 5, 259]) != stored.key("a.npy", tokens, [1, 5, 6, 259])
    assert stored.key("a.npy", tokens, [1, 5, 259]) != stored.key("b.npy", tokens + 1e-6, [1, 5, 259])
    assert stored.key("a.npy", tokens, [1, 5, 259]) == stored.key("c.npy", tokens.clone(), [1, 5, 259])
    next(cache.glob("*.safetensors")).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="delete it"):
        SegStateCache(cache, twin)


def test_seg_stage_entries_repeat_the_key_organs():
    """key_repeat R: every image R times an epoch with all its key-organ masks and every R-th other mask (offset
    by the pass), so each mask comes at least once and the key organs R times; an empty entry is dropped; R=1 is
    one entry an image with every mask (the stage as v7 and v8 ran it)."""
    from m3d_edge.train.recipe import RecipeConfig, seg_stage_entries

    classes = {"a.npy": ["liver", "aorta", "spleen", "lung", "stomach"], "b.npy": ["aorta"]}
    assert seg_stage_entries(classes, 1) == [("a.npy", (0, 1, 2, 3, 4)), ("b.npy", (0,))]
    assert seg_stage_entries(classes, 2) == [("a.npy", (0, 1, 2, 4)), ("a.npy", (0, 2, 3)), ("b.npy", (0,))]
    entries = seg_stage_entries(classes, 3)
    seen = [(image, i) for image, picked in entries for i in picked]
    assert seen.count(("a.npy", 0)) == seen.count(("a.npy", 2)) == 3
    assert all(seen.count(k) == 1 for k in (("a.npy", 1), ("a.npy", 3), ("a.npy", 4), ("b.npy", 0)))
    with pytest.raises(ValueError, match="seg_key_repeat"):
        RecipeConfig(out="x", seg_key_repeat=0)


def test_training_items_join_the_extra_data_sets(tmp_path):
    """validated_items with extra data sets: the training samples of --data, then those of each extra set, each
    checked; one folder given twice is refused (its samples would count double)."""
    from conftest import TOTALSEG
    from m3d_edge.data import phantom as P
    from m3d_edge.data.datasets import task_items
    from m3d_edge.train.recipe import RecipeConfig, validated_items

    a, b = (P.synthesize(tmp_path / name, 2, seed, splits=(("train", 1), ("test", 1)), progress=False,
                         template_dir=TOTALSEG, n_scan_copies=0) for name, seed in (("a", 0), ("b", 1)))
    cfg = RecipeConfig(out=str(tmp_path / "run"))
    items = validated_items(cfg, a, [b])
    first, second = task_items(a, "train"), task_items(b, "train")
    assert items == first + second and len(first) > 0 and len(second) > 0
    assert all(Path(it.image).is_relative_to(b) for it in second)
    with pytest.raises(ValueError, match="given twice"):
        validated_items(cfg, a, [tmp_path / "b" / ".." / "a"])
