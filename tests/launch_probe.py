"""Run by tests/test_launch.py under `accelerate launch`: the launch check, as a stage runs it first."""

from rlhf_lm.errors import ConfigError
from rlhf_lm.launch import check_current_launch, cpu_ranks_join_one_group

cpu_ranks_join_one_group()  # what the rlhf-lm CLI does first
try:
    check_current_launch()
    print("LAUNCH OK")
except ConfigError as e:
    print(f"LAUNCH ERROR: {e}")
