"""``prunelab reproduce catp --preset tiny|full``: dispatch to the preset's module."""

from prunelab.reproductions import preset_dispatch
from prunelab.reproductions.catp import full, tiny

add_arguments, main = preset_dispatch({"tiny": tiny, "full": full})
