"""RESULTS.md's figures (grid.write_figures): the eps replay is the live gate, and every figure is drawn."""
import copy
import json

import numpy as np
import pytest
import torch

import feddefuse
import fl
import grid
import run

FEDDEFUSE = ["--protocol", "feddefuse", "--participants", "10", "--max-malicious-share", "0.6", "--rounds", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-round digits runs: FedDefuse attack-free and under Gaussian and sign-flip (its own threat model), and
    FedREDefense and FedAvg under MPAF with FedREDefense's caps cut to 30 (its own threat model)."""
    out = {}
    for attack in ("none", "gaussian", "signflip"):
        argv = FEDDEFUSE + ["--defense", "feddefuse", "--attack", attack]
        out["feddefuse", attack] = run.run(run.parse_args(argv + ["--out", str(tmp_path_factory.mktemp(attack))]))
    with pytest.MonkeyPatch.context() as m:
        m.setitem(run.fedredefense.HYPER, "digits", run.fedredefense.Hyper(1e-1, 5e-2, 2e-1, 1e-3, 30, 30))
        for defense in ("fedredefense", "fedavg"):
            argv = ["--defense", defense, "--attack", "mpaf", "--clients", "8", "--rounds", "2"]
            out[defense, "mpaf"] = run.run(run.parse_args(argv + ["--out", str(tmp_path_factory.mktemp(defense))]))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_the_closed_form_gate_is_dbscans(seed):
    """``is_uniform_at`` on ``gate_gaps`` against scikit-learn's DBSCAN (``feddefuse.dbscan_labels``), on d_b of a
    benign bulk and a few far or near outliers, at eps values just either side of every gap (at a gap itself the
    two round the distance differently)."""
    g = torch.Generator().manual_seed(seed)
    d_b = torch.cat([1 + torch.rand(7, generator=g), (1 + 5 * torch.rand(1, generator=g)) * torch.rand(3, generator=g)])
    gaps = grid.gate_gaps(d_b.tolist())
    for eps in np.concatenate([gaps + 1e-9, gaps - 1e-9, [0.01, 0.5, 3.0]]):
        dbscan = feddefuse.is_uniformly_benign(feddefuse.dbscan_labels(d_b, float(eps), 2))
        assert grid.is_uniform_at(gaps, eps) == dbscan, (d_b, eps)


@pytest.mark.xdist_group("figure-runs")  # one worker computes the runs once
@pytest.mark.parametrize("attack", ["none", "gaussian", "signflip"])
def test_the_replay_at_the_runs_own_eps_gives_its_live_decisions(runs, attack):
    r = runs["feddefuse", attack]
    replayed = grid.gate_rounds(r)
    assert len(replayed) == len(r["rounds"])
    for (gaps, attacking, choice, _), x in zip(replayed, r["rounds"]):
        clients = [int(c) for c in x["details"]["d_b"]]
        accepted = grid.gate_at(gaps, choice, feddefuse.HYPER["digits"].dbscan_eps)
        assert sorted(c for c, a in zip(clients, accepted) if a) == sorted(x["accepted"])
        assert grid.is_uniform_at(gaps, feddefuse.HYPER["digits"].dbscan_eps) == x["details"]["uniform"]
        assert [c in x["attacking"] for c in clients] == attacking.tolist()


@pytest.mark.xdist_group("figure-runs")
def test_every_figure_is_drawn_from_its_runs(runs, tmp_path, capsys):
    grid.write_figures(list(runs.values()), str(tmp_path))
    names = {"tacc-digits-feddefuse.png", "gate-digits-feddefuse.png", "eps-digits-feddefuse.png",
             "tacc-digits-fedredefense.png", "errors-digits-fedredefense.png"}
    assert {p.name for p in tmp_path.iterdir()} == names
    assert all((tmp_path / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    assert capsys.readouterr().out.count(".png") == len(names)


@pytest.mark.xdist_group("figure-runs")
@pytest.mark.parametrize("key, value", [("model", "mlp"), ("knowledge", "full"), ("clients", 9), ("rounds", 3)])
def test_runs_of_two_settings_are_refused_before_anything_is_written(runs, tmp_path, capsys, key, value):
    """One figure averages its runs over the seeds, so runs of one dataset and protocol but another model,
    knowledge or scale would be averaged with them: ``--summarize ... --figures`` refuses them in one line before
    it prints a table or writes a figure."""
    other = copy.deepcopy(runs["fedredefense", "mpaf"])
    other["config"][key] = value
    folders = []
    for name, r in (("one", runs["fedredefense", "mpaf"]), ("other", other)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
        folders.append(str(tmp_path / name))
    with pytest.raises(fl.UserError, match=r"^argument --figures: the digits runs under the fedredefense protocol "
                                           r"differ \(.*; .*\)"):
        grid.summarize(folders, str(tmp_path / "figures"))
    assert not (tmp_path / "figures").exists() and capsys.readouterr().out == ""
    grid.summarize(folders[:1], str(tmp_path / "figures"))  # one setting: drawn
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"tacc-digits-fedredefense.png",
                                                                  "errors-digits-fedredefense.png"}


@pytest.mark.xdist_group("figure-runs")
def test_the_errors_figure_puts_each_clients_first_error_on_its_side_of_gamma(runs):
    fig = grid.figure_errors([runs["fedredefense", "mpaf"]], "t")
    [ax] = fig.axes
    genuine, attacking = ([y for _, y in c.get_offsets()] for c in ax.collections)
    first = grid.first_errors(runs["fedredefense", "mpaf"])
    assert sorted(genuine) == sorted(e for e, a in first.values() if not a)
    assert sorted(attacking) == sorted(e for e, a in first.values() if a) and min(attacking) > 0.6


def test_the_stage_table_on_a_hand_made_record():
    """Two recorded rounds: in round 1 the gate keeps everyone (gaps ~0.1) though KMeans would drop attacker 3,
    whom the split put in Delta_b; in round 2 the gate opens and KMeans keeps the two genuine updates. So a perfect
    gate gives MR 0, and 1 of the 3 attacking updates was in Delta_b."""
    def record(attacking, d_b, phi, kmeans, delta_b):
        return {"attacking": attacking, "details": {"d_b": dict(zip("0123", d_b)), "phi": dict(zip("0123", phi)),
                                                    "kmeans": kmeans, "delta_b": delta_b, "uniform": kmeans is None}}
    rounds = [record([3], [1.0, 1.1, 1.2, 1.3], [1.0, 1.0, 1.0, -1.0], None, [0, 1, 3]),
              record([2, 3], [1.0, 1.0, 5.0, 5.0], [1.0, 1.0, -1.0, -1.0], [0, 1], [0, 1])]
    r = {"config": {"dataset": "digits", "attack": "fang"}, "final": {"mr": 0.125}, "rounds": rounds}
    assert grid.gate_table([r])[2:] == ["| fang | 12.5 | 0.0 | - | 33.3 |"]
