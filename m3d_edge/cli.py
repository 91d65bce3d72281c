"""The `m3d-edge` command line. Thin: each command parses options and calls one library function."""

from __future__ import annotations

import json
import platform
import sys

import click

from m3d_edge import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="m3d-edge")
def main() -> None:
    """M3D-Edge: run M3D-LaMed, a 3D medical multimodal LLM, next to the scanner."""


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

@main.command()
@click.argument("checkpoint")
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="New folder for the bundle.")
@click.option("--llm", "llm", default="int4-rtn", show_default=True,
              type=click.Choice(["int4-rtn", "int4-hqq", "fp32", "fp16"]), help="LLM weight precision.")
@click.option("--vision", "vision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]),
              help="Vision and segmentation graph precision.")
@click.option("--tensorrt/--no-tensorrt", default=False, help="Also build TensorRT engines (needs an NVIDIA GPU).")
@click.option("--progress/--quiet", default=True, help="Report each export stage.")
def export(checkpoint: str, out: str, llm: str, vision: str, tensorrt: bool, progress: bool) -> None:
    """Export CHECKPOINT (a folder, or preset:NAME for random weights) into a verified bundle."""
    from m3d_edge.export import bundle
    from m3d_edge.model.checkpoint import CheckpointError

    if tensorrt:
        import onnxruntime

        if "TensorrtExecutionProvider" not in onnxruntime.get_available_providers():
            raise click.UsageError("--tensorrt needs an NVIDIA GPU with TensorRT and onnxruntime-gpu; this machine "
                                   "has neither. Export without --tensorrt (the bundle runs on ONNX Runtime).")
        raise click.UsageError("--tensorrt: TensorRT engine building is not implemented yet (export.tensorrt); "
                               "export without it.")
    try:
        path = bundle.build(checkpoint, out, llm=llm, vision=vision, progress=progress)
    except (FileExistsError, FileNotFoundError, CheckpointError, bundle.BundleBuildError, ValueError) as e:
        raise click.ClickException(str(e)) from e
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
