"""Runners behind one interface, the tiled pipeline over them, image I/O, timing."""
