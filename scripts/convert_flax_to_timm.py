"""The exporter's former name, kept so that existing commands run: `scripts/convert_to_timm.py` exports a run of
any recipe. A Flax checkpoint that no run folder describes (a deit3-jax `.msgpack`, a bare checkpoint folder) is
read as a DeiT-III ViT, as this script always did.

    python scripts/convert_flax_to_timm.py runs/deit3                  # = python scripts/convert_to_timm.py runs/deit3
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import convert_to_timm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    known = [a for a in argv if not a.startswith("-")]
    if "--recipe" not in argv and known and not convert_to_timm.trained_by(Path(known[0])):
        argv += ["--recipe", "deit3_jax.py"]  # the generic Flax ViT reader (and deit3-jax's .msgpack)
    return convert_to_timm.main(argv)


if __name__ == "__main__":
    sys.exit(main())
