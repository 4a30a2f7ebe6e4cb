"""Tile geometry settings: defaults, their reasoning, validation and the manifest section.

Torch-free, so the CLI can show the defaults in ``--help`` without loading torch.
The grids are ``artifact.tile_plan``; the tiled execution is ``runtime.tiling``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

VAE_FACTOR = 8  # SD VAE: three 2x downsamplings (here, not in the torch-using specs, for the CLI)
GAUSSIAN_VARIANCE = 0.01  # the tile blend's, upstream's value: relative to the squared tile size

TILE_MULTIPLE = 64  # px: latent tiles stay multiples of 8 (the UNet's three 2x downsamplings)
OVERLAP_MULTIPLE = VAE_FACTOR  # px: a whole number of latent pixels

DEFAULT_TILE = 768
DEFAULT_OVERLAP = 64
DEFAULT_BATCH = 2
DEFAULT_VAE_TILE = 1024
DEFAULT_VAE_OVERLAP = 48
# Largest tile side. Without fused attention a tile's largest attention holds (side/8)^4 * 4 bytes of fp32
# scores per head: 1 GiB at 1024 px, 16 GiB at 2048 px, 256 GiB at 4096 px (the VAE mid-block; the
# UNet's first level is the same token count). 2048 px is the most that can fit a 24 GB machine at all.
MAX_TILE = 2048
# Whole-image runs: with fused attention memory is linear in the pixels (demo, 2.9 GB at 2048 x 2048,
# 9.3 GB at 3072 x 3072 measured); the portable graphs' scores alone are (pixels)^2 / 1 KiB bytes.
DEFAULT_UNTILED_MAX_MEGAPIXELS = 4.2  # e.g. 2048 x 2048 output
# How tiled VAE runs get their GroupNorm statistics (models/group_norm_stats.py).
VAE_NORMS = {
    "per-tile": "each tile normalises with its own GroupNorm statistics; one VAE pass",
    "two-pass": "a first pass records every tile's GroupNorm statistics, they are pooled over the image "
                "(mean of means, law of total variance), and a second pass normalises every tile with them; "
                "twice the VAE work on images of more than one VAE tile, the same memory",
    "coarse": "the first pass runs on the stage's input averaged over 3x3 pixels (COARSE_FACTOR) "
              "(the whole image at a third of its size, itself tiled if larger than a tile), and its statistics "
              "normalise every tile of the second pass: every tile shares one estimate of the image's "
              "statistics, so blending leaves no seams, for 1/9 more VAE work; uses the two-pass graphs",
}
# VAE norms whose runs need the two-pass graphs (a statistics pass, then a pooled pass)
TWO_PASS_NORMS = ("two-pass", "coarse")
# The coarse norm's downscale: 2 reaches closer to whole-image statistics (trained demo, 1536 px,
# VAE decode 38.7 dB vs 37.6 at 3) but adds 1/4 of the VAE work instead of 1/9
COARSE_FACTOR = 3
DEFAULT_VAE_NORM = "coarse"
# The denoiser's GroupNorm statistics (``--unet-norm``): its UNet graphs' own tiles, or the coarse
# norm's estimate (the latent averaged over 3x3, one statistics pass through each UNet graph)
UNET_NORMS = {
    "per-tile": "each UNet tile normalises with its own GroupNorm statistics; one pass",
    "coarse": "a statistics pass of each UNet graph over the latent averaged over 3x3 pixels (1/9 more UNet "
              "work), then every tile normalises with those statistics; adds the graphs <unet>_stats and "
              "<unet>_pooled",
}
DEFAULT_UNET_NORM = "coarse"
UNET_NORM_REASONING = (
    "On the trained demo at 1536 px, the UNet's tiles (576 px, 64 px overlap) give a denoised latent 34.1 dB "
    "from the untiled one per-tile, 39.3 dB with the whole image's own statistics, and 40.5 / 41.2 dB with "
    "coarse statistics at 1/2 / 1/3."
)
# How a stage's grid is laid out along each axis (``--tile-plan``; artifact.tile_plan lays them out).
TILE_PLANS = {
    "fixed": "tiles of the full tile size on a stride of tile - overlap from 0, the last one pushed back "
             "against the far edge (upstream's layout; the last overlap can be most of a tile)",
    "even": "per axis, the fewest tiles of at most the tile size that keep the overlap, spread evenly, each "
            "as short as that allows: the least computed area for the overlap, every tile of a stage one shape",
}
TILE_PLAN_NAMES = tuple(TILE_PLANS)
DEFAULT_TILE_PLAN = "even"
VAE_NORM_REASONING = (
    "Coarse by default: on the trained demo at 1536 px (even plan, 64 px VAE overlap), the VAE decode alone is "
    "28.7 dB from a whole-image pass per-tile, 37.0 dB two-pass (2x the VAE work), 37.6 dB coarse at 1/3 "
    "(1.11x) and 38.7 dB coarse at 1/2 (1.25x); the encoder 27.2 / 48.9 (1/3) / 49.8 (1/2) dB. Whole-image "
    "statistics themselves reach 39.3 dB: the rest is the tiles' borders (40.8 dB at 256 px overlap, coarse "
    "1/2). benchmarks/tiling_tradeoff.py measures the pipeline end to end."
)

REASONING = (
    "Denoiser tiles of at most 768 px (96 latent, upstream's size) with 64 px (8 latent) overlap, VAE tiles of "
    "at most 1024 px with 48 px overlap, laid out by the even plan: per axis the fewest tiles that keep the "
    "overlap, spread evenly and as short as that allows (a 1536 px side: 3 denoiser tiles of 576 px, 2 VAE "
    "tiles of 792 px). With the coarse statistics passes of the VAE and the UNet, the tiled run computes "
    "1.07-1.28x an untiled pass at SD 2.1's work per pixel for outputs of 1024 to 8192 px (1.05-1.25x without "
    "the UNet's; the fixed plan at 512/128 and 1024/256 px: 1.2-2.1x). Overlaps by measurement (trained demo, 1536 px): with only the denoiser tiled the output is "
    "33.4 / 32.5 / 32.5 / 32.9 dB from the untiled one at 0 / 32 / 64 / 128 px: its error is the UNet's "
    "per-tile GroupNorm statistics and attention, not the blend, so a small overlap loses nothing and larger "
    "tiles (fewer borders) gain; the VAE decode with coarse statistics is 37.6 / 38.1 / 39.0 dB at 64 / 128 / "
    "256 px for 1.09 / 1.17 / 1.36x its area, so its overlap is set by the work budget. Batch 2: 1.2 MP per "
    "denoiser call, about one 1024 px VAE tile (VAE batch 1), so memory is set by the tile as before. A "
    "512x512 output is one tile (tiled equals untiled). onnxruntime runs the graphs' attention-fused twins "
    "(flash attention, no score matrix); on the portable graphs a 1024 px VAE tile's mid-block attention "
    "(16384 tokens) holds about 1 GiB of fp32 scores per call. Whole-image runs (--no-tile) are refused above "
    "4.2 MP of output (2048x2048; demo, fused attention: 2.9 GB peak there, 9.3 GB at 3072x3072); the "
    "portable graphs' attention scores are quadratic in the pixel count, (pixels)^2 / 1 KiB bytes of fp32: "
    "4 GiB at 2.1 MP, 17 GiB at 4.2 MP."
)


@dataclass(frozen=True)
class TilingSettings:
    """Tile geometry in output-resolution pixels (latent = pixels / 8)."""

    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    batch: int = DEFAULT_BATCH
    vae_tile: int = DEFAULT_VAE_TILE
    vae_overlap: int = DEFAULT_VAE_OVERLAP
    pad: bool = False  # pad sides shorter than a tile up to it (fixed-shape engines)
    untiled_max_megapixels: float = DEFAULT_UNTILED_MAX_MEGAPIXELS
    vae_norm: str = DEFAULT_VAE_NORM  # a VAE_NORMS key
    plan: str = DEFAULT_TILE_PLAN  # how tiles are laid out (artifact.tile_plan.TILE_PLANS)
    unet_norm: str = DEFAULT_UNET_NORM  # a UNET_NORMS key

    def validate(self) -> "TilingSettings":
        for flag, tile, overlap in (("--tile", self.tile, self.overlap),
                                    ("--vae-tile", self.vae_tile, self.vae_overlap)):
            if tile < TILE_MULTIPLE or tile % TILE_MULTIPLE:
                raise UserError(f"{flag} {tile} must be a positive multiple of {TILE_MULTIPLE} pixels "
                                f"(tiles of whole latent blocks); try {max(TILE_MULTIPLE, round(tile / 64) * 64)}")
            if tile > MAX_TILE:
                raise UserError(f"{flag} {tile} is above {MAX_TILE} pixels: one tile's attention scores alone would "
                                f"take {(tile // 8) ** 4 * 4 / 2**30:.0f} GiB (fp32, no fused attention); use at most "
                                f"{MAX_TILE}")
            overlap_flag = "--tile-overlap" if flag == "--tile" else "--vae-tile-overlap"
            if overlap % OVERLAP_MULTIPLE or not 0 <= overlap <= tile // 2:
                raise UserError(f"{overlap_flag} {overlap} must be a multiple of {OVERLAP_MULTIPLE} pixels from 0 "
                                f"to half the tile ({tile // 2})")
        if not 1 <= self.batch <= 256:
            raise UserError(f"--tile-batch {self.batch} is out of range; use 1 to 256")
        if self.vae_norm not in VAE_NORMS:
            raise UserError(f"--vae-norm {self.vae_norm!r} is not one of {', '.join(VAE_NORMS)}")
        if self.unet_norm not in UNET_NORMS:
            raise UserError(f"--unet-norm {self.unet_norm!r} is not one of {', '.join(UNET_NORMS)}")
        if self.plan not in TILE_PLAN_NAMES:
            raise UserError(f"--tile-plan {self.plan!r} is not one of {', '.join(TILE_PLAN_NAMES)}")
        if not self.untiled_max_megapixels > 0:
            raise UserError(f"--untiled-max-mp {self.untiled_max_megapixels} must be a positive number of megapixels")
        return self

    @property
    def vae_batch(self) -> int:
        """VAE tiles per call: as many pixels per call as a batch of denoiser tiles, and never more
        tiles than the denoiser's batch (VAE tiles smaller than denoiser tiles would otherwise
        multiply the batch, and the VAE's activations are the largest per pixel)."""
        return max(1, min(self.batch, self.batch * self.tile**2 // self.vae_tile**2))

    def stages(self) -> dict:
        """The three tiled stages (``runtime.tiling.StageTiling``), each in its input's own pixels."""
        from .tile_plan import StageTiling

        f, plan = VAE_FACTOR, self.plan
        return {
            "encode": StageTiling("encode", self.vae_tile, self.vae_overlap, self.vae_batch, 1, f, self.pad, plan),
            "denoise": StageTiling("denoise", self.tile // f, self.overlap // f, self.batch, 1, 1, self.pad, plan,
                                   unit=TILE_MULTIPLE // f),
            "decode": StageTiling("decode", self.vae_tile // f, self.vae_overlap // f, self.vae_batch, f, 1,
                                  self.pad, plan),
        }

    def fits_one_tile(self, height: int, width: int) -> bool:
        """An encoder input of this size (pixels) is one tile for every stage: it runs whole."""
        return not self.pad and max(height, width) <= min(self.tile, self.vae_tile)

    def to_manifest(self) -> dict:
        f = VAE_FACTOR
        return {
            "tile": self.tile, "overlap": self.overlap, "batch": self.batch,
            "latent_tile": self.tile // f, "latent_overlap": self.overlap // f,
            "vae": {
                "encoder": {"tile": self.vae_tile, "overlap": self.vae_overlap, "batch": self.vae_batch},
                "decoder": {"tile": self.vae_tile, "overlap": self.vae_overlap, "batch": self.vae_batch,
                            "latent_tile": self.vae_tile // f, "latent_overlap": self.vae_overlap // f},
                "norm": self.vae_norm,
            },
            "blend": {"weights": "gaussian", "variance": GAUSSIAN_VARIANCE},
            "unet": {"norm": self.unet_norm},
            "pad": self.pad,
            "plan": self.plan,
            "untiled_max_megapixels": self.untiled_max_megapixels,
            "description": self.describe(),
        }

    def describe(self) -> str:
        """What the numbers of the tiling section mean, and why they are the defaults: for people;
        no code reads it."""
        short_sides = ("reflect-padded up to the tile and cropped back" if self.pad else
                       "run at their own length (images within one tile run whole)")
        return (
            "Sizes in output-resolution pixels; latent = pixels / 8. Tiles sit on a stride of tile - overlap "
            "from 0, the last tile aligned to the far edge; sides shorter than a tile are " + short_sides + ". "
            "Blend: w(x) = exp(-(x - (T-1)/2)^2 / (2 * variance * T^2)), outer product over the tile; "
            "out = sum(w * tile) / sum(w); the denoiser blends z0 (equal to blending eps: the denoise plan is "
            "affine per pixel). Inputs with a batch dim and no spatial dim (S3Diff scores) come from the whole "
            "image once and are repeated over each tile batch. VAE GroupNorm statistics: "
            + VAE_NORMS[self.vae_norm] + ". UNet GroupNorm statistics: " + UNET_NORMS[self.unet_norm] + ". "
            + REASONING + " " + VAE_NORM_REASONING + " " + UNET_NORM_REASONING)

    @classmethod
    def from_manifest(cls, section: dict) -> "TilingSettings":
        """From a validated manifest's section (older formats are migrated to it first)."""
        vae = section["vae"]
        return cls(
            tile=int(section["tile"]), overlap=int(section["overlap"]), batch=int(section["batch"]),
            vae_tile=int(vae["decoder"]["tile"]), vae_overlap=int(vae["decoder"]["overlap"]),
            pad=bool(section["pad"]), untiled_max_megapixels=float(section["untiled_max_megapixels"]),
            vae_norm=vae["norm"], plan=section["plan"], unet_norm=section["unet"]["norm"],
        )


# plain VAE graph -> its two-pass graphs (first pass: statistics; second: pooled statistics)
TWO_PASS_GRAPHS = {"vae_encoder": ("vae_encoder_stats", "vae_encoder_pooled"),
                   "vae_decoder": ("vae_decoder_stats", "vae_decoder_pooled")}
# the same for the UNet graphs a denoise plan can name (merged guidance, exact guidance's two)
UNET_TWO_PASS_GRAPHS = {plain: (f"{plain}_stats", f"{plain}_pooled") for plain in ("unet", "unet_pix", "unet_sem")}


def _check_norm(manifest: dict, flag: str, method: str, norms: dict, graphs: list[str], what: str,
                rebuild: str) -> str:
    if method not in norms:
        raise UserError(f"{flag} {method!r} is not one of {', '.join(norms)}")
    if manifest.get("tiling") is None:
        raise UserError(f"this artifact has no tiling section, so {flag} does not apply; rebuild it with this "
                        "srexport")
    missing = [g for g in graphs if g not in manifest.get("components", {})]
    if missing:
        raise UserError(f"this artifact has no {what} ({', '.join(missing)}); rebuild it with {rebuild}, or run "
                        f"with {flag} per-tile")
    return method


def check_unet_norm(manifest: dict, method: str) -> str:
    """``method`` if the artifact can run it, else a one-line UserError with the fix."""
    terms = [t["component"] for t in manifest.get("denoise", {}).get("terms", [])]
    graphs = [g for plain in terms for g in UNET_TWO_PASS_GRAPHS.get(plain, (f"{plain}_stats",))]
    return _check_norm(manifest, "--unet-norm", method, UNET_NORMS, graphs if method == "coarse" else [],
                       "UNet statistics graphs", "'srexport build ... --unet-norm coarse'")


def check_vae_norm(manifest: dict, method: str) -> str:
    """``method`` if the artifact can run it, else a one-line UserError with the fix."""
    graphs = [g for pair in TWO_PASS_GRAPHS.values() for g in pair]
    return _check_norm(manifest, "--vae-norm", method, VAE_NORMS, graphs if method in TWO_PASS_NORMS else [],
                       "two-pass VAE graphs", "'srexport build ... --vae-norm two-pass' (or coarse)")


def tiling_section(settings: TilingSettings | None = None) -> dict:
    """The manifest's ``tiling`` section (what manifest builders call)."""
    return (settings or TilingSettings()).validate().to_manifest()


def manifest_tiling(manifest: dict) -> TilingSettings | None:
    section = manifest.get("tiling")
    return TilingSettings.from_manifest(section) if section else None
