"""featsteer: find and steer the features behind refusal in language models."""

__version__ = "0.1.0"
