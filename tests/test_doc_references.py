"""The pages of docs/ and the README name real things: every repository path they give exists,
every signature they write out for `bl.`, `dd.` and `mm.` has those parameters with those
defaults, and bilevel imports nothing but torch and the standard library (docs/bilevel.md)."""

from __future__ import annotations

import ast
import inspect
import pathlib
import re
import sys

import bilevel as bl
import diffusion as dd
import memory as mm

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
PATH = re.compile(
    r"(?<![\w/.-])((?:tests|benchmarks|recipes|diffusion|bilevel|memory|examples|docs|\.ci)"
    r"/[\w./*<>-]*[\w*]/?)(?:::(\w+))?"
)
EXTERNAL = {"examples/llada21/sft.py"}  # a file of the MemDLM authors' repository
LIBRARIES = {"bl": bl, "dd": dd, "mm": mm}


def test_every_repository_path_in_the_docs_exists():
    checked, missing = 0, []
    for page in PAGES:
        for match in PATH.finditer(page.read_text()):
            path, test = match.groups()
            if path in EXTERNAL:
                continue
            pattern = re.sub(r"<\w+>", "*", path)  # base-<hash>.pt, test_kernels_*.py
            found = [p for base in (ROOT, page.parent) for p in base.glob(pattern)]
            checked += 1
            if not found:
                missing.append(f"{page.name}: {path}")
            elif test and f"def {test}(" not in found[0].read_text():
                missing.append(f"{page.name}: {path}::{test}")
    assert checked >= 60 and not missing, "\n".join(missing)


def _mentions(text: str):
    """(library, name, argument text) of each `bl.f(...)`, `dd.f(...)`, `mm.f(...)` outside
    the ```python blocks (those run in their own tests)."""
    text = re.sub(r"```python\n.*?```", "", text, flags=re.S)
    for match in re.finditer(r"\b(bl|dd|mm)\.([A-Za-z_]\w*)\(", text):
        end, depth = match.end(), 1
        while depth and end < len(text):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        yield match.group(1), match.group(2), " ".join(text[match.end() : end - 1].split())


def _documented_signatures():
    """(page, name, function, [(parameter, keyword-only, default text or None)]) for each
    mention that reads as a signature: it parses as a parameter list, its positional names are
    the function's own, in order, and no default is a bare variable (a call with values)."""
    for page in PAGES:
        for library, name, args in _mentions(page.read_text()):
            try:
                spec = ast.parse(f"def f({args}): pass").body[0].args
            except SyntaxError:
                continue
            function = getattr(LIBRARIES[library], name)
            params = list(inspect.signature(function).parameters)
            positional = [a.arg for a in spec.posonlyargs + spec.args]
            defaults = spec.defaults + spec.kw_defaults
            if positional != params[: len(positional)] or any(
                isinstance(d, ast.Name) for d in defaults if d is not None
            ):
                continue
            rows = []
            first_default = len(positional) - len(spec.defaults)
            for i, name_ in enumerate(positional):
                default = spec.defaults[i - first_default] if i >= first_default else None
                rows.append((name_, False, default))
            rows += [(a.arg, True, d) for a, d in zip(spec.kwonlyargs, spec.kw_defaults)]
            yield page.name, name, function, rows


def test_documented_signatures_match_the_code():
    seen, wrong = set(), []
    for page, name, function, rows in _documented_signatures():
        seen.add(name)
        params = inspect.signature(function).parameters
        for param, keyword_only, default in rows:
            where = f"{page}: {name}({param})"
            if param not in params:
                wrong.append(f"{where}: no such parameter")
                continue
            actual = params[param]
            if keyword_only != (actual.kind is actual.KEYWORD_ONLY):
                wrong.append(f"{where}: keyword-only in the doc is {keyword_only}")
            if default is None:
                continue
            try:
                value = ast.literal_eval(default)
            except ValueError:
                continue  # e.g. mode=bl.Unrolled(), linsolve=bl.NormalCG()
            if actual.default is actual.empty or actual.default != value:
                wrong.append(f"{where}: default {value!r} in the doc, {actual.default!r} here")
    expected = {"solve", "sgd", "adam", "rmsprop", "CG", "Neumann", "corrupt", "nested_mask"}
    expected |= {"masked_diffusion_loss", "generate", "generate_block_aligned", "Transformer"}
    expected |= {"elbo_log_likelihood", "choose", "sample_t", "implicit_root", "NormalCG"}
    assert expected <= seen, sorted(expected - seen)
    assert not wrong, "\n".join(wrong)


def test_bilevel_imports_only_torch_and_the_standard_library():
    outside = set()
    for path in (ROOT / "bilevel").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = {node.module.split(".")[0]}
            else:
                continue
            outside |= tops - set(sys.stdlib_module_names) - {"torch", "bilevel"}
    assert "The library imports only `torch`" in (ROOT / "docs" / "bilevel.md").read_text()
    assert not outside, sorted(outside)
