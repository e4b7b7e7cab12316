"""nested-reft: reinforcement fine-tuning with verifiable rewards, sampled by a layer-skipped view of the model."""

__version__ = "0.1.0"
