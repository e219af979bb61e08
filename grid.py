"""Grids, the paper tables and the summaries: everything around many runs of ``run.py``.

    python run.py --defense fedavg,krum --attack fang,lie --seed 0,1,2 --jobs 2 --out runs/t2   # a grid
    python run.py --table feddefuse-1 --jobs 2                                               # a paper's table
    python run.py --summarize runs/*                                                         # earlier runs

Any flag of ``run.py`` given comma-separated values is an axis; every combination is a *cell*, one ``python
run.py`` process in its own folder under ``--out``, ``--jobs`` at a time. A cell is done when its results.json
(written last) holds its configuration, so rerunning a grid runs only what is missing. ``summary.md`` holds the
table in the paper's layout, ``summary.csv`` one row per cell.

This module sits above ``run.py``: it reads a cell's settings with ``run.parse_args`` and prints a run the way
``run.py`` does (``run.format_final``, ``run.threat_model``); ``run.py`` never imports it. ``python run.py`` with a
grid's command line or --summarize (``run.for_grid``) becomes ``python grid.py`` with the same arguments.
"""
import csv
import itertools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

try:  # Ctrl-C while torch loads (seconds): one line, as everywhere else
    import numpy as np
    import torch

    import feddefuse
    import fedredefense
    import fl
    import run
except KeyboardInterrupt:
    if __name__ != "__main__":  # imported: the importer says it
        raise
    sys.stderr.write("run.py: interrupted\n")
    sys.exit(130)

# -----------------------------------------------------------------------------------------------------------------
# Grids: a whole table in one command, each cell one `python run.py` in its own process
# -----------------------------------------------------------------------------------------------------------------

# What a summary cell shows, per layout: FedREDefense Table 2 (TACC, /ASR), FedDefuse Tables 1 and 3
# (TACC / DACC / MR, /ASR; DACC is the per-round ADACC), FedREDefense Table 1 (DACC / FPR / FNR, AAR).
LAYOUTS = {"tacc": ("tacc",), "feddefuse": ("tacc", "adacc", "mr"), "detection": ("dacc", "fpr", "fnr", "aar")}
LABELS = {"tacc": "TACC", "adacc": "DACC", "mr": "MR", "dacc": "DACC", "fpr": "FPR", "fnr": "FNR", "aar": "AAR"}


def paper_table(name, dataset, scale="laptop"):
    """``--table NAME``: (title, layout, {flag: [values]}), the paper table's defenses x attacks with its settings,
    scaled to ``dataset`` and ``scale``. At paper scale FedDefuse samples 20 of 100 clients a round and pattern II
    attacks the first 50 of 500 rounds. On digits (25 clients, 40 rounds) and at laptop and small scale (25 clients
    for 100 rounds, 20 for 50 under FedDefuse's protocol) it samples 10 a round, which keeps its attacking share (A =
    6 of 10: 3-6 attackers, 45% on average, of the 6-7 malicious clients there are; 20 participants would hold all
    of them, 30%), and pattern II attacks the first 10 rounds (as RESULTS.md's FedDefuse tables)."""
    small = dataset == "digits" or scale != "paper"
    feddefuse = {"--protocol": ["feddefuse"], "--participants": ["10" if small else "20"],
                 "--max-malicious-share": ["0.6"]}
    fedredefense_attacks = ["none", "fang", "lie", "minmax", "minsum", "mpaf", "scaling", "dba"]
    feddefuse_attacks = ["gaussian", "signflip", "fang", "scaling"]
    tables = {
        "fedredefense-1": ("FedREDefense Table 1: DACC / FPR / FNR and AAR of the defenses that label clients",
                           "detection", {"--protocol": ["fedredefense"], "--defense": ["fldetector", "fedredefense"],
                                         "--attack": fedredefense_attacks[1:]}),
        "fedredefense-2": ("FedREDefense Table 2: TACC (/ASR) of every defense it compares (LIE added)", "tacc",
                           {"--protocol": ["fedredefense"], "--norm-bound": ["oracle"], "--root-size": ["500"],
                            "--defense": ["fedavg", "krum", "median", "trmean", "normbound", "flame", "fltrust",
                                          "fldetector", "flcert", "fedredefense"],
                            "--attack": fedredefense_attacks}),
        "feddefuse-1": ("FedDefuse Tables 1 and 3: TACC / DACC / MR (/ASR), pattern I", "feddefuse",
                        {**feddefuse, "--defense": ["fedavg", "rfa", "krum", "median", "auror", "foolsgold",
                                                    "feddmc", "fedcpa", "freqfed", "feddefuse"],
                         "--attack": feddefuse_attacks}),
        "feddefuse-2": ("FedDefuse Table 2: TACC (/ASR) under attack patterns II and III", "tacc",
                        {**feddefuse, "--pattern": ["II", "III"], "--attack-rounds": ["10" if small else "50"],
                         "--defense": ["fedavg", "oracle", "fedredefense", "feddefuse"],
                         "--attack": feddefuse_attacks}),
    }
    return tables.get(name)


