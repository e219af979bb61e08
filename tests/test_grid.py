"""run.py's grids: comma-separated flags and --table expand into cells, each run in its own process, resumable,
with one summary.md and summary.csv."""
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import grid
import run

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the grid and a lone run with the same threads: comparable bits
GRID = ["--defense", "median", "--attack", "none,fang", "--seed", "0,1", "--clients", "6", "--malicious", "2",
        "--rounds", "2", "--jobs", "2"]


def run_py(*argv, **kw):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *argv], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, **kw)


def done(root):
    """{cell: mtime of its results.json} for the cells that finished."""
    return {p.parent.name: p.stat().st_mtime_ns for p in Path(root).glob("*/results.json")}


def strip(results):
    """results.json without what legitimately differs between two runs of one cell: timings and the folder."""
    return {**results, "seconds": 0, "rounds": [{**r, "seconds": 0} for r in results["rounds"]],
            "config": {**results["config"], "out": ""}}


def test_a_grid_runs_each_cell_once_and_an_interrupted_grid_completes_only_the_missing_cells(tmp_path, capsys):
    """Acceptance 1: a 2 x 2 grid (attacks x seeds) gives 4 cell folders, summary.md and a 4-row summary.csv; a
    grid killed mid-way and rerun runs only the cells that had not finished; rerunning a finished grid runs
    nothing."""
    out = tmp_path / "grid"
    process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *GRID, "--out", str(out)], cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not done(out) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the grid and the cells it is running
    process.wait()
    before = done(out)
    assert 1 <= len(before) < 4

    resumed = run_py(*GRID, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"4 cells: {len(before)} already done, 0 invalid, {4 - len(before)} to run" in resumed.stdout
    after = done(out)
    assert len(after) == 4 and all(after[cell] == mtime for cell, mtime in before.items())
    assert len([line for line in resumed.stdout.splitlines() if line.startswith("[")]) == 4 - len(before)

    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}
    assert sorted((r["attack"], r["seed"]) for r in rows) == sorted(
        (a, s) for a in ("none", "fang") for s in ("0", "1"))
    summary = (out / "summary.md").read_text()
    assert "| defense | none | fang | worst case |" in summary and "| median | " in summary and "± " in summary

    assert grid.main(GRID + ["--out", str(out)]) == 0  # nothing left to run: no cell process starts
    assert "4 cells: 4 already done, 0 invalid, 0 to run" in capsys.readouterr().out and done(out) == after


def test_a_failed_cell_is_reported_and_the_others_still_run(tmp_path):
    """Acceptance 2: an invalid combination (LIE with 4 attackers of 6) fails alone: its error is in the summary,
    the other cell runs, and the exit code is non-zero."""
    out = tmp_path / "grid"
    assert grid.main(["--attack", "lie,fang", "--defense", "fedavg", "--clients", "6", "--malicious", "4",
                     "--rounds", "1", "--jobs", "1", "--out", str(out)]) == 1
    assert set(done(out)) == {"attack-fang"}
    summary = (out / "summary.md").read_text()
    assert "Failed cells:" in summary and "`attack-lie`: run.py: error: argument --attack" in summary
    with open(out / "summary.csv") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert rows["attack-lie"]["status"] == "failed" and "--attack" in rows["attack-lie"]["error"]
    assert rows["attack-fang"]["status"] == "done"


