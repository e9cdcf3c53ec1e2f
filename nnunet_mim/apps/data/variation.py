"""Synthetic acquisition variation applied to one real volume to make many distinct cases.

Everything here is synthetic: a random affine (rotation, scaling, shear) plus a smooth elastic displacement
("patient pose / anatomy" variation), an axis-aligned crop with random margins around a region of interest,
resampling to an anisotropic voxel spacing with a Gaussian slice profile (partial-volume blur), then a
multiplicative bias field, a gamma curve and Rician or Gaussian noise. The same geometric transform is applied
to the image (linear interpolation) and to the label map (nearest neighbour).

Array convention: SimpleITK array order (z, y, x); "source mm" coordinates are ``index * spacing`` of the source
array (origin and direction are handled by the caller). Output array axis 0 is the slice axis (axial slices).
All randomness comes from the ``numpy.random.Generator`` passed in, so a case is a pure function of its seed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


@dataclass(frozen=True)
class SizePreset:
    """Output spacing ranges (mm) and crop margins (mm, per side) that set the volume size."""

    name: str
    inplane_spacing: tuple[float, float]
    slice_spacing: tuple[float, float]
    margin_mm: tuple[float, float]


SIZE_PRESETS: dict[str, SizePreset] = {
    # slice spacing always > in-plane spacing for tiny/demo (thick axial slices); "full" may be near-isotropic
    # CI tests: ~26-43 voxels in-plane, ~16-25 slices
    "tiny": SizePreset("tiny", inplane_spacing=(2.4, 2.9), slice_spacing=(3.3, 4.2), margin_mm=(3.0, 8.0)),
    # demos on a CPU: ~40-70 voxels in-plane, ~20-36 slices
    "demo": SizePreset("demo", inplane_spacing=(1.5, 2.0), slice_spacing=(2.3, 3.5), margin_mm=(4.0, 12.0)),
    # closer to clinical resolution (GPU): ~55-110 voxels in-plane, ~20-55 slices
    "full": SizePreset("full", inplane_spacing=(1.0, 1.6), slice_spacing=(1.5, 3.5), margin_mm=(5.0, 15.0)),
}


def get_preset(size: str | SizePreset) -> SizePreset:
    """Look up a size preset by name."""
    if isinstance(size, SizePreset):
        return size
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown size preset {size!r}; choose one of {sorted(SIZE_PRESETS)}")
    return SIZE_PRESETS[size]


@dataclass(frozen=True)
class VariationConfig:
    """Ranges of the random variation (defaults: moderate, plausible for adult brain MRI)."""

    max_rotation_deg: float = 12.0
    scale_range: tuple[float, float] = (0.9, 1.1)  # global scale
    axis_scale_jitter: float = 0.05  # extra independent per-axis scale factor 1 +- this
    max_shear: float = 0.04
    elastic_sigma_mm: tuple[float, float] = (0.5, 2.5)  # std of control-point displacements
    elastic_grid: int = 5  # control points per axis (smooth on the ~20 mm scale)
    bias_log_std: tuple[float, float] = (0.05, 0.25)  # std of the log bias field
    bias_grid: int = 3
    gamma_range: tuple[float, float] = (0.75, 1.35)
    noise_rel: tuple[float, float] = (0.01, 0.05)  # noise sigma / 99th-percentile intensity
    rician_probability: float = 0.7  # otherwise additive Gaussian noise
    intensity_scale: tuple[float, float] = (300.0, 1500.0)  # arbitrary scanner units


@dataclass
class CaseParams:
    """The random draws of one case (JSON-serialisable through ``as_dict``)."""

    rotation_deg: list[float]
    scale: list[float]
    shear: list[float]
    spacing_zyx: list[float]
    margin_lo_mm: list[float]
    margin_hi_mm: list[float]
    elastic_sigma_mm: float
    bias_log_std: float
    gamma: float
    noise: str
    noise_rel: float
    intensity_scale: float
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Rounded, JSON-friendly copy."""
        def rnd(v):
            if isinstance(v, float):
                return round(v, 5)
            if isinstance(v, list):
                return [rnd(x) for x in v]
            if isinstance(v, dict):
                return {k: rnd(x) for k, x in v.items()}
            return v
        return {k: rnd(v) for k, v in asdict(self).items()}


@dataclass
class SimulatedCase:
    """One generated case. ``origin_index_zyx``: continuous source index of output voxel (0, 0, 0)."""

    image: np.ndarray
    label: np.ndarray | None
    spacing_zyx: tuple[float, float, float]
    origin_index_zyx: np.ndarray
    params: CaseParams


