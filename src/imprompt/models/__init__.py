"""Whole-model state dicts in foreign checkpoint layouts (the original single-file "LDM" layout)."""
