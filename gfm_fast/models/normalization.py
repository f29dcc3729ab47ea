"""Input normalisation for weights saved without it: ImageNet's for RGB, Sentinel-2's for 12 bands."""
from __future__ import annotations

import warnings
from typing import Tuple

from gfm_fast.config import IMAGENET_MEAN, IMAGENET_STD
from gfm_fast.errors import ConfigError

__all__ = ["SENTINEL2_L2A_MEAN", "SENTINEL2_L2A_STD", "default_normalization"]

# Default normalisation of 12-band input: Sentinel-2 L2A bands B1, B2, B3, B4, B5, B6, B7, B8, B8A, B9,
# B11, B12 (reflectance x 10000 in uint16 files). Mean and std in those units are SSL4EO-S12's
# (Wang et al. 2022, "SSL4EO-S12", computed on 50k patches; the statistics of its pretraining code,
# S2A_MEAN / S2A_STD); divided by 65535 because gfm_fast scales uint16 pixels to [0, 1] first.
_S2_UINT16 = 65535.0
SENTINEL2_L2A_MEAN = tuple(m / _S2_UINT16 for m in (
    752.40087073, 884.29673756, 1144.16202635, 1297.47289228, 1624.90992062, 2194.6423161,
    2422.21248945, 2517.76053101, 2581.64687018, 2645.51888987, 2368.51236873, 1805.06846033))
SENTINEL2_L2A_STD = tuple(s / _S2_UINT16 for s in (
    1108.02887453, 1155.15170768, 1183.6292542, 1368.11351514, 1370.265037, 1355.55390699,
    1416.51487101, 1474.78900051, 1439.3086061, 1582.28010962, 1455.52084939, 1343.48379601))


def default_normalization(chans: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """mean/std for weights saved without them: ImageNet's for 3 bands, Sentinel-2 L2A's for 12
    (``SENTINEL2_L2A_MEAN``; with a warning naming the band order); other counts must be given.

    Raises:
        ConfigError: neither 3 nor 12 channels.
    """
    if chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if chans == 12:
        warnings.warn("12-band weights without mean/std: using Sentinel-2 L2A statistics (SSL4EO-S12; bands B1-B8, "
                      "B8A, B9, B11, B12 in that order, uint16 reflectance x 10000). Pass mean=..., std=... (12 values, "
                      "for pixels scaled to [0, 1]) if your bands, order or product level differ", UserWarning,
                      stacklevel=3)
        return SENTINEL2_L2A_MEAN, SENTINEL2_L2A_STD
    raise ConfigError(f"the model takes {chans} input channels: pass mean=... and std=... ({chans} values each, for "
                      f"pixels scaled to [0, 1]) to normalise them")
