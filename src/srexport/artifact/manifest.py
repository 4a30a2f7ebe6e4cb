"""The artifact folder: graphs (and later engines) plus a self-describing manifest.

Writes are atomic: a build fills a hidden temporary sibling of the target and
renames it into place only when everything (export, checks, manifest) has
succeeded, so an interrupted or failed build leaves nothing behind; a build
killed outright (SIGKILL, power loss) leaves its sibling, and the next build of
the same folder removes it. Loading validates the manifest against
``manifest.schema.json`` and its cross-references, refuses any file path that
leaves the artifact folder (symlinks resolved; ONNX external data included),
and verifies every file's sha256.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .specs import ComponentSpec

MANIFEST = "manifest.json"
# 2: the prose of v1's machine fields (tiling's unit/origins/short_sides/per_image_inputs/reasoning,
# blend formula, vae norm_method; export cleanup's explanation; S3Diff's schedule step and LoRA
# form) moved into ``description`` fields that no code reads; every component spec says its pipeline
# ``stage``. v1 folders load through ``migrate``.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")
_OWNER = ".srexport-build-pid"  # inside a build's temporary folder: the pid that fills it


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_writable_folder(path: Path, label: str) -> None:
    """One line now, before any work, if nothing can be created in the folder ``path`` (one that
    exists or would be made): its nearest existing ancestor must take a new file. ``label`` says
    what the user asked for (e.g. ``--out A``)."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{label}: {existing} is a file, not a folder; choose another location")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".srexport-write-test-")
    except OSError as e:
        raise UserError(f"{label}: cannot write in {existing} ({e.strerror or e}); choose a writable "
                        "location") from None
    os.close(fd)
    os.unlink(probe)


def check_build_target(target: Path, force: bool) -> None:
    """Refuse an --out that cannot be replaced, before anything is loaded."""
    target = Path(target).absolute()
    if target.exists() and not force:
        raise UserError(f"{target} already exists; pass --force to replace it or choose another --out")
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} exists and is not a folder; remove it or choose another --out")
    check_writable_folder(target.parent, f"--out {target}")


