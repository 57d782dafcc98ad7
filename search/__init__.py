"""Search a gallery of images with an aligned model: index, query, serve (docs/aligned-model.md#search)."""
