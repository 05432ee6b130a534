"""TOML profiles: parsing, validation, and locating keys in the file for messages."""
