"""Training the shipped default model (needs the ``train`` extra: ``pip install .[train]``)."""
