"""The `m3d-edge` command line. Thin: each command parses options and calls one library function."""

from __future__ import annotations

import json
import platform
import sys

import click

from m3d_edge import __version__, offline_by_default
from m3d_edge.data.prompts import CLOSED_VQA_FORMATS, TASKS  # torch-free
from m3d_edge.export import DEFAULT_LLM, EXPORT_REVISION, LLM_PRECISIONS  # torch-free (export/__init__.py)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="m3d-edge")
def main() -> None:
    """M3D-Edge: run M3D-LaMed, a 3D medical multimodal LLM, next to the scanner."""
    offline_by_default()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(as_json: bool) -> None:
    """Show versions, presets and what this machine can run."""
    from m3d_edge.config import PRESETS, preset

    def version(mod: str) -> str | None:
        try:
            return __import__(mod).__version__
        except Exception:  # an optional dependency that is missing or broken is reported, not fatal
            return None

    libs = {m: version(m) for m in ("numpy", "torch", "transformers", "onnxruntime", "onnx", "tokenizers",
                                     "pydicom", "nibabel", "triton", "peft", "accelerate")}
    cuda = False
    if libs["torch"]:
        import torch

        cuda = torch.cuda.is_available()
    presets = {}
    for name in PRESETS:
        cfg = preset(name)
        presets[name] = {"llm": f"{cfg.llm.arch} ({cfg.llm.source})", "llm_hidden": cfg.llm.hidden_size,
                         "vision": f"{cfg.vision.num_layers}x{cfg.vision.hidden_size}",
                         "image_tokens": cfg.num_image_tokens, "seg": cfg.seg is not None}
    data = {"m3d_edge": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "cuda": cuda, "libraries": libs, "presets": presets}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"m3d-edge {__version__}  python {data['python']}  {data['platform']}")
    click.echo(f"CUDA GPU: {'yes' if cuda else 'no (CPU mode)'}")
    click.echo("libraries: " + ", ".join(f"{k} {v or '-'}" for k, v in libs.items()))
    click.echo("presets:")
    for name, p in presets.items():
        click.echo(f"  {name:20s} llm {p['llm']:24s} hidden {p['llm_hidden']:5d}  vision {p['vision']:8s} "
                   f"image tokens {p['image_tokens']:4d}  seg {'yes' if p['seg'] else 'no'}")


# -- commands added by later modules go below this line (keep one command per block) --

