"""Small helpers every layer shares: atomic files and JSON, limits, quiet loading, seeding, fingerprints, image
conversion and checked loading of untrusted folders."""
