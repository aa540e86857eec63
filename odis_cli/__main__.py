"""`python -m odis_cli ...` runs the `odis` command; torchrun needs a module to start:
`torchrun --nproc-per-node 8 -m odis_cli pretrain ...` (or `... -m odis_cli embed ...`)."""

from odis_cli.app import main

if __name__ == "__main__":
    main()
