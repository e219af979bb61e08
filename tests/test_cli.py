"""The command lines of run.py, grid.py, feddefuse.py and bench.py: a bad flag, path or file is one line on stderr
and exit code 2, with nothing written; Ctrl-C stops a run or a grid in one line, exit code 130, and nothing
unfinished counts as done; --summarize reads finished runs and grids only. (fedredefense.py has no command line.)"""
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench
import feddefuse
import fl
import grid
import run

ROOT = Path(__file__).resolve().parents[1]
TINY = "--clients 6 --malicious 2 --rounds 2 --attack none"  # the finished run in ``files``, with --defense median


def fake_plot(results, path):
    open(path, "wb").close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """What the bad inputs point to: a plain file, a folder that cannot be written to (None where this user can
    write anywhere), a finished run, an unfinished one (its checkpoint only), a damaged checkpoint, an empty file,
    a replay file and a torch file that is none."""
    base = tmp_path_factory.mktemp("cli")
    (base / "file.txt").write_text("not a folder\n")
    (base / "empty.json").touch()
    read_only = base / "read-only"
    read_only.mkdir(mode=0o555)
    ro = next((str(p) for p in (read_only, "/proc/sys") if os.path.isdir(p) and not os.access(p, os.W_OK)), None)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(run, "plot", fake_plot)
        run.main(shlex.split(TINY) + ["--defense", "median", "--out", str(base / "run")])
    (base / "unfinished").mkdir()
    shutil.copy(base / "run" / run.CHECKPOINT, base / "unfinished")
    (base / "damaged").mkdir()
    (base / "damaged" / run.CHECKPOINT).write_bytes(b"half a checkpoint")
    torch.save([{"coeffs": torch.zeros(3, 4), "hyper": {}}], base / "replay.pt")
    torch.save([1, 2], base / "list.pt")
    return {"base": str(base), "file": str(base / "file.txt"), "empty": str(base / "empty.json"), "ro": ro,
            "run": str(base / "run"), "unfinished": str(base / "unfinished"), "damaged": str(base / "damaged"),
            "replay": str(base / "replay.pt"), "list": str(base / "list.pt"), "missing": str(base / "missing"),
            "tiny": TINY}


