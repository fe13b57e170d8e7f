"""`python -m rollout_server.worker [--config F] [--section.key value ...]`: run one rollout worker."""

from rollout_server.worker_cli import worker_main

if __name__ == "__main__":
    worker_main()
