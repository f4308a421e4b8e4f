"""medtune: LoRA fine-tuning and honest evaluation of small language models on medical multiple-choice exams."""

__version__ = "0.1.0"
