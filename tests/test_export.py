"""Export: every ONNX graph against torch, the runtime decoder loop against LaMed.generate, quantization, bundles.

Relative error is max|onnx - torch| / max|torch| over the whole output.
"""

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from m3d_edge.cli import main as cli
from m3d_edge.config import LLMSpec, preset
from m3d_edge.export import bundle as bundle_export
from m3d_edge.export import llm as llm_export
from m3d_edge.export import onnx as onnx_export
from m3d_edge.export import quantize
from m3d_edge.model import checkpoint
from m3d_edge.model.checkpoint import CheckpointError
from m3d_edge.runtime import bundle as bundle_reader
from m3d_edge.runtime.decoder import Decoder, DecoderBatch, DecoderSpec, GenerationOptions, greedy, top_p_sample
from m3d_edge.runtime.engines import Engines, create_session

from conftest import run_without_modules

SEG_ID = 259  # tiny preset and fixture


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def forced(tokens):
    """Logits processors (torch and numpy) that force `tokens`, one per step."""
    def torch_proc(sofar, logits):
        out = torch.full_like(logits, float("-inf"))
        out[:, tokens[sofar.shape[1]]] = 0
        return out

    def numpy_proc(sofar, logits):
        out = np.full_like(logits, -np.inf)
        out[tokens[len(sofar)]] = 0
        return out

    return torch_proc, numpy_proc


@pytest.fixture(scope="module")
def official(fixture_dir):
    return checkpoint.load(fixture_dir)


@pytest.fixture(scope="module")
def official_inputs(reference):
    return torch.from_numpy(reference["image"]), torch.from_numpy(reference["input_ids"])


@pytest.fixture(scope="module")
def official_decoder(official, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoder-official")
    llm_export.export_decoder(official, out)
    return out / "decoder.onnx"


@pytest.fixture(scope="module")
def official_prompt(official, official_inputs):
    image, ids = official_inputs
    with torch.no_grad():
        return official.prompt_embeds(ids, official.encode_images(image)).numpy()  # [1, T, H]


def make_decoder(model, path, table=None, max_length=512):
    spec = DecoderSpec.from_manifest(llm_export.decoder_spec(model))
    table = model.embed_tokens.weight.detach().numpy() if table is None else table
    return Decoder(create_session(path), spec, table, max_length=max_length)


# -- vision and segmentation graphs --------------------------------------------------------------------------------

def _shared_tiny(detail_channels: int = 0):
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, seg=dataclasses.replace(cfg.seg, share_vision_encoder=True,
                                                           detail_channels=detail_channels))
    torch.manual_seed(0)
    model = checkpoint.build(cfg).eval()
    if detail_channels:  # the path's last layer starts at zero: give it weights, or the test could not fail
        torch.nn.init.normal_(model.seg_module.detail.out.weight, std=0.5)
    return model


