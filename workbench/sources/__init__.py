"""Where models and text come from: hub ids, local folders, GGUF files, datasets, text files, the embedded defaults."""
