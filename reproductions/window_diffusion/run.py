"""``prunelab reproduce window_diffusion --preset tiny|full``: dispatch to the preset's module."""

from prunelab.reproductions import preset_dispatch
from prunelab.reproductions.window_diffusion import full, tiny

add_arguments, main = preset_dispatch({"tiny": tiny, "full": full})