def grid_cells(axes, root):
    """Every combination of the axes' values: [(name, argv)], the name made of the values that vary, the argv
    without the flags the cell's run does not read (``read_flags_only``)."""
    cells = []
    for combo in itertools.product(*(values for _, values in axes)):
        varying = [f"{flag[2:]}-{value}" for (flag, values), value in zip(axes, combo) if len(values) > 1]
        name = "_".join(varying) or "cell"
        argv = [token for (flag, _), value in zip(axes, combo) for token in ([flag] if value is None else
                                                                           [flag, value])]
        cells.append((name, read_flags_only(argv + ["--out", os.path.join(root, name)])))
    return cells


def read_flags_only(argv):
    """A cell's command line without the flags its run does not read (``run.READ_BY``), which ``run.py`` would
    refuse: a table's --root-size 500 reaches its FLTrust cells alone. An invalid cell's stays whole, for its
    error."""
    try:
        unread = {f"--{key.replace('_', '-')}" for key in run.unread(vars(run.parse_args(argv, refuse_unread=False)))}
    except fl.UserError:
        return argv
    kept, i = [], 0
    while i < len(argv):
        width = 1 if argv[i] in run.SWITCHES else 2  # a switch, or a flag and its value
        if argv[i] not in unread:
            kept += argv[i:i + width]
        i += width
    return kept


def parse_cell(argv):
    """(config, None) for a valid cell, (None, its one-line error) for an invalid one."""
    try:
        return run.config_of(run.parse_args(argv)), None
    except fl.UserError as e:
        return None, str(e)


def is_complete(out, config):
    """A cell is done when its results.json (written last, atomically) holds this run to this config's rounds, and
    the other files it promises are there."""
    found = run.results_config(out)
    promised = ["results.png"] + (["replay.pt"] if config["save_replay"] and config["defense"] == "feddefuse" else [])
    return (found is not None and run.same_run(found, config) and found["rounds"] == config["rounds"] and
            all(os.path.exists(os.path.join(out, name)) for name in promised))


def start_cell(argv, out, env):
    """One cell as its own ``python run.py`` process, its output in ``out/log.txt`` (its last error cleared)."""
    os.makedirs(out, exist_ok=True)
    record_error(out, None)
    with open(os.path.join(out, "log.txt"), "w") as log:
        return subprocess.Popen([sys.executable, os.path.abspath(run.__file__), *argv], stdout=log,
                                stderr=subprocess.STDOUT, env=env)


def cell_error(process, out):
    """A finished cell's error, its exit code and the last line of its log; None if it succeeded."""
    if process.returncode == 0:
        return None
    with open(os.path.join(out, "log.txt")) as log:
        lines = [line.strip() for line in log if line.strip()]
    return f"exit code {process.returncode}: {lines[-1] if lines else 'no output'}"


def record_error(out, error):
    """Write (or, for ``None``, clear) a cell's error.txt, which the summary reads."""
    path = os.path.join(out, "error.txt")
    if error is None:
        if os.path.exists(path):
            os.remove(path)
        return
    fl.write_text(path, error + "\n")


def stop(processes):
    """Stop the running cells after a Ctrl-C; each keeps its checkpoint. A terminal's Ctrl-C reached them too, and
    one that has not stopped within 3 s gets its own. A second Ctrl-C stops them at once (SIGKILL: a checkpoint is
    written atomically), and from then on Ctrl-C is ignored, until the caller restores it."""
    try:
        for process in processes:
            try:
                process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGINT)
                process.wait()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for process in processes:
            process.kill()
            process.wait()


