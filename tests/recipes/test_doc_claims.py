"""Claims of docs/memdlm.md ("Where things are") that code can check: `adapter(model)` is the one
place that looks at a model's type, and the tokenizer's type is looked at only where the doc says.
(The claim that no module imports another module's underscore names: tests/test_import_rules.py.)
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "memdlm"
BACKBONES = RECIPE / "backbones"
DOC = (ROOT / "docs" / "memdlm.md").read_text()
TOKENIZERS = {"ByteTokenizer", "HFTokenizer", "PreTrainedTokenizerBase"}
MODELS = {"Transformer", "PreTrainedModel"}  # diffusion.Transformer, transformers' models


def _classes(folder: pathlib.Path) -> set[str]:
    return {
        node.name
        for path in folder.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
    }


def _type_checks(path: pathlib.Path):
    """(line, class name) of each isinstance/issubclass/type(...) is comparison in the file."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("isinstance", "issubclass")
            and len(node.args) == 2
        ):
            kinds = node.args[1]
            for kind in kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]:
                name = kind.attr if isinstance(kind, ast.Attribute) else getattr(kind, "id", "")
                yield node.lineno, name


def _outside_backbones():
    return [p for p in RECIPE.rglob("*.py") if BACKBONES not in p.parents]


def test_only_the_backbones_look_at_a_models_type():
    model_classes = (_classes(BACKBONES) - TOKENIZERS) | MODELS
    offences = [
        f"{path.relative_to(ROOT)}:{line} isinstance(..., {name})"
        for path in _outside_backbones()
        for line, name in _type_checks(path)
        if name in model_classes or name.endswith("Backbone")
    ]
    assert not offences, "\n".join(offences)


def test_no_code_above_the_backbones_looks_at_a_tokenizers_type():
    """Data preparation and evaluation ask the tokenizer (`bytes_are_tokens`), as the doc says,
    instead of testing its class; both tokenizers answer."""
    from recipes.memdlm.backbones.hf.loading import HFTokenizer
    from recipes.memdlm.data.tasks import ByteTokenizer

    found = [
        f"{path.relative_to(RECIPE)}:{line}"
        for path in _outside_backbones()
        for line, name in _type_checks(path)
        if name in TOKENIZERS
    ]
    assert not found, found
    assert ByteTokenizer().bytes_are_tokens
    assert not HFTokenizer(None, 0, 1, 2, 3).bytes_are_tokens
    assert "`bytes_are_tokens`" in DOC.split("## Where things are", 1)[1]


SPLIT_CALLS = {"hidden_states", "logits_from", "features_from"}


def test_the_split_forward_and_layer_stack_are_reached_through_the_backbone():
    """Outside backbones/ (and the early-layer distillation, which needs the reference model's
    norm), no code calls the split forward or walks `.layers` on a model itself."""
    allowed = {
        ("method/distill.py", "hidden_states"),  # distill_hidden_layers='early'
        ("estimate.py", "layers"),  # Shape.layers, a count in the memory estimate
    }
    offences = []
    for path in _outside_backbones():
        rel = str(path.relative_to(RECIPE))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in SPLIT_CALLS | {"layers"}:
                owner = node.value
                through = isinstance(owner, ast.Call) and getattr(owner.func, "id", "") == "adapter"
                named = getattr(owner, "id", "") in ("backbone", "self")
                named = named or getattr(owner, "attr", "") == "backbone"  # split.backbone
                if not (through or named) and (rel, node.attr) not in allowed:
                    offences.append(f"{rel}:{node.lineno} .{node.attr}")
    assert not offences, "\n".join(offences)


def test_the_backbone_writes_nothing_onto_the_users_module():
    import diffusion as dd
    from recipes.memdlm.backbones import adapter

    model = dd.Transformer(20, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16)
    before = dict(vars(model))
    assert adapter(model).module is model
    assert vars(model).keys() == before.keys()


LAYOUT = DOC.split("## Where things are", 1)[1].split("**Adding a backbone**", 1)[0]


def test_every_recipe_module_is_in_the_layout_table():
    """Each module of recipes/memdlm/ is named in the "Where things are" table (by file name,
    or by module name for the subcommands)."""
    cells = set(re.findall(r"`([^`]+)`", LAYOUT))
    missing = [
        str(path.relative_to(RECIPE))
        for path in RECIPE.rglob("*.py")
        if path.name != "__init__.py" and path.name not in cells and path.stem not in cells
    ]
    assert not missing, f"modules not in docs/memdlm.md's layout table: {missing}"


# (module, attribute path) that the layout table names.
LAYOUT_NAMES = [
    ("errors", "UserError"),
    ("api", "generate"),
    ("api", "adapt_prompt"),
    ("api", "fast_weights_for"),
    ("api", "log_likelihood"),
    ("backbones", "adapter"),
    ("backbones.base", "Backbone"),
    ("backbones.base", "SplitForwardOf"),
    ("method.step", "Standard"),
    ("method.step", "MemDLM.draw"),
    ("method.step", "MemDLM.loss"),
    ("method.step", "MemDLM.inner"),
    ("method.step", "adapt_to_prompt"),
    ("method.trajectory", "Draws.rows"),
    ("method.inner", "adapt"),
    ("method.step", "step_record"),
    ("loop.phase", "train_phase"),
    ("loop.phase", "StepSettings.build"),
    ("loop.phase", "run_steps"),
    ("loop.phase", "PhaseState"),
    ("loop.steps", "Counters"),
    ("loop.parallel", "InnerSync"),
    ("config", "MemDLMConfig"),
]