def remove_stale_builds(target: Path) -> list[Path]:
    """Remove temporary siblings of ``target`` left by builds that were killed outright
    (their recorded pid is no longer alive); a live build's folder is left alone."""
    target = Path(target).absolute()
    removed = []
    for tmp in target.parent.glob(f".{target.name}.building-*"):
        try:
            pid = int((tmp / _OWNER).read_text())
        except (OSError, ValueError):
            pid = None  # a folder from before the pid file, or killed before writing it
        if pid is not None and _alive(pid):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_folder(target: Path, force: bool = False, note=None):
    """Yield a temporary sibling folder; on success it replaces ``target``. ``note`` (a
    callable) hears about stale temporary folders of killed builds that were removed."""
    target = Path(target).absolute()
    check_build_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_builds(target)
    if stale and note is not None:
        note(f"removed {len(stale)} temporary folder(s) left by a killed build of {target.name}: "
             + ", ".join(p.name for p in stale))
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; an artifact is meant to be shared
    try:
        (tmp / _OWNER).write_text(str(os.getpid()))
        yield tmp
        (tmp / _OWNER).unlink()
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Hash every listed file, validate, then write manifest.json atomically: what a build
    writes is what every reader accepts."""
    folder = Path(folder)
    for entry in manifest["files"].values():
        entry["sha256"] = sha256_of(folder / entry["path"])
        entry["bytes"] = (folder / entry["path"]).stat().st_size
    validate_manifest(manifest, "the manifest being written")
    path = folder / MANIFEST
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest-")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)
    return path


def current_umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# A component's graph for onnxruntime, attention fused into com.microsoft ops (export.attention_fusion);
# absent where the graph has no attention. TensorRT and other consumers read the portable "onnx" one.
ORT_GRAPH = "onnx_ort"
# How onnxruntime runs attention: "fused" runs the ORT_GRAPH twins where the artifact has them
# (flash attention, no score matrix), "plain" the portable MatMul-Softmax-MatMul graphs.
ATTENTIONS = ("fused", "plain")


@dataclass
class Artifact:
    """A loaded artifact folder: its manifest and verified file paths."""

    folder: Path
    manifest: dict

    @property
    def model(self) -> str:
        return self.manifest["model"]["kind"]

    @property
    def components(self) -> dict[str, ComponentSpec]:
        return {name: ComponentSpec.from_dict(c["spec"]) for name, c in self.manifest["components"].items()}

    def component_file(self, name: str, kind: str = "onnx") -> Path:
        key = self.manifest["components"][name]["files"][kind]
        return self.folder / self.manifest["files"][key]["path"]


def read_manifest(folder: Path, validate: bool = True) -> dict:
    """The manifest of an artifact folder, validated (schema, cross-references, paths) unless
    ``validate`` is False (``inspect`` shows damaged artifacts). Problems are one-line UserErrors."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"artifact {folder} is not a folder; pass the --out folder of 'srexport build'")
    if not path.is_file():
        raise UserError(f"{folder} has no {MANIFEST}; it is not an srexport artifact (build one with 'srexport build')")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); rebuild the artifact") from None
    if not isinstance(manifest, dict) or not {"files", "components", "model"} <= manifest.keys():
        raise UserError(f"{path} is not an srexport manifest (missing files/components/model); rebuild the artifact")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise UserError(f"{path} has format_version {version!r}; this srexport reads "
                        f"{', '.join(map(str, READABLE_VERSIONS))}: rebuild the artifact")
    manifest = migrate(manifest)
    if validate:
        validate_manifest(manifest, path)
        for entry in manifest["files"].values():
            contained_path(folder, entry["path"])
    return manifest


def migrate(manifest: dict) -> dict:
    """A manifest of any readable format version as the current one (in memory; the folder on disk
    is not touched, and its file hashes do not cover manifest.json). The one place that knows
    what older versions looked like."""
    if manifest.get("format_version") == 1:
        manifest = _v1_to_v2(manifest)
    if isinstance(manifest.get("tiling"), dict) and "plan" not in manifest["tiling"]:
        # v2 artifacts from before --tile-plan: they were laid out by the fixed plan
        manifest = dict(manifest, tiling=dict(manifest["tiling"], plan="fixed"))
    if isinstance(manifest.get("tiling"), dict) and "unet" not in manifest["tiling"]:
        # before --unet-norm every UNet tile normalised with its own statistics
        manifest = dict(manifest, tiling=dict(manifest["tiling"], unet={"norm": "per-tile"}))
    return _add_guidance(manifest)


def _add_guidance(manifest: dict) -> dict:
    """Before per-call guidance: a PiSA-SR artifact ran the scales it was built with (an exact one
    can take others: its plan is an affine combination); S3Diff's cfg was a constant in the graph."""
    from .guidance import pisa_guidance_section

    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    settings = model.get("settings") if isinstance(model.get("settings"), dict) else {}
    guidance = manifest.get("guidance")
    if model.get("kind") == "pisa-sr" and guidance is None and isinstance(manifest.get("denoise"), dict):
        try:
            unets = [t["component"] for t in manifest["denoise"]["terms"]]
            section = pisa_guidance_section(settings.get("guidance", "merged"), settings.get("lambda_pix", 1.0),
                                            settings.get("lambda_sem", 1.0), unets)
        except (KeyError, TypeError):
            return manifest  # a broken plan: validation names it
        return dict(manifest, guidance=section)
    if model.get("kind") == "s3diff" and isinstance(guidance, dict) and "cfg_input" not in guidance:
        return dict(manifest, guidance=dict(guidance, cfg_input=None))
    return manifest


