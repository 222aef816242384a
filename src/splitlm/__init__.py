"""splitlm: split learning fine-tuning of Hugging Face causal language models."""

from splitlm.errors import SplitLMError

__all__ = ["SplitLMError", "__version__"]
__version__ = "0.1.0"