@pytest.mark.parametrize("which", ["official", "shared", "detail"])
def test_vision_and_seg_graphs_match_torch(which, official, tmp_path):
    """... and a seg module with a detail path (ours) has it as a graph of its own, seg_detail.onnx, whose output
    seg_decoder.onnx reads."""
    model = {"official": lambda: official, "shared": _shared_tiny, "detail": lambda: _shared_tiny(4)}[which]()
    paths = onnx_export.export_all(model, tmp_path)
    shared = which != "official"
    assert sorted(paths) == {"official": ["seg_decoder", "seg_encoder", "vision"], "shared": ["seg_decoder", "vision"],
                             "detail": ["seg_decoder", "seg_detail", "vision"]}[which]
    g = torch.Generator().manual_seed(1)
    images = torch.rand((2, 1, 32, 256, 256), generator=g)  # batch 2: the batch axis is dynamic
    seg_hidden = torch.randn((2, model.cfg.llm.hidden_size), generator=g)
    with torch.no_grad():
        patch = model.vision_features(images)
        tokens = model.mm_projector(patch)
        embedding = model.seg_embedding(images, patch)
        masks = model.segment(images, seg_hidden, patch)
    # attention is traced in query chunks (2049 queries with the CLS token -> 9 Softmax nodes per layer)
    chunks = -(-(model.cfg.vision.num_patches + 1) // onnx_export.ATTENTION_QUERY_CHUNK)
    softmax = sum(n.op_type == "Softmax" for n in onnx.load(str(paths["vision"])).graph.node)
    assert softmax == model.cfg.vision.num_layers * chunks
    out = session(paths["vision"]).run(None, {"images": images.numpy()})
    assert rel_err(out[0], tokens) <= 1e-4, f"vision.onnx image_tokens rel err {rel_err(out[0], tokens):.2e}"
    if shared:
        assert rel_err(out[1], patch) <= 1e-4, f"vision.onnx patch_tokens rel err {rel_err(out[1], patch):.2e}"
        image_in = {"patch_tokens": out[1]}
    else:
        emb = session(paths["seg_encoder"]).run(None, {"images": images.numpy()})[0]
        assert emb.shape == (2, model.cfg.seg.embed_dim, 8, 16, 16)
        assert rel_err(emb, embedding) <= 1e-4, f"seg_encoder.onnx rel err {rel_err(emb, embedding):.2e}"
        image_in = {"seg_embedding": emb}
    if which == "detail":
        detail = session(paths["seg_detail"]).run(None, {"images": images.numpy()})[0]
        with torch.no_grad():
            want = model.seg_module.detail_features(images)
        assert detail.shape == (2, 12, 32, 64, 64)
        assert rel_err(detail, want) <= 1e-4, f"seg_detail.onnx rel err {rel_err(detail, want):.2e}"
        image_in["seg_detail"] = detail
        with torch.no_grad():
            assert rel_err(model.seg_module.decode(embedding, model.seg_projector(seg_hidden),
                                                   detail=torch.zeros(1, 12, 32, 64, 64)), masks) > 1e-2
    logits = session(paths["seg_decoder"]).run(None, {**image_in, "seg_hidden": seg_hidden.numpy()})[0]
    assert logits.shape == (2, 1, 32, 256, 256)
    assert rel_err(logits, masks) <= 1e-4, f"seg_decoder.onnx rel err {rel_err(logits, masks):.2e}"


def test_fp16_graphs_stay_close(official, tmp_path):
    paths = onnx_export.export_all(official, tmp_path, precision="fp16")
    images = torch.rand((1, 1, 32, 256, 256), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = official.encode_images(images)
    out = session(paths["vision"]).run(None, {"images": images.numpy()})[0]
    assert out.dtype == np.float32  # float32 IO around fp16 arithmetic
    # fp16 carries ~3 decimal digits; measured ~7e-4 on this model
    assert rel_err(out, tokens) <= 5e-3, f"fp16 vision.onnx rel err {rel_err(out, tokens):.2e}"


# -- the decoder graph ---------------------------------------------------------------------------------------------

def test_decoder_prefill_with_empty_past_and_one_token_decode(official, official_decoder, official_prompt):
    """The contract without the in-place cache: past of length 0, then one token with the returned presents."""
    sess = session(official_decoder)
    spec = llm_export.decoder_spec(official)
    n_layers, kv, d = spec["num_layers"], spec["num_kv_heads"], spec["head_dim"]
    t = official_prompt.shape[1]
    feeds = {"inputs_embeds": official_prompt, "attention_mask": np.ones((1, t), np.int64)}
    for i in range(n_layers):
        for name in ("key", "value"):
            feeds[f"past_key_values.{i}.{name}"] = np.zeros((1, kv, 0, d), np.float32)
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, feeds)))
    from transformers import DynamicCache

    with torch.no_grad():
        first = official.llm.model(inputs_embeds=torch.from_numpy(official_prompt), cache=DynamicCache(),
                                   use_cache=True)
        logits = official.llm.lm_head(first.last_hidden_state[:, -1])
    assert out["logits"].shape == (1, 1, spec["vocab_size"])
    assert rel_err(out["logits"][:, -1], logits) <= 1e-4
    assert rel_err(out["hidden_states"][:, -1], first.last_hidden_state[:, -1]) <= 1e-4
    nxt = int(logits.argmax())
    step = torch.tensor([[nxt]])
    with torch.no_grad():
        emb = official.embed_tokens(step)
        second = official.llm.model(inputs_embeds=emb, cache=first.cache, use_cache=True)
        logits2 = official.llm.lm_head(second.last_hidden_state[:, -1])
    feeds = {"inputs_embeds": emb.numpy(), "attention_mask": np.ones((1, t + 1), np.int64)}
    for i in range(n_layers):
        for name in ("key", "value"):
            feeds[f"past_key_values.{i}.{name}"] = out[f"present.{i}.{name}"]
    out2 = dict(zip(names, sess.run(None, feeds)))
    assert out2["present.0.key"].shape == (1, kv, t + 1, d)
    assert rel_err(out2["logits"][:, -1], logits2) <= 1e-4
    assert rel_err(out2["hidden_states"][:, -1], second.last_hidden_state[:, -1]) <= 1e-4


def test_chunked_prefill_equals_whole_prefill(official, official_decoder, official_prompt):
    """Past length > 0 with S > 1: the graph has no prefill/decode branch baked in."""
    dec = make_decoder(official, official_decoder)
    whole = dec.forward(official_prompt)
    for split in (1, 100):
        dec.reset()
        dec.forward(official_prompt[:, :split])
        chunked = dec.forward(official_prompt[:, split:])
        assert rel_err(chunked[0], whole[0]) <= 1e-5 and rel_err(chunked[1], whole[1]) <= 1e-5
    dec.reset()
    alone = dec.forward(official_prompt[:, 100:])  # control: without its past the tail gives other logits
    assert rel_err(alone[0], whole[0]) > 1e-3


def test_runtime_greedy_matches_torch_generate(official, official_decoder, official_prompt, official_inputs):
    image, ids = official_inputs
    with torch.no_grad():
        expected = official.generate(image, ids, max_new_tokens=32).ids[0].tolist()
    dec = make_decoder(official, official_decoder)
    streamed = []
    got = dec.generate(official_prompt, GenerationOptions(max_new_tokens=32), on_token=streamed.append)
    assert got.ids == expected and streamed == expected
    assert got.stop_reason == "length" and got.prompt_length == official_prompt.shape[1]
    # the bundle's fp16 embedding table changes nothing here
    table16 = official.embed_tokens.weight.detach().numpy().astype(np.float16)
    half = make_decoder(official, official_decoder, table=table16)
    assert half.generate(official_prompt, GenerationOptions(max_new_tokens=32)).ids == expected


