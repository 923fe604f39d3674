"""A user's own command as a trainable: template rendering, both metric channels, and every way a run ends.

The programs run here are real processes: the toy trainer in `trainables/examples`, and small
Python scripts written per test for the failure modes (hang, crash, out of memory, no metrics).
"""

from __future__ import annotations

import json
import signal
import statistics
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autotune.schema import Status
from trainables.command import PLACEHOLDERS, TemplateError, render_argv, run_command

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(REPO)}
VALUES = {
    "ep": 2, "tp": 1, "pp": 1, "dp": 2, "micro_batch_size": 2, "global_batch_size": 16, "seq_len": 64,
    "precision": "bf16", "recompute": "none", "schedule": "1f1b", "nproc": 4, "nnodes": 1, "node_rank": 0,
    "master_addr": "10.0.0.7", "master_port": 29500, "world_size": 4, "metrics_file": "trial-3/metrics.jsonl",
    "trial_dir": "/runs/study/trial-3", "seed": 0, "grad_accum": 2, "dtype": "bfloat16", "bf16": "true",
    "fp16": "false", "recompute_on": "false",
}
TOY = [sys.executable, "-m", "trainables.examples.toy_train", "--ep", "{ep}", "--tp", "{tp}", "--pp", "{pp}",
       "--dp", "{dp}", "--micro-batch-size", "{micro_batch_size}", "--global-batch-size", "{global_batch_size}",
       "--seq-len", "{seq_len}", "--precision", "{precision}", "--recompute", "{recompute}",
       "--steps", "3", "--warmup-steps", "1"]
TOY_REGEX = {"step": r"^step (\d+)", "loss": r"^step .*loss ([0-9.eE+-]+)",
             "step_time_s": r"^step .*step time ([0-9.eE+-]+) s",
             "peak_mem_bytes": r"peak memory (\d+) bytes"}


def script(tmp_path: Path, body: str, name: str = "prog.py") -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


# ---------------------------------------------------------------------------------------------
# Rendering


def test_every_placeholder_renders_to_one_argument_each():
    template = ["train"] + [f"--{name}={{{name}}}" for name in PLACEHOLDERS] + ["{trial_dir}"]
    argv = render_argv(template, VALUES)
    assert argv[0] == "train" and len(argv) == len(template)
    assert argv[1:] == [f"--{name}={VALUES[name]}" for name in PLACEHOLDERS] + ["/runs/study/trial-3"]


def test_literal_braces_and_unused_values():
    argv = render_argv(["prog", "--json={{\"ep\": {ep}}}", "}}{{"], {"ep": 4, "tp": 2, "unrelated": object()})
    assert argv == ["prog", '--json={"ep": 4}', "}{"]


def test_the_command_runs_without_a_shell(tmp_path):
    """Shell syntax in the template is passed through as text, never interpreted."""
    argv = render_argv(script(tmp_path, """
        import json, sys
        json.dump(sys.argv[1:], open("args.json", "w"))
        print("step 0 step time 0.5 s")
    """) + ["$HOME", "a b; echo hi", "`id`", "{tp}"], {"tp": 2})
    out = run_command(argv, cwd=tmp_path, metrics_regex={"step_time_s": r"step time ([0-9.]+) s"}, timeout_s=20)
    assert out.status == Status.OK, out.reason
    assert json.loads((tmp_path / "args.json").read_text()) == ["$HOME", "a b; echo hi", "`id`", "2"]


