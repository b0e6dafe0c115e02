"""cdiff.geo: SAR band mappings, nodata, and GeoTIFF georeferencing through rasterio."""

import numpy as np
import pytest

from cdiff import geo
from cdiff.data import imageio

rasterio = pytest.importorskip("rasterio")
from rasterio.crs import CRS  # noqa: E402
from rasterio.transform import Affine  # noqa: E402

CRS_UTM = CRS.from_epsg(32631)
TRANSFORM = Affine(0.5, 0.0, 594000.0, 0.0, -0.5, 5762000.0)  # 0.5 m pixels, north up, like SpaceNet6's tiles


def write_geotiff(path, bands, nodata=None, crs=CRS_UTM, transform=TRANSFORM):
    """bands: (H, W, B) array."""
    with rasterio.open(path, "w", driver="GTiff", height=bands.shape[0], width=bands.shape[1], count=bands.shape[2],
                       dtype=bands.dtype, crs=crs, transform=transform, nodata=nodata) as f:
        f.write(np.moveaxis(bands, -1, 0))
    return path


def intensity(shape, seed=0):
    return np.random.default_rng(seed).gamma(2.0, 0.05, shape).astype(np.float32)


def test_spacenet6_full_pol_uses_the_dataset_mapping(tmp_path):
    bands = intensity((40, 48, 4))
    scene = geo.read_sar(write_geotiff(tmp_path / "sn6.tif", bands))
    np.testing.assert_array_equal(scene.sar, imageio.spacenet6_sar_to_rgb(bands, "x"))
    assert scene.valid is None and scene.geo.crs == CRS_UTM and scene.geo.transform == TRANSFORM


def test_single_and_dual_pol(tmp_path):
    single = intensity((32, 32, 1))
    scene = geo.read_sar(write_geotiff(tmp_path / "vv.tif", single))
    expected = imageio.to_unit_range(single, "x")
    np.testing.assert_array_equal(scene.sar, np.repeat(expected, 3, axis=2))
    dual = intensity((32, 32, 2), seed=1)
    dual[..., 1] *= 0.1  # cross-pol is weaker; each band gets its own stretch
    scene = geo.read_sar(write_geotiff(tmp_path / "vv_vh.tif", dual))
    stretched = imageio.percentile_stretch(dual, per_band=True) * 2 - 1
    np.testing.assert_allclose(scene.sar, stretched[..., [0, 1, 0]], atol=1e-6)


def test_nodata_stays_nodata_and_statistics_ignore_it(tmp_path):
    bands = intensity((40, 40, 4))
    bands[:, :10] = 0  # a nodata strip at the swath edge
    scene = geo.read_sar(write_geotiff(tmp_path / "edge.tif", bands, nodata=0))
    assert scene.valid.sum() == 40 * 30 and not scene.valid[:, :10].any()
    np.testing.assert_array_equal(scene.sar[:, 10:], imageio.spacenet6_sar_to_rgb(bands[:, 10:], "x"))
    assert (scene.sar[:, :10] == -1).all()

    eo = np.zeros((40, 40, 3), dtype=np.uint8)  # a dark prediction: valid pixels equal to nodata
    eo[:, 20:] = 200
    geo.write_eo_geotiff(tmp_path / "eo.tif", eo, scene)
    with rasterio.open(tmp_path / "eo.tif") as f:
        assert f.count == 3 and f.dtypes[0] == "uint8" and f.nodata == 0
        assert f.crs == CRS_UTM and f.transform == TRANSFORM
        written = np.moveaxis(f.read(), 0, -1)
        mask = f.dataset_mask()
    assert (written[:, :10] == 0).all() and (mask[:, :10] == 0).all()
    assert (written[:, 10:20] == 1).all() and (mask[:, 10:] == 255).all()  # nudged off nodata, still valid
    assert (written[:, 20:] == 200).all()


def test_a_nodata_value_uint8_cannot_hold_becomes_zero(tmp_path):
    bands = intensity((16, 16, 1))
    bands[:4] = -9999
    scene = geo.read_sar(write_geotiff(tmp_path / "sar.tif", bands, nodata=-9999))
    geo.write_eo_geotiff(tmp_path / "eo.tif", np.full((16, 16, 3), 90, np.uint8), scene)
    with rasterio.open(tmp_path / "eo.tif") as f:
        assert f.nodata == 0 and (f.read()[:, :4] == 0).all() and (f.read()[:, 4:] == 90).all()


def test_crs_and_transform_survive_a_round_trip(tmp_path):
    transform = Affine(1e-4, 0.0, 12.5, 0.0, -1e-4, 48.25)
    scene = geo.read_sar(write_geotiff(tmp_path / "sar.tif", intensity((24, 40, 1)), crs=CRS.from_epsg(4326),
                                       transform=transform))
    geo.write_eo_geotiff(tmp_path / "eo.tif", np.full((24, 40, 3), 7, np.uint8), scene)
    with rasterio.open(tmp_path / "eo.tif") as f:
        assert f.crs == CRS.from_epsg(4326) and f.transform == transform and (f.width, f.height) == (40, 24)
        assert f.nodata is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eo.tif", "sar.tif"]  # no temporaries


def test_an_unsupported_band_count_names_the_file(tmp_path):
    path = write_geotiff(tmp_path / "five.tif", intensity((16, 16, 5)))
    with pytest.raises(ValueError, match=r"five\.tif has 5 bands"):
        geo.read_sar(path)


def test_a_truncated_geotiff_names_the_file(tmp_path):
    path = write_geotiff(tmp_path / "cut.tif", intensity((64, 64, 4)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"cannot read GeoTIFF .*cut\.tif"):
        geo.read_sar(path)


def test_all_nodata_and_constant_scenes_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"empty\.tif has no valid pixel"):
        geo.read_sar(write_geotiff(tmp_path / "empty.tif", np.zeros((8, 8, 1), np.float32), nodata=0))
    with pytest.raises(ValueError, match=r"flat\.tif is constant"):
        geo.read_sar(write_geotiff(tmp_path / "flat.tif", np.ones((8, 8, 1), np.float32)))
