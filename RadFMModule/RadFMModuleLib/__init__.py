"""Slicer-free parts of the RadFM module: the chat panel, its Qt shim, settings and the
assistant that turns a scene selection into worker requests. Only ``scene_adapters`` and
``dependencies`` talk to Slicer itself, and only when called from inside Slicer."""