@pytest.mark.parametrize("value", [
    "; rm -rf /", "$(reboot)", "`id`", "a b", "x\nsh", "tab\there", "a|b", "a&&b", "x>y", "a'b", 'a"b',
    "$HOME", "*", "~root", "-rf", "--help", "", "é", "a\x00b",
])
def test_text_values_outside_the_safe_charset_are_refused(value):
    with pytest.raises(TemplateError) as err:
        render_argv(["prog", "--out", "{trial_dir}"], {"trial_dir": value})
    msg = str(err.value)
    assert "template item 2 ('{trial_dir}')" in msg and "{trial_dir}" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("value,words", [
    (True, "whole number"), (2.0, "whole number"), ("2", "whole number"), (None, "whole number"),
    (-1, "0 or more"),
])
def test_whole_number_values_must_be_ints(value, words):
    with pytest.raises(TemplateError, match=words):
        render_argv(["prog", "--ep={ep}"], {"ep": value})


@pytest.mark.parametrize("template,words", [
    (["prog", "--x={foo}"], "unknown placeholder {foo}; use one of {ep}"),
    (["prog", "--mb={micro_batch}"], "did you mean {micro_batch_size}?"),
    (["prog", "--ep={ep"], "unmatched '{' at column 6; write '{{'"),
    (["prog", "--ep=ep}"], "unmatched '}'"),
    (["prog", "{}"], "empty placeholder"),
    (["prog", "{ep:03d}"], "write {ep}"),
    (["prog", "{ep!r}"], "write {ep}"),
    (["prog", "{ep.__class__}"], "write {ep}"),
    (["prog", "{seed[0]}"], "write {seed}"),
    (["prog", 3], "template item 1 is int (3), not text; write every argv element as a string, e.g. '3'"),
    (["prog", None], "template item 1 is NoneType"),
    ("python train.py --ep {ep}", "is text, not a list"),
    ([], "is empty"),
    (["", "x"], "the program) is empty"),
    (["prog", "a\x00b"], "NUL"),
])
def test_bad_templates_name_the_item_and_the_fix(template, words):
    with pytest.raises(TemplateError) as err:
        render_argv(template, VALUES)
    assert words in str(err.value)


def test_a_placeholder_without_a_value_is_an_error():
    with pytest.raises(TemplateError, match=r"template item 1 \('--tp=\{tp\}'\): no value for \{tp\}"):
        render_argv(["prog", "--tp={tp}"], {"ep": 1})


# ---------------------------------------------------------------------------------------------
# Running the toy trainer through both channels


def test_toy_trainer_through_the_metrics_file(tmp_path):
    seen = []
    argv = render_argv(TOY + ["--metrics-file", "{metrics_file}"], {**VALUES, "metrics_file": "out/metrics.jsonl"})
    out = run_command(argv, cwd=tmp_path, env=ENV, metrics_file="out/metrics.jsonl", timeout_s=60,
                      on_step=seen.append)
    assert out.status == Status.OK, (out.reason, out.log_path.read_text())
    assert out.returncode == 0 and out.reason == "" and out.notes == []
    assert [s["step"] for s in out.steps] == [0, 1, 2, 3]
    assert [s["phase"] for s in out.steps] == ["warmup", "measure", "measure", "measure"]
    assert seen == out.steps
    s = out.summary
    assert s["tokens_per_s"] > 0 and s["step_time_s"] > 0 and s["step_time_p90_s"] >= s["step_time_s"]
    assert isinstance(s["peak_mem_bytes"], int) and s["peak_mem_bytes"] > 1_000_000
    assert s["loss_first"] == out.steps[0]["loss"] and s["loss_last"] == out.steps[-1]["loss"]
    # the program's own summary is kept as written: its median over the measured steps
    assert s["step_time_s"] == pytest.approx(statistics.median(x["step_time_s"] for x in out.steps[1:]))
    assert out.log_path == tmp_path / "command.log"
    log = out.log_path.read_text()
    assert log.startswith("$ ") and "step 3 measure" in log and "EP2_TP1_PP1_DP2" in log


