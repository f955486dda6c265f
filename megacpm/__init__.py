"""megacpm: a 3D-parallel training engine for MiniCPM-family language models."""

__version__ = "0.1.0"


def load_pretrained(path, dtype=None, device=None):
    """A MiniCPM in one process from a Hugging Face MiniCPM directory or a megacpm run/checkpoint
    directory (CPU, float32 by default); ``model(input_ids)`` returns the logits [batch, seq, vocab].
    See megacpm.huggingface.load_pretrained."""
    import torch

    from megacpm.huggingface import load_pretrained as _load_pretrained

    return _load_pretrained(path, dtype=dtype or torch.float32, device=device)
