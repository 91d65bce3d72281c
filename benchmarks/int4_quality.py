"""Size and perplexity of the int4 decoder variants (method x LM-head policy x accuracy level), no timing.

    python benchmarks/int4_quality.py [--workdir build/bench-export] [--reports 30] [--threads 1] [--out FILE.json]

The quality procedure, reports, request context and fp32 reference are export_llm.py's (`quality` part, teacher
forced through decoder.onnx with its KV cache, right-padded batch): this script only loops over more variants.
It reuses (or builds) --workdir/bundle-fp32 as export_llm.py does, and writes each variant to
--workdir/int4/<name>/. Prints a markdown table; --out also writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from m3d_edge import offline_by_default

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_llm as bench  # noqa: E402  (the benchmark's quality functions)

# name: quantize_decoder keyword arguments
VARIANTS = {
    "q41 (default; int8 head)": {"method": "q41"},
    "q41, int8 head, accuracy_level 0": {"method": "q41", "accuracy_level": 0},
    "q41, int4 head": {"method": "q41", "lm_head": "int4"},
    "q41, fp32 head": {"method": "q41", "lm_head": "fp32"},
    "rtn symmetric, int4 head (old default)": {"method": "rtn"},
    "rtn symmetric, int8 head": {"method": "rtn", "lm_head": "int8"},
    "rtn symmetric, fp32 head": {"method": "rtn", "lm_head": "fp32"},
    "rtn asymmetric (ORT uint4 zero points), int4 head": {"method": "rtn", "symmetric": False},
    "rtn asymmetric (ORT uint4 zero points), int8 head": {"method": "rtn", "symmetric": False, "lm_head": "int8"},
}


def main(argv=None) -> int:
    offline_by_default()  # before anything loads transformers: no Hub, no kernel-trust warnings
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("build/bench-export"))
    p.add_argument("--reports", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from tokenizers import Tokenizer

    from m3d_edge.export import bundle as bundle_export
    from m3d_edge.export import quantize
    from m3d_edge.runtime.decoder import DecoderSpec
    from m3d_edge.runtime.engines import create_session

    fp32_dir = args.workdir / "bundle-fp32"
    if not (fp32_dir / "manifest.json").is_file():
        bench.say("building the fp32 bundle")
        source = bench.load_source(None)
        bundle_export.build(source.model, fp32_dir, llm="fp32", vision="fp32", progress=False,
                            tokenizer=source.tokenizer)
    spec = DecoderSpec.from_manifest(json.loads((fp32_dir / "manifest.json").read_text())["decoder"])
    tokenizer = Tokenizer.from_file(str(fp32_dir / "tokenizer.json"))
    context = tokenizer.encode(bench.REPORT_REQUEST, add_special_tokens=False).ids
    targets = [tokenizer.encode(r + bench.REPORT_END, add_special_tokens=False).ids
               for r in bench.held_out_reports(args.reports)]
    max_length = len(context) + max(len(t) for t in targets)
    embeddings = np.load(fp32_dir / "embeddings.npy")

    def decoder_bytes(path: Path) -> int:
        return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))

    def score(path: Path) -> bench.Scored:
        dec = bench.BatchedDecoder(create_session(path, threads=args.threads), spec, embeddings, len(targets),
                                   max_length)
        return bench.score_onnx(dec, context, targets)

    fp32_path = fp32_dir / "decoder.onnx"
    ref, fp32_bytes = score(fp32_path), decoder_bytes(fp32_path)
    ppl32 = bench.perplexity(ref)
    rows = [{"variant": "fp32", "perplexity": ppl32, "ppl_vs_fp32": 0.0, "top1_agreement": 1.0,
             "decoder_mb": fp32_bytes / bench.MB, "decoder_vs_fp32": 1.0, "quantization": None}]
    for i, (name, kwargs) in enumerate(VARIANTS.items()):
        bench.say(f"{name}")
        path = args.workdir / "int4" / f"v{i}" / "decoder.onnx"
        t = time.perf_counter()
        info = quantize.quantize_decoder(fp32_path, path, **kwargs)
        seconds = time.perf_counter() - t
        s = score(path)
        ppl = bench.perplexity(s)
        rows.append({"variant": name, "perplexity": ppl, "ppl_vs_fp32": ppl / ppl32 - 1,
                     "top1_agreement": bench.top1_agreement(s, ref), "decoder_mb": decoder_bytes(path) / bench.MB,
                     "decoder_vs_fp32": decoder_bytes(path) / fp32_bytes, "quantize_seconds": round(seconds, 1),
                     "quantization": info})
    tokens = int(np.isfinite(ref.nll).sum())
    print(f"\n{args.reports} held-out phantom reports (seed {bench.HELD_OUT_SEED}), {tokens} scored tokens\n")
    print("| variant | perplexity | vs fp32 | top-1 agreement | decoder MB | vs fp32 |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['perplexity']:.3f} | {100 * r['ppl_vs_fp32']:+.2f}% "
              f"| {100 * r['top1_agreement']:.1f}% | {r['decoder_mb']:.1f} | {100 * r['decoder_vs_fp32']:.1f}% |")
    if args.out:
        args.out.write_text(json.dumps({"reports": args.reports, "scored_tokens": tokens, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
