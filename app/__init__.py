"""Gradio demo app; the page itself comes with issue #6."""
