"""The experiment plan's grid: E1-E8 = {linear, mlp, cabstractor, perceiver} x {lora, dora}, one train.py run each;
E9-E10 the plan's cross-attention abstractor with each.

    python experiments.py                                     # the grid on the embedded demo
    python experiments.py --vision TOWER --llm QWEN3 --train-manifest m.jsonl --batch-size 8
    python experiments.py --with-crossattn                    # also E9-E10
    python experiments.py --seeds 42,7,1                      # each pair three times: its mean and range
    python experiments.py --only E1,E2,E3 --runs runs_a       # a share of the grid (E1-E3 too; a job array's task:
                                                              #   --only E$SLURM_ARRAY_TASK_ID)
    python experiments.py --list                              # each experiment's command and its state in --runs
    python experiments.py --summarize runs_a runs_b runs_c    # trains nothing: one summary of runs made elsewhere

Options other than the grid's own are passed through to every train.py run; they are checked against train.py's
own parser before any run starts (on the embedded default the demo's, which adds its own options). Each run's output
is shown and kept in RUN/logs/console.log. A run whose logs/final_metrics.json exists is skipped, an interrupted run
with a saved training state is resumed (--resume auto) and one interrupted before its first saved state is moved
aside and started anew, so a grid continues where it stopped. logs/final_metrics.json must be the run's own test
result (train.py writes it; evaluate.py run by hand writes under RUN/eval/, which is never read here). A run that
fails is one line (the experiment, its exit status, its log), the others still run, and the grid exits with 1.

The summary (infra/grid_summary.py; of the runs just made, or with --summarize of every finished run in the folders
given, which may come from several machines) writes summary/all_results.csv (with each run's machine and wall time),
summary/lora_vs_dora.csv (per projector with both runs: quality, DoRA - LoRA, peak memory and step time, DoRA /
LoRA, the loss's spread over the last epoch), summary/recommendation.txt (a conclusion per projector, the best
METEOR and the best METEOR per step-second), summary/comparison_plots.png, summary/learning_curves.png and
summary/report.html (the tables, the plots, links to each run's report). Runs that differ where the grid holds them
equal (the bases' fingerprints, the test split, the decoding, videos per step, any other option) are refused (with
--accept-difference KEY compared, the difference stated), the same experiment finished in two folders is named,
and experiments missing or unfinished are listed. With --bertscore-model DIR each run's test predictions are also
scored with BERTScore; on the embedded demo each run's share of test captions with all four attributes right is a
column too.

One run is one draw: two runs of one pair that differ only in their seed can fall several points apart. With
--seeds each pair is trained once per seed (run folders E{n}_P_M_seed{S}; on the demo every run uses the first seed's
assets), and the summary adds each pair's mean with its lowest and highest run (summary/across_seeds.csv), so a gap
between two pairs can be read against the spread within one.
"""
import argparse
import codecs
import contextlib
import fcntl
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from infra.checkpoint import LOCK_FILE, move_aside
from infra.errors import UserError, user_errors
from infra.grid_summary import result_row, run_state, summarize

PEFTS = ("lora", "dora")
GRID = [(projector, peft) for projector in ("linear", "mlp", "cabstractor", "perceiver") for peft in PEFTS]
EXTRA = [("crossattn", "lora"), ("crossattn", "dora")]
TRAIN_SCRIPT = Path(__file__).with_name("train.py")
RUN_FOLDER = re.compile(r"(E\d+)_([a-z0-9]+)_(lora|dora|none)(?:_seed(-?\d+))?")
GRID_OPTIONS = {"--projector", "--peft", "--output-dir", "--resume"}  # set by the grid for each run


@dataclass(frozen=True)
class Experiment:
    """One run of the grid: the plan's number, the projector x PEFT pair, and with --seeds its seed."""
    name: str
    projector: str
    peft: str
    seed: int | None = None

    @property
    def folder(self) -> str:
        return f"{self.name}_{self.projector}_{self.peft}" + ("" if self.seed is None else f"_seed{self.seed}")

    @property
    def label(self) -> str:
        return f"{self.name} {self.projector} + {self.peft}" + ("" if self.seed is None else f" seed {self.seed}")


def numbered_grid() -> list[Experiment]:
    return [Experiment(f"E{number}", projector, peft) for number, (projector, peft) in enumerate(GRID + EXTRA, 1)]