def _v1_to_v2(v1: dict) -> dict:
    import copy

    m = copy.deepcopy(v1)
    m["format_version"] = 2

    def into_description(section: dict, keys: list[str], extra: list[str] = ()) -> None:
        prose = [*extra, *(f"{k}: {section.pop(k)}" for k in keys if k in section)]
        if prose:
            section["description"] = "; ".join(filter(None, [section.get("description"), *prose]))

    tiling = m.get("tiling")
    if isinstance(tiling, dict):
        _add_tiling_defaults(tiling)
        blend, vae = tiling.get("blend", {}), tiling.get("vae", {})
        extra = [f"blend {k}: {blend.pop(k)}" for k in ("formula", "denoise_blends") if k in blend]
        if isinstance(vae.get("norm"), str) and vae["norm"].startswith("per tile ("):
            extra.append(f"vae norm: {vae['norm']}")  # before --vae-norm, a sentence meant per-tile
            vae["norm"] = "per-tile"
        if "norm_method" in vae:
            extra.append(f"vae norm_method: {vae.pop('norm_method')}")
        into_description(tiling, ["unit", "origins", "short_sides", "per_image_inputs", "reasoning"], extra)
    export = m.get("export")
    if isinstance(export, dict):  # the first artifacts, before --precision, were all fp32
        export.setdefault("precision", "fp32")
        export.setdefault("io_dtype", "float32")
    if isinstance(export, dict) and isinstance(export.get("cleanup"), str) and ";" in export["cleanup"]:
        name, _, why = export["cleanup"].partition(";")
        export["cleanup"] = name.strip()
        into_description(export, [], [why.strip()])
    schedule = m.get("schedule")
    if isinstance(schedule, dict):
        into_description(schedule, ["step"])
    for name, component in (m.get("components") or {}).items():
        spec = component.get("spec") if isinstance(component, dict) else None
        if isinstance(spec, dict) and "stage" not in spec:  # v1 told stages apart by component name
            spec["stage"] = ("degradation" if name == "degradation" else "encode" if name.startswith("vae_encoder")
                             else "decode" if name.startswith("vae_decoder") else "denoise")
    lora = m.get("model", {}).get("lora") if isinstance(m.get("model"), dict) else None
    if isinstance(lora, dict):
        into_description(lora, [k for k in ("scaling", "form") if isinstance(lora.get(k), str)])
    checks = m.setdefault("checks", {})
    if isinstance(checks, dict) and "bounds" not in checks:  # built before bounds were recorded
        _add_default_bounds(m)
    return m


def _add_tiling_defaults(tiling: dict) -> None:
    """Fields the first tiling sections left out, at the values srexport then ran them with."""
    tiling.setdefault("pad", False)
    tiling.setdefault("plan", "fixed")  # the only layout before --tile-plan
    tiling.setdefault("untiled_max_megapixels", 2.1)
    vae = tiling.setdefault("vae", {})
    if isinstance(vae, dict) and {"tile", "overlap"} <= tiling.keys():
        for part in ("encoder", "decoder"):
            vae.setdefault(part, {"tile": tiling["tile"], "overlap": tiling["overlap"], "batch": 1})
        vae.setdefault("norm", "per-tile")


def _add_default_bounds(m: dict) -> None:
    from .precisions import PRECISIONS, bounds_for

    precision = (m.get("export") or {}).get("precision")
    try:
        specs = {n: ComponentSpec.from_dict(c["spec"]) for n, c in m["components"].items()}
    except (KeyError, TypeError, ValueError):
        return  # a broken spec: validation names it
    if precision in PRECISIONS:
        m["checks"]["bounds"] = bounds_for(precision, specs)