def test_toy_trainer_through_printed_lines(tmp_path):
    seen = []
    argv = render_argv(TOY, VALUES)
    log = tmp_path / "logs" / "trial.log"
    out = run_command(argv, cwd=tmp_path, env=ENV, metrics_regex=TOY_REGEX, timeout_s=60, on_step=seen.append,
                      warmup_steps=1, tokens_per_step=16 * 64, log_path=log)
    assert out.status == Status.OK, (out.reason, log.read_text())
    assert out.log_path == log and "done: median step time" in log.read_text()
    assert [(s["step"], s["phase"]) for s in out.steps] == [(0, "warmup"), (1, "measure"), (2, "measure"),
                                                            (3, "measure")]
    assert seen == out.steps and all("loss" in s and "step_time_s" in s for s in seen)
    median = statistics.median(s["step_time_s"] for s in out.steps[1:])
    assert out.summary["step_time_s"] == pytest.approx(median)
    assert out.summary["tokens_per_s"] == pytest.approx(16 * 64 / median)
    assert out.summary["loss_first"] == out.steps[0]["loss"]
    assert isinstance(out.summary["peak_mem_bytes"], int)


def test_toy_trainer_layout_error_is_a_crash_with_its_message(tmp_path):
    argv = render_argv(TOY + ["--metrics-file", "{metrics_file}"], {**VALUES, "ep": 3, "metrics_file": "m.jsonl"})
    out = run_command(argv, cwd=tmp_path, env=ENV, metrics_file="m.jsonl", timeout_s=30)
    assert out.status == Status.CRASHED and out.returncode == 2
    assert out.reason == "exit code 2: error: experts (8) must be divisible by ep (3)"


# ---------------------------------------------------------------------------------------------
# Steps arrive while the program runs


HANDSHAKE = """
    import json, os, sys, time
    # step 1 only comes after the tuner has seen step 0: the test's on_step creates 'go'
    def emit(record, text):
        if "--file" in sys.argv:
            with open("m.jsonl", "a") as f:
                f.write(json.dumps(record) + "\\n")
        print(text, flush=True)
    emit({"type": "step", "step": 0, "step_time_s": 0.25, "loss": 2.0}, "step 0 loss 2.0 time 0.25")
    deadline = time.time() + 15
    while not os.path.exists("go"):
        if time.time() > deadline:
            sys.exit("nobody saw step 0 while the program ran")
        time.sleep(0.01)
    emit({"type": "step", "step": 1, "step_time_s": 0.5, "loss": 1.0}, "step 1 loss 1.0 time 0.5")
"""


@pytest.mark.parametrize("channel", ["file", "regex"])
def test_on_step_sees_each_step_while_the_program_runs(tmp_path, channel):
    seen: list[tuple[int, bool]] = []

    def on_step(step):
        seen.append((step["step"], (tmp_path / "go").exists()))
        (tmp_path / "go").touch()

    argv = script(tmp_path, HANDSHAKE) + (["--file"] if channel == "file" else [])
    source = {"metrics_file": "m.jsonl"} if channel == "file" else \
        {"metrics_regex": {"step": r"^step (\d+)", "loss": r"loss (\S+)", "step_time_s": r"time (\S+)"}}
    out = run_command(argv, cwd=tmp_path, timeout_s=20, on_step=on_step, **source)
    assert out.status == Status.OK, out.reason
    assert seen == [(0, False), (1, True)]
    assert out.summary == {"step_time_s": 0.375, "step_time_p90_s": 0.475, "loss_first": 2.0, "loss_last": 1.0}
    assert out.duration_s < 10


def test_an_exception_in_on_step_stops_the_command_and_propagates(tmp_path):
    argv = script(tmp_path, """
        import os, time
        open("pid", "w").write(str(os.getpid()))
        print("step 0 time 0.1", flush=True)
        time.sleep(60)
    """)

    def on_step(step):
        raise KeyError("stop here")

    with pytest.raises(KeyError, match="stop here"):
        run_command(argv, cwd=tmp_path, timeout_s=30, on_step=on_step, grace_s=1,
                    metrics_regex={"step_time_s": r"time (\S+)"})
    assert not alive(int((tmp_path / "pid").read_text()))


