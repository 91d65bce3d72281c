"""TensorRT engines: tags, the errors without a GPU, the engine folder's bookkeeping in the bundle, and (with CUDA
and TensorRT) tiny fp16 engines against ONNX Runtime.

The bookkeeping tests fake an engine folder with dummy files: what they check (engines.json, the manifest's
`engines` section, choosing a folder, falling back, atomic replacement) needs no TensorRT.
"""

import json
import logging
import sys

import numpy as np
import pytest

from m3d_edge.export import tensorrt as trt_export
from m3d_edge.runtime import bundle as bundle_reader
from m3d_edge.runtime import trt as trt_runtime
from m3d_edge.runtime.trt import TensorRTUnavailable

from conftest import run_without_modules

H200 = "nvidia-h200-sm90-trt10.13.3.9"
A100 = "nvidia-a100-sxm4-80gb-sm80-trt10.13.3.9"
H200_OLD_TRT = "nvidia-h200-sm90-trt10.3.0.26"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture
def fake_bundle(tmp_path):
    """The smallest folder runtime.bundle.load accepts, with a vision component."""
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "vision.onnx").write_bytes(b"not really onnx")
    manifest = {"format": bundle_reader.FORMAT,
                "components": {"vision": {"file": "vision.onnx", "precision": "fp32",
                                          "inputs": [{"name": "images", "dtype": "float32",
                                                      "shape": ["batch", 1, 32, 256, 256]}],
                                          "outputs": [{"name": "image_tokens", "dtype": "float32",
                                                       "shape": ["batch", 256, 64]}]}},
                "files": {"vision.onnx": {"sha256": bundle_reader.sha256_file(root / "vision.onnx"), "bytes": 15}}}
    (root / bundle_reader.MANIFEST).write_text(json.dumps(manifest))
    return root


def stage(bundle, tag, payload=b"engine bytes"):
    """A staged engine folder in bundle/engines/ as build_engines leaves it before publishing."""
    parts = trt_runtime.parse_tag(tag)
    folder = bundle / trt_runtime.ENGINES_DIR / f".{tag}.partial-test"
    folder.mkdir(parents=True)
    (folder / "vision.engine").write_bytes(payload)
    record = {"file": "vision.engine", "sha256": bundle_reader.sha256_file(folder / "vision.engine"),
              "bytes": len(payload), "source": {"file": "vision.onnx", "sha256": "0" * 64},
              "inputs": [{"name": "images", "dtype": "float32", "shape": [-1, 1, 32, 256, 256]}],
              "outputs": [{"name": "image_tokens", "dtype": "float32", "shape": [-1, 256, 64]}]}
    gpu_name = {"nvidia-h200": "NVIDIA H200", "nvidia-a100-sxm4-80gb": "NVIDIA A100-SXM4-80GB"}[parts.gpu]
    info = trt_export.engines_info(tag, {"vision": record}, gpu_name=gpu_name,
                                   capability=(int(parts.sm[:-1]), int(parts.sm[-1])), tensorrt=parts.tensorrt,
                                   precision="fp16", typing="weak", max_batch=8, workspace_bytes=1 << 30,
                                   optimization_level=None, build_seconds=1.0)
    trt_export.write_engines_json(folder, info)
    return folder


# -- tags and missing GPU / TensorRT -----------------------------------------------------------------------------

def test_tags_name_the_gpu_its_compute_capability_and_tensorrt():
    assert trt_runtime.make_tag("NVIDIA H200", (9, 0), "10.13.3.9") == H200
    assert trt_runtime.make_tag("NVIDIA A100-SXM4-80GB", (8, 0), "10.13.3.9") == A100
    assert trt_runtime.make_tag("NVIDIA GeForce RTX 5090", (12, 0), "10.9.0") == \
        "nvidia-geforce-rtx-5090-sm120-trt10.9.0"
    tag = trt_runtime.parse_tag(A100)
    assert (tag.gpu, tag.sm, tag.tensorrt) == ("nvidia-a100-sxm4-80gb", "80", "10.13.3.9")
    assert trt_runtime.parse_tag(".nvidia-h200-sm90-trt10.1.partial-x") is None
    with pytest.raises(ValueError, match="dotted"):
        trt_runtime.make_tag("NVIDIA H200", (9, 0), "10.x")


