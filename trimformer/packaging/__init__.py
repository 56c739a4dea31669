"""[no torch] Bundles: manifest, archive, ORT format."""
