"""GPU speed/memory benchmarks of the DPO step against TRL and Unsloth (not part of the installed package).

    python -m bench.dpo --help          # bench/README.md
"""
