"""`python -m rollout_server.worker [--config F] [--section.key value ...]`: run one rollout worker
(`longtrace rollout worker`)."""

from common.cli import run_command
from rollout_server.cli import register

if __name__ == "__main__":
    run_command(register, ["rollout", "worker"])
