"""results.png (run.plot): labelled axes, whole rounds, FedREDefense's gamma, and n/a where a metric does not exist."""
import pytest

import fedredefense
import run


ERRORS = {"fedredefense": {"0": 0.1, "1": 0.3, "2": 2.0}, "feddefuse": {"0": 0.4, "1": 0.5, "2": 0.9}, "median": None}


def results(defense):
    """Three rounds of a digits run whose client 2 attacks: the fields run.plot reads. Median labels no client."""
    rate = lambda v: None if defense == "median" else v
    rounds = [{"round": t, "attacking": [2], "errors": ERRORS[defense], "tacc": 0.1 * t, "asr": None,
               "dacc": rate(1.0), "mr": rate(0.0)} for t in (1, 2, 3)]
    return {"config": {"dataset": "digits", "defense": defense, "attack": "fang", "pattern": "I"}, "rounds": rounds}


@pytest.fixture(scope="module")
def axes(tmp_path_factory):
    """{defense: its four panels (global model, errors, DACC, MR)}, each figure drawn once into a PNG."""
    out = {}
    for defense in ERRORS:
        path = tmp_path_factory.mktemp(defense) / "results.png"
        out[defense] = run.plot(results(defense), path).axes
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return out


def dashed(ax):
    return [line for line in ax.get_lines() if line.get_linestyle() == "--"]


@pytest.mark.parametrize("defense", ERRORS)
def test_every_panel_has_labelled_axes_whole_rounds_and_room_around_0_and_100(axes, defense):
    assert len(axes[defense]) == 4
    for ax in axes[defense]:
        assert ax.get_title() and ax.get_xlabel() == "round" and ax.get_ylabel()
        assert all(float(x).is_integer() for x in ax.get_xticks())
    for ax in (axes[defense][0], *axes[defense][2:]):  # percent panels: a line at 0 or 100 stays inside the frame
        low, high = ax.get_ylim()
        assert low < 0 and high > 100
    assert "ADACC" in axes[defense][2].get_title()  # its mean is what the console calls ADACC


def test_fedredefense_error_panel_draws_gamma(axes):
    err = axes["fedredefense"][1]
    gamma = fedredefense.HYPER["digits"].gamma
    [line] = dashed(err)
    assert list(line.get_ydata()) == [gamma, gamma] and "γ" in line.get_label()
    assert "Reconstruction error" in err.get_title() and err.get_yscale() == "log" and not err.texts


def test_feddefuse_error_panel_is_recoverability_without_a_threshold(axes):
    err = axes["feddefuse"][1]
    assert "Recoverability R" in err.get_title() and err.get_ylabel() == "R" and not dashed(err)


def test_median_says_n_a_where_it_computes_nothing(axes):
    acc, err, *labels = axes["median"]
    assert [t.get_text() for t in err.texts] == ["n/a: median reconstructs no updates"]
    for ax in labels:
        assert [t.get_text() for t in ax.texts] == ["n/a: median does not label clients"] and not ax.get_lines()
    assert not acc.texts and acc.get_lines()  # TACC exists for every rule