def test_runtime_seg_hidden_matches_torch(official, official_decoder, official_prompt, official_inputs):
    image, ids = official_inputs
    dec = make_decoder(official, official_decoder)
    tokens = [5, 7, SEG_ID, 9, SEG_ID, 2]  # two [SEG]: their predicting states are averaged
    torch_proc, numpy_proc = forced(tokens)
    with torch.no_grad():
        ref = official.generate(image, ids, max_new_tokens=len(tokens), logits_processor=torch_proc)
    got = dec.generate(official_prompt, GenerationOptions(max_new_tokens=len(tokens)), seg_token_id=SEG_ID,
                       logits_processor=numpy_proc)
    assert got.ids == tokens == ref.ids[0].tolist() and bool(ref.has_seg[0])
    err = rel_err(got.seg_hidden, ref.seg_hidden[0])
    assert err <= 1e-4, f"[SEG] hidden rel err {err:.2e}"
    # [SEG] as the very first token has no predicting state of a generated token: ignored, as officially
    torch_proc, numpy_proc = forced([SEG_ID, 5, 6])
    with torch.no_grad():
        ref = official.generate(image, ids, max_new_tokens=3, logits_processor=torch_proc)
    got = dec.generate(official_prompt, GenerationOptions(max_new_tokens=3), seg_token_id=SEG_ID,
                       logits_processor=numpy_proc)
    assert got.seg_hidden is None and not bool(ref.has_seg[0])


def test_runtime_stop_tokens_and_seeded_sampling(official, official_decoder, official_prompt):
    dec = make_decoder(official, official_decoder)
    first = dec.generate(official_prompt, GenerationOptions(max_new_tokens=8)).ids
    stopped = dec.generate(official_prompt, GenerationOptions(max_new_tokens=8, stop_ids=(first[2],)))
    assert stopped.ids == first[:3] and stopped.stop_reason == "stop"
    opts = GenerationOptions(max_new_tokens=12, do_sample=True, top_p=0.9, seed=7)
    a, b = dec.generate(official_prompt, opts).ids, dec.generate(official_prompt, opts).ids
    assert a == b
    stream = dec.stream(official_prompt, opts)
    assert list(stream) == a and stream.result.ids == a
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        make_decoder(official, official_decoder, max_length=100).generate(official_prompt)


def test_decoder_batch_equals_one_by_one(official, official_decoder, official_prompt):
    """Rows of different lengths, options and stop reasons decoded together = each decoded alone (same ids, same
    [SEG] states); finished rows stop growing while the others go on."""
    single = make_decoder(official, official_decoder)
    prompts = [official_prompt, official_prompt[:, :150], official_prompt[:, 40:]]
    first = single.generate(prompts[1], GenerationOptions(max_new_tokens=8)).ids
    options = [GenerationOptions(max_new_tokens=10), GenerationOptions(max_new_tokens=8, stop_ids=(first[2],)),
               GenerationOptions(max_new_tokens=12, do_sample=True, top_p=0.9, seed=7)]
    forcing = [forced([5, 7, SEG_ID, 9, SEG_ID, 2, 3, 4, 5, 6])[1], None, None]
    alone = [single.generate(p, o, seg_token_id=SEG_ID, logits_processor=f)
             for p, o, f in zip(prompts, options, forcing)]
    session = single.session
    batch = DecoderBatch(session, single.spec, single.embeddings, 3, max_length=400)
    together = batch.generate([(p, 0) for p in prompts], options, seg_token_id=SEG_ID, logits_processors=forcing)
    for a, t in zip(alone, together):
        assert t.ids == a.ids and t.stop_reason == a.stop_reason and t.prompt_length == a.prompt_length
    assert together[1].stop_reason == "stop" and len(together[1].ids) == 3
    assert rel_err(together[0].seg_hidden, alone[0].seg_hidden) <= 1e-6
    with pytest.raises(ValueError, match="for a batch of 3"):
        batch.generate([(official_prompt, 0)], options[:1])
    # a row that ends by length exactly at the end of the cache while another row goes on
    full = official_prompt.shape[1] + 4 - 1
    tight = DecoderBatch(session, single.spec, single.embeddings, 2, max_length=full)
    short = [GenerationOptions(max_new_tokens=4), GenerationOptions(max_new_tokens=30)]
    ends = tight.generate([(official_prompt, 0), (official_prompt[:, :150], 0)], short)
    assert [len(g.ids) for g in ends] == [4, 30]
    assert ends[1].ids == single.generate(official_prompt[:, :150], short[1]).ids


def test_sampling_primitives():
    logits = np.array([0.0, 5.0, 4.9, -3.0], dtype=np.float32)
    assert greedy(logits) == 1
    rng = np.random.default_rng(0)
    # top_p=0.5 keeps only the most likely token (its mass alone is above 0.5)
    assert {top_p_sample(logits, top_p=0.5, temperature=1.0, rng=rng) for _ in range(50)} == {1}
    draws = {top_p_sample(logits, top_p=0.99, temperature=1.0, rng=rng) for _ in range(200)}
    assert draws == {1, 2}
    with pytest.raises(ValueError, match="only apply with do_sample"):
        GenerationOptions(top_p=0.9)


def test_phi3_decoder_matches_torch(tmp_path):
    cfg = preset("tiny")
    phi = dict(model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               original_max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, vocab_size=260,
               bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False, hidden_act="silu")
    cfg = dataclasses.replace(cfg, llm=LLMSpec("phi3", "config", phi))
    torch.manual_seed(0)
    model = checkpoint.build(cfg).eval()
    assert type(model.llm).__name__ == "Phi3ForCausalLM"
    llm_export.export_decoder(model, tmp_path)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        expected = model.generate(None, ids, max_new_tokens=16).ids[0].tolist()
        prompt = model.prompt_embeds(ids, None).numpy()
    got = make_decoder(model, tmp_path / "decoder.onnx").generate(prompt, GenerationOptions(max_new_tokens=16))
    assert got.ids == expected


@pytest.fixture(scope="module")
def official_feeds(official):
    from m3d_edge import calibration

    return calibration.decoder_feeds(official, llm_export.stand_in_tokenizer(official),
                                     llm_export.decoder_spec(official), n_scans=2)