def test_a_cell_run_by_the_grid_equals_the_same_cell_run_alone_and_printed_commands_run_the_rest(tmp_path, capsys):
    """Acceptance 3, and --print-commands: one self-contained line per cell still to run; running a printed line
    by hand gives that cell's results, the same as the grid's own run of it (timings aside), and --summarize
    merges it."""
    out = tmp_path / "grid"
    flags = ["--defense", "fedavg", "--attack", "scaling,fang", "--clients", "6", "--malicious", "2", "--rounds", "2"]
    printed = lambda: grid.main(flags + ["--print-commands", "--out", str(out)]) or capsys.readouterr().out.splitlines()
    first = printed()
    assert len(first) == 2 and not done(out)
    command = shlex.split(first[0])
    assert command[:2] == ["python", "run.py"] and command[-2:] == ["--out", str(out / "attack-scaling")]
    assert run_py(*command[2:]).returncode == 0  # the printed line, run as it is
    assert len(printed()) == 1

    grid.main(["--summarize", str(out)])
    assert "| fedavg |" in capsys.readouterr().out and (out / "summary.csv").exists()

    by_hand = json.loads((out / "attack-scaling" / "results.json").read_text())
    assert run_py(*flags, "--jobs", "2", "--out", str(tmp_path / "again")).returncode == 0
    by_grid = json.loads((tmp_path / "again" / "attack-scaling" / "results.json").read_text())
    assert strip(by_grid) == strip(by_hand) and by_grid["final"]["asr"] is not None


@pytest.mark.parametrize("table, cells", [("fedredefense-1", 14), ("fedredefense-2", 80), ("feddefuse-1", 40),
                                          ("feddefuse-2", 32)])
def test_every_paper_table_expands_into_valid_cells(table, cells, tmp_path):
    """--table expands to the paper table's defenses x attacks, each cell a valid run.py command line."""
    _, layout, flags = grid.paper_table(table, "digits")
    expanded = grid.grid_cells(list(flags.items()), str(tmp_path))
    assert len(expanded) == cells and layout in grid.LAYOUTS
    assert all(grid.parse_cell(argv)[1] is None for _, argv in expanded)


def test_a_norm_bound_row_with_the_oracle_m_is_labelled_as_an_oracle():
    """--table fedredefense-2 runs Norm bound with FedREDefense's M, the mean norm of the truly benign updates: its
    summary row says so, and a Norm bound row with a median or fixed M does not."""
    final = {"tacc": 0.5, "asr": None}
    runs = [{"config": {"defense": "normbound", "attack": "none", "norm_bound": m}, "final": final}
            for m in ("oracle", "median")]
    assert grid.summary_table(runs[:1], ["tacc"], "tacc")[2].startswith("| normbound (oracle M) | ")
    assert grid.summary_table(runs[1:], ["tacc"], "tacc")[2].startswith("| normbound | ")


def test_a_table_passes_a_flag_only_to_the_cells_that_read_it_and_finished_cells_made_with_it_stay_done(tmp_path):
    """FedREDefense Table 2's --root-size 500 and --norm-bound oracle reach only FLTrust's and Norm bound's cells
    (run.py refuses a flag its run does not read); a cell whose results.json records such a flag that it does not
    read (made before a grid passed them to the cells that read them alone) is the same run, so it stays done."""
    _, _, flags = grid.paper_table("fedredefense-2", "digits")
    cells = dict(grid.grid_cells(list(flags.items()), str(tmp_path)))
    has = lambda cell, flag: flag in cells[f"defense-{cell}_attack-fang"]
    assert has("fltrust", "--root-size") and not any(has(d, "--root-size") for d in ("median", "normbound"))
    assert has("normbound", "--norm-bound") and not any(has(d, "--norm-bound") for d in ("fltrust", "fedredefense"))
    config = grid.parse_cell(cells["defense-median_attack-fang"])[0]
    assert run.same_run({**config, "root_size": 500, "norm_bound": "oracle"}, config)
    fltrust = grid.parse_cell(cells["defense-fltrust_attack-fang"])[0]
    assert fltrust["root_size"] == 500 and not run.same_run({**fltrust, "root_size": 100}, fltrust)
    _, _, flags = grid.paper_table("feddefuse-2", "digits")
    cells = grid.grid_cells(list(flags.items()), str(tmp_path))
    assert all(("--attack-rounds" in argv) == ("II" in argv) for _, argv in cells)