def run_grid(argv):
    """Expand comma-separated values (and ``--table``) into cells, run the missing ones ``--jobs`` at a time, and
    write ``summary.md`` and ``summary.csv`` under ``--out``. Exit code 1 if any cell failed. Ctrl-C stops the
    running cells (they keep their checkpoints; ``stop``) and starts no other, then writes the summary of the cells
    done, whatever further Ctrl-C comes."""
    axes, options = run.split_grid_argv(argv)
    table = options.get("--table")
    if table == "list":
        for name in ("fedredefense-1", "fedredefense-2", "feddefuse-1", "feddefuse-2"):
            title, _, flags = paper_table(name, "digits")
            print(f"{name:15} {math.prod(len(v) for v in flags.values()):3} cells  {title}")
        print("(feddefuse-1 on --dataset fmnist is FedDefuse Table 3; every table takes any other flag, e.g. "
              "--seed 0,1,2)")
        return 0
    if table is not None:
        dataset, scale = dict(axes).get("--dataset", ["digits"]), dict(axes).get("--scale", ["laptop"])
        preset = paper_table(table, dataset[0], scale[0]) if len(dataset) == len(scale) == 1 else None
        if preset is None:
            raise fl.UserError(f"argument --table: must be list, fedredefense-1, fedredefense-2, feddefuse-1 or "
                               f"feddefuse-2, on one --dataset and --scale (got {table})")
        title, layout, flags = preset
        axes = list({**flags, **dict(axes)}.items())  # the user's flags override the table's
    else:
        title, layout = "grid", None
    jobs = options.get("--jobs") or str(os.cpu_count() or 1)
    if not jobs.isdigit() or int(jobs) < 1:
        raise fl.UserError(f"argument --jobs: must be an integer >= 1 (got {jobs})")
    jobs = int(jobs)
    root = options.get("--out") or os.path.join("runs", table or "grid")
    fl.check_folder("--out", root)
    cells = grid_cells(axes, root)
    user_flags = [flag for flag, _ in run.split_grid_argv(argv)[0]]
    unread = [flag for flag in user_flags if not any(flag in cell_argv for _, cell_argv in cells)]
    if unread:  # the user's, not a table's: run.py refuses it too
        key = unread[0][2:].replace("-", "_")
        raise fl.UserError(f"argument {unread[0]}: must be left out: only {run.READ_BY[key][0]} reads it, and no "
                           f"cell of this grid does")
    pending, invalid = [], {}
    for name, cell_argv in cells:
        config, error = parse_cell(cell_argv)
        if error is not None:
            invalid[name] = error
        elif not is_complete(os.path.join(root, name), config):
            pending.append((name, cell_argv))
    if len(invalid) == len(cells):  # not one cell can run: the command itself is wrong
        raise fl.UserError(next(iter(invalid.values())))
    failed = {name: f"run.py: error: {error}" for name, error in invalid.items()}
    os.makedirs(root, exist_ok=True)
    grid = {"title": title, "layout": layout, "command": shlex.join(["python", "run.py", *argv]),
            "cells": {name: cell_argv for name, cell_argv in cells}}
    fl.write_text(os.path.join(root, "grid.json"), json.dumps(grid, indent=1))
    for name, error in failed.items():
        record_error(os.path.join(root, name), error)
    if options.get("--print-commands"):
        for _, cell_argv in pending:
            print(shlex.join(["python", "run.py", *cell_argv]))
        return 0

    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env and jobs > 1:  # one core's share each; README: results depend on it
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    if jobs > 1:  # the cells share the cores (SHARED_CORES)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    print(f"{len(cells)} cells: {len(cells) - len(pending) - len(failed)} already done, {len(failed)} invalid, "
          f"{len(pending)} to run with {jobs} worker(s) under {root}", flush=True)
    start, waiting, running, done = time.time(), list(pending), {}, 0
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                name, cell_argv = waiting.pop(0)
                running[name] = start_cell(cell_argv, os.path.join(root, name), env)
            time.sleep(0.1)
            for name in [name for name, process in running.items() if process.poll() is not None]:
                out, done = os.path.join(root, name), done + 1
                error = cell_error(running.pop(name), out)
                if error is not None:
                    record_error(out, error)
                    failed[name] = error
                eta = (time.time() - start) / done * (len(pending) - done) / 60
                outcome = f"FAILED, {error}" if error else run.format_final(finished_run(out)["final"])
                print(f"[{done}/{len(pending)}] {name}: {outcome}  (ETA {eta:.1f} min)", flush=True)
    except KeyboardInterrupt:
        handler = signal.getsignal(signal.SIGINT)
        try:
            stop(running.values())
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a further Ctrl-C waits for the summary
            write_summary(root)
        finally:
            signal.signal(signal.SIGINT, handler)
        raise fl.Interrupted(f"interrupted after {done} of the {len(pending)} cells to run: {len(running)} stopped, "
                             f"{len(waiting)} not started; wrote {os.path.join(root, 'summary.md')}; rerun the same "
                             f"command to run the rest") from None
    write_summary(root)
    print(f"wrote {os.path.join(root, 'summary.md')} and summary.csv" +
          (f"; {len(failed)} cell(s) failed" if failed else ""))
    return 1 if failed else 0


def mean_std(values, percent=True):
    """"72.2" for one value, "72.2 ± 0.3" (sample std) over several seeds, "-" where undefined."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    scale = 100 if percent else 1
    text = f"{scale * np.mean(values):.1f}"
    return text + (f" ± {scale * np.std(values, ddof=1):.1f}" if len(values) > 1 else "")


def read_grid(root):
    """A grid folder's layout (grid.json, if the grid wrote one) and its cells: {name: results} of the finished
    ones and {name: error} of the failed ones, in the grid's own order (its tables list values as given)."""
    grid = {"title": "grid", "layout": None}
    if os.path.exists(os.path.join(root, "grid.json")):
        with open(os.path.join(root, "grid.json")) as f:
            grid = json.load(f)
    order = list(grid.get("cells", {}))
    folders = sorted((d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))),
                     key=lambda d: (order.index(d), "") if d in order else (len(order), d))
    runs, errors = {}, {}
    for name in folders:
        out = os.path.join(root, name)
        if os.path.exists(os.path.join(out, "error.txt")):
            with open(os.path.join(out, "error.txt")) as f:
                errors[name] = f.read().strip()
        elif os.path.exists(os.path.join(out, "results.json")):
            try:
                runs[name] = finished_run(out)
            except fl.UserError as e:
                errors[name] = str(e)
    return grid, runs, errors