@main.command("eval")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="M3D-layout data set whose test split the model never saw.")
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="JSON file for the results.")
@click.option("--clip", default=None, type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="clip.safetensors of the recipe, for retrieval R@1/5/10 over 100 fresh phantoms.")
@click.option("--real-ct", default=None, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Folder with example_ct_sm.nii.gz and example_seg.nii.gz (TotalSegmentator's example).")
@click.option("--per-task", default=30, show_default=True, type=click.IntRange(min=1),
              help="Samples of each task; semantic seg also takes this many of each key organ.")
@click.option("--task", "tasks", multiple=True, type=click.Choice(TASKS),
              help="Score only this task (repeatable; default: all seven).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def evaluate(checkpoint: str, data: str, out: str, clip: str | None, real_ct: str | None, per_task: int,
             tasks: tuple[str, ...], progress: bool) -> None:
    """Held-out M3D-Bench metrics of CHECKPOINT (PyTorch, fp32, greedy), as a model card reports them."""
    from m3d_edge.bench.evaluate import model_card_metrics, write_report_json

    result = model_card_metrics(checkpoint, data, clip=clip, real_ct=real_ct, per_task=per_task,
                                tasks=tasks or TASKS, progress=progress)
    write_report_json(out, result)
    click.echo(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1, default=float))


DEFAULT_QUESTIONS = (
    "Please generate a medical report based on this image.",
    "Which contrast phase was this CT acquired in?",
    "Where is the liver? Please output the box.",
    "Can you segment the liver in this image? Please output the mask.",
)


def _default_bundle_location() -> tuple[str, "Path"]:
    """(source, folder) of the default bundle: from models/phantom-small (our trained checkpoint) when it exists,
    else from preset:phantom-small (random vision weights, a warning), cached in the user cache folder under a
    name that changes with the checkpoint's files, the default precision and the export's revision. Torch-free."""
    import hashlib
    import os
    from pathlib import Path

    from m3d_edge.export import checkpoint_digest

    trained = Path(__file__).resolve().parents[1] / "models" / "phantom-small"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "m3d-edge" / "bundles"
    if trained.is_dir():
        source, tag = str(trained), checkpoint_digest(trained)
    else:
        source, tag = "preset:phantom-small", f"preset:phantom-small|{__version__}"
        click.echo("warning: models/phantom-small does not exist; using preset:phantom-small, whose vision and "
                   "segmentation weights are random (untrained): answers will not describe the scan", err=True)
    key = f"{tag}|{DEFAULT_LLM}|export-{EXPORT_REVISION}"
    return source, cache / hashlib.sha256(key.encode()).hexdigest()[:16]


def _default_bundle() -> str:
    """The bundle used when --bundle is not given, built once (the export, and with it torch, is imported only
    then)."""
    source, target = _default_bundle_location()
    if not (target / "manifest.json").is_file():
        from m3d_edge.export import bundle

        click.echo(f"building the default bundle from {source} into {target} (once; about a minute)", err=True)
        try:
            bundle.build(source, target, llm=DEFAULT_LLM, progress=False)
        except FileExistsError:  # another process finished it first
            pass
        except (ImportError, FileNotFoundError, ValueError, bundle.BundleBuildError) as e:
            raise click.ClickException(f"cannot build the default bundle from {source}: {e}; pass --bundle") from e
    return str(target)


def _load_pipeline(bundle_dir: str | None, device: str):
    from m3d_edge.runtime.bundle import BundleError
    from m3d_edge.runtime.engines import EngineError
    from m3d_edge.runtime.pipeline import Pipeline

    try:
        return Pipeline.load(bundle_dir or _default_bundle(), device=device)
    except (BundleError, EngineError) as e:
        raise click.ClickException(str(e)) from e


@main.command()
@click.argument("scan", type=click.Path(exists=True, path_type=str))
@click.option("-q", "--question", "questions", multiple=True,
              help="A question (repeat for several) [default: a report, a VQA, a box and a segmentation].")
@click.option("--bundle", "bundle_dir", default=None, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Bundle folder [default: phantom-small, built once into ~/.cache/m3d-edge/bundles].")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False, path_type=str),
              help="Folder for answer JSON, mask NIfTI, DICOM SEG (DICOM input) and PNG overlays.")
@click.option("--stream/--no-stream", default=False, help="Print the text as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="Print the answers as JSON.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--max-new-tokens", default=None, type=click.IntRange(min=1),
              help="Most new tokens per answer [default: the bundle's, 256].")
def run(scan: str, questions: tuple[str, ...], bundle_dir: str | None, out_dir: str | None, stream: bool,
        as_json: bool, device: str, max_new_tokens: int | None) -> None:
    """Answer questions about SCAN (DICOM folder, .dcm, .nii/.nii.gz or .npy) with a bundle."""
    import dataclasses
    import time
    from pathlib import Path

    from m3d_edge.imaging import ImagingError
    from m3d_edge.runtime.answer import write_answer
    from m3d_edge.runtime.pipeline import RuntimeInputError

    if stream and as_json:
        raise click.UsageError("--stream prints text as it comes, --json prints it at the end: choose one")
    pipeline = _load_pipeline(bundle_dir, device)
    out = Path(out_dir) if out_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        volume = pipeline.read(scan)
        read_s = time.perf_counter() - start
        records = []
        questions = questions or DEFAULT_QUESTIONS
        # without --stream the questions are decoded together (ask_many: same answers, ~2x faster for four)
        together = None if stream else pipeline.ask_many(volume, questions, max_new_tokens=max_new_tokens)
        for i, question in enumerate(questions, start=1):
            if stream:
                click.echo(f"Q{i}: {question}\nA{i}: ", nl=False)
                answer = pipeline.ask(volume, question, max_new_tokens=max_new_tokens,
                                      on_text=lambda piece: click.echo(piece, nl=False))
            else:
                answer = together[i - 1]
            if i == 1:
                answer = dataclasses.replace(answer, timings={"read": read_s, **answer.timings})
            files = {}
            if out is not None:
                start = time.perf_counter()
                files = write_answer(answer, out, source=volume, stem=f"answer-{i}")
                answer = dataclasses.replace(answer, timings={**answer.timings, "write": time.perf_counter() - start})
            record = {**answer.to_dict(), "files": files}
            records.append(record)
            if as_json:
                continue
            if not stream:
                click.echo(f"Q{i}: {question}\nA{i}: {answer.text}", nl=False)
            click.echo("")
            if not answer.text.strip():
                click.echo(f"    (empty answer: {len(answer.token_ids)} new token(s), stop reason "
                           f"{answer.stop_reason!r}; no [SEG], so no mask)")
            for box in answer.boxes:
                click.echo(f"    box {_box_text(box)}")
            if "mask" in record:
                click.echo(f"    mask: {record['mask']['voxels']} voxels, {record['mask']['volume_ml']} ml")
                if answer.mask_box is not None:
                    click.echo(f"    mask box {_box_text(answer.mask_box)}")
            for kind, path in files.items():
                click.echo(f"    {kind}: {path}")
            note = ""
            if together is not None and len(questions) > 1 and i == 1:
                note = " (decode: the shared time of the answers decoded together)"
            click.echo("    time: " + ", ".join(f"{k} {v:.2f}s" for k, v in answer.timings.items() if v > 0) + note)
    except (RuntimeInputError, ImagingError) as e:
        raise click.ClickException(str(e)) from e
    if out is not None:
        (out / "answers.json").write_text(json.dumps(records, indent=2))
    if as_json:
        click.echo(json.dumps(records, indent=2))


def _box_text(box) -> str:
    """An answer's Box for the terminal: source voxels and the LPS mm of its corner voxels."""
    lo, hi = box.patient_mm
    return (f"voxels (z0,y0,x0,z1,y1,x1) {list(box.voxels)}; LPS mm "
            f"[{', '.join(f'{v:.1f}' for v in lo)}] .. [{', '.join(f'{v:.1f}' for v in hi)}]")


@main.command()
@click.argument("scan", type=click.Path(exists=True, path_type=str))
@click.option("--bundle", "bundle_dir", default=None, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Bundle folder [default: phantom-small, built once into ~/.cache/m3d-edge/bundles].")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(min=1),
              help="Timed runs (after one warm-up run); medians are printed.")
@click.option("-q", "--question", "questions", multiple=True, help="A question [default: the four of `run`].")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
def bench(scan: str, bundle_dir: str | None, repeat: int, questions: tuple[str, ...], max_new_tokens: int,
          device: str, as_json: bool) -> None:
    """Time each runtime stage on SCAN: median over --repeat cold runs of all questions."""
    from m3d_edge.runtime.pipeline import RuntimeInputError, measure

    pipeline = _load_pipeline(bundle_dir, device)
    try:
        result = measure(pipeline, scan, questions or DEFAULT_QUESTIONS, repeat=repeat, max_new_tokens=max_new_tokens)
    except RuntimeInputError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    cold, warm = result["cold"], result["warm"]
    click.echo(f"median of {repeat} runs, {len(result['questions'])} questions, <= {max_new_tokens} new tokens")
    click.echo(f"{'stage':12s} {'first question':>15s} {'next questions':>15s}")
    for stage in cold:
        w = f"{warm[stage] * 1000:13.1f}ms" if stage in warm else f"{'-':>15s}"
        click.echo(f"{stage:12s} {cold[stage] * 1000:13.1f}ms {w}")
    ttft, rate = result["first_token_s"], result["decode_tokens_per_s"]
    click.echo(f"time to first token: {ttft['cold']:.3f}s cold" +
               (f", {ttft['warm']:.3f}s with the scan cached" if ttft["warm"] is not None else ""))
    if rate:
        click.echo(f"decode: {rate:.1f} tokens/s")

@main.group()
def train() -> None:
    """Train models (M3D-CLIP, stage 1 align, stage 2 instruct, the seg stage, or the whole phantom-small recipe)."""


def _stage_options(steps_default: int):
    def wrap(f):
        f = click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=str),
                         help="M3D-layout data set (phantoms from `m3d-edge synth`, or M3D-Data).")(f)
        f = click.option("--out", required=True, type=click.Path(path_type=str),
                         help="Run folder (resumes from its newest checkpoint if it exists).")(f)
        f = click.option("--steps", default=steps_default, show_default=True, type=click.IntRange(min=1))(f)
        f = click.option("--seed", default=0, show_default=True, type=int)(f)
        return click.option("--progress/--no-progress", default=True, show_default=True)(f)
    return wrap


