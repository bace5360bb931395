"""The launch/ scripts and examples: syntax, dry runs, and that what they call exists.

Every ``*.sh`` / ``*.sbatch`` under launch/ is found by glob, so a new script is covered by the
syntax check (and must be listed in launch/README.md) without editing this file. The dry runs
put fake ``nvidia-smi`` / ``scontrol`` first on PATH, so the results do not depend on the host.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = sorted({*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")})
DRY_RUN_SCRIPTS = ("torchrun.sh", "slurm/train.sbatch", "bench/gpu-benchmark.sh")


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def fake_tool(bindir: Path, name: str, body: str) -> None:
    path = bindir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def bindir(tmp_path: Path) -> Path:
    """A directory put first on PATH; by default its nvidia-smi reports no GPU."""
    d = tmp_path / "bin"
    d.mkdir()
    fake_tool(d, "nvidia-smi", "exit 0")
    return d


def gpus(bindir: Path, n: int) -> None:
    lines = "".join(f'echo "GPU {i}: Fake H100 (UUID: GPU-{i})"; ' for i in range(n))
    fake_tool(bindir, "nvidia-smi", f'if [ "$1" = "-L" ]; then {lines}fi; exit 0')


def run(args: Sequence[str], bindir: Path, cwd: Path = REPO,
        **env: str) -> subprocess.CompletedProcess[str]:
    """Run a command with a clean environment: no knobs, GPUs or launcher settings leak in."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SHARDCKPT_", "SLURM_", "PET_"))
            and k not in ("NPROC", "NPROC_PER_NODE", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
                          "DRY_RUN", "TORCHRUN", "BENCH_DIR", "RDZV_PORT", "CKPT_ROOT")}
    base["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(list(args), cwd=cwd, env={**base, **env}, capture_output=True,
                          text=True, timeout=30, check=False)


def printed_command(proc: subprocess.CompletedProcess[str]) -> tuple[dict[str, str], list[str]]:
    """The environment and argv of the ``env VAR=.. CMD ...`` line of a dry run."""
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("env "))
    words = shlex.split(line.split(" 2>&1 ", 1)[0])[1:]
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


def torchrun_part(argv: list[str]) -> list[str]:
    i = next(i for i, w in enumerate(argv) if w.endswith("torchrun"))
    return argv[i:]


