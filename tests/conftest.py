"""Shared fixtures: one demo source and one small demo artifact per test session.

The demo model has SD 2.1's block structure with shrunk widths; artifacts are
built with --process-size 128 so test images stay small on a 2-core CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

# pytest-xdist runs the suite in one process per core (pyproject's addopts): each gets its share
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """The demo's base folder and checkpoint are written once, into a session tmp dir."""
    old = os.environ.get("SREXPORT_CACHE")
    os.environ["SREXPORT_CACHE"] = str(tmp_path_factory.mktemp("srexport-cache"))
    yield
    if old is None:
        os.environ.pop("SREXPORT_CACHE", None)
    else:
        os.environ["SREXPORT_CACHE"] = old


@pytest.fixture(scope="session")
def demo_source():
    from srexport.models.sources import demo_pisa_source

    return demo_pisa_source()


@pytest.fixture(scope="session")
def demo_artifact(tmp_path_factory, demo_source):
    """A merged-guidance fp32 demo artifact, built through the CLI as a user would
    (fp32: the parity tests hold it to fp32 bounds; tests/test_precision.py converts it), with
    per-tile VAE statistics, so it holds the plain graphs only. The default build (coarse
    statistics, with the two-pass graphs) is tests/test_two_pass_vae.py's ``two_pass_artifact``."""
    from srexport.cli import main

    out = tmp_path_factory.mktemp("artifacts") / "pisa-demo"
    assert main(["build", "--scale", "4", "--process-size", "128", "--precision", "fp32", "--vae-norm", "per-tile", "--unet-norm", "per-tile",
                 "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def adjustable_artifact(tmp_path_factory):
    """An fp32 demo artifact built with --guidance adjustable (plain graphs only, to stay cheap)."""
    from srexport.cli import main

    out = tmp_path_factory.mktemp("artifacts") / "pisa-adjustable"
    assert main(["build", "--guidance", "adjustable", "--process-size", "128", "--precision", "fp32",
                 "--vae-norm", "per-tile", "--unet-norm", "per-tile", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def s3diff_source():
    from srexport.models.sources import demo_s3diff_source

    return demo_s3diff_source()


@pytest.fixture(scope="session")
def s3diff_artifact(tmp_path_factory, s3diff_source):
    from srexport.cli import main

    out = tmp_path_factory.mktemp("artifacts") / "s3diff-demo"
    assert main(["build", "--model", "s3diff", "--precision", "fp32", "--vae-norm", "per-tile", "--unet-norm", "per-tile", "--out", str(out),
                 "--quiet"]) == 0
    from srexport.artifact.manifest import load_artifact
    from srexport.runtime.loading import reference_for

    art = load_artifact(out)
    return art, reference_for(art)


@pytest.fixture
def small_lr():
    """A 24x32 crop of the built-in sample: small, real, deterministic."""
    from srexport.samples import sample_image

    return sample_image()[..., 8:32, 4:36].contiguous()


@pytest.fixture(scope="session")
def retile(tmp_path_factory):
    """``retile(artifact, **settings)``: a copy of an artifact folder whose manifest records these tiling
    settings (artifact.tile_settings.TilingSettings), for tests that need images to tile at small sizes."""
    import json
    import shutil

    from srexport.artifact.tile_settings import TilingSettings, tiling_section

    def make(artifact, folder=None, **settings):
        folder = folder or tmp_path_factory.mktemp("retiled") / "artifact"
        shutil.copytree(artifact, folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["tiling"] = tiling_section(TilingSettings(**settings))
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return folder

    return make


@pytest.fixture
def retiled_demo(demo_artifact, retile, tmp_path):
    """``make(**settings)``: ``retile`` of the demo artifact."""
    return lambda **settings: retile(demo_artifact, tmp_path / "retiled", **settings)
