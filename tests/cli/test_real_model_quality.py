"""Optional quality check with the real all-MiniLM-L6-v2 weights (`aiwfe models pull`).

Runs only where the weights are in the home (`$AIWFE_HOME/models/all-MiniLM-L6-v2`, default
`~/.aiwfe`); elsewhere it is SKIPPED, which says nothing about quality. The tests that run
everywhere use a tiny model the tests build (tests/cognitive/test_onnx_backend.py).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from aiwfe.app.suite import start_suite
from tests.cli.test_cli import aiwfe, cli_env, login_as
from tests.conftest import ADMIN_PASSWORD

__all__ = ["cli_env"]  # the fixture, imported for this module's tests

WEIGHTS = Path(os.environ.get("AIWFE_HOME", "~/.aiwfe")).expanduser() / "models/all-MiniLM-L6-v2"

pytestmark = pytest.mark.skipif(
    not (WEIGHTS / "model.onnx").is_file() or not (WEIGHTS / "tokenizer.json").is_file(),
    reason=f"real all-MiniLM-L6-v2 weights not in {WEIGHTS} (aiwfe models pull)",
)


async def test_classify_ranks_bug_first_with_the_real_model(base_overrides, cli_env) -> None:
    """`aiwfe classify "the server crashed with a segfault" -l bug -l feature -l question`
    ranks bug first with a clear margin, and names the onnx model (the hashing embedder
    ties bug and question at 0.000)."""
    overrides = copy.deepcopy(base_overrides)
    minilm = {"kind": "onnx", "model": "all-MiniLM-L6-v2", "path": str(WEIGHTS)}
    overrides["cognitive"] = {"embedding": {"default": "minilm", "backends": {"minilm": minilm}}}
    suite = await start_suite(overrides)
    try:
        gw = ["--gateway", suite.address("gateway")]
        await login_as(cli_env, gw[1], "admin", ADMIN_PASSWORD)
        text = "the server crashed with a segfault"
        args = ["classify", text, "-l", "bug", "-l", "feature", "-l", "question", "--json"]
        ranked = await aiwfe(cli_env, *args, *gw)
        assert ranked.code == 0, ranked
        reply = json.loads(ranked.out)
        labels = reply["labels"]
        assert labels[0]["label"] == "bug", labels
        assert labels[0]["score"] - labels[1]["score"] > 0.05, labels
        assert reply["model"] == "onnx/all-MiniLM-L6-v2"
    finally:
        await suite.stop()
