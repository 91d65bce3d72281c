"""M3D-Edge: run M3D-LaMed (a 3D medical multimodal LLM) next to the scanner."""

__version__ = "0.1.0"


def offline_by_default() -> None:
    """Every command and benchmark script runs without the network: weights come from the checkpoint folder, pip
    packages or a bundle.

    Without HF_HUB_OFFLINE, importing bitsandbytes (transformers does, when it loads a model or reports versions)
    asks the Hugging Face Hub, through the `kernels` package, about an optional CPU kernel
    (kernels-community/quantization-bitsandbytes) on CPUs with AVX512-BF16, and logs a warning when that fails;
    offline, `kernels` warns that it skipped the check. We never use that kernel (NF4 runs bitsandbytes' own CPU
    code), so the Hub is not asked and neither warning, which would tell the user to install or trust something,
    is shown. A user who sets HF_HUB_OFFLINE=0 explicitly keeps it.
    """
    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("bitsandbytes.backends.cpu.ops", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