def test_int4_decoder_runs(official, official_decoder, official_prompt, official_feeds, tmp_path):
    fp32_bytes = sum(p.stat().st_size for p in official_decoder.parent.iterdir())
    for method in quantize.METHODS:
        dst = tmp_path / method / "decoder.onnx"
        feeds = official_feeds.feeds if method == "gptq" else None
        info = quantize.quantize_decoder(official_decoder, dst, method=method, calibration=feeds)
        assert info["method"] == method and info["block_size"] == 32 and info["matmuls_kept_float"] == 0
        ids = make_decoder(official, dst).generate(official_prompt, GenerationOptions(max_new_tokens=8)).ids
        assert len(ids) == 8
        size = sum(p.stat().st_size for p in dst.parent.iterdir())
        assert size < fp32_bytes
        if method == "q41":  # the default: uint4 zero points, float32 block offsets, int8 LM head
            assert info["zero_points"] == "uint4" and info["offset_terms"] > 0 and info["lm_head"] == "int8"
    for lm_head in quantize.LM_HEAD_POLICIES:
        dst = tmp_path / f"head-{lm_head}" / "decoder.onnx"
        info = quantize.quantize_decoder(official_decoder, dst, method="rtn", lm_head=lm_head)
        assert info["lm_head"] == lm_head and info["matmuls_kept_float"] == (lm_head == "fp32")
        assert len(make_decoder(official, dst).generate(official_prompt, GenerationOptions(max_new_tokens=4)).ids) == 4
    with pytest.raises(ValueError, match="lm_head"):
        quantize.quantize_decoder(official_decoder, tmp_path / "bad" / "decoder.onnx", lm_head="int2")


def test_gptq_calibrates_on_scans_and_beats_plain_rounding(official, official_decoder, official_feeds, tmp_path):
    """GPTQ on multimodal feeds (phantom scans' image tokens in prompts of four tasks + a report) against the same
    4-bit grid without error compensation (asymmetric RTN, min/max blocks of 32): the decoder's hidden states on
    the calibration set are closer to fp32's. Float activations and an fp32 head isolate the weights."""
    feeds, record = official_feeds.feeds, official_feeds.record
    n = official.cfg.num_image_tokens
    assert record["feeds"] == len(feeds) == 8 and record["scans"] == 2 and len(record["sha256"]) == 64
    patch_row = official.embed_tokens.weight[official.cfg.im_patch_id].detach().numpy()
    for feed in feeds:
        embeds = feed["inputs_embeds"][0]
        assert embeds.shape[0] > n + 20 and feed["attention_mask"].shape == (1, embeds.shape[0])
        assert not np.isclose(embeds[1:n + 1], patch_row).all(axis=1).any()  # every image position holds a token
    assert not np.allclose(feeds[0]["inputs_embeds"][0, 1:n + 1], feeds[4]["inputs_embeds"][0, 1:n + 1])
    reference = [session(official_decoder).run(["hidden_states"], f)[0] for f in feeds]
    errors, infos = {}, {}
    for method, extra in (("gptq", {"calibration": feeds}), ("rtn", {"symmetric": False})):
        dst = tmp_path / method / "decoder.onnx"
        infos[method] = quantize.quantize_decoder(official_decoder, dst, method=method, lm_head="fp32",
                                                  accuracy_level=0, **extra)
        sess = session(dst)
        errors[method] = float(np.mean([rel_err(sess.run(["hidden_states"], f)[0], ref)
                                        for f, ref in zip(feeds, reference)]))
    assert infos["gptq"]["zero_points"] == infos["rtn"]["zero_points"] == "uint4"
    assert infos["gptq"]["matmuls_kept_float"] == 1  # the LM head (lm_head="fp32")
    assert errors["gptq"] < 0.8 * errors["rtn"], errors
    with pytest.raises(ValueError, match="calibration"):
        quantize.quantize_decoder(official_decoder, tmp_path / "x" / "decoder.onnx", method="gptq")


def test_gptq_weight_against_plain_rounding():
    """One weight, correlated inputs: with an identity Hessian GPTQ is plain asymmetric rounding on its grid (codes
    round(w / s) + zero, clipped); with the inputs' Hessian the weight moves further but the layer's output
    error on those inputs drops (here by ~30%)."""
    from m3d_edge.export import gptq, nbits

    rng = np.random.default_rng(0)
    w = (rng.normal(size=(64, 96)) * 0.05).astype(np.float32)
    x = rng.normal(size=(400, 64)) @ rng.normal(size=(64, 64))
    plain = gptq.quantize_weight(w, np.eye(64))
    b = nbits.block_view(w, 32)  # [N, 2, 32]
    s = ((b.max(-1) - b.min(-1)) / 15).astype(np.float32).astype(np.float64)
    z = np.clip(np.rint(-b.min(-1) / s), 0, 15)
    assert np.array_equal(plain.q, np.clip(np.rint(b / s[..., None]) + z[..., None], 0, 15))
    tuned = gptq.quantize_weight(w, x.T @ x / len(x))
    out_err = {name: np.abs(x @ nbits.dequantize(q) - x @ w).mean() for name, q in (("plain", plain), ("gptq", tuned))}
    assert out_err["gptq"] < 0.8 * out_err["plain"], out_err
    assert np.abs(nbits.dequantize(tuned) - w).mean() > np.abs(nbits.dequantize(plain) - w).mean()


