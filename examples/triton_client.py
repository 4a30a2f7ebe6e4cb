"""Upscale an image through a Triton server running an srexport repository, over HTTP or gRPC.

    srexport triton ./pisa-x4 --out ./repo && srexport serve ./repo &
    python examples/triton_client.py photo.png -o photo_x4.png                    # HTTP, port 8000
    python examples/triton_client.py photo.png -o x.png --grpc --url 127.0.0.1:8001
    python examples/triton_client.py photo.png -o x.png --lambda-pix 0.8 --lambda-sem 0.5 --guidance exact

Sends the file's bytes as IMAGE_BYTES (the server decodes it and applies its EXIF orientation), or
with --pixels the decoded HxWx3 UINT8 array as IMAGE. Needs tritonclient (the serve extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--url", default=None, help="host:port (default: 127.0.0.1:8000, or :8001 with --grpc)")
    ap.add_argument("--grpc", action="store_true", help="use gRPC instead of HTTP")
    ap.add_argument("--pixels", action="store_true", help="send decoded pixels (IMAGE) instead of the file (IMAGE_BYTES)")
    ap.add_argument("--lambda-pix", type=float)
    ap.add_argument("--lambda-sem", type=float)
    ap.add_argument("--guidance", choices=["merged", "exact"])
    ap.add_argument("--cfg-scale", type=float)
    ap.add_argument("--degradation", help="BLUR,NOISE")
    args = ap.parse_args()

    if args.grpc:
        import tritonclient.grpc as client
    else:
        import tritonclient.http as client
    from PIL import Image
    from tritonclient.utils import InferenceServerException

    url = args.url or ("127.0.0.1:8001" if args.grpc else "127.0.0.1:8000")
    inputs = []

    def add(name: str, array: np.ndarray, dtype: str) -> None:
        tensor = client.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)

    if args.pixels:
        with Image.open(args.image) as image:
            add("IMAGE", np.asarray(image.convert("RGB")), "UINT8")
    else:
        add("IMAGE_BYTES", np.array([args.image.read_bytes()], dtype=np.object_), "BYTES")
    for name, value in (("LAMBDA_PIX", args.lambda_pix), ("LAMBDA_SEM", args.lambda_sem),
                        ("CFG_SCALE", args.cfg_scale)):
        if value is not None:
            add(name, np.array([value], dtype=np.float32), "FP32")
    if args.guidance:
        add("GUIDANCE", np.array([args.guidance.encode()], dtype=np.object_), "BYTES")
    if args.degradation:
        add("DEGRADATION", np.array([float(v) for v in args.degradation.split(",")], dtype=np.float32), "FP32")
    try:
        with client.InferenceServerClient(url) as connection:
            result = connection.infer("srexport", inputs).as_numpy("IMAGE")
    except InferenceServerException as e:
        print(f"triton_client: error: {e.message()}", file=sys.stderr)
        return 2
    Image.fromarray(result).save(args.output)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