def summary_cell(finals, metrics, layout):
    """One table cell: each metric's mean (± std over seeds), then the ASR in brackets where there is one."""
    cell = " / ".join(mean_std([f[m] for f in finals], percent=m != "aar") for m in metrics)
    if finals[0]["asr"] is not None and layout != "detection":
        cell += f" ({mean_std([f['asr'] for f in finals])})"
    return cell


def summary_table(runs, metrics, layout):
    """Rows defenses, columns attacks, and the worst case: the lowest mean of the first metric over the attacks."""
    defenses = list(dict.fromkeys(r["config"]["defense"] for r in runs))
    attacks_ = list(dict.fromkeys(r["config"]["attack"] for r in runs))
    lines = ["| defense | " + " | ".join(attacks_) + " | worst case |", "|---" * (len(attacks_) + 2) + "|"]
    for d in defenses:
        row, worst = [], []
        for a in attacks_:
            finals = [r["final"] for r in runs if (r["config"]["defense"], r["config"]["attack"]) == (d, a)]
            row.append(summary_cell(finals, metrics, layout) if finals else "")
            values = [f[metrics[0]] for f in finals if f[metrics[0]] is not None]
            if a != "none" and values:
                worst.append((np.mean(values), a))
        row.append(f"{100 * min(worst)[0]:.1f} ({min(worst)[1]})" if worst else "-")
        oracle = d == "normbound" and any(r["config"].get("norm_bound") == "oracle" for r in runs
                                          if r["config"]["defense"] == d)
        lines.append(f"| {d}{' (oracle M)' if oracle else ''} | " + " | ".join(row) + " |")
    return lines + [""]


def write_summary(root):
    """summary.md (the paper's layout: rows defenses, columns attacks, mean ± std over seeds, a worst-case column;
    one table per combination of the other settings that vary) and summary.csv (one row per cell) under a grid's
    folder. Works on any folder of cell folders, e.g. merged from several machines. summary.md prints percent;
    summary.csv keeps results.json's fractions in [0, 1] (AAR in rounds)."""
    grid, runs, errors = read_grid(root)
    configs = [r["config"] for r in runs.values()]
    varied = [k for k in (configs[0] if configs else {}) if k != "out" and
              len({json.dumps(c.get(k)) for c in configs}) > 1]
    groups = [k for k in varied if k not in ("defense", "attack", "seed")]
    layout = grid["layout"] or ("feddefuse" if configs and configs[0]["protocol"] == "feddefuse" else "tacc")
    metrics = LAYOUTS[layout]

    lines = [f"# {grid['title']}", ""] + ([f"Made by `{grid['command']}`.", ""] if "command" in grid else [])
    lines += [f"Threat model: {'; '.join(sorted({run.threat_model(c) for c in configs}))}. "
              f"Scale: {'; '.join(sorted({run.scale_of(c) for c in configs}))}. "
              f"Cells: {' / '.join(LABELS[m] for m in metrics)}{' (/ASR)' if layout != 'detection' else ''}, "
              f"{'% (AAR in rounds)' if 'aar' in metrics else '%'}; "
              f"mean ± std over seeds where there are several." if configs else "No cell has finished yet.", ""]
    key = lambda c: tuple(json.dumps(c.get(k)) for k in groups)
    for group in sorted({key(c) for c in configs}):
        if groups:
            lines += ["## " + ", ".join(f"{k} = {json.loads(v)}" for k, v in zip(groups, group)), ""]
        lines += summary_table([r for r in runs.values() if key(r["config"]) == group], metrics, layout)
    lines.append(f"Worst case: the lowest mean {LABELS[metrics[0]]} over the attacks (the no-attack column left out).")
    if errors:
        lines += ["", "Failed cells:", ""] + [f"- `{name}`: {error}" for name, error in errors.items()]
    fl.write_text(os.path.join(root, "summary.md"), "\n".join(lines) + "\n")

    rows = [{"cell": n, "status": "done", "error": "", **r["config"], **r["final"]} for n, r in runs.items()]
    rows += [{"cell": n, "status": "failed", "error": e} for n, e in errors.items()]
    fields = list(dict.fromkeys(k for row in rows for k in row))

    def dump(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)
    fl.write_atomically(os.path.join(root, "summary.csv"), dump)