def test_no_cuda_gives_a_clear_error(monkeypatch, fake_bundle):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TensorRTUnavailable, match=r"no CUDA GPU .*pip install m3d-edge\[gpu\]"):
        trt_export.gpu_tag()
    with pytest.raises(TensorRTUnavailable, match="no CUDA GPU"):
        trt_export.build_engines(fake_bundle, progress=False)
    assert issubclass(TensorRTUnavailable, RuntimeError)
    assert not (fake_bundle / "engines").exists(), "nothing may be written before the GPU check"


def test_missing_tensorrt_gives_the_pip_command(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(TensorRTUnavailable, match=r"tensorrt .*not importable.*pip install m3d-edge\[gpu\]"):
        trt_export.gpu_tag()


def test_bad_arguments_are_refused_before_the_gpu_is_asked(fake_bundle):
    with pytest.raises(ValueError, match="max_batch"):
        trt_export.build_engines(fake_bundle, max_batch=0)
    with pytest.raises(ValueError, match="optimization_level"):
        trt_export.build_engines(fake_bundle, optimization_level=7)


# -- choosing an engine folder -----------------------------------------------------------------------------------

def test_bundle_without_engines_gives_none_and_says_why(fake_bundle, caplog):
    with caplog.at_level(logging.INFO, logger="m3d_edge.runtime.trt"):
        assert trt_runtime.engines_for_this_gpu(fake_bundle, tag=H200) is None
    assert "has no TensorRT engines" in caplog.text
    # without a GPU the answer is the same (no tag needed to see that there are no engines)
    assert trt_runtime.engines_for_this_gpu(fake_bundle) is None


def test_engines_for_another_gpu_or_tensorrt_are_not_used(fake_bundle, caplog):
    trt_export.publish_engines(fake_bundle, stage(fake_bundle, A100))
    with caplog.at_level(logging.WARNING, logger="m3d_edge.runtime.trt"):
        assert trt_runtime.engines_for_this_gpu(fake_bundle, tag=H200) is None
    assert "another GPU (nvidia-a100-sxm4-80gb (sm80)" in caplog.text and "falling back to ONNX Runtime" in caplog.text

    trt_export.publish_engines(fake_bundle, stage(fake_bundle, H200_OLD_TRT))
    choice = trt_runtime.choose_engines(fake_bundle, tag=H200)
    assert choice.folder is None
    assert "built with TensorRT 10.3.0.26" in choice.reason and "has TensorRT 10.13.3.9" in choice.reason


def test_engines_without_a_gpu_here_are_not_used(fake_bundle, monkeypatch):
    import torch

    trt_export.publish_engines(fake_bundle, stage(fake_bundle, H200))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    choice = trt_runtime.choose_engines(fake_bundle)
    assert choice.folder is None and H200 in choice.reason and "no CUDA GPU" in choice.reason


def test_published_engines_are_listed_verified_and_chosen(fake_bundle):
    folder = trt_export.publish_engines(fake_bundle, stage(fake_bundle, H200))
    assert folder == fake_bundle / "engines" / H200
    assert not list((fake_bundle / "engines").glob(".*partial*")), "the staged folder is renamed, not copied"
    bundle = bundle_reader.load(fake_bundle, verify=True)  # the bundle's own verification still passes
    entry = bundle.manifest["engines"][H200]
    assert set(entry["files"]) == {f"engines/{H200}/vision.engine", f"engines/{H200}/engines.json"}
    assert entry["engines"] == {"vision": "vision.engine"} and entry["max_batch"] == 8
    assert "engines/" not in json.dumps(bundle.manifest["files"]), "engines stay out of the always-hashed files"
    info = trt_runtime.read_engines_json(folder)
    assert info["tag"] == H200 and info["tensorrt"] == "10.13.3.9"
    assert info["gpu"] == {"name": "NVIDIA H200", "compute_capability": "9.0"}
    assert info["engines"]["vision"]["sha256"] == bundle_reader.sha256_file(folder / "vision.engine")
    assert trt_runtime.engines_for_this_gpu(fake_bundle, tag=H200) == folder


def test_a_changed_engine_is_refused_but_the_bundle_stays_usable(fake_bundle):
    folder = trt_export.publish_engines(fake_bundle, stage(fake_bundle, H200))
    (folder / "vision.engine").write_bytes(b"tampered")
    choice = trt_runtime.choose_engines(fake_bundle, tag=H200)
    assert choice.folder is None and "sha256" in choice.reason and "vision.engine" in choice.reason
    bundle_reader.load(fake_bundle, verify=True)  # ONNX Runtime can still serve it
    assert trt_runtime.choose_engines(fake_bundle, tag=H200, verify=False).folder == folder


def test_an_unlisted_engine_folder_is_not_trusted(fake_bundle):
    staged = stage(fake_bundle, H200)
    staged.rename(fake_bundle / "engines" / H200)  # copied in by hand: no manifest entry
    choice = trt_runtime.choose_engines(fake_bundle, tag=H200)
    assert choice.folder is None and "not listed in the manifest" in choice.reason


def test_republishing_needs_overwrite_and_a_failed_manifest_write_changes_nothing(fake_bundle, monkeypatch):
    folder = trt_export.publish_engines(fake_bundle, stage(fake_bundle, H200, b"first"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trt_export.publish_engines(fake_bundle, stage(fake_bundle, H200, b"second"))
    manifest_before = (fake_bundle / "manifest.json").read_text()

    def broken(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(trt_export, "_write_json_atomic", broken)
    staged = fake_bundle / "engines" / f".{H200}.partial-test"
    with pytest.raises(OSError, match="disk full"):
        trt_export.publish_engines(fake_bundle, staged, overwrite=True)
    assert (folder / "vision.engine").read_bytes() == b"first", "the old engines are put back"
    assert (fake_bundle / "manifest.json").read_text() == manifest_before
    assert staged.is_dir(), "the staged folder is handed back to the caller"
    monkeypatch.undo()

    trt_export.publish_engines(fake_bundle, staged, overwrite=True)
    assert (folder / "vision.engine").read_bytes() == b"second"
    assert trt_runtime.engines_for_this_gpu(fake_bundle, tag=H200) == folder
    assert [p.name for p in (fake_bundle / "engines").iterdir() if p.is_dir()] == [H200]


def test_engines_json_must_describe_the_files_beside_it(fake_bundle):
    folder = stage(fake_bundle, H200)
    info = trt_runtime.read_engines_json(folder)
    (folder / "vision.engine").write_bytes(b"other")
    with pytest.raises(ValueError, match="not the file engines.json describes"):
        trt_export.write_engines_json(folder, info)
    with pytest.raises(ValueError, match="does not match"):
        trt_export.engines_info(H200, {}, gpu_name="NVIDIA A100", capability=(8, 0), tensorrt="10.13.3.9",
                                precision="fp16", typing="weak", max_batch=8, workspace_bytes=1,
                                optimization_level=None, build_seconds=0.0)


def test_runtime_module_needs_no_torch(fake_bundle):
    """runtime/trt.py is importable, and answers "no engines here", with torch unimportable (the CPU runtime)."""
    run_without_modules(("torch", "tensorrt"), (
        "from m3d_edge.runtime import trt\n"
        f"choice = trt.choose_engines({str(fake_bundle)!r})\n"
        "assert choice.folder is None and 'no TensorRT engines' in choice.reason, choice\n"
        "try:\n"
        "    trt.gpu_tag()\n"
        "except trt.TensorRTUnavailable as e:\n"
        "    assert 'torch is not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('gpu_tag without torch must raise')\n"
        "assert 'm3d_edge.export' not in sys.modules\n"
    ), timeout=60)


# -- build_engines' flow with a stand-in TensorRT ---------------------------------------------------------------

class FakeTensorRT:
    """Just enough of the tensorrt module for build_engines' control flow: the parser reads the ONNX inputs and
    outputs, the "engine" is a JSON record of the network and the profile. It checks our side of the calls (what
    is asked of TensorRT, and the bookkeeping after), not TensorRT itself: the requires_cuda tests do that."""

    __version__ = "10.13.3.9"
    float32, float16, int32, int64, int8, bool, uint8 = "FLOAT", "HALF", "INT32", "INT64", "INT8", "BOOL", "UINT8"

    class BuilderFlag:
        FP16 = "FP16"

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 5

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    class _Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class _Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.outputs = flags, [], []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            import onnx

            graph = onnx.load(path).graph

            def dims(v):
                return [d.dim_value if d.dim_value else -1 for d in v.type.tensor_type.shape.dim]

            self.network.inputs = [FakeTensorRT._Tensor(v.name, dims(v)) for v in graph.input]
            self.network.outputs = [FakeTensorRT._Tensor(v.name, dims(v)) for v in graph.output]
            return True

    class _Config:
        def __init__(self):
            self.flags, self.profiles, self.pools, self.builder_optimization_level = set(), [], {}, 3

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def create_timing_cache(self, data):
            return object()

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

    class _Profile(dict):
        def set_shape(self, name, lo, opt, hi):
            self[name] = [list(lo), list(opt), list(hi)]

    class Builder:
        fail = False  # set to make the build fail as TensorRT does: an error logged, None returned

        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            return FakeTensorRT._Network(flags)

        def create_builder_config(self):
            return FakeTensorRT._Config()

        def create_optimization_profile(self):
            return FakeTensorRT._Profile()

        def build_serialized_network(self, network, config):
            if self.fail:
                self.logger.log(FakeTensorRT.ILogger.Severity.ERROR, "no implementation found for node X")
                return None
            self.logger.log(FakeTensorRT.ILogger.Severity.WARNING, "weak typing is deprecated")
            record = {"fp16": "FP16" in config.flags, "workspace": config.pools["WORKSPACE"],
                      "level": config.builder_optimization_level, "profile": config.profiles[0],
                      "inputs": [[t.name, t.shape] for t in network.inputs],
                      "outputs": [[t.name, t.shape] for t in network.outputs]}
            return json.dumps(record).encode()

    class _Engine:
        def __init__(self, record):
            self.record = record
            self.io = [(n, s, "INPUT") for n, s in record["inputs"]] + [(n, s, "OUTPUT") for n, s in record["outputs"]]
            self.num_io_tensors = len(self.io)

        def _find(self, name):
            return next(t for t in self.io if t[0] == name)

        def get_tensor_name(self, i):
            return self.io[i][0]

        def get_tensor_mode(self, name):
            return self._find(name)[2]

        def get_tensor_dtype(self, name):
            return "FLOAT"

        def get_tensor_shape(self, name):
            return self._find(name)[1]

        def get_tensor_profile_shape(self, name, index):
            return self.record["profile"][name]

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return FakeTensorRT._Engine(json.loads(bytes(data)))


def test_build_engines_flow_with_a_stand_in_tensorrt(fake_bundle, monkeypatch):
    import onnx
    import torch
    from onnx import TensorProto, helper

    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 32, 256, 256])
    tokens = helper.make_tensor_value_info("image_tokens", TensorProto.FLOAT, ["batch", 256, 64])
    onnx.save(helper.make_model(helper.make_graph([], "vision", [images], [tokens])), fake_bundle / "vision.onnx")
    manifest = json.loads((fake_bundle / "manifest.json").read_text())
    manifest["files"]["vision.onnx"]["sha256"] = bundle_reader.sha256_file(fake_bundle / "vision.onnx")
    (fake_bundle / "manifest.json").write_text(json.dumps(manifest))

    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT)
    monkeypatch.setattr(trt_runtime, "_TRT_LOGGER", None)  # the real one must not be shared with the stand-in
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))

    folder = trt_export.build_engines(fake_bundle, max_batch=4, workspace_gb=2, optimization_level=2,
                                      progress=False)
    assert folder == fake_bundle / "engines" / H200
    record = json.loads((folder / "vision.engine").read_bytes())
    assert record["fp16"] and record["workspace"] == 2 << 30 and record["level"] == 2
    assert record["profile"] == {"images": [[1, 1, 32, 256, 256], [1, 1, 32, 256, 256], [4, 1, 32, 256, 256]]}
    info = trt_runtime.read_engines_json(folder)
    assert info["typing"] == "weak" and info["precision"] == "fp16" and info["profile"]["max_batch"] == 4
    vision = info["engines"]["vision"]
    assert vision["source"] == {"file": "vision.onnx", "sha256": manifest["files"]["vision.onnx"]["sha256"]}
    assert vision["inputs"][0]["profile"][2] == [4, 1, 32, 256, 256]
    assert [o["name"] for o in vision["outputs"]] == ["image_tokens"]
    bundle_reader.load(fake_bundle, verify=True)
    assert trt_runtime.engines_for_this_gpu(fake_bundle) == folder  # the tag comes from the (stand-in) GPU
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trt_export.build_engines(fake_bundle, progress=False)
    assert not list((fake_bundle / "engines").glob(".*partial*")), "a refused build leaves no temp folder"

    # a failed build quotes TensorRT's error and leaves the published folder and the manifest as they were
    manifest_before = (fake_bundle / "manifest.json").read_text()
    monkeypatch.setattr(FakeTensorRT.Builder, "fail", True)
    with pytest.raises(trt_export.EngineBuildError, match="no implementation found for node X"):
        trt_export.build_engines(fake_bundle, overwrite=True, progress=False)
    monkeypatch.setattr(FakeTensorRT.Builder, "fail", False)
    assert (fake_bundle / "manifest.json").read_text() == manifest_before
    assert trt_runtime.engines_for_this_gpu(fake_bundle) == folder
    assert not list((fake_bundle / "engines").glob(".*partial*"))

    # TensorRT 11 has no FP16 flag: the graph is converted to fp16 first and built strongly typed
    monkeypatch.delattr(FakeTensorRT.BuilderFlag, "FP16")
    converted = []
    monkeypatch.setattr(trt_export, "_fp16_copy", lambda path, work: converted.append(path) or path)
    folder = trt_export.build_engines(fake_bundle, overwrite=True, progress=False)
    assert converted == [fake_bundle / "vision.onnx"]
    assert trt_runtime.read_engines_json(folder)["typing"] == "strong"


