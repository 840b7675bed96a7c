"""One vocabulary across commands (docs/CLI.md, "One vocabulary"): every option has help, every
single output file is `--out`/`-o`, renamed options keep their old spelling hidden, and the
shell completion knows commands, options and closed choices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_GUARD_S, assert_one_line_error, make_ticket, run
from typer._click import core

from ticketctl.artifacts import load_ticket, save_ticket
from ticketctl.cli.app import COMMANDS, load_command

# (command path, old flag, new flag): the spellings scripts used before the renaming
RENAMED = [
    (("split",), "--key", "--key-mask"),
    (("attack", "nokey"), "--key", "--key-mask"),
    (("attack", "fake1"), "--key", "--key-mask"),
    (("attack", "fake1"), "--key-ratio", "--key-ratios"),
    (("attack", "prune"), "--ratios", "--rates"),
    (("attack", "finetune"), "--epochs", "--sweep-epochs"),
]


def _commands():
    """(path, command) for every leaf command, loaded as when it runs."""
    out = []

    def walk(cmd, path):
        if hasattr(cmd, "list_commands"):
            ctx = core.Context(cmd)
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), (*path, name))
        else:
            out.append((path, cmd))

    for name in COMMANDS:
        walk(load_command(name), (name,))
    return out


ALL = _commands()


def _flags(cmd, hidden=None):
    return {flag for p in cmd.params if hidden is None or bool(getattr(p, "hidden", False))
            == hidden for flag in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]}


def test_every_option_and_argument_has_help():
    missing = [(" ".join(path), p.name) for path, cmd in ALL for p in cmd.params
               if not getattr(p, "help", None)]
    assert missing == []


def test_every_single_output_file_is_out_or_o():
    for path, cmd in ALL:
        for p in cmd.params:
            opts = getattr(p, "opts", [])
            if "--out" in opts:
                assert "-o" in opts, path


@pytest.mark.parametrize("path,old,new", RENAMED)
def test_old_spellings_are_hidden_but_kept(path, old, new):
    cmd = dict(ALL)[path]
    assert new in _flags(cmd, hidden=False)
    assert old in _flags(cmd, hidden=True) and old not in _flags(cmd, hidden=False)
    shown = run(*path, "--help").stdout
    assert new in shown and f"{old} " not in shown


def test_split_takes_either_spelling_once(tmp_path):
    t = tmp_path / "t.safetensors"
    save_ticket(make_ticket(), t)
    common = ["split", t, "--score", "random", "--key-ratio", "0.1", "--json"]
    new = run(*common, "--key-mask", tmp_path / "k1", "--locked", tmp_path / "l1")
    old = run(*common, "--key", tmp_path / "k2", "--locked", tmp_path / "l2")
    assert new.exit_code == 0 and old.exit_code == 0, (new.stderr, old.stderr)
    assert json.loads(new.stdout)["key"].endswith("k1")
    # the same key either way (same seed): the old flag is only another name
    assert load_ticket(tmp_path / "k1").tensors_sha256() == \
        load_ticket(tmp_path / "k2").tensors_sha256()
    both = run(*common, "--key", tmp_path / "k3", "--key-mask", tmp_path / "k4", "--locked",
               tmp_path / "l3")
    assert both.exit_code == 2 and json.loads(both.stdout)["exit_code"] == 2
    assert "--key is the old spelling of --key-mask" in both.stderr
    assert not (tmp_path / "k3").exists() and not (tmp_path / "k4").exists()
    assert_one_line_error(run(*common[:-1], "--locked", tmp_path / "l4"), 2,
                          "missing option --key-mask")


def test_prune_takes_its_old_list_flag(tmp_path):
    t = tmp_path / "t.safetensors"
    save_ticket(make_ticket(), t)
    docs = [run("attack", "prune", t, flag, "0.1,0.3", "--dataset", "digits", "--json")
            for flag in ("--rates", "--ratios")]
    assert [d.exit_code for d in docs] == [0, 0], [d.stderr for d in docs]
    rows = [[r["strength"] for r in json.loads(d.stdout)["rows"]] for d in docs]
    assert rows[0] == rows[1] == [0.1, 0.3]


def _complete(words: str) -> list[str]:
    """What bash completion offers after `words` (Click's protocol, as the installed script
    calls it)."""
    exe = Path(sys.executable).with_name("ticketctl")
    env = {**os.environ, "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1),
           "_TICKETCTL_COMPLETE": "complete_bash"}
    proc = subprocess.run([str(exe)], env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.slow
def test_shell_completion_knows_commands_options_and_choices():
    assert _complete("ticketctl sp") == ["split"]
    assert _complete("ticketctl split --sc") == ["--score"]
    assert set(_complete("ticketctl split --score ")) == {"omp", "ewp", "betweenness", "random"}
    assert _complete("ticketctl attack fin") == ["finetune"]
    # old spellings are not offered
    assert _complete("ticketctl attack finetune --sw") == ["--sweep-epochs"]
    assert "--epochs" not in _complete("ticketctl attack finetune --ep")
    script = run("--show-completion", "bash")
    assert script.exit_code == 0 and "_TICKETCTL_COMPLETE" in script.stdout
