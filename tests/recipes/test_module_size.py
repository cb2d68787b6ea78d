"""Every recipe module stays readable in one sitting: at most 400 lines (issue 30, item 7).

A module that grows past the limit is split by concept, not trimmed by packing lines.
"""

from pathlib import Path

RECIPE = Path(__file__).resolve().parents[2] / "recipes"
LIMIT = 400


def test_no_recipe_module_is_over_the_line_limit():
    sizes = {
        str(path.relative_to(RECIPE.parent)): len(path.read_text(encoding="utf-8").splitlines())
        for path in RECIPE.rglob("*.py")
    }
    assert len(sizes) > 50  # the walk found the recipe, not an empty folder
    over = {name: n for name, n in sizes.items() if n > LIMIT}
    assert not over, f"recipe modules over {LIMIT} lines (split them by concept): {over}"
