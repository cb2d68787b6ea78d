"""Claims of docs/memdlm.md ("Where things are") that code can check: `adapter(model)` is the one
place that looks at a model's type, and the tokenizer's type is looked at only where the doc says.
(The claim that no module imports another module's underscore names: tests/test_import_rules.py.)
"""

from __future__ import annotations

import ast
import pathlib

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


def test_the_tokenizers_type_is_looked_at_only_where_the_doc_says():
    found = sorted(
        {
            str(path.relative_to(RECIPE))
            for path in _outside_backbones()
            if path.name != "tasks.py"  # where ByteTokenizer is defined
            for _, name in _type_checks(path)
            if name in TOKENIZERS
        }
    )
    assert found == ["data/prepare.py", "eval/suite.py"]
    assert all(f"`{name}`" in DOC for name in found)


SPLIT_CALLS = {"hidden_states", "logits_from", "features_from"}


def test_the_split_forward_and_layer_stack_are_reached_through_the_backbone():
    """Outside backbones/ (and the early-layer distillation, which needs the reference model's
    norm), no code calls the split forward or walks `.layers` on a model itself."""
    allowed = {
        ("method/inner.py", "hidden_states"),  # distill_hidden_layers='early'
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
                if not (through or named) and (rel, node.attr) not in allowed:
                    offences.append(f"{rel}:{node.lineno} .{node.attr}")
    assert not offences, "\n".join(offences)


def test_the_backbone_is_built_once_per_model():
    import diffusion as dd
    from recipes.memdlm.backbones import adapter

    model = dd.Transformer(20, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16)
    assert adapter(model) is adapter(model)
    assert "_memdlm_backbone" not in model.state_dict() and adapter(model).module is model
