"""The toy world: a small synthetic image domain where IP-Adapter runs for real on a CPU.

``shapes`` generates 32x32 images of one coloured shape on a plain background, with captions and
ground-truth attributes (including held-out shape/colour pairs); ``reader`` recovers those attributes
from any 32x32 image, so generated images can be scored against their prompts.
"""
