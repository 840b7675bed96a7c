"""One convention for numbers in every command's JSON (docs/CLI.md): accuracies are percent
(0-100, "accuracy points", as the paper reports them); every other share - density, bit
match, rates, ratios, strengths, null rates, agreements - is a fraction in [0, 1]."""

import json
import re

from helpers import run

PERCENT = re.compile(r"accurac")  # test_accuracy, trigger_accuracy, accuracies, ...
FRACTION = re.compile(r"(^|_)(density|bit_match|ratio|rate|strength|fraction|agreement)"
                      r"(_|s?$)")


def shares(doc, key=""):
    """Every (key, number) under keys that name an accuracy or a share, at any depth."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from shares(v, k)
    elif isinstance(doc, list):
        for v in doc:
            yield from shares(v, key)
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool):
        if PERCENT.search(key) or FRACTION.search(key):
            yield key, float(doc)


def json_of(*args):
    result = run(*args, "--json")
    assert result.exit_code in (0, 1), result.stderr
    return json.loads(result.stdout)


def test_accuracies_are_percent_and_shares_are_fractions(tmp_path):
    t, s = tmp_path / "t.safetensors", tmp_path / "s.safetensors"
    docs = [json_of("find", "--epochs", "2", "--max-rounds", "1", "--rates", "0.3",
                    "--out", t, "--run-dir", tmp_path / "run"),
            json_of("split", t, "--score", "random", "--key-ratio", "0.1",
                    "--key-mask", tmp_path / "k.safetensors", "--locked",
                    tmp_path / "l.safetensors"),
            json_of("sign", t, "--message", "m", "--out", s, "--receipt", tmp_path / "r.json"),
            json_of("verify", s, "--receipt", tmp_path / "r.json"),
            json_of("attack", "prune", s, "--rates", "0.1,0.3", "--receipt", tmp_path / "r.json"),
            json_of("inspect", s)]
    seen = [(k, v) for doc in docs for k, v in shares(doc)]
    accuracies = [v for k, v in seen if PERCENT.search(k)]
    fractions = [(k, v) for k, v in seen if not PERCENT.search(k)]
    assert all(0.0 <= v <= 100.0 for v in accuracies), accuracies
    # Trained digits models score far above 1%, so a fraction would be caught here.
    assert max(accuracies) > 1.0
    assert all(0.0 <= v <= 1.0 for _, v in fractions), fractions
    # The walk saw each kind of share the commands report.
    names = {k for k, _ in fractions}
    assert {"density", "key_ratio", "bit_match", "strength"} <= names, names
