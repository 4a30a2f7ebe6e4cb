"""The tile plan: which tiles each stage runs for an image, and the shapes engines are built for.

Part of the artifact contract (torch-free but for ``kernels.tiling.tile_origins``): the runtime
runs these grids, the tiled PyTorch reference (models/tiled_reference.py) computes the same
grids on whole tensors, and the TensorRT profiles are the shapes ``tile_geometries`` gives.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..kernels.tiling import tile_origins
from ..processing import Processing
from .specs import VAE_FACTOR, WHOLE_IMAGE_STAGES, Geometry
from .tile_settings import TilingSettings, manifest_tiling



def tile_geometries(manifest: dict, component: str | None = None) -> tuple[Geometry, Geometry, Geometry]:
    """(smallest, typical, largest) Geometry the tiled runtime calls ``component`` with
    (``ComponentSpec.profile`` turns them into shapes). ``component=None``: the envelope over
    the encoder, the denoiser graphs and the decoder.

    Typical is the full tile at the full batch. Without ``pad``, a side shorter than a
    tile runs at its own length, so the smallest is the smallest side the processing can
    produce (PiSA-SR at process size 512 never goes below 512) at batch 1.
    """
    settings = manifest_tiling(manifest)
    if settings is None:
        raise UserError("this artifact has no tiling section; rebuild it with this srexport to get one")
    role = None if component is None else manifest["components"][component]["spec"]["stage"]
    if role in WHOLE_IMAGE_STAGES:
        raise ValueError(f"{component} runs once on the whole LR image, not per tile")
    scale = int(manifest["processing"]["scale"])
    stages = settings.stages()
    names = ["encode", "denoise", "decode"] if component is None else [role]
    smallest_side = _smallest_side(Processing.from_dict(manifest["processing"]))
    shapes = {}  # stage -> (smallest side, tile side, batch), output-resolution pixels
    for name in names:
        stage = stages[name]
        side = stage.tile if name == "encode" else stage.tile * VAE_FACTOR  # output-resolution pixels
        shapes[name] = (side if settings.pad else min(side, smallest_side), side, stage.batch)
    low = min(s[0] for s in shapes.values())
    _, side, batch = shapes["denoise" if "denoise" in shapes else names[0]]
    high, high_batch = max(s[1] for s in shapes.values()), max(s[2] for s in shapes.values())
    return Geometry(1, low, low, scale), Geometry(batch, side, side, scale), Geometry(high_batch, high, high, scale)


def _smallest_side(p) -> int:
    """The shortest encoder-input side the processing can produce from any accepted input."""
    low = p.min_input_side()
    high = max(low, p.min_lr_side) + 2
    return min(p.model_size(h, 10**6)[0] for h in range(low, high + 1))


@dataclass(frozen=True)
class TileGrid:
    """Where one stage's tiles sit on its input (in that input's pixels)."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @property
    def origins(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.rows for x in self.cols]

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def padded(self) -> bool:
        return self.rows[-1] + self.tile_h > self.height or self.cols[-1] + self.tile_w > self.width


@dataclass(frozen=True)
class StageTiling:
    """One stage's tiling: tile and overlap in its input's pixels, batch, and the
    output/input size ratio as a fraction (up / down): encode 1/8, denoise 1, decode 8."""

    name: str
    tile: int
    overlap: int
    batch: int
    up: int
    down: int
    pad: bool = False

    def grid(self, height: int, width: int) -> TileGrid:
        tile_h = self.tile if self.pad else min(self.tile, height)
        tile_w = self.tile if self.pad else min(self.tile, width)
        rows = tile_origins(height, tile_h, min(self.overlap, tile_h - 1))
        cols = tile_origins(width, tile_w, min(self.overlap, tile_w - 1))
        return TileGrid(height, width, tile_h, tile_w, tuple(rows), tuple(cols))

    def out(self, n: int) -> int:
        if n * self.up % self.down:
            raise ValueError(f"{n} px at {self.up}/{self.down} is not a whole number of output pixels; tile "
                             "geometry must be a multiple of the stage's downscale")
        return n * self.up // self.down


def plan_tiles(settings: TilingSettings, height: int, width: int) -> dict[str, TileGrid]:
    """Each stage's grid for an encoder input of height x width pixels."""
    stages = settings.stages()
    f = VAE_FACTOR
    return {"encode": stages["encode"].grid(height, width),
            "denoise": stages["denoise"].grid(height // f, width // f),
            "decode": stages["decode"].grid(height // f, width // f)}
