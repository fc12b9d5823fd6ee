"""embedtrain: train text and multimodal embedding models on the Hugging Face stack."""

__version__ = "0.1.0"
