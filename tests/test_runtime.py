"""The slim runtime (runtime.pipeline) against the torch model, its caches, errors, threads and the `run` command.

Bundles are exported once per module from seeded tiny LaMeds with an fp32 decoder: one official-style
(positional image placement, separate seg encoder), one like our presets (by_id placement, seg module reading the
vision tower's patch tokens). The tiny random models never write [SEG] or a box on their own, so a logits
processor forces those tokens on both sides: the rest of the path (seg graphs, mask inversion, box mapping) then
runs on real numbers.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer

from m3d_edge.cli import main as cli
from m3d_edge.config import preset
from m3d_edge.data.phantom import generate_case
from m3d_edge.data.prompts import image_prompt, parse_boxes
from m3d_edge.export import bundle as bundle_export
from m3d_edge.imaging import Volume, read, write_nifti, write_series
from m3d_edge.model import checkpoint
from m3d_edge.preprocess import box_from_mask, to_model_input
from m3d_edge.runtime.bundle import BundleError, NpyRows
from m3d_edge.bench.metrics import dice
from m3d_edge.runtime.pipeline import Pipeline, RuntimeInputError, measure, sigmoid_mask

from conftest import run_without_modules

SEG, BX_START, BX_END, EOS = 259, 257, 258, 2  # tiny preset ids
BOX_TEXT = "[0.125, 0.332, 0.1, 0.5, 0.7, 0.6]"
MAX_NEW = 48  # room for a forced box (36 byte tokens) and some free text


def _model(placement: str, shared: bool, seed: int, detail_channels: int = 0):
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, image_placement=placement),
                              seg=dataclasses.replace(cfg.seg, share_vision_encoder=shared,
                                                      detail_channels=detail_channels))
    torch.manual_seed(seed)
    model = checkpoint.build(cfg).eval()
    if detail_channels:  # the path's last layer starts at zero: weights, so that the runtime must feed it
        torch.nn.init.normal_(model.seg_module.detail.out.weight, std=0.1)
    # the bundle stores the embedding table as float16; give torch the same numbers so the comparison is exact
    # (the fp16 table's own cost is measured in test_export)
    with torch.no_grad():
        model.embed_tokens.weight.copy_(model.embed_tokens.weight.half().float())
    return model


@pytest.fixture(scope="module")
def models_and_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-bundles")
    out = {}
    # the by_id model also has a seg detail path (ours): seg_detail.onnx reads the model input, once per scan
    for name, placement, shared, seed, detail in (("positional", "positional", False, 0, 0),
                                                  ("by_id", "by_id", True, 1, 4)):
        model = _model(placement, shared, seed, detail)
        out[name] = (model, bundle_export.build(model, root / name, llm="fp32", progress=False))
    return out


@pytest.fixture(scope="module")
def bundle_dir(models_and_bundles):
    return models_and_bundles["positional"][1]


@pytest.fixture(scope="module")
def pipeline(bundle_dir):
    return Pipeline.load(bundle_dir)


@pytest.fixture(scope="module")
def case_volume():
    return generate_case(0).volume  # int16 HU, 56 x 160 x 160


@pytest.fixture(scope="module")
def other_volume():
    return generate_case(0, 1).volume


def forcing(steps: dict[int, int]):
    """Logits processors (torch [B, V] and numpy [V]) that force token steps[k] at generation step k."""
    def torch_proc(sofar, logits):
        if sofar.shape[1] not in steps:
            return logits
        out = torch.full_like(logits, float("-inf"))
        out[:, steps[sofar.shape[1]]] = 0
        return out

    def numpy_proc(sofar, logits):
        if len(sofar) not in steps:
            return logits
        out = np.full_like(logits, -np.inf)
        out[steps[len(sofar)]] = 0
        return out

    return torch_proc, numpy_proc


def forced_text(tokenizer: Tokenizer, text: str, start: int = 1) -> dict[int, int]:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return {start + i: t for i, t in enumerate(ids)}


# -- (a) no torch ---------------------------------------------------------------------------------------------------

def test_runtime_answers_with_torch_unimportable(bundle_dir):
    run_without_modules(("torch", "transformers"), (
        "import numpy as np\n"
        "from m3d_edge.imaging import Volume\n"
        "from m3d_edge.runtime.pipeline import Pipeline\n"
        f"p = Pipeline.load({str(bundle_dir)!r})\n"
        "arr = np.random.default_rng(0).integers(-1000, 1000, (20, 64, 64)).astype(np.int16)\n"
        "a = p.ask(Volume(arr, np.diag([3.0, 1.0, 1.0, 1.0])), 'What is this?', max_new_tokens=4)\n"
        "assert 1 <= len(a.token_ids) <= 4, a\n"
        "heavy = ('torch', 'transformers', 'm3d_edge.model', 'm3d_edge.export', 'm3d_edge.train', 'm3d_edge.kernels')\n"
        "loaded = [m for m, mod in sys.modules.items() if mod is not None and m.startswith(heavy)]\n"
        "assert not loaded, loaded\n"
    ))


def test_default_bundle_is_rebuilt_when_the_export_changes(monkeypatch, tmp_path):
    """The cache key holds the export's revision: a new exporter does not reuse bundles an older one wrote."""
    from m3d_edge import cli as cli_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _, first = cli_module._default_bundle_location()
    monkeypatch.setattr(cli_module, "EXPORT_REVISION", cli_module.EXPORT_REVISION + 1)
    _, second = cli_module._default_bundle_location()
    assert second.parent == first.parent and second != first


