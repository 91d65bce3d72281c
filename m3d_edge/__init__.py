"""M3D-Edge: run M3D-LaMed (a 3D medical multimodal LLM) next to the scanner."""

__version__ = "0.1.0"