def flags(words: Sequence[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for w in words:
        if w.startswith("--"):
            name, eq, value = w.partition("=")
            out[name] = value if eq else None
    return out


# ------------------------------------------------------------------------------ every script
def test_scripts_are_found() -> None:
    names = {rel(p) for p in SCRIPTS}
    for expected in ("setup.sh", "test.sh", "demo.sh", "ci/verify-latest.sh", *DRY_RUN_SCRIPTS):
        assert f"launch/{expected}" in names


@pytest.mark.parametrize("script", SCRIPTS, ids=rel)
def test_bash_syntax(script: Path) -> None:
    assert script.read_text().startswith("#!/usr/bin/env bash\n"), "needs a bash shebang"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr


def test_readme_lists_every_file() -> None:
    readme = (LAUNCH / "README.md").read_text()
    files = [p for p in LAUNCH.rglob("*") if p.is_file() and p.name != "README.md"
             and "__pycache__" not in p.parts]
    missing = [rel(p) for p in files if f"`{p.relative_to(LAUNCH).as_posix()}`" not in readme]
    assert not missing, f"launch/README.md does not list {missing}"


@pytest.mark.parametrize("script", DRY_RUN_SCRIPTS)
def test_help(script: str, bindir: Path) -> None:
    proc = run(["bash", f"launch/{script}", "--help"], bindir, DRY_RUN="1")
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


# ------------------------------------------------------------------------------ torchrun.sh
def test_torchrun_dry_run(bindir: Path, tmp_path: Path) -> None:
    proc = run(["bash", str(LAUNCH / "torchrun.sh"), "--dry-run", "--nproc", "3", "train.py",
                "--name", "a b"], bindir, cwd=tmp_path, SHARDCKPT_IO_THREADS="8")
    env, argv = printed_command(proc)
    assert env["SHARDCKPT_IO_THREADS"] == "8" and int(env["OMP_NUM_THREADS"]) >= 1
    cmd = torchrun_part(argv)
    assert cmd[-3:] == ["train.py", "--name", "a b"]  # the script's own arguments, intact
    f = flags(cmd[1:-3])
    assert "--standalone" in f and f["--nnodes"] == "1" and f["--nproc-per-node"] == "3"


@pytest.mark.parametrize(("ngpu", "visible", "expected"),
                         [(0, None, "1"), (4, None, "4"), (4, "1,3", "2"), (4, "", "1")])
def test_torchrun_counts_gpus(bindir: Path, ngpu: int, visible: str | None,
                              expected: str) -> None:
    gpus(bindir, ngpu)
    extra = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    proc = run(["bash", "launch/torchrun.sh", "--dry-run", "--", "-m", "pkg.train"], bindir,
               **extra)
    _, argv = printed_command(proc)
    cmd = torchrun_part(argv)
    assert flags(cmd)["--nproc-per-node"] == expected
    assert cmd[-2:] == ["-m", "pkg.train"]


def test_torchrun_refuses_nonsense(bindir: Path) -> None:
    assert run(["bash", "launch/torchrun.sh", "--dry-run"], bindir).returncode == 64
    proc = run(["bash", "launch/torchrun.sh", "--dry-run", "--nproc", "0", "x.py"], bindir)
    assert proc.returncode == 64


# ------------------------------------------------------------------------------ slurm
def test_sbatch_header() -> None:
    text = (LAUNCH / "slurm" / "train.sbatch").read_text().splitlines()
    first_command = next(i for i, ln in enumerate(text) if ln.strip() and not ln.startswith("#"))
    directives = [ln for ln in text if ln.startswith("#SBATCH")]
    assert all(text.index(d) < first_command for d in directives), "#SBATCH after a command"
    joined = "\n".join(directives)
    for wanted in ("--signal=B:USR1@120", "--requeue", "--ntasks-per-node=1", "--nodes="):
        assert wanted in joined


@pytest.mark.parametrize("with_scontrol", [False, True])
def test_sbatch_dry_run(bindir: Path, with_scontrol: bool) -> None:
    nodelist = "gpu-[07-08]" if with_scontrol else "gpu-07,gpu-08"
    if with_scontrol:  # expands the compressed list, as the real one does
        fake_tool(bindir, "scontrol",
                  '[ "$1 $2" = "show hostnames" ] && printf "gpu-07\\ngpu-08\\n"')
    proc = run(["bash", "launch/slurm/train.sbatch", "train.py", "--lr", "3e-4"], bindir,
               DRY_RUN="1", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST=nodelist,
               NPROC_PER_NODE="8", SHARDCKPT_FILES_PER_RANK="4")
    env, argv = printed_command(proc)
    assert env["SHARDCKPT_FILES_PER_RANK"] == "4"
    assert argv[0] == "srun"
    srun = flags(argv[:argv.index(torchrun_part(argv)[0])])
    assert srun["--ntasks-per-node"] == "1" and srun["--nodes"] == "2"  # the #SBATCH --nodes
    cmd = torchrun_part(argv)
    assert cmd[-3:] == ["train.py", "--lr", "3e-4"]
    f = flags(cmd)
    assert f["--nnodes"] == "2" and f["--nproc-per-node"] == "8"
    assert f["--rdzv-backend"] == "c10d" and f["--rdzv-endpoint"] == "gpu-07:29500"
    assert f["--rdzv-id"] == "4242"
    assert "SIGUSR1" in (f["--signals-to-handle"] or "").split(",")
    assert "--standalone" not in f
    assert "scontrol requeue 4242" in proc.stdout


def test_sbatch_default_script(bindir: Path) -> None:
    proc = run(["bash", "launch/slurm/train.sbatch"], bindir, DRY_RUN="1", SLURM_NNODES="3",
               RDZV_PORT="29611")
    _, argv = printed_command(proc)
    cmd = torchrun_part(argv)
    assert flags(cmd)["--nnodes"] == "3" and flags(cmd)["--nproc-per-node"] == "1"
    assert flags(cmd)["--rdzv-endpoint"].endswith(":29611")  # type: ignore[union-attr]
    assert "launch/demo.py" in cmd and (REPO / "launch" / "demo.py").exists()


def _fake_slurm(bindir: Path, log: Path) -> None:
    """srun that logs its command line, then runs until SIGUSR1 (exit 0) or exits $FAKE_RC;
    scontrol that logs and expands a node list."""
    fake_tool(bindir, "srun", f"""trap 'echo "srun got USR1" >> {log}; exit 0' USR1
echo "srun $*" >> {log}
[ -n "$FAKE_RC" ] && exit "$FAKE_RC"
while :; do sleep 0.05; done""")
    fake_tool(bindir, "scontrol", f"""echo "scontrol $*" >> {log}
[ "$1 $2" = "show hostnames" ] && printf 'node-a\\nnode-b\\n'
exit 0""")


@pytest.mark.parametrize("restarts", ["0", "20"])
def test_sbatch_saves_and_requeues_on_usr1(bindir: Path, tmp_path: Path, restarts: str) -> None:
    """The batch script forwards the time-limit signal to srun, waits for it, then requeues
    (unless MAX_REQUEUES restarts happened already)."""
    log = tmp_path / "log"
    _fake_slurm(bindir, log)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DRY_RUN"))}
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", SLURM_SUBMIT_DIR=str(REPO),
               SLURM_JOB_ID="77", SLURM_NNODES="2", SLURM_JOB_NODELIST="node-[a-b]",
               SLURM_RESTART_COUNT=restarts, NPROC_PER_NODE="2")
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm" / "train.sbatch"), "train.py"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60  # a bound for a loaded machine: bash is up in ms
        while "srun " not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, err
    assert "srun got USR1" in lines
    srun = next(ln for ln in lines if ln.startswith("srun "))
    assert "--rdzv-endpoint=node-a:29500" in srun and "--rdzv-id=77" in srun
    requeued = "scontrol requeue 77" in lines
    assert requeued == (restarts == "0"), out


def test_sbatch_passes_the_exit_code_through(bindir: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    _fake_slurm(bindir, log)
    proc = run(["bash", str(LAUNCH / "slurm" / "train.sbatch"), "train.py"], bindir, cwd=tmp_path,
               SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="78", SLURM_NNODES="1",
               SLURM_JOB_NODELIST="node-a", FAKE_RC="3")
    assert proc.returncode == 3, proc.stderr
    assert not any("requeue" in ln for ln in log.read_text().splitlines())


# ------------------------------------------------------------------------------ benchmark
def test_gpu_benchmark_dry_run(bindir: Path, tmp_path: Path) -> None:
    gpus(bindir, 4)
    results = tmp_path / "results"
    proc = run(["bash", "launch/bench/gpu-benchmark.sh", "--dry-run", "--results", str(results),
                "--dir", str(tmp_path / "ckpt"), "--", "--compression", "zstd:1"], bindir)
    env, argv = printed_command(proc)
    assert int(env["OMP_NUM_THREADS"]) >= 1
    cmd = torchrun_part(argv)
    script = cmd.index("benchmarks/throughput.py")
    f = flags(cmd[:script])
    assert "--standalone" in f and f["--nproc-per-node"] == "4"
    bench = cmd[script + 1:]
    assert bench[bench.index("--size-gb") + 1] == "8"  # 2 GB per GPU
    assert bench[bench.index("--out") + 1] == f"{results}/throughput.json"
    assert bench[bench.index("--plot") + 1] == f"{results}/throughput.png"
    assert bench[-2:] == ["--compression", "zstd:1"]
    assert not results.exists(), "a dry run must not create anything"
    source = (REPO / "benchmarks" / "throughput.py").read_text()
    for flag in flags(bench):  # every flag the script passes is one throughput.py defines
        assert f'"{flag}"' in source, flag


def test_gpu_benchmark_needs_a_gpu(bindir: Path, tmp_path: Path) -> None:
    proc = run(["bash", "launch/bench/gpu-benchmark.sh", "--results", str(tmp_path / "r")],
               bindir)
    assert proc.returncode == 2 and "no GPU" in proc.stderr
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ torchrun flags
def test_torchrun_flags_exist_in_this_torch(bindir: Path, tmp_path: Path) -> None:
    """Each torchrun flag the launchers pass is one this torch's torchrun defines."""
    spec = importlib.util.find_spec("torch")  # finds the package without importing it
    assert spec is not None and spec.submodule_search_locations
    run_py = Path(next(iter(spec.submodule_search_locations))) / "distributed" / "run.py"
    source = run_py.read_text()
    gpus(bindir, 2)
    commands = [
        run(["bash", "launch/torchrun.sh", "--dry-run", "x.py"], bindir),
        run(["bash", "launch/slurm/train.sbatch", "x.py"], bindir, DRY_RUN="1"),
        run(["bash", "launch/bench/gpu-benchmark.sh", "--dry-run", "--results",
             str(tmp_path / "r")], bindir),
    ]
    used: set[str] = set()
    for proc in commands:
        cmd = torchrun_part(printed_command(proc)[1])
        end = next(i for i, w in enumerate(cmd) if w.endswith(".py"))
        used |= set(flags(cmd[1:end]))
    assert used >= {"--nproc-per-node", "--nnodes", "--standalone", "--rdzv-backend"}
    for flag in used:
        assert f'"{flag}"' in source, f"torchrun has no {flag}"


# ------------------------------------------------------------------------------ prune examples
def _cron_commands() -> list[str]:
    out = []
    for line in (LAUNCH / "cron" / "shardckpt-prune.crontab").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if re.fullmatch(r"[A-Z_]+=.*", line):  # SHELL=..., PATH=...
            continue
        fields = line.split(None, 5)
        assert len(fields) == 6, f"not a crontab entry: {line!r}"
        assert all(re.fullmatch(r"[0-9*/,-]+", f) for f in fields[:5]), line
        out.append(fields[5])
    assert out, "the crontab has no entry"
    return out


def _unit(name: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in (LAUNCH / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def _service_command() -> str:
    unit = _unit("shardckpt-prune.service")
    command = unit["ExecStart"][0]
    for assignment in unit.get("Environment", []):
        name, _, value = assignment.partition("=")
        command = command.replace("${" + name + "}", value)
    assert "${" not in command, f"ExecStart uses an unset variable: {command}"
    return command


def _prune_argv(command: str, root: Path) -> list[str]:
    """The example's argv with its root swapped for ``root`` and its policy for the example
    policy file; checks that it runs the shardckpt console script's ``prune``."""
    words = shlex.split(command.split(">>", 1)[0])
    assert Path(words[0]).name == "shardckpt", words[0]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^shardckpt = "shardckpt\.cli\.main:main"$', pyproject, re.M)
    assert words[1] == "prune"
    args = words[2:]
    args[0] = str(root)
    config = args.index("--config") + 1
    assert args[config].endswith("prune-policy.toml")
    args[config] = str(LAUNCH / "prune-policy.example.toml")
    return ["prune", *args, "--dry-run"]


def _make_root(path: Path) -> Path:
    import torch

    import shardckpt

    with shardckpt.CheckpointManager(str(path), async_save=False, capture_rng=False) as mgr:
        for step in (1, 2, 3, 4, 5):  # the example policy ranks by val_loss: best are 5, 4
            mgr.save(step, {"w": torch.full((4,), float(step))}, metrics={"val_loss": 1 / step})
    return path


def test_cron_and_systemd_run_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from shardckpt.cli import commands
    from shardckpt.cli.main import main

    assert "prune" in commands.COMMANDS
    root = _make_root(tmp_path / "run")
    for command in (*_cron_commands(), _service_command()):
        assert "--json" in command
        code = main(_prune_argv(command, root))
        out = capsys.readouterr()
        assert code == 0, out.err
        doc = json.loads(out.out)
        assert doc["dry_run"] is True
        kept = {k["step"] for k in doc["kept"]}
        assert kept == {3, 4, 5} and doc["deleted"] == [1, 2]  # keep_last 3 (best 2 in them)
    assert sorted(int(p.name[5:]) for p in root.glob("step-*")) == [1, 2, 3, 4, 5]


def test_systemd_timer_starts_the_service() -> None:
    timer = _unit("shardckpt-prune.timer")
    assert timer["Unit"] == ["shardckpt-prune.service"]
    assert (LAUNCH / "systemd" / "shardckpt-prune.service").exists()
    assert timer["OnCalendar"] and timer["WantedBy"] == ["timers.target"]
    service = _unit("shardckpt-prune.service")
    assert service["Type"] == ["oneshot"]


def test_ci_example_runs_the_verify_script(bindir: Path) -> None:
    workflow = (LAUNCH / "ci" / "github-actions-verify.yml").read_text()
    used = re.findall(r"launch/[\w./-]+\.sh", workflow)
    assert used and all((REPO / u).exists() for u in used)
    proc = run(["bash", "launch/ci/verify-latest.sh", "--help"], bindir)
    assert proc.returncode == 64 and "usage" in proc.stdout


# ------------------------------------------------------------------------------ doc links
def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S),
                              re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_relative_links_resolve() -> None:
    """Links from README.md, launch/README.md and docs/ to files (and headings) of this
    repository exist."""
    pages = [REPO / "README.md", LAUNCH / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{rel(page)} -> {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{rel(page)} -> {target} (no such heading)")
    assert not broken, broken
