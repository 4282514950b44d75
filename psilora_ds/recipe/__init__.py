"""Library components of the training recipe ``launch/train.py``: configuration, data, model,
optimizer, DeepSpeed config, run outputs."""