@functools.lru_cache(maxsize=1)
def manifest_schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def validate_manifest(manifest: dict, where: str | Path = MANIFEST) -> None:
    """The schema, then what a schema cannot say: every name the manifest refers to exists."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(manifest_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if error is not None:
        path = [str(p) for p in error.absolute_path]
        if error.validator == "required":  # name the missing field itself
            missing = next(k for k in error.validator_value if k not in error.instance)
            raise UserError(f"{where}: field {'.'.join([*path, missing])} is missing; rebuild the artifact or "
                            f"restore its {MANIFEST}")
        raise UserError(f"{where}: field {'.'.join(path) or '(top level)'}: {_short(error.message)}; rebuild the "
                        f"artifact or restore its {MANIFEST}")
    components, files = manifest["components"], manifest["files"]
    for i, term in enumerate(manifest["denoise"]["terms"]):
        if term["component"] not in components:
            raise UserError(f"{where}: field components.{term['component']} is missing (denoise.terms.{i} runs it); "
                            f"rebuild the artifact or restore its {MANIFEST}")
    for name in manifest["guidance"].get("unets", []):
        if name not in components:
            raise UserError(f"{where}: field components.{name} is missing (guidance.unets names it); rebuild the "
                            f"artifact or restore its {MANIFEST}")
    for name in ("vae_encoder", "vae_decoder"):
        if name not in components:
            raise UserError(f"{where}: field components.{name} is missing; rebuild the artifact or restore its "
                            f"{MANIFEST}")
    for name, component in components.items():
        for kind, key in component["files"].items():
            if key not in files:
                raise UserError(f"{where}: field files.{key} is missing (components.{name}.files.{kind} names it); "
                                f"rebuild the artifact or restore its {MANIFEST}")


def _short(message: str, limit: int = 120) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


def contained_path(folder: Path, relative: str) -> Path:
    """``folder / relative``, refused in one line if it is absolute or leaves the folder once
    symlinks are resolved: artifacts travel between machines and teams."""
    folder = Path(folder)
    if os.path.isabs(relative) or Path(relative).drive:
        raise UserError(f"{folder / MANIFEST} names the absolute path {relative!r}, outside the artifact folder; an "
                        "artifact may only refer to files inside its folder: rebuild it")
    path = folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise UserError(f"{folder / MANIFEST} names {relative!r}, which leaves the artifact folder; an artifact may "
                        "only refer to files inside it: rebuild it")
    return path


def check_external_data(folder: Path, graph: Path) -> None:
    """Every external-data location of an ONNX graph stays inside the artifact folder."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            try:
                contained_path(folder, os.path.relpath(graph.parent / location, folder))
            except UserError:
                raise UserError(f"{graph} keeps tensor {tensor.name!r} in {location!r}, outside the artifact folder; "
                                "an artifact may only refer to files inside it: rebuild it") from None


def _tensors(graph):
    """Every tensor of a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for sub in attribute.graphs:
                yield from _tensors(sub)


def file_problems(folder: Path, manifest: dict) -> list[str]:
    """What is wrong with the listed files on disk (missing, size or sha256 mismatch)."""
    problems = []
    for entry in manifest["files"].values():
        path = folder / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']} is missing")
        elif path.stat().st_size != entry.get("bytes") or sha256_of(path) != entry.get("sha256"):
            problems.append(f"{entry['path']} does not match its sha256 in the manifest (modified or truncated)")
    return problems


def load_artifact(folder: str | Path, verify: bool = True) -> Artifact:
    """A validated artifact; ``verify`` also checks every file's size and sha256 and keeps ONNX
    external data inside the folder."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if verify:
        for entry in manifest["files"].values():
            path = folder / entry["path"]
            if not path.is_file():
                raise UserError(f"artifact {folder} is missing {entry['path']}; rebuild it or restore the file")
            if path.stat().st_size != entry["bytes"] or sha256_of(path) != entry["sha256"]:
                raise UserError(f"{path} does not match its sha256 in the manifest (modified or truncated); rebuild the artifact")
            if path.suffix == ".onnx":
                check_external_data(folder, path)
    return Artifact(folder, manifest)
