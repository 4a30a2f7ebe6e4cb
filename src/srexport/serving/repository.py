"""``srexport triton``: an artifact as a Triton Inference Server model repository.

Layout (one model per component, plus the orchestrator)::

    REPO/README.md                 how to start it
    REPO/srexport/config.pbtxt     image in, upscaled image out (Python backend, BLS)
    REPO/srexport/1/model.py
    REPO/<component>/config.pbtxt  from the component's spec: names, dtypes, dims, dynamic batching
    REPO/<component>/1/model.py    --components python: the graph on an srexport backend
    REPO/<component>/1/model.onnx  --components native, --backend ort/ort-cuda: Triton's onnxruntime backend
    REPO/<component>/1/model.plan  --components native, --backend trt: Triton's TensorRT backend

The Python-backend models refer to the artifact folder by its absolute path
(nothing copied; every file's sha256 is verified when a model loads); native
models get copies of the graph or engine files (Triton reads them from the
repository).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import __version__
from ..artifact.manifest import atomic_folder, load_artifact
from ..errors import UserError
from ..runtime.runners import ort_graph
from .triton_config import PLATFORMS, component_config, orchestrator_config

BACKENDS = ("ort", "ort-cuda", "trt")
COMPONENT_KINDS = ("python", "native")
ORCHESTRATOR = "srexport"
_MODEL_PY = '''"""Triton model {name}, written by srexport {version} (srexport/serving/triton_models.py)."""
from srexport.serving.triton_models import {cls} as TritonPythonModel  # noqa: F401
'''


def call_batches(manifest: dict, specs: dict) -> dict[str, int]:
    """The largest batch the pipeline calls each component with: the tile batch of its stage
    (twice that for an adjustable UNet's exact guidance), 1 for whole-image components."""
    from ..export.engines import engine_geometries

    geometries, _ = engine_geometries(manifest, specs)
    out = {}
    for name, spec in specs.items():
        out[name] = 1 if spec.whole_image else geometries[name][2].batch
    return out


def _check_target(artifact: Path, out: Path) -> None:
    a, o = artifact.resolve(), out.absolute().resolve()
    if o == a or a.is_relative_to(o) or o.is_relative_to(a):
        raise UserError(f"--out {out} overlaps the artifact folder {artifact}; write the repository elsewhere")


def write_repository(artifact_folder, out, backend: str = "ort", components: str = "python", instances: int = 1,
                     component_instances: int = 1, max_batch_size: int | None = None, threads: int | None = None,
                     max_output_megapixels: float = 64.0, force: bool = False, fail_on_width: dict | None = None
                     ) -> Path:
    """Write the repository (atomically: all of it or nothing) and return its folder."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if components not in COMPONENT_KINDS:
        raise UserError(f"--components {components!r} is not one of {', '.join(COMPONENT_KINDS)}")
    for flag, value in (("--instances", instances), ("--component-instances", component_instances)):
        if not 1 <= value <= 64:
            raise UserError(f"{flag} {value} is out of range; use 1 to 64")
    if not max_output_megapixels > 0:
        raise UserError(f"--max-output-mp {max_output_megapixels} must be a positive number of megapixels")
    artifact_folder, out = Path(artifact_folder), Path(out)
    _check_target(artifact_folder, out)
    artifact = load_artifact(artifact_folder)
    specs = artifact.components
    calls = call_batches(artifact.manifest, specs)
    batches = {}
    for name, spec in specs.items():
        wanted = calls[name] * instances  # every orchestrator instance's calls can share a batch
        if max_batch_size is not None and not spec.whole_image:
            if max_batch_size < calls[name]:
                raise UserError(f"--max-batch-size {max_batch_size} is below the {calls[name]} tiles the pipeline "
                                f"sends {name} at once; use at least {calls[name]}")
            wanted = max_batch_size
        batches[name] = wanted
    if components == "native" and backend == "trt":
        missing = [n for n, c in artifact.manifest["components"].items() if "engine" not in c["files"]]
        if missing:
            raise UserError(f"the artifact has no TensorRT engines for {', '.join(missing)}; build them with "
                            "'srexport engines' on the GPU machine, or use --backend ort")
    kind = "KIND_GPU" if backend != "ort" else "KIND_CPU"
    with atomic_folder(out, force) as tmp:
        for name, spec in specs.items():
            folder = tmp / name / "1"
            folder.mkdir(parents=True)
            if components == "python":
                params = {"artifact": str(artifact_folder.absolute()), "component": name, "backend": backend}
                if threads is not None:
                    params["threads"] = str(threads)
                if fail_on_width and name in fail_on_width:  # tests: a component that raises
                    params["fail_on_width"] = str(fail_on_width[name])
                text = component_config(spec, batches[name], component_instances, "python", kind="KIND_CPU",
                                        parameters=params)
                (folder / "model.py").write_text(_MODEL_PY.format(name=name, version=__version__,
                                                                  cls="ComponentModel"))
            else:
                platform = PLATFORMS["trt" if backend == "trt" else "onnx"]
                text = component_config(spec, batches[name], component_instances, None, platform=platform, kind=kind)
                _copy_graph(artifact, name, folder, backend)
            (tmp / name / "config.pbtxt").write_text(text)
        folder = tmp / ORCHESTRATOR / "1"
        folder.mkdir(parents=True)
        (folder / "model.py").write_text(_MODEL_PY.format(name=ORCHESTRATOR, version=__version__,
                                                          cls="OrchestratorModel"))
        (tmp / ORCHESTRATOR / "config.pbtxt").write_text(orchestrator_config(
            instances, {"artifact": str(artifact_folder.absolute()), "max_output_megapixels": f"{max_output_megapixels:g}"}))
        (tmp / "README.md").write_text(_readme(artifact, backend, components, instances, batches))
    return out


def _copy_graph(artifact, name: str, folder: Path, backend: str) -> None:
    if backend == "trt":
        shutil.copy2(artifact.component_file(name, "engine"), folder / "model.plan")
        return
    shutil.copy2(ort_graph(artifact, name), folder / "model.onnx")  # Triton's onnxruntime backend: fused attention
    if "onnx_data" in artifact.manifest["components"][name]["files"]:
        data = artifact.component_file(name, "onnx_data")  # external weights keep the name the graph refers to
        shutil.copy2(data, folder / data.name)


def _readme(artifact, backend: str, components: str, instances: int, batches: dict) -> str:
    names = ", ".join(f"`{n}` (max batch {b})" for n, b in batches.items())
    where = (f"The Python-backend models read the artifact at `{artifact.folder.absolute()}` (not copied; every "
             "file's sha256 is verified when a model loads): keep it there, or rewrite the repository."
             if components == "python" else
             "The component models hold copies of the artifact's graphs (or engines); the orchestrator reads the "
             f"manifest at `{artifact.folder.absolute()}`.")
    return f"""# srexport Triton model repository

Written by srexport {__version__} from `{artifact.folder.absolute()}` ({artifact.model}, {artifact.manifest['export']['precision']} graphs).

- `{ORCHESTRATOR}`: the model to call. Inputs: `IMAGE` (UINT8 HxWx3) or `IMAGE_BYTES` (one encoded PNG/JPEG);
  optional `LAMBDA_PIX`, `LAMBDA_SEM`, `GUIDANCE` (PiSA-SR artifacts that take them), `CFG_SCALE`,
  `DEGRADATION` (S3Diff), `COLOR_FIX`. Output: `IMAGE` (UINT8). {instances} instance(s); it runs srexport's
  pipeline (tiling, blending, processing) and calls the component models through BLS.
- Components ({components}, backend {backend}): {names}, each with dynamic batching.

{where}

Start it (CPU, the tritonserver of `pip install 'srexport[serve]'`):

    srexport serve REPO --http-port 8000 --grpc-port 8001 --metrics-port 8002

or with NGC's Triton container (native components on GPU nodes):

    tritonserver --model-repository REPO

(the Python-backend models need srexport and its dependencies importable by Triton's Python stub).
Client: `examples/triton_client.py` in srexport's repository.
"""
