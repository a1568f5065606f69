import numpy as np
import pytest

from labbus.producers.plate_reader_model import Band, Dye, PlateReaderModel, rgb_to_lab


def test_water_reads_white():
    reader = PlateReaderModel(noise_sigma=0.0)
    assert reader.read({}) == (255, 255, 255)
    np.testing.assert_allclose(rgb_to_lab((255, 255, 255)), [100, 0, 0], atol=0.01)


def test_more_dye_is_darker_and_dye_has_its_colour():
    reader = PlateReaderModel(noise_sigma=0.0)
    light, dark = (rgb_to_lab(reader.read({"blue": v})) for v in (40, 160))
    assert dark[0] < light[0]
    assert rgb_to_lab(reader.read({"yellow": 100}))[2] > 40  # yellow: strongly positive b*
    assert rgb_to_lab(reader.read({"red": 100}))[1] > 30  # red: strongly positive a*


def test_readings_are_8_bit_noisy_and_seeded():
    recipe = {"red": 60, "blue": 40}
    a = [PlateReaderModel(noise_sigma=3 / 255, seed=7).read(recipe) for _ in range(2)]
    assert a[0] == a[1]
    reader = PlateReaderModel(noise_sigma=3 / 255, seed=7)
    readings = np.array(reader.read_many([recipe] * 200))
    assert readings.dtype.kind == "i" and readings.min() >= 0 and readings.max() <= 255
    truth = np.array(reader.true_rgb(recipe)) * 255
    assert np.abs(readings.mean(axis=0) - truth).max() < 1.0
    assert 2.0 < readings.std(axis=0).mean() < 4.0


def test_custom_dyes_and_unknown_names():
    green = Dye("green", (Band(450, 30, 2.0), Band(640, 30, 2.0)))
    reader = PlateReaderModel(dyes=[green], noise_sigma=0.0)
    r, g, b = reader.read({"green": 150})
    assert g > r and g > b
    with pytest.raises(KeyError, match="unknown dye"):
        reader.read({"red": 20})


def test_dye_spectra_are_not_part_of_the_public_surface():
    public = {name for name in dir(PlateReaderModel(seed=0)) if not name.startswith("_")}
    assert public == {"dye_names", "read", "read_many", "true_rgb", "true_rgb_many"}
