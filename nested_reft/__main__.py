"""`python -m nested_reft ...` is the `nested-reft` command; it is how torchrun starts one: every rank runs

    torchrun --nproc-per-node N -m nested_reft train RECIPE [--set k=v ...]
"""

from nested_reft.cli.main import main

if __name__ == "__main__":
    main()
