"""The custom-rule example in docs/api.md works as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tests.helpers import ops


def test_custom_rule_example_from_the_api_docs():
    text = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    code = re.search(r"## Writing a rule\n\n```python\n(.*?)```", text, re.S).group(1)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            h = self.proj(x)
            return h * torch.sigmoid(h)

    scope = {"model": Model().eval(), "args": (torch.randn(1, 4, 8),)}
    exec(compile(code, "docs/api.md", "exec"), scope)
    c = scope["c"]
    assert next(p for p in c.passes if p.name == "fuse_silu").matches == 1
    assert ops(c.rewritten)["silu"] == 1 and ops(c.rewritten)["sigmoid"] == 0