def test_built_from_names_the_checkpoint_and_the_export_revision(bundle_dir, tmp_path):
    """Benchmarks reuse a kept bundle only when it was written from the same checkpoint files by this exporter."""
    from m3d_edge.export import EXPORT_REVISION, built_from, checkpoint_digest

    assert built_from(bundle_dir, None)  # the fixture's in-memory model: no digest, this revision
    ck = tmp_path / "checkpoint"
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(b"weights v1")
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["provenance"]["source"] = {"kind": "checkpoint", "path": str(ck), "sha256": checkpoint_digest(ck)}
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "manifest.json").write_text(json.dumps(manifest))
    assert built_from(kept, ck) and not built_from(kept, None)
    (ck / "README.md").write_text("a model card, edited")  # prose: the same weights, the same bundle
    assert built_from(kept, ck)
    (ck / "model.safetensors").write_bytes(b"weights v2")  # retrained: the kept bundle is stale
    assert not built_from(kept, ck)
    (ck / "model.safetensors").write_bytes(b"weights v1")
    manifest["provenance"]["export_revision"] = EXPORT_REVISION - 1
    (kept / "manifest.json").write_text(json.dumps(manifest))
    assert not built_from(kept, ck)
    assert not built_from(tmp_path / "nothing-here", ck)


def test_cli_finds_a_cached_default_bundle_without_torch(tmp_path):
    """`m3d-edge run` without --bundle: once the default bundle is cached, finding it needs neither torch nor the
    model code (the edge box's main command starts fast)."""
    run_without_modules(("torch", "transformers"), (
        "import os\n"
        f"os.environ['XDG_CACHE_HOME'] = {str(tmp_path)!r}\n"
        "from m3d_edge import cli\n"
        "source, cached = cli._default_bundle_location()\n"
        "assert source.endswith('models/phantom-small') and str(cached).startswith(os.environ['XDG_CACHE_HOME'])\n"
        "cached.mkdir(parents=True)\n"
        "(cached / 'manifest.json').write_text('{}')\n"
        "assert cli._default_bundle() == str(cached)\n"
        "heavy = ('torch', 'transformers', 'm3d_edge.model', 'm3d_edge.export.bundle', 'm3d_edge.train')\n"
        "loaded = [m for m, mod in sys.modules.items() if mod is not None and m.startswith(heavy)]\n"
        "assert not loaded, loaded\n"
    ))



