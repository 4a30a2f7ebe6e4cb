"""Two-pass tiled VAE: GroupNorm statistics pooled over every tile of an image.

A GroupNorm normalises with the mean and variance of what it sees; on a tile
those are the tile's, so per-tile VAE runs disagree at the seams and drift in
colour from a whole-image pass (measured: ``benchmarks/tiled_vae_error.py``).
The two-pass method keeps memory bounded by the tile:

1. every tile runs with its own statistics and records each GroupNorm's
   per-group (mean, variance), in call order: shape (L, G, 2) per tile;
2. the runtime pools them over the image (``pool_stats``: mean of the means,
   law of total variance: all tiles of a grid have one shape, so each counts
   the same), and every tile runs again, each GroupNorm normalising with the
   pooled statistics instead of its own.

The recorded statistics of GroupNorm k come from inputs normalised per tile
at the GroupNorms before it, so this approximates the whole image's
statistics (upstream's tiled VAE gets them exactly by running all tiles layer
by layer, holding every tile's activations at once). With one tile it is the
whole-image computation.

The graphs: ``vae_encoder_stats`` / ``vae_decoder_stats`` (a tile -> its
statistics; what follows the last GroupNorm is dead code the export drops)
and ``vae_encoder_pooled`` / ``vae_decoder_pooled`` (a tile and statistics ->
the plain graph's output). Both wrap the plain components' modules; no
weights are copied.
"""

from __future__ import annotations

import contextlib
import functools
import re

import torch
from torch import nn

from ..artifact.specs import ComponentSpec, Geometry, TensorSpec
from ..artifact.tile_settings import TWO_PASS_GRAPHS, UNET_TWO_PASS_GRAPHS

# of the statistics tensors' names (encoder_tile_stats, unet_norm_stats, ...)
_PREFIX = {"vae_encoder": "encoder", "vae_decoder": "decoder", **{p: p for p in UNET_TWO_PASS_GRAPHS}}
_ALL_GRAPHS = {**TWO_PASS_GRAPHS, **UNET_TWO_PASS_GRAPHS}
# plain component -> (its stats graph, its pooled graph, tensor prefix)
TWO_PASS_OF = {plain: (*graphs, _PREFIX[plain]) for plain, graphs in _ALL_GRAPHS.items()}
# two-pass component -> (the plain component it wraps, "stats" | "pooled")
TWO_PASS_COMPONENTS = {graph: (plain, kind) for plain, graphs in _ALL_GRAPHS.items()
                       for graph, kind in zip(graphs, ("stats", "pooled"))}
# Nodes the two-pass graphs compute in fp32 inside fp16/int8 graphs: what a GroupNorm's forward
# makes (scoped by the module's name in diffusers' SD VAE: resnet norm1/norm2, attention group_norm,
# conv_norm_out) and the statistics graph's top-level stacking of them. As for the plain graphs'
# InstanceNormalization: sums of squares overflow fp16, and rounded statistics would shift every tile.
_STATISTICS_NODE = re.compile(r"(/(norm|norm1|norm2|group_norm|conv_norm_out)/[^/]+|^/[^/]+)$")


AFTER_THE_NORMS = frozenset({"cfg_scale"})  # inputs no GroupNorm's statistics depend on


def tile_stats_name(plain: str) -> str:
    return f"{TWO_PASS_OF[plain][2]}_tile_stats"


def norm_stats_name(plain: str) -> str:
    return f"{TWO_PASS_OF[plain][2]}_norm_stats"


def group_norms(module: nn.Module) -> list[nn.GroupNorm]:
    return [m for m in module.modules() if isinstance(m, nn.GroupNorm)]


def _group_view(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], norm.num_groups, -1)


