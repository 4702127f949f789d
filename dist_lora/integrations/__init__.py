"""Integrations with the trainers people already use (``dist_lora.integrations.hf`` for HF Trainer)."""
