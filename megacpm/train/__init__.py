"""Training: the trainer loop, callbacks, memory and FLOPs accounting."""
