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
from .tile_settings import COARSE_FACTOR, TilingSettings, manifest_tiling



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
        to_px = 1 if name == "encode" else VAE_FACTOR  # output-resolution pixels
        side, planned = stage.tile * to_px, stage.smallest_planned_tile() * to_px
        low = min(planned, smallest_side)
        coarse = settings.unet_norm if name == "denoise" else settings.vae_norm
        if coarse == "coarse":  # its statistics pass: the input at 1/k, down to 8 latent pixels a side
            low = min(low, 8 * VAE_FACTOR)
        shapes[name] = (side if settings.pad else low, side, stage.batch)
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
    output/input size ratio as a fraction (up / down): encode 1/8, denoise 1, decode 8.
    ``unit``: what a tile side is a multiple of under the even plan (the UNet's 8 latent
    pixels; one latent pixel for the VAE); ``plan``: a tile_settings.TILE_PLANS key."""

    name: str
    tile: int
    overlap: int
    batch: int
    up: int
    down: int
    pad: bool = False
    plan: str = "fixed"
    unit: int = 1

    def grid(self, height: int, width: int) -> TileGrid:
        tile_h, rows = self.axis(height)
        tile_w, cols = self.axis(width)
        return TileGrid(height, width, tile_h, tile_w, tuple(rows), tuple(cols))

    def axis(self, length: int) -> tuple[int, list[int]]:
        """(tile side, origins) along an axis of ``length`` of this stage's input pixels."""
        if self.plan == "even" and length > self.tile:
            return _even_axis(length, self.tile, self.overlap, self.unit_for_plan, self.down, self.pad)
        tile = self.tile if self.pad else min(self.tile, length)
        return tile, tile_origins(length, tile, min(self.overlap, tile - 1))

    @property
    def unit_for_plan(self) -> int:
        return max(self.unit, self.down)  # the encoder's tiles stay whole latent pixels

    def smallest_planned_tile(self) -> int:
        """The shortest tile side the plan gives any axis longer than one tile (the engines'
        profiles start there); shorter axes run whole (or padded)."""
        if self.plan != "even" or self.pad:
            return self.tile
        step = self.down
        return min(self.axis(length)[0] for length in range(self.tile + step, 3 * self.tile + 1, step))

    def coarse_size(self, height: int, width: int) -> tuple[int, int, int] | None:
        """(factor, height, width) of the coarse VAE norm's statistics input for a stage input of
        this size: averaged over factor x factor pixels (tile_settings.COARSE_FACTOR) and cropped to
        whole latent pixels; None where a side would be under 8 latent pixels (the statistics pass
        then runs on the input itself)."""
        k, multiple = COARSE_FACTOR, self.unit_for_plan  # whole latent pixels; the UNet's 8
        h, w = height // k // multiple * multiple, width // k // multiple * multiple
        return (k, h, w) if min(h, w) >= 8 * self.down else None

    def statistics_grid(self, height: int, width: int, norm: str) -> "TileGrid":
        """The grid a two-pass (``norm`` "two-pass": this stage's own) or coarse stage runs its
        statistics graph over, on an input of ``height`` x ``width`` (its coarse size for
        "coarse")."""
        if norm == "coarse":
            size = self.coarse_size(height, width)
            if size is not None:
                height, width = size[1:]
        return self.grid(height, width)

    def out(self, n: int) -> int:
        if n * self.up % self.down:
            raise ValueError(f"{n} px at {self.up}/{self.down} is not a whole number of output pixels; tile "
                             "geometry must be a multiple of the stage's downscale")
        return n * self.up // self.down


def _even_axis(length: int, most: int, overlap: int, unit: int, step: int, pad: bool) -> tuple[int, list[int]]:
    """The even plan along one axis longer than ``most``: for the fewest tiles that can keep
    ``overlap`` (and one more, in case rounding to ``unit`` favours it), the shortest side that
    keeps it once the origins are spread evenly on multiples of ``step``; the least computed
    length wins, fewer tiles on a tie. With ``pad`` the side stays ``most`` (one static shape)
    and only the spreading applies."""
    fewest = -(-(length - overlap) // (most - overlap))
    best = None
    for n in (fewest, fewest + 1):
        side = most if pad else min(most, _round_up(-(-(length + (n - 1) * overlap) // n), unit))
        while True:
            origins = _spread(length, side, n, step)
            if min(a + side - b for a, b in zip(origins, origins[1:])) >= overlap or side >= most:
                break
            side = min(most, side + unit)  # the origins' rounding to ``step`` took some overlap
        if best is None or n * side < best[0] * best[1]:
            best = (n, side, origins)
    _, side, origins = best
    return side, origins


def _spread(length: int, side: int, n: int, step: int) -> list[int]:
    last = length - side
    return sorted({min(last, (i * last // (n - 1)) // step * step) for i in range(n - 1)} | {last})


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def plan_tiles(settings: TilingSettings, height: int, width: int) -> dict[str, TileGrid]:
    """Each stage's grid for an encoder input of height x width pixels."""
    stages = settings.stages()
    f = VAE_FACTOR
    return {"encode": stages["encode"].grid(height, width),
            "denoise": stages["denoise"].grid(height // f, width // f),
            "decode": stages["decode"].grid(height // f, width // f)}


# Work per output pixel of each tiled stage in SD 2.1 (TFLOP per 512x512 output, counted from the
# graphs by export/cost.py: VAE encoder, UNet, VAE decoder). Both models share these networks, so
# the shares weigh the stages' computed areas into one work ratio.
SD21_STAGE_WORK = {"encode": 1.12, "denoise": 0.80, "decode": 2.52}


def work_ratios(grids: dict[str, TileGrid], statistics: dict[str, TileGrid] | None = None) -> dict[str, float]:
    """Computed area over the image's, per stage (``statistics``: the grid a two-pass or coarse VAE
    stage runs its statistics graph over first, which counts too), and ``total``: the stages
    weighed by SD 2.1's work per pixel. 1.0 is an untiled pass."""
    statistics = statistics or {}
    out = {}
    for stage, g in grids.items():
        out[stage] = sum(p.count * p.tile_h * p.tile_w for p in (g, statistics.get(stage)) if p) / (g.height * g.width)
    weights = {stage: SD21_STAGE_WORK[stage] for stage in out}
    out["total"] = sum(weights[s] * out[s] for s in weights) / sum(weights.values())
    return out
