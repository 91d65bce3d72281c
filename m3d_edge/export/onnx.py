"""The vision and segmentation graphs of a LaMed as ONNX files (the LLM is `export.llm`).

Each graph is traced through its own small wrapper module, so that the file's inputs and outputs are named and
the batch axis is dynamic. The cut follows the cost (as SAM's export does): the heavy encoders run once per scan,
the mask decoder runs only when the answer holds [SEG].

    vision.onnx       images [B, 1, 32, 256, 256] -> image_tokens [B, N, H]
                      (+ patch_tokens [B, 2048, C] when the seg module shares the vision tower, so the runtime
                      feeds the mask decoder without running the ViT a second time)
    seg_encoder.onnx  images [B, 1, 32, 256, 256] -> seg_embedding [B, E, 8, 16, 16]      (only when not shared)
    seg_detail.onnx   images [B, 1, 32, 256, 256] -> seg_detail [B, E/8, 32, 64, 64]  (only with a detail path)
    seg_decoder.onnx  (seg_embedding [B, E, 8, 16, 16] | patch_tokens [B, 2048, C] when shared,
                       seg_hidden [B, H_llm] (, seg_detail [B, E/8, 32, 64, 64] with a detail path))
                      -> mask_logits [B, 1, 32, 256, 256]

The mask decoder's image inputs are named after the tensors that feed them (`seg_embedding` from
seg_encoder.onnx, `patch_tokens` from vision.onnx, `seg_detail` from seg_detail.onnx), so the runtime joins
outputs to inputs by name and never reshapes. `seg_hidden` is the LLM hidden state that predicted [SEG];
`seg_projector` runs inside seg_decoder.onnx.

Attention over the 2048 patch tokens is traced in chunks of ATTENTION_QUERY_CHUNK queries (`model.vit3d`'s
`query_chunk`, set only while tracing). The graph computes the same numbers, but ONNX Runtime no longer holds
[B, heads, 2049, 2049] scores at once: on phantom-small (4 heads) the vision run's peak memory fell from 86 to
26 MB and its time from 106 to 96 ms (2 threads, this CPU); the official 12-head tower would hold 200 MB per
score tensor. TensorRT builds from the same files; whether its attention fusion still applies to the chunked
form is not measured (no GPU here).

fp16 variants keep float32 inputs and outputs (`keep_io_types`): the runtime feeds the same arrays either way and
the casts at the edges cost nothing next to the encoders.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from m3d_edge.model.lamed import LaMed
from m3d_edge.model.vit3d import SelfAttention

OPSET = 18
PRECISIONS = ("fp32", "fp16")
ATTENTION_QUERY_CHUNK = 256  # queries per attention chunk in the traced encoders (see the module docstring)
# Above this size an .onnx keeps its weights in a side file (protobuf refuses messages over 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


class VisionGraph(nn.Module):
    """images [B, 1, D, H, W] -> image_tokens [B, N, H_llm] (, patch_tokens [B, 2048, C] when `with_patch_tokens`)."""

    def __init__(self, model: LaMed, with_patch_tokens: bool) -> None:
        super().__init__()
        self.vision_tower, self.mm_projector = model.vision_tower, model.mm_projector
        self.with_patch_tokens = with_patch_tokens

    def forward(self, images: torch.Tensor):
        patch = self.vision_tower(images)  # [B, 2048, C]
        tokens = self.mm_projector(patch)  # [B, 2048, C] -> [B, N, H_llm]
        return (tokens, patch) if self.with_patch_tokens else tokens


class SegEncoderGraph(nn.Module):
    """images [B, 1, D, H, W] -> seg_embedding [B, E, 8, 16, 16] (the seg module's own ViT)."""

    def __init__(self, model: LaMed) -> None:
        super().__init__()
        self.seg_module = model.seg_module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.seg_module.encode(images)


class SegDetailGraph(nn.Module):
    """images [B, 1, 32, 256, 256] -> seg_detail [B, E/8, 32, 64, 64]: a seg module's detail path (ours).

    A graph of its own, neither in vision.onnx (every scan would pay for it, [SEG] or not) nor in seg_decoder.onnx
    (every mask would): the path reads only the image, so the runtime runs it once per scan, at the scan's first
    [SEG], and every later mask of the scan reuses it. It is most of a mask's cost (docs/runtime.md).
    """

    def __init__(self, model: LaMed) -> None:
        super().__init__()
        self.seg_module = model.seg_module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.seg_module.detail_features(images)


class SegDecoderGraph(nn.Module):
    """(image input, seg_hidden [B, H_llm] (, seg_detail)) -> mask_logits [B, 1, D, H, W].

    The image input is seg_embedding [B, E, 8, 16, 16], or patch tokens [B, 2048, C] when the vision tower is
    shared (turned into the grid here: a transpose the graph does for free, and one less contract to keep).
    A seg module with a detail path (ours) also reads that path's features, seg_detail.onnx's output.
    """

    def __init__(self, model: LaMed) -> None:
        super().__init__()
        self.seg_projector, self.seg_module = model.seg_projector, model.seg_module
        self.from_tokens = model.cfg.seg.share_vision_encoder

    def forward(self, image: torch.Tensor, seg_hidden: torch.Tensor,
                seg_detail: Optional[torch.Tensor] = None) -> torch.Tensor:
        embedding = self.seg_module.tokens_to_grid(image) if self.from_tokens else image
        prompt = self.seg_projector(seg_hidden)  # [B, H_llm] -> [B, E]
        return self.seg_module.decode(embedding, prompt, detail=seg_detail)


@dataclass(frozen=True)
class GraphSpec:
    """What one exported file is: its wrapper, example inputs and names. Dynamic axis 0 everywhere (batch)."""

    name: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def graph_specs(model: LaMed, batch: int = 1) -> list[GraphSpec]:
    """The graphs of `model` in bundle order. Example inputs are random but deterministic (seeded)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    images = torch.rand((batch, cfg.vision.in_channels, *cfg.vision.image_size), generator=g)
    shared = cfg.seg is not None and cfg.seg.share_vision_encoder
    specs = [GraphSpec("vision", VisionGraph(model, shared), (images,), ("images",),
                       ("image_tokens", "patch_tokens") if shared else ("image_tokens",))]
    if cfg.seg is None:
        return specs
    hidden = torch.randn((batch, cfg.llm.hidden_size), generator=g)
    if shared:
        image_name = "patch_tokens"
        image_in = torch.randn((batch, cfg.vision.num_patches, cfg.vision.hidden_size), generator=g)
    else:
        specs.append(GraphSpec("seg_encoder", SegEncoderGraph(model), (images,), ("images",), ("seg_embedding",)))
        image_name = "seg_embedding"
        image_in = torch.randn((batch, cfg.seg.embed_dim, *cfg.vision.grid), generator=g)
    example, names = (image_in, hidden), (image_name, "seg_hidden")
    if cfg.seg.detail_channels:
        specs.append(GraphSpec("seg_detail", SegDetailGraph(model), (images,), ("images",), ("seg_detail",)))
        detail = torch.randn((batch, cfg.seg.embed_dim // 8, *(4 * n for n in cfg.vision.grid)), generator=g)
        example, names = (*example, detail), (*names, "seg_detail")
    specs.append(GraphSpec("seg_decoder", SegDecoderGraph(model), example, names, ("mask_logits",)))
    return specs


def export_graph(spec: GraphSpec, path: str | Path, *, precision: str = "fp32", simplify: bool = True) -> Path:
    """Trace `spec` to `path` (opset 18, dynamic batch), check it, simplify it, and convert it to fp16 if asked."""
    import onnx

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported for {spec.name}; expected one of {PRECISIONS}")
    path = Path(path)
    model, outputs = _trace(spec)
    onnx.checker.check_model(model)
    if simplify:
        model = _simplify(model, spec.name)
    _stamp_output_shapes(model, outputs)
    if precision == "fp16":
        model = to_fp16(model)
    save(model, path)
    onnx.checker.check_model(str(path))  # by path: also checks the external data when there is some
    return path


def export_all(model: LaMed, out_dir: str | Path, *, precision: str = "fp32", simplify: bool = True) -> dict[str, Path]:
    """Every graph of `model` into `out_dir` as <name>.onnx. Returns {name: path}."""
    model = model.eval()
    out_dir = Path(out_dir)
    return {spec.name: export_graph(spec, out_dir / f"{spec.name}.onnx", precision=precision, simplify=simplify)
            for spec in graph_specs(model)}


def _trace(spec: GraphSpec) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """-> (the traced graph, the wrapper's outputs on the example inputs)."""
    import onnx

    buf = io.BytesIO()
    dynamic = {name: {0: "batch"} for name in spec.inputs + spec.outputs}
    with torch.no_grad(), warnings.catch_warnings(), _chunked_attention(spec.module, ATTENTION_QUERY_CHUNK):
        # the ViT's input-shape check compares traced sizes; it is true for the traced shape and harmless
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # dynamo=False is deliberate (measured-here.md: it traces these modules exactly); torch says it is legacy
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(spec.module.eval(), spec.example, buf, dynamo=False, opset_version=OPSET,
                          input_names=list(spec.inputs), output_names=list(spec.outputs), dynamic_axes=dynamic,
                          do_constant_folding=True)
        outputs = spec.module(*spec.example)
    return onnx.load_from_string(buf.getvalue()), outputs if isinstance(outputs, tuple) else (outputs,)


@contextlib.contextmanager
def _chunked_attention(module: nn.Module, chunk: int):
    """Set `query_chunk` on every ViT attention inside `module` while the block runs, then restore it."""
    layers = [m for m in module.modules() if isinstance(m, SelfAttention)]
    before = [m.query_chunk for m in layers]
    for m in layers:
        m.query_chunk = chunk
    try:
        yield
    finally:
        for m, value in zip(layers, before):
            m.query_chunk = value


def _stamp_output_shapes(model, outputs: tuple[torch.Tensor, ...]) -> None:
    """Write the output shapes into the graph (batch symbolic, the rest fixed): the tracer names them after the
    last op (e.g. "Resizemask_logits_dim_1"), which tells a reader of the manifest nothing."""
    for value, tensor in zip(model.graph.output, outputs):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for i, n in enumerate(tensor.shape):
            dim = dims.add()
            if i == 0:
                dim.dim_param = "batch"
            else:
                dim.dim_value = int(n)


def _simplify(model, name: str):
    """onnxslim folds the shape arithmetic the tracer leaves behind. If it fails the traced graph is kept: it is
    correct, only less tidy, so a warning (not an error) is the right cost."""
    import onnx

    try:
        import onnxslim

        slim = onnxslim.slim(model)
        onnx.checker.check_model(slim)
        return slim
    except Exception as e:  # onnxslim raises many types; any failure means "keep the unsimplified graph"
        warnings.warn(f"{name}: onnxslim failed ({type(e).__name__}: {e}); keeping the unsimplified graph",
                      stacklevel=3)
        return model


def to_fp16(model, keep_io_types: bool | list[str] = True):
    """fp16 weights and arithmetic; the inputs and outputs stay float32 (all of them, or those named)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(model, keep_io_types=keep_io_types)
    return _topological_sort(half)


def _topological_sort(model):
    """The fp16 converter appends its input casts after the nodes that read them; ONNX requires producers first."""
    graph = model.graph
    ready = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph {graph.name!r} has a cycle or a dangling input at node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def save(model, path: Path) -> Path:
    """Write `model`; weights go to `<name>.data` beside it when the file would be large."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def io_signature(path: str | Path) -> dict[str, list[dict]]:
    """Input and output names, dtypes and shapes (symbolic axes as strings) of an ONNX file, for the manifest."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": [d.dim_param or d.dim_value for d in t.shape.dim]})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}