def _run_stage(fn, *args) -> None:
    try:
        click.echo(str(fn(*args)))
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e


LM_LOSS_OPTION = click.option(
    "--lm-loss", default="token", show_default=True, type=click.Choice(["token", "sample"]),
    help="Stage 2's LM loss: token = mean over all answer tokens of a batch (official); sample = mean within each "
         "sample, then over samples (short answers weigh as much as reports).")
CLOSED_VQA_OPTION = click.option(
    "--closed-vqa-format", default="letter", show_default=True, type=click.Choice(CLOSED_VQA_FORMATS),
    help='Stage 2\'s closed-VQA answers: letter = "B. Liver" (official); content = "Liver. Choice B." (the choice '
         'text first, then its letter; both pass the official scoring).')
TRAIN_VISION_OPTION = click.option(
    "--train-vision/--freeze-vision", default=False, show_default=True,
    help="Stage 2 trains the vision tower too (official; at the seg module's rate, every image through the tower at "
         "every step) or freezes it and caches its features (faster; phantom-small v1-v5).")
DETAIL_HELP = ("Give the seg module a detail path of this width, a multiple of 4 (a small conv U-Net on the image "
               "at the mask decoder's grid; ours, docs/training.md), if it has none; 0: train the module as it is.")
KEY_REPEAT_HELP = ("The seg stage shows each image this many times an epoch, each time with all its key-organ masks "
                   "(liver, spleen, kidneys) and a share of its others: the key organs get that many times the "
                   "steps, and a step is cheaper; 1: every mask once.")