# ---------------------------------------------------------------------------------------------
# Timeouts, crashes, out of memory


def test_timeout_kills_the_whole_process_group(tmp_path):
    """The program and a child of its own that ignores SIGTERM: both are gone after the timeout."""
    argv = script(tmp_path, """
        import json, os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
        open("pids.json", "w").write(json.dumps([os.getpid(), child.pid]))
        with open("m.jsonl", "w") as f:
            f.write(json.dumps({"type": "step", "step": 0, "step_time_s": 0.1}) + "\\n")
        time.sleep(120)
    """)
    t0 = time.monotonic()
    out = run_command(argv, cwd=tmp_path, metrics_file="m.jsonl", timeout_s=1.5, grace_s=0.5)
    elapsed = time.monotonic() - t0
    assert out.status == Status.TIMEOUT
    assert out.reason == ("the command ran past its 1.5 s limit after 1 step; its process group was stopped "
                          "(SIGTERM, then SIGKILL after 0.5 s)")
    assert out.returncode == -signal.SIGTERM and len(out.steps) == 1
    pids = json.loads((tmp_path / "pids.json").read_text())
    assert [alive(p) for p in pids] == [False, False]
    assert elapsed < 8


def test_a_program_that_stops_on_sigterm_needs_no_sigkill(tmp_path):
    argv = script(tmp_path, "import time\ntime.sleep(120)\n")
    out = run_command(argv, cwd=tmp_path, metrics_file="m.jsonl", timeout_s=0.5, grace_s=5)
    assert out.status == Status.TIMEOUT and out.reason.endswith("(SIGTERM)")
    assert out.duration_s < 4


def test_processes_left_behind_after_exit_are_stopped(tmp_path):
    argv = script(tmp_path, """
        import json, subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open("child", "w").write(str(child.pid))
        with open("m.jsonl", "w") as f:
            f.write(json.dumps({"type": "summary", "tokens_per_s": 1000.0}) + "\\n")
    """)
    out = run_command(argv, cwd=tmp_path, metrics_file="m.jsonl", timeout_s=20, grace_s=1)
    assert out.status == Status.OK and out.summary == {"tokens_per_s": 1000.0}
    assert not alive(int((tmp_path / "child").read_text()))
    assert any("left running" in n for n in out.notes)


@pytest.mark.parametrize("body,returncode,reason", [
    ("import sys\nprint('loading', flush=True)\nprint('ValueError: bad config', file=sys.stderr)\nsys.exit(3)",
     3, "exit code 3: ValueError: bad config"),
    ("import os, signal, sys\nprint('segfaulting', file=sys.stderr, flush=True)\nos.kill(os.getpid(), signal.SIGSEGV)",
     -signal.SIGSEGV, "killed by SIGSEGV: segfaulting"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
     -signal.SIGKILL,
     "killed by SIGKILL (from outside the program: the out-of-memory killer or a scheduler): (no output)"),
    ("import sys\nprint('no stderr, last stdout line')\nsys.exit(1)", 1, "exit code 1: no stderr, last stdout line"),
])
def test_a_non_zero_exit_is_a_crash_with_code_or_signal_and_last_line(tmp_path, body, returncode, reason):
    out = run_command(script(tmp_path, body), cwd=tmp_path, metrics_file="m.jsonl", timeout_s=20)
    assert (out.status, out.returncode, out.reason) == (Status.CRASHED, returncode, reason)


