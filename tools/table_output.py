"""What the table tools share: a markdown table written under --out and printed."""
from __future__ import annotations

import os


def save_and_print(out: str, name: str, lines) -> None:
    text = "\n".join(lines)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        f.write(text + "\n")
    print(text)