def select(only: str | None, with_crossattn: bool, seeds: list | None = None) -> list[Experiment]:
    """The experiments --only names (E3, E1,E2 or E1-E3), else the grid (E9-E10 with --with-crossattn), in the
    grid's order, each once per seed."""
    grid = numbered_grid()
    chosen = grid[:len(GRID) + (len(EXTRA) if with_crossattn else 0)]
    if only is not None:
        numbers = set()
        for part in only.upper().split(","):
            match = re.fullmatch(r"E(\d+)(?:-E?(\d+))?", part.strip())
            if not match or not 1 <= int(match[1]) <= int(match[2] or match[1]) <= len(grid):
                raise UserError(f"--only {part.strip()!r}: the grid's experiments are E1-E{len(grid)} "
                                 f"(E1,E2,E3 or E1-E3)")
            numbers |= set(range(int(match[1]), int(match[2] or match[1]) + 1))
        chosen = [e for e in grid if int(e.name[1:]) in numbers]
    return [replace(e, seed=seed) for e in chosen for seed in (seeds or [None])]


# ---- train.py's options, checked before any run ------------------------------------------------------------------
def check_train_options(passthrough: list[str], projectors: list[str] = ()) -> bool:
    """Refuse what the runs would refuse (their own parser decides: train.py's, or on the embedded default the
    demo's, which adds its own options), a token reduction one of `projectors` cannot use, and the grid's own
    options; True when the runs train the embedded demo."""
    import train  # the whole model stack: imported to check options, not for --help or --summarize
    from vlm import check_token_reduction
    given = {token.split("=")[0] for token in passthrough if token.startswith("--")}
    if taken := sorted(given & GRID_OPTIONS):
        raise UserError(f"{', '.join(taken)}: the grid sets these for each run itself (interrupted runs are "
                         f"resumed); drop them")
    uses_demo = not train.names_paths(passthrough)
    if uses_demo:
        from demo import command_line_config as parse  # the parser `python train.py` hands these options to
    else:
        parse = train.parse_config
    for projector in [*dict.fromkeys(projectors)] or [None]:  # each projector's runs: the demo's defaults differ
        messages = io.StringIO()
        try:
            with contextlib.redirect_stderr(messages):
                config = parse(passthrough + (["--projector", projector] if projector else []))
        except SystemExit:  # argparse has written "usage: ..." and "...: error: what is wrong"
            raise UserError("train.py would refuse these options: "
                            + messages.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]) from None
        check_token_reduction(config.projector, config.token_reduction, config.visual_tokens, config.merge_threshold)
    return uses_demo


def train_arguments(experiment: Experiment, run_dir: Path, passthrough: list[str], demo_seed: int | None) -> list[str]:
    """train.py's options for one experiment (with --seeds on the demo, on the assets of `demo_seed`)."""
    seeding = [] if experiment.seed is None else ["--seed", str(experiment.seed)]
    seeding += [] if experiment.seed is None or demo_seed is None else ["--demo-seed", str(demo_seed)]
    return ["--projector", experiment.projector, "--peft", experiment.peft, "--output-dir", str(run_dir), *seeding,
            *passthrough]


# ---- a run folder's state ----------------------------------------------------------------------------------------
def held_by(run_dir: Path) -> str | None:
    """The pid in run.lock while a train.py holds it (checkpoint.RunLock), else None (the probe holds the lock for
    an instant: a train.py starting in that instant is refused, as beside any other holder)."""
    if not (run_dir / LOCK_FILE).is_file():
        return None
    with open(run_dir / LOCK_FILE, "a+") as lock:  # writable: NFS emulates flock with locks that need it
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            return lock.read().strip() or "?"
    return None


def shown_command(arguments: list[str]) -> str:
    return shlex.join(["python", "train.py", *arguments])


def list_grid(experiments: list[Experiment], default: list[Experiment], runs: Path, passthrough: list[str],
              demo_seed: int | None) -> None:
    """--list: each experiment, its state in --runs, and the command that runs it."""
    print(f"the grid in {runs} (experiments.py --only E3 runs E3 alone):")
    for experiment in experiments:
        run_dir = runs / experiment.folder
        pid = held_by(run_dir)
        state = f"running (pid {pid})" if pid else run_state(run_dir)[1]
        extra = "" if experiment in default else "  [with --with-crossattn or --only]"
        print(f"{experiment.label}: {state}{extra}\n    "
              f"{shown_command(train_arguments(experiment, run_dir, passthrough, demo_seed))}")


