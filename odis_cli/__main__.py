"""`python -m odis_cli ...` (and `torchrun -m odis_cli ...`) run the `odis` command."""

from odis_cli.app import main

if __name__ == "__main__":
    main()
