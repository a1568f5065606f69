import numpy as np
import pytest

from labbus.processors.colour.optimiser import (
    MixingModel,
    Observation,
    first_design,
    fit_model,
    propose,
)
from labbus.processors.colour.recipes import recipe_violations
from labbus.processors.colour.scoring import delta_e2000, parse_target
from labbus.producers.plate_reader_model import PlateReaderModel, rgb_to_lab

DYES = ("red", "yellow", "blue")


def colour_of(recipe):
    return rgb_to_lab(np.asarray(PlateReaderModel(noise_sigma=0.0).true_rgb(recipe)) * 255)


def run(target_lab, seed, warm_start=(), budget=96, sigma=1 / 255):
    reader = PlateReaderModel(noise_sigma=sigma, seed=seed)
    history = []
    while True:
        proposal = propose(history, target_lab, DYES, batch_size=8, budget=budget,
                           warm_start=warm_start)
        if proposal.done or not proposal.recipes:
            return proposal, history, reader
        for recipe in proposal.recipes:
            assert recipe_violations(recipe, dyes=DYES) == []
        readings = reader.read_many(proposal.recipes)
        history += [Observation(r, rgb)
                    for r, rgb in zip(proposal.recipes, readings, strict=False)]


def test_model_fits_noise_free_synthetic_data_exactly():
    rng = np.random.default_rng(0)
    truth = MixingModel(baseline=np.array([0.02, 0.0, -0.03]),
                        absorptivity=np.array([[0.9, 0.5, 1.1], [1.2, 0.6, 0.8], [0.8, 1.3, 0.6]]))
    fractions = rng.uniform(0.0, 0.5, size=(30, 3))
    readings = truth.srgb(fractions) * 255  # unquantised, so an exact fit exists
    assert readings.min() > 0 and readings.max() < 255
    fitted = fit_model(fractions, readings, np.ones(len(fractions)))
    np.testing.assert_allclose(fitted.srgb(fractions) * 255, readings, atol=1e-4)
    np.testing.assert_allclose(fitted.absorptivity, truth.absorptivity, atol=1e-4)
    np.testing.assert_allclose(fitted.baseline, truth.baseline, atol=1e-5)


def test_clipped_channels_are_one_sided():
    truth = MixingModel(np.zeros(3), np.array([[2.0, 0.0], [0.5, 0.5], [0.0, 2.0]]))
    fractions = np.random.default_rng(1).uniform(0.0, 1.0, size=(40, 2))
    readings = np.clip(np.rint(truth.srgb(fractions) * 255), 0, 255)
    fitted = fit_model(fractions, readings, np.ones(len(fractions)))
    assert np.abs(fitted.srgb(fractions) * 255 - readings).max() < 1.5


@pytest.mark.parametrize("recipe, seed", [
    ({"red": 79, "yellow": 42, "blue": 0}, 1),
    ({"red": 26, "yellow": 126, "blue": 48}, 2),
    ({"red": 0, "yellow": 31, "blue": 108}, 3),
])
def test_converges_on_reachable_targets_within_budget(recipe, seed):
    target = colour_of(recipe)
    proposal, history, reader = run(target, seed)
    assert proposal.done, proposal.reason
    assert len(history) <= 96
    assert proposal.best_replicates >= 3 and proposal.best_measured_de < 2.0
    assert delta_e2000(colour_of(proposal.best_recipe), target) < 2.0


def test_same_history_gives_the_same_proposal():
    target = parse_target("#8a6f9e")
    reader = PlateReaderModel(seed=5)
    history = []
    for _ in range(2):
        proposal = propose(history, target, DYES)
        readings = reader.read_many(proposal.recipes)
        history += [Observation(r, rgb)
                    for r, rgb in zip(proposal.recipes, readings, strict=False)]
    # e.g. replayed from the log
    restarted = [Observation(dict(o.recipe), tuple(o.rgb8)) for o in history]
    assert propose(history, target, DYES) == propose(restarted, target, DYES)


def test_first_batch_is_a_factorial_design():
    proposal = propose([], parse_target("#8a6f9e"), DYES)
    assert not proposal.done and proposal.best_recipe is None
    assert [tuple(r.values()) for r in proposal.recipes] == first_design(3)
    assert len(proposal.recipes) == 8


def test_a_single_low_reading_is_not_a_stop():
    target = colour_of({"red": 50, "yellow": 50, "blue": 50})
    reader = PlateReaderModel(noise_sigma=0.0)
    lucky = Observation({"red": 50, "yellow": 50, "blue": 50},
                        reader.read({"red": 50, "yellow": 50, "blue": 50}))
    design = [Observation(dict(zip(DYES, v, strict=False)),
                          reader.read(dict(zip(DYES, v, strict=False))))
              for v in first_design(3)]
    single = propose(design + [lucky], target, DYES)
    assert not single.done and single.best_measured_de < 1.0
    assert single.recipes.count(dict(lucky.recipe)) >= 2  # it asks for replicates instead
    confirmed = propose(design + [lucky] * 3, target, DYES)
    assert confirmed.done and "confirmed" in confirmed.reason


def test_budget_is_respected():
    proposal, history, _ = run(parse_target("#00ff00"), seed=4, budget=24)
    assert len(history) == 24 and not proposal.done and proposal.recipes == []
    assert "budget of 24 wells spent" in proposal.reason


def test_out_of_gamut_target_is_flagged_and_the_closest_colour_pursued():
    target = parse_target("#00ff00")  # a pure sRGB green; the three dyes cannot mix it
    reader = PlateReaderModel(seed=6)
    history = []
    for _ in range(4):
        proposal = propose(history, target, DYES)
        readings = reader.read_many(proposal.recipes)
        history += [Observation(r, rgb)
                    for r, rgb in zip(proposal.recipes, readings, strict=False)]
    proposal = propose(history, target, DYES)
    assert proposal.out_of_gamut and "outside the dyes' gamut" in proposal.reason
    assert not proposal.done and proposal.recipes
    assert proposal.predicted_de < proposal.best_measured_de + 2.0


def test_out_of_gamut_campaign_ends_without_claiming_success():
    proposal, history, reader = run(parse_target("#00ff00"), seed=6)
    assert not proposal.done and proposal.recipes == [] and proposal.out_of_gamut
    assert proposal.reason.startswith("stopping: closest reachable colour confirmed")
    assert 48 <= len(history) < 96 and proposal.best_replicates >= 3


def test_warm_start_skips_the_exploratory_design():
    _, earlier_campaign, _ = run(colour_of({"red": 60, "yellow": 0, "blue": 80}), seed=7)
    target = colour_of({"red": 20, "yellow": 90, "blue": 30})
    cold = propose([], target, DYES)
    warm = propose([], target, DYES, warm_start=earlier_campaign)
    assert cold.reason.startswith("exploring")
    assert warm.reason.startswith("model's best recipe") and warm.predicted_de < 2.0
    assert warm.best_recipe is None  # earlier campaigns are no evidence for this target


def test_observations_with_foreign_dyes_are_rejected():
    with pytest.raises(ValueError, match="outside this campaign"):
        propose([Observation({"green": 20}, (1, 2, 3))] * 9, parse_target("#808080"), DYES)
