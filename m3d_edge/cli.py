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


if __name__ == "__main__":
    main()