def snapshot(*roots):
    """Every path under ``roots`` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in Path(root).rglob("*")}


# python run.py: grid.main for a grid or --summarize (run.py hands them over), run.main for one run
MAINS = {"run.py": grid.main, "feddefuse.py": feddefuse.main, "bench.py": bench.main}
BAD = [("run.py", argv, named) for argv, named in [
    # every flag: a wrong type, a value out of range, a combination that does not hold
    ("--dataset svhn", "--dataset"), ("--data-dir {file}", "--data-dir"),
    ("--dataset mnist --download --data-dir {ro}/data", "--data-dir"), ("--download=yes", "--download"),
    ("--defense bulyan", "--defense"), ("--attack krum", "--attack"),
    ("--attack lie --malicious 15 --participants 10", "--attack"), ("--scale huge", "--scale"),
    ("--scale paper", "--scale"), ("--clients 1", "--clients"), ("--clients 2000", "--clients"),
    ("--clients x", "--clients"), ("--malicious 25", "--malicious"), ("--malicious -1", "--malicious"),
    ("--assumed-malicious -1", "--assumed-malicious"), ("--assumed-malicious 30", "--assumed-malicious"),
    ("--norm-bound mean", "--norm-bound"), ("--norm-bound -1", "--norm-bound"), ("--norm-bound inf", "--norm-bound"),
    ("--aggregate median", "--aggregate"), ("--root-size 0", "--root-size"), ("--rounds 0", "--rounds"),
    ("--rounds two", "--rounds"), ("--train-size 0", "--train-size"), ("--train-size 2000", "--train-size"),
    ("--train-size 9 --clients 2", "--train-size"), ("--train-size 1340", "--train-size"),
    ("--beta 0", "--beta"), ("--beta -1", "--beta"), ("--beta nan", "--beta"),
    ("--participation 1.5", "--participation"), ("--participation 0", "--participation"),
    ("--participation 0.5 --participants 10", "--participation"), ("--participants 0", "--participants"),
    ("--participants 26", "--participants"), ("--protocol fedavg", "--protocol"),
    ("--sampling random", "--sampling"), ("--knowledge none", "--knowledge"), ("--model resnet", "--model"),
    ("--fedredefense-settings table7", "--fedredefense-settings"),
    ("--fedredefense-settings official", "--fedredefense-settings"),  # digits: no script of the authors'
    ("--dataset mnist --fedredefense-settings official", "--fedredefense-settings"),
    ("--max-malicious-share 2", "--max-malicious-share"), ("--max-malicious-share inf", "--max-malicious-share"),
    ("--pattern IV", "--pattern"), ("--attack-rounds -1", "--attack-rounds"), ("--attack-prob -0.1", "--attack-prob"),
    ("--attack-prob 1.5", "--attack-prob"), ("--signflip-k -2", "--signflip-k"),
    ("--attack signflip --signflip-k inf", "--signflip-k"), ("--signflip-k 0", "--signflip-k"),
    ("--seed -1", "--seed"), ("--seed 4294967296", "--seed"), ("--seed 0.5", "--seed"), ("--device tpu", "--device"),
    ("--save-replay=1", "--save-replay"), ("--overwrite=1", "--overwrite"), ("--no-such-flag", "--no-such-flag"),
    # a flag the run does not read (run.READ_BY): refused, in a grid where no cell reads it
    ("--defense median --root-size 500", "--defense fltrust reads it"), ("--save-replay", "--defense feddefuse"),
    ("--attack-rounds 5", "--pattern II"), ("--defense krum --norm-bound 3", "--norm-bound"),
    ("--aggregate normbound --defense fedavg", "--aggregate"), ("--max-malicious-share 0.5", "--sampling capped"),
    ("--defense median,krum --root-size 500", "no cell of this grid"),
    ("--jo 2", "--jo"),
    # --out: a file, inside a file, not writable, no name; another run's results; more rounds than asked
    ("--out {file}", "--out"), ("--out {file}/run", "--out"), ("--out {ro}/run", "--out"), ("--out ''", "--out"),
    ("--out {damaged}", "checkpoint.pt"), ("--out {run} {tiny} --defense krum", "--overwrite"),
    ("--out {run} {tiny} --defense median --rounds 1", "--rounds"),
    # --resume: no checkpoint, a damaged one, other flags, fewer rounds than done
    ("--resume {missing}", "--resume"), ("--resume {file}", "--resume"), ("--resume {damaged}", "checkpoint.pt"),
    ("--resume {run} --defense krum", "--resume"), ("--resume {run} --rounds 1", "--rounds"),
    # --summarize: nothing finished among the paths, other flags
    ("--summarize {missing}", "does not exist"), ("--summarize /dev/null", "/dev/null"),
    ("--summarize {empty}", "empty.json"), ("--summarize {unfinished}", "unfinished run"),
    ("--summarize {file} {missing}", "does not exist"), ("--summarize {run} --rounds 3", "--summarize"),
    # grids: their own flags, a single run given them, a grid none of whose cells can run, a file as --out
    ("--table fedredefense-9", "--table"), ("--table feddefuse-1 --dataset digits,mnist", "--table"),
    ("--seed 0,1 --jobs 0", "--jobs"), ("--seed 0,1 --jobs x", "--jobs"), ("--jobs 2", "--jobs"),
    ("--print-commands", "--print-commands"), ("--seed 0,1 --clients 1", "--clients"),
    ("--seed 0,1 --out {file}", "--out"),
]] + [("feddefuse.py", argv, named) for argv, named in [
    ("", "command"), ("compare {replay}", "compare"), ("replay", "files"), ("replay {missing}", "missing"),
    ("replay {base}", "no such file"), ("diagnose {empty}", "empty.json"), ("replay {run}/checkpoint.pt", "checkpoint"),
    ("replay {run}/results.json", "results.json"), ("replay {list}", "list.pt"),
    ("replay {replay} --alpha 2", "--alpha"), ("replay {replay} --alpha x", "--alpha"),
    ("replay {replay} --n-representatives -1", "--n-representatives"),
    ("replay {replay} --dbscan-eps 0", "--dbscan-eps"), ("replay {replay} --dbscan-eps nan", "--dbscan-eps"),
    ("replay {replay} --dbscan-min-samples 0", "--dbscan-min-samples"), ("replay {replay} --rule max", "--rule"),
]] + [("bench.py", "tpu", "device"), ("bench.py", "cpu cuda", "unrecognized")] + (
    # --out under a parent that cannot hold a folder, whoever runs it (root too): refused before round 1
    [("run.py", "--out /proc/nope/x", "cannot create"), ("run.py", "--seed 0,1 --out /proc/nope/x", "cannot create")]
    if os.path.isdir("/proc/self") else []) + (
    [] if torch.cuda.is_available() else [("run.py", "--device cuda", "--device"), ("bench.py", "cuda", "CUDA")])


@pytest.mark.parametrize("prog, argv, named", BAD)
def test_bad_input_is_one_line_exit_code_2_and_nothing_written(prog, argv, named, files, tmp_path, monkeypatch,
                                                               capsys):
    if "{ro}" in argv and files["ro"] is None:
        pytest.skip("this user can write to every folder")
    argv = shlex.split(argv.format(**files))
    monkeypatch.chdir(tmp_path)  # where the default --out, runs/..., would go
    before = snapshot(tmp_path, files["base"])
    with pytest.raises(SystemExit) as exit_:
        MAINS[prog](argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and named in err, err
    assert snapshot(tmp_path, files["base"]) == before, "nothing is written"


def test_help_is_not_an_error(capsys):
    for main in MAINS.values():
        with pytest.raises(SystemExit) as exit_:
            main(["--help"])
        assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


def test_the_default_out_names_every_setting_given_but_where_the_data_is():
    out = lambda argv: run.parse_args(shlex.split(argv)).out
    assert out("") == os.path.join("runs", "digits-fedredefense-fang-I-s0")
    assert out("--data-dir elsewhere --download") == out("")
    assert out("--defense median --rounds 5 --clients 10") == os.path.join(
        "runs", "digits-median-fang-I-s0_clients-10_rounds-5")
    assert len({out(""), out("--clients 10"), out("--rounds 5"), out("--beta 0.5")}) == 4


def test_a_run_in_the_folder_of_its_main_settings_alone_is_found_there(files, tmp_path, monkeypatch):
    """Runs started while the default --out named the main settings alone (runs/digits-median-none-I-s0 for TINY)
    are where the same command, with more rounds too, continues; another run there, or this run already under the
    full name, is not."""
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "runs" / "digits-median-none-I-s0"
    shutil.copytree(files["run"], old)
    out = lambda argv: run.parse_args(shlex.split(f"{TINY} --defense median {argv}")).out
    assert out("") == out("--rounds 3") == os.path.join("runs", "digits-median-none-I-s0")
    full = os.path.join("runs", "digits-median-none-I-s0_clients-8_malicious-2_rounds-2")
    assert out("--clients 8") == full
    shutil.copytree(files["run"], tmp_path / "runs" / "digits-median-none-I-s0_clients-6_malicious-2_rounds-2")
    assert out("") == os.path.join("runs", "digits-median-none-I-s0_clients-6_malicious-2_rounds-2")


def test_summarize_reads_finished_runs_and_grids_only_and_writes_into_grids_only(files, tmp_path, capsys):
    """``--summarize runs/*`` over a finished run, a grid, an unfinished run and a stray file: the run's row and
    the grid's summary are printed, the other two named on stderr, and only the grid's folder is written to."""
    runs = tmp_path / "runs"
    shutil.copytree(files["run"], runs / "run")
    shutil.copytree(files["run"], runs / "grid" / "cell")
    shutil.copytree(files["unfinished"], runs / "unfinished")
    (runs / "notes.txt").write_text("a note\n")
    before = snapshot(runs / "run", runs / "unfinished")
    assert grid.main(["--summarize", *map(str, sorted(runs.iterdir()))]) is None
    out, err = capsys.readouterr()
    assert "| digits | median | none | I |" in out and "# grid" in out and "| median | " in out
    assert err.count("\n") == 2 and "skipped" in err and "notes.txt" in err and "unfinished run" in err
    assert sorted(os.listdir(runs / "grid")) == ["cell", "summary.csv", "summary.md"]
    assert snapshot(runs / "run", runs / "unfinished") == before


def test_a_run_interrupted_while_plotting_is_not_done_until_rerun(files, tmp_path, monkeypatch, capsys):
    """results.json is written last: a run stopped while writing results.png has no results.json, a grid does not
    count it done, and the same command finishes it from its checkpoint."""
    argv = shlex.split(TINY) + ["--defense", "median", "--out", str(tmp_path / "run")]
    config = run.config_of(run.parse_args(argv))
    def interrupted(results, path):
        raise KeyboardInterrupt
    monkeypatch.setattr(run, "plot", interrupted)
    with pytest.raises(SystemExit) as exit_:
        run.main(argv)
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "run.py: interrupted after round 2 of 2; rerun the same command to resume\n"
    assert sorted(os.listdir(tmp_path / "run")) == [run.CHECKPOINT] and not grid.is_complete(str(tmp_path / "run"),
                                                                                            config)
    monkeypatch.setattr(run, "plot", fake_plot)
    run.main(argv)
    assert "resuming" in capsys.readouterr().out and grid.is_complete(str(tmp_path / "run"), config)
    os.remove(tmp_path / "run" / "results.png")
    assert not grid.is_complete(str(tmp_path / "run"), config), "a promised file is missing"


def interrupt_once(argv, progress):
    """Start ``python run.py argv`` in its own process group, and once ``progress()`` holds round 1's line send
    SIGINT to the whole group, as a terminal's Ctrl-C does. Returns (exit code, stdout, stderr)."""
    process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *argv], cwd=ROOT, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    while "round   1/" not in progress(process) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


def test_ctrl_c_stops_a_run_in_one_line_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["--clients", "6", "--malicious", "2", "--rounds", "4", "--defense", "median", "--out", str(out)]
    code, _, err = interrupt_once(argv, lambda process: process.stdout.readline())
    assert code == 130 and err.count("\n") == 1, err
    done = len(run.load_checkpoint(str(out), "cpu")["rounds"])
    assert err == f"run.py: interrupted after round {done} of 4; rerun the same command to resume\n"
    assert not (out / "results.json").exists()
    monkeypatch.setattr(run, "plot", fake_plot)
    run.main(argv)
    assert f"resuming {out} after round {done}" in capsys.readouterr().out and (out / "results.json").exists()


def test_ctrl_c_stops_a_grid_starts_no_other_cell_and_writes_the_summary(tmp_path):
    """One worker, two cells: Ctrl-C once the first cell has finished round 1 stops it (its checkpoint kept, not
    done) and never starts the second; the grid writes its summary and exits 130 in one line."""
    root = tmp_path / "grid"
    log = root / "attack-none" / "log.txt"
    argv = ["--defense", "median", "--attack", "none,fang", "--clients", "6", "--malicious", "2", "--rounds", "30",
            "--jobs", "1", "--out", str(root)]
    code, out, err = interrupt_once(argv, lambda process: log.read_text() if log.exists() else "")
    assert code == 130 and err.count("\n") == 1, err
    assert err.startswith("run.py: interrupted after 0 of the 2 cells to run: 1 stopped, 1 not started; wrote ")
    assert "Traceback" not in out + err + log.read_text()
    assert log.read_text().splitlines()[-1].startswith("run.py: interrupted after round ")
    assert sorted(os.listdir(root)) == ["attack-none", "grid.json", "summary.csv", "summary.md"]
    assert sorted(os.listdir(root / "attack-none")) == [run.CHECKPOINT, "log.txt"]


def loaded(pid, library):
    """Whether the process ``pid`` has mapped ``library`` into its memory (Linux's /proc/PID/maps)."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="watches the process load torch in /proc/PID/maps")
@pytest.mark.parametrize("prog, argv, says", [
    ("run.py", ["--rounds", "1", "--out", "run"], "run.py"),
    ("run.py", ["--seed", "0,1", "--rounds", "1", "--out", "grid"], "run.py"),  # grid.py by then, the same process
    ("bench.py", [], "bench.py"),
    ("feddefuse.py", ["diagnose", "replay.pt"], "feddefuse.py"),
])
def test_ctrl_c_while_torch_loads_is_one_line_exit_code_130_and_nothing_written(prog, argv, says, tmp_path):
    """Ctrl-C in a command's first seconds, while it loads torch: "PROG: interrupted" on stderr, exit code 130."""
    process = subprocess.Popen([sys.executable, str(ROOT / prog), *argv], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not loaded(process.pid, "libtorch") and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert (process.returncode, out, err) == (130, "", f"{says}: interrupted\n")
    assert os.listdir(tmp_path) == []


def test_a_second_ctrl_c_while_a_grid_stops_kills_its_cells_and_still_writes_the_summary(tmp_path):
    """Ctrl-C to the grid alone (its cell does not get it, so the grid waits 3 s before passing it on), then a second
    one while it waits: the cell is killed at once (its log ends without its own interrupted line, its checkpoint
    kept), and the grid still writes the summary and exits 130 in one line."""
    root = tmp_path / "grid"
    log = root / "attack-none" / "log.txt"
    argv = ["--defense", "median", "--attack", "none,fang", "--clients", "6", "--malicious", "2", "--rounds", "30",
            "--jobs", "1", "--out", str(root)]
    process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *argv], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    while "round   1/" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err.count("\n") == 1, err
    assert err.startswith("run.py: interrupted after 0 of the 2 cells to run: 1 stopped, 1 not started; wrote ")
    assert "interrupted" not in log.read_text() and "Traceback" not in out + err + log.read_text()
    assert sorted(os.listdir(root)) == ["attack-none", "grid.json", "summary.csv", "summary.md"]
    assert sorted(os.listdir(root / "attack-none")) == [run.CHECKPOINT, "log.txt"]


def test_a_bare_ctrl_c_says_interrupted(capsys):
    """A Ctrl-C that no command turned into its own message is "PROG: interrupted", never an empty "PROG: "."""
    with pytest.raises(SystemExit) as exit_:
        with fl.command_line("prog.py"):
            raise KeyboardInterrupt
    assert exit_.value.code == 130 and capsys.readouterr().err == "prog.py: interrupted\n"
