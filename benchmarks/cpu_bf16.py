"""Does bf16 pay on this CPU? PyTorch bf16 against fp32 for the heavy stages, and its error.

Time: the full SD 2.1-shaped UNet (one 64x64 latent, the empty-prompt shape) and VAE decoder
(64x64 latent -> 512x512), random weights, fp32 and bf16 copies timed side by side in one run,
alternated (medians). Error: the trained demo's PiSA-SR reference run in bf16 end to end against
its fp32 run, on the built-in sample photo (PSNR, output in [0,1]).

    python benchmarks/cpu_bf16.py [--iters 3]

Writes benchmarks/results/cpu_bf16_cpu<N>.json. Needs ~12 GB RAM. Measures what PyTorch eager does
with bf16 weights and activations; it is issue 16's evidence, not a shipped precision.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent))
from s3diff_lora_cost import interleaved_seconds  # noqa: E402  (the same alternation)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    from srexport.cpu_rates import measure_cpu_rates, native_bf16
    from srexport.models.base import build_base
    from srexport.parity import compare

    rates = measure_cpu_rates()
    base = build_base("sd21", seed=0)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 64, 64, generator=g)
    prompt = torch.randn(1, 77, 1024, generator=g)
    t = torch.tensor(1.0)
    unets = {"fp32": base.unet, "bf16": copy.deepcopy(base.unet).to(torch.bfloat16)}
    decoders = {"fp32": base.vae.decoder, "bf16": copy.deepcopy(base.vae.decoder).to(torch.bfloat16)}
    del base
    scaled = latent / 0.18215  # what the decoder module sees

    def unet(p):
        dtype = torch.float32 if p == "fp32" else torch.bfloat16
        return lambda: unets[p](latent.to(dtype), t, prompt.to(dtype)).sample

    def decode(p):
        dtype = torch.float32 if p == "fp32" else torch.bfloat16
        return lambda: decoders[p](scaled.to(dtype))

    with torch.no_grad():
        print("timing the UNet", file=sys.stderr, flush=True)
        unet_times = interleaved_seconds({p: unet(p) for p in unets}, args.iters)
        unet_err = compare(unet("bf16")().float(), unet("fp32")()).describe()
        print("timing the VAE decoder", file=sys.stderr, flush=True)
        decode_times = interleaved_seconds({p: decode(p) for p in decoders}, args.iters)
        decode_err = compare(decode("bf16")().float(), decode("fp32")(), peak_to_peak=2.0).describe()
    unets.clear()  # free the full-size copies before the demo runs
    decoders.clear()

    from srexport.models.pisa_reference import PisaReference, PisaSettings
    from srexport.models.sources import demo_pisa_source
    from srexport.processing import postprocess
    from srexport.samples import sample_image

    lr = sample_image()
    source = demo_pisa_source()
    with torch.no_grad():
        fp32 = PisaReference(*source.load(), PisaSettings())(lr)
        ref = PisaReference(*source.load(), PisaSettings()).to(torch.bfloat16)
        prepared = ref.preprocess(lr)  # pre- and post-processing stay fp32: the networks run in bf16
        decoded = ref.decode(ref.denoise(ref.encode(prepared.model_input.to(torch.bfloat16))))
        bf16 = postprocess(decoded.float(), prepared, ref.processing)
    demo = compare(bf16, fp32, peak_to_peak=1.0)
    med = {stage: {p: statistics.median(v) for p, v in times.items()}
           for stage, times in (("unet", unet_times), ("vae_decoder", decode_times))}
    out = {
        "benchmark": "PyTorch eager bf16 vs fp32 on CPU: full SD 2.1-shaped UNet and VAE decoder (random weights, "
                     "64x64 latent), and the trained demo's end-to-end error in bf16",
        "iters": args.iters, "bf16_native": native_bf16(), "cpu_rates": rates,
        "machine": {"host": platform.node(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "seconds": {"unet": unet_times, "vae_decoder": decode_times}, "median_s": med,
        "bf16_speedup": {s: m["fp32"] / m["bf16"] for s, m in med.items()},
        "full_size_error": {"unet": unet_err, "vae_decoder": decode_err},
        "demo_end_to_end": demo.to_dict(),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"cpu_bf16_cpu{os.cpu_count()}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"median_s": med, "bf16_speedup": out["bf16_speedup"], "demo_end_to_end": demo.describe()},
                     indent=2))
    print(path)


if __name__ == "__main__":
    main()
