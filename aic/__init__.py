"""`python -m aic ...`: the `aic` command for launchers that start a module (torchrun -m, deepspeed --module)."""
