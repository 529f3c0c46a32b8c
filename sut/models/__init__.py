"""The model families the native engine runs: their configs (config.py, free of
torch), their table (families.py), their modules (llama.py, mixtral.py, mome.py)."""