def sample_case_params(rng: np.random.Generator, preset: SizePreset, cfg: VariationConfig) -> CaseParams:
    """Draw all scalar random parameters of one case (fields are drawn later, once the shape is known)."""
    rot = rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg, 3)
    scale = rng.uniform(*cfg.scale_range) * (1.0 + rng.uniform(-cfg.axis_scale_jitter, cfg.axis_scale_jitter, 3))
    shear = rng.uniform(-cfg.max_shear, cfg.max_shear, 3)
    inplane = rng.uniform(*preset.inplane_spacing)
    spacing = [rng.uniform(*preset.slice_spacing), inplane, inplane]
    margin_lo = rng.uniform(*preset.margin_mm, 3)
    margin_hi = rng.uniform(*preset.margin_mm, 3)
    return CaseParams(
        rotation_deg=rot.tolist(), scale=scale.tolist(), shear=shear.tolist(), spacing_zyx=spacing,
        margin_lo_mm=margin_lo.tolist(), margin_hi_mm=margin_hi.tolist(),
        elastic_sigma_mm=float(rng.uniform(*cfg.elastic_sigma_mm)),
        bias_log_std=float(rng.uniform(*cfg.bias_log_std)),
        gamma=float(np.exp(rng.uniform(np.log(cfg.gamma_range[0]), np.log(cfg.gamma_range[1])))),
        noise="rician" if rng.uniform() < cfg.rician_probability else "gaussian",
        noise_rel=float(rng.uniform(*cfg.noise_rel)),
        intensity_scale=float(rng.uniform(*cfg.intensity_scale)),
    )


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation about the three array axes (z, y, x), composed in that order."""
    a = np.deg2rad(np.asarray(angles_deg, dtype=float))
    c, s = np.cos(a), np.sin(a)
    rz = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])  # rotation in the (y, x) plane
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])  # in the (z, x) plane
    rx = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])  # in the (z, y) plane
    return rz @ ry @ rx


def affine_matrix(params: CaseParams) -> np.ndarray:
    """3x3 matrix mapping output mm offsets (from the ROI centre) to source mm offsets."""
    sh = np.eye(3)
    sh[0, 1], sh[0, 2], sh[1, 2] = params.shear
    return rotation_matrix(np.array(params.rotation_deg)) @ np.diag(params.scale) @ sh


def output_box(roi_points_mm: np.ndarray, center_mm: np.ndarray, matrix: np.ndarray, params: CaseParams,
               min_shape: int = 8) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Start (output mm) and shape of the crop: bbox of the ROI mapped into output space, plus margins."""
    q = (roi_points_mm - center_mm) @ np.linalg.inv(matrix).T + center_mm
    lo = q.min(0) - np.array(params.margin_lo_mm)
    hi = q.max(0) + np.array(params.margin_hi_mm)
    spacing = np.array(params.spacing_zyx)
    shape = np.maximum(np.ceil((hi - lo) / spacing).astype(int), min_shape)
    start = (lo + hi) / 2 - (shape - 1) * spacing / 2  # centre the voxel grid in the box
    return start, tuple(int(s) for s in shape)


def smooth_random_field(rng: np.random.Generator, shape: tuple[int, ...], grid: int, std: float) -> np.ndarray:
    """Smooth random field: N(0, std) values on a ``grid``^3 lattice, cubic-spline upsampled to ``shape``."""
    ctrl = rng.normal(0.0, std, (grid,) * len(shape))
    coords = [np.linspace(0, grid - 1, n) for n in shape]
    mesh = np.meshgrid(*coords, indexing="ij")
    return ndimage.map_coordinates(ctrl, mesh, order=3, mode="nearest").astype(np.float32)


def source_coordinates(start_mm: np.ndarray, shape: tuple[int, int, int], params: CaseParams, matrix: np.ndarray,
                       center_mm: np.ndarray, src_spacing: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """Continuous source indices (3, *shape) sampled by every output voxel: affine + elastic displacement."""
    spacing = np.array(params.spacing_zyx)
    axes = [start_mm[k] + np.arange(shape[k]) * spacing[k] - center_mm[k] for k in range(3)]
    axes = [axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]]
    coords = np.empty((3, *shape), dtype=np.float32)
    for k in range(3):
        p = matrix[k, 0] * axes[0] + matrix[k, 1] * axes[1] + matrix[k, 2] * axes[2] + center_mm[k]
        coords[k] = (p + displacement[k]) / src_spacing[k]
    return coords