def _normalise(norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of ``x`` with per-sample, per-group ``mean`` and ``var`` (batch, G) given."""
    v = _group_view(norm, x)
    out = ((v - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)).reshape(x.shape)
    if norm.affine:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        out = out * norm.weight.reshape(shape) + norm.bias.reshape(shape)
    return out


@contextlib.contextmanager
def _patched(norms: list[nn.GroupNorm], forward):
    """Give each GroupNorm ``forward(norm, x)`` for the duration (an instance attribute, so the
    shared modules are untouched outside)."""
    if any("forward" in vars(n) for n in norms):
        raise RuntimeError("GroupNorm statistics contexts do not nest")
    for norm in norms:
        norm.forward = functools.partial(forward, norm)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


@contextlib.contextmanager
def recording(module: nn.Module):
    """Every GroupNorm in ``module`` normalises with its own statistics and appends them,
    (batch, G, 2) of (mean, biased variance), to the yielded list in call order."""
    recorded: list[torch.Tensor] = []

    def forward(norm, x):
        v = _group_view(norm, x)
        mean, var = v.mean(-1), v.var(-1, unbiased=False)
        recorded.append(torch.stack([mean, var], -1))
        return _normalise(norm, x, mean, var)

    with _patched(group_norms(module), forward):
        yield recorded


def per_sample(recorded: list[torch.Tensor], batch: int) -> torch.Tensor:
    """``recording``'s list as (batch, L, G, 2). A network that runs its GroupNorms on c stacked
    copies of its batch (S3Diff's guidance: [positive; negative] in one batch) has c statistics
    per sample and call: kept apart, copy-major, as (batch, c * L, G, 2)."""
    stacked = torch.stack(recorded, 1)
    copies = stacked.shape[0] // batch
    if copies == 1:
        return stacked
    return stacked.reshape(copies, batch, *stacked.shape[1:]).transpose(0, 1).reshape(
        batch, copies * stacked.shape[1], *stacked.shape[2:])


@contextlib.contextmanager
def normalising_with(module: nn.Module, stats: torch.Tensor):
    """Every GroupNorm in ``module`` normalises with ``stats`` (batch, L, G, 2): the k-th call
    uses ``stats[:, k]``. The number of calls must be L. A GroupNorm that sees c stacked copies of
    the batch takes each copy's statistics from ``per_sample``'s layout."""
    calls, copies = [0], [1]

    def forward(norm, x):
        k = calls[0]
        copies[0] = c = x.shape[0] // stats.shape[0]
        length = stats.shape[1] // c
        if k >= length:
            raise ValueError(f"statistics for {length} GroupNorms, but the network calls more")
        calls[0] += 1
        if c == 1:
            return _normalise(norm, x, stats[:, k, :, 0], stats[:, k, :, 1])
        chosen = stats[:, [j * length + k for j in range(c)]].transpose(0, 1).reshape(-1, *stats.shape[2:])
        return _normalise(norm, x, chosen[..., 0], chosen[..., 1])

    with _patched(group_norms(module), forward):
        yield
    if calls[0] * copies[0] != stats.shape[1]:
        raise ValueError(f"statistics for {stats.shape[1] // copies[0]} GroupNorms, but the network called "
                         f"{calls[0]}")


class TileStats(nn.Module):
    """The wrapped component's inputs -> (batch, L, G, 2) GroupNorm statistics of each sample."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        with recording(self.inner) as recorded:
            self.inner(*inputs)
        return per_sample(recorded, inputs[0].shape[0])


class PooledNorm(nn.Module):
    """The wrapped component's inputs plus (batch, L, G, 2) statistics -> its output, every
    GroupNorm normalising with the given statistics."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *inputs, stats = inputs
        with normalising_with(self.inner, stats):
            return self.inner(*inputs)


def pool_stats(stats: torch.Tensor) -> torch.Tensor:
    """(N, L, G, 2) statistics of N equally sized tiles -> (1, L, G, 2) of their union: the mean
    of the means, and the mean variance plus the variance of the means (float64 inside)."""
    s = stats.double()
    mean = s[..., 0].mean(0)
    var = s[..., 1].mean(0) + ((s[..., 0] - mean) ** 2).mean(0)
    return torch.stack([mean, var], -1)[None].to(stats.dtype)


class StatsPool:
    """Streams tile batches' statistics into ``pool_stats`` of all of them (the runtime's
    first pass; the same interface as ``runtime.tiling.BlendCanvas``). ``copies``: a batch holds
    that many copies of its tiles, copy-major (``runtime.tiling.tile_feeds``), pooled apart."""

    def __init__(self, copies: int = 1):
        self.copies = copies
        self._mean_sum = self._var_sum = self._square_sum = None
        self.count = 0

    def add(self, stats: torch.Tensor, origins=None) -> None:
        s = stats.detach().to("cpu", torch.float64)
        s = s.reshape(self.copies, -1, *s.shape[1:])  # (copies, tiles, L, G, 2)
        if self._mean_sum is None:
            self._mean_sum = torch.zeros_like(s[:, 0, ..., 0])
            self._var_sum, self._square_sum = torch.zeros_like(self._mean_sum), torch.zeros_like(self._mean_sum)
        self._mean_sum += s[..., 0].sum(1)
        self._var_sum += s[..., 1].sum(1)
        self._square_sum += (s[..., 0] ** 2).sum(1)
        self.count += s.shape[1]

    def result(self) -> torch.Tensor:
        """(copies, L, G, 2) float32: E[var] + E[mean^2] - E[mean]^2, the union's variance."""
        mean = self._mean_sum / self.count
        var = self._var_sum / self.count + (self._square_sum / self.count - mean * mean).clamp_min(0)
        return torch.stack([mean, var], -1).float()


# --- components and specs ----------------------------------------------------------------


def standardised(stats: torch.Tensor, reference: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(mean, variance) statistics in units of the reference's standard deviation: (mean / sd,
    variance / sd^2). What a GroupNorm does with them is scale-free, so their errors are compared
    in these units: an error of 1e-3 moves a normalised activation by about 1e-3."""
    sd = (reference[..., 1:2].double().clamp_min(0) + eps).sqrt()
    return torch.cat([stats[..., 0:1] / sd, stats[..., 1:2] / sd**2], -1).float()


def comparable(name: str, actual: torch.Tensor, expected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An output pair as parity compares it: statistics standardised (``standardised``), others as they are."""
    if name.endswith("_tile_stats"):
        return standardised(actual, expected), standardised(expected, expected)
    return actual, expected


def statistics_nodes(model) -> list[str]:
    """Names of the nodes of a two-pass graph (an onnx.ModelProto) that stay fp32 (see _STATISTICS_NODE)."""
    return [n.name for n in model.graph.node if _STATISTICS_NODE.search(n.name)]


def with_two_pass_modules(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``modules`` plus the two-pass wrappers of its VAE components (sharing their weights)."""
    out = dict(modules)
    for name, (plain, kind) in TWO_PASS_COMPONENTS.items():
        if plain in modules:
            out[name] = (TileStats if kind == "stats" else PooledNorm)(modules[plain])
    return out


def graph_modules(reference) -> dict[str, nn.Module]:
    """Component name -> module for every graph an artifact of ``reference`` can hold."""
    return with_two_pass_modules(reference.components())


@torch.no_grad()
def count_norms(module: nn.Module, spec: ComponentSpec) -> tuple[int, int]:
    """(GroupNorm calls L, groups G) of one forward of ``module`` (a dry run at a small shape)."""
    feeds = spec.sample_inputs(Geometry(1, 64, 64), seed=0)
    with recording(module) as recorded:
        module(*(feeds[n] for n in spec.input_names))
    groups = {r.shape[1] for r in recorded}
    if not recorded or len(groups) != 1:
        raise ValueError(f"{spec.name}: two-pass needs GroupNorms with one group count; found {sorted(groups)}")
    return per_sample(recorded, 1).shape[1], groups.pop()  # stacked copies of the batch count apart


def two_pass_specs(specs: dict[str, ComponentSpec], modules: dict[str, nn.Module],
                   plains=tuple(TWO_PASS_GRAPHS)) -> dict[str, ComponentSpec]:
    """The stats and pooled specs of each of ``plains`` (default: the two VAE halves) that
    ``specs`` holds, from its plain spec and module."""
    out = {}
    for plain in plains:
        if plain not in specs:
            continue
        stats_name, pooled_name, _ = TWO_PASS_OF[plain]
        spec = specs[plain]
        calls, groups = count_norms(modules[plain], spec)
        dims = ("batch", calls, groups, 2)
        tile_stats = TensorSpec(tile_stats_name(plain), dims)
        # positive sample values: a variance input must be >= 0
        given = TensorSpec(norm_stats_name(plain), dims, value_range=(0.5, 1.5))
        what = f"{calls} GroupNorms x {groups} groups x (mean, variance)"
        # inputs used after the last GroupNorm only (S3Diff's cfg scale mixes the UNet's outputs)
        # are not the statistics graph's: the export drops them
        stats_inputs = tuple(t for t in spec.inputs if t.name not in AFTER_THE_NORMS)
        out[stats_name] = ComponentSpec(
            stats_name, stats_inputs, (tile_stats,),
            f"tiled {plain}, statistics pass: a tile -> its GroupNorm statistics ({what}), each GroupNorm "
            f"normalising with the tile's own; {plain}'s computation up to its last GroupNorm",
            spec.size_multiple, stage=spec.stage)
        out[pooled_name] = ComponentSpec(
            pooled_name, (*spec.inputs, given), spec.outputs,
            f"tiled {plain}, second pass: {plain} with every GroupNorm normalising with the given statistics "
            f"({what}; the runtime pools the statistics pass's over the tiles it ran)",
            spec.size_multiple, stage=spec.stage)
    return out


@torch.no_grad()
def add_whole_image_stats(env: dict[str, torch.Tensor], modules: dict[str, nn.Module],
                          specs: dict[str, ComponentSpec]) -> None:
    """Fill in the two-pass tensors of a whole-image (one-tile) run that ``env`` lacks, for the
    components in ``specs``: each VAE's statistics of the whole image, which are also what its
    pooled graph is given (one tile: the pool is the tile itself). For calibration and checks,
    which feed every graph the reference's own tensors."""
    for plain, (stats_name, pooled_name, _) in TWO_PASS_OF.items():
        tile_stats, given = tile_stats_name(plain), norm_stats_name(plain)
        if not ({stats_name, pooled_name} & specs.keys()) or {tile_stats, given} <= env.keys():
            continue
        # the stats graph takes the plain graph's inputs: the pooled graph's but the last
        inputs = specs[stats_name].input_names if stats_name in specs else specs[pooled_name].input_names[:-1]
        module = modules.get(stats_name) or TileStats(modules[plain])
        env[tile_stats] = env[given] = module(*(env[n] for n in inputs))