@pytest.mark.parametrize(("module", "name"), LAYOUT_NAMES)
def test_the_names_in_the_layout_table_live_where_it_says(module, name):
    assert re.search(rf"`[^`]*\b{re.escape(name)}\b[^`]*`", DOC), name
    target = importlib.import_module(f"recipes.memdlm.{module}")
    for part in name.split("."):
        target = getattr(target, part)
    assert callable(target)


def test_backbones_data_and_loop_do_not_import_build():
    """build.py sits above backbones/, data/ and loop/: none of them imports it."""
    offences = []
    for folder in ("backbones", "data", "loop"):
        for path in (RECIPE / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom):
                    continue
                names = {alias.name for alias in node.names}
                if node.module == "recipes.memdlm.build" or (
                    node.module == "recipes.memdlm" and "build" in names
                ):
                    offences.append(str(path.relative_to(RECIPE)))
    assert "`build.py`" in LAYOUT and not offences, offences


def _doc_value(text: str):
    text = text.strip().strip("`")
    if text in ("none", "[]"):
        return None if text == "none" else []
    if text in ("true", "false"):
        return text == "true"
    try:
        return float(text)
    except ValueError:
        return text


def _reference_defaults() -> list[tuple[str, object]]:
    """(key, documented default) for every row of the configuration reference whose default
    column gives values (not "see preset")."""
    table = DOC.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 3 or "`" not in cells[0]:
            continue
        keys = re.findall(r"`([^`]+)`", cells[0])
        if "see preset" in cells[1] or "found in" in cells[1]:
            continue
        if len(keys) == 1:
            values = [cells[1]]
        else:
            values = re.split(r",\s*", cells[1])
        if len(values) == 1:  # one value for several keys (`data.train_file`, `data.eval_file`)
            values *= len(keys)
        section = keys[0].rsplit(".", 1)[0] if "." in keys[0] else ""
        for key, value in zip(keys, values):
            if key.startswith("."):
                names = [f"pretrain{key}", f"train{key}"]
            elif "." not in key and section:
                names = [f"{section}.{key}"]
            else:
                names = [key]
            rows += [(name, value) for name in names]
    return rows


def test_the_configuration_reference_gives_the_cpu_tiny_defaults():
    from recipes.memdlm.config import build_config

    flat: dict[str, object] = {}

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(build_config("cpu-tiny").model_dump())
    rows = _reference_defaults()
    assert len(rows) >= 60
    wrong = []
    for key, text in rows:
        actual = flat[key]
        value = _doc_value(text)
        if isinstance(actual, list) and isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        if isinstance(actual, (int, float)) and not isinstance(actual, bool):
            ok = isinstance(value, float) and value == actual
        else:
            ok = value == actual
        if not ok:
            wrong.append(f"{key}: doc {text!r}, code {actual!r}")
    assert not wrong, "\n".join(wrong)


EVALUATION = (ROOT / "docs" / "evaluation.md").read_text()


def test_every_harness_model_arg_is_in_the_evaluation_table():
    """docs/evaluation.md's "Model args" table names every field of `harness_setup.Options`,
    and its inner-loop row the MemDLMConfig fields that the model args may not override."""
    import dataclasses

    from recipes.memdlm.config import MemDLMConfig
    from recipes.memdlm.eval.harness_setup import INNER_FIELDS, Options

    table = EVALUATION.split("## Model args", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("|")]
    cells = {name for row in rows for name in re.findall(r"`(\w+)`", row)}
    missing = [f.name for f in dataclasses.fields(Options) if f.name not in cells]
    assert not missing, f"model args missing from docs/evaluation.md: {missing}"
    assert set(MemDLMConfig.model_fields) - set(INNER_FIELDS) == {"per_sample", "gap_every"}
    assert "any `memdlm.*` field but `per_sample` and `gap_every`" in table


def test_the_fused_loss_backend_reaches_the_documented_entry_points():
    """docs/kernels.md: `loss_backend` is a field of `Standard`, `MemDLM` and `StepSettings` and an
    argument of standard_loss and adapt_to_prompt, and the compiled pieces have the names it
    gives, reached through the methods' `compiled()`."""
    import inspect

    from recipes.memdlm import method
    from recipes.memdlm.loop.phase import StepSettings

    kernels = (ROOT / "docs" / "kernels.md").read_text()
    for function in (method.standard_loss, method.adapt_to_prompt):
        assert inspect.signature(function).parameters["loss_backend"].default == "auto"
    for kind in (method.Standard, method.MemDLM, StepSettings):
        assert kind.__dataclass_fields__["loss_backend"].default == "auto"
    assert "compiled" in StepSettings.__dataclass_fields__
    for name in ("standard_loss", "memdlm_core", "head_loss"):
        assert callable(getattr(method, name)) and name in kernels
    assert callable(method.Standard.compiled) and callable(method.MemDLM.compiled)
    import diffusion.sampling as sampling

    for name in ("_call_model", "_dense_commit"):
        assert callable(getattr(sampling, name)) and f"`{name}`" in kernels


def test_the_byte_tokenizer_ids_are_the_documented_ones():
    """docs/memdlm.md, "Data": bytes 0-255, then pad (256), mask (257) and EOS (258)."""
    from recipes.memdlm.data.tasks import ByteTokenizer

    tok = ByteTokenizer()
    assert "bytes 0-255, then pad (256), mask (257) and EOS (258)" in DOC
    assert (tok.pad_id, tok.mask_id, tok.eos_id) == (256, 257, 258)
