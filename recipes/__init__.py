"""YAML recipes (generation presets, training recipes), installed as urae_lite.recipes so presets resolve
from a wheel install too."""
