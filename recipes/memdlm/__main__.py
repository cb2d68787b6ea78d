"""`python -m recipes.memdlm`: the project's main job."""

from recipes.memdlm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
