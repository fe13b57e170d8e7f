"""The learner's megatron-core model: built from a Hugging Face config, loaded from and exported to HF weights."""