def _q4_1_weights(rng, k, n, block=32):
    """[K, N] float32 made the way llama.cpp's Q4_1 stores blocks along K: min m + d * q, q in 0..15 (both ends
    used), d and m float16."""
    nb = k // block
    d = rng.uniform(1e-3, 2e-2, (n, nb)).astype(np.float16).astype(np.float32)
    m = (-d * rng.uniform(0, 15, (n, nb))).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (n, nb, block))
    q[..., 0], q[..., 1] = 0, 15
    return (m[..., None] + d[..., None] * q).astype(np.float32).reshape(n, k).T


def test_nbits_schemes_against_their_rules():
    from m3d_edge.export import nbits

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (128, 48)).astype(np.float32)
    for scheme in nbits.SCHEMES:
        blocks = nbits.QUANTIZERS[scheme](w, 32)
        step = np.repeat(blocks.scale.T, 32, axis=0)  # [K, N]: the scale of each weight's block
        err = np.abs(nbits.dequantize(blocks) - w)
        # round to nearest: within half a step (the offset keeps q41's grid on the block minimum)
        assert (err <= 0.5 * step * (1 + 1e-5)).all(), f"{scheme}: max error {(err / step).max():.3f} steps"
    q41 = nbits.quantize_q41(w)
    assert q41.offset is not None and np.abs(q41.offset).max() <= 0.5 * q41.scale.max() * (1 + 1e-6)
    # weights that were Q4_1 (our SmolLM2) / Q8_0 (its LM head) blocks come back exactly
    w41 = _q4_1_weights(rng, 128, 48)
    err41 = np.abs(nbits.dequantize(nbits.quantize_q41(w41)) - w41).max() / np.abs(w41).max()
    assert err41 < 1e-6, f"Q4_1 weights: relative error {err41:.1e}"
    d8 = rng.uniform(1e-4, 1e-3, (48, 4)).astype(np.float16).astype(np.float32)
    q8 = rng.integers(-127, 128, (48, 4, 32))
    q8[..., 0] = 127
    w8 = (d8[..., None] * q8).astype(np.float32).reshape(48, 128).T
    err8 = np.abs(nbits.dequantize(nbits.quantize_sym8(w8)) - w8).max() / np.abs(w8).max()
    assert err8 < 1e-6, f"Q8_0 weights: relative error {err8:.1e}"


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_matmul_nbits_in_ort_matches_numpy_dequant(accuracy_level, tmp_path):
    """Two MatMuls sharing an input (shared block sums), q41 and sym8, through ORT's CPU kernel against numpy
    X @ dequantized W. accuracy_level 4 quantizes activations to int8 per block, hence its looser budget."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from m3d_edge.export import nbits

    rng = np.random.default_rng(1)
    k, n1, n2 = 96, 40, 24
    w1 = _q4_1_weights(rng, k, n1)
    w2 = rng.normal(0, 0.05, (k, n2)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="mm1"),
         helper.make_node("MatMul", ["x", "w2"], ["y2"], name="mm2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", k])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1, "S", n1]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, "S", n2])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    w3 = rng.normal(0, 0.05, (k, n1)).astype(np.float32)  # q41 on plain floats too (offsets of every size)
    offsets = quantize._rewrite(model, {"mm1": "q41", "mm2": "sym8"}, 32, accuracy_level)
    assert offsets == 1 and [node.name for node in model.graph.node if node.op_type == "MatMul"] == ["x/blocksum",
                                                                                                    "mm1_offset"]
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    x = rng.normal(0, 1, (1, 7, k)).astype(np.float32)
    y1, y2 = session(path).run(None, {"x": x})
    budget = 1e-5 if accuracy_level == 0 else 2e-2
    for got, w, blocks in ((y1, w1, nbits.quantize_q41(w1)), (y2, w2, nbits.quantize_sym8(w2))):
        want = x.astype(np.float64) @ nbits.dequantize(blocks)
        assert rel_err(got, want) < budget, f"ORT vs numpy dequant: {rel_err(got, want):.1e}"
    assert rel_err(y1, x @ w1) < budget, f"q41 on Q4_1 weights vs the float MatMul: {rel_err(y1, x @ w1):.1e}"
    graph3 = helper.make_graph([helper.make_node("MatMul", ["x", "w3"], ["y"], name="mm")], "g3",
                               [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["S", k])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["S", n1])],
                               [numpy_helper.from_array(w3, "w3")])
    model3 = helper.make_model(graph3, opset_imports=[helper.make_opsetid("", 18)])
    quantize._rewrite(model3, {"mm": "q41"}, 32, accuracy_level)
    onnx.save(model3, str(tmp_path / "m3.onnx"))
    (y3,) = session(tmp_path / "m3.onnx").run(None, {"x": x[0]})  # rank 2: the block sums are a MatMul too
    want3 = x[0].astype(np.float64) @ nbits.dequantize(nbits.quantize_q41(w3))
    assert rel_err(y3, want3) < budget, f"q41 on float weights, ORT vs numpy dequant: {rel_err(y3, want3):.1e}"


def test_fp16_decoder_keeps_greedy_tokens(official, official_decoder, official_prompt, official_inputs, tmp_path):
    image, ids = official_inputs
    with torch.no_grad():
        expected = official.generate(image, ids, max_new_tokens=32).ids[0].tolist()
    info = quantize.decoder_to_fp16(official_decoder, tmp_path / "decoder.onnx")
    dec = make_decoder(official, tmp_path / "decoder.onnx")
    assert info["kv_cache"] == "float16" and dec.cache.buffers[0][0].data_type() == "tensor(float16)"
    assert dec.generate(official_prompt, GenerationOptions(max_new_tokens=32)).ids == expected


# -- bundles -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return bundle_export.build("preset:tiny", out, llm="int4-rtn", progress=False)


def test_bundle_manifest_and_verification(tiny_bundle, tmp_path):
    b = bundle_reader.load(tiny_bundle)
    m = b.manifest
    assert m["format"] == "m3d-edge-bundle/1" and m["preprocessing"] == "ct"
    assert m["tokens"] == {"im_patch": 256, "bx_start": 257, "bx_end": 258, "seg": 259, "eos": [2], "bos": 1}
    assert sorted(m["components"]) == ["decoder", "embeddings", "seg_decoder", "seg_encoder", "tokenizer", "vision"]
    assert m["quantization"]["method"] == "rtn" and m["components"]["decoder"]["precision"] == "int4-rtn"
    assert m["components"]["seg_decoder"]["outputs"][0]["shape"] == ["batch", 1, 32, 256, 256]
    assert set(m["files"]) == {p.name for p in tiny_bundle.iterdir()} - {"manifest.json"}
    assert b.embeddings().dtype == np.float16 and b.embeddings().shape == (260, 64)
    # the bundle runs: vision -> prompt -> decoder, with the runtime's own engines
    engines = Engines()
    image = np.random.default_rng(0).random((1, 1, 32, 256, 256), dtype=np.float32)
    tokens = engines.get(b.path("vision")).run(None, {"images": image})[0]
    assert tokens.shape == (1, 256, 64)
    spec = DecoderSpec.from_manifest(b.decoder)
    dec = Decoder(engines.get(b.path("decoder")), spec, b.embeddings(), max_length=300)
    prompt = dec.embed([1] + [256] * 256 + [40, 41])
    prompt[0, 1:257] = tokens[0]
    assert len(dec.generate(prompt, GenerationOptions(max_new_tokens=4)).ids) == 4
    seg = m["seg"]
    assert seg == {"shared_vision_encoder": False, "image_input": "seg_embedding", "image_source": "seg_encoder"}
    embedding = engines.get(b.path(seg["image_source"])).run([seg["image_input"]], {"images": image})[0]
    hidden = np.zeros((1, 64), np.float32)
    mask = engines.get(b.path("seg_decoder")).run(None, {seg["image_input"]: embedding, "seg_hidden": hidden})[0]
    assert mask.shape == (1, 1, 32, 256, 256) and np.isfinite(mask).all()
    # a copy with one flipped byte is refused, naming the file
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    data = bytearray((bad / "vision.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "vision.onnx").write_bytes(bytes(data))
    with pytest.raises(bundle_reader.BundleError, match="vision.onnx: sha256"):
        bundle_reader.load(bad)
    (bad / "embeddings.npy").unlink()
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["format"] = "m3d-edge-bundle/99"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(bundle_reader.BundleError, match="not known to this runtime"):
        bundle_reader.load(bad)


def test_q41_bundle_records_its_choices(tmp_path):
    path = bundle_export.build("preset:tiny", tmp_path / "b", llm="int4-q41", progress=False)
    m = json.loads((path / "manifest.json").read_text())
    q = m["quantization"]
    assert m["components"]["decoder"]["precision"] == "int4-q41" and bundle_export.DEFAULT_LLM == "int4-q41-lora8"
    assert (q["method"], q["zero_points"], q["block_offsets"], q["lm_head"]) == ("q41", "uint4", "float32", "int8")
    assert q["matmuls_kept_float"] == 0 and "lora" not in q and bundle_reader.load(path, verify=True)


def test_gptq_bundle_records_its_calibration(tmp_path):
    path = bundle_export.build("preset:tiny", tmp_path / "b", llm="int4-gptq", progress=False)
    m = json.loads((path / "manifest.json").read_text())
    q, cal = m["quantization"], m["quantization"]["calibration"]
    assert (q["method"], q["zero_points"], q["lm_head"], q["matmuls_kept_float"]) == ("gptq", "uint4", "int8", 0)
    assert cal["scans"] == 4 and cal["feeds"] == 16 and cal["image_tokens_per_feed"] == 256
    assert m["provenance"]["calibration_sha256"] == cal["sha256"] and bundle_reader.load(path, verify=True)


def test_bundle_refuses_existing_dir_and_leaves_nothing_on_failure(tiny_bundle, monkeypatch, tmp_path):
    with pytest.raises(FileExistsError, match="exists"):
        bundle_export.build("preset:tiny", tiny_bundle, progress=False)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure in the LLM export")

    monkeypatch.setattr(bundle_export.llm_export, "export_decoder", broken)
    out = tmp_path / "never"
    with pytest.raises(RuntimeError, match="simulated"):
        bundle_export.build("preset:tiny", out, llm="fp32", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temp folder


def test_bundle_refuses_unknown_layout_and_architecture(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        bundle_export.build(folder, tmp_path / "b1", progress=False)
    from transformers import GPT2Config, GPT2LMHeadModel

    from m3d_edge.model.lamed import LaMed

    cfg = preset("tiny")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=260))
    with pytest.raises(bundle_export.BundleBuildError, match="GPT2LMHeadModel cannot be exported"):
        bundle_export.build(LaMed(cfg, gpt2), tmp_path / "b2", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_cli_export_errors(tiny_bundle):
    runner = CliRunner()
    r = runner.invoke(cli, ["export", "preset:tiny", "--out", str(tiny_bundle)])
    assert r.exit_code == 1 and "exists" in r.output
    if not torch.cuda.is_available():  # TensorRT needs a GPU: refused before anything is exported
        out = Path(str(tiny_bundle) + "-trt")
        r = runner.invoke(cli, ["export", "preset:tiny", "--out", str(out), "--tensorrt"])
        assert r.exit_code == 2 and "no CUDA GPU" in r.output and "Export without --tensorrt" in r.output, r.output
        assert not out.exists()


def test_runtime_imports_without_torch():
    run_without_modules(("torch", "transformers"), (
        "import m3d_edge.runtime.bundle, m3d_edge.runtime.decoder, m3d_edge.runtime.engines\n"
        "assert not any(m.startswith(('m3d_edge.model', 'm3d_edge.export')) for m in sys.modules)\n"))


# -- SmolLM2 (the default LLM) ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from m3d_edge.model import llm as llm_model

    cfg = preset("phantom-small")
    torch.manual_seed(0)
    model = checkpoint.build(cfg).eval()
    tok = llm_model.load_tokenizer(cfg.llm)
    out = tmp_path_factory.mktemp("smol")
    llm_export.export_decoder(model, out / "fp32", tokenizer=tok)
    quantize.quantize_decoder(out / "fp32" / "decoder.onnx", out / "int4" / "decoder.onnx")  # the default, q41
    return model, tok, out


def test_smollm2_decoder_matches_torch_and_int4_is_small(smol):
    model, tok, out = smol
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = torch.tensor([tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]])
    with torch.no_grad():
        expected = model.generate(None, ids, max_new_tokens=32).ids[0].tolist()
        prompt = model.prompt_embeds(ids, None).numpy()
    table = model.embed_tokens.weight.detach().numpy().astype(np.float16)
    fp32 = make_decoder(model, out / "fp32" / "decoder.onnx", table=table, max_length=256)
    assert fp32.generate(prompt, GenerationOptions(max_new_tokens=32)).ids == expected
    size = {k: sum(p.stat().st_size for p in (out / k).iterdir()) for k in ("fp32", "int4")}
    assert size["int4"] < 0.30 * size["fp32"], f"int4 is {size['int4'] / size['fp32']:.1%} of fp32"
    int4 = make_decoder(model, out / "int4" / "decoder.onnx", table=table, max_length=256)
    start = time.perf_counter()
    got = int4.generate(prompt, GenerationOptions(max_new_tokens=32)).ids
    elapsed = time.perf_counter() - start
    answer = tok.decode(got, skip_special_tokens=True)
    assert "Paris" in answer, f"int4 answer {answer!r} ({32 / elapsed:.0f} tokens/s)"


def test_smollm2_q41_is_lossless_on_its_gguf_weights(smol, tmp_path):
    """SmolLM2's weights are the GGUF's Q4_1 blocks (LM head: Q8_0): q41 with an int8 head stores them exactly,
    so with float32 activations (accuracy_level=0) the logits equal the fp32 decoder's. The shipped
    accuracy_level=4 adds int8 activations: +1.2% perplexity on held-out reports (docs/export.md)."""
    model, tok, out = smol
    info = quantize.quantize_decoder(out / "fp32" / "decoder.onnx", tmp_path / "decoder.onnx", accuracy_level=0)
    assert info["method"] == "q41" and info["lm_head"] == "int8" and info["matmuls_kept_float"] == 0
    ids = tok("The liver is enlarged with a hypodense lesion.", add_special_tokens=False)["input_ids"]
    table = model.embed_tokens.weight.detach().numpy()
    logits = {}
    for name, path in (("fp32", out / "fp32" / "decoder.onnx"), ("q41", tmp_path / "decoder.onnx")):
        dec = make_decoder(model, path, table=table, max_length=64)
        logits[name], _ = dec.forward(dec.embed(ids))
    err = rel_err(logits["q41"], logits["fp32"])
    assert err < 1e-4, f"q41 (accuracy_level 0) vs fp32 logits: relative error {err:.1e}"


# -- the trained default model: its LoRA adapter next to a 4-bit base ----------------------------------------------

def test_4bit_decoder_keeps_the_trained_lora_apart(tmp_path):
    """phantom-small = SmolLM2 (Q4_1 blocks) + a merged LoRA whose update is below half a 4-bit step. Quantizing the
    merged weights loses the tuning; split_adapter restores the base, q41 stores it exactly and the adapter runs as
    a float branch: with float activations and an fp32 head the logits are the fp32 decoder's."""
    from conftest import ROOT
    from m3d_edge.export import lora
    from m3d_edge.model import llm as llm_model

    model = checkpoint.load(ROOT / "models" / "phantom-small")
    assert model.merged_lora is not None and model.merged_lora.rank == 16
    tok = llm_model.load_tokenizer(model.cfg.llm)
    fp32 = tmp_path / "fp32" / "decoder.onnx"
    llm_export.export_decoder(model, fp32.parent, tokenizer=tok)
    import onnx

    proto = onnx.load(str(fp32))
    record = lora.split_adapter(proto, model.merged_lora, model.base_llm)
    assert record["modules"] == 120 and record["matmuls_with_branch"] == 60  # q|k|v packed + o, 30 layers
    split = tmp_path / "split" / "decoder.onnx"
    split.parent.mkdir()
    onnx.save_model(proto, str(split), save_as_external_data=True, location="decoder.onnx.data")
    ids = tok("The liver shows a 12 mm hypodense lesion in segment", add_special_tokens=False)["input_ids"]
    table = model.embed_tokens.weight.detach().numpy()

    def logits(path):
        dec = make_decoder(model, path, table=table, max_length=64)
        return dec.forward(dec.embed(ids))[0]

    reference = logits(fp32)
    assert rel_err(logits(split), reference) < 1e-5  # the float graph still computes the merged model
    with pytest.raises(lora.LoraPlacementError, match="not its merged weight"):  # checked before any change
        lora.split_adapter(onnx.load(str(split)), model.merged_lora, model.base_llm)
    adapted = lora.adapted_matmuls(onnx.load(str(fp32)), model.merged_lora, model.base_llm)
    assert len(adapted) == 60 and all(n.endswith(("qkv_proj/MatMul", "o_proj/MatMul")) for n in adapted)
    errors = {}
    for name, src, eight_bit in (("kept apart", split, ()), ("merged", fp32, ()), ("merged, 8-bit", fp32, adapted)):
        dst = tmp_path / name / "decoder.onnx"
        info = quantize.quantize_decoder(src, dst, method="q41", accuracy_level=0, lm_head="fp32",
                                         eight_bit=eight_bit)
        assert info["lora_branch_matmuls"] == (120 if name == "kept apart" else 0)
        assert info["eight_bit_matmuls"] == len(eight_bit)
        errors[name] = rel_err(logits(dst), reference)
    assert errors["kept apart"] < 1e-4, errors
    assert errors["merged"] > 100 * errors["kept apart"], errors
    # int4-q41-lora8: the adapted projections re-rounded at 8 bits keep most of the tuning that 4 bits lose
    assert errors["merged, 8-bit"] < min(0.03, errors["merged"] / 5), errors  # measured 0.011 (0.61 merged)
    for bad in ([quantize.LM_HEAD_NODE], ["/model/layers.0/attn/none/MatMul"]):  # the head's precision is lm_head=
        with pytest.raises(ValueError, match="eight_bit takes q41 MatMul nodes"):
            quantize.quantize_decoder(fp32, tmp_path / "bad" / "decoder.onnx", eight_bit=bad)
    assert not (tmp_path / "bad").exists()
    # the bundle path (default accuracy level and head): the same 60 MatMuls at 8 bits, no branch, recorded
    dst = tmp_path / "lora8" / "decoder.onnx"
    record = bundle_export.lower_decoder(model, fp32, dst, "int4-q41-lora8")
    assert (record["method"], record["eight_bit_matmuls"], record["lora_branch_matmuls"]) == ("q41-lora8", 60, 0)
    assert record["lora"]["matmuls"] == 60 and record["lora"]["rank"] == 16
    eight = [n.name for n in onnx.load(str(dst), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits" and next(a.i for a in n.attribute if a.name == "bits") == 8]
    assert sorted(eight) == sorted([a + "_Q8" for a in adapted] + [quantize.LM_HEAD_NODE + "_Q8"])


def test_library_imports_leave_the_root_logger_alone(tmp_path, monkeypatch):
    """ORT's matmul_nbits_quantizer configures the root logger at import (INFO, a stderr handler); the export
    imports it through import_keeping_logging, which puts the root logger back as it was."""
    import logging

    from m3d_edge.export import import_keeping_logging

    (tmp_path / "noisy_module.py").write_text("import logging\nlogging.basicConfig(force=True, level=logging.INFO)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    module = import_keeping_logging("noisy_module")
    assert module.__name__ == "noisy_module" and (list(root.handlers), root.level) == before


NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)  # the NF4 data type's 16 values (QLoRA, Dettmers et al. 2023)


def test_nf4_torch_backend_swaps_the_llm_projections(official):
    """bitsandbytes NF4 for the PyTorch path: every LLM projection but the LM head becomes a Linear4bit whose
    weights are NF4 of the originals (checked against the data type's definition) and whose output is exactly
    x @ dequantized(W)^T; the rest of the LaMed (vision, LM head) is untouched; generation still runs."""
    import copy

    import bitsandbytes.functional as bnbf

    from m3d_edge.model.nf4 import quantize_llm_nf4

    model = copy.deepcopy(official)
    before = {n: m.weight.detach().clone() for n, m in model.base_llm.named_modules() if isinstance(m, torch.nn.Linear)}
    record = quantize_llm_nf4(model)
    # down_proj reads 160 features: rows that end inside a block of 64 stay float (bitsandbytes' CPU bug)
    partial = [name for name, w in before.items() if name != "lm_head" and w.shape[1] % 64]
    assert record["kept_float"] == partial == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert record["linears"] == len(before) - 1 - len(partial) and record["method"] == "nf4"
    for name in ["lm_head", *partial]:
        assert type(model.base_llm.get_submodule(name)) is torch.nn.Linear
        assert torch.equal(model.base_llm.get_submodule(name).weight, before[name])
    for name, w in before.items():
        if name == "lm_head" or name in partial:
            continue
        layer = model.base_llm.get_submodule(name)
        dq = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert dq.shape == w.shape
        # NF4 by its definition (QLoRA): blocks of 64 consecutive weights, scaled by their absmax, each rounded to
        # the nearest of the 16 NF4 levels
        blocks = w.double().reshape(-1, 64)
        absmax = blocks.abs().amax(1, keepdim=True)
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
        nearest = levels[(blocks / absmax)[..., None].sub(levels).abs().argmin(-1)]
        torch.testing.assert_close(dq.double(), (nearest * absmax).reshape(w.shape), rtol=1e-6, atol=1e-7)
        x = torch.randn(3, w.shape[1])
        torch.testing.assert_close(layer(x), x @ dq.T, rtol=1e-5, atol=1e-5)
    for (n, a), (_, b) in zip(official.vision_tower.state_dict().items(), model.vision_tower.state_dict().items()):
        assert torch.equal(a, b), n
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        assert len(model.generate(None, ids, max_new_tokens=4).ids[0]) == 4
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_llm_nf4(model)
