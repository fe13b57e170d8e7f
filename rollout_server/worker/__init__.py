"""Rollout workers: consume tasks, generate groups of samples through the engines, publish them to `rollouts`."""
