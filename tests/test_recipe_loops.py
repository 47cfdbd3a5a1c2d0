"""recipes/vit.py and recipes/resnet.py are each one readable file (nanoGPT style), so their
training loops are written out twice on purpose. This test keeps the copies from drifting: the
two main() functions must be the same line for line once the model's name is taken out."""

from __future__ import annotations

import ast
import re
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def main_source(name: str) -> list[str]:
    text = (RECIPES / f"{name}.py").read_text()
    tree = ast.parse(text)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    lines = text.splitlines()[fn.lineno - 1:fn.end_lineno]
    neutral = []
    for line in lines:
        line = re.sub(r"ViT|ResNet", "MODEL", line)
        line = re.sub(r"\bvit\b|\bresnet\b", "model_name", line)
        neutral.append(line)
    return neutral


def test_vit_and_resnet_loops_are_the_same_line_for_line():
    vit, resnet = main_source("vit"), main_source("resnet")
    assert len(vit) > 100
    diff = [(i, a, b) for i, (a, b) in enumerate(zip(vit, resnet, strict=False)) if a != b]
    assert not diff and len(vit) == len(resnet), diff[:5]