# ---- running ---------------------------------------------------------------------------------------------------
def run_logged(command: list[str], log: Path) -> int:
    """Run `command` with its stdout and stderr shown as they come (progress bars included) and appended to `log`;
    its exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(log, "ab") as kept:
        kept.write(f"$ {shlex.join(command)}\n".encode())
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
        while chunk := process.stdout.read1(1 << 16):
            kept.write(chunk)
            kept.flush()
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
        return process.wait()


def run_experiment(experiment: Experiment, run_dir: Path, arguments: list[str]) -> str | None:
    """train.py for one experiment unless it finished before (resumed, or started anew, as its folder says); None,
    or the line that says why it has no test result."""
    kind, state = run_state(run_dir)
    if kind == "done":
        print(f"{experiment.label}: finished before, skipped ({run_dir})")
        return None
    if kind == "stale":
        if pid := held_by(run_dir):
            return f"{experiment.label}: {run_dir} is in use by pid {pid}"
        print(f"{experiment.label}: {state}; the old folder is now {move_aside(run_dir)}")
    resume = ["--resume", "auto"] if kind == "resumable" else []
    print(f"{experiment.label}" + (f" ({state})" if resume else "") + f": {shown_command(arguments + resume)}",
          flush=True)
    log = run_dir / "logs" / "console.log"
    status = run_logged([sys.executable, str(TRAIN_SCRIPT), *arguments, *resume], log)
    if status != 0:
        return f"{experiment.label} failed (exit status {status}); its log: {log}"
    kind, state = run_state(run_dir)
    return None if kind == "done" else f"{experiment.label} stopped before its test result ({state}); its log: {log}"


def run_grid(experiments: list[Experiment], runs: Path, passthrough: list[str], demo_seed: int | None,
             bertscore: dict | None) -> tuple[list[dict], list[str]]:
    """Each experiment in turn: the rows of those with a test result, and a line for each of the others."""
    rows, failures = [], []
    for experiment in experiments:
        run_dir = runs / experiment.folder
        failure = run_experiment(experiment, run_dir, train_arguments(experiment, run_dir, passthrough, demo_seed))
        try:
            rows += [] if failure else [result_row(experiment, run_dir, bertscore)]
        except ValueError as error:  # a test result that is not the run's own
            failure = f"{experiment.label}: {error}"
        if failure:
            print(failure, flush=True)
            failures.append(failure)
    return rows, failures


# ---- the grid's finished runs in folders of runs (--summarize) ---------------------------------------------------
def find_runs(folders: list[str]) -> dict[Experiment, list[Path]]:
    """Every run folder named as the grid names them (E3_cabstractor_lora, E3_cabstractor_lora_seed7) inside the
    folders given, or given itself; a name the grid does not number that way is refused."""
    grid = {e.name: e for e in numbered_grid()}
    found = {}
    for folder in {Path(f).resolve(): Path(f) for f in folders}.values():
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder of runs")
        for run_dir in [folder] if RUN_FOLDER.fullmatch(folder.name) else sorted(folder.iterdir()):
            match = RUN_FOLDER.fullmatch(run_dir.name)
            if not match or not run_dir.is_dir():
                continue
            name, projector, peft, seed = match.groups()
            if name not in grid or (grid[name].projector, grid[name].peft) != (projector, peft):
                raise UserError(f"{run_dir}: not a run of the grid, whose {name} is "
                                 + (f"{grid[name].projector} + {grid[name].peft}" if name in grid else "unknown"))
            found.setdefault(replace(grid[name], seed=None if seed is None else int(seed)), []).append(run_dir)
    return found


def summarize_folders(folders: list[str], only: str | None, with_crossattn: bool, seeds: list | None,
                      bertscore: dict | None) -> tuple[list[dict], list[str]]:
    """The rows of every finished run the folders hold, and notes naming what is missing or unfinished; the same
    experiment finished in two folders is refused."""
    found = find_runs(folders)
    found_seeds = list(dict.fromkeys(e.seed for e in found))
    if not seeds and None in found_seeds and len(found_seeds) > 1:
        raise UserError("runs with and without --seeds (E{n}_P_M and E{n}_P_M_seed{S}): summarize them apart")
    crossattn = with_crossattn or any((e.projector, e.peft) in EXTRA for e in found)
    rows, missing, unfinished, twice = [], [], [], []
    for experiment in select(only, crossattn, seeds or [s for s in found_seeds if s is not None]):
        run_dirs = found.get(experiment, [])
        done = [d for d in run_dirs if run_state(d)[0] == "done"]
        unfinished += [f"{experiment.label} ({d}: {run_state(d)[1]})" for d in run_dirs if d not in done]
        if len(done) > 1:
            twice.append(f"{experiment.label} in {' and '.join(map(str, done))}")
        elif done:
            rows.append(result_row(experiment, done[0], bertscore))
        elif not run_dirs:
            missing.append(experiment.label)
    if twice:
        raise UserError(f"the same experiment finished twice: {'; '.join(twice)}; keep one of each in the folders "
                         f"given")
    return rows, ([f"missing: {', '.join(missing)}"] if missing else []) + (
        [f"unfinished, not in the summary: {'; '.join(unfinished)}"] if unfinished else [])


def seed_list(text: str) -> list[int]:
    return [int(seed) for seed in text.split(",")]


def main(argv: list[str] | None = None) -> list[dict]:
    # allow_abbrev off: a train.py option passed through must never be read as one of ours (--seed as --seeds)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--runs", default="runs", help="folder of the experiments' run folders")
    parser.add_argument("--summary", default="summary", help="folder of all_results.csv, the plots and report.html")
    parser.add_argument("--with-crossattn", action="store_true", help="also run the cross-attention abstractor")
    parser.add_argument("--only", help="just these experiments: E1,E2,E3 or E1-E3 (E9-E10: the cross-attention "
                        "pair); a job array's task: --only E$SLURM_ARRAY_TASK_ID")
    parser.add_argument("--list", action="store_true", help="print each experiment's command and its state in --runs "
                        "(done, interrupted and resumable, not started); train nothing")
    parser.add_argument("--summarize", nargs="+", metavar="DIR", help="train nothing: summarize the finished runs in "
                        "these folders of runs (each machine's --runs)")
    parser.add_argument("--accept-difference", type=lambda text: text.split(","), default=[], metavar="KEY,...",
                        help="compare runs that differ in these (e.g. select_by), the difference stated in the "
                             "summary, instead of refusing them")
    parser.add_argument("--bertscore-model", help="a BERT snapshot folder: adds BERTScore P/R/F1 of each run")
    parser.add_argument("--bertscore-layer", type=int, default=9, help="BERT layer whose embeddings BERTScore uses")
    parser.add_argument("--seeds", type=seed_list, help="train each pair once per seed, e.g. 42,7,1 (on the demo, "
                        "all on the first seed's assets), and report each pair's mean and range")
    args, passthrough = parser.parse_known_args(argv)
    if args.seeds and {"--seed", "--demo-seed"} & {flag.split("=")[0] for flag in passthrough}:
        parser.error("--seeds sets each run's --seed and --demo-seed; drop those options")
    if args.summarize and passthrough:
        parser.error(f"--summarize trains nothing: drop the train.py options {' '.join(passthrough)}")
    bertscore = {"model": args.bertscore_model, "layer": args.bertscore_layer} if args.bertscore_model else None
    failures = []
    with user_errors():
        if args.summarize:
            rows, notes = summarize_folders(args.summarize, args.only, args.with_crossattn, args.seeds, bertscore)
        else:
            projectors = [e.projector for e in select(args.only, args.with_crossattn)]
            uses_demo = check_train_options(passthrough, projectors)  # before any run starts
            demo_seed = args.seeds[0] if args.seeds and uses_demo else None  # all seeds on the first seed's assets
            if args.list:
                list_grid(select(args.only, True, args.seeds), select(None, args.with_crossattn, args.seeds),
                          Path(args.runs), passthrough, demo_seed)
                return []
            rows, failures = run_grid(select(args.only, args.with_crossattn, args.seeds), Path(args.runs),
                                      passthrough, demo_seed, bertscore)
            notes = [f"no test result: {failure}" for failure in failures]
        if rows:
            summarize(rows, Path(args.summary), bertscore is not None, notes, args.accept_difference)
        else:
            print("\n".join(([] if failures else notes) + ["no finished run to summarize"]))  # failures: below
    if failures:
        sys.exit(f"{len(failures)} of the experiments have no test result:\n" + "\n".join(failures))
    return rows


if __name__ == "__main__":
    main()