SEG_WARMUP_HELP = ("Steps of class-prompted seg alone before the CLIP loss, every key organ and lesion of one "
                   "image per ViT pass (0: none, as phantom-small v1).")


@train.command("clip")
@_stage_options(360)
@click.option("--seg-warmup-steps", default=0, show_default=True, type=click.IntRange(min=0), help=SEG_WARMUP_HELP)
def train_clip(data: str, out: str, steps: int, seed: int, progress: bool, seg_warmup_steps: int) -> None:
    """M3D-CLIP: the phantom-small ViT against the MiniLM text encoder; writes OUT/clip.safetensors."""
    from m3d_edge.train.recipe import RecipeConfig, clip_stage

    _run_stage(clip_stage, RecipeConfig(out=out, seed=seed, clip_steps=steps, seg_warmup_steps=seg_warmup_steps,
                                        progress=progress), data)


@train.command("align")
@_stage_options(150)
@click.option("--clip", "clip", required=True, type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="clip.safetensors of a CLIP run (its vision encoder initialises the tower).")
def train_align(data: str, out: str, steps: int, seed: int, progress: bool, clip: str) -> None:
    """Stage 1: the projector alone learns (ViT and LLM frozen); writes OUT/model."""
    from m3d_edge.train.recipe import RecipeConfig, align_stage

    _run_stage(align_stage, RecipeConfig(out=out, seed=seed, align_steps=steps, progress=progress), data, clip)


