"""`python -m workbench`: the `workbench` command, the form torchrun starts
(`torchrun --nproc-per-node 2 -m workbench run profile.toml`, docs/scaling.md)."""

from workbench.cli import main

if __name__ == "__main__":
    main()
