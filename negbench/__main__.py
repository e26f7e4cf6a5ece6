"""``python -m negbench`` (also what ``torchrun -m negbench`` starts)."""

from negbench.cli import main

main()