# -- with CUDA and TensorRT --------------------------------------------------------------------------------------

def _gpu_and_tensorrt():
    try:
        trt_runtime.gpu_tag()
    except TensorRTUnavailable as e:
        return str(e)
    return None


requires_cuda = pytest.mark.requires_cuda
_MISSING = _gpu_and_tensorrt()
skip_no_trt = pytest.mark.skipif(_MISSING is not None, reason=f"needs a CUDA GPU and TensorRT: {_MISSING}")


@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory):
    from m3d_edge.export import bundle as bundle_export

    root = bundle_export.build("preset:tiny", tmp_path_factory.mktemp("trt") / "bundle", llm="fp32",
                               progress=False)
    # level 1: a quick build; these tests check numbers and bookkeeping, not speed
    folder = trt_export.build_engines(root, max_batch=2, workspace_gb=2, optimization_level=1, progress=False)
    return root, folder


@requires_cuda
@skip_no_trt
@pytest.mark.parametrize("batch", [1, 2])
def test_tiny_fp16_engines_match_onnx_runtime(tiny_engines, batch):
    import onnxruntime as ort
    import torch

    root, folder = tiny_engines
    bundle = bundle_reader.load(root)
    engines = trt_runtime.load_engines(folder)
    assert set(engines) == {"vision", "seg_encoder", "seg_decoder"} & set(bundle.manifest["components"])
    g = torch.Generator().manual_seed(batch)
    for name, engine in engines.items():
        session = ort.InferenceSession(str(bundle.path(name)), providers=["CPUExecutionProvider"])
        feeds = {}
        for inp in session.get_inputs():
            shape = (batch, *inp.shape[1:])
            x = torch.rand(shape, generator=g) if inp.name == "images" else torch.randn(shape, generator=g)
            feeds[inp.name] = x
        ref = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {k: v.numpy() for k, v in feeds.items()})))
        got = engine(**{k: v.cuda() for k, v in feeds.items()})
        torch.cuda.synchronize()
        for out, value in got.items():
            err = rel_err(value.cpu().numpy(), ref[out])
            assert err <= 1e-2, f"{name}.{out} batch {batch}: relative error {err:.2e} against ONNX Runtime"


@requires_cuda
@skip_no_trt
def test_tiny_engines_are_chosen_and_refuse_bad_inputs(tiny_engines):
    import torch

    root, folder = tiny_engines
    assert folder.name == trt_runtime.gpu_tag()
    assert trt_runtime.engines_for_this_gpu(root) == folder
    bundle_reader.load(root, verify=True)
    vision = trt_runtime.TRTEngine(folder / "vision.engine")
    x = torch.rand(3, 1, 32, 256, 256, device="cuda")
    with pytest.raises(ValueError, match="optimization profile"):
        vision(images=x)  # max_batch is 2
    with pytest.raises(ValueError, match="move it"):
        vision(images=x[:1].cpu())
    with pytest.raises(TypeError, match="float32"):
        vision(images=x[:1].half())
    with pytest.raises(FileExistsError, match="overwrite"):
        trt_export.build_engines(root, max_batch=2, progress=False)
