"""Weights from the learner to the rollout engines (issue 8): SGLang's distributed update over NCCL/gloo, HF
exports on disk for late engines and as a backend, and a no-op. Entry point: `factory.build_weight_sync`."""
