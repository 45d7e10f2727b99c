"""Training recipes for `edje fit --config ...`, installed with the package."""
