"""docs/scaling.md: its memory table is what the estimator prints, and its commands use real
configuration keys and CLI flags (a renamed option breaks this test, not a user's cluster job)."""

from __future__ import annotations

import pathlib
import re

from recipes.memdlm.cli import build_parser
from recipes.memdlm.config import SHORTHANDS, Config
from recipes.memdlm.estimate import table
from tests.recipes.test_docs import leaf_keys

DOC = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "scaling.md").read_text()
COMMANDS = re.findall(r"```bash\n(.*?)```", DOC, flags=re.S)


def test_the_memory_table_is_the_estimate():
    assert table() in DOC


def test_commands_use_existing_options():
    keys = set(leaf_keys(Config))
    commands = build_parser()._subparsers._group_actions[0].choices.values()
    flags = {o for command in commands for a in command._actions for o in a.option_strings}
    flags |= {f"--{name}" for name in SHORTHANDS}
    text = "\n".join(COMMANDS)
    assert "-m recipes.memdlm train" in text
    dotted = set(re.findall(r"--([a-z_]+\.[a-z_0-9]+)", text))
    assert dotted and not dotted - keys, sorted(dotted - keys)
    plain = {f for f in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)(?=[ =\n])", text)}
    torchrun = {"--standalone", "--nproc-per-node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint"}
    torchrun |= {"--rdzv-id", "--nodes", "--ntasks-per-node", "--random-source"}  # srun, shuf
    assert not plain - flags - torchrun, sorted(plain - flags - torchrun)
