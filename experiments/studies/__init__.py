"""The studies, one package per family; `experiments/registry.py` lists them."""