@pytest.mark.parametrize("body,returncode,shown", [
    ("import sys\nprint('Traceback (most recent call last):', file=sys.stderr)\n"
     "print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB', file=sys.stderr)\n"
     "print('[rank0]: exiting', file=sys.stderr)\nsys.exit(1)",
     1, "out of memory (exit code 1): torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    ("x = bytearray(1)\nraise MemoryError('cannot allocate the activations')",
     1, "out of memory (exit code 1): MemoryError: cannot allocate the activations"),
    ("import os, signal, sys\nprint('Killed', file=sys.stderr, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)",
     -9, "out of memory (killed by SIGKILL): Killed (the kernel's out-of-memory killer, most likely)"),
    ("import sys\nprint('/bin/sh: line 1: 4242 Killed  python train.py', file=sys.stderr)\nsys.exit(137)",
     137, "out of memory (killed by SIGKILL (exit 137)): Killed (the kernel's out-of-memory killer, most likely)"),
])
def test_out_of_memory_is_recognised(tmp_path, body, returncode, shown):
    out = run_command(script(tmp_path, body), cwd=tmp_path, metrics_file="m.jsonl", timeout_s=20)
    assert (out.status, out.returncode, out.reason) == (Status.OOM, returncode, shown)


def test_a_status_in_the_summary_line_is_kept(tmp_path):
    argv = script(tmp_path, """
        import json, sys
        with open("m.jsonl", "w") as f:
            f.write(json.dumps({"type": "summary", "status": "oom", "reason": "rank 3: expert buffers"}) + "\\n")
        sys.exit(1)
    """)
    out = run_command(argv, cwd=tmp_path, metrics_file="m.jsonl", timeout_s=20)
    assert (out.status, out.reason) == (Status.OOM, "rank 3: expert buffers")


def test_exit_zero_without_metrics_is_no_metrics_with_the_last_lines(tmp_path):
    argv = script(tmp_path, "print('warming up')\nprint('trained, but wrote nothing')\n")
    out = run_command(argv, cwd=tmp_path, metrics_file="m.jsonl", timeout_s=20)
    assert out.status == Status.NO_METRICS and out.returncode == 0
    assert out.reason.startswith(f"no metrics: the command exited 0 but {tmp_path / 'm.jsonl'} was never created")
    assert out.reason.endswith("its last lines: warming up | trained, but wrote nothing")
    out = run_command(argv, cwd=tmp_path, metrics_regex={"tokens_per_s": r"(\d+) tok/s"}, timeout_s=20)
    assert out.status == Status.NO_METRICS
    assert r"no printed line matched metrics_regex (tokens_per_s: (\d+) tok/s)" in out.reason
    assert "its last lines: warming up | trained, but wrote nothing" in out.reason
    out = run_command(argv, cwd=tmp_path, metrics_preset="torchtitan", timeout_s=20)
    assert out.status == Status.NO_METRICS
    assert "no printed line matched metrics_preset torchtitan (its step lines 'step: N loss:" in out.reason


def test_steps_without_throughput_are_no_metrics(tmp_path):
    argv = script(tmp_path, "print('step 0 loss 2.5')\n")
    out = run_command(argv, cwd=tmp_path, metrics_regex={"loss": r"loss (\S+)"}, timeout_s=20)
    assert out.status == Status.NO_METRICS and "no throughput" in out.reason
    assert "1 step line(s) matched metrics_regex (loss: loss (\\S+))" in out.reason and "step 0 loss 2.5" in out.reason


def test_stale_and_malformed_metric_lines(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"type": "summary", "tokens_per_s": 1e9}) + "\n")
    argv = script(tmp_path, """
        import json
        with open("m.jsonl", "w") as f:
            f.write("not json\\n[1, 2]\\n")
            f.write(json.dumps({"type": "step", "step": 0, "step_time_s": "fast"}) + "\\n")
            f.write(json.dumps({"type": "step", "step": 1, "step_time_s": 0.5, "tokens_per_s": 100}) + "\\n")
            f.write(json.dumps({"type": "summary", "peak_mem_bytes": 123, "status": "fine"}))  # no newline
    """)
    out = run_command(argv, cwd=tmp_path, metrics_file="m.jsonl", timeout_s=20)
    assert out.status == Status.OK, out.reason
    assert out.summary["tokens_per_s"] == 100 and out.summary["peak_mem_bytes"] == 123  # not the stale 1e9
    assert out.notes == ["m.jsonl:1: not JSON; ignored", "m.jsonl:2: not a JSON object; ignored",
                         "m.jsonl:3: step_time_s 'fast' is not a number; left out",
                         "m.jsonl:5: summary status 'fine' is not one of ok, oom, timeout, crashed, invalid, "
                         "pruned_by_memory_model, early_stopped, node_lost, no_metrics; ignored"]


