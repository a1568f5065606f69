"""Simulated plate reader: a camera photographing dye mixtures in a 96-well plate.

The physics is Beer-Lambert mixing: each dye stock has an absorbance spectrum
(a sum of Gaussian bands over 360-780 nm), water has none. A well holding v_i µL
of stock i in a total of V µL has relative concentration c_i = v_i / V, and
transmits T(λ) = 10^(-path · Σ c_i·ε_i(λ)). The transmitted spectrum under D65
goes through colour-science to XYZ and 8-bit sRGB, with seeded camera noise.

The dye spectra are the simulator's secret: optimisers only ever see `read()`, and which dyes
sit on the deck is configuration (the deck layout in events/labware.py), not these spectra. A
well holds the rulebook's working volume (every well is filled to it).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from labbus.events.labware import PLATE

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # colour-science warns that matplotlib is absent
    import colour
    from colour.colorimetry import sd_to_XYZ_integration

WAVELENGTHS = colour.SpectralShape(360, 780, 5)
RGB8 = tuple[int, int, int]


@dataclass(frozen=True)
class Band:
    """One Gaussian absorption band; `peak` is the absorbance of undiluted stock at `centre_nm`."""
    centre_nm: float
    width_nm: float  # standard deviation of the Gaussian
    peak: float


@dataclass(frozen=True)
class Dye:
    name: str
    bands: tuple[Band, ...]

    def absorbance(self, wavelengths_nm: np.ndarray) -> np.ndarray:
        total = np.zeros_like(wavelengths_nm, dtype=float)
        for band in self.bands:
            total += band.peak * np.exp(
                -0.5 * ((wavelengths_nm - band.centre_nm) / band.width_nm) ** 2)
        return total


# Loosely modelled on food dyes: Allura red (λmax 504 nm), tartrazine (427 nm) and
# brilliant blue FCF (630 nm, with a weak violet band), diluted so that a full well
# of stock reaches an absorbance of about 2.5-3 at the peak.
FOOD_DYES: tuple[Dye, ...] = (
    Dye("red", (Band(504, 38, 2.8), Band(420, 30, 0.35))),
    Dye("yellow", (Band(427, 33, 2.4), Band(370, 25, 0.8))),
    Dye("blue", (Band(630, 30, 3.0), Band(410, 25, 0.2), Band(580, 25, 0.7))),
)


def rgb_to_lab(rgb8: Sequence[float]) -> np.ndarray:
    """8-bit sRGB (one triple or an (n, 3) array) → CIELAB under D65, via colour-science."""
    srgb = np.asarray(rgb8, dtype=float) / 255.0
    xyz = colour.sRGB_to_XYZ(srgb)
    return colour.XYZ_to_Lab(
        xyz, colour.CCS_ILLUMINANTS["CIE 1931 2 Degree Standard Observer"]["D65"])


class PlateReaderModel:
    """`read(volumes)` returns a noisy 8-bit RGB reading; `true_rgb(volumes)` the noise-free
    sRGB."""

    def __init__(self, dyes: Sequence[Dye] = FOOD_DYES, noise_sigma: float = 1 / 255,
                 seed: int | None = 0, total_volume_ul: float = PLATE.working_volume_ul,
                 path_length: float = 1.0):
        self._dyes = {dye.name: dye for dye in dyes}
        self._noise_sigma = noise_sigma
        self._rng = np.random.default_rng(seed)
        self._total_volume_ul = total_volume_ul
        self._path_length = path_length
        wavelengths = WAVELENGTHS.wavelengths
        self._epsilon = np.stack([dye.absorbance(wavelengths) for dye in dyes])  # (dyes, λ)
        self._cmfs = (colour.MSDS_CMFS["CIE 1931 2 Degree Standard Observer"].copy()
                      .align(WAVELENGTHS))
        self._illuminant = colour.SDS_ILLUMINANTS["D65"].copy().align(WAVELENGTHS)

    @property
    def dye_names(self) -> tuple[str, ...]:
        return tuple(self._dyes)

    def true_rgb(self, volumes: Mapping[str, float]) -> tuple[float, float, float]:
        """Noise-free sRGB in 0..1 (clipped like a camera would), before quantisation."""
        return tuple(float(v) for v in self.true_rgb_many([volumes])[0])

    def true_rgb_many(self, recipes: Sequence[Mapping[str, float]]) -> np.ndarray:
        concentrations = np.array([self._concentrations(r) for r in recipes])  # (n, dyes)
        absorbance = self._path_length * concentrations @ self._epsilon  # (n, λ)
        transmittance = 10.0 ** (-absorbance)
        xyz = sd_to_XYZ_integration(transmittance, self._cmfs, self._illuminant,
                                    shape=WAVELENGTHS) / 100.0
        return np.clip(colour.XYZ_to_sRGB(xyz), 0.0, 1.0)

    def read(self, volumes: Mapping[str, float]) -> RGB8:
        return self.read_many([volumes])[0]

    def read_many(self, recipes: Sequence[Mapping[str, float]]) -> list[RGB8]:
        srgb = self.true_rgb_many(recipes)
        noisy = srgb + self._rng.normal(0.0, self._noise_sigma, size=srgb.shape)
        quantised = np.clip(np.rint(noisy * 255.0), 0, 255).astype(int)
        return [tuple(int(v) for v in row) for row in quantised]

    def _concentrations(self, volumes: Mapping[str, float]) -> np.ndarray:
        unknown = set(volumes) - set(self._dyes) - {"water"}
        if unknown:
            raise KeyError(f"unknown dye(s) {sorted(unknown)}; "
                           f"this reader has {sorted(self._dyes)}")
        return np.array([volumes.get(name, 0.0) for name in self._dyes]) / self._total_volume_ul