def test_cli_commands_run_offline_and_bitsandbytes_stays_quiet():
    """Every m3d-edge command sets HF_HUB_OFFLINE unless the user chose; importing bitsandbytes afterwards (as
    transformers does at model load) neither asks the Hub for its optional CPU kernel nor tells the user to install
    one."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = ("import os\n"
            "from m3d_edge import cli\n"
            "cli.main(['info', '--json'], standalone_mode=False)\n"  # its output goes to this process's streams
            "assert os.environ['HF_HUB_OFFLINE'] == '1'\n"
            "import bitsandbytes\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kernels-community" not in done.stderr and "trust" not in done.stderr, done.stderr
    env["HF_HUB_OFFLINE"] = "0"  # an explicit choice stays
    done = subprocess.run([sys.executable, "-c", "import os\nimport m3d_edge\nm3d_edge.offline_by_default()\n"
                           "assert os.environ['HF_HUB_OFFLINE'] == '0'"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- (b) equivalence with the torch model ---------------------------------------------------------------------------

@pytest.mark.parametrize("placement", ["positional", "by_id"])
def test_pipeline_matches_torch_generate(placement, models_and_bundles, case_volume):
    model, bundle = models_and_bundles[placement]
    pipe = Pipeline.load(bundle)
    tok = pipe.tokenizer
    box = {1: BX_START, **forced_text(tok, BOX_TEXT, start=2)}
    box[max(box) + 1] = BX_END
    prompts = [
        ("What is in this image?", {}),
        ("Where is the liver? Please output the box.", box),
        ("Can you segment the liver in this image? Please output the mask.", {3: SEG}),
        ("Please segment the spleen.", {2: SEG, 5: SEG}),  # two [SEG]: their predicting states are averaged
        ("Segment it.", {0: SEG}),  # [SEG] as the very first token has no predicting state: no mask (official)
    ]
    x, transform = to_model_input(case_volume, "ct")
    masks, answers = 0, []
    for question, steps in prompts:
        torch_proc, numpy_proc = forcing(steps)
        ids = torch.tensor([tok.encode(image_prompt(question, model.cfg.num_image_tokens)).ids])
        with torch.no_grad():
            ref = model.generate(torch.from_numpy(x), ids, max_new_tokens=MAX_NEW, eos_token_id=[EOS],
                                 logits_processor=torch_proc)
        got = pipe.ask(case_volume, question, max_new_tokens=MAX_NEW, logits_processor=numpy_proc)
        answers.append(got)
        expected_ids = ref.ids[0].tolist()
        assert list(got.token_ids) == expected_ids, f"{placement} {question!r}"
        ref_text = tok.decode(expected_ids, skip_special_tokens=True)
        assert got.text == ref_text
        ref_boxes = parse_boxes(ref_text)
        assert [b.normalized for b in got.boxes] == ref_boxes
        assert [b.voxels for b in got.boxes] == [tuple(transform.box_to_voxels(b)) for b in ref_boxes]
        if steps is box:
            assert len(got.boxes) == 1 and got.boxes[0].normalized == (0.125, 0.332, 0.1, 0.5, 0.7, 0.6)
        assert got.has_mask == bool(ref.has_seg[0]), question
        if got.has_mask:
            masks += 1
            ref_mask = transform.invert_mask(sigmoid_mask(ref.seg_logits.numpy())[0, 0])
            assert got.mask.shape == case_volume.shape and np.array_equal(got.mask.affine, case_volume.affine)
            # a non-empty reference, else two empty masks would agree trivially
            assert ref_mask.array.any(), f"{placement} {question!r}: torch mask is empty; choose another seed"
            d = dice(got.mask.array, ref_mask.array)
            assert d >= 0.999, f"{placement} {question!r}: mask Dice {d:.5f} vs torch"
            assert got.timings["seg"] > 0
            # the box around the mask: torch's mask's box on the model grid, to a voxel (the masks agree to 0.999)
            ref_box = box_from_mask(sigmoid_mask(ref.seg_logits.numpy())[0, 0])
            one_voxel = np.tile(1 / np.array(x.shape[2:]), 2) + 1e-3
            assert np.all(np.abs(np.subtract(got.mask_box.normalized, ref_box)) <= one_voxel), (got.mask_box, ref_box)
            assert got.mask_box.voxels == tuple(transform.box_to_voxels(got.mask_box.normalized))
            assert got.to_dict()["mask"]["box"] == got.mask_box.to_dict()
        else:
            assert got.mask_box is None and "mask" not in got.to_dict()
    assert masks == 2
    runs = pipe.runs
    assert runs["vision"] == 1 and runs["seg_decoder"] == 2
    assert runs["seg_encoder"] == (0 if placement == "by_id" else 1)  # by_id bundle: shared tower, no seg encoder
    # by_id bundle: a detail path, run once for the scan's two masks (each matched torch above)
    assert runs["seg_detail"] == (1 if placement == "by_id" else 0)
    # the same five questions decoded together (one ORT run per step for all rows) give the same answers
    batched = pipe.ask_many(case_volume, [q for q, _ in prompts], max_new_tokens=MAX_NEW,
                            logits_processors=[forcing(steps)[1] for _, steps in prompts])
    for one, together in zip(answers, batched):
        assert together.token_ids == one.token_ids and together.text == one.text, one.question
        assert together.boxes == one.boxes and together.stop_reason == one.stop_reason
        assert (together.mask is None) == (one.mask is None) and together.mask_box == one.mask_box
        if one.mask is not None:
            assert np.array_equal(together.mask.array, one.mask.array)
    assert len({a.timings["decode"] for a in batched}) == 1  # the batched loop's time, shared


def test_sigmoid_mask_thresholds_as_torch_and_stays_quiet_past_exps_range():
    """sigmoid(logit) > 0.5 in float32, as torch thresholds, on logits far past exp's range (a trained decoder
    writes -100 and below away from the organ: exp overflows to inf, the probability is 0) without an overflow
    warning. (Within ~1e-7 of 0 the float32 rounding of sigmoid decides, and torch's SIMD exp rounds otherwise
    than numpy's; the runtime's fp32 logits differ from torch's by more than that anyway.)"""
    logits = np.array([-1e4, -200.0, -88.8, -1.0, -1e-3, 1e-3, 1.0, 88.8, 200.0, 1e4], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = sigmoid_mask(logits)
    want = (torch.sigmoid(torch.from_numpy(logits)) > 0.5).numpy().astype(np.uint8)
    np.testing.assert_array_equal(got, want)
    assert got.tolist() == [0] * 5 + [1] * 5


def test_stream_pieces_add_up_to_the_answer(pipeline, case_volume):
    steps = forced_text(pipeline.tokenizer, "Größe: 3 cm [", start=0)  # 2-byte characters split across tokens
    steps[max(steps) + 1] = SEG
    steps[max(steps) + 1] = EOS
    _, numpy_proc = forcing(steps)
    stream = pipeline.stream(case_volume, "Describe it.", max_new_tokens=20, logits_processor=numpy_proc)
    pieces = list(stream)
    assert stream.answer is not None and "".join(pieces) == stream.answer.text
    assert stream.answer.text == "Größe: 3 cm [[SEG]" and all("\ufffd" not in p for p in pieces)
    assert stream.answer.stop_reason == "stop" and stream.answer.has_mask
    seen = []
    again = pipeline.ask(case_volume, "Describe it.", max_new_tokens=20, logits_processor=numpy_proc,
                         on_text=seen.append)
    assert "".join(seen) == again.text and again.token_ids == stream.answer.token_ids


# -- (c) one vision run per scan ------------------------------------------------------------------------------------

def test_features_and_image_prefix_computed_once_per_scan(bundle_dir, case_volume):
    pipe = Pipeline.load(bundle_dir)
    questions = ["What is in this image?", "Where is the liver? Please output the box.", "Which phase is it?"]
    answers = pipe.ask_many(case_volume, questions, max_new_tokens=8)
    assert pipe.runs["vision"] == 1
    assert pipe.runs["prefix_prefill"] == 1 and pipe.runs["prefix_reused"] == 2
    assert all(a.timings["vision"] == 0.0 for a in answers[1:]) and answers[0].timings["vision"] > 0
    # the same voxels in another object are the same scan; changed voxels are another
    copy = Volume(case_volume.array.copy(), case_volume.affine.copy())
    reused = pipe.ask(copy, questions[2], max_new_tokens=8)
    assert pipe.runs["vision"] == 1 and reused.token_ids == answers[2].token_ids
    changed = case_volume.array.copy()
    changed[10, 20, 30] += 1
    pipe.ask(Volume(changed, case_volume.affine), questions[0], max_new_tokens=8)
    assert pipe.runs["vision"] == 2
    # reusing the cached prefix gives exactly what a cold start gives
    pipe.clear_cache()
    cold = [pipe.ask(case_volume, q, max_new_tokens=8) for q in reversed(questions)]
    assert [a.token_ids for a in reversed(cold)] == [a.token_ids for a in answers]
    assert pipe.runs["vision"] == 3


# -- (d) errors leave the pipeline serving --------------------------------------------------------------------------

def test_errors_are_clear_and_the_pipeline_keeps_serving(pipeline, bundle_dir, case_volume, tmp_path):
    question = "What is in this image?"
    reference = pipeline.ask(case_volume, question, max_new_tokens=MAX_NEW).token_ids

    def still_serving():
        assert pipeline.ask(case_volume, question, max_new_tokens=MAX_NEW).token_ids == reference

    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    data = bytearray((bad / "seg_decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "seg_decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="seg_decoder.onnx: sha256"):
        Pipeline.load(bad)
    still_serving()
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["format"] = "m3d-edge-bundle/2"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not known to this runtime"):
        Pipeline.load(bad)
    still_serving()

    nan = case_volume.array.astype(np.float32)
    nan[5, 50, 50] = np.nan
    with pytest.raises(RuntimeInputError, match="1 NaN or infinite voxels"):
        pipeline.ask(Volume(nan, case_volume.affine), question)
    still_serving()
    flat = tmp_path / "slice.npy"
    np.save(flat, np.zeros((64, 64), np.float32))
    with pytest.raises(RuntimeInputError, match="cannot read the scan"):
        pipeline.ask(flat, question)
    still_serving()
    with pytest.raises(RuntimeInputError, match="preprocessing refused"):
        pipeline.ask(Volume(np.full((8, 32, 32), -1024, np.int16), np.eye(4)), question)  # no voxel in the window
    still_serving()
    long_question = "Describe every organ. " * 30  # ~660 byte tokens + 257: the tiny model's context is 512
    with pytest.raises(RuntimeInputError, match="shorten the question"):
        pipeline.ask(case_volume, long_question)
    still_serving()
    with pytest.raises(RuntimeInputError, match="top_p"):
        pipeline.ask(case_volume, question, top_p=2.0, do_sample=True)
    still_serving()


def test_by_id_prompt_with_a_stray_image_token_is_refused(models_and_bundles, case_volume):
    pipe = Pipeline.load(models_and_bundles["by_id"][1])
    with pytest.raises(RuntimeInputError, match="<im_patch> tokens"):
        pipe.ask(case_volume, "What is <im_patch> here?")
    assert len(pipe.ask(case_volume, "What is here?", max_new_tokens=4).token_ids) >= 1


def test_tensorrt_request_falls_back_with_a_warning(bundle_dir):
    with pytest.warns(RuntimeWarning, match="falling back to ONNX Runtime"):
        pipe = Pipeline.load(bundle_dir, backend="tensorrt")
    assert not pipe.engines.tensorrt


# -- (e) threads ----------------------------------------------------------------------------------------------------

def test_two_threads_get_the_answers_of_sequential_asks(bundle_dir, case_volume, other_volume):
    _, seg = forcing({2: SEG})
    jobs = [(case_volume, "What is in this image?", None), (other_volume, "Segment the liver.", seg),
            (case_volume, "Segment the liver.", seg), (other_volume, "What is in this image?", None)]
    sequential = Pipeline.load(bundle_dir)
    expected = [sequential.ask(v, q, max_new_tokens=MAX_NEW, logits_processor=p) for v, q, p in jobs]
    shared = Pipeline.load(bundle_dir)
    results: list = [None] * len(jobs)
    errors: list = []
    barrier = threading.Barrier(2)

    def worker(indices):
        try:
            barrier.wait()
            for i in indices:
                v, q, p = jobs[i]
                results[i] = shared.ask(v, q, max_new_tokens=MAX_NEW, logits_processor=p)
        except BaseException as e:  # reported below; an exception in a thread would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(idx,)) for idx in ([0, 1], [3, 2])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.has_mask == want.has_mask
        if want.has_mask:
            assert np.array_equal(got.mask.array, want.mask.array)
    assert shared.runs["vision"] == 2  # each scan encoded once, although both threads asked about both


def test_measure_times_each_answer_alone(bundle_dir, case_volume):
    """`m3d-edge bench`'s numbers: the first question pays for the vision run, later ones reuse it and reach
    their first token sooner; every run starts cold."""
    pipe = Pipeline.load(bundle_dir)
    result = measure(pipe, case_volume, ["What is in this image?", "Which phase is it?"], repeat=1, max_new_tokens=6)
    assert result["cold"]["vision"] > 0 and result["warm"]["vision"] == 0.0
    assert result["cold"]["decode"] > 0 and result["warm"]["decode"] > 0
    assert result["first_token_s"]["warm"] < result["first_token_s"]["cold"]
    assert pipe.runs["vision"] == 2  # one per run (warm-up + 1), the cache cleared between runs


# -- (f) the command line -------------------------------------------------------------------------------------------

def test_cli_run_writes_answers_masks_and_overlays(bundle_dir, case_volume, tmp_path, monkeypatch):
    scan = write_nifti(case_volume, tmp_path / "case.nii.gz")
    out = tmp_path / "out"
    # the random model never asks for a mask; force one [SEG] so the mask writers run too (`run` without --stream
    # asks all its questions through ask_many)
    original = Pipeline.ask_many

    def ask_many_with_seg(self, volume, questions, **kwargs):
        kwargs["logits_processors"] = [forcing({2: SEG})[1] if "segment" in q else None for q in questions]
        return original(self, volume, questions, **kwargs)

    monkeypatch.setattr(Pipeline, "ask_many", ask_many_with_seg)
    runner = CliRunner()
    r = runner.invoke(cli, ["run", str(scan), "--bundle", str(bundle_dir), "--out", str(out), "--json",
                            "--max-new-tokens", "8", "-q", "What is this?", "-q", "Please segment the liver."])
    assert r.exit_code == 0, r.output
    records = json.loads(r.stdout)
    assert [rec["question"] for rec in records] == ["What is this?", "Please segment the liver."]
    assert json.loads((out / "answers.json").read_text()) == records
    assert "read" in records[0]["timings_s"] and "write" in records[1]["timings_s"]
    files = records[1]["files"]
    assert sorted(files) == ["json", "mask", "overlay"]  # NIfTI input: no DICOM SEG
    mask = read(files["mask"])
    assert mask.shape == case_volume.shape and np.allclose(mask.affine, case_volume.affine, atol=1e-4)
    assert int(np.count_nonzero(mask.array)) == records[1]["mask"]["voxels"] > 0
    assert json.loads((out / "answer-2.json").read_text())["files"]["mask"] == files["mask"]
    # the box around the mask, in source voxels: the written mask's extent, to a voxel (the box is taken on the
    # model grid, the mask resampled to the source grid)
    where = np.nonzero(mask.array)
    extent = [int(w.min()) for w in where] + [int(w.max()) for w in where]
    assert np.abs(np.subtract(records[1]["mask"]["box"]["voxels"], extent)).max() <= 1, (records[1]["mask"], extent)

    # DICOM in: the mask also goes out as a DICOM SEG referencing the series
    dicom = tmp_path / "dicom"
    write_series(case_volume, dicom)
    r = runner.invoke(cli, ["run", str(dicom), "--bundle", str(bundle_dir), "--out", str(tmp_path / "out2"),
                            "--max-new-tokens", "4", "-q", "Please segment the liver."])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out2" / "answer-1-seg.dcm").is_file() and "dicom_seg:" in r.output
    assert "mask box voxels (z0,y0,x0,z1,y1,x1)" in r.output
    r = runner.invoke(cli, ["run", str(tmp_path / "case.nii.gz"), "--bundle", str(bundle_dir), "--stream", "--json"])
    assert r.exit_code == 2 and "choose one" in r.output


def test_default_kv_capacity_fits_image_question_and_answer():
    from m3d_edge.runtime.pipeline import Pipeline

    def manifest(image_tokens, context, new_tokens=256):
        return {"image": {"num_tokens": image_tokens}, "decoder": {"context_length": context},
                "generation": {"max_new_tokens": new_tokens}}

    assert Pipeline.default_capacity(manifest(32, 8192)) == 32 + 256 + 256  # phantom-small (SmolLM2)
    assert Pipeline.default_capacity(manifest(256, 4096)) == 768  # official Phi-3 LaMed
    assert Pipeline.default_capacity(manifest(256, 512)) == 512  # the model's context bounds it


@pytest.mark.parametrize("pread", [True, False], ids=["pread", "seek"])  # seek + read where os.preadv is missing
def test_npy_rows_read_the_embedding_table_exactly(tmp_path, monkeypatch, pread):
    """The runtime's embedding lookup (a positional read per row, nothing memory-mapped) against np.load."""
    import os

    if not pread:
        monkeypatch.delattr(os, "preadv")
    table = np.random.default_rng(0).standard_normal((97, 12)).astype(np.float16)
    np.save(tmp_path / "emb.npy", table)
    rows = NpyRows(tmp_path / "emb.npy")
    assert rows.shape == (97, 12) and rows.dtype == np.float16
    ids = [96, 0, 5, 5, 31]
    np.testing.assert_array_equal(rows[ids], table[ids])
    np.testing.assert_array_equal(np.asarray(rows), table)
    assert rows[[]].shape == (0, 12)
    with pytest.raises(IndexError, match=r"\[0, 97\)"):
        rows[[97]]
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(BundleError, match="cube.npy: expected a C-order 2-D"):
        NpyRows(tmp_path / "cube.npy")
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(BundleError, match="text.npy: not a .npy array"):
        NpyRows(tmp_path / "text.npy")


def test_a_seg_decoder_without_its_detail_graph_is_refused(models_and_bundles, tmp_path):
    """A bundle whose seg decoder reads seg_detail but has no seg_detail graph fails at load, naming the file and
    the fix, not at the first [SEG]."""
    bad = tmp_path / "no-detail"
    shutil.copytree(models_and_bundles["by_id"][1], bad)
    assert Pipeline.load(bad).runs["seg_detail"] == 0  # the copy loads as it is
    manifest = json.loads((bad / "manifest.json").read_text())
    del manifest["components"]["seg_detail"], manifest["files"]["seg_detail.onnx"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    (bad / "seg_detail.onnx").unlink()
    with pytest.raises(BundleError, match=r"seg_decoder.onnx: inputs .*seg_detail.* export the bundle again"):
        Pipeline.load(bad)