def _crop_bounds(coords: np.ndarray, src_shape: tuple[int, ...], pad: np.ndarray) -> list[slice]:
    lo = np.floor(coords.reshape(3, -1).min(1) - pad).astype(int)
    hi = np.ceil(coords.reshape(3, -1).max(1) + pad).astype(int) + 1
    return [slice(int(np.clip(lo[k], 0, src_shape[k])), int(np.clip(hi[k], 0, src_shape[k]))) for k in range(3)]


def resample_image(src: np.ndarray, coords: np.ndarray, src_spacing: np.ndarray,
                   out_spacing: np.ndarray) -> np.ndarray:
    """Slice-profile blur (Gaussian, FWHM = output spacing) then linear interpolation at ``coords``."""
    sigma_vox = np.sqrt(np.maximum(out_spacing ** 2 - src_spacing ** 2, 0.0)) * FWHM_TO_SIGMA / src_spacing
    bounds = _crop_bounds(coords, src.shape, 3 * sigma_vox + 2)
    if any(b.stop <= b.start for b in bounds):  # the whole output lies outside the source
        return np.zeros(coords.shape[1:], dtype=np.float32)
    block = ndimage.gaussian_filter(src[tuple(bounds)].astype(np.float32), sigma_vox, mode="nearest")
    offset = np.array([b.start for b in bounds], dtype=np.float32).reshape(3, 1, 1, 1)
    return ndimage.map_coordinates(block, coords - offset, order=1, mode="constant", cval=0.0)


def resample_label(src: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Nearest-neighbour sampling of a label map at ``coords`` (0 outside the source)."""
    bounds = _crop_bounds(coords, src.shape, np.full(3, 2.0))
    if any(b.stop <= b.start for b in bounds):
        return np.zeros(coords.shape[1:], dtype=src.dtype)
    offset = np.array([b.start for b in bounds], dtype=np.float32).reshape(3, 1, 1, 1)
    return ndimage.map_coordinates(src[tuple(bounds)], coords - offset, order=0, mode="constant", cval=0)


def apply_intensity(img: np.ndarray, params: CaseParams, rng: np.random.Generator, cfg: VariationConfig) -> np.ndarray:
    """Gamma, multiplicative smooth bias field and Rician/Gaussian noise on an image scaled to ~[0, 1]."""
    img = np.clip(img, 0.0, None) ** params.gamma
    img = img * np.exp(smooth_random_field(rng, img.shape, cfg.bias_grid, params.bias_log_std))
    sigma = params.noise_rel * max(float(np.percentile(img, 99)), 1e-6)
    n1 = rng.normal(0.0, sigma, img.shape)
    if params.noise == "rician":
        n2 = rng.normal(0.0, sigma, img.shape)
        img = np.sqrt((img + n1) ** 2 + n2 ** 2)
    else:
        img = img + n1
    return (img * params.intensity_scale).astype(np.float32)


def simulate_case(image: np.ndarray, label: np.ndarray | None, src_spacing_zyx: tuple[float, float, float],
                  roi_points_mm: np.ndarray, rng: np.random.Generator, preset: SizePreset,
                  cfg: VariationConfig = VariationConfig()) -> SimulatedCase:
    """Generate one case from a source image (scaled to ~[0, 1]) and optional label map on the same grid.

    ``roi_points_mm``: (N, 3) points in source mm (z, y, x) that the crop must contain (before margins).
    """
    params = sample_case_params(rng, preset, cfg)
    src_spacing = np.array(src_spacing_zyx, dtype=float)
    center = (roi_points_mm.min(0) + roi_points_mm.max(0)) / 2
    matrix = affine_matrix(params)
    start, shape = output_box(roi_points_mm, center, matrix, params)
    displacement = np.stack([smooth_random_field(rng, shape, cfg.elastic_grid, params.elastic_sigma_mm)
                             for _ in range(3)])
    coords = source_coordinates(start, shape, params, matrix, center, src_spacing, displacement)
    out_spacing = np.array(params.spacing_zyx)
    img = apply_intensity(resample_image(image, coords, src_spacing, out_spacing), params, rng, cfg)
    lbl = None if label is None else resample_label(label, coords).astype(np.uint8)
    return SimulatedCase(img, lbl, tuple(float(s) for s in out_spacing), start / src_spacing, params)
