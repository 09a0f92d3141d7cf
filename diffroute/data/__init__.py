"""Data sets the embedded models train and are scored on (the emoji glyphs, built from Debian's fonts)."""
