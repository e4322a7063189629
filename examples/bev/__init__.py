"""Small 3D-perception (BEV) stand-in models, a synthetic multi-camera scene set and its metric."""