def summarize(paths, figures=None):
    """The tables of the finished runs among ``paths`` (``print_runs``), then each grid folder's summary.md,
    (re)written with summary.csv from its cells (e.g. after they ran on several machines), then, with ``figures``
    (a folder), ``write_figures`` of all of them. Anything else is named on stderr and skipped, a ``fl.UserError`` if
    nothing is left; nothing is written into a run's folder."""
    runs, grids, skipped = [], [], []
    for path in paths:
        if is_grid_folder(path):
            grids.append(path)
            continue
        try:
            runs.append(finished_run(path))
        except fl.UserError as e:
            skipped.append(str(e))
    if not runs and not grids:
        raise fl.UserError(f"argument --summarize: nothing finished to summarize ({'; '.join(skipped)})")
    drawn = runs + [r for root in grids for r in read_grid(root)[1].values()] if figures else []
    figure_groups(drawn)  # a mix that one figure would average is refused before anything is written
    for reason in skipped:
        sys.stderr.write(f"run.py: skipped {reason}\n")
    if runs:
        print_runs(runs)
    for root in grids:
        write_summary(root)
        with open(os.path.join(root, "summary.md")) as f:
            print(f.read(), end="")
    if figures:
        write_figures(drawn, figures)


def finished_run(path):
    """The results.json of the finished run at ``path`` (its folder, or the file); for anything else a
    ``fl.UserError`` says what ``path`` is."""
    file = os.path.join(path, "results.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        unfinished = os.path.exists(os.path.join(path, run.CHECKPOINT))
        raise fl.UserError(f"{path} " + ("does not exist" if not os.path.exists(path) else
                                         "is an unfinished run (rerun its command to finish it)" if unfinished else
                                         "holds no results.json"))
    try:
        with open(file) as f:
            results = json.load(f)
        if {"config", "final", "rounds"} <= results.keys():
            return results
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not a JSON object
        pass
    raise fl.UserError(f"{file} is damaged or not a run's results.json")


def is_grid_folder(path):
    """A grid's folder: no run of its own, and its grid.json or cell folders with results or errors."""
    if not os.path.isdir(path) or any(os.path.exists(os.path.join(path, f)) for f in ("results.json", run.CHECKPOINT)):
        return False
    return os.path.exists(os.path.join(path, "grid.json")) or any(
        os.path.exists(os.path.join(path, d, f)) for d in os.listdir(path) for f in ("results.json", "error.txt"))


def print_runs(runs):
    """One table row per run, then the reconstruction errors of benign vs attacking updates (FedREDefense
    Table 10: mean +- std over all rounds)."""
    print("| dataset | defense | attack | pattern | threat model | scale | TACC | ASR | DACC | FPR | FNR | AAR | ADACC "
          "| MR | MR=0 rounds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        c, f = r["config"], r["final"]
        print(f"| {c['dataset']} | {c['defense']} | {c['attack']} | {c['pattern']} | {run.threat_model(c)} | "
              f"{run.scale_of(c)} | {run.pct(f['tacc'])} | "
              f"{run.pct(f['asr'])} | {run.pct(f['dacc'])} | {run.pct(f['fpr'])} | {run.pct(f['fnr'])} | "
              f"{run.rounds_text(f['aar'])} | "
              f"{run.pct(f['adacc'])} | {run.pct(f['mr'])} | {run.pct(f['mr_zero_rounds'])} |")
    with_errors = [r for r in runs if any(x["errors"] for x in r["rounds"])]
    if not with_errors:
        return
    print("\n| run | benign error | attacking error |\n|---|---|---|")
    for r in with_errors:
        split = {False: [], True: []}
        for x in r["rounds"]:
            for c, e in (x["errors"] or {}).items():
                split[int(c) in x["attacking"]].append(e)
        stat = lambda v: f"{np.mean(v):.2f} ± {np.std(v):.2f} (n={len(v)})" if v else "-"
        c = r["config"]
        print(f"| {c['defense']} vs {c['attack']} ({c['dataset']}) | {stat(split[False])} | {stat(split[True])} |")


# ---------------------------------------------------------------------------------------------------------------
# Figures: RESULTS.md's plots, drawn from finished runs (python run.py --summarize RUNS... --figures DIR)
# ---------------------------------------------------------------------------------------------------------------

HEADLINE = {"fedavg": "tab:red", "oracle": "tab:gray", "fedredefense": "tab:blue", "feddefuse": "tab:green"}
EPS_GRID = np.geomspace(0.05, 20, 49)  # DBSCAN eps values the trade-off curve replays


def write_figures(runs, folder):
    """The figures of RESULTS.md from ``runs`` (results.json contents), one set per dataset and threat model, as
    PNGs in ``folder``: the TACC of the headline defenses over the rounds (``figure_tacc``); FedREDefense's
    reconstruction errors of genuine and attacking updates against gamma (``figure_errors``); FedDefuse's DBSCAN
    gate, its statistic per round (``figure_gate``) and its eps trade-off (``figure_eps``). A figure whose runs
    are not among ``runs`` is left out. Pattern I runs only."""
    groups = figure_groups(runs)
    os.makedirs(folder, exist_ok=True)
    written = []
    for (dataset, protocol), group in groups.items():
        of = lambda defense: [r for r in group if r["config"]["defense"] == defense]
        name = f"{dataset}-{protocol}"
        drawn = [(f"tacc-{name}.png", figure_tacc, [r for r in group if r["config"]["defense"] in HEADLINE]),
                 (f"errors-{name}.png", figure_errors, of("fedredefense")),
                 (f"gate-{name}.png", figure_gate, of("feddefuse")),
                 (f"eps-{name}.png", figure_eps, of("feddefuse"))]
        for file, figure, chosen in drawn:
            if chosen:
                fig = figure(chosen, f"{dataset}, {run.threat_model(chosen[0]['config'])}")
                path = os.path.join(folder, file)
                fl.write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
                written.append(path)
        if of("feddefuse"):
            print("\n".join([f"FedDefuse's stages, replayed ({dataset}, {protocol}):", ""] + gate_table(of("feddefuse"))
                            + [""]))
    print("wrote " + (", ".join(written) if written else "no figure (no pattern I run of the figures' defenses)"))


def figure_groups(runs):
    """The pattern I runs by dataset and protocol, a set of figures each; a ``fl.UserError`` where one set would mix
    threat models (the model, sampling or knowledge) or scales, since a figure averages its runs over the seeds."""
    groups = {}
    for r in runs:
        if r["config"]["pattern"] == "I":
            groups.setdefault((r["config"]["dataset"], r["config"]["protocol"]), []).append(r)
    for (dataset, protocol), group in groups.items():
        settings = sorted({f"{run.threat_model(r['config'])}, {run.scale_of(r['config'])}" for r in group})
        if len(settings) > 1:
            raise fl.UserError(f"argument --figures: the {dataset} runs under the {protocol} protocol differ "
                               f"({'; '.join(settings)}), and a figure averages its runs: pass one setting's at a time")
    return dict(sorted(groups.items()))


def attacks_of(runs):
    """The attacks of ``runs`` in the order of their first appearance, "none" first."""
    found = list(dict.fromkeys(r["config"]["attack"] for r in runs))
    return sorted(found, key=lambda a: a != "none")


def panels(n, width=3.4, height=2.8):
    """A figure with ``n`` panels in rows of at most four, and the flat list of them (the unused ones hidden)."""
    from matplotlib.figure import Figure

    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def figure_tacc(runs, title):
    """TACC over the rounds, one panel per attack, one line per headline defense: the mean over the seeds, with a
    band of +- one standard deviation where there are several."""
    attacks_ = attacks_of(runs)
    fig, axes = panels(len(attacks_))
    for ax, attack in zip(axes, attacks_):
        for defense, color in HEADLINE.items():
            seeds = [[100 * x["tacc"] for x in r["rounds"]] for r in runs
                     if (r["config"]["defense"], r["config"]["attack"]) == (defense, attack)]
            if not seeds:
                continue
            length = min(map(len, seeds))
            tacc = np.array([s[:length] for s in seeds])
            t = np.arange(1, length + 1)
            ax.plot(t, tacc.mean(0), color=color, label=f"{defense} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
            if len(seeds) > 1:
                ax.fill_between(t, tacc.mean(0) - tacc.std(0, ddof=1), tacc.mean(0) + tacc.std(0, ddof=1),
                                color=color, alpha=0.2, linewidth=0)
        ax.set(title=attack, xlabel="round", ylabel="TACC (%)", ylim=(0, 100))
        ax.legend(fontsize="x-small")
    fig.suptitle(f"TACC over the rounds: {title}")
    return fig


def first_errors(r):
    """{client: (its first reconstruction error, whether it attacked in that round)} of a FedREDefense run."""
    first = {}
    for x in r["rounds"]:
        for c, e in (x["errors"] or {}).items():
            first.setdefault(int(c), (e, int(c) in x["attacking"]))
    return first


def figure_errors(runs, title):
    """FedREDefense Table 10's content as points: each client's first reconstruction error (every seed), genuine
    and attacking updates side by side for each attack, with the threshold gamma (Algorithm 1 flags e > gamma)."""
    attacks_ = attacks_of(runs)
    fig, (ax,) = panels(1, width=max(6.0, 1.1 * len(attacks_)), height=4.0)
    rng, labelled = np.random.default_rng(0), set()  # the jitter is horizontal only
    for i, attack in enumerate(attacks_):
        points = [v for r in runs if r["config"]["attack"] == attack for v in first_errors(r).values()]
        for label, color, shift in (("genuine", "tab:blue", -0.18), ("attacking", "tab:red", 0.18)):
            e = [e for e, a in points if a == (label == "attacking")]
            ax.scatter(i + shift + rng.uniform(-0.1, 0.1, len(e)), e, s=9, color=color, alpha=0.6,
                       label=label if e and label not in labelled else None)
            labelled |= {label} if e else set()
    gamma = fedredefense.HYPER[runs[0]["config"]["dataset"]].gamma
    ax.axhline(gamma, color="black", linestyle="--", label=f"γ = {gamma:g}")
    ax.set(xticks=range(len(attacks_)), xticklabels=attacks_, yscale="log",
           ylabel="reconstruction error e (first participation)")
    ax.legend(fontsize="small")
    fig.suptitle(f"FedREDefense's reconstruction errors: {title}")
    return fig


def gate_gaps(d_b):
    """The gaps between neighbouring values of d_b divided by its median (its mean if the median is 0), the scale
    ``feddefuse.dbscan_labels`` clusters on; none for an all-zero d_b (one cluster)."""
    x = np.sort(np.asarray(d_b, dtype=float))
    scale = np.median(x) if np.median(x) > 0 else x.mean()
    return np.diff(x / scale) if scale > 0 else np.zeros(0)


def is_uniform_at(gaps, eps):
    """``feddefuse.is_uniformly_benign`` of DBSCAN(eps, min_samples = 2) on 1-D points with these gaps, in closed
    form: the clusters are the chains of gaps <= eps and a point with no neighbour within eps is noise, so there is
    one label when every gap is <= eps (one chain) or every gap is > eps (all noise)."""
    return bool(len(gaps) == 0 or (gaps <= eps).all() or (gaps > eps).all())


def figure_gate(runs, title):
    """FedDefuse's DBSCAN gate (Algorithm 2 lines 6-7) per round: the largest of ``gate_gaps`` (the gate opens when
    it exceeds eps) of every attacked run (one panel per
    attack, a line per seed) against the attack-free runs (black), and the eps this dataset runs with."""
    attacks_ = [a for a in attacks_of(runs) if a != "none"]
    calm = [r for r in runs if r["config"]["attack"] == "none"]
    eps = feddefuse.HYPER[runs[0]["config"]["dataset"]].dbscan_eps
    fig, axes = panels(len(attacks_))
    for ax, attack in zip(axes, attacks_):
        for label, color, chosen in (("attack-free", "black", calm),
                                     (attack, "tab:red", [r for r in runs if r["config"]["attack"] == attack])):
            for k, r in enumerate(chosen):
                gaps = [gate_gaps(list(x["details"]["d_b"].values())).max(initial=0)
                        for x in r["rounds"] if x["details"]]
                ax.plot(range(1, len(gaps) + 1), gaps, color=color, alpha=0.7, linewidth=1,
                        label=label if k == 0 else None)
        ax.axhline(eps, color="tab:blue", linestyle="--", label=f"eps = {eps:g}")
        ax.set(title=attack, xlabel="round", ylabel="largest gap in d_b / median", yscale="log")
        ax.legend(fontsize="x-small")
    fig.suptitle(f"FedDefuse's gate: {title}")
    return fig


def gate_rounds(r):
    """Per round of the FedDefuse run ``r``, what its DBSCAN gate decides between: (``gate_gaps``, attacking,
    KMeans's choice, the split's Delta_b), the choice being the live one where KMeans ran and
    ``feddefuse.select_benign`` on the recorded Phi (the live call) where the gate kept everyone. Neither d_b nor
    Phi depends on eps, so ``gate_at`` reruns the gate exactly for any eps (min_samples 2, every dataset's)."""
    out = []
    for x in r["rounds"]:
        d = x["details"]
        if not d:
            continue
        clients = [int(c) for c in d["d_b"]]
        kept = (set(d["kmeans"]) if d["kmeans"] is not None else
                {c for c, k in zip(clients, feddefuse.select_benign(torch.tensor(list(d["phi"].values()))).tolist())
                 if k})
        out.append((gate_gaps(list(d["d_b"].values())), np.array([c in x["attacking"] for c in clients]),
                    np.array([c in kept for c in clients]), np.array([c in d["delta_b"] for c in clients])))
    return out


def gate_at(gaps, choice, eps):
    """Algorithm 2 lines 6-10 with DBSCAN's ``eps``: everyone where the round is uniformly benign, else ``choice``."""
    return np.ones(len(choice), dtype=bool) if is_uniform_at(gaps, eps) else choice


def mr(accepted, attacking):
    """FedDefuse's MR of one round, ``fl.malicious_rate``, on bool arrays."""
    return fl.malicious_rate(torch.from_numpy(accepted), torch.from_numpy(attacking))


def fpr(accepted, attacking):
    """The share of a round's genuine updates that are dropped."""
    return (~accepted & ~attacking).sum() / (~attacking).sum() if (~attacking).sum() else 0.0


def gate_table(runs):
    """Which stage of FedDefuse lets each attack through, replayed from the records (markdown rows): MR as run;
    MR with a perfect gate (KMeans in exactly the attacked rounds, everyone kept in the others), the least any
    DBSCAN gate can give; the least MR of a DBSCAN gate whose attack-free FPR stays <= 3% over ``EPS_GRID`` and the
    dataset's eps (with attack-free runs); and the share of attacking updates that the split by recoverability
    puts in Delta_b."""
    calm = [gate_rounds(r) for r in runs if r["config"]["attack"] == "none"]
    grid_ = sorted(set(EPS_GRID) | {feddefuse.HYPER[runs[0]["config"]["dataset"]].dbscan_eps})
    free = [100 * np.mean([fpr(gate_at(g, c, eps), a) for rounds in calm for g, a, c, _ in rounds])
            for eps in grid_] if calm else []
    lines = ["| attack | MR as run | MR, perfect gate | least MR at attack-free FPR <= 3% | attackers in Delta_b |",
             "|---|---|---|---|---|"]
    for attack in [a for a in attacks_of(runs) if a != "none"]:
        rounds = [x for r in runs if r["config"]["attack"] == attack for x in gate_rounds(r)]
        perfect = 100 * np.mean([mr(c if a.any() else np.ones_like(c), a) for _, a, c, _ in rounds])
        at = lambda eps: 100 * np.mean([mr(gate_at(g, c, eps), a) for g, a, c, _ in rounds])
        reachable = [at(eps) for eps, f in zip(grid_, free) if f <= 3] if calm else []
        in_b = 100 * sum((a & b).sum() for _, a, _, b in rounds) / max(1, sum(a.sum() for _, a, _, _ in rounds))
        as_run = 100 * np.mean([r["final"]["mr"] for r in runs if r["config"]["attack"] == attack])
        lines.append(f"| {attack} | {as_run:.1f} | {perfect:.1f} | "
                     f"{f'{min(reachable):.1f}' if reachable else '-'} | {in_b:.1f} |")
    return lines


def figure_eps(runs, title):
    """FedDefuse's gate over eps, replayed (``gate_rounds``, ``gate_at``): left, each attack's MR and the
    attack-free runs' FPR (the share of genuine updates KMeans drops) against eps; right, MR against attack-free
    FPR, the trade-off any eps can reach, with this dataset's eps marked."""
    hp = feddefuse.HYPER[runs[0]["config"]["dataset"]]
    attacks_ = [a for a in attacks_of(runs) if a != "none"]
    calm = [r for r in runs if r["config"]["attack"] == "none"]

    rounds = {id(r): gate_rounds(r) for r in runs}

    def mean_rate(chosen, eps, rate):
        return 100 * np.mean([rate(gate_at(gaps, choice, eps), attacking)
                              for r in chosen for gaps, attacking, choice, _ in rounds[id(r)]])

    grid_ = sorted(set(EPS_GRID) | {hp.dbscan_eps})
    fig, (by_eps, trade) = panels(2, width=5.0, height=4.0)
    free = [mean_rate(calm, eps, fpr) for eps in grid_] if calm else None
    if free:
        by_eps.plot(grid_, free, color="black", label="attack-free: FPR")
    for attack, color in zip(attacks_, ("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink")):
        rates = [mean_rate([r for r in runs if r["config"]["attack"] == attack], eps, mr) for eps in grid_]
        by_eps.plot(grid_, rates, color=color, label=f"{attack}: MR")
        if free:
            trade.plot(free, rates, color=color, marker=".", markersize=3, label=attack)
            at = grid_.index(hp.dbscan_eps)
            trade.plot(free[at], rates[at], "o", color=color, markerfacecolor="none", markersize=9)
    by_eps.axvline(hp.dbscan_eps, color="tab:blue", linestyle="--", label=f"eps = {hp.dbscan_eps:g}")
    by_eps.set(xscale="log", xlabel="DBSCAN eps (on d_b / median)", ylabel="%", title="MR and attack-free FPR")
    by_eps.legend(fontsize="x-small")
    trade.set(xlabel="attack-free FPR (%)", ylabel="MR (%)", title=f"trade-off (circles: eps = {hp.dbscan_eps:g})")
    if free:
        trade.legend(fontsize="x-small")
    else:
        trade.set_axis_off()
        trade.text(0.5, 0.5, "n/a: no attack-free run given", transform=trade.transAxes, ha="center")
    fig.suptitle(f"FedDefuse's gate over eps, replayed: {title}")
    return fig


def main(argv=None):
    """The command line of many runs, the one ``python run.py`` hands over (``run.for_grid``): a grid (``run_grid``)
    or --summarize (``summarize``); any other is one run's (``run.main``). Messages name run.py, the command the
    user typed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not run.for_grid(argv):
        return run.main(argv)
    with fl.command_line("run.py"):
        if run.summarizes(argv):
            args = run.parse_args(argv)  # --summarize takes no other flag but --figures
            return summarize(args.summarize, args.figures)
        return run_grid(argv)


if __name__ == "__main__":
    sys.exit(main())