def test_a_missing_program_is_a_crash_not_an_exception(tmp_path):
    out = run_command(["no-such-trainer-here", "--ep", "2"], cwd=tmp_path, metrics_file="m.jsonl", timeout_s=5)
    assert out.status == Status.CRASHED and out.returncode is None
    assert out.reason.startswith("cannot start 'no-such-trainer-here': no such program")


@pytest.mark.parametrize("kwargs,words", [
    ({}, "exactly one of metrics_file"),
    ({"metrics_file": "m", "metrics_regex": {"loss": "(x)"}}, "exactly one of metrics_file"),
    ({"metrics_regex": {"step_time": r"(\d+)"}}, "did you mean 'step_time_s'?"),
    ({"metrics_regex": {"loss": r"loss \d+"}}, "has 0 groups; it needs exactly one"),
    ({"metrics_regex": {"loss": r"(a)(b)"}}, "has 2 groups"),
    ({"metrics_regex": {"loss": r"(unclosed"}}, "is not a valid regex"),
    ({"metrics_regex": {"peak_mem_bytes": r"(\d+)"}}, "no pattern for loss, step_time_s, tokens_per_s"),
    ({"metrics_file": "m", "timeout_s": 0}, "timeout_s must be a positive number"),
])
def test_bad_arguments_raise(tmp_path, kwargs, words):
    kwargs.setdefault("timeout_s", 5)
    with pytest.raises(ValueError, match=words.replace("?", r"\?").replace("(", r"\(")):
        run_command(["true"], cwd=tmp_path, **kwargs)
    assert not (tmp_path / "command.log").exists()


def test_env_is_added_to_the_environment_and_none_removes(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_TEST_DROP", "1")
    argv = script(tmp_path, """
        import os
        print("step 0 time 0.1", os.environ.get("EXTRA"), os.environ.get("AUTOTUNE_TEST_DROP"),
              os.environ.get("PYTHONUNBUFFERED"), "PATH" in os.environ)
    """)
    out = run_command(argv, cwd=tmp_path, env={"EXTRA": "yes", "AUTOTUNE_TEST_DROP": None},
                      metrics_regex={"step_time_s": r"time (\S+)"}, timeout_s=20)
    assert out.status == Status.OK
    assert "step 0 time 0.1 yes None 1 True" in out.log_path.read_text()


def test_the_tuners_own_credentials_are_withheld_unless_the_program_asks_for_them(tmp_path, monkeypatch):
    token = "f00dfeed" * 8
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)  # as a Ray worker running a trial holds it
    monkeypatch.setenv("PGPASSWORD", "pg-" + token)
    argv = script(tmp_path, """
        import os
        print(dict(os.environ))  # a program that dumps its environment when it fails
        print("step 0 time 0.1", os.environ.get("RAY_AUTH_TOKEN"), os.environ.get("PGPASSWORD"))
    """)
    out = run_command(argv, cwd=tmp_path, metrics_regex={"step_time_s": r"time (\S+)"}, timeout_s=20)
    assert out.status == Status.OK and "step 0 time 0.1 None None" in out.log_path.read_text()
    assert token not in out.log_path.read_text()
    out = run_command(argv, cwd=tmp_path, env={"PGPASSWORD": "given"}, metrics_regex={"step_time_s": r"time (\S+)"},
                      timeout_s=20)
    assert "step 0 time 0.1 None given" in out.log_path.read_text()