@train.command("instruct")
@_stage_options(1500)
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Checkpoint folder to start from (an align run's OUT/model).")
@LM_LOSS_OPTION
@CLOSED_VQA_OPTION
@TRAIN_VISION_OPTION
def train_instruct(data: str, out: str, steps: int, seed: int, progress: bool, model_dir: str, lm_loss: str,
                   closed_vqa_format: str, train_vision: bool) -> None:
    """Stage 2: LoRA + projector + seg on all tasks (the tower frozen unless --train-vision); writes OUT/model
    (compact, LoRA kept)."""
    from m3d_edge.train.recipe import RecipeConfig, instruct_stage

    _run_stage(instruct_stage, RecipeConfig(out=out, seed=seed, instruct_steps=steps, lm_loss=lm_loss,
                                            closed_vqa_format=closed_vqa_format, train_vision=train_vision,
                                            progress=progress), data, model_dir)


@train.command("seg")
@_stage_options(2400)
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Checkpoint folder to start from (a stage-2 run's OUT/model, or models/phantom-small).")
@click.option("--detail-channels", default=0, show_default=True, type=click.IntRange(min=0), help=DETAIL_HELP)
@click.option("--key-repeat", default=1, show_default=True, type=click.IntRange(min=1), help=KEY_REPEAT_HELP)
@click.option("--extra-data", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Another data set whose training split joins --data's (repeatable; e.g. `m3d-edge synth` phantoms "
                   "of another seed: more training images, the same held-out split).")
@click.option("--states-cache", default=None, type=click.Path(file_okay=False, path_type=str),
              help="Folder that keeps the [SEG] states between seg stages: a later stage from the same LLM and "
                   "tower reads them instead of computing them again.")
def train_seg(data: str, out: str, steps: int, seed: int, progress: bool, model_dir: str,
              detail_channels: int, key_repeat: int, extra_data: tuple[str, ...], states_cache: str | None) -> None:
    """Seg only (ours): the seg projector and module on every training mask, LLM and tower frozen, their [SEG]
    states and tokens computed once; writes OUT/model (the checkpoint's LoRA adapter kept)."""
    from m3d_edge.train.recipe import RecipeConfig, seg_stage

    _run_stage(seg_stage, RecipeConfig(out=out, seed=seed, seg_steps=steps, seg_detail_channels=detail_channels,
                                       seg_key_repeat=key_repeat, seg_states_cache=states_cache, progress=progress),
               data, model_dir, extra_data)


@train.command("recipe")
@click.argument("name", type=click.Choice(["phantom-small"]))
@click.option("--out", required=True, type=click.Path(path_type=str), help="Run folder (resumes if it exists).")
@click.option("--data", default=None, type=click.Path(exists=True, path_type=str),
              help="M3D-layout data set (phantoms or M3D-Data); default: synthesize one into OUT/data.")
@click.option("--n-cases", default=256, show_default=True, type=click.IntRange(min=10), help="Phantoms to synthesize.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--clip-steps", default=360, show_default=True, type=click.IntRange(min=1))
@click.option("--align-steps", default=150, show_default=True, type=click.IntRange(min=1))
@click.option("--instruct-steps", default=1500, show_default=True, type=click.IntRange(min=1))
@click.option("--seg-warmup-steps", default=0, show_default=True, type=click.IntRange(min=0), help=SEG_WARMUP_HELP)
@click.option("--lr-seg-instruct", default=None, type=click.FloatRange(min=0, min_open=True),
              help="The seg module's learning rate in stage 2, and the vision tower's with --train-vision "
                   "(default: that of the seg projector, 1e-3).")
@click.option("--lr-instruct", default=2e-4, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Stage 2's learning rate (LoRA, projector, new token rows).")
@LM_LOSS_OPTION
@CLOSED_VQA_OPTION
@TRAIN_VISION_OPTION
@click.option("--seg-steps", default=0, show_default=True, type=click.IntRange(min=0),
              help="Steps of the seg stage after stage 2 (ours: seg projector and module only, one image a step "
                   "with all its masks); 0: none.")
@click.option("--seg-detail-channels", default=0, show_default=True, type=click.IntRange(min=0), help=DETAIL_HELP)
@click.option("--seg-key-repeat", default=1, show_default=True, type=click.IntRange(min=1), help=KEY_REPEAT_HELP)
@click.option("--progress/--no-progress", default=True, show_default=True)
def train_recipe(name: str, out: str, data: str | None, n_cases: int, seed: int, clip_steps: int, align_steps: int,
                 instruct_steps: int, seg_warmup_steps: int, lr_seg_instruct: float | None, lr_instruct: float,
                 lm_loss: str, closed_vqa_format: str, train_vision: bool, seg_steps: int, seg_detail_channels: int,
                 seg_key_repeat: int, progress: bool) -> None:
    """Run synth -> clip -> align -> instruct (-> seg) end to end and save OUT/model (a compact checkpoint)."""
    from m3d_edge.train.recipe import RecipeConfig, run_recipe

    try:
        path = run_recipe(RecipeConfig(out=out, data=data, n_cases=n_cases, seed=seed, clip_steps=clip_steps,
                                       align_steps=align_steps, instruct_steps=instruct_steps,
                                       seg_warmup_steps=seg_warmup_steps, lr_seg_instruct=lr_seg_instruct,
                                       lr_instruct=lr_instruct, lm_loss=lm_loss,
                                       closed_vqa_format=closed_vqa_format, train_vision=train_vision,
                                       seg_steps=seg_steps, seg_detail_channels=seg_detail_channels,
                                       seg_key_repeat=seg_key_repeat, progress=progress))
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(str(path))


@main.command()
@click.argument("checkpoint")
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="New folder for the bundle.")
@click.option("--llm", "llm", default=DEFAULT_LLM, show_default=True, type=click.Choice(list(LLM_PRECISIONS)),
              help="LLM weight precision (int4-q41: Q4_1 blocks, int8 LM head, exact on SmolLM2; int4-gptq: "
                   "calibrated on phantom scans + prompts; a merged LoRA stays a float branch beside the 4-bit "
                   "base, except with int4-q41-lora8, which stores the projections it changed at 8 bits: "
                   "docs/export.md).")
@click.option("--vision", "vision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]),
              help="Vision and segmentation graph precision.")
@click.option("--tensorrt/--no-tensorrt", default=False, help="Also build TensorRT engines (needs an NVIDIA GPU).")
@click.option("--progress/--quiet", default=True, help="Report each export stage.")
def export(checkpoint: str, out: str, llm: str, vision: str, tensorrt: bool, progress: bool) -> None:
    """Export CHECKPOINT (a folder, or preset:NAME for random weights) into a verified bundle."""
    from m3d_edge.export import bundle
    from m3d_edge.model.checkpoint import CheckpointError

    if tensorrt:  # fail before the (long) export when this machine cannot build engines
        from m3d_edge.export.tensorrt import TensorRTUnavailable, gpu_tag

        try:
            gpu_tag()
        except TensorRTUnavailable as e:
            raise click.UsageError(f"--tensorrt: {e}. Export without --tensorrt (the bundle runs on ONNX Runtime).")
    try:
        path = bundle.build(checkpoint, out, llm=llm, vision=vision, progress=progress)
    except (FileExistsError, FileNotFoundError, CheckpointError, bundle.BundleBuildError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    if tensorrt:
        from m3d_edge.export.tensorrt import EngineBuildError, build_engines

        try:
            click.echo(f"engines: {build_engines(path, progress=progress)}")
        except EngineBuildError as e:
            raise click.ClickException(f"{e} (the ONNX bundle in {path} is complete and usable without engines)")
    click.echo(str(path))


@main.command()
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="New folder for the dataset.")
@click.option("--n", "n", default=200, show_default=True, type=click.IntRange(min=1), help="Number of cases.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same data).")
@click.option("--template-dir", default=None, type=click.Path(path_type=str),
              help="Folder with TotalSegmentator's example_seg.nii.gz (organ shapes) "
                   "[default: ../shared/data/totalseg].")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def synth(out: str, n: int, seed: int, template_dir: str | None, progress: bool) -> None:
    """Write synthetic CT phantoms with ground truth for all eight M3D-Bench tasks, in the M3D-Data layouts."""
    from pathlib import Path

    from m3d_edge.data.phantom import DEFAULT_TEMPLATE_DIR, format_baselines, load_stats, synthesize

    if Path(out).exists():
        raise click.ClickException(f"{out} already exists; choose a new --out folder (nothing was written)")
    try:
        path = synthesize(out, n, seed, progress=progress, template_dir=template_dir or DEFAULT_TEMPLATE_DIR)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    stats = load_stats(path)
    click.echo(f"wrote {n} cases to {path} in {stats['seconds']:.1f} s ({stats['seconds_per_case']:.2f} s/case)")
    click.echo("constant-answer baselines per split (stats.json has them all):")
    click.echo(format_baselines(stats))


if __name__ == "__main__":
    main()
